"""Group-relative advantages: each completion's reward measured against its group."""

from __future__ import annotations

import torch

STD_EPS = 1e-4  # keeps a group with nearly equal rewards from blowing up its advantages
ZERO_STD = 1e-6  # a group whose rewards spread less than this carries no signal


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group",
                     eps: float = STD_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """A_i = (r_i - mean(group)) / (std + eps), the same for every token of completion i.

    rewards: [B*G], consecutive runs of `group_size` belong to one prompt.
    scale: "group" divides by the group's std (DeepSeekMath), "batch" by the std of all
    rewards in the step, "none" not at all (Dr. GRPO). The std is the population std
    (divide by the count), so with "group" a group's advantages have mean 0 and, up to
    eps, variance 1. A group whose rewards are all equal gets advantage 0.
    Returns (advantages [B*G], zero_std [B]).
    """
    grouped = rewards.view(-1, group_size).double()  # [B, G]
    mean = grouped.mean(dim=1, keepdim=True)  # [B, 1]
    std = grouped.std(dim=1, unbiased=False, keepdim=True)  # [B, 1]
    zero_std = std.squeeze(1) < ZERO_STD  # [B]
    centered = grouped - mean  # [B, G]
    if scale == "group":
        advantages = centered / (std + eps)
    elif scale == "batch":
        advantages = centered / (grouped.std(unbiased=False) + eps)
    elif scale == "none":
        advantages = centered
    else:
        raise ValueError(f"unknown reward scaling {scale!r}")
    advantages[zero_std] = 0.0
    return advantages.view(-1).to(rewards.dtype), zero_std


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment. lengths [N] -> [N], in [-penalty, 0]:
    0 up to max_new_tokens - buffer tokens, then falling linearly to -penalty at max_new_tokens."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float64)
    over = (lengths.double() - (max_new_tokens - buffer)).clamp(min=0)  # [N] tokens into the buffer
    return -penalty * (over / buffer).clamp(max=1.0)


def step_rewards(values, weights: torch.Tensor, lengths: torch.Tensor, max_new_tokens: int, overlong_buffer: int,
                 overlong_penalty_size: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's rewards as every later figure sees them: the weighted rules plus DAPO's overlong penalty.
    The one place rewards are formed, so the groups dynamic sampling keeps and the groups the advantages call
    flat are the same groups. values [N, R'] (R' >= R: columns past the weighted rules, such as correctness
    scored for the accuracy figure alone, are left out), weights [R], lengths [N] -> (rewards [N], overlong [N])"""
    overlong = overlong_penalty(lengths, max_new_tokens, overlong_buffer, overlong_penalty_size)  # [N]
    return total_reward(values[:, : len(weights)], weights) + overlong, overlong


def total_reward(values, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the rules' rewards. values [N, R] (NaN where a rule skipped), weights [R] -> [N]"""
    return torch.nan_to_num(torch.as_tensor(values, dtype=torch.float64), nan=0.0) @ weights.double()
