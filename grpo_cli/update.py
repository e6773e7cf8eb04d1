"""The optimizer side of a step: AdamW over the trainable parameters and its learning-rate schedule."""

from __future__ import annotations

import math

import torch

from grpo_cli.recipe import TrainSpec


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier on the base lr before optimizer step `step` (0-based): linear warmup over
    `warmup` steps, then constant or a cosine decay that reaches 0 after `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(params: list[torch.nn.Parameter], spec: TrainSpec, total_updates: int):
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, spec.warmup_steps, total_updates, spec.schedule)
    )
    return optimizer, scheduler
