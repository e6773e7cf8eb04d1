"""`train(recipe)`: the GRPO loop, top to bottom.

Each step: take prompts_per_step prompts, sample group_size completions of each
(rollout), score them with the recipe's rules, turn rewards into group-relative
advantages, then take updates_per_rollout clipped policy-gradient steps on that
batch. Metrics go to metrics.jsonl every step; the held-out set is evaluated at
the start, every eval_every steps and at the end; checkpoints every save_every.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from grpo_cli.run import allocator
from grpo_cli.checkpoint import store as checkpoint
from grpo_cli.model import lora_linear
from grpo_cli.run import metrics
from grpo_cli.run import threads
from grpo_cli.checkpoint.store import rng_state
from grpo_cli.update.advantages import group_advantages, overlong_penalty, total_reward
from grpo_cli.update.batching import AUTO_TOKENS, SPREAD, MicroBatch, split
from grpo_cli.run.console import TrainConsole
from grpo_cli.data.examples import Example, Examples, PromptOrder, load_examples
from grpo_cli.distributed.parallel import Parallel
from grpo_cli.distributed.world import World, check_recipe, connect, disconnect
from grpo_cli.run.guard import NAMES, Dropped, Interrupts, NonFiniteGuard, Stopped, out_of_memory, terminate_at_once
from grpo_cli.run.evaluation import evaluate
from grpo_cli.model.logprobs import can_share_prompts
from grpo_cli.update.loss import SURROGATE_LOSSES
from grpo_cli.model.loading import load_policy
from grpo_cli.data.prompt_room import fit_to_context, resolve_max_new_tokens, with_max_new_tokens
from grpo_cli.config.recipe import AUTO_MAX_NEW_TOKENS_CAP, MIN_AUTO_MAX_NEW_TOKENS, Recipe, dump
from grpo_cli.config.recipe import load as load_recipe
from grpo_cli.rewards.rules import rule_functions
from grpo_cli.rollout.sampling import Rollout
from grpo_cli.rollout.settings import Sampling
from grpo_cli.rollout.with_tools import ToolSession, isolation_note, open_session
from grpo_cli.run.step_batch import StepBatch, sample_step
from grpo_cli.run.directory import prepare_run_dir, write_recipe
from grpo_cli.run.log import METRICS, RunLog, read_jsonl, tensorboard_writer
from grpo_cli.rewards.scoring import GRADERS, Scorer, Scores, refuse_inside_a_starting_worker
from grpo_cli.run.lock import RunLock
from grpo_cli.update.policy import UpdateBatch, UpdateStats, apply_optimizer_settings, make_optimizer, update_policy


OUT_OF_MEMORY = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)
# A completion cut off at grpo.max_new_tokens rarely holds an answer: it scores nothing and teaches
# little. A cap that cuts off most completions is the commonest silent failure of GRPO runs, so more
# than this share of a step's completions hitting it gets a warning.
TRUNCATION_WARN_FRAC = 0.10
TRUNCATION_WARN_EVERY = 10  # steps at least between two such warnings while it goes on


@dataclass(kw_only=True, frozen=True)
class RunSummary:
    run_dir: Path
    step: int
    checkpoint: Path | None
    eval_first: float | None  # held-out accuracy at the first evaluation of the run's history
    eval_last: float | None
    best: dict | None  # checkpoint.read_best's marker: the checkpoint with the highest held-out accuracy
    seconds: float


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Without deterministic kernels, two CPU threads were enough for two runs of the quickstart
    # to drift apart in the last float bit by step 4 (final accuracy 60.5-61.5% over three runs).
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read at the first cuBLAS call
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    # Deterministic mode also fills every new uninitialized tensor with NaN, a debugging aid that
    # changes no result of code that writes before it reads: ~6000 fills a step on the bench
    # (~8 ms of a 0.32 s CPU step). Off; the determinism test still holds.
    torch.utils.deterministic.fill_uninitialized_memory = False


@dataclass
class TruncationWatch:
    """Whether a step's truncation is worth a warning: the first step over TRUNCATION_WARN_FRAC, then at
    most every TRUNCATION_WARN_EVERY steps while it goes on, counting the steps over it in between."""

    last_warned: int | None = None
    steps_over: int = 0  # steps over the threshold since the last warning

    def check(self, step: int, truncated: torch.Tensor, max_new_tokens: int) -> str | None:
        """The warning for `step`, or None. truncated: [N_all] 1.0 where a completion (any process's) hit the cap."""
        cut, total = int(truncated.sum().item()), truncated.numel()
        if total == 0 or cut <= TRUNCATION_WARN_FRAC * total:
            return None
        self.steps_over += 1
        if self.last_warned is not None and step - self.last_warned < TRUNCATION_WARN_EVERY:
            return None
        since = "" if self.last_warned is None else \
            f" ({self.steps_over} of the {step - self.last_warned} steps since step {self.last_warned} did)"
        self.last_warned, self.steps_over = step, 0
        return (f"warning: step {step}: {cut} of {total} completions ({cut / total:.0%}) hit grpo.max_new_tokens "
                f"({max_new_tokens}) before ending{since}: a cut-off completion rarely holds an answer, so it scores "
                "nothing and teaches little. Raise grpo.max_new_tokens, or shorten the completions: the rules that "
                "reward long answers, or the prompt (data.template, data.system_prompt) that asks for them.")


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


def peak_memory_gib(device: torch.device) -> float:
    """GPU: the peak allocated since the step began; CPU: the process's peak resident set so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def sample_rows(step: int, batch: list[Example], rollout: Rollout, rule_names: list[str], scores: np.ndarray,
                rewards: torch.Tensor, advantages: torch.Tensor, groups: int, group_size: int) -> list[dict]:
    rows = []
    for i in range(min(groups, len(batch)) * group_size):
        example = batch[i // group_size]
        rows.append({
            "step": step, "group": i // group_size, "prompt": example.prompt, "answer": example.answer,
            "completion": rollout.texts[i], "rewards": dict(zip(rule_names, scores[i].tolist())),
            "reward": rewards[i].item(), "advantage": advantages[i].item(),
        })
    return rows


def run_eval(step: int, parallel: Parallel, eval_set: Examples, recipe: Recipe, scorer: Scorer, log: RunLog,
             console: TrainConsole, tools: ToolSession | None = None) -> float:
    """Greedy accuracy on the held-out set (with the run's tool, if it has one); several processes each
    take every size-th item of it."""
    world, policy = parallel.world, parallel.policy
    rank_items = eval_set.items[world.rank :: world.size]
    with parallel.gathered():
        sampling = Sampling.for_evaluation(recipe.grpo.max_new_tokens, add_special_tokens=not recipe.data.chat)
        report = evaluate(policy.model, policy.tokenizer, rank_items, sampling, scorer,
                          sampler=lambda tokenizer, prompts, sampling: parallel.generate(tokenizer, prompts, sampling,
                                                                                         tools, lockstep=False))
    correct = world.all_gather_objects([c for item in report.items for c in item.correct])
    accuracy, seconds = sum(correct) / len(correct), world.reduce(report.seconds, "max")
    timeouts = int(world.reduce(report.timeouts))
    log.metrics({"step": step, "eval/accuracy": accuracy, "eval/n": len(correct), "eval/seconds": seconds,
                 "eval/timeouts": timeouts})
    console.evaluation(step, accuracy, len(correct), seconds, timeouts)
    return accuracy


def save_checkpoint(run_dir: Path, step: int, parallel: Parallel, optimizer, scheduler, trainer_state: dict,
                    recipe: Recipe, rng: dict | None = None) -> Path:
    """Every process takes part in gathering the state (sharded weights, the optimizer's); the first writes."""
    sharded = parallel.strategy == "fsdp"
    model_state = parallel.model_state() if sharded else None
    optimizer_state = parallel.optimizer_state(optimizer)
    if parallel.world.main:
        checkpoint.save(run_dir, step, parallel.policy, optimizer_state, scheduler, trainer_state, dump(recipe),
                        rng=rng, keep_last=recipe.output.keep_last, model_state=model_state)
    parallel.world.barrier()  # resume or export may read it next
    return checkpoint.checkpoint_dir(run_dir, step)


def train(recipe: Recipe, resume: bool = False, recipe_dir: Path | None = None,
          console: TrainConsole | None = None, recipe_file: Path | None = None) -> RunSummary:
    """Run the recipe; with resume, continue from the run directory's latest checkpoint.
    `recipe_file`: the YAML the recipe came from, which the run never overwrites.

    Under torchrun each process runs this with its part of every step (see distributed.py)."""
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


@dataclass(kw_only=True)
class Run:
    """What the loop works with, set up once by `set_up`; `step` and `last_saved` move as it runs."""

    recipe: Recipe
    run_dir: Path
    world: World
    parallel: Parallel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    order: PromptOrder
    train_set: Examples
    eval_set: Examples | None
    log: RunLog
    console: TrainConsole
    rule_keys: list[str]  # the recipe's rules, in order (their weights are `weights`)
    scored_rules: list[str]  # rule_keys, plus correctness for the accuracy figure
    rule_fns: dict
    weights: torch.Tensor  # [R]
    shared_prompts: bool  # a step's prompts run once for all its micro-batches (logprobs.can_share_prompts)
    step: int  # the last step taken
    last_saved: Path | None
    best: dict | None  # the best checkpoint's marker (checkpoint.read_best), kept on disk for resume
    started: float  # perf_counter() when the process began training
    truncation: TruncationWatch = field(default_factory=TruncationWatch)
    tools: ToolSession | None = None  # with grpo.tools: the sandbox, open while the loop runs
    cpu_threads: threads.Watch | None = None  # on the CPU: torch's thread count, kept to the CPUs free

    @property
    def policy(self):
        return self.parallel.policy

    def trainer_state(self) -> dict:
        state = {"data": self.order.state(), "base_model": self.recipe.model.name}
        if self.cpu_threads is not None:  # a deterministic run resumes with the count it had
            state["cpu_threads"] = self.cpu_threads.threads
        return state


def _train(recipe: Recipe, resume: bool, recipe_dir: Path | None, console: TrainConsole, world: World,
           recipe_file: Path | None = None) -> RunSummary:
    """The loop: a handful of named phases per step, each a function below with a typed result."""
    grpo = recipe.grpo
    # the sandbox before the model: a machine that cannot confine the code refuses before anything heavy loads
    with open_session(grpo.tools, grpo.max_tool_calls, grpo.tool_timeout_s, grpo.tool_memory_mb) as tools:
        run = set_up(recipe, resume, recipe_dir, console, world, recipe_file)
        run.tools = tools
        guard = NonFiniteGuard(recipe.train.max_bad_steps)
        with Scorer({**GRADERS, **run.rule_fns}) as scorer, Interrupts(console.message, not world.active) as interrupts:
            if run.tools is not None:
                console.message(f"tool python: each call sandboxed ({isolation_note(run.tools)})")
            if run.eval_set is not None and run.step == 0:
                first_evaluation(run, scorer, interrupts)
            console.start(recipe.train.steps, run.step)
            try:
                while run.step < recipe.train.steps:
                    run.step += 1
                    batch, scored, stats, clock = take_step(run, scorer, interrupts)
                    figures = metrics.gather(run.world, rewards_all=scored.rewards_all, scores=scored.scores,
                                             rollout=batch.rollout, overlong=scored.overlong, stats=stats,
                                             peak_memory_gib=peak_memory_gib(run.policy.device))
                    row = step_row(run, figures, batch, scored, stats, clock)
                    log_step(run, row, figures, batch, scored, stats)
                    guard.record(run.step, stats.problems, run.last_saved)
                    if run.cpu_threads is not None:
                        run.cpu_threads.recheck(console.message)
                    evaluate_if_due(run, scorer, interrupts)
                    # Ctrl-C or SIGTERM on any process stops all
                    stop = run.world.reduce(float(interrupts.requested), "max") > 0
                    save_if_due(run, stop)
                    if stop and run.step < recipe.train.steps:
                        signum = interrupts.signum or signal.SIGINT
                        raise Stopped(f"stopped by {NAMES[signum]} after step {run.step}; saved {run.last_saved}. "
                                      "Continue with the same command and --resume.", signum)
            finally:
                console.stop()
                run.log.close()

    evals = [r["eval/accuracy"] for r in read_jsonl(run.run_dir / METRICS) if "eval/accuracy" in r]
    return RunSummary(run_dir=run.run_dir, step=run.step, checkpoint=run.last_saved,
                      eval_first=evals[0] if evals else None, eval_last=evals[-1] if evals else None,
                      best=run.best, seconds=time.perf_counter() - run.started)


def set_up(recipe: Recipe, resume: bool, recipe_dir: Path | None, console: TrainConsole, world: World,
           recipe_file: Path | None) -> Run:
    """The run directory, the model, the data, the optimizer; restored from the checkpoint when resuming."""
    started = time.perf_counter()
    run_dir = Path(recipe.output.dir)
    grpo = recipe.grpo
    rule_keys = [r.key for r in recipe.rewards]
    rule_fns = rule_functions(recipe.rewards, recipe_dir)  # imports custom rules now, before any model loads
    tensorboard = resume_from = None
    if world.main:
        resume_from = prepare_run_dir(run_dir, recipe, resume, console.message, recipe_file)
        tensorboard = tensorboard_writer(run_dir / "tensorboard") if recipe.output.tensorboard else None
    world.barrier()  # the run directory is ready
    # Every process resumes from the checkpoint the first one verified (it may have skipped a damaged one).
    resume_from = world.all_gather_objects([resume_from])[0]
    seed_everything(recipe.train.seed, recipe.train.deterministic)

    policy = load_policy(recipe.model, grpo.kl_beta, progress=console.message, device=world.device(recipe.model.device))
    if policy.device.type == "cpu":
        allocator.keep_freed_memory()  # the step's activations reused warm (see allocator.py)
    chat = recipe.data.chat
    train_set = load_examples(recipe.data.train, recipe.data, policy.tokenizer, recipe_dir)
    if grpo.max_new_tokens == "auto":
        recipe = max_new_tokens_of_the_run(recipe, train_set, policy, resume_from, console)
        grpo = recipe.grpo
        if world.main:
            write_recipe(run_dir, recipe, recipe_file)  # now with what auto resolved to (eval, export read it)
    train_set, too_long = fit_to_context(train_set, policy.tokenizer, policy.model.config, grpo.max_new_tokens,
                                           not chat)
    eval_set = None
    if recipe.data.eval is not None:
        eval_set = load_examples(recipe.data.eval, recipe.data, policy.tokenizer, recipe_dir)
        if recipe.data.eval_limit:
            eval_set = replace(eval_set, items=eval_set.items[: recipe.data.eval_limit])
    console.message(
        f"model {recipe.model.name} on {policy.device} ({str(policy.dtype).removeprefix('torch.')})"
        + (f" x {world.size} processes" if world.active else "") + ", "
        f"{sum(p.numel() for p in policy.trainable_parameters()):,} trainable parameters; "
        f"train set {train_set.name}: {len(train_set.items)} prompts"
        + (f" ({train_set.skip_note()})" if train_set.skipped else "")
        + (f" ({too_long} prompts too long for the context skipped)" if too_long else "")
    )
    if eval_set is None:
        console.message("no held-out evaluation: data.eval is null (unset, it follows only a builtin training "
                        "set). Set data.eval to a held-out file, builtin set or hub dataset to measure accuracy "
                        "as training goes.")
    if resume_from is not None:
        checkpoint.restore_weights(resume_from, policy)  # before sharding: into whole tensors
    fast = grpo.engine == "fast"
    if fast:
        lora_linear.install(policy.model)  # LoRA layers trained in fewer passes; the plain engine keeps PEFT's
    parallel = Parallel(policy, world, recipe.distributed.strategy)
    optimizer, scheduler = make_optimizer(policy.trainable_parameters(), recipe.train,
                                          recipe.train.steps * grpo.updates_per_rollout)
    order = PromptOrder(len(train_set.items), recipe.train.seed)
    step = 0
    if resume_from is not None:
        state = checkpoint.restore_training(resume_from, parallel, optimizer, scheduler)
        apply_optimizer_settings(optimizer, scheduler, recipe.train)  # a changed lr or weight decay takes effect
        step = state["step"]
        order.restore(state["data"])
        console.message(f"resuming from {resume_from} (step {step})")
    cpu_threads = None
    if policy.device.type == "cpu":  # chosen once the resumed state says what the run used
        cpu_threads = threads.apply(console.message if world.main else None,
                                    processes=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
                                    deterministic=recipe.train.deterministic,
                                    resumed=state.get("cpu_threads") if resume_from is not None else None)
    best = known_best(run_dir, recipe, world, step if resume_from is not None else None, console)
    policy.model.train()
    return Run(
        recipe=recipe, run_dir=run_dir, world=world, parallel=parallel, optimizer=optimizer, scheduler=scheduler,
        order=order, train_set=train_set, eval_set=eval_set, console=console,
        log=RunLog(run_dir, resume_step=step if resume else None, tensorboard=tensorboard, enabled=world.main),
        rule_keys=rule_keys, scored_rules=rule_keys + ([] if "correctness" in rule_keys else ["correctness"]),
        rule_fns=rule_fns, weights=torch.tensor([r.weight for r in recipe.rewards], dtype=torch.float64),
        # FSDP2 reduce-scatters once per unit per backward; a shared-prompt pass calls each layer twice and
        # only when a micro-batch repeats a prompt, which would differ between processes.
        shared_prompts=fast and can_share_prompts(policy.model) and parallel.strategy != "fsdp",
        step=step, last_saved=resume_from, best=best, started=started, cpu_threads=cpu_threads,
    )


def max_new_tokens_of_the_run(recipe: Recipe, train_set: Examples, policy, resume_from: Path | None,
                              console: TrainConsole) -> Recipe:
    """grpo.max_new_tokens: auto resolved: for a new run, from the training prompts and the model's context;
    resuming, the number the run started with (in its checkpoint's recipe), so the run trains as it began."""
    if resume_from is not None:
        saved = load_recipe(resume_from / checkpoint.RECIPE_FILE).grpo.max_new_tokens
        if saved != "auto":
            console.message(f"grpo.max_new_tokens: auto, {saved} as when the run started")
            return with_max_new_tokens(recipe, saved)
    recipe = resolve_max_new_tokens(recipe, train_set, policy.tokenizer, policy.model.config)
    context = getattr(policy.model.config, "max_position_embeddings", None)
    why = (f"the model's {context}-token context left after the longest training prompt that leaves at least "
           f"{MIN_AUTO_MAX_NEW_TOKENS}") if context else "the model's config states no context"
    console.message(f"grpo.max_new_tokens: auto -> {recipe.grpo.max_new_tokens} ({why}, at most "
                    f"{AUTO_MAX_NEW_TOKENS_CAP})")
    return recipe


def known_best(run_dir: Path, recipe: Recipe, world: World, resumed_step: int | None, console: TrainConsole):
    """The best checkpoint a resumed run already has. Forgotten (its marker removed) when the run starts over,
    when keep_best is off, or when it is newer than the checkpoint resumed from (resume skipped a damaged one):
    those steps are trained again and their checkpoints replaced, so the marker would name other weights."""
    if world.main and resumed_step is None:
        checkpoint.forget_best(run_dir)  # unread: whatever a marker left here says, it names no checkpoint of this run
    best = checkpoint.read_best(run_dir) if world.main and resumed_step is not None else None
    if best is not None and (not recipe.output.keep_best or best["step"] > resumed_step):
        if recipe.output.keep_best:
            console.message(f"the best checkpoint, {best['checkpoint']}, is newer than the one resumed from: "
                            "forgotten; the steps after it are trained again and the best found anew.")
        checkpoint.forget_best(run_dir)
        best = None
    return world.all_gather_objects([best])[0]


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
class Scored:
    """The score phase's result: rewards and group-relative advantages."""

    scores: Scores  # this process's completions, per rule
    rewards: torch.Tensor  # [N] total rewards, overlong penalty included
    rewards_all: torch.Tensor  # [N_all] every process's, in rank order
    advantages: torch.Tensor  # [N] this process's, on the policy's device
    zero_std: torch.Tensor  # [B_all] groups whose rewards are all equal
    overlong: torch.Tensor  # [N] the overlong penalty


def take_step(run: Run, scorer: Scorer, interrupts: Interrupts) -> tuple[StepBatch, Scored, UpdateStats, StepClock]:
    """sample -> fixed log-probs -> score and advantages -> update. A SIGTERM during the rollout, or
    running out of memory before the weights changed, saves the state the step started from."""
    grpo, step = run.recipe.grpo, run.step
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
            scored = score(run, batch)
        learning = rows_with_gradient(run, scored, ref_logp is None and old_logp is None)
        if learning is not None:
            micro_batches = micro_batches_of(run, batch.rollout, learning)
        with clock.timing("update"):
            update(run, UpdateBatch(rollout=batch.rollout, micro_batches=micro_batches, advantages=scored.advantages,
                                    ref_logp=ref_logp, old_logp=old_logp, shared_prompts=run.shared_prompts),
                   scored, stats)
        clock.stop()
    except Dropped:
        saved = save_step_undone(run, undo)
        raise Stopped(f"stopped by SIGTERM during step {step}, whose rollout was dropped; "
                      + (f"saved {saved}. Continue with the same command and --resume." if saved else
                         "nothing was trained yet, so nothing was saved."), signal.SIGTERM) from None
    except OUT_OF_MEMORY:
        saved = save_step_undone(run, undo) if stats.applied == 0 else None  # else the weights moved: not step - 1's
        raise out_of_memory(clock.phase, step, grpo, saved or run.last_saved) from None
    return batch, scored, stats, clock


def micro_batches_of(run: Run, rollout: Rollout, only: list[int] | None = None) -> list[MicroBatch]:
    """Micro-batches of similar length (the fast engine also bounds their tokens); `only`: these rows."""
    grpo = run.recipe.grpo
    if grpo.engine == "fast":
        return split(rollout, grpo.micro_batch_size, AUTO_TOKENS, SPREAD, only=only)
    return split(rollout, grpo.micro_batch_size, only=only)


def rows_with_gradient(run: Run, scored: Scored, nothing_fixed: bool) -> list[int] | None:
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
    learning = (scored.advantages != 0).nonzero().flatten().tolist()
    return None if len(learning) == len(scored.advantages) else learning


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


def score(run: Run, batch: StepBatch) -> Scored:
    """Wait for the rewards, add DAPO's overlong penalty, and turn them into group-relative advantages.
    Every process sees the whole step's rewards: groups stay local, batch-wide scaling does not."""
    grpo, world = run.recipe.grpo, run.world
    scores = batch.pending.result()
    overlong = overlong_penalty(batch.rollout.lengths.cpu(), grpo.max_new_tokens, grpo.overlong_buffer,
                                grpo.overlong_penalty)  # [N]
    rewards = total_reward(scores.values[:, : len(run.rule_keys)], run.weights) + overlong  # [N]
    rewards_all = world.all_gather(rewards)  # [N_all]
    advantages, zero_std = group_advantages(rewards_all, grpo.group_size, grpo.reward_scaling)  # [N_all], [B_all]
    mine = slice(world.rank * len(rewards), (world.rank + 1) * len(rewards))
    if scores.errors or scores.timeouts:
        run.console.message(f"warning: step {run.step}: {scores.errors + scores.timeouts} reward calls failed and "
                            f"scored 0 ({'; '.join(scores.messages)})")
    return Scored(scores=scores, rewards=rewards, rewards_all=rewards_all, zero_std=zero_std, overlong=overlong,
                  advantages=advantages[mine].to(run.policy.device, torch.float32))


def update(run: Run, batch: UpdateBatch, scored: Scored, stats: UpdateStats) -> UpdateStats:
    """The clipped policy-gradient updates, or none when a reward is not finite (the schedule still advances)."""
    if torch.isfinite(scored.rewards_all).all():
        return update_policy(run.parallel, run.optimizer, run.scheduler, run.recipe, batch, stats)
    run.scheduler.step()
    stats.losses.append(float("nan"))
    stats.grad_norms.append(float("nan"))
    stats.problems.append("rewards")
    return stats


def step_row(run: Run, figures: metrics.StepFigures, batch: StepBatch, scored: Scored, stats: UpdateStats,
             clock: StepClock) -> dict:
    grpo = run.recipe.grpo
    seconds = {"step": clock.seconds["step"], "rollout": clock.seconds["rollout"], "score": clock.seconds["scoring"]}
    return metrics.step_row(run.step, figures, rule_keys=run.rule_keys, group_size=grpo.group_size,
                            zero_std=scored.zero_std, stats=stats, lr=run.scheduler.get_last_lr()[0], sampled=batch,
                            dynamic_sampling=grpo.dynamic_sampling, overlong_on=bool(grpo.overlong_buffer),
                            seconds=seconds, elapsed=time.perf_counter() - run.started)


def log_step(run: Run, row: dict, figures: metrics.StepFigures, batch: StepBatch, scored: Scored,
             stats: UpdateStats) -> None:
    """metrics.jsonl, the console (with the step's best and worst completion, and warnings: non-finite
    values, completions cut off at max_new_tokens), and samples.jsonl when due."""
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
    if run.step == 1 or run.step % output.samples_every == 0:
        run.log.samples(sample_rows(run.step, batch.examples, batch.rollout, run.rule_keys, scored.scores.values,
                                    scored.rewards, scored.advantages, output.samples_groups,
                                    run.recipe.grpo.group_size))


def first_evaluation(run: Run, scorer: Scorer, interrupts: Interrupts) -> None:
    try:
        with interrupts.droppable():
            run_eval(0, run.parallel, run.eval_set, run.recipe, scorer, run.log, run.console, run.tools)
    except Dropped:
        raise Stopped("stopped by SIGTERM during the first evaluation, before any training step; nothing to "
                      "save. Run the same command again to start.", signal.SIGTERM) from None


def evaluate_if_due(run: Run, scorer: Scorer, interrupts: Interrupts) -> None:
    """Every eval_every steps and at the last; a SIGTERM drops the evaluation (the step is trained and
    logged: it is saved and the run stops after)."""
    steps, every = run.recipe.train.steps, run.recipe.output.eval_every
    if run.eval_set is None or not (run.step % every == 0 or run.step == steps):
        return
    try:
        with interrupts.droppable():
            accuracy = run_eval(run.step, run.parallel, run.eval_set, run.recipe, scorer, run.log, run.console,
                                run.tools)
    except Dropped:
        return
    record_best_if_improved(run, accuracy)


def record_best_if_improved(run: Run, accuracy: float) -> None:
    """keep_best: when this evaluation beats every earlier one after a step (a tie keeps the earlier), the weights
    it evaluated become the best checkpoint: saved now unless this step already was, then marked on disk."""
    if not run.recipe.output.keep_best or (run.best is not None and accuracy <= run.best["accuracy"]):
        return
    if run.last_saved != checkpoint.checkpoint_dir(run.run_dir, run.step):
        run.last_saved = save_checkpoint(run.run_dir, run.step, run.parallel, run.optimizer, run.scheduler,
                                         run.trainer_state(), run.recipe)
    if run.world.main:
        checkpoint.mark_best(run.run_dir, run.step, accuracy, len(run.eval_set.items), run.recipe.output.keep_last)
    run.world.barrier()
    run.best = {"step": run.step, "checkpoint": run.last_saved.name, "accuracy": accuracy,
                "n": len(run.eval_set.items)}


def save_if_due(run: Run, stop: bool) -> None:
    """Every save_every steps, at the last, and when stopping (unless keep_best saved this step already)."""
    every = run.recipe.output.save_every
    if run.last_saved == checkpoint.checkpoint_dir(run.run_dir, run.step):
        return
    if run.step % every == 0 or run.step == run.recipe.train.steps or stop:
        run.last_saved = save_checkpoint(run.run_dir, run.step, run.parallel, run.optimizer, run.scheduler,
                                         run.trainer_state(), run.recipe)


@dataclass(frozen=True)
class Undo:
    """What a step changes before its weights do: the RNG streams and the data order."""

    rng: dict
    order: dict


def save_step_undone(run: Run, undo: Undo) -> Path | None:
    """Save the state the current step started from, when none of it was applied: it is step - 1's."""
    step = run.step
    if step <= 1 or checkpoint.latest(run.run_dir) == checkpoint.checkpoint_dir(run.run_dir, step - 1):
        return run.last_saved  # nothing trained yet, or that state is saved already
    run.order.restore(undo.order)
    return save_checkpoint(run.run_dir, step - 1, run.parallel, run.optimizer, run.scheduler, run.trainer_state(),
                           run.recipe, rng=undo.rng)
