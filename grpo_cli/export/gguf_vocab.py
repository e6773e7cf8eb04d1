"""A transformers tokenizer as GGUF's tokenizer.ggml.* fields, in one of the two forms llama.cpp reads for the
families we cover:

- "gpt2", byte-level BPE (tokenizer.json's BPE model over byte-level text: SmolLM2, Qwen, Llama 3, Mistral's
  Tekken): the tokens, their types and the merges; how text is split before BPE is tokenizer.ggml.pre.
- "llama", SentencePiece BPE (a BPE model with byte fallback and '\u2581' for spaces: Llama 2, Mistral 7B
  v0.1-v0.3, TinyLlama). llama.cpp keeps no merges for these: it joins the adjacent pair of pieces whose
  joined text is a token with the highest score, and falls back to `<0xNN>` byte tokens. GGUF files made from
  a SentencePiece model carry that model's scores; tokenizer.json has only merge ranks, so a token's score here
  is minus the rank of the first merge that makes it. Both orders are SentencePiece's own, since transformers
  made those merges from the scores, one per pair of pieces that joins into a token. That is what makes the
  two algorithms split alike, and `read_vocabulary` checks it holds for the tokenizer at hand (a BPE trained
  with byte fallback by another tool need not have it).

Whether '\u2581' goes before the text (tokenizer.ggml.add_space_prefix) is read from the tokenizer. llama.cpp
either puts it before every stretch of text (the start, and after each special token) or never. The
normalizer's Prepend (tokenizer.json files written before transformers 5) does the same as "every stretch";
Metaspace's "always" too, except that it adds none to a stretch that already starts with a space, where
llama.cpp adds a second. Metaspace's "first" (what transformers 5 builds for Llama-style tokenizers) puts it
only at the start of the whole text, and not after a special token: it agrees with "never" on prompts that
start with a special token (a chat template's `<s>`, `<|im_start|>`) and with "every stretch" on those that
do not, so the export picks by training's own prompt. Where a difference is left (a special token inside a
plain-text prompt, a stretch that starts with a space) the verification's token check shows it and refuses
the file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from grpo_cli.errors import UserError

SPACE = "\u2581"  # SentencePiece's visible space
BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")
UNLIKE = ("a GGUF file of it would have llama.cpp split text unlike training, and so prompt the model unlike "
          "training. Export it as safetensors (--format safetensors) instead.")


@dataclass(frozen=True)
class Vocabulary:
    state: dict  # the tokenizer's tokenizer.json
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE)
    space_prefix: bool  # "llama": a '\u2581' goes before the text (tokenizer.ggml.add_space_prefix)
    scores: dict[int, float]  # "llama": id -> score (tokens no merge makes are left out: llama.cpp never asks)


def read_vocabulary(tokenizer, prompt: str | None = None) -> Vocabulary:
    """`tokenizer` as one of the two forms above; anything else is refused with the reason. `prompt`: one of
    training's prompts as rendered, which settles where Metaspace's "first" puts its space (see above)."""
    state = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "backend_tokenizer", None) \
        else {}
    model = state.get("model", {})
    if model.get("type") != "BPE":
        raise UserError("GGUF export covers BPE tokenizers (tokenizer.json with a BPE model: byte-level as "
                        "SmolLM2's, Qwen's and Llama 3's, or SentencePiece-style as Llama 2's and Mistral 7B's); "
                        "this tokenizer is not one.")
    parts = [state.get("normalizer"), state.get("pre_tokenizer"), state.get("decoder")]
    if not (model.get("byte_fallback") or SPACE in json.dumps(parts, ensure_ascii=False)):
        return Vocabulary(state, "gpt2", False, {})
    starts_special = prompt is not None and any(prompt.startswith(token["content"])
                                                for token in state.get("added_tokens", []) if token["special"])
    return Vocabulary(state, "llama", _space_prefix(state, starts_special), _merge_scores(state))


def _steps(part: dict | None) -> list[dict]:
    """A normalizer's or pre-tokenizer's steps, a Sequence flattened."""
    if not part:
        return []
    inner = part.get("normalizers") or part.get("pretokenizers")
    return [step for item in inner for step in _steps(item)] if inner is not None else [part]


def _space_prefix(state: dict, starts_special: bool) -> bool:
    """Whether '\u2581' goes before the text, for a SentencePiece-style tokenizer whose prompts start with a
    special token or not; refused where the normalizer or pre-tokenizer does something llama.cpp's
    SentencePiece tokenizer does not (which is: spaces become '\u2581', and nothing else happens before the
    merges)."""
    prefix = False
    for step in _steps(state.get("normalizer")):
        kind = step.get("type")
        if kind == "Prepend" and step.get("prepend") == SPACE:
            prefix = True
        elif not (kind == "Replace" and step.get("pattern", {}).get("String") == " " and step.get("content") == SPACE):
            raise UserError(f"this SentencePiece-style tokenizer's normalizer {_described(step)}, which llama.cpp's "
                            f"tokenizer does not do: {UNLIKE}")
    for step in _steps(state.get("pre_tokenizer")):
        if step.get("type") != "Metaspace" or step.get("replacement", SPACE) != SPACE:
            raise UserError(f"this SentencePiece-style tokenizer splits text with a {step.get('type')} "
                            f"pre-tokenizer, which llama.cpp's SentencePiece tokenizer has no counterpart for: {UNLIKE}")
        inner = next((token for token in state["model"]["vocab"] if SPACE in token[1:]), None)
        if step.get("split", False) and inner is not None:  # no token spans a space: splitting changes nothing
            raise UserError(f"this SentencePiece-style tokenizer splits text into words at each space (Metaspace "
                            f"with split: true) and has tokens that span one ({inner!r}), which llama.cpp's "
                            f"SentencePiece tokenizer would join: {UNLIKE}")
        scheme = step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never")
        prefix = prefix or scheme == "always" or (scheme == "first" and not starts_special)
    return prefix


def _described(step: dict) -> str:
    kind = step.get("type")
    if kind == "Precompiled":  # what transformers builds when it reads a SentencePiece vocabulary from a GGUF file
        return ("maps characters as the sentencepiece library does (a precompiled Unicode normalization; "
                "transformers builds it when it reads a SentencePiece vocabulary from a GGUF file)")
    if kind == "Replace":
        pattern = step.get("pattern", {})
        return f"replaces {pattern.get('String', pattern.get('Regex'))!r} with {step.get('content')!r}"
    return f"has a {kind} step"


def _merge_scores(state: dict) -> dict[int, float]:
    """id -> minus the rank of the first merge that makes the token; refused where llama.cpp, which joins any
    two adjacent pieces whose text is a token, could reach a token transformers' BPE cannot."""
    vocab = state["model"]["vocab"]
    scores: dict[int, float] = {}
    pairs = set()
    for rank, merge in enumerate(state["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        pairs.add((left, right))
        scores.setdefault(vocab[left + right], -float(rank))
    added = {token["content"] for token in state.get("added_tokens", [])}
    for token in vocab:
        if len(token) < 2 or token in added or BYTE_TOKEN.fullmatch(token):
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab and (left, right) not in pairs:
                raise UserError(f"this tokenizer's merges are not SentencePiece's: {left!r} + {right!r} make the "
                                f"token {token!r} but are not a merge, and llama.cpp's SentencePiece tokenizer "
                                f"would join them: {UNLIKE}")
    return scores


def write_vocabulary(writer, vocabulary: Vocabulary, tokenizer, vocab_size: int, pre: str) -> None:
    """tokenizer.ggml.*: the tokens (padded to the model's vocabulary), their types, merges ("gpt2") or scores
    ("llama"), the special tokens, and the chat template. `pre`: tokenizer.ggml.pre, for "gpt2"."""
    import gguf

    vocab = tokenizer.get_vocab()
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    spm = vocabulary.model == "llama"
    unk = vocabulary.state["model"].get("unk_token")
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        tokens.append(token if token is not None else f"[PAD{index}]")
        if token is None:
            types.append(gguf.TokenType.UNUSED)
        elif spm and token == unk:  # llama.cpp's converter types it so, though transformers adds it as special
            types.append(gguf.TokenType.UNKNOWN)
        elif index in added:
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        elif spm and BYTE_TOKEN.fullmatch(token):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model(vocabulary.model)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if spm:
        writer.add_tokenizer_pre("default")
        writer.add_token_scores([vocabulary.scores.get(index, 0.0) for index in range(vocab_size)])
        writer.add_add_space_prefix(vocabulary.space_prefix)
        if unk is not None and unk in vocab:
            writer.add_unk_token_id(vocab[unk])
    else:
        writer.add_tokenizer_pre(pre)
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m)
                                 for m in vocabulary.state["model"].get("merges", [])])
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
