"""Calling a transformers causal LM below its `generate`: what the log-prob passes (`logprobs`),
the sampler (`rollout`), the lean decoder (`decoder`) and the FSDP2 sharding (`distributed`) all need.

- `causal_lm`: the *ForCausalLM inside a PEFT wrapper;
- `position_ids`: positions that skip left padding;
- `uses_logit_postprocessing`: whether the forward changes the logits after the head;
- `cache_argument`, `new_cache`, `returned_cache`: the KV cache across transformers releases;
- `draw_tokens`, `next_token_scores`, `COMPACT_FRACTION`: what the two decode loops (`rollout`,
  `tool_rollout`) share.

A leaf: it imports nothing from grpo_cli, so every module that calls the model imports it at
the top without a cycle.
"""

from __future__ import annotations

import inspect

import torch

# Configs whose CausalLM forward changes the logits after the head (Gemma's soft-capping,
# Cohere's and Granite's scaling): for these the plain forward is used so nothing is skipped.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")
COMPACT_FRACTION = 0.25  # the samplers drop finished rows from the decode batch once this fraction of it has ended


def causal_lm(model):
    """The transformers *ForCausalLM inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` assigns them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [N, T]


def uses_logit_postprocessing(model) -> bool:
    return any(getattr(causal_lm(model).config, name, None) for name in _LOGIT_POSTPROCESSING)


def cache_argument(model) -> str:
    """transformers 5.2x calls the KV cache argument `cache`; earlier releases `past_key_values`."""
    return "cache" if "cache" in inspect.signature(causal_lm(model).forward).parameters else "past_key_values"


def new_cache(model):
    """An empty DynamicCache laid out for the model (sliding-window layers included where it knows them)."""
    from transformers import DynamicCache

    if "config" in inspect.signature(DynamicCache.__init__).parameters:
        return DynamicCache(config=causal_lm(model).config)
    return DynamicCache()


def returned_cache(output):
    return getattr(output, "cache", None) if getattr(output, "cache", None) is not None else output.past_key_values


def next_token_scores(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The same warpers, in the same order, as transformers' sampler applies. [n, V] -> [n, V]"""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    if temperature != 1.0:
        logits = TemperatureLogitsWarper(temperature)(None, logits)
    if top_p < 1.0:
        logits = TopPLogitsWarper(top_p)(None, logits)
    return logits


def draw_tokens(logits: torch.Tensor, rows: torch.Tensor, all_rows: int, pad_id: int, temperature: float,
                top_p: float, greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token [m] of each of `rows` [m] (row numbers among the step's `all_rows`, every rank's),
    from their logits [m, V], and the log-probability [m] the sampler drew it with: the log of the very
    probability the draw used, after the temperature and top-p (the sampler's side of the sampler/trainer
    mismatch; a gather and a log of m numbers, where a log-softmax would cost as much as the draw). Greedy
    decoding draws nothing at random and records 0. Sampling draws one multinomial over every row of the
    step, as transformers draws it: the random stream does not depend on which rows are still running (or
    on which rank). Rows not in `rows` (ended, paused, another rank's) get a dummy one-hot distribution."""
    if greedy:
        return (logits.argmax(-1) if len(rows) else rows), logits.new_zeros(len(rows))
    probs = torch.zeros(all_rows, logits.shape[-1], device=logits.device)
    probs[:, pad_id] = 1.0
    if len(rows):
        probs[rows] = next_token_scores(logits, temperature, top_p).softmax(-1)
    chosen = torch.multinomial(probs, num_samples=1).squeeze(1)[rows]  # [m]
    return chosen, probs[rows, chosen].log()  # a drawn token's probability is > 0: a finite log
