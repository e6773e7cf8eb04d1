"""The step's batch (`StepBatch`): rollouts of G completions per prompt, and their scores.

Without dynamic sampling one rollout of prompts_per_step prompts is taken and its
scoring left running in the worker processes, to overlap with the reference pass.
With it (DAPO), groups whose rewards are all equal are dropped, since they carry no
gradient, and more prompts are rolled out until the step has prompts_per_step
informative groups or max_sampling_rounds rollouts were made.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from grpo_cli.update.advantages import group_advantages, step_rewards
from grpo_cli.data.examples import Example, Examples, PromptOrder
from grpo_cli.distributed.parallel import Parallel
from grpo_cli.config.recipe import Recipe
from grpo_cli.rollout.sampling import Rollout, concat, select_groups
from grpo_cli.rewards.scoring import Pending, Scorer, Scores
from grpo_cli.rollout.settings import Sampling
from grpo_cli.rollout.with_tools import ToolSession


@dataclass
class Done:
    """Scores already in hand, behaving like scoring.Pending."""

    scores: Scores

    def result(self) -> Scores:
        return self.scores


@dataclass(kw_only=True)
class StepBatch:
    """What the sample phase of a step hands on: the groups to train on, their prompts and scores."""

    rollout: Rollout  # the groups to train on
    examples: list[Example]  # their prompts, one per group
    pending: Pending | Done  # their scores
    dropped_groups: int = 0  # groups with equal rewards left out (dynamic sampling)
    rounds: int = 1
    sampled_accuracy: float | None = None  # over every completion sampled, dropped ones included


def score_rollout(scorer: Scorer, rules: list[str], rollout: Rollout, batch: list[Example]) -> Pending:
    """Start scoring a rollout of `batch`'s prompts (group_size completions each), each completion behind its
    prompt's prefill. With the code tool, what it printed is known from the rollout's masks (Rollout.tool_outputs),
    so the rules are never shown it as the model's text however it was written."""
    rows = [e for e in batch for _ in range(rollout.group_size)]
    printed = None if rollout.tool_outputs is None else [
        [(start + len(e.prefill), end + len(e.prefill)) for start, end in spans]
        for e, spans in zip(rows, rollout.tool_outputs)]
    return scorer.submit(rules, [e.prefill + t for e, t in zip(rows, rollout.texts)], [e.answer for e in rows],
                         [{"prompt": e.prompt, **e.row} for e in rows], printed)


def sample_step(parallel: Parallel, train_set: Examples, order: PromptOrder, scorer: Scorer, recipe: Recipe,
                rules: list[str], weights: torch.Tensor, tools: ToolSession | None = None) -> StepBatch:
    """Rollouts and their scoring for one step (see the module's docstring). With several processes,
    each takes its own slice of the step's prompts (see distributed/). `tools`: the run's sandbox,
    with grpo.tools."""
    grpo = recipe.grpo
    policy, world = parallel.policy, parallel.world

    sampling = Sampling.for_training(recipe)

    def rollout_of(batch: list[Example]):
        rollout = parallel.generate(policy.tokenizer, [e.prompt for e in batch], sampling, tools)
        return rollout, score_rollout(scorer, rules, rollout, batch)

    batch = [train_set.items[i] for i in order.take(grpo.prompts_per_step)]
    rank_prompts = grpo.prompts_per_step // world.size
    batch = batch[world.rank * rank_prompts : (world.rank + 1) * rank_prompts]
    rollout, pending = rollout_of(batch)
    if not grpo.dynamic_sampling:
        return StepBatch(rollout=rollout, examples=batch, pending=pending)
    kept: list[tuple[Rollout, list[Example], Scores]] = []
    dropped = rounds = correct = total = 0
    while True:
        rounds += 1
        scores = pending.result()
        rewards, _ = step_rewards(scores.values, weights, rollout.lengths.cpu(), grpo.max_new_tokens,
                                  grpo.overlong_buffer, grpo.overlong_penalty)  # [N]
        _, zero_std = group_advantages(rewards, grpo.group_size)  # [B]
        informative = [g for g, flat in enumerate(zero_std.tolist()) if not flat]
        dropped += len(batch) - len(informative)
        correct += int((scores.column("correctness") > 0.5).sum())
        total += len(scores.values)
        if informative:
            rows = [g * grpo.group_size + j for g in informative for j in range(grpo.group_size)]
            kept.append((select_groups(rollout, informative), [batch[g] for g in informative],
                         Scores(values=scores.values[rows], rules=scores.rules, timeouts=scores.timeouts,
                                errors=scores.errors, messages=scores.messages, status=scores.status[rows])))
        have = sum(len(examples) for _, examples, _ in kept)
        if have >= grpo.prompts_per_step or rounds == grpo.max_sampling_rounds:
            break
        batch = [train_set.items[i] for i in order.take(grpo.prompts_per_step)]
        rollout, pending = rollout_of(batch)
    if not kept:  # nothing informative at all: train on the last round, whose advantages are all 0
        return StepBatch(rollout=rollout, examples=batch, pending=Done(scores), dropped_groups=dropped, rounds=rounds,
                         sampled_accuracy=correct / total)
    groups = grpo.prompts_per_step
    rollout = concat([r for r, _, _ in kept], policy.tokenizer.pad_token_id)
    examples = [e for _, es, _ in kept for e in es][:groups]
    merged = np.concatenate([sc.values for _, _, sc in kept])[: groups * grpo.group_size]
    status = np.concatenate([sc.status for _, _, sc in kept])[: groups * grpo.group_size]
    first = kept[0][2]
    scores = Scores(values=merged, rules=first.rules, timeouts=sum(sc.timeouts for *_, sc in kept),
                    errors=sum(sc.errors for *_, sc in kept), messages=first.messages, status=status)
    return StepBatch(rollout=select_groups(rollout, list(range(len(examples)))), examples=examples,
                     pending=Done(scores), dropped_groups=dropped, rounds=rounds, sampled_accuracy=correct / total)
