"""Sampler against trainer: how far apart the log-probs the rollout drew its tokens with and the training
forward's are, and the importance weights that correct the update for it. Pure functions of log-probs.

The rollout samples through its own numerical path (the lean decoder with LoRA folded, a KV cache, CUDA
graphs, 16-bit weights), the update recomputes every log-prob through the training forward and takes that
as the policy that sampled. Where the two disagree the tokens came from a slightly different policy than
the one the gradient assumes, and the estimate is biased. Per completion token t:

    ratio_t = exp(trainer_t - sampler_t)  = pi_train(y_t) / pi_sampler(y_t)
    k3_t    = ratio_t - 1 - log ratio_t   >= 0, an unbiased estimate of KL(sampler || trainer) from the
                                            sampler's own tokens (Schulman's k3)

`trainer_t` is the training forward's log-prob under the weights that sampled: the old-policy pass with
updates_per_rollout > 1, else the update's own forward (detached). The sampler's includes temperature and
top-p: with top_p < 1 the nucleus is part of the mismatch (the sampler never draws outside it).

The correction (grpo.sampler_correction) multiplies each token's clipped surrogate by a detached weight:

- none: no weight (1).
- tis: min(ratio, high): truncated importance sampling (Yao et al., 2025), the bias corrected where the
  sampler under-rates a token, the variance capped where it under-rates it a lot.
- mask: ratio inside [low, high], 0 outside: masked importance sampling; tokens the two paths disagree
  on too much are dropped (IcePop's mask).

At `level` "sequence" a completion has one ratio, the geometric mean of its tokens' (exp of the mean
log-ratio, so long and short completions share one scale), used for every token of it; "token" weighs
each token by its own. Dropped tokens keep their place in the loss's denominators (the step's tokens or
completions), so a correction never rescales the other tokens' terms: the loss stays a sum over
completions, additive over micro-batches and processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS = ("none", "tis", "mask")
LEVELS = ("token", "sequence")
# The ratio band outside which a token counts in `sampler_ratio_outside`, whatever the correction.
WATCHED_BAND = (0.5, 2.0)
# mismatch_sums' columns, in order: a fixed-size row that adds up over micro-batches and processes
FIELDS = ("tokens", "k3_sum", "k3_max", "ratio_sum", "ratio_min", "ratio_max", "outside", "corrected")


@dataclass(frozen=True, kw_only=True)
class Correction:
    method: str = "none"  # one of METHODS
    level: str = "token"  # one of LEVELS
    low: float = 0.5  # mask: ratios below are dropped
    high: float = 2.0  # tis: the cap; mask: ratios above are dropped

    @property
    def active(self) -> bool:
        return self.method != "none"


def log_ratios(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
               level: str = "token") -> torch.Tensor:
    """log(pi_train / pi_sampler) per token, in float64 (float32 would round a 1e-6 gap's k3 to 0), detached;
    at level "sequence" each row's token mean, repeated over its tokens. [n, T] x3 -> [n, T]"""
    delta = trainer_logp.detach().double() - sampler_logp.double()  # [n, T]
    if level == "sequence":
        mask = mask.double()
        per_row = (delta * mask).sum(1) / mask.sum(1).clamp(min=1)  # [n]
        delta = per_row[:, None].expand_as(delta)
    return delta


def weights(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
            correction: Correction) -> torch.Tensor:
    """The correction's weight on each token's clipped surrogate, detached, 0 off the mask. [n, T] x3 -> [n, T]
    in trainer_logp's dtype."""
    ratio = log_ratios(trainer_logp, sampler_logp, mask, correction.level).exp()  # [n, T]
    return (_weigh(ratio, correction) * mask).to(trainer_logp.dtype)


def _weigh(ratio: torch.Tensor, correction: Correction) -> torch.Tensor:
    """The correction's weight for each ratio (at its level). [...] -> [...]"""
    if correction.method == "tis":
        return ratio.clamp(max=correction.high)
    if correction.method == "mask":
        return ratio * ((ratio >= correction.low) & (ratio <= correction.high))
    if correction.method == "none":
        return torch.ones_like(ratio)
    raise ValueError(f"unknown sampler correction {correction.method!r}: one of {', '.join(METHODS)}")


def mismatch_sums(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                  correction: Correction | None = None) -> torch.Tensor:
    """The mismatch over the masked tokens as one row of FIELDS (float64): sums that add, extremes that
    combine by min and max (`combine`). `corrected`: tokens whose weight the correction set apart from the
    plain ratio (capped by tis, dropped by mask). Stays on the log-probs' device: no host sync per
    micro-batch. [n, T] x3 -> [len(FIELDS)]"""
    on = mask.bool()
    delta = log_ratios(trainer_logp, sampler_logp, mask)[on]  # [K]
    if not len(delta):
        return torch.tensor([0.0, 0.0, float("-inf"), 0.0, float("inf"), float("-inf"), 0.0, 0.0], dtype=torch.float64,
                            device=delta.device)
    ratio = delta.exp()
    k3 = torch.expm1(delta) - delta  # ratio - 1 - log ratio, without cancelling to 0 near ratio 1
    low, high = WATCHED_BAND
    corrected = delta.new_zeros(())
    if correction is not None and correction.active:
        plain = log_ratios(trainer_logp, sampler_logp, mask, correction.level)[on].exp()  # [K] at its level
        corrected = (_weigh(plain, correction) != plain).sum().double()
    return torch.stack([delta.new_tensor(float(len(delta))), k3.sum(), k3.max(), ratio.sum(), ratio.min(),
                        ratio.max(), ((ratio < low) | (ratio > high)).sum().double(), corrected])


def combine(rows: torch.Tensor) -> torch.Tensor:
    """Several mismatch_sums rows (micro-batches, processes) as one. [K, len(FIELDS)] -> [len(FIELDS)]"""
    if not len(rows):
        return mismatch_sums(torch.zeros(0, 0), torch.zeros(0, 0), torch.zeros(0, 0))
    column = {name: rows[:, i] for i, name in enumerate(FIELDS)}
    return torch.stack([
        column["tokens"].sum(), column["k3_sum"].sum(), column["k3_max"].max(), column["ratio_sum"].sum(),
        column["ratio_min"].min(), column["ratio_max"].max(), column["outside"].sum(), column["corrected"].sum()])


def figures(total: torch.Tensor, correction: Correction) -> dict[str, float]:
    """The metrics.jsonl columns from a combined row; none when no token was measured."""
    value = dict(zip(FIELDS, total.tolist()))
    tokens = value["tokens"]
    if not tokens:
        return {}
    row = {"sampler_kl": value["k3_sum"] / tokens, "sampler_kl_max": value["k3_max"],
           "sampler_ratio_mean": value["ratio_sum"] / tokens, "sampler_ratio_min": value["ratio_min"],
           "sampler_ratio_max": value["ratio_max"], "sampler_ratio_outside": value["outside"] / tokens}
    if correction.active:
        row["sampler_corrected_frac"] = value["corrected"] / tokens
    return row
