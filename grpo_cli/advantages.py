"""Group-relative advantages: each completion's reward as a z-score inside its group."""

from __future__ import annotations

import torch

STD_EPS = 1e-4  # keeps a group with nearly equal rewards from blowing up its advantages
ZERO_STD = 1e-6  # a group whose rewards spread less than this carries no signal


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = STD_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """A_i = (r_i - mean(group)) / (std(group) + eps), the same for every token of completion i.

    rewards: [B*G], consecutive runs of `group_size` belong to one prompt.
    Returns (advantages [B*G], zero_std [B]). The std is the population std (divide
    by G), so a group's advantages have mean 0 and, up to eps, variance 1. A group
    whose rewards are all equal gets advantage 0 for every member.
    """
    grouped = rewards.view(-1, group_size).double()  # [B, G]
    mean = grouped.mean(dim=1, keepdim=True)  # [B, 1]
    std = grouped.std(dim=1, unbiased=False, keepdim=True)  # [B, 1]
    zero_std = std.squeeze(1) < ZERO_STD  # [B]
    advantages = (grouped - mean) / (std + eps)  # [B, G]
    advantages[zero_std] = 0.0
    return advantages.view(-1).to(rewards.dtype), zero_std
