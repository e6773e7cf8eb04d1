"""A written GGUF file checked against the trained model, by llama.cpp itself where it is installed
(llama-cpp-python), else by transformers' GGUF reader; the check says which ran.

What is compared (the merged model in float32 is the reference):
- tokens: the file's tokenizer turns every check prompt, rendered as training rendered prompts, into the ids
  training's tokenizer did (a wrong pre-tokenizer or a lost special token shows here);
- chat formatting: the chat template read back from the file renders a user message (with the recipe's system
  message) to the prompt training used. Under llama.cpp its C formatter (`llama_chat_apply_template`, what
  llama-cli and llama-server without --jinja use: built-in templates it recognises by their text) is run
  too, and a difference is stated, not refused, since that formatter only approximates templates;
- next-token distributions on check.CHECK_PROMPTS: for f32/f16/bf16 the total variation distance to the
  trained model at most `tolerance`, and more than that from the base model;
- greedy continuations (CONTINUATION tokens) of the rendered check prompts: for f32/f16/bf16 the same as the
  trained model's, except where the trained model itself nearly ties (below);
- top-1 agreement at every position of those prompts and the trained model's continuations: for the
  quantized types at least TOP1_BOUNDS[quant]; and where the trained and the base model's top-1 differ, the
  file must side with the trained model more often.
A check that fails is a UserError: the export is not written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from grpo_cli.data.examples import render_chat
from grpo_cli.errors import UserError
from grpo_cli.export.check import CHECK_PROMPTS, tv
from grpo_cli.export.protocol import Trained
from grpo_cli.rollout.sampling import eos_token_ids

FLOAT_TYPES = {"f32": None, "f16": torch.float16, "bf16": torch.bfloat16}  # quant -> the rounding of its weights
# llama.cpp's own numerics (an f16 KV cache, its kernels) cost a total variation of 1.9e-3 on SmolLM2 written
# in f32 (2026-12-07): the floor of the tolerance, five times that. On it goes three times what rounding the
# trained model's weights to the file's type costs (f16: 2.0e-3 on SmolLM2; bf16: 2.3e-2).
RUNTIME_FLOOR = 0.01
ROUNDING_FACTOR = 3.0
CONTINUATION = 32  # greedy tokens compared per check prompt
# Quantized types: the least share of positions where the file's top-1 token is the trained model's, under
# llama.cpp (which also rounds the activations to 8 bits in these types' products). Measured on SmolLM2-135M
# (hidden size 576, so the K-quants fall back to other types on most of its tensors), the smallest model we
# cover and so the most sensitive, as it ships (274 positions) / after grpo's recipe (217 positions): q8_0
# 0.996/0.963, q6_k 0.945/0.982, q5_1 0.774/0.747, q5_0 0.861/0.783, q5_k_m 0.865/0.825, q4_1 0.887/0.710,
# q4_k_m 0.894/0.908, q4_0 0.672/0.691; q8_0 0.933 after two steps at a learning rate of 0.02 (the tests'
# run, whose distributions are flatter: more near-ties). A broken file (a wrong tensor layout, the wrong
# tokenizer) agrees at a few percent.
TOP1_BOUNDS = {"q8_0": 0.90, "q6_k": 0.80, "q5_1": 0.60, "q5_0": 0.60, "q5_k_m": 0.60, "q4_1": 0.50,
               "q4_0": 0.50, "q4_k_m": 0.50}
VERIFIERS = ("auto", "llama.cpp", "transformers")
# Text that tells pre-tokenizers apart (runs of digits, contractions, runs of spaces and newlines, letters
# outside ASCII), prompted as a user's message and tokenized besides the check prompts: the chat prompts alone
# split the same under llama.cpp's "smollm", "llama-bpe" and "qwen2" for SmolLM2's vocabulary, this does not.
TOKEN_PROBE = "Hello world's 1234567 it's  double  spaces\n\n\nnewlines \u00c4\u00d6 \u6f22\u5b57 can't, 3.14159!"


def llama_cpp_version() -> str | None:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Prompted:
    """A check prompt rendered as training rendered prompts, and what the trained model does with it."""

    text: str
    ids: list[int]  # training's tokenizer's
    continuation: list[int]  # the trained model's greedy tokens
    log_probs: torch.Tensor  # [T + C, V] the trained model's next-token log-probs along prompt + continuation
    base_top1: torch.Tensor | None  # [T + C] the base model's top-1 tokens there; None for a full fine-tune


@dataclass(frozen=True)
class GgufCheck:
    verifier: str
    quant: str
    vs_adapter: float  # max total variation to the trained model on CHECK_PROMPTS
    vs_base: float
    tolerance: float | None  # enforced for the float types; None for quantized ones
    top1: float  # share of positions with the trained model's top-1 token
    positions: int
    top1_bound: float | None
    greedy_equal: int  # check prompts whose greedy continuation is the trained model's
    greedy_ties: int  # ... that part where the trained model itself nearly ties
    prompts: int
    sides: tuple[int, int, int]  # (with the trained model, with the base, positions where those two differ)
    chat: str  # how the file's chat template renders training's messages
    builtin_chat: str | None  # llama.cpp's C formatter's rendering, compared

    def summary(self) -> str:
        figures = (f"distributions within {self.vs_adapter:.1e} of the trained model (allowed {self.tolerance:.1e})"
                   if self.tolerance is not None else
                   f"top-1 token the trained model's at {self.top1:.1%} of {self.positions} positions (at least "
                   f"{self.top1_bound:.0%})")
        return f"by {self.verifier}: the training prompts' tokens and chat formatting, {figures}, " \
               f"greedy continuations {self.greedy_equal}/{self.prompts} equal"

    def card_text(self) -> str:
        if self.tolerance is not None:
            closeness = (f"next-token distributions differ from the merged float32 model's by at most "
                         f"{self.vs_adapter:.2e} (total variation; allowed {self.tolerance:.1e}) and from the base "
                         f"model's by {self.vs_base:.2e}; greedy continuations ({CONTINUATION} tokens) of the "
                         f"rendered check prompts equal the merged model's for {self.greedy_equal} of "
                         f"{self.prompts}" + (f" ({self.greedy_ties} part at a near-tie of the merged model)"
                                              if self.greedy_ties else ""))
        else:
            closeness = (f"the top-1 next token is the merged float32 model's at {self.top1:.1%} of "
                         f"{self.positions} positions (at least {self.top1_bound:.0%} required for {self.quant}); "
                         f"where the merged and the base model's top-1 differ ({self.sides[2]} positions) it sides "
                         f"with the merged model {self.sides[0]} times and with the base {self.sides[1]}; greedy "
                         f"continuations equal for {self.greedy_equal} of {self.prompts}")
        builtin = f" llama.cpp's C chat formatter: {self.builtin_chat}." if self.builtin_chat else ""
        return (f"Verified after writing, by {self.verifier}: the file's tokenizer gives the training prompts' "
                f"token ids; its chat template {self.chat}.{builtin} On the check prompts, {closeness}.")


class LlamaCpp:
    """The file as llama.cpp runs it, through llama-cpp-python."""

    def __init__(self, path: Path, context: int):
        from llama_cpp import Llama

        self.name = f"llama.cpp (llama-cpp-python {llama_cpp_version()})"
        self.llm = Llama(model_path=str(path), n_ctx=context, n_batch=context, n_ubatch=context, logits_all=True,
                         n_threads=max(1, len(os.sched_getaffinity(0))), verbose=False)

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=add_bos, special=True)

    def log_probs(self, ids: list[int]) -> torch.Tensor:
        """[T, V] next-token log-probs at every position of `ids`, from a fresh context."""
        self.llm._ctx.kv_cache_clear()  # reset() alone leaves the cache's cells taken
        self.llm.reset()
        self.llm.eval(ids)
        return torch.from_numpy(np.array(self.llm.scores[: len(ids)], dtype=np.float32)).log_softmax(-1)

    def greedy(self, ids: list[int], new: int, stop: set[int]) -> list[int]:
        self.llm._ctx.kv_cache_clear()
        self.llm.reset()
        self.llm.eval(ids)
        out: list[int] = []
        while len(out) < new:
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(token)
            if token in stop:
                break
            self.llm.eval([token])
        return out

    def chat(self, messages: list[dict], kwargs: dict) -> str | None:
        """The messages rendered by the chat template read from the file, as llama-cpp-python's chat
        completions render them (Jinja, the file's BOS and EOS texts)."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.llm.metadata.get("tokenizer.chat_template")
        if template is None:
            return None
        text = lambda token: self.llm._model.token_get_text(token) if token >= 0 else ""  # noqa: E731
        formatter = Jinja2ChatFormatter(template, eos_token=text(self.llm.token_eos()),
                                        bos_token=text(self.llm.token_bos()))
        return formatter(messages=messages, **kwargs).prompt

    def builtin_chat(self, messages: list[dict]) -> str | None:
        """llama.cpp's C chat formatter on the file's template; None where it does not recognise it."""
        import ctypes

        import llama_cpp

        template = llama_cpp.llama_model_chat_template(self.llm._model.model, None)
        if template is None:
            return None
        chat = (llama_cpp.llama_chat_message * len(messages))(
            *[llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode())
              for m in messages])
        size = 8 * sum(len(m["content"]) for m in messages) + 4096
        buffer = ctypes.create_string_buffer(size)
        length = llama_cpp.llama_chat_apply_template(template, chat, len(messages), True, buffer, size)
        return buffer.raw[:length].decode(errors="replace") if 0 <= length <= size else None

    def close(self) -> None:
        self.llm.close()


