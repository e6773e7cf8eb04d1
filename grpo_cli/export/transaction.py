"""The export's directory, written whole or not at all: nothing is lost to an export.

It is written into a hidden `.<out>.partial/` next to --out and renamed into place only when written and
verified (flushed to the disk first); any failure or interruption (a full disk, Ctrl-C, SIGTERM, a bug) removes
that directory before it propagates, and an earlier export being replaced is moved aside (`.<out>.replaced/`)
and deleted only once the new one is in place. --out may not be, contain or lie inside the run or checkpoint
being exported. --force replaces only an earlier export: a directory whose `grpo_export.json` (written last; it
lists every file the export wrote) accounts for all its files. That marker, rather than the recipe and model
card, decides, because a user may add files to an export or write a model card of their own: a directory with
anything export did not write is refused, even with --force.

Not atomic.write_directory: that one deletes the target before its rename, and knows neither the marker nor a
leftover of an export killed outright, nor another export still writing the same --out.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from grpo_cli import __version__, atomic
from grpo_cli.errors import UserError, os_error

MARKER = "grpo_export.json"  # what wrote the directory and which files: --force deletes nothing else


def _within(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _refuse_overlap(target: Path, source: Path, run_dir: Path | None) -> None:
    """--out may not hold the source or lie inside it: replacing it would delete the run."""
    what = str(source) if run_dir in (None, source) else f"{source} (in the run {run_dir})"
    for protected in filter(None, (source, run_dir)):
        if _within(protected, target):
            raise UserError(f"--out {target} contains {what}, the source of this export: writing the export there "
                            "would delete it, checkpoints and metrics included. Choose an --out outside it.")
        if _within(target, protected):
            raise UserError(f"--out {target} lies inside {what}, the source of this export: an export is not "
                            "written into a run or checkpoint, where replacing it could delete the run's files. "
                            "Choose an --out outside it.")


def _not_an_export(directory: Path) -> str | None:
    """Why --force may not replace `directory`, or None when it holds only what an export wrote."""
    try:
        written = set(json.loads((directory / MARKER).read_text())["files"]) | {MARKER}
    except (OSError, ValueError, KeyError, TypeError):
        return f"it has no {MARKER}, which grpo export writes into every export"
    # A symlink counts as a file: rmtree would remove the link itself, which export did not write.
    others = sorted(f.relative_to(directory).as_posix() for f in directory.rglob("*")
                    if (f.is_symlink() or not f.is_dir()) and f.relative_to(directory).as_posix() not in written)
    if others:
        return f"it holds files grpo export did not write: {', '.join(others[:5])}{', ...' if len(others) > 5 else ''}"
    return None


def _refuse_out(out: Path, target: Path, force: bool) -> None:
    if target.exists() and not target.is_dir():
        raise UserError(f"--out {out} is a file; export writes a directory and never replaces a file. "
                        "Choose another --out.")
    if not target.is_dir() or not any(target.iterdir()):
        return
    reason = _not_an_export(target)
    if reason:
        raise UserError(f"--out {out} is not empty and not an earlier grpo export ({reason}); --force replaces only "
                        "an earlier export, so choose another --out, or empty it yourself.")
    if not force:
        raise UserError(f"--out {out} is not empty: it holds an earlier export. Pass --force to replace it, or choose "
                        "another --out.")


def _writer(partial: Path) -> int | None:
    """The process still writing `partial` (another export to the same --out), or None when it is gone."""
    try:
        pid = json.loads((partial / MARKER).read_text())["pid"]
        if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
            return None
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except PermissionError:
        return pid  # exists, under another user
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid


def _clear_leftovers(target: Path) -> None:
    """What an export killed outright (SIGKILL) left beside --out; anything else there is refused, never removed."""
    partial, aside = atomic.hidden(target, "partial"), atomic.hidden(target, "replaced")
    writer = _writer(partial)
    if writer is not None:
        raise UserError(f"another grpo export (process {writer}) is writing {target}; wait for it to finish, or "
                        f"if no export is running, delete {partial}.")
    if aside.is_dir() and (aside / MARKER).exists() and not target.exists():
        aside.rename(target)  # killed between the two renames of _finish: the earlier export goes back
    for leftover in (partial, aside):
        ours = leftover.is_dir() and not leftover.is_symlink() and (
            (leftover / MARKER).exists() or not any(leftover.iterdir()))
        if ours:
            shutil.rmtree(leftover)
        elif os.path.lexists(leftover):
            raise UserError(f"{leftover} is in the way: export writes there before the final rename, and it was "
                            "not left by grpo export. Move it away or choose another --out.")


def _start(target: Path) -> Path:
    partial = atomic.hidden(target, "partial")
    partial.mkdir(parents=True)
    # Marked at once, so that a later export knows a leftover as its own, and whether its writer still runs.
    (partial / MARKER).write_text(json.dumps({"written_by": "grpo export", "pid": os.getpid()}))
    return partial


def _finish(partial: Path, target: Path, source: Path, step: int | None) -> None:
    files = sorted(f.relative_to(partial).as_posix() for f in partial.rglob("*") if f.is_file() and f.name != MARKER)
    (partial / MARKER).write_text(json.dumps({"written_by": "grpo export", "grpo_version": __version__,
                                              "source": str(source), "step": step, "files": files}, indent=1))
    atomic.fsync_tree(partial)  # on the disk before it appears: a power cut cannot leave a torn export in place
    # The only way the export appears. An earlier one is moved aside, not deleted, until the new one is in place.
    aside = atomic.hidden(target, "replaced")
    if target.exists():
        target.rename(aside)
    partial.rename(target)
    shutil.rmtree(aside, ignore_errors=True)
    atomic.fsync(target.parent)  # the rename on the disk too


def _discard(target: Path) -> None:
    """Undo a failed or interrupted export: no hidden directory stays, and an earlier export is put back."""
    shutil.rmtree(atomic.hidden(target, "partial"), ignore_errors=True)
    aside = atomic.hidden(target, "replaced")
    if aside.exists():
        if target.exists():  # the new export is in place already; the earlier one is done with
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.rename(target)


def _write_failed(error: OSError, out: Path, kept: str) -> UserError:
    hint = ("free some space or choose another --out" if error.errno in (errno.ENOSPC, errno.EDQUOT) else
            "choose a writable --out" if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else
            "choose another --out")
    return UserError(f"could not write the export to {out}: {error.strerror or error}; {kept}. To export, {hint}.")


@contextlib.contextmanager
def export_directory(out: Path, force: bool, source: Path, run_dir: Path | None, exported: Path,
                     step: int | None) -> Iterator[Path]:
    """`with export_directory(...) as partial:` write the export into `partial`; on a clean exit it becomes
    --out `out`, on any exception nothing is left but what was there before (an OSError as a UserError).

    Refused before anything is written: an `out` that is, contains or lies in `source` (the path the user
    named) or `run_dir` (the run around it, if any), a file, or a non-empty directory other than an earlier
    export (that one only with `force`). `exported` and `step` are recorded in the marker."""
    target = out.resolve()  # where the checks and renames act, whatever symlinks or '.' --out goes through
    _refuse_overlap(target, source.resolve(), run_dir)
    try:
        _clear_leftovers(target)
        _refuse_out(out, target, force)
    except OSError as exc:
        raise _write_failed(exc, out, "nothing was changed") from None
    # After the checks --out is absent, empty or an earlier export: what a failure must leave as it was.
    kept = "the earlier export there is as it was" if target.is_dir() and any(target.iterdir()) else \
        "nothing was left there"
    try:
        partial = _start(target)  # first: an --out that cannot be written fails before minutes of loading
        yield partial
        _finish(partial, target, exported, step)
    except BaseException as exc:  # Ctrl-C and SIGTERM too: nothing half-written or hidden may stay
        _discard(target)
        error = os_error(exc)
        if error is not None:
            raise _write_failed(error, out, kept) from None
        raise
