"""The GRPO family's objectives as pure functions of log-probabilities, chosen by name.

Every variant maximizes a clipped surrogate of the importance ratio times the
advantage, minus beta times the k3 KL to the reference, plus an optional entropy
bonus; they differ in where the ratio lives and how tokens are averaged:

- grpo (DeepSeekMath, Shao et al. 2024): token mean per completion, then mean over completions.
- dapo (DAPO, Yu et al. 2025): token mean over the whole step, so long completions weigh by
  their length; use with clip_eps_high ("clip-higher", e.g. 0.2 / 0.28).
- dr_grpo (Dr. GRPO, Liu et al. 2025): token sum divided by a constant budget
  (completions x max_new_tokens), removing GRPO's length bias; pairs with unscaled advantages.
- gspo (GSPO, Zheng et al. 2025): one ratio per sequence, exp(mean_t(logp - old_logp)), clipped per
  sequence. The paper's clip range is far narrower (3e-4 / 4e-4) than the token-level 0.2.

Each function returns every completion's share of the step loss, so the shares of all
micro-batches add up to the step loss whatever the split. With one update per rollout
the ratio is exactly 1, clipping never binds, and the loss sits near 0 by
construction: watch the reward, not the loss.

`LOSSES` is the one list of them: `@register_loss` on a function adds it, and the recipe's
`grpo.loss` accepts its name from then on (docs/extending.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True, kw_only=True)
class LossSettings:
    clip_low: float  # ratio floor 1 - clip_low
    clip_high: float  # ratio ceiling 1 + clip_high
    kl_beta: float = 0.0
    entropy_bonus: float = 0.0
    step_completions: int = 1  # completions in the whole step (all micro-batches)
    step_tokens: int = 1  # completion tokens in the whole step (dapo's normalizer)
    max_new_tokens: int = 1  # dr_grpo's constant length budget


@dataclass(frozen=True)
class LossTerms:
    per_completion: torch.Tensor  # [n] each completion's share of the step loss (has grad); sum it to backward
    kl: torch.Tensor | None  # [n] token-mean k3 KL per completion (detached), None without a reference
    clipped_tokens: torch.Tensor  # [] tokens where the clipped term was the smaller one
    tokens: torch.Tensor  # [] completion tokens counted


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Unbiased, always >= 0 estimate of KL(pi || ref) per token. [n, T] -> [n, T]"""
    delta = ref_logp - logp  # [n, T]
    return torch.exp(delta) - delta - 1


def token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each row's unmasked positions. [n, T] -> [n]"""
    return (values * mask).sum(1) / mask.sum(1).clamp(min=1)


def _penalties(logp, mask, settings, ref_logp, entropy):
    """Per-token KL penalty and entropy bonus to add to the objective, and the KL metric. [n, T]"""
    extra = torch.zeros_like(logp)
    kl = None
    if ref_logp is not None:
        kl_tokens = k3_kl(logp, ref_logp)  # [n, T]
        extra = extra - settings.kl_beta * kl_tokens
        kl = token_mean(kl_tokens.detach(), mask)  # [n]
    if entropy is not None and settings.entropy_bonus:
        extra = extra + settings.entropy_bonus * entropy
    return extra, kl


def _clipped_surrogate(ratio, advantages, settings):
    """min(ratio A, clip(ratio) A) and where the clip binds. ratio [n, T] or [n]; advantages broadcast."""
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - settings.clip_low, 1.0 + settings.clip_high) * advantages
    return torch.minimum(unclipped, clipped), clipped < unclipped


def _token_objective(logp, old_logp, advantages, mask, settings, ref_logp, entropy, weights):
    """Per-token objective [n, T], the tokens where clipping binds [n, T], and the KL metric [n]."""
    ratio = torch.exp(logp - old_logp)  # [n, T]
    surrogate, binds = _clipped_surrogate(ratio, advantages.to(logp.dtype).unsqueeze(1), settings)  # [n, T]
    if weights is not None:  # the sampler correction's, on the surrogate only (the KL and entropy are the trainer's)
        surrogate = surrogate * weights
    extra, kl = _penalties(logp, mask, settings, ref_logp, entropy)
    return surrogate + extra, binds, kl


