"""Worker processes for work that may hang, crash or leave processes behind: the reward rules.

Not multiprocessing.Pool, which replaces a dead worker silently while the job that worker held never
completes (each such call waited out its time limit and was reported as a timeout), and whose workers
share two queues behind locks, so a worker killed while holding one (an idle worker waits for a task
holding the task queue's) leaves the others waiting forever, and Pool.terminate() too. Here nothing is
shared between workers: each is fed one chunk at a time over its own pipe by a thread of ours, a death
is noticed at once and blamed on the chunk it held, and each worker runs in a process group of its own
that the pool kills with it, so nothing a task started and left running outlives it. Workers ignore
Ctrl-C and SIGTERM: the parent decides when they stop.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import multiprocessing.util
import os
import pickle
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import connection

POLL_S = 1.0  # how often the pool's thread also asks each worker's exit status (see WorkerPool._await)
CLOSE_WAIT_S = 5.0  # the most close() waits for each SIGKILLed worker and for the pool's thread
READY = "ready"  # a worker's first message: started up, waiting for chunks
TAKEN = "taken"  # a worker's answer to each chunk it receives: from then on, its death is the chunk's doing


class WorkerDied(Exception):
    """The worker process running a chunk ended before it answered: the chunk's results never come."""

    def __init__(self, exitcode: int | None):
        super().__init__(f"its worker process died during this call ({_how_it_ended(exitcode)})")


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is None:  # still not reaped CLOSE_WAIT_S after SIGKILL: stuck in the kernel
        return "exit status unknown"
    if exitcode >= 0:
        return f"exit code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    return f"killed by {name}" + (", as the kernel's out-of-memory killer does" if -exitcode == signal.SIGKILL else "")


def _leave_to_the_parent(signum, frame):
    pass


def _worker(conn, prepare: Callable[[], None], task: Callable) -> None:
    """A worker process: leave Ctrl-C and SIGTERM to the parent, in a process group of its own; run
    `prepare()`, say so; then `task(*args)` for each chunk it is sent, until its pipe closes. A task's
    SystemExit is not caught: it ends the worker, and the pool notices.

    The parent stops the workers itself: a terminal's Ctrl-C (sent to the terminal's foreground group,
    which a worker has now left) and Slurm's SIGTERM (sent to every process of the job) would otherwise
    kill a worker mid-task and lose its results, or print its KeyboardInterrupt. SIGTERM gets a handler
    that does nothing rather than SIG_IGN: an ignored signal stays ignored across exec, so a program a
    task runs (`timeout 5 prog`) could not be stopped with it. The group is what `WorkerPool` kills:
    the worker and whatever its tasks started."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _leave_to_the_parent)
    os.setpgrp()
    prepare()
    conn.send(READY)
    while True:
        try:
            payload = conn.recv_bytes()
        except EOFError:  # the pool closed, or its process ended
            return
        conn.send(TAKEN)  # before unpickling: importing a task's module is the chunk's doing too
        conn.send(task(*pickle.loads(payload)))


@contextlib.contextmanager
def stops_held_back():
    """Ctrl-C and SIGTERM held back while the pool starts and passed on to the trainer's handlers once
    it is up: a second Ctrl-C that stopped the trainer halfway through starting a worker left that
    worker reading its start-up data from a closed pipe, and its traceback followed the trainer's own
    message. (Handlers, not a blocked signal mask: in a process with other threads the kernel hands
    a signal to any thread that does not block it.) Handlers are the main thread's only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {signum: signal.signal(signum, lambda signum, frame: caught.append(signum))
                for signum in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(signum) is not None}  # None: set outside Python, could not be put back
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in [s for i, s in enumerate(caught) if caught[:i].count(s) < 2]:
            signal.raise_signal(signum)  # the trainer's handler tells a first press from a second


class Job:
    """One chunk's results, filled in by the pool's thread: a list, or the exception that lost them."""

    def __init__(self, args: tuple):
        self.args = args
        self._done = threading.Event()
        self._outcome = None

    def finish(self, outcome) -> None:
        if not self._done.is_set():  # the first outcome stands
            self._outcome = outcome
            self._done.set()

    def get(self, timeout: float):
        if not self._done.wait(timeout):
            raise multiprocessing.TimeoutError
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        return self._outcome


