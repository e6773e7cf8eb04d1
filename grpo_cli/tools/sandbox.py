"""Running Python that a model wrote during a rollout, one fresh process per call.

When the model closes a ```python block, its code runs here and what it printed (or its error) goes
back into the transcript as an ```output block, as in Qwen2.5-Math's tool-integrated format. Each block
runs alone, with nothing carried over from earlier calls, as Qwen's evaluation runs them. A rollout
submits many calls at once (one per row of the batch) and collects them without blocking, so the
other rows keep decoding; calls run in parallel.

    with Sandbox(Limits(timeout_s=5)) as box:
        ids = [box.submit(code) for code in blocks]
        ...                                  # decode other rows
        for call, outcome in box.collect().items():
            append(f"```output\\n{outcome.shown()}\\n```")

The work happens in a server process (sandbox_server.py, which documents the isolation): started with
a scrubbed environment, so the trainer's tokens and keys never reach the model's code; it imports
sympy and numpy once, then forks one process tree per call, far cheaper than a new interpreter importing
sympy for each (docs/tools.md has the costs, from scripts/sandbox_cost.py). `isolation` says which layers
this machine allowed.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from grpo_cli.config.defaults import TOOL_MEMORY_MB, TOOL_TIMEOUT_S
from grpo_cli.errors import UserError

START_TIMEOUT_S = 120.0  # the server's start-up: importing sympy and numpy from a cold disk
CLOSE_WAIT_S = 10.0
SERVER_ENV = {  # all the server and the code see: nothing of the trainer's (HF_TOKEN, API keys)
    "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8",
    "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",  # no threads to fork under
}


@dataclass(kw_only=True, frozen=True)
class Limits:
    """What one call may use. Beyond any of them the call ends and says which."""

    timeout_s: float = TOOL_TIMEOUT_S  # wall clock; CPU time is capped at ceil(timeout_s) + 1 s per process
    memory_mb: int = TOOL_MEMORY_MB  # address space (RLIMIT_AS) of each process the code runs
    max_processes: int = 4  # processes or threads the code may start beyond itself
    output_bytes: int = 65536  # stdout and stderr kept; beyond this the call is ended and marked truncated
    file_mb: int = 16  # the largest file the code may write (RLIMIT_FSIZE)
    open_files: int = 64  # RLIMIT_NOFILE
    disk_mb: int = 64  # all the code writes: the working directory is a tmpfs of this size, in memory
    files: int = 4096  # files and folders in the working directory (the tmpfs's inodes), so its depth too


@dataclass(kw_only=True, frozen=True)
class Outcome:
    """How one call ended: status "ok", "error" (an exception or a nonzero exit), "timeout" (wall clock or
    CPU time) or "killed" (a signal, or the output limit); `error` is one line, "" when ok."""

    status: str
    stdout: str
    error: str  # the traceback's last line ("NameError: name 'x' is not defined"), "timed out after 5 s", ...
    seconds: float  # from the call's start (after its wait in the queue, if any) to its end
    truncated: bool = False  # stdout stops at the output limit

    def shown(self, max_chars: int = 400) -> str:
        """What the model sees in its ```output block: stdout, followed by the error line when the call
        failed. Longer than `max_chars`: its first and last halves around a note of how much was left
        out. Nothing printed shows as "" (an empty output block), not as a note of ours that the model
        never saw in training."""
        text = "\n".join(part for part in (self.stdout.rstrip(), self.error) if part)
        if len(text) <= max_chars:
            return text
        head = max_chars // 2
        return f"{text[:head]}\n... ({len(text) - max_chars} characters left out) ...\n{text[head - max_chars:]}"


class SandboxRefused(UserError):
    """This machine cannot confine the code well enough to run it (see sandbox_server._refusal)."""


class Sandbox:
    """A server process that runs calls of untrusted Python in parallel (up to `parallel` at once, default
    one per CPU; more wait in its queue).

    If the server dies, it is started again and `restarts` counts it: the calls it was running end as
    errors ("the sandbox's server died during this call"), and later calls run as usual. Nothing a call
    does should kill the server; this is the net below that. If it dies again before a single call has
    finished since the last restart, `submit` and `collect` raise RuntimeError: restarting would not help.

    The server dies with the thread that created the Sandbox (PR_SET_PDEATHSIG fires when the creating
    thread ends): create it from a thread that outlives it, such as the main thread."""

    isolation: dict[str, str]  # the layers in force here, as the server found them at start-up

    def __init__(self, limits: Limits = Limits(), parallel: int | None = None):
        if not hasattr(os, "fork"):
            raise RuntimeError("the code sandbox forks a process per call; Windows has no fork: use Linux or WSL")
        self.limits, self.parallel = limits, parallel or os.cpu_count() or 1
        self._next_id, self._pending, self._done = 0, set(), {}
        self._closed, self.restarts, self._finished_since_start = False, 0, 0
        self._start()

    def _start(self) -> None:
        """Start the server and wait for its hello: the isolation it found, or why it refuses to run code."""
        self._buffer = bytearray()
        if hasattr(self, "isolation"):
            del self.isolation
        ours, theirs = socket.socketpair()
        config = {"limits": asdict(self.limits), "parallel": self.parallel, "tmpdir": tempfile.gettempdir(),
                  "parent": os.getpid(), "fd": theirs.fileno()}
        started = time.monotonic()
        self._server = subprocess.Popen(
            [sys.executable, "-I", str(Path(__file__).with_name("sandbox_server.py")), json.dumps(config)],
            env=SERVER_ENV, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, cwd="/")
        theirs.close()
        self._socket = ours
        try:
            while not hasattr(self, "isolation"):
                if not self._take(timeout=max(0.0, START_TIMEOUT_S - (time.monotonic() - started))):
                    raise RuntimeError(f"the code sandbox's server did not start within {START_TIMEOUT_S:g} s")
        except BaseException:
            self.close()
            raise
        self.startup_s = time.monotonic() - started
        if self.refused:
            self.close()
            raise SandboxRefused(f"the code tool cannot run here: {self.refused}")

    def submit(self, code: str) -> int:
        """Queue `code` to run; returns the call's id, at once."""
        self._check_open()
        call, self._next_id = self._next_id, self._next_id + 1
        data = json.dumps({"id": call, "code": code}).encode()
        self._pending.add(call)
        try:
            self._socket.sendall(len(data).to_bytes(4, "big") + data)
        except OSError:
            self._restart()  # this call is among the pending ones it ends as errors
        return call

    def collect(self, wait: bool = False) -> dict[int, Outcome]:
        """The calls finished since the last collect, by id. With `wait`, block until at least one has
        finished (not all: the caller can go on with what it has); {} at once when none is pending."""
        self._check_open()
        while self._take(timeout=0):
            pass
        while wait and not self._done and self._pending:
            self._take(timeout=None)
        done, self._done = self._done, {}
        return done

    def run(self, code: str) -> Outcome:
        """Submit `code` and wait for its outcome; other calls' outcomes stay for `collect`."""
        return self.run_many([code])[0]

    def run_many(self, codes: list[str]) -> list[Outcome]:
        """Run `codes` in parallel; their outcomes in the same order."""
        calls = [self.submit(code) for code in codes]
        while any(call not in self._done for call in calls):
            self._take(timeout=None)
        return [self._done.pop(call) for call in calls]

    def close(self) -> None:
        """Stop the server: it kills the calls still running and deletes their working folders."""
        if self._closed:
            return
        self._closed = True
        self._socket.close()  # the server's end of file
        try:
            self._server.wait(CLOSE_WAIT_S)
        except subprocess.TimeoutExpired:
            self._server.kill()
            self._server.wait()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _take(self, timeout: float | None) -> bool:
        """Take in what the server sent, waiting up to `timeout` s (None: until something comes); False if nothing came."""
        if not select.select([self._socket], [], [], timeout)[0]:
            return False
        try:
            data = self._socket.recv(1 << 20)
        except OSError:  # reset by a server killed with unread data
            data = b""
        if not data:
            self._restart()
            return True
        self._buffer += data
        while len(self._buffer) >= 4 and len(self._buffer) >= 4 + (size := int.from_bytes(self._buffer[:4], "big")):
            message = json.loads(self._buffer[4:4 + size])
            del self._buffer[:4 + size]
            if "hello" in message:
                self.isolation, self.refused = message["hello"], message.get("refused", "")
            else:
                call = message.pop("id")
                self._pending.discard(call)
                self._done[call] = Outcome(**message)
                self._finished_since_start += 1
        return True

    def _restart(self) -> None:
        """The server died: its running and queued calls end as errors, and a new server takes the next."""
        error = self._died()
        if self._closed or not hasattr(self, "isolation") or (self.restarts and not self._finished_since_start):
            raise error
        lost = Outcome(status="error", stdout="", error="the sandbox's server died during this call; it was restarted",
                       seconds=0.0)
        for call in self._pending:
            self._done[call] = lost
        self._pending = set()
        self._socket.close()
        self._start()
        self.restarts += 1
        self._finished_since_start = 0

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Sandbox is closed")

    def _died(self) -> RuntimeError:
        try:
            code = self._server.wait(1.0)
        except subprocess.TimeoutExpired:
            code = None
        how = "closed its connection" if code is None else f"ended (exit status {code})"
        when = ("while starting" if not hasattr(self, "isolation") else
                "again before any call finished since its restart" if self.restarts else "")
        return RuntimeError(f"the code sandbox's server process (pid {self._server.pid}) {how} {when}".rstrip()
                            + f"; {len(self._pending)} pending calls are lost")