class TransformersReader:
    """The file as transformers' GGUF reader loads it (dequantized to float32): where llama.cpp is missing."""

    def __init__(self, path: Path, context: int, why: str):
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = f"transformers' GGUF reader (transformers {transformers.__version__}; {why})"
        self.model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                          dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ([self.tokenizer.bos_token_id] if add_bos else []) + ids

    def log_probs(self, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)

    def greedy(self, ids: list[int], new: int, stop: set[int]) -> list[int]:
        with torch.no_grad():
            out = self.model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False,
                                      eos_token_id=sorted(stop), pad_token_id=sorted(stop)[0])
        return out[0, len(ids):].tolist()

    def chat(self, messages: list[dict], kwargs: dict) -> str | None:
        if not getattr(self.tokenizer, "chat_template", None):
            return None
        return render_chat(self.tokenizer, messages, kwargs)

    def builtin_chat(self, messages: list[dict]) -> str | None:
        return None

    def close(self) -> None:
        del self.model


def check_verifier(verifier: str) -> None:
    if verifier not in VERIFIERS:
        raise UserError(f"--verifier {verifier}: use one of {', '.join(VERIFIERS)}.")
    if verifier == "llama.cpp" and llama_cpp_version() is None:
        raise UserError("--verifier llama.cpp needs llama-cpp-python: pip install 'grpo-cli[gguf]' (it builds "
                        "llama.cpp from source, about 7 minutes on 2 cores).")