@dataclass(eq=False)
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: connection.Connection  # our end of its pipe
    ready: bool = False  # started up, waiting for chunks
    job: Job | None = None  # the chunk it holds
    taken: bool = False  # it said it has the chunk: it dies of that chunk's calls, if it dies


def _kill(process) -> None:
    """SIGKILL a worker's process group (the worker and whatever its rules started), and the worker itself,
    in case it had not made its group yet. Nothing outlasts SIGKILL: workers ignore SIGTERM, and a call
    stuck in C code ignores everything else."""
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(process.pid, signal.SIGKILL)


class WorkerPool:
    """Worker processes, each fed one chunk at a time over its own pipe by a thread of ours (why not
    multiprocessing.Pool: the module's docstring).

    A death is noticed at once and blamed exactly: a worker's sentinel (a pipe whose other end only that process holds) becomes readable the moment it
    ends, however it ends, and the pool knows which chunk it had handed that worker. Its exit status,
    asked every POLL_S, backs the sentinel up (a process a rule forked could hold the other end). A
    worker that dies before it says it took its chunk (killed while idle) loses nothing: the chunk goes
    to another worker."""

    def __init__(self, context, size: int, task: Callable, prepare: Callable[[], None]):
        """`task(*args)` runs each chunk submitted as `args`; `prepare()` once in each worker as it starts.
        Both are module-level functions (spawned workers import them by name)."""
        self._context, self._size, self._task, self._prepare = context, size, task, prepare
        self._lock = threading.Lock()  # _queue, _workers, _closing and each worker's job: the caller's thread vs ours
        self._queue: collections.deque[Job] = collections.deque()  # chunks no worker holds yet
        self._workers: list[_Worker] = []
        self._closing = False
        self.started = 0  # workers that finished starting, ever
        self._wake_r, self._wake_w = os.pipe()  # wakes our thread when chunks arrive or the pool closes
        os.set_blocking(self._wake_w, False)
        self._thread = None
        # Closed at exit if nobody closed it, before multiprocessing's exit hook sends daemon processes
        # SIGTERM, which ours ignore, and waits for them forever (finalizers with a priority run first).
        self._at_exit = multiprocessing.util.Finalize(self, self.close, exitpriority=20)
        try:
            for _ in range(size):
                self._workers.append(self._start())
        except BaseException:
            self.close()
            raise
        self._thread = threading.Thread(target=self._run, name="grpo-worker-pool", daemon=True)
        self._thread.start()

    def submit(self, chunks: list[tuple]) -> list[Job]:
        jobs = [Job(args) for args in chunks]
        with self._lock:
            if self._closing:
                raise RuntimeError("the worker pool is closed")
            self._queue.extend(jobs)
        self._wake()
        return jobs

    def cut_off(self, job: Job) -> None:
        """Stop a chunk that ran past its limit: drop it if no worker holds it yet, else kill its worker
        (the pool starts another). The caller accounts for it; the pool forgets it."""
        with self._lock:  # under the lock, so its worker cannot have moved on to another chunk
            if job in self._queue:
                self._queue.remove(job)
            for worker in self._workers:
                if worker.job is job:  # dying: it gets no other chunk
                    worker.job, worker.ready, worker.taken = None, False, False
                    _kill(worker.process)

    def close(self) -> None:
        """Kill every worker with its process group, and fail the chunks still waiting. Bounded: each wait
        is CLOSE_WAIT_S at most (a SIGKILLed process ends at once, unless stuck in the kernel)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            lost = [*self._queue, *(w.job for w in self._workers if w.job is not None)]
            self._queue.clear()
            for worker in self._workers:
                worker.job = None  # theirs to fail now, not our thread's
                _kill(worker.process)
        self._at_exit.cancel()
        self._wake()
        if self._thread is not None:
            self._thread.join(CLOSE_WAIT_S)
        ours = self._thread is None or not self._thread.is_alive()  # else its thread may still use the pipes
        with self._lock:
            workers, self._workers = self._workers, []
        for worker in workers:
            worker.process.join(CLOSE_WAIT_S)
            if ours:
                worker.conn.close()
        if ours:
            os.close(self._wake_r)
            os.close(self._wake_w)
        for job in lost:
            job.finish(RuntimeError("the pool was closed before this chunk was done"))

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: the thread is due to wake anyway
            os.write(self._wake_w, b"w")

    def _start(self) -> _Worker:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(target=_worker, args=(theirs, self._prepare, self._task), name="grpo-worker",
                                        daemon=True)
        process.start()
        theirs.close()  # only the worker holds its end now: ours reads EOF once it is gone
        return _Worker(process, ours)

    def _run(self) -> None:
        """The pool's thread: keep `size` workers, hand each ready one a chunk, take in results, notice deaths."""
        try:
            while True:
                with self._lock:
                    if self._closing:
                        return
                    with contextlib.suppress(OSError):  # could not start one now: tried again soon (_await)
                        while len(self._workers) < self._size:
                            self._workers.append(self._start())
                    handed = self._hand_out()
                    workers = list(self._workers)
                for worker in handed:
                    self._send(worker)
                self._await(workers)
        except BaseException as exc:  # a bug of ours: fail the chunks rather than let them wait out their limits
            with self._lock:
                lost = [*self._queue, *(w.job for w in self._workers if w.job is not None)]
            for job in lost:
                job.finish(exc)
            raise

    def _hand_out(self) -> list[_Worker]:
        handed = []
        for worker in self._workers:
            if worker.ready and worker.job is None and self._queue:
                worker.job, worker.taken = self._queue.popleft(), False
                handed.append(worker)
        return handed

    def _send(self, worker: _Worker) -> None:
        try:
            payload = pickle.dumps(worker.job.args)
        except Exception as exc:  # a rule that cannot be sent to a worker: the caller sees why
            with self._lock:
                job, worker.job = worker.job, None
            job.finish(exc)
            return
        try:
            worker.conn.send_bytes(payload)
        except OSError:  # it died before it could take the chunk: the chunk waits for another worker
            with self._lock:
                if worker.job is not None:
                    self._queue.appendleft(worker.job)
                    worker.job = None

    def _await(self, workers: list[_Worker]) -> None:
        sentinels = {worker.process.sentinel: worker for worker in workers}
        timeout = POLL_S if len(workers) == self._size else 0.1
        ready = connection.wait([self._wake_r, *(w.conn for w in workers), *sentinels], timeout)
        if self._wake_r in ready:
            os.read(self._wake_r, 4096)
        if self._closing:  # close() takes over the workers
            return
        for worker in workers:
            if worker.conn in ready:
                self._receive(worker)  # one message: any other wakes the next wait at once
        for worker in workers:
            # The sentinel first: `exitcode` reaps a dead process, and _bury kills its group before reaping it,
            # while its pid (the group's id) cannot yet be given to a new process.
            if worker.process.sentinel in ready or worker.process.exitcode is not None:
                self._bury(worker)

    def _receive(self, worker: _Worker) -> bool:
        """Take one message from the worker; False when its pipe is at its end."""
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):  # it is dying: _bury sees to it
            return False
        if message == READY:
            worker.ready = True
            self.started += 1
        elif message == TAKEN:
            worker.taken = True
        else:
            with self._lock:
                job, worker.job, worker.taken = worker.job, None, False
            if job is not None:
                job.finish(message)
        return True

    def _bury(self, worker: _Worker) -> None:
        """A worker ended: keep what it sent before, end what it left running, and fail the chunk it had
        taken (one it had not taken yet goes back to the queue)."""
        while worker.conn.poll() and self._receive(worker):
            pass
        _kill(worker.process)
        worker.process.join(CLOSE_WAIT_S)
        with self._lock:
            self._workers.remove(worker)
            job, worker.job = worker.job, None
            if job is not None and not worker.taken:
                self._queue.appendleft(job)
        worker.conn.close()
        if job is not None and worker.taken:
            job.finish(WorkerDied(worker.process.exitcode))
