"""`train(recipe)`: the GRPO loop, top to bottom.

Each step: take prompts_per_step prompts and sample group_size completions of each (sample), score them
with the recipe's rules and turn the rewards into group-relative advantages (score), take
updates_per_rollout clipped policy-gradient steps on that batch (update), then gather the step's figures
(metrics), log them, evaluate the held-out set when due (held_out.py) and save when due (saving.py).
Everything the loop works with is set up once, as a `Run` (setup.py).
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from grpo_cli.checkpoint.store import rng_state
from grpo_cli.config.recipe import Recipe
from grpo_cli.distributed.parallel import Parallel
from grpo_cli.distributed.world import World, check_recipe, connect, disconnect
from grpo_cli.rewards.scoring import GRADERS, Scorer, Scores, refuse_inside_a_starting_worker
from grpo_cli.rollout.sampling import Rollout
from grpo_cli.rollout.with_tools import isolation_note, open_session
from grpo_cli.run import metrics
from grpo_cli.run.console import TrainConsole
from grpo_cli.run.guard import NAMES, Dropped, Interrupts, NonFiniteGuard, Stopped, out_of_memory, terminate_at_once
from grpo_cli.run.held_out import evaluate_if_due, first_evaluation
from grpo_cli.run.lock import RunLock
from grpo_cli.run.log import METRICS, read_jsonl
from grpo_cli.run.saving import Undo, save_if_due, save_step_undone
from grpo_cli.run.setup import Run, set_up
from grpo_cli.run.step_batch import StepBatch, sample_step
from grpo_cli.update.advantages import group_advantages, step_rewards
from grpo_cli.update.batching import AUTO_TOKENS, SPREAD, MicroBatch, split
from grpo_cli.update.loss import SURROGATE_LOSSES
from grpo_cli.update.policy import UpdateBatch, UpdateStats, update_policy

OUT_OF_MEMORY = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)


@dataclass(kw_only=True, frozen=True)
class RunSummary:
    run_dir: Path
    step: int
    checkpoint: Path | None
    eval_first: float | None  # held-out accuracy at the first evaluation of the run's history
    eval_last: float | None
    best: dict | None  # retention.read_best's marker: the checkpoint with the highest held-out accuracy
    seconds: float


def train(recipe: Recipe, resume: bool = False, recipe_dir: Path | None = None,
          console: TrainConsole | None = None, recipe_file: Path | None = None) -> RunSummary:
    """Run the recipe; with resume, continue from the run directory's latest checkpoint.
    `recipe_file`: the YAML the recipe came from, which the run never overwrites.

    Under torchrun each process runs this with its part of every step (see distributed/)."""
    refuse_inside_a_starting_worker("train()")
    with terminate_at_once():  # until the loop's own handling: nothing to save yet
        world = connect(recipe.distributed.timeout_minutes)
        try:
            check_recipe(recipe, world)
            if not world.main:
                console = TrainConsole(quiet=True)
            with RunLock(Path(recipe.output.dir)) if world.main else contextlib.nullcontext():
                return _train(recipe, resume, recipe_dir, console or TrainConsole(), world, recipe_file)
        finally:
            disconnect(world)


def _train(recipe: Recipe, resume: bool, recipe_dir: Path | None, console: TrainConsole, world: World,
           recipe_file: Path | None = None) -> RunSummary:
    """The loop: a handful of named phases per step, each a function below with a typed result."""
    grpo = recipe.grpo
    # the sandbox before the model: a machine that cannot confine the code refuses before anything heavy loads
    with open_session(grpo.tools, grpo.max_tool_calls, grpo.tool_timeout_s, grpo.tool_memory_mb) as tools:
        run = set_up(recipe, resume, recipe_dir, console, world, recipe_file)
        run.tools = tools
        guard = NonFiniteGuard(run.recipe.train.max_bad_steps)
        with Scorer({**GRADERS, **run.rule_fns}) as scorer, Interrupts(console.message, not world.active) as interrupts:
            if run.tools is not None:
                console.message(f"tool python: each call sandboxed ({isolation_note(run.tools)})")
            if run.eval_set is not None and run.step == 0:
                first_evaluation(run, scorer, interrupts)
            console.start(run.recipe.train.steps, run.step)
            try:
                while run.step < run.recipe.train.steps:
                    run.step += 1
                    batch, rewarded, stats, clock = take_step(run, scorer, interrupts)
                    figures = gather_figures(run, batch, rewarded, stats)
                    log_step(run, step_row(run, figures, batch, rewarded, stats, clock), figures, batch, rewarded,
                             stats)
                    guard.record(run.step, stats.problems, run.last_saved)
                    if run.cpu_threads is not None:
                        run.cpu_threads.recheck(console.message)
                    evaluate_if_due(run, scorer, interrupts)
                    stop = run.world.reduce(float(interrupts.requested), "max") > 0  # Ctrl-C or SIGTERM on any process
                    save_if_due(run, stop)
                    if stop and run.step < run.recipe.train.steps:
                        signum = interrupts.signum or signal.SIGINT
                        raise Stopped(f"stopped by {NAMES[signum]} after step {run.step}; saved {run.last_saved}. "
                                      "Continue with the same command and --resume.", signum)
            finally:
                console.stop()
                run.log.close()
    return summary(run)


def summary(run: Run) -> RunSummary:
    evals = [r["eval/accuracy"] for r in read_jsonl(run.run_dir / METRICS) if "eval/accuracy" in r]
    return RunSummary(run_dir=run.run_dir, step=run.step, checkpoint=run.last_saved,
                      eval_first=evals[0] if evals else None, eval_last=evals[-1] if evals else None,
                      best=run.best, seconds=time.perf_counter() - run.started)


class StepClock:
    """The phases of a step: which one is running (an out-of-memory message names it) and how long each took."""

    def __init__(self, device: torch.device):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.started = time.perf_counter()
        self.phase = "rollout"
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def timing(self, phase: str):
        self.phase, began = phase, time.perf_counter()
        yield
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - began

    def stop(self) -> None:
        self.seconds["step"] = time.perf_counter() - self.started


@dataclass(frozen=True, kw_only=True)
class StepRewards:
    """The score phase's result: the rules' scores, the rewards and the group-relative advantages."""

    scores: Scores  # this process's completions, per rule
    rewards: torch.Tensor  # [N] total rewards, overlong penalty included
    rewards_all: torch.Tensor  # [N_all] every process's, in rank order
    advantages: torch.Tensor  # [N] this process's, on the policy's device
    zero_std: torch.Tensor  # [B_all] groups whose rewards are all equal
    overlong: torch.Tensor  # [N] the overlong penalty


def take_step(run: Run, scorer: Scorer, interrupts: Interrupts) -> tuple[StepBatch, StepRewards, UpdateStats,
                                                                         StepClock]:
    """sample -> fixed log-probs -> score and advantages -> update. A SIGTERM during the rollout, or
    running out of memory before the weights changed, saves the state the step started from."""
    undo = Undo(rng=rng_state(), order=run.order.state())
    clock = StepClock(run.policy.device)
    stats = UpdateStats()  # filled as the updates go: an OOM part-way still shows what was applied
    try:
        # A SIGTERM drops the rollout (the model is as the step found it) rather than wait for its end.
        with clock.timing("rollout"), interrupts.droppable():
            batch = sample_step(run.parallel, run.train_set, run.order, scorer, run.recipe, run.scored_rules,
                                run.weights, run.tools)  # the worker processes start scoring it at once
        micro_batches = micro_batches_of(run, batch.rollout)
        ref_logp, old_logp = fixed_logprobs(run, batch.rollout, micro_batches, clock)
        with clock.timing("scoring"):
            rewarded = rewards_and_advantages(run, batch)
        learning = rows_with_gradient(run, rewarded, ref_logp is None and old_logp is None)
        if learning is not None:
            micro_batches = micro_batches_of(run, batch.rollout, learning)
        with clock.timing("update"):
            apply_update(run, UpdateBatch(rollout=batch.rollout, micro_batches=micro_batches,
                                          advantages=rewarded.advantages, ref_logp=ref_logp, old_logp=old_logp,
                                          shared_prompts=run.shared_prompts), rewarded, stats)
        clock.stop()
    except Dropped:
        saved = save_step_undone(run, undo)
        raise Stopped(f"stopped by SIGTERM during step {run.step}, whose rollout was dropped; "
                      + (f"saved {saved}. Continue with the same command and --resume." if saved else
                         "nothing was trained yet, so nothing was saved."), signal.SIGTERM) from None
    except OUT_OF_MEMORY:
        saved = save_step_undone(run, undo) if stats.applied == 0 else None  # else the weights moved: not step - 1's
        raise out_of_memory(clock.phase, run.step, run.recipe.grpo, saved or run.last_saved) from None
    return batch, rewarded, stats, clock


def micro_batches_of(run: Run, rollout: Rollout, only: list[int] | None = None) -> list[MicroBatch]:
    """Micro-batches of similar length (the fast engine also bounds their tokens); `only`: these rows."""
    grpo = run.recipe.grpo
    if grpo.engine == "fast":
        return split(rollout, grpo.micro_batch_size, AUTO_TOKENS, SPREAD, only=only)
    return split(rollout, grpo.micro_batch_size, only=only)


def rows_with_gradient(run: Run, rewarded: StepRewards, nothing_fixed: bool) -> list[int] | None:
    """The completions the update has to run, or None for all of them.

    A completion whose advantage is 0 (every member of a group scored the same) adds exactly nothing to
    the clipped surrogate's gradient, in each of the shipped losses (loss.SURROGATE_LOSSES: advantage times a
    function of the ratio); only the KL and the entropy bonus would still pull on it. A loss registered
    elsewhere may do more with a completion, so it runs them all. So with a shipped loss and without the
    KL and the entropy bonus, on one process, and where no pass over the whole batch was made
    already (`nothing_fixed`), the update skips such completions. The loss keeps its denominators (the
    step's completions and tokens), so the gradient is the same; early in a run, when most groups are
    all wrong, most of the update's work goes. The step's token count and clip fraction still count
    them (they have no clipped tokens); its entropy is over the completions that ran."""
    grpo = run.recipe.grpo
    if not nothing_fixed or grpo.kl_beta > 0 or grpo.entropy_bonus or run.world.active \
            or grpo.loss not in SURROGATE_LOSSES:
        return None
    learning = (rewarded.advantages != 0).nonzero().flatten().tolist()
    return None if len(learning) == len(rewarded.advantages) else learning


def fixed_logprobs(run: Run, rollout: Rollout, micro_batches: list[MicroBatch], clock: StepClock):
    """The log-probs fixed for the whole step: the reference's for the KL, and the sampling policy's
    when the batch is reused (updates_per_rollout > 1); None where not needed. [n, c] per micro-batch"""
    grpo = run.recipe.grpo
    ref_logp = old_logp = None
    if grpo.kl_beta > 0:
        with clock.timing("reference pass"):
            ref_logp = logprobs_no_grad(run.parallel, rollout, micro_batches, grpo.temperature, run.shared_prompts,
                                        reference=True)
    if grpo.updates_per_rollout > 1:
        with clock.timing("old-policy pass"):
            old_logp = logprobs_no_grad(run.parallel, rollout, micro_batches, grpo.temperature, run.shared_prompts,
                                        reference=False)
    return ref_logp, old_logp


def logprobs_no_grad(parallel: Parallel, rollout: Rollout, batches: list[MicroBatch], temperature: float,
                     shared_prompts: bool, reference: bool) -> list[torch.Tensor]:
    """Log-probs of each micro-batch's completions under the policy (or its reference), without
    autograd; with `shared_prompts`, the step's prompts run once for all micro-batches. [n, c] each"""
    model = parallel.policy.model
    was_training = model.training
    model.eval()
    with torch.no_grad(), parallel.gathered(reference=reference):
        out = parallel.logprobs(rollout, batches, temperature, shared_prompts, reference)
    model.train(was_training)
    return out


def rewards_and_advantages(run: Run, batch: StepBatch) -> StepRewards:
    """Wait for the rewards, add DAPO's overlong penalty, and turn them into group-relative advantages.
    Every process sees the whole step's rewards: groups stay local, batch-wide scaling does not."""
    grpo, world = run.recipe.grpo, run.world
    scores = batch.pending.result()
    rewards, overlong = step_rewards(scores.values, run.weights, batch.rollout.lengths.cpu(), grpo.max_new_tokens,
                                     grpo.overlong_buffer, grpo.overlong_penalty)  # [N], [N]
    rewards_all = world.all_gather(rewards)  # [N_all]
    advantages, zero_std = group_advantages(rewards_all, grpo.group_size, grpo.reward_scaling)  # [N_all], [B_all]
    mine = slice(world.rank * len(rewards), (world.rank + 1) * len(rewards))
    if scores.errors or scores.timeouts:
        run.console.message(f"warning: step {run.step}: {scores.errors + scores.timeouts} reward calls failed and "
                            f"scored 0 ({'; '.join(scores.messages)})")
    return StepRewards(scores=scores, rewards=rewards, rewards_all=rewards_all, zero_std=zero_std, overlong=overlong,
                       advantages=advantages[mine].to(run.policy.device, torch.float32))


def apply_update(run: Run, batch: UpdateBatch, rewarded: StepRewards, stats: UpdateStats) -> UpdateStats:
    """The clipped policy-gradient updates, or none when a reward is not finite (the schedule still advances)."""
    if torch.isfinite(rewarded.rewards_all).all():
        return update_policy(run.parallel, run.optimizer, run.scheduler, run.recipe, batch, stats)
    run.scheduler.step()
    stats.losses.append(float("nan"))
    stats.grad_norms.append(float("nan"))
    stats.problems.append("rewards")
    return stats


def gather_figures(run: Run, batch: StepBatch, rewarded: StepRewards, stats: UpdateStats) -> metrics.StepFigures:
    """The step's figures from every process."""
    return metrics.gather(run.world, rewards_all=rewarded.rewards_all, scores=rewarded.scores, rollout=batch.rollout,
                          overlong=rewarded.overlong, stats=stats, peak_memory_gib=peak_memory_gib(run.policy.device))


def peak_memory_gib(device: torch.device) -> float:
    """GPU: the peak allocated since the step began; CPU: the process's peak resident set so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def step_row(run: Run, figures: metrics.StepFigures, batch: StepBatch, rewarded: StepRewards, stats: UpdateStats,
             clock: StepClock) -> dict:
    grpo, spent = run.recipe.grpo, clock.seconds
    seconds = {"step": spent["step"], "rollout": spent["rollout"], "score": spent["scoring"],
               "update": sum(spent.get(phase, 0.0) for phase in ("reference pass", "old-policy pass", "update"))}
    return metrics.step_row(run.step, figures, rule_keys=run.rule_keys, group_size=grpo.group_size,
                            zero_std=rewarded.zero_std, stats=stats, lr=run.optimizer.param_groups[0]["lr"],
                            sampled=batch, dynamic_sampling=grpo.dynamic_sampling,
                            overlong_on=bool(grpo.overlong_buffer), seconds=seconds,
                            elapsed=time.perf_counter() - run.started, correction=grpo.correction)


def log_step(run: Run, row: dict, figures: metrics.StepFigures, batch: StepBatch, rewarded: StepRewards,
             stats: UpdateStats) -> None:
    """metrics.jsonl, the console (with the step's best and worst completion, and warnings: non-finite
    values, completions cut off at max_new_tokens, sampler and trainer apart), and samples.jsonl when due."""
    output = run.recipe.output
    run.log.metrics(row)
    best, worst = int(figures.rewards.argmax()), int(figures.rewards.argmin())
    run.console.step(row, (figures.texts[best], figures.rewards[best].item()),
                     (figures.texts[worst], figures.rewards[worst].item()))
    if stats.problems:
        run.console.message(f"warning: step {run.step}: non-finite {', '.join(stats.problems)}; update skipped")
    truncation = run.truncation.check(run.step, figures.truncated, run.recipe.grpo.max_new_tokens)
    if truncation:
        run.console.message(truncation)
    mismatch = run.mismatch.check(run.step, row, run.recipe.grpo.sampler_correction)
    if mismatch:
        run.console.message(mismatch)
    if run.step == 1 or run.step % output.samples_every == 0:
        run.log.samples(sample_rows(run, batch, rewarded))


def sample_rows(run: Run, batch: StepBatch, rewarded: StepRewards) -> list[dict]:
    """samples.jsonl's rows: the first output.samples_groups groups, each completion with its rewards."""
    group_size, rule_keys = run.recipe.grpo.group_size, run.rule_keys
    rows = []
    for i in range(min(run.recipe.output.samples_groups, len(batch.examples)) * group_size):
        example = batch.examples[i // group_size]
        rows.append({
            "step": run.step, "group": i // group_size, "prompt": example.prompt, "answer": example.answer,
            "completion": batch.rollout.texts[i], "rewards": dict(zip(rule_keys, rewarded.scores.values[i].tolist())),
            "reward": rewarded.rewards[i].item(), "advantage": rewarded.advantages[i].item(),
        })
    return rows