def _messages(trained: Trained, text: str) -> list[dict] | None:
    """How training would have put `text` to the model as chat messages; None for plain-text prompts."""
    if not trained.chat:
        return None
    system = trained.recipe.data.system_prompt if trained.recipe is not None else None
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def rendered(trained: Trained, prompt: str) -> str:
    """`prompt` as training rendered prompts (its chat template, system message and template options)."""
    messages = _messages(trained, prompt)
    return prompt if messages is None else render_chat(trained.tokenizer, messages, trained.template_kwargs)


def prompted(trained: Trained) -> list[Prompted]:
    """The check prompts as training rendered prompts, with the trained model's greedy continuations and
    log-probs, and the base model's top-1 tokens along them when `trained.model` is a LoRA model (its adapter
    disabled): call it before the merge."""
    model, tokenizer = trained.model, trained.tokenizer
    stop = eos_token_ids(model, tokenizer)
    rows = []
    for prompt in CHECK_PROMPTS:
        text = rendered(trained, prompt)
        ids = tokenizer(text, add_special_tokens=not trained.chat)["input_ids"]  # a chat template has its own
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=CONTINUATION, do_sample=False,
                                 eos_token_id=stop, pad_token_id=stop[0])[0].tolist()
            log_probs = model(torch.tensor([out])).logits[0].float().log_softmax(-1)
            base_top1 = None
            if trained.lora:
                with model.disable_adapter():
                    base_top1 = model(torch.tensor([out])).logits[0].argmax(-1)
        rows.append(Prompted(text, ids, out[len(ids):], log_probs, base_top1))
    return rows


def _tolerance(trained: Trained, quant: str, reference: torch.Tensor) -> float | None:
    """RUNTIME_FLOOR plus ROUNDING_FACTOR times what rounding the trained model's matrices to the file's type
    costs; None for a quantized type (judged by top-1 agreement instead)."""
    if quant not in FLOAT_TYPES:
        return None
    dtype = FLOAT_TYPES[quant]
    if dtype is None:
        return RUNTIME_FLOOR
    from grpo_cli.export.check import distributions

    matrices = [p for p in trained.model.parameters() if p.ndim == 2]
    kept = [p.detach().clone() for p in matrices]
    with torch.no_grad():
        for p in matrices:
            p.copy_(p.to(dtype).float())
        rounded = distributions(trained.model, trained.tokenizer)
        for p, original in zip(matrices, kept):
            p.copy_(original)
    return RUNTIME_FLOOR + ROUNDING_FACTOR * tv(rounded, reference)


