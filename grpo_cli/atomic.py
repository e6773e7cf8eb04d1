"""Writing a file or a directory whole or not at all: the one way grpo puts anything on disk that a later
command reads back (checkpoints, the best marker, logs' rewrites, built and converted models, exports).

Both write into a hidden `.NAME.partial` beside the target, flush it to the disk (fsync), and rename it into
place, then flush the parent so the rename itself survives a power cut. Any failure or interruption (a full
disk, Ctrl-C, SIGTERM) removes the partial copy, so nothing half-written is ever left looking complete and
nothing hidden is left behind. The rename replaces an earlier target: a file atomically; a directory
after the old one is removed (POSIX cannot swap a directory for another in one step).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def hidden(target: Path, what: str = "partial") -> Path:
    """The hidden sibling a write goes to before its rename: `.NAME.partial`."""
    return target.with_name(f".{target.name}.{what}")


def fsync(path: Path) -> None:
    """Flush a file's contents, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """Flush every file under `directory`, then its directories, deepest first."""
    folders = [directory]
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not path.is_symlink():
            fsync(path)
        elif path.is_dir() and not path.is_symlink():
            folders.append(path)
    for folder in reversed(folders):
        fsync(folder)


def write_file(path: Path, data: str | bytes, durable: bool = True) -> None:
    """Write `path` whole or not at all. `durable`: flushed to the disk before and after the rename (off only
    for files that are cheap to lose and written often). An OSError is raised after the partial file is gone."""
    path = Path(path)
    partial = hidden(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(partial, path)
        if durable:
            fsync(path.parent)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def write_directory(target: Path, partial: Path | None = None, durable: bool = True) -> Iterator[Path]:
    """`with write_directory(target) as partial:` fill `partial`; on a clean exit it is flushed and renamed
    to `target` (an earlier `target` removed first), on any exception removed and the exception raised.
    `partial`: where to build, default `.NAME.partial` beside the target (a cache shared by several processes
    names one per process)."""
    target = Path(target)
    partial = Path(partial) if partial is not None else hidden(target)
    try:
        shutil.rmtree(partial, ignore_errors=True)  # a crashed earlier attempt's
        partial.mkdir(parents=True)
        yield partial
        if durable:
            fsync_tree(partial)
        if target.exists():
            shutil.rmtree(target)
        os.replace(partial, target)
        if durable:
            fsync(target.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
