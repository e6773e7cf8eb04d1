"""The step's figures: what each metrics.jsonl column is called and means, how every process's
values are gathered (in one place, the same calls on every process), and the row they make.

`CATALOGUE` is the one list of names: the trainer writes only these, the console and the plot
read them from here, the trackers file them by `trackers.sink.metric_tag`, and the tests check that the
documentation describes each one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from grpo_cli.rewards.answers import split_thinking
from grpo_cli.rewards.diversity import group_diversity
from grpo_cli.run.mismatch_watch import SAMPLER_KL_SHOWN
from grpo_cli.update import sampler_correction


@dataclass(frozen=True)
class Metric:
    name: str  # the metrics.jsonl key
    meaning: str
    machine: bool = False  # a figure of the machine, not of the learning: two runs with one seed differ only here
    label: str | None = None  # the console dashboard's label; None: not on the dashboard
    fmt: str = ".3f"  # how the console writes it
    shown_above: float | None = None  # on the dashboard only on a step where it is above this (None: always)

    def on_dashboard(self, row: dict) -> bool:
        """Whether the dashboard shows it for this metrics row: a labelled column the run writes, and over its
        shown_above if it has one (a null value shows as "-")."""
        if self.label is None or self.name not in row:
            return False
        return self.shown_above is None or (row[self.name] or 0.0) > self.shown_above


STEP_METRICS = (
    Metric("step", "the optimizer step this row follows (1-based)"),
    Metric("reward_mean", "mean total reward over the step's completions", label="reward", fmt="+.3f"),
    Metric("reward_std", "standard deviation of the total reward over the step's completions"),
    Metric("reward/<rule>", "mean reward of each rule (completions a custom rule skipped left out)"),
    Metric("reward/overlong", "mean overlong penalty, when grpo.overlong_buffer is set"),
    Metric("accuracy", "fraction of completions the correctness rule accepts, even when it is not a recipe rule",
           label="accuracy", fmt=".1%"),
    Metric("kl", "mean k3 KL to the reference; null when kl_beta is 0 (no reference pass)", label="KL", fmt=".4f"),
    Metric("entropy", "the policy's mean token entropy", label="entropy"),
    Metric("clip_frac", "fraction of completion tokens where the clipped term is the smaller one",
           label="clip frac"),
    Metric("loss", "the surrogate loss, mean over the step's updates"),
    Metric("grad_norm", "gradient norm before clipping, mean over the step's updates"),
    Metric("lr", "learning rate after the step"),
    Metric("completion_len", "mean completion length in tokens the model wrote, EOS included (tool output apart)",
           label="length", fmt=".1f"),
    Metric("think_len", "mean characters of thinking (before `</think>`) over the completions that close a think "
           "block, opened by them or by the chat template; only on steps where one does"),
    Metric("answer_len", "mean characters after `</think>` over the same completions; only on steps where one does"),
    Metric("truncated_frac", "fraction of completions that hit grpo.max_new_tokens", label="truncated",
           fmt=".0%"),
    Metric("frac_zero_std", "fraction of groups whose rewards were all equal (they teach nothing)",
           label="zero-std groups", fmt=".0%"),
    Metric("answer_diversity", "fraction of distinct final answers in a group, mean over groups",
           label="answer diversity", fmt=".2f"),
    Metric("text_diversity", "fraction of distinct completions in a group, mean over groups"),
    Metric("dropped_groups", "groups with equal rewards left out, with grpo.dynamic_sampling"),
    Metric("sampling_rounds", "rollouts taken to fill the step, with grpo.dynamic_sampling"),
    Metric("sampled_accuracy", "accuracy over everything sampled, dropped groups included, with "
           "grpo.dynamic_sampling"),
    Metric("skipped_update", "only on a step whose update was not applied: what was not finite"),
    Metric("tool_calls", "with grpo.tools: code blocks run per completion", label="tool calls", fmt=".2f"),
    Metric("tool_use_frac", "with grpo.tools: fraction of completions that ran code at least once",
           label="tool use", fmt=".0%"),
    Metric("tool_errors", "with grpo.tools: fraction of calls that raised, exited non-zero or were killed "
           "(timeouts apart)"),
    Metric("tool_timeouts", "with grpo.tools: calls cut off at grpo.tool_timeout_s"),
    Metric("tool_refused", "with grpo.tools: blocks closed after grpo.max_tool_calls, not run"),
    Metric("tool_tokens", "with grpo.tools: mean tokens of tool output per completion (context, not trained on)"),
    Metric("tool_seconds", "with grpo.tools: time the step's calls ran in the sandbox, summed over calls",
           machine=True),
    Metric("tool_wait_seconds", "with grpo.tools: time the decode loop stood waiting for a call", machine=True),
    Metric("tool_restarts", "with grpo.tools: times the sandbox's server died and was started again (the calls it "
           "was running ended as errors); nothing a call does should cause it, so anything but 0 is worth a report"),
    Metric("sampler_kl", "mean k3 estimate of KL(sampler, trainer) per token: the log-prob the rollout drew each "
           "token with against the training forward's under the same weights (docs/algorithm.md, sampler and trainer); "
           "over the completions the update ran", label="sampler KL", fmt=".1e", shown_above=SAMPLER_KL_SHOWN),
    Metric("sampler_kl_max", "the largest token's k3 estimate"),
    Metric("sampler_ratio_mean", "mean importance ratio exp(trainer - sampler) over those tokens"),
    Metric("sampler_ratio_min", "the smallest token's importance ratio"),
    Metric("sampler_ratio_max", "the largest token's importance ratio"),
    Metric("sampler_ratio_outside", "fraction of those tokens whose importance ratio lies outside [1/2, 2]",
           label="ratio outside [1/2, 2]", fmt=".2%", shown_above=0.0),
    Metric("sampler_corrected_frac", "with grpo.sampler_correction: fraction of those tokens whose weight the "
           "correction set apart from the plain ratio (capped by tis, dropped by mask)"),
    Metric("score_errors", "reward calls that failed (scored 0)"),
    Metric("score_timeouts", "reward calls cut off at the time limit (scored 0)"),
    Metric("tokens_per_second", "generated tokens over the step time", machine=True, label="tokens/s", fmt=".0f"),
    Metric("peak_memory_gib", "GPU: the step's peak allocated; CPU: the process's peak resident set so far",
           machine=True, label="peak memory GiB", fmt=".2f"),
    Metric("step_seconds", "the step's time: rollout_seconds, score_seconds and update_seconds, and the little between them "
           "(splitting micro-batches)", machine=True),
    Metric("rollout_seconds", "sampling the completions", machine=True),
    Metric("score_seconds", "waiting for the rewards, past what overlapped with the reference pass", machine=True),
    Metric("update_seconds", "the reference and old-policy passes, advantages and the updates", machine=True),
    Metric("elapsed_seconds", "since the process started: the difference between two rows is the whole step, "
           "logging and checkpoints included", machine=True),
)
EVAL_METRICS = (
    Metric("eval/accuracy", "greedy accuracy on the held-out set"),
    Metric("eval/n", "held-out problems graded"),
    Metric("eval/seconds", "the evaluation's time", machine=True),
    Metric("eval/timeouts", "gradings cut off at the time limit, counted wrong"),
)
CATALOGUE = {m.name: m for m in STEP_METRICS + EVAL_METRICS}
MACHINE_METRICS = frozenset(m.name for m in CATALOGUE.values() if m.machine)
DASHBOARD = tuple(m for m in STEP_METRICS if m.label)


def rule_metric(rule: str) -> str:
    """The column of one reward rule's mean: reward/<rule>."""
    return f"reward/{rule}"