def _open(path: Path, verifier: str, context: int):
    if verifier == "llama.cpp" or (verifier == "auto" and llama_cpp_version() is not None):
        return LlamaCpp(path, context)
    why = "chosen with --verifier" if verifier == "transformers" else "llama-cpp-python is not installed"
    return TransformersReader(path, context, why)


def _fail(path: Path, verifier: str, what: str) -> UserError:
    return UserError(f"the GGUF file {path.name} does not reproduce the trained model under {verifier}: {what}. "
                     "Nothing was written.")


def verify_gguf(trained: Trained, path: Path, quant: str, verifier: str, reference: torch.Tensor,
                base: torch.Tensor, rows: list[Prompted]) -> GgufCheck:
    """Check the GGUF file at `path` (written from `trained.model`, merged and float32) with `verifier`
    ("auto": llama.cpp where installed); `reference`, `base`: check.distributions of the trained and the base
    model; `rows`: `prompted(trained)`, taken before the merge. A failed check is a UserError."""
    tolerance = _tolerance(trained, quant, reference)
    raw = [trained.tokenizer(p)["input_ids"] for p in CHECK_PROMPTS]  # as check.distributions tokenizes
    context = max(len(row.ids) + len(row.continuation) for row in rows) + max(len(r) for r in raw) + 16
    runner = _open(path, verifier, context)
    try:
        return _compare(runner, trained, path, quant, rows, raw, reference, base, tolerance)
    finally:
        runner.close()


def _token_hint(trained: Trained) -> str:
    vocabulary = trained.kept.get("vocabulary")
    if vocabulary is None or vocabulary.model != "llama":
        return "its pre-tokenizer (tokenizer.ggml.pre) is not this tokenizer's"
    return (f"llama.cpp's SentencePiece tokenizer puts '\u2581' before every stretch of text or before none "
            f"(add_space_prefix {str(vocabulary.space_prefix).lower()} here), where training's tokenizer puts it only "
            "at the very start, or adds none to a stretch that starts with a space. llama.cpp would prompt this "
            "model unlike training whichever tool wrote the file; prompts that open with a special token (a chat "
            "template's <s> or <|im_start|>) and have no space right after a special token inside them tokenize "
            "alike")


def _compare(runner, trained: Trained, path: Path, quant: str, rows: list[Prompted], raw: list[list[int]],
             reference: torch.Tensor, base: torch.Tensor, tolerance: float | None) -> GgufCheck:
    name = runner.name
    bos = trained.tokenizer.bos_token_id
    probe = rendered(trained, TOKEN_PROBE)  # as a user's message is prompted
    probe_ids = trained.tokenizer(probe, add_special_tokens=not trained.chat)["input_ids"]
    for text, ids in [(row.text, row.ids) for row in rows] + [(probe, probe_ids)]:  # training's tokens, one for one
        got = runner.tokenize(text, add_bos=bos is not None and ids[:1] == [bos] and not text.startswith(
            trained.tokenizer.decode([bos])))
        if got != ids:
            first = next((i for i, (a, b) in enumerate(zip(got, ids)) if a != b), min(len(got), len(ids)))
            pieces = trained.tokenizer.convert_ids_to_tokens
            raise _fail(path, name, f"its tokenizer splits {text[:60]!r} differently from training's (token "
                                    f"{first}: {pieces(got[first:first + 3])} where training had "
                                    f"{pieces(ids[first:first + 3])}); "
                                    + _token_hint(trained))
    chat, builtin = _chat_checks(runner, trained, path, name)
    got = torch.cat([runner.log_probs(ids).exp() for ids in raw])  # [sum T, V]
    vs_adapter, vs_base = tv(got, reference), tv(got, base)
    agree = positions = 0
    equal = ties = 0
    stop = set(eos_token_ids(trained.model, trained.tokenizer))
    sided = [0, 0, 0]  # along the rows: (with the trained model, with the base, where those differ)
    for row in rows:
        theirs = runner.log_probs(row.ids + row.continuation).argmax(-1)  # [T + C]
        ours = row.log_probs.argmax(-1)
        agree += int((theirs == ours).sum())
        positions += len(theirs)
        if row.base_top1 is not None:
            differ = ours != row.base_top1
            sided = [sided[0] + int((theirs[differ] == ours[differ]).sum()),
                     sided[1] + int((theirs[differ] == row.base_top1[differ]).sum()), sided[2] + int(differ.sum())]
        continuation = runner.greedy(row.ids, CONTINUATION, stop)
        if continuation == row.continuation[: len(continuation)] and len(continuation) == len(row.continuation):
            equal += 1
        elif tolerance is not None and _near_tie(row, continuation, tolerance):
            equal, ties = equal + 1, ties + 1
    top1 = agree / positions
    if rows[0].base_top1 is None:  # a full fine-tune: the base is known on CHECK_PROMPTS only
        trained_top, base_top, file_top = reference.argmax(-1), base.argmax(-1), got.argmax(-1)
        differ = trained_top != base_top
        sided = [int((file_top[differ] == trained_top[differ]).sum()),
                 int((file_top[differ] == base_top[differ]).sum()), int(differ.sum())]
    sides = tuple(sided)
    check = GgufCheck(name, quant, vs_adapter, vs_base, tolerance, top1, positions, TOP1_BOUNDS.get(quant), equal,
                      ties, len(rows), sides, chat, builtin)
    _judge(check, path)
    return check


