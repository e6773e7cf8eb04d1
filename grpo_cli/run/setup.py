"""`set_up`: everything a training run works with, as one `Run`: the run directory, the model, the data, the
optimizer, restored from the checkpoint when resuming. The loop (train.py) then only moves `run.step`."""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from grpo_cli.checkpoint import retention, store as checkpoint
from grpo_cli.checkpoint.layout import RECIPE_FILE
from grpo_cli.config.recipe import AUTO_MAX_NEW_TOKENS_CAP, MIN_AUTO_MAX_NEW_TOKENS, Recipe
from grpo_cli.config.recipe import load as load_recipe
from grpo_cli.data.examples import Examples, PromptOrder, load_examples
from grpo_cli.data.prompt_room import fit_to_context, resolve_max_new_tokens, with_max_new_tokens
from grpo_cli.distributed.parallel import Parallel
from grpo_cli.distributed.world import World
from grpo_cli.model import lora_linear
from grpo_cli.model.loading import load_policy
from grpo_cli.model.logprobs import can_share_prompts
from grpo_cli.rewards.rules import rule_functions
from grpo_cli.rollout.with_tools import ToolSession
from grpo_cli.run import allocator, threads
from grpo_cli.run.console import TrainConsole
from grpo_cli.run.directory import prepare_run_dir, write_recipe
from grpo_cli.run.log import RunLog
from grpo_cli.run.mismatch_watch import MismatchWatch
from grpo_cli.run.truncation import TruncationWatch
from grpo_cli.trackers.sink import check_installed
from grpo_cli.update.policy import apply_optimizer_settings, make_optimizer


@dataclass(kw_only=True)
class Run:
    """What the loop works with, set up once by `set_up`; `step` and `last_saved` move as it runs."""

    recipe: Recipe  # as the run trains it: grpo.max_new_tokens: auto resolved
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
    best: dict | None  # the best checkpoint's marker (retention.read_best), kept on disk for resume
    started: float  # perf_counter() when the process began training
    truncation: TruncationWatch = field(default_factory=TruncationWatch)
    mismatch: MismatchWatch = field(default_factory=MismatchWatch)
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


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # Without deterministic kernels two CPU threads are enough for two runs to drift apart in the last
    # float bit within a few steps (docs/performance.md).
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read at the first cuBLAS call
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    # Deterministic mode also fills every new uninitialized tensor with NaN, a debugging aid that changes no
    # result of code that writes before it reads, and costs thousands of fills a step. Off; the
    # determinism test still holds.
    torch.utils.deterministic.fill_uninitialized_memory = False


def set_up(recipe: Recipe, resume: bool, recipe_dir: Path | None, console: TrainConsole, world: World,
           recipe_file: Path | None) -> Run:
    """The run directory, the model, the data, the optimizer; restored from the checkpoint when resuming.
    The recipe given may say grpo.max_new_tokens: auto; the Run's has it resolved."""
    started = time.perf_counter()
    rule_fns = rule_functions(recipe.rewards, recipe_dir)  # imports custom rules now, before any model loads
    check_installed(recipe.output.trackers)  # a tracker's missing package said now, not after the model loads
    run_dir, resume_from = open_run_dir(recipe, resume, console, world, recipe_file)
    seed_everything(recipe.train.seed, recipe.train.deterministic)
    policy = load_policy(recipe.model, recipe.grpo.kl_beta, progress=console.message,
                         device=world.device(recipe.model.device))
    if policy.device.type == "cpu":
        allocator.keep_freed_memory()  # the step's activations reused warm (see run/allocator.py)
    train_set = load_examples(recipe.data.train, recipe.data, policy.tokenizer, recipe_dir)
    recipe = settled_recipe(recipe, train_set, policy, resume_from, run_dir, console, world, recipe_file)
    train_set, eval_set = fitted_data(recipe, train_set, policy, recipe_dir, world, console)
    if resume_from is not None:
        checkpoint.restore_weights(resume_from, policy)  # before sharding: into whole tensors
    fast = recipe.grpo.engine == "fast"
    if fast:
        lora_linear.install(policy.model)  # LoRA layers trained in fewer passes; the plain engine keeps PEFT's
    parallel = Parallel(policy, world, recipe.distributed.strategy)
    optimizer, scheduler = make_optimizer(policy.trainable_parameters(), recipe.train,
                                          recipe.train.steps * recipe.grpo.updates_per_rollout)
    order = PromptOrder(len(train_set.items), recipe.train.seed)
    state = restore_training(resume_from, recipe, parallel, optimizer, scheduler, order, console)
    step = state.get("step", 0)
    cpu_threads = None
    if policy.device.type == "cpu":  # chosen once the resumed state says what the run used
        cpu_threads = threads.apply(console.message if world.main else None,
                                    processes=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
                                    deterministic=recipe.train.deterministic, resumed=state.get("cpu_threads"))
    best = known_best(run_dir, recipe, world, step if resume_from is not None else None, console)
    policy.model.train()
    rule_keys = [r.key for r in recipe.rewards]
    return Run(
        recipe=recipe, run_dir=run_dir, world=world, parallel=parallel, optimizer=optimizer, scheduler=scheduler,
        order=order, train_set=train_set, eval_set=eval_set, console=console,
        log=RunLog(run_dir, resume_step=step if resume else None, enabled=world.main, config=recipe,
                   sinks=recipe.output.trackers, project=recipe.output.project, run_name=recipe.output.run_name,
                   notify=console.message, say=console.message),
        rule_keys=rule_keys, scored_rules=rule_keys + ([] if "correctness" in rule_keys else ["correctness"]),
        rule_fns=rule_fns, weights=torch.tensor([r.weight for r in recipe.rewards], dtype=torch.float64),
        # FSDP2 reduce-scatters once per unit per backward; a shared-prompt pass calls each layer twice and
        # only when a micro-batch repeats a prompt, which would differ between processes.
        shared_prompts=fast and can_share_prompts(policy.model) and parallel.strategy != "fsdp",
        step=step, last_saved=resume_from, best=best, started=started, cpu_threads=cpu_threads,
    )


