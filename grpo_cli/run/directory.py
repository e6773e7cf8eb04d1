"""The run directory: whether it holds a run, and claiming it for a new run or a resume.

A run directory holds a run once a training step was recorded. Starting refuses a directory that
holds one (unless resuming); resuming checks that the recipe continues what the checkpoint
trained, records what changed in resumes.jsonl, and never overwrites the recipe file the user
passed. One process at a time holds the directory (run/lock.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from grpo_cli.checkpoint import layout, locating
from grpo_cli.errors import UserError
from grpo_cli.config.recipe import Recipe, changes, dump
from grpo_cli.config.recipe import load as load_recipe
from grpo_cli.run.log import METRICS, SAMPLES, read_jsonl


def listed_changes(differences: dict) -> str:
    """recipe.changes' {key: (before, after)} as one line."""
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in differences.items())


def holds_run(run_dir: Path) -> bool:
    """A run directory holds a run once a training step was recorded (a metrics row or a checkpoint).
    An attempt that failed before its first step (a recipe mistake found when the data or model
    loaded) leaves only its recipe and perhaps a step-0 evaluation: the corrected rerun may start."""
    return any((run_dir / "checkpoints").glob("step-*")) or any(
        row.get("step", 0) >= 1 for row in read_jsonl(run_dir / METRICS))


def prepare_run_dir(run_dir: Path, recipe: Recipe, resume: bool, notify, recipe_file: Path | None = None) -> Path | None:
    """Create the run directory, refuse to mix two runs in it; the checkpoint to resume from, if any.

    Resuming with a recipe that changes what the checkpoint trained (model, adapter, data, group
    size, seed) is refused with the differences; other changes are allowed and appended to
    resumes.jsonl. `recipe_file`: the file the user passed, never overwritten (it may be
    `<run dir>/recipe.yaml` itself, with the user's comments)."""
    if holds_run(run_dir) and not resume:
        raise UserError(
            f"{run_dir} already holds a run. Pass --resume to continue it, or choose another directory "
            f"with --set output.dir=<new dir> (or delete {run_dir})."
        )
    # The newest checkpoint whose files match their checksums: damaged newer ones are skipped with a
    # warning; when every one is damaged, an error (not a fresh start that would drop the run's logs).
    found = locating.latest_intact(run_dir, warn=notify) if resume and run_dir.exists() else None
    if found is not None:
        saved = load_recipe(found / layout.RECIPE_FILE)
        fixed, allowed = changes(saved, recipe)
        if fixed:
            raise UserError(f"{run_dir} holds a run this recipe cannot continue: {listed_changes(fixed)}. "
                            f"Resume with the recipe it was started with ({run_dir / 'recipe.yaml'}), or train "
                            "into a new output.dir.")
        if allowed:
            notify("resuming with changed settings: " + listed_changes(allowed))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if found is None:  # starting from step 0: logs of an attempt that saved nothing are not this run's
            for name in (METRICS, SAMPLES):
                (run_dir / name).unlink(missing_ok=True)
        if not write_recipe(run_dir, recipe, recipe_file):
            notify(f"{run_dir / 'recipe.yaml'} is the recipe you passed: left as you wrote it (each checkpoint "
                   "holds the resolved recipe).")
        if found is not None:
            with open(run_dir / "resumes.jsonl", "a") as handle:
                handle.write(json.dumps({"from_step": layout.read_state(found)["step"],
                                         "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                         "changed": {k: list(v) for k, v in allowed.items()}}) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write the run directory {run_dir}: {exc.strerror}. Set output.dir to a writable place.") from None
    return found


def write_recipe(run_dir: Path, recipe: Recipe, recipe_file: Path | None) -> bool:
    """Write the resolved recipe to <run dir>/recipe.yaml, unless that file is the one the user passed
    (`recipe_file`), which is never overwritten; whether it was written."""
    resolved = run_dir / "recipe.yaml"
    if recipe_file is not None and resolved.exists() and resolved.samefile(recipe_file):
        return False
    resolved.write_text(dump(recipe))
    return True