def _near_tie(row: Prompted, continuation: list[int], tolerance: float) -> bool:
    """Whether the file's greedy continuation leaves the trained model's only where the trained model itself
    gives the two tokens probabilities within 2 * tolerance: a total-variation perturbation of `tolerance`
    may reorder those, so which one greedy takes there is not the file's fault."""
    start = len(row.ids)
    for k, (ours, theirs) in enumerate(zip(row.continuation, continuation)):
        if ours != theirs:
            p = row.log_probs[start - 1 + k].exp()
            return bool(p[ours] - p[theirs] <= 2 * tolerance)
    return False


def _chat_checks(runner, trained: Trained, path: Path, name: str) -> tuple[str, str | None]:
    """(what the file's chat template gave, what llama.cpp's C formatter gave), refusing a template that
    does not render training's prompt."""
    messages = _messages(trained, CHECK_PROMPTS[0])
    if messages is None:
        return ("is absent, as training used plain-text prompts" if not runner.chat([{"role": "user",
                                                                                     "content": "x"}], {}) else
                "is present but unused: training used plain-text prompts"), None
    want = render_chat(trained.tokenizer, messages, trained.template_kwargs)
    got = runner.chat(messages, trained.template_kwargs)
    if got is None:
        raise _fail(path, name, "the file carries no chat template, and training prompted through one")
    if got != want:
        raise _fail(path, name, f"its chat template renders the training messages as {got[:120]!r}..., not as "
                                f"training did: {want[:120]!r}...")
    builtin = runner.builtin_chat(messages)
    if builtin is None:
        said = None if isinstance(runner, TransformersReader) else "does not recognise this template"
    elif builtin == want:
        said = "renders the same prompt"
    else:
        first = next((i for i, (a, b) in enumerate(zip(builtin, want)) if a != b), min(len(builtin), len(want)))
        said = (f"renders it differently from character {first} ({builtin[first:first + 40]!r} where training "
                f"had {want[first:first + 40]!r}): use the file's Jinja template (llama-server --jinja, "
                "llama-cpp-python's chat completions, Ollama's Modelfile)")
    return "renders the training messages exactly as training did", said


def _judge(check: GgufCheck, path: Path) -> None:
    if check.tolerance is not None:
        if check.vs_adapter > check.tolerance:
            raise _fail(path, check.verifier, f"its next-token distributions differ from the trained model's by "
                                              f"{check.vs_adapter:.2e} (total variation), more than the "
                                              f"{check.tolerance:.1e} allowed in {check.quant}")
        if check.vs_base <= check.tolerance:
            raise UserError(f"the GGUF file is indistinguishable from the base model (total variation "
                            f"{check.vs_base:.2e} <= {check.tolerance:.1e} in {check.quant}): this checkpoint "
                            "changed the model too little to verify. Nothing was written; export a later "
                            "checkpoint, or in f32 (--quant f32).")
        if check.greedy_equal < check.prompts:
            raise _fail(path, check.verifier, f"greedy continuations of {check.prompts - check.greedy_equal} of "
                                              f"{check.prompts} check prompts leave the trained model's where it "
                                              "does not nearly tie")
        return
    if check.top1 < check.top1_bound:
        raise _fail(path, check.verifier, f"its top-1 token is the trained model's at {check.top1:.1%} of "
                                          f"{check.positions} positions, below the {check.top1_bound:.0%} "
                                          f"expected of {check.quant}; a less lossy type (--quant q8_0) keeps more")
    with_trained, with_base, differ = check.sides
    if differ and with_trained <= with_base:
        raise _fail(path, check.verifier, f"where the trained and the base model's top-1 tokens differ ({differ} "
                                          f"positions), it sides with the base {with_base} times and with the "
                                          f"trained model only {with_trained}: quantizing to {check.quant} rounded "
                                          "away what training changed. Export a less lossy type (q8_0, f16)")
