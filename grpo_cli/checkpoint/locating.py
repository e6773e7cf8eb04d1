"""Finding the checkpoint a command means: a run's latest, the newest intact one to resume from, the one a path
names (grpo eval, grpo export), the run's best (--best). Whatever is about to be loaded is verified first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from grpo_cli.checkpoint.layout import MANIFEST, RECIPE_FILE, STATE_FILE
from grpo_cli.checkpoint.manifest import complete_checkpoints, is_complete, why_incomplete
from grpo_cli.checkpoint.retention import read_best
from grpo_cli.checkpoint.verification import DamagedCheckpoint, verify
from grpo_cli.errors import UserError


def latest(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None. Contents not checked: see latest_intact."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def latest_intact(run_dir: Path, warn: Callable[[str], None]) -> Path | None:
    """The checkpoint to resume from: the newest complete one whose contents verify, or None when
    the run has no complete checkpoint.

    Each newer damaged one is skipped with a warning (one paragraph, passed to `warn`) naming it and
    its damaged files; it is left in place (a later save of its step replaces it). When every complete
    checkpoint is damaged, a UserError: starting over would silently drop the run's progress."""
    damaged: list[DamagedCheckpoint] = []
    for path in reversed(complete_checkpoints(run_dir)):
        try:
            verify(path)
        except DamagedCheckpoint as exc:
            damaged.append(exc)
            continue
        for exc in damaged:
            warn(f"warning: skipped the damaged checkpoint {exc.path}: {exc.what()}. Resuming from {path.name}, "
                 f"the newest intact checkpoint, instead; {exc.path.name} is left in place (a later save of that "
                 "step replaces it).")
        return path
    if damaged:
        raise UserError(
            f"every checkpoint in {run_dir / 'checkpoints'} is damaged, so there is nothing to resume from: "
            + "; ".join(f"{exc.path.name}: {exc.what()}" for exc in damaged)
            + ". Restore one from a good copy, or train into a new output.dir."
        )
    return None


def is_grpo_checkpoint(path: Path) -> bool:
    """Whether `path` is one of our checkpoints (complete or torn), by what only grpo writes into one:
    its manifest, or (a copy torn before the manifest arrived) its recipe beside its trainer state.

    trainer_state.json alone does not tell: a Hugging Face Trainer's checkpoint (TRL's) has one too,
    and is read as the adapter or model it holds (`model.loading.load_for_inference`, `export`)."""
    return (path / MANIFEST).exists() or ((path / STATE_FILE).exists() and (path / RECIPE_FILE).exists())


def locate(path: Path) -> Path | None:
    """The checkpoint a user means by `path`: a checkpoint itself, or a run directory's latest,
    verified for grpo eval and export (all but TRAINING_STATE, which they do not read). A damaged one
    is refused, not replaced by an earlier one: the user asked for this one.

    None when `path` is neither (a merged model, a PEFT adapter, a Trainer checkpoint or anything
    else); an error for a run directory that holds no complete checkpoint yet.
    """
    if is_grpo_checkpoint(path):
        verify(path, training_state=False)
        return path
    if (path / "checkpoints").is_dir() or (path / "metrics.jsonl").exists():
        found = latest(path)
        if found is None:
            raise UserError(f"{path} is a run directory without a complete checkpoint yet; "
                            "wait for the first save (output.save_every) or pass a model directory.")
        verify(found, training_state=False)
        return found
    return None


def locate_best(path: Path) -> Path:
    """The run directory's best checkpoint (--best), verified as `locate` does; a UserError that says
    why when the run has none."""
    if (path / STATE_FILE).exists() or (path / MANIFEST).exists():
        raise UserError(f"{path} is a checkpoint; --best takes the run directory it belongs to "
                        f"({path.parent.parent}), or drop --best to use this checkpoint.")
    if not ((path / "checkpoints").is_dir() or (path / "metrics.jsonl").exists()):
        raise UserError(f"{path} is not a grpo run directory; --best takes one (the output.dir of a training run).")
    marked = read_best(path)
    if marked is None:
        raise UserError(
            f"{path} has no best checkpoint: it is marked when output.keep_best is true (the default) and a "
            "held-out evaluation (data.eval, every output.eval_every steps and at the end) ran after a training "
            f"step. Drop --best to use the latest checkpoint, or pass a checkpoint such as {path}/checkpoints/step-N.")
    found = path / "checkpoints" / marked["checkpoint"]
    if not is_complete(found):
        raise UserError(f"the best checkpoint of {path}, {marked['checkpoint']}, is missing or incomplete "
                        f"({why_incomplete(found) if found.is_dir() else 'no such directory'}); drop --best to use "
                        "the latest checkpoint.")
    verify(found, training_state=False)
    return found