def known(name: str) -> bool:
    """Whether `name` is a catalogued column (reward/<rule> for any rule)."""
    return name in CATALOGUE or name.startswith("reward/")


@dataclass(frozen=True, kw_only=True)
class StepFigures:
    """A step's values from every process, concatenated in rank order."""

    rewards: torch.Tensor  # [N_all] total rewards (overlong penalty included)
    scores: np.ndarray  # [N_all, R'] per rule, columns named by `rules`
    rules: list[str]
    texts: list[str]  # [N_all]
    lengths: torch.Tensor  # [N_all] completion tokens the model wrote
    tool_use: torch.Tensor | None  # [N_all, 6] with tools: ToolUse.stacked() and the tool-output tokens
    tool_wait_seconds: float  # the longest of the processes'
    tool_restarts: int  # summed over the processes
    truncated: torch.Tensor  # [N_all] 1.0 where the completion hit max_new_tokens
    overlong: torch.Tensor  # [N_all]
    kls: torch.Tensor  # [K_all], empty without a reference pass
    entropies: torch.Tensor  # [K_all]
    losses: list[float]  # per update, summed over processes
    clipped_tokens: float
    tokens: float
    mismatch: torch.Tensor  # [len(sampler_correction.FIELDS)] the sampler/trainer mismatch over every process
    score_errors: int
    score_timeouts: int
    peak_memory_gib: float  # the largest of the processes'


