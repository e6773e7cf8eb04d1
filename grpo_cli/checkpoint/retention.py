"""Which checkpoints a run keeps: the best one (output.keep_best), marked in `checkpoints/best.json`, and the
last output.keep_last, pruning the rest.

The marker names the checkpoint with the highest held-out accuracy; it is written whole (atomic.write_file),
after that checkpoint, and pruning never removes the checkpoint it names. Pruning runs only after a new
checkpoint is in place, and never removes one newer than it: that can only be a damaged checkpoint resume
skipped, replaced when the run saves that step again, not kept in the new one's stead.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from grpo_cli import atomic
from grpo_cli.checkpoint.layout import checkpoint_dir, leads_outside, step_of
from grpo_cli.checkpoint.manifest import complete_checkpoints
from grpo_cli.errors import UserError

BEST_FILE = "best.json"  # in checkpoints/: which checkpoint scored the highest held-out accuracy (keep_best)


def best_file(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / BEST_FILE


def read_best(run_dir: Path) -> dict | None:
    """The run's best-checkpoint marker, {"step", "checkpoint", "accuracy", "n"}, or None when there is none.

    A marker that cannot be read, or names anything but its step's checkpoint in this run's checkpoints/, is a
    UserError: read as none, pruning would delete the best checkpoint and --best would say there is none; a name
    leading elsewhere (an absolute path, .., a link) would load another run's weights as this run's best."""
    marker = best_file(run_dir)
    try:
        marked = json.loads(marker.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON
        raise _bad_marker(marker, f"cannot be read ({exc})") from None
    problem = _best_problem(run_dir, marked)
    if problem:
        raise _bad_marker(marker, problem)
    return marked


def _best_problem(run_dir: Path, marked) -> str | None:
    """What is wrong with a best.json's contents (as `mark_best` writes them), or None."""
    fields = {"step": int, "checkpoint": str, "accuracy": (int, float), "n": int}
    if not isinstance(marked, dict) or any(not isinstance(marked.get(key), kind) or isinstance(marked.get(key), bool)
                                           for key, kind in fields.items()):
        return 'is not a marker as grpo writes it ({"step": N, "checkpoint": "step-N", "accuracy": A, "n": M})'
    named, expected = marked["checkpoint"], checkpoint_dir(run_dir, marked["step"]).name
    if named != expected:
        return f"names the checkpoint {named!r}, not its step's {expected!r} in {run_dir / 'checkpoints'}"
    return leads_outside(run_dir / "checkpoints", named)


def _bad_marker(marker: Path, problem: str) -> UserError:
    return UserError(f"{marker} {problem}. grpo writes it whole, naming a checkpoint of this run, so something else "
                     "changed it. Delete it: a resumed run marks its best again at its next held-out evaluation; "
                     "meanwhile pass the checkpoint itself (checkpoints/step-N; eval/accuracy in metrics.jsonl says "
                     "which scored best) instead of --best.")


def mark_best(run_dir: Path, step: int, accuracy: float, n: int, keep_last: int | None) -> None:
    """Record step-`step` (saved already) as the run's best, then prune the previous best if keep_last
    no longer keeps it. Written whole, so a reader never sees half of it."""
    atomic.write_file(best_file(run_dir), json.dumps({"step": step, "checkpoint": checkpoint_dir(run_dir, step).name,
                                                      "accuracy": accuracy, "n": n}, indent=1))
    prune(run_dir, step, keep_last)  # the same set the save of `step` kept, less the previous best


def forget_best(run_dir: Path) -> None:
    best_file(run_dir).unlink(missing_ok=True)


def prune(run_dir: Path, step: int, keep_last: int | None) -> None:
    """Keep step-`step` and the keep_last - 1 complete checkpoints before it, and the best (never pruned).

    A newer one can only be a damaged checkpoint that resume skipped: left for a later save of its step
    to replace, never kept instead of this one."""
    if not keep_last:
        return
    marked = read_best(run_dir)
    best = marked["step"] if marked else None
    older = [p for p in complete_checkpoints(run_dir) if step_of(p) < step and step_of(p) != best]
    for old in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)
