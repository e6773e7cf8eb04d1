"""When a run saves: every save_every steps, at the last step, when stopping, and when an evaluation finds a
new best (output.keep_best); and, when a step fails before its weights changed, the state it started from.

Every process takes part in a save (the weights and the optimizer's state are gathered); the first writes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from grpo_cli.checkpoint import locating, retention, store as checkpoint
from grpo_cli.checkpoint.layout import checkpoint_dir
from grpo_cli.config.recipe import dump
from grpo_cli.run.setup import Run


def save_checkpoint(run: Run, step: int, rng: dict | None = None) -> Path:
    """Save the run's state as checkpoint `step`; `rng`: the RNG state to record, default the current one."""
    parallel = run.parallel
    model_state = parallel.model_state() if parallel.strategy == "fsdp" else None  # sharded: gathered whole
    optimizer_state = parallel.optimizer_state(run.optimizer)
    if parallel.world.main:
        checkpoint.save(run.run_dir, step, parallel.policy, optimizer_state, run.scheduler, run.trainer_state(),
                        dump(run.recipe), rng=rng, keep_last=run.recipe.output.keep_last, model_state=model_state)
    parallel.world.barrier()  # resume or export may read it next
    return checkpoint_dir(run.run_dir, step)


def save_if_due(run: Run, stop: bool) -> None:
    """Every save_every steps, at the last, and when stopping (unless keep_best saved this step already)."""
    if run.last_saved == checkpoint_dir(run.run_dir, run.step):
        return
    if run.step % run.recipe.output.save_every == 0 or run.step == run.recipe.train.steps or stop:
        run.last_saved = save_checkpoint(run, run.step)


def record_best_if_improved(run: Run, accuracy: float) -> None:
    """keep_best: when this evaluation beats every earlier one after a step (a tie keeps the earlier), the weights
    it evaluated become the best checkpoint: saved now unless this step already was, then marked on disk."""
    if not run.recipe.output.keep_best or (run.best is not None and accuracy <= run.best["accuracy"]):
        return
    if run.last_saved != checkpoint_dir(run.run_dir, run.step):
        run.last_saved = save_checkpoint(run, run.step)
    if run.world.main:
        retention.mark_best(run.run_dir, run.step, accuracy, len(run.eval_set.items), run.recipe.output.keep_last)
    run.world.barrier()
    run.best = {"step": run.step, "checkpoint": run.last_saved.name, "accuracy": accuracy,
                "n": len(run.eval_set.items)}


@dataclass(frozen=True)
class Undo:
    """What a step changes before its weights do: the RNG streams and the data order."""

    rng: dict
    order: dict


def save_step_undone(run: Run, undo: Undo) -> Path | None:
    """Save the state the current step started from, when none of it was applied: it is step - 1's."""
    step = run.step
    if step <= 1 or locating.latest(run.run_dir) == checkpoint_dir(run.run_dir, step - 1):
        return run.last_saved  # nothing trained yet, or that state is saved already
    run.order.restore(undo.order)
    return save_checkpoint(run, step - 1, rng=undo.rng)
