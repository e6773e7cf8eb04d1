"""The optimizer side of a step: AdamW, its learning-rate schedule, and the clipped updates on a batch."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from grpo_cli.batching import MicroBatch
from grpo_cli.distributed import World
from grpo_cli.logprobs import micro_batch_logprobs
from grpo_cli.loss import LOSSES, LossSettings, token_mean
from grpo_cli.recipe import Recipe, TrainSpec
from grpo_cli.rollout import Rollout


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


@dataclass
class UpdateStats:
    losses: list[float]
    kls: list[torch.Tensor]
    entropies: list[torch.Tensor]
    clipped: float
    tokens: float
    grad_norms: list[float]
    problems: list[str]  # what was not finite ("loss", "gradients"); those updates were skipped
    applied: int  # optimizer steps taken


class PolicyLogprobs(torch.nn.Module):
    """The policy's log-probabilities as a module, so DistributedDataParallel can wrap the pass."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, micro: MicroBatch, temperature: float, share: bool):
        return micro_batch_logprobs(self.model, micro, temperature, share, with_entropy=True)


def gradient_averaging(policy, world: World):
    """A DistributedDataParallel wrapper of the log-prob pass when there are several processes."""
    if not world.active:
        return None
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [world.local_rank] if policy.device.type == "cuda" else None
    return DistributedDataParallel(PolicyLogprobs(policy.model), device_ids=device_ids)


def update_policy(policy, optimizer, scheduler, recipe: Recipe, rollout: Rollout, batches: list[MicroBatch],
                  advantages: torch.Tensor, ref_logp, old_logp, share: bool, ddp=None,
                  world: World = World()) -> UpdateStats:
    """updates_per_rollout clipped policy-gradient steps on the batch; a step whose loss or gradients
    are not finite is not applied (the scheduler still advances, so lr stays tied to the step).

    With several processes (`ddp`, `world`) the loss is normalized by the whole step's completions
    and tokens, DDP averages the gradients once per update (the micro-batches before the last
    accumulate without syncing), and a non-finite value on any rank skips the update on all."""
    grpo = recipe.grpo
    loss_fn = LOSSES[grpo.loss]
    loss_mask = rollout.completion_mask * (~rollout.truncated).unsqueeze(1) if grpo.mask_truncated \
        else rollout.completion_mask  # [N, C]
    completions = int(world.reduce(rollout.input_ids.shape[0]))
    tokens = max(1, int(world.reduce(int(loss_mask.sum()))))
    settings = LossSettings(grpo.clip_eps, grpo.upper_clip, grpo.kl_beta, grpo.entropy_bonus, completions, tokens,
                            grpo.max_new_tokens)
    passes = ddp if ddp is not None else PolicyLogprobs(policy.model)
    stats = UpdateStats([], [], [], 0.0, 0.0, [], [], 0)
    for _ in range(grpo.updates_per_rollout):
        optimizer.zero_grad(set_to_none=True)
        step_loss, bad = 0.0, []
        for i, micro in enumerate(batches):
            syncing = ddp is None or i == len(batches) - 1
            with contextlib.nullcontext() if syncing else ddp.no_sync():
                logp, entropy = passes(micro, grpo.temperature, share)  # [n, c] each
                mask = loss_mask[micro.rows, : micro.completion_mask.shape[1]]  # [n, c]
                # With one update, pi_old is the current policy: the ratio is exactly 1.
                old = old_logp[i] if old_logp is not None else logp.detach()
                terms = loss_fn(logp, old, advantages[micro.rows], mask, settings,
                                ref_logp[i] if ref_logp is not None else None,
                                entropy if grpo.entropy_bonus else entropy.detach())
                loss = terms.per_completion.sum()
                # DDP averages gradients over the processes; the shares already divide by the whole step
                (loss * world.size).backward()
            step_loss += loss.item()
            if terms.kl is not None:
                stats.kls.append(terms.kl)
            stats.entropies.append(token_mean(entropy.detach(), micro.completion_mask))
            stats.clipped += terms.clipped_tokens.item()
            stats.tokens += terms.tokens.item()
        max_norm = recipe.train.max_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), max_norm).item()
        if world.reduce(0.0 if np.isfinite(step_loss) else 1.0, "max"):
            bad.append("loss")
        if not np.isfinite(grad_norm):
            bad.append("gradients")
        if bad:
            optimizer.zero_grad(set_to_none=True)
            stats.problems.extend(p for p in bad if p not in stats.problems)
        else:
            optimizer.step()
            stats.applied += 1
        scheduler.step()
        stats.losses.append(step_loss)
        stats.grad_norms.append(grad_norm)
    return stats
