"""`builtin:tiny-math`: a tiny Llama-architecture model the tool builds for itself.

No weights are downloaded. On first use the model is created from a small config,
given a character-level tokenizer, warm-started with a short supervised pass on
generated arithmetic (`builtin_task`), and saved as an ordinary transformers
directory in the cache. Every later load goes through `from_pretrained` on that
directory, exactly like a real model.

The warm start mixes worked solutions with bare answers (see VARIANTS), so the
model starts out answering most questions without working, and wrong more often
than not; the reward rules then have something real to teach.

`builtin:tiny-math-tools` is the same model warm-started on a different mix: some
of its worked answers compute with the code tool (a short python block, its output
block, the answer; tools/calls.py's format), the output blocks being context the
warm start does not train on, as GRPO does not. Its quickstart
(recipes/quickstart-tools.yaml) lets GRPO find out that computed answers are right
more often.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import random
import time
from pathlib import Path

import torch

from grpo_cli import atomic
from grpo_cli.data import builtin_task
from grpo_cli.tools import calls as tool_calls

NAME = "tiny-math"
TOOLS_NAME = "tiny-math-tools"
# name -> (version, warm-start mix): bump a version when anything that builds that model changes, so stale
# caches are rebuilt. The rest of each mix is bare answers.
VARIANTS = {
    NAME: {"version": 1, "worked": 0.5, "tool": 0.0, "build": "about two minutes"},
    TOOLS_NAME: {"version": 1, "worked": 0.4, "tool": 0.2, "build": "about three minutes"},  # longer texts
}
VERSION = VARIANTS[NAME]["version"]
EOS = "<|endoftext|>"
PAD = "<|pad|>"
UNK = "<|unk|>"
CHAT_MARKERS = ["<|im_start|>", "<|im_end|>"]
CHARS = (
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    " \n+-*/=^()?.,:;#!'\"{}[]\\$_<>|%&~`@"
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORKED_FRACTION = VARIANTS[NAME]["worked"]
WARM_START = {"steps": 500, "batch": 64, "lr": 3e-3, "seed": 0}
PROGRESS_EVERY_S = 10.0  # the build takes minutes: a line per stage, and one this often during the warm start


def cache_root() -> Path:
    """GRPO_CACHE, else $XDG_CACHE_HOME/grpo, else ~/.cache/grpo."""
    if os.environ.get("GRPO_CACHE"):
        return Path(os.environ["GRPO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "grpo"


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, EOS, UNK, *CHAT_MARKERS]
    vocab = {tok: i for i, tok in enumerate(specials + list(CHARS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # One token per character; [\s\S] matches the newline too, where '.' would not.
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=CHAT_MARKERS,
        padding_side="left",
        model_max_length=256,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_config(tokenizer):
    # Llama rather than Qwen2: transformers 5 loads any qwen2 checkpoint's tokenizer as
    # Qwen2Tokenizer, which would replace this character-level one.
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def warm_start_texts(seed: int, n: int, worked: float = WORKED_FRACTION, tool: float = 0.0) -> list[tuple[str, str]]:
    """(prompt, completion) pairs, never a test question: a `tool` share computed with the code tool,
    a `worked` share worked, the rest bare."""
    test_questions = {p.question for p in builtin_task.test_split()}
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < n:
        problem = builtin_task.sample(rng)
        if problem.question in test_questions:
            continue
        draw = rng.random()  # one draw per problem, so tool = 0 gives the very texts of the plain mix
        completion = problem.tool if draw < tool else problem.worked if draw < tool + worked else problem.bare
        pairs.append((problem.question, completion + EOS))
    return pairs


def _output_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the output blocks as the rollout appends them (newline before, fence after)."""
    spans, at = [], 0
    while (start := text.find("\n" + tool_calls.OUTPUT_OPEN, at)) >= 0:
        end = text.find(tool_calls.OUTPUT_CLOSE, start + len(tool_calls.OUTPUT_OPEN) + 1)
        end = len(text) if end < 0 else end + len(tool_calls.OUTPUT_CLOSE)
        spans.append((start, end))
        at = end
    return spans


def supervised_batch(tokenizer, pairs: list[tuple[str, str]], masks_output: bool = False):
    """(encoding, labels [B, T]) of (prompt, completion) pairs, right-padded: the labels are the tokens of the
    completions, -100 on the prompts, the padding and, with `masks_output`, the tool's output blocks (context,
    as in GRPO, not something to learn to write)."""
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    texts = [p + c for p, c in pairs]
    enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt",
                    return_offsets_mapping=masks_output)
    offsets = enc.pop("offset_mapping", None)  # [B, T, 2] character span of each token
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    for row, prompt in enumerate(prompts):
        labels[row, : len(prompt)] = -100
        for start, end in _output_spans(texts[row]) if offsets is not None else ():
            labels[row, (offsets[row, :, 0] >= start) & (offsets[row, :, 1] <= end)
                   & (enc["attention_mask"][row] == 1)] = -100
    return enc, labels