def gather(world, *, rewards_all: torch.Tensor, scores, rollout, overlong: torch.Tensor, stats,
           peak_memory_gib: float) -> StepFigures:
    """Every collective the step's figures need, made unconditionally and in one order: each
    process must make the same calls, so nothing here depends on what a process holds."""
    return StepFigures(
        rewards=rewards_all,
        scores=world.all_gather(torch.from_numpy(scores.values)).numpy(),
        rules=list(scores.rules),
        texts=world.all_gather_objects(rollout.texts),
        lengths=world.all_gather(rollout.action_lengths.cpu()),
        tool_use=_tool_use(world, rollout),
        tool_wait_seconds=world.reduce(rollout.tool_use.waited_seconds if rollout.tool_use else 0.0, "max"),
        tool_restarts=int(world.reduce(float(rollout.tool_use.restarts) if rollout.tool_use else 0.0)),
        truncated=world.all_gather(rollout.truncated.cpu().float()),
        overlong=world.all_gather(overlong),
        kls=world.all_gather(_cat(stats.kls)),
        entropies=world.all_gather(_cat(stats.entropies)),
        losses=world.all_gather(torch.tensor(stats.losses, dtype=torch.float64)).view(world.size, -1).sum(0).tolist(),
        clipped_tokens=world.reduce(stats.clipped),
        tokens=world.reduce(stats.tokens),
        mismatch=sampler_correction.combine(world.all_gather(_mismatch(stats)[None])),
        score_errors=int(world.reduce(scores.errors)),
        score_timeouts=int(world.reduce(scores.timeouts)),
        peak_memory_gib=world.reduce(peak_memory_gib, "max"),
    )


def _tool_use(world, rollout) -> torch.Tensor | None:
    """[N_all, 6] tool figures (ToolUse.stacked, then tool-output tokens), gathered with or without a tool (zeros
    then), so that the collectives never depend on the recipe; None without a tool."""
    n = rollout.lengths.shape[0]
    local = torch.zeros(n, 6, dtype=torch.float64)
    if rollout.tool_use is not None:
        local = torch.cat([rollout.tool_use.stacked(), (rollout.lengths - rollout.action_lengths).cpu().double()[:, None]], 1)
    gathered = world.all_gather(local)
    return None if rollout.tool_use is None else gathered


def _mismatch(stats) -> torch.Tensor:
    """This process's mismatch row ([len(FIELDS)]), its micro-batches combined; an empty one without any."""
    rows = torch.stack(stats.mismatch) if stats.mismatch else torch.empty(0, len(sampler_correction.FIELDS))
    return sampler_correction.combine(rows.double())


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach() for p in parts]) if parts else torch.empty(0)


def _mean_or_none(values: np.ndarray) -> float | None:
    """Mean of a rule's rewards, leaving out completions it skipped (NaN); None if it skipped them all."""
    return None if np.isnan(values).all() else float(np.nanmean(values))


