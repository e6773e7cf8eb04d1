"""The optimizer side of a step: AdamW, its learning-rate schedule, and the clipped updates on a batch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from grpo_cli.update.batching import MicroBatch
from grpo_cli.distributed.parallel import Parallel
from grpo_cli.model.logprobs import as_leaves, backward_into_prompts
from grpo_cli.update.loss import LOSSES, LossSettings, token_mean
from grpo_cli.update.sampler_correction import Correction, mismatch_sums
from grpo_cli.update.sampler_correction import weights as correction_weights
from grpo_cli.config.recipe import Recipe, TrainSpec
from grpo_cli.rollout.sampling import Rollout


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


@dataclass(kw_only=True)
class UpdateStats:
    """What the updates of a step did. `update_policy` fills it as it goes, so after a failure
    part-way (out of memory) `applied` still says whether the weights changed."""

    losses: list[float] = field(default_factory=list)  # per update
    kls: list[torch.Tensor] = field(default_factory=list)  # per micro-batch, [n] each
    entropies: list[torch.Tensor] = field(default_factory=list)  # per micro-batch, [n] each
    clipped: float = 0.0  # completion tokens where the clipped term was the smaller
    mismatch: list[torch.Tensor] = field(default_factory=list)  # per micro-batch, sampler_correction.mismatch_sums
    tokens: float = 0.0  # completion tokens in the loss
    grad_norms: list[float] = field(default_factory=list)  # per update, before clipping
    problems: list[str] = field(default_factory=list)  # what was not finite ("loss", "gradients"); not applied
    applied: int = 0  # optimizer steps taken


@dataclass(frozen=True, kw_only=True)
class UpdateBatch:
    """What the step's updates train on: the rollout in micro-batches, its advantages, and the
    log-probs fixed for the whole step (None when the recipe needs no such pass)."""

    rollout: Rollout
    micro_batches: list[MicroBatch]
    advantages: torch.Tensor  # [N]
    ref_logp: list[torch.Tensor] | None  # per micro-batch, [n, c]: the reference policy (KL)
    old_logp: list[torch.Tensor] | None  # per micro-batch, [n, c]: the sampling policy (updates_per_rollout > 1)
    shared_prompts: bool  # the step's prompts run once for all micro-batches (logprobs.can_share_prompts)


@dataclass(frozen=True, kw_only=True)
class LossPlan:
    """How a micro-batch's loss is computed, the same for every update of a step."""

    loss_fn: object  # loss.LOSSES[grpo.loss]
    loss_mask: torch.Tensor  # [N, C]
    settings: LossSettings
    temperature: float
    entropy_grad: bool  # the entropy bonus trains on the entropy: keep its graph
    correction: Correction  # grpo.sampler_correction and its bounds


def update_policy(parallel: Parallel, optimizer, scheduler, recipe: Recipe, batch: UpdateBatch,
                  stats: UpdateStats) -> UpdateStats:
    """updates_per_rollout clipped policy-gradient steps on the batch; a step whose loss or gradients
    are not finite is not applied (the scheduler still advances, so lr stays tied to the step).

    With several processes the loss is normalized by the whole step's completions and tokens,
    gradients are averaged once per update (DDP, or FSDP2's reduce-scatter; the micro-batches
    before the last accumulate without syncing), and a non-finite value on any rank skips the
    update on all."""
    world = parallel.world
    grpo = recipe.grpo
    rollout = batch.rollout
    # tool output is context, not actions: out of the loss, the KL and the token counts (Rollout.action_mask)
    loss_mask = rollout.action_mask * (~rollout.truncated).unsqueeze(1) if grpo.mask_truncated \
        else rollout.action_mask  # [N, C]
    completions = int(world.reduce(rollout.input_ids.shape[0]))
    tokens = max(1, int(world.reduce(int(loss_mask.sum()))))
    settings = LossSettings(clip_low=grpo.clip_eps, clip_high=grpo.upper_clip, kl_beta=grpo.kl_beta,
                            entropy_bonus=grpo.entropy_bonus, step_completions=completions, step_tokens=tokens,
                            max_new_tokens=grpo.max_new_tokens)
    plan = LossPlan(loss_fn=LOSSES[grpo.loss], loss_mask=loss_mask, settings=settings,
                    temperature=grpo.temperature, entropy_grad=bool(grpo.entropy_bonus), correction=grpo.correction)
    for update in range(grpo.updates_per_rollout):
        optimizer.zero_grad(set_to_none=True)
        bad = []
        with parallel.gathered():  # FSDP2: one gather per update, whatever each process's micro-batches
            step_loss = _accumulate(parallel, batch, plan, stats, measure=update == 0)
        max_norm = recipe.train.max_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(parallel.policy.trainable_parameters(), max_norm).item()
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