def _terms(per_completion, kl, binds, mask) -> LossTerms:
    return LossTerms(per_completion=per_completion, kl=kl, clipped_tokens=(binds.to(mask.dtype) * mask).sum().detach(),
                     tokens=mask.sum().detach())


LossFn = Callable[..., LossTerms]  # (logp, old_logp, advantages, mask, settings, ref_logp=None, entropy=None,
#                                     weights=None)
LOSSES: dict[str, LossFn] = {}  # name -> loss: what grpo.loss may name


def register_loss(function: LossFn) -> LossFn:
    """Decorator: make `function` a loss that recipes choose by its name (grpo.loss: <name>). The first
    line of its docstring is its summary in the recipe schema."""
    if function.__name__ in LOSSES:
        raise ValueError(f"a loss named {function.__name__!r} is registered already")
    LOSSES[function.__name__] = function
    return function


@register_loss
def grpo(logp, old_logp, advantages, mask, settings: LossSettings, ref_logp=None, entropy=None,
         weights=None) -> LossTerms:
    """Token mean per completion, then batch mean (DeepSeekMath).

    -(1/N) sum_i (1/|o_i|) sum_t objective_it.
    logp: [n, T] with grad; old_logp, ref_logp, entropy: [n, T]; advantages: [n]; mask: [n, T];
    weights: [n, T] detached, the sampler correction's on each token's clipped term (update/sampler_correction.py).
    """
    mask = mask.to(logp.dtype)
    objective, binds, kl = _token_objective(logp, old_logp, advantages, mask, settings, ref_logp, entropy,
                                            weights)
    return _terms(-token_mean(objective, mask) / settings.step_completions, kl, binds, mask)


@register_loss
def dapo(logp, old_logp, advantages, mask, settings: LossSettings, ref_logp=None, entropy=None,
         weights=None) -> LossTerms:
    """Token mean over the batch (DAPO).

    -(1/T) sum_i sum_t objective_it, T = completion tokens in the whole step. Shapes as grpo."""
    mask = mask.to(logp.dtype)
    objective, binds, kl = _token_objective(logp, old_logp, advantages, mask, settings, ref_logp, entropy,
                                            weights)
    return _terms(-(objective * mask).sum(1) / settings.step_tokens, kl, binds, mask)


@register_loss
def dr_grpo(logp, old_logp, advantages, mask, settings: LossSettings, ref_logp=None, entropy=None,
            weights=None) -> LossTerms:
    """Token sum over a constant budget (Dr. GRPO).

    -(1/(N L)) sum_i sum_t objective_it, L = max_new_tokens, a constant. Shapes as grpo."""
    mask = mask.to(logp.dtype)
    objective, binds, kl = _token_objective(logp, old_logp, advantages, mask, settings, ref_logp, entropy,
                                            weights)
    budget = settings.step_completions * settings.max_new_tokens
    return _terms(-(objective * mask).sum(1) / budget, kl, binds, mask)


@register_loss
def gspo(logp, old_logp, advantages, mask, settings: LossSettings, ref_logp=None, entropy=None,
         weights=None) -> LossTerms:
    """Sequence-level ratio (GSPO).

    -(1/N) sum_i min(s_i A_i, clip(s_i) A_i), s_i = exp(mean_t(logp - old_logp)) per sequence;
    the KL and entropy terms enter as token means per completion; the sampler correction's `weights`
    as their token mean per completion (at its sequence level, the completion's one weight). Shapes as grpo."""
    mask = mask.to(logp.dtype)
    ratio = torch.exp(token_mean(logp - old_logp, mask))  # [n]
    surrogate, binds = _clipped_surrogate(ratio, advantages.to(logp.dtype), settings)  # [n]
    if weights is not None:
        surrogate = surrogate * token_mean(weights, mask)
    extra, kl = _penalties(logp, mask, settings, ref_logp, entropy)
    objective = surrogate + token_mean(extra, mask)  # [n]
    return _terms(-objective / settings.step_completions, kl, binds.unsqueeze(1).expand_as(mask), mask)


# The losses whose every completion's term is its advantage times a function of its ratios, plus the KL and the
# entropy bonus: with neither of those, a completion whose advantage is 0 adds nothing to the gradient, so the
# update need not run it (train.rows_with_gradient). A loss registered elsewhere is not assumed to be one.
SURROGATE_LOSSES = ("grpo", "dapo", "dr_grpo", "gspo")
