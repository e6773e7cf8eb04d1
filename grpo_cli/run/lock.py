"""One training process per run directory.

Two processes writing one run (a retried job while the first still runs, two `--resume`s)
would interleave their metrics, double the samples and race on checkpoints. The second is
refused, with the holder named. The lock is the operating system's (`flock` on
`<run dir>/.lock`), held for the process's life and dropped by the kernel when the process
ends in any way, SIGKILL included, so a killed run never leaves the directory locked. The
file stays behind and only says who held it last. On network file systems `flock` is as
good as the file system's lock support (NFSv4 has it).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from grpo_cli.errors import UserError

LOCK_FILE = ".lock"


class RunLock:
    """Held from `acquire()` until `release()` or the process's end."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"cannot write the run directory {self.path.parent}: {exc.strerror}. "
                            "Set output.dir to a writable place.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.read(fd, 4096))
            os.close(fd)
            raise UserError(
                f"{self.path.parent} is in use by another grpo process ({holder}). Two processes on one run "
                "would interleave its metrics and checkpoints. Wait for that one to finish or stop it (a stopped "
                "or killed process leaves no lock behind), or train into another output.dir."
            ) from None
        os.ftruncate(fd, 0)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "command": " ".join(sys.argv)}
        os.write(fd, json.dumps(record).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(raw: bytes) -> str:
    try:
        holder = json.loads(raw.decode())
        return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}: {holder['command']}"
    except (ValueError, KeyError, UnicodeDecodeError):
        return "its details were not written yet"
