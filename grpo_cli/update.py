"""The optimizer side of a step: AdamW, its learning-rate schedule, and the clipped updates on a batch."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from grpo_cli.batching import MicroBatch
from grpo_cli.distributed import Parallel
from grpo_cli.logprobs import as_leaves, backward_into_prompts
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


def apply_optimizer_settings(optimizer, scheduler, spec: TrainSpec) -> None:
    """The recipe's lr and weight decay over what a checkpoint restored: loading a state dict brings
    back the old run's values (AdamW's param groups, the scheduler's base rates), so a resume that
    changes them would otherwise print the change and train on as before. The schedule itself
    (warmup, cosine over train.steps) is the new recipe's already: its function is not saved."""
    for group in optimizer.param_groups:
        group["weight_decay"] = spec.weight_decay
        group["initial_lr"] = spec.lr
    scheduler.base_lrs = [spec.lr] * len(optimizer.param_groups)
    factors = [rate(scheduler.last_epoch) for rate in scheduler.lr_lambdas]
    for group, factor in zip(optimizer.param_groups, factors):
        group["lr"] = spec.lr * factor
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


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


def update_policy(policy, optimizer, scheduler, recipe: Recipe, rollout: Rollout, batches: list[MicroBatch],
                  advantages: torch.Tensor, ref_logp, old_logp, share: bool, parallel: Parallel) -> UpdateStats:
    """updates_per_rollout clipped policy-gradient steps on the batch; a step whose loss or gradients
    are not finite is not applied (the scheduler still advances, so lr stays tied to the step).

    With several processes the loss is normalized by the whole step's completions and tokens,
    gradients are averaged once per update (DDP, or FSDP2's reduce-scatter; the micro-batches
    before the last accumulate without syncing), and a non-finite value on any rank skips the
    update on all."""
    world = parallel.world
    grpo = recipe.grpo
    loss_fn = LOSSES[grpo.loss]
    loss_mask = rollout.completion_mask * (~rollout.truncated).unsqueeze(1) if grpo.mask_truncated \
        else rollout.completion_mask  # [N, C]
    completions = int(world.reduce(rollout.input_ids.shape[0]))
    tokens = max(1, int(world.reduce(int(loss_mask.sum()))))
    settings = LossSettings(grpo.clip_eps, grpo.upper_clip, grpo.kl_beta, grpo.entropy_bonus, completions, tokens,
                            grpo.max_new_tokens)
    stats = UpdateStats([], [], [], 0.0, 0.0, [], [], 0)
    for _ in range(grpo.updates_per_rollout):
        optimizer.zero_grad(set_to_none=True)
        bad = []
        with parallel.gathered():  # FSDP2: one gather per update, whatever each process's micro-batches
            step_loss = _accumulate(parallel, rollout, batches, grpo, loss_fn, loss_mask, settings, advantages,
                                    ref_logp, old_logp, share, stats)
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


def _accumulate(parallel: Parallel, rollout: Rollout, batches: list[MicroBatch], grpo, loss_fn, loss_mask,
                settings: LossSettings, advantages, ref_logp, old_logp, share: bool, stats: UpdateStats) -> float:
    """Forward and backward over every micro-batch, gradients averaged over processes on the last; the
    step's loss.

    One process with shared prompts runs the step's prompts once: the micro-batches continue from
    its keys and values, and its backward runs once at the end with what they sent it. (DDP syncs
    gradients inside one backward per forward, so there each micro-batch runs its own prompts.)"""
    step_loss = 0.0
    states = leaves = None
    if share and parallel.strategy == "single":
        states = parallel.train_call(step_prompts_of=rollout)
        leaves = as_leaves(states)
    for i, micro in enumerate(batches):
        with parallel.sync_gradients(syncing=i == len(batches) - 1):
            logp, entropy = parallel.train_call(micro, grpo.temperature, share, prompts=leaves,
                                                entropy_grad=bool(grpo.entropy_bonus))  # [n, c] each
            mask = loss_mask[micro.rows, : micro.completion_mask.shape[1]]  # [n, c]
            # With one update, pi_old is the current policy: the ratio is exactly 1.
            old = old_logp[i] if old_logp is not None else logp.detach()
            terms = loss_fn(logp, old, advantages[micro.rows], mask, settings,
                            ref_logp[i] if ref_logp is not None else None,
                            entropy)
            loss = terms.per_completion.sum()
            # gradients are averaged over the processes; the shares already divide by the whole step
            (loss * parallel.world.size).backward()
        step_loss += loss.item()
        if terms.kl is not None:
            stats.kls.append(terms.kl)
        stats.entropies.append(token_mean(entropy.detach(), micro.completion_mask))
        stats.clipped += terms.clipped_tokens.item()
        stats.tokens += terms.tokens.item()
    if states is not None:
        backward_into_prompts(states, leaves)
    return step_loss
