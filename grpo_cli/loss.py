"""The GRPO objective (DeepSeekMath, 2024) as a pure function of log-probabilities.

J = (1/G) sum_i (1/|o_i|) sum_t [ min(rho_it A_i, clip(rho_it, 1-eps, 1+eps) A_i) - beta KL_it ]
with rho_it = exp(logp - old_logp) and the k3 estimator KL_it = exp(ref - logp) - (ref - logp) - 1.
The loss is -J. With one update per rollout rho is exactly 1, clipping never binds
and the loss sits near 0 by construction: watch the reward, not the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossTerms:
    per_completion: torch.Tensor  # [N] -J_i, each completion's token-mean loss (has grad)
    kl: torch.Tensor | None  # [N] token-mean k3 KL per completion (detached), None without a reference
    clipped_tokens: torch.Tensor  # [] tokens where the clipped term was the smaller one
    tokens: torch.Tensor  # [] completion tokens counted


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Unbiased, always >= 0 estimate of KL(pi || ref) per token. [N, T] -> [N, T]"""
    delta = ref_logp - logp  # [N, T]
    return torch.exp(delta) - delta - 1


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    ref_logp: torch.Tensor | None = None,
    kl_beta: float = 0.0,
) -> LossTerms:
    """Clipped surrogate plus KL penalty, averaged over each completion's own tokens.

    logp: [N, T] current policy (with grad); old_logp, ref_logp: [N, T] (no grad);
    advantages: [N]; mask: [N, T] 1 on completion tokens (through EOS), 0 on padding.
    Sum `per_completion` and divide by the step's completion count to get the batch
    mean, so micro-batches add up to the same gradient as one big batch.
    """
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)  # [N, T]
    adv = advantages.to(logp.dtype).unsqueeze(1)  # [N, 1]
    unclipped = ratio * adv  # [N, T]
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv  # [N, T]
    objective = torch.minimum(unclipped, clipped)  # [N, T]
    kl = None
    if ref_logp is not None:
        kl_tokens = k3_kl(logp, ref_logp)  # [N, T]
        objective = objective - kl_beta * kl_tokens
        kl = _token_mean(kl_tokens.detach(), mask)  # [N]
    return LossTerms(
        per_completion=-_token_mean(objective, mask),
        kl=kl,
        clipped_tokens=((clipped < unclipped).to(mask.dtype) * mask).sum().detach(),
        tokens=mask.sum().detach(),
    )


def _token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each row's unmasked positions. [N, T] -> [N]"""
    return (values * mask).sum(1) / mask.sum(1).clamp(min=1)