def thinking_lengths(texts: list[str]) -> dict[str, float]:
    """think_len and answer_len, in characters (the texts are at hand, their tokens per part are not), over
    the texts that close a think block; none of the two when no text does."""
    split = [parts for parts in map(split_thinking, texts) if parts is not None]
    if not split:
        return {}
    return {"think_len": float(np.mean([len(thinking) for thinking, _ in split])),
            "answer_len": float(np.mean([len(answer) for _, answer in split]))}


def tool_figures(figures: StepFigures) -> dict[str, float]:
    """The tool_* columns, with grpo.tools (see ToolUse.stacked for the columns gathered)."""
    if figures.tool_use is None:
        return {}
    calls, errors, timeouts, refused, seconds, tokens = figures.tool_use.unbind(1)
    return {"tool_calls": calls.mean().item(), "tool_use_frac": (calls > 0).double().mean().item(),
            "tool_errors": errors.sum().item() / max(calls.sum().item(), 1.0), "tool_timeouts": int(timeouts.sum()),
            "tool_refused": int(refused.sum()), "tool_tokens": tokens.mean().item(),
            "tool_seconds": seconds.sum().item(), "tool_wait_seconds": figures.tool_wait_seconds,
            "tool_restarts": figures.tool_restarts}


def step_row(step: int, figures: StepFigures, *, rule_keys: list[str], group_size: int, zero_std: torch.Tensor,
             stats, lr: float, sampled, dynamic_sampling: bool, overlong_on: bool, seconds: dict[str, float],
             elapsed: float, correction: sampler_correction.Correction | None = None) -> dict:
    """The metrics.jsonl row of a step, from gathered figures (no collectives here)."""
    column = {rule: figures.scores[:, i] for i, rule in enumerate(figures.rules)}
    rewards = figures.rewards
    row = {
        "step": step,
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std(unbiased=False).item(),
        **{rule_metric(key): _mean_or_none(column[key]) for key in rule_keys},
        **({"reward/overlong": figures.overlong.mean().item()} if overlong_on else {}),
        "accuracy": float((column["correctness"] > 0.5).mean()),
        "kl": figures.kls.mean().item() if figures.kls.numel() else None,
        "entropy": figures.entropies.mean().item() if figures.entropies.numel() else None,
        "clip_frac": figures.clipped_tokens / max(figures.tokens, 1.0),
        **sampler_correction.figures(figures.mismatch, correction or sampler_correction.Correction()),
        "loss": sum(figures.losses) / len(figures.losses),
        "grad_norm": sum(stats.grad_norms) / len(stats.grad_norms),
        "lr": lr,
        "completion_len": figures.lengths.float().mean().item(),
        **thinking_lengths(figures.texts),
        **tool_figures(figures),
        "tokens_per_second": figures.lengths.sum().item() / seconds["step"],
        "peak_memory_gib": figures.peak_memory_gib,
        **dict(zip(("answer_diversity", "text_diversity"), group_diversity(figures.texts, group_size))),
        "truncated_frac": figures.truncated.float().mean().item(),
        "frac_zero_std": zero_std.float().mean().item(),
        **({"dropped_groups": sampled.dropped_groups, "sampling_rounds": sampled.rounds,
            "sampled_accuracy": sampled.sampled_accuracy} if dynamic_sampling else {}),
        **({"skipped_update": ", ".join(stats.problems)} if stats.problems else {}),
        "score_errors": figures.score_errors,
        "score_timeouts": figures.score_timeouts,
        "step_seconds": seconds["step"],
        "rollout_seconds": seconds["rollout"],
        "score_seconds": seconds["score"],
        "update_seconds": seconds["update"],
        "elapsed_seconds": elapsed,
    }
    unknown = [k for k in row if not known(k)]
    assert not unknown, f"metrics.py: columns written but not catalogued: {unknown}"
    return row


def markdown_table() -> str:
    """The catalogue as docs/runs.md shows it (a test keeps the two the same)."""
    lines = ["| column | meaning |", "| --- | --- |"]
    for metric in STEP_METRICS + EVAL_METRICS:
        lines.append(f"| `{metric.name}` | {metric.meaning}{' (machine)' if metric.machine else ''} |")
    return "\n".join(lines)