def open_run_dir(recipe: Recipe, resume: bool, console: TrainConsole, world: World, recipe_file: Path | None):
    """(run directory, the checkpoint to resume from or None), the directory claimed by the first process; every
    process resumes from the checkpoint it verified (it may have skipped a damaged one)."""
    run_dir = Path(recipe.output.dir)
    resume_from = None
    if world.main:
        resume_from = prepare_run_dir(run_dir, recipe, resume, console.message, recipe_file)
    world.barrier()  # the run directory is ready
    return run_dir, world.all_gather_objects([resume_from])[0]


def settled_recipe(recipe: Recipe, train_set: Examples, policy, resume_from: Path | None, run_dir: Path,
                   console: TrainConsole, world: World, recipe_file: Path | None) -> Recipe:
    """The recipe as the run trains it: grpo.max_new_tokens: auto resolved, and written to the run directory
    (eval and export read it there)."""
    if recipe.grpo.max_new_tokens != "auto":
        return recipe
    recipe = max_new_tokens_of_the_run(recipe, train_set, policy, resume_from, console)
    if world.main:
        write_recipe(run_dir, recipe, recipe_file)
    return recipe


def max_new_tokens_of_the_run(recipe: Recipe, train_set: Examples, policy, resume_from: Path | None,
                              console: TrainConsole) -> Recipe:
    """grpo.max_new_tokens: auto resolved: for a new run, from the training prompts and the model's context;
    resuming, the number the run started with (in its checkpoint's recipe), so the run trains as it began."""
    if resume_from is not None:
        saved = load_recipe(resume_from / RECIPE_FILE).grpo.max_new_tokens
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


def fitted_data(recipe: Recipe, train_set: Examples, policy, recipe_dir: Path | None, world: World,
                console: TrainConsole) -> tuple[Examples, Examples | None]:
    """The training prompts that fit the context with grpo.max_new_tokens after them, and the held-out set
    (data.eval, cut to data.eval_limit); said on the console."""
    train_set, too_long = fit_to_context(train_set, policy.tokenizer, policy.model.config, recipe.grpo.max_new_tokens,
                                         not recipe.data.chat)
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
    return train_set, eval_set


def restore_training(resume_from: Path | None, recipe: Recipe, parallel: Parallel, optimizer, scheduler,
                     order: PromptOrder, console: TrainConsole) -> dict:
    """Resuming: the optimizer, the schedule and the data order as the checkpoint saved them, the recipe's
    lr and weight decay over them; the checkpoint's trainer state ({} for a new run)."""
    if resume_from is None:
        return {}
    state = checkpoint.restore_training(resume_from, parallel, optimizer, scheduler)
    apply_optimizer_settings(optimizer, scheduler, recipe.train)  # a changed lr or weight decay takes effect
    order.restore(state["data"])
    console.message(f"resuming from {resume_from} (step {state['step']})")
    return state


def known_best(run_dir: Path, recipe: Recipe, world: World, resumed_step: int | None, console: TrainConsole):
    """The best checkpoint a resumed run already has. Forgotten (its marker removed) when the run starts over,
    when keep_best is off, or when it is newer than the checkpoint resumed from (resume skipped a damaged one):
    those steps are trained again and their checkpoints replaced, so the marker would name other weights."""
    if world.main and resumed_step is None:
        retention.forget_best(run_dir)  # unread: whatever a marker left here says, it names no checkpoint of this run
    best = retention.read_best(run_dir) if world.main and resumed_step is not None else None
    if best is not None and (not recipe.output.keep_best or best["step"] > resumed_step):
        if recipe.output.keep_best:
            console.message(f"the best checkpoint, {best['checkpoint']}, is newer than the one resumed from: "
                            "forgotten; the steps after it are trained again and the best found anew.")
        retention.forget_best(run_dir)
        best = None
    return world.all_gather_objects([best])[0]