def warm_start(model, tokenizer, steps: int, batch: int, lr: float, seed: int, on_step=None, worked: float = WORKED_FRACTION,
               tool: float = 0.0) -> list[float]:
    """Supervised pass on completions only (prompt tokens and tool output masked); returns the loss
    curve. `on_step(step, steps, loss)` is called after each step, step counting from 1."""
    pairs = warm_start_texts(seed, steps * batch, worked, tool)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    losses = []
    tokenizer.padding_side = "right"
    for step in range(steps):
        enc, labels = supervised_batch(tokenizer, pairs[step * batch : (step + 1) * batch], masks_output=bool(tool))
        loss = model(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, steps, losses[-1])
    tokenizer.padding_side = "left"
    model.eval()
    return losses


class BuildReport:
    """What a build that takes minutes says while it runs, through `say` (a function of one line): a line
    per stage, and during the warm start a line at most every PROGRESS_EVERY_S seconds with the step,
    the time so far, an estimate of the time left and the loss; the same on a terminal and in a log."""

    STAGES = 3

    def __init__(self, say=None, name: str = NAME, clock=time.monotonic):
        self.say = say or (lambda text: None)
        self.name = name
        self.clock = clock
        self.started = self.last = clock()
        self.first_step = None  # (step, time) of the first step seen: the time left is estimated from there on

    def _elapsed(self) -> float:
        return self.clock() - self.started

    def stage(self, number: int, text: str) -> None:
        self.say(f"  [{number}/{self.STAGES}] {text} ({self._elapsed():.0f}s elapsed)")
        self.last = self.clock()

    def step(self, step: int, steps: int, loss: float) -> None:
        now = self.clock()
        if self.first_step is None:
            self.first_step = (step, now)  # the time before it went into generating the problems
        if step != steps and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        took = self._elapsed()
        since_step, since = self.first_step
        per_step = (now - since) / (step - since_step) if step > since_step else None
        left = f", about {per_step * (steps - step):.0f}s left" if per_step is not None and step < steps else ""
        self.say(f"      warm start step {step}/{steps} ({step / steps:.0%}), {took:.0f}s elapsed{left}, loss {loss:.3f}")

    def done(self) -> None:
        self.say(f"  built builtin:{self.name} in {self._elapsed():.0f}s; later runs load it from the cache")


def build(target: Path, progress=None, name: str = NAME) -> None:
    """Create, warm-start and save the model `name` (one of VARIANTS) into `target` (a fresh directory),
    saying how far it got through `progress` (a function of one line; see BuildReport)."""
    from transformers import GenerationConfig, LlamaForCausalLM

    mix = VARIANTS[name]
    report = BuildReport(progress, name)
    torch.manual_seed(WARM_START["seed"])
    tokenizer = build_tokenizer()
    model = LlamaForCausalLM(build_config(tokenizer))
    started = time.perf_counter()
    report.stage(1, f"warm start: {WARM_START['steps']} supervised steps of {WARM_START['batch']} generated "
                    "arithmetic problems")
    losses = warm_start(model, tokenizer, **WARM_START, on_step=report.step, worked=mix["worked"], tool=mix["tool"])
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, max_new_tokens=48
    )
    report.stage(2, "saving the model and its tokenizer")
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    report.stage(3, "checking that the saved tokenizer loads and tokenizes as built")
    check_roundtrip(target, tokenizer)
    info = {
        "name": f"builtin:{name}",
        "version": mix["version"],
        "warm_start": WARM_START,
        "worked_fraction": mix["worked"],
        "tool_fraction": mix["tool"],
        "final_loss": sum(losses[-20:]) / 20,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (target / "builtin.json").write_text(json.dumps(info, indent=2))
    report.done()


def check_roundtrip(path: Path, tokenizer) -> None:
    """The saved tokenizer must load through AutoTokenizer and tokenize exactly as built."""
    from transformers import AutoTokenizer

    probe = "What is 23 + 48? 3+8=11, 2+4+1=7. #### 71\n(x-2)(x+3)=0"
    loaded = AutoTokenizer.from_pretrained(path)
    if loaded(probe)["input_ids"] != tokenizer(probe)["input_ids"] or loaded.decode(loaded(probe)["input_ids"]) != probe:
        raise RuntimeError(
            f"transformers loads the builtin tokenizer in {path} as {type(loaded).__name__}, which tokenizes "
            "differently; this transformers version is not supported by builtin:tiny-math."
        )


def ensure(name: str = NAME, progress=None) -> Path:
    """Path of the cached builtin model, building it first if needed.

    A file lock serialises concurrent builders; the build goes to a temporary
    directory renamed into place only when complete, so a crash never leaves a
    half-written model that later runs would load.
    """
    if name not in VARIANTS:
        raise KeyError(name)
    root = cache_root() / "builtin"
    version = VARIANTS[name]["version"]
    target = root / f"{name}-v{version}"
    if (target / "builtin.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "builtin.json").exists():
            return target
        if progress:
            progress(f"building builtin:{name} (first use only, {VARIANTS[name]['build']} on 2 CPU cores) in {target}")
        with atomic.write_directory(target, root / f".{name}-v{version}.partial-{os.getpid()}") as partial:
            build(partial, progress, name)
    return target