def _accumulate(parallel: Parallel, batch: UpdateBatch, plan: LossPlan, stats: UpdateStats,
                measure: bool = True) -> float:
    """Forward and backward over every micro-batch, gradients averaged over processes on the last; the
    step's loss. `measure`: record the sampler/trainer mismatch (the first update of a step: the policy
    that sampled is the one every update compares with, so later updates would repeat the figures).

    One process with shared prompts runs the step's prompts once: the micro-batches continue from
    its keys and values, and its backward runs once at the end with what they sent it. (DDP syncs
    gradients inside one backward per forward, so there each micro-batch runs its own prompts.)"""
    step_loss = 0.0
    ran = sum(len(micro.rows) for micro in batch.micro_batches)
    if ran < batch.rollout.input_ids.shape[0]:  # completions left out carry no gradient (train.rows_with_gradient)
        left_out = plan.loss_mask.sum() - sum(plan.loss_mask[micro.rows].sum() for micro in batch.micro_batches)
        stats.tokens += float(left_out)
    if not batch.micro_batches:  # every advantage 0: the gradient is exactly zero, and AdamW still steps on it
        for parameter in parallel.policy.trainable_parameters():
            parameter.grad = torch.zeros_like(parameter)
        return step_loss
    states = leaves = None
    if batch.shared_prompts and parallel.strategy == "single":
        states = parallel.train_call(step_prompts_of=batch.rollout)
        leaves = as_leaves(states)
    last = len(batch.micro_batches) - 1
    for i, micro in enumerate(batch.micro_batches):
        with parallel.sync_gradients(syncing=i == last):
            logp, entropy = parallel.train_call(micro, plan.temperature, batch.shared_prompts, prompts=leaves,
                                                entropy_grad=plan.entropy_grad)  # [n, c] each
            mask = plan.loss_mask[micro.rows, : micro.completion_mask.shape[1]]  # [n, c]
            # With one update, pi_old is the current policy: the ratio is exactly 1.
            old = batch.old_logp[i] if batch.old_logp is not None else logp.detach()
            reference = batch.ref_logp[i] if batch.ref_logp is not None else None
            # the trainer's log-probs under the weights that sampled (`old`) against the sampler's own
            corrected = {}
            if micro.sampler_logp is not None and plan.correction.active:
                corrected["weights"] = correction_weights(old, micro.sampler_logp, mask, plan.correction)
            if micro.sampler_logp is not None and measure:
                stats.mismatch.append(mismatch_sums(old, micro.sampler_logp, micro.action_mask, plan.correction))
            terms = plan.loss_fn(logp, old, batch.advantages[micro.rows], mask, plan.settings, reference, entropy,
                                 **corrected)
            loss = terms.per_completion.sum()
            # gradients are averaged over the processes; the shares already divide by the whole step
            (loss * parallel.world.size).backward()
        step_loss += loss.item()
        if terms.kl is not None:
            stats.kls.append(terms.kl)
        stats.entropies.append(token_mean(entropy.detach(), micro.action_mask))
        stats.clipped += terms.clipped_tokens.item()
        stats.tokens += terms.tokens.item()
    if states is not None:
        backward_into_prompts(states, leaves)
    return step_loss
