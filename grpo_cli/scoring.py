"""Run reward rules over many completions without letting one of them hang or break the run.

The rules are pure functions (`rewards`). Here they run in a pool of worker processes
(`_Pool`), each call under a per-call alarm. Inside a worker the call runs on the process's
main thread, so the alarm works whatever thread called us (the trap math-verify's own
timeouts fall into). A call that ignores the alarm (stuck in C code) is cut off from
outside: its worker is killed. A worker can also die on its own (a rule calls `sys.exit` or
`os._exit`, the OOM killer picks it); each worker holds one chunk at a time, so the pool
knows at once which chunk a death lost. Either way the pool starts another worker and the
rest of the lost chunk is tried again one item at a time, so only the offender is lost.

A call cut off scores 0 and is counted in `Scores.timeouts`; a call whose worker died, and
a rule that raises or returns something that is not a finite number, score 0 and are
counted in `Scores.errors`, with the first messages kept for a warning; a custom rule that
returns None skips that completion (NaN here: it adds nothing to the reward and is left out
of the rule's mean). Identical calls are made once.

Workers leave Ctrl-C and SIGTERM to the trainer, which finishes its step and stops them
itself. Each runs in a process group of its own, and closing the scorer SIGKILLs every
group, so nothing a rule started and left running outlives the scorer.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import multiprocessing
import multiprocessing.util
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing import connection

import numpy as np

from grpo_cli.answers import equivalence, extract_final_answer, settled_without_parsing
from grpo_cli.rewards import RULES, CustomRule, Rule, correctness

CALL_TIMEOUT_S = 5.0
START_MARGIN_S = 30.0  # a fresh worker imports SymPy and math-verify before its first item
START_LIMIT_S = 60.0  # no worker started by then: they fail as they start (see WorkersDidNotStart)
CHUNK = 32
POLL_S = 1.0  # how often the pool's thread also asks each worker's exit status (see _Pool._await)
CLOSE_WAIT_S = 5.0  # the most close() waits for each SIGKILLed worker and for the pool's thread
OK, TIMEOUT, ERROR = 0, 1, 2
READY = "ready"  # a worker's first message: started up, waiting for chunks
TAKEN = "taken"  # a worker's answer to each chunk it receives: from then on, its death is the chunk's doing
# What the pool runs by default: the reward rules, and answer-to-answer equivalence for majority votes.
GRADERS: dict[str, Rule] = {**RULES, "equivalent": equivalence}

Item = tuple[str, str, str, str]  # (rule, completion, answer, context as JSON; "" for rules without context)


def _settled_correctness(completion: str, answer: str) -> float | None:
    settled = settled_without_parsing(extract_final_answer(completion), answer)
    return None if settled is None else float(settled)


def _settled_equivalence(pred: str, gold: str) -> float | None:
    settled = settled_without_parsing(pred, gold)
    return None if settled is None else float(settled)


# Graders whose verdict usually needs no parsing (no answer, equal text, two integers): those
# items are graded in the calling process, the rest in the pool. Each is microseconds of string
# work that cannot hang, while a pool busy beside the update takes a core from torch's threads
# (on the 2-core CI machine it slowed the reference pass 53 -> 66 ms for 128 completions).
SETTLED_IN_PROCESS: dict[Rule, Callable[[str, str], float | None]] = {
    correctness: _settled_correctness, equivalence: _settled_equivalence}


@dataclass(frozen=True)
class Scores:
    values: np.ndarray  # [N, R] one column per rule, in the order asked; NaN where a custom rule skipped
    rules: tuple[str, ...]
    timeouts: int  # calls cut off (scored 0)
    errors: int  # calls that raised or returned a non-number (scored 0)
    messages: tuple[str, ...] = field(default_factory=tuple)  # the first few, "rule: what happened"
    status: np.ndarray | None = None  # [N, R] OK, TIMEOUT or ERROR behind each value

    def column(self, rule: str) -> np.ndarray:  # [N]
        return self.values[:, self.rules.index(rule)]

    def timed_out(self, rule: str) -> np.ndarray:  # [N] bool: the call was cut off, its 0 is no verdict
        return self.status[:, self.rules.index(rule)] == TIMEOUT


class _Alarm(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Alarm


class WorkerDied(Exception):
    """The worker process scoring a chunk ended before it answered: the chunk's results never come."""

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


class WorkersDidNotStart(RuntimeError):
    """No scoring worker finished starting: they exit as they start, and the pool starts new ones forever."""


UNGUARDED_SCRIPT_HINT = ("If you call grpo from your own Python script, put the call under `if __name__ == "
                         "\"__main__\":` (each worker process runs the script's top level again as it starts: "
                         "Python's 'spawn' start method).")


def refuse_inside_a_starting_worker(call: str) -> None:
    """Stop at once when a scoring worker, starting, runs the user's script again and reaches `call`.

    Without this each worker would load the model before failing, and the pool would start another."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):  # what multiprocessing itself checks
        raise SystemExit(f"grpo: {call} was called again by a scoring worker process as it started. "
                         + UNGUARDED_SCRIPT_HINT)


def _leave_to_the_trainer(signum, frame):
    pass


def _prepare_worker() -> None:
    """Leave Ctrl-C and SIGTERM to the trainer, in a process group of the worker's own; then import
    SymPy and math-verify before the first timed call, so no alarm counts the imports.

    The trainer stops the workers itself: a terminal's Ctrl-C (sent to the terminal's foreground
    group, which a worker has now left) and Slurm's SIGTERM (sent to every process of the job) would
    otherwise kill a worker mid-step and lose that step's scores, or print its KeyboardInterrupt.
    SIGTERM gets a handler that does nothing rather than SIG_IGN: an ignored signal stays ignored
    across exec, so a program a rule runs (`timeout 5 prog`) could not be stopped with it. The group
    is what `_Pool.close` kills: the worker and whatever its rules started."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _leave_to_the_trainer)
    os.setpgrp()
    from grpo_cli.answers import is_equivalent

    is_equivalent("1/2", "0.5")


def _worker(conn) -> None:
    """A worker process: start up, say so, then score each chunk it is sent until its pipe closes.
    A rule's SystemExit is not caught (`_score_items` catches Exception): it ends the worker."""
    _prepare_worker()
    conn.send(READY)
    while True:
        try:
            payload = conn.recv_bytes()
        except EOFError:  # the scorer closed, or its process ended
            return
        conn.send(TAKEN)  # before unpickling: importing a rule's module is the chunk's doing too
        conn.send(_score_items(*pickle.loads(payload)))


def _call(rule, completion: str, answer: str, context: str):
    if isinstance(rule, CustomRule):
        return rule(completion, answer, json.loads(context))
    return rule(completion, answer)


def _score_items(items: list[Item], rules: dict[str, Rule], timeout_s: float) -> list[tuple[float, int, str]]:
    """Worker side: (value, status, message) for each item, each call under its own alarm."""
    signal.signal(signal.SIGALRM, _on_alarm)
    results = []
    for name, completion, answer, context in items:
        rule = rules[name]
        limit = rule.timeout_s if isinstance(rule, CustomRule) else timeout_s
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            value = _call(rule, completion, answer, context)
            if value is None:
                results.append((math.nan, OK, ""))
            elif isinstance(value, (int, float, np.number)) and math.isfinite(float(value)):
                results.append((float(value), OK, ""))
            else:
                results.append((0.0, ERROR, f"{name}: returned {value!r}, not a finite number"))
        except _Alarm:
            results.append((0.0, TIMEOUT, f"{name}: took longer than {limit:g}s"))
        except Exception as exc:
            results.append((0.0, ERROR, f"{name}: {type(exc).__name__}: {exc}"))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    return results


def _settle(rule, item: Item) -> float | None:
    """The item's value if its rule settles it here without parsing, else None (for the pool)."""
    quick = None if isinstance(rule, CustomRule) else SETTLED_IN_PROCESS.get(rule)
    if quick is None:
        return None
    try:
        return quick(item[1], item[2])
    except Exception:  # the pool runs it again and reports the error
        return None


@contextlib.contextmanager
def _stops_held_back():
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


class _Job:
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
    job: _Job | None = None  # the chunk it holds
    taken: bool = False  # it said it has the chunk: it dies of that chunk's calls, if it dies


def _kill(process) -> None:
    """SIGKILL a worker's process group (the worker and whatever its rules started), and the worker itself,
    in case it had not made its group yet. Nothing outlasts SIGKILL: workers ignore SIGTERM, and a call
    stuck in C code ignores everything else."""
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(process.pid, signal.SIGKILL)


class _Pool:
    """Worker processes, each fed one chunk at a time over its own pipe by a thread of ours.

    Not multiprocessing.Pool: it replaces a dead worker silently and the job that worker held never
    completes (each such call waited out its time limit, and was reported as a timeout); and its
    workers share two queues behind locks, so a worker killed while holding one (an idle worker waits
    for a task holding the task queue's) leaves the others waiting forever and Pool.terminate() too.
    Here nothing is shared between workers, and a death is noticed at once and blamed exactly: a
    worker's sentinel (a pipe whose other end only that process holds) becomes readable the moment it
    ends, however it ends, and the pool knows which chunk it had handed that worker. Its exit status,
    asked every POLL_S, backs the sentinel up (a process a rule forked could hold the other end). A
    worker that dies before it says it took its chunk (killed while idle) loses nothing: the chunk goes
    to another worker."""

    def __init__(self, context, size: int):
        self._context, self._size = context, size
        self._lock = threading.Lock()  # _queue, _workers, _closing and each worker's job: the caller's thread vs ours
        self._queue: collections.deque[_Job] = collections.deque()  # chunks no worker holds yet
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
        self._thread = threading.Thread(target=self._run, name="grpo-scoring-pool", daemon=True)
        self._thread.start()

    def submit(self, chunks: list[tuple]) -> list[_Job]:
        jobs = [_Job(args) for args in chunks]
        with self._lock:
            if self._closing:
                raise RuntimeError("the scoring pool is closed")
            self._queue.extend(jobs)
        self._wake()
        return jobs

    def cut_off(self, job: _Job) -> None:
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
            job.finish(RuntimeError("the scorer was closed before this chunk was scored"))

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: the thread is due to wake anyway
            os.write(self._wake_w, b"w")

    def _start(self) -> _Worker:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(target=_worker, args=(theirs,), name="grpo-scoring", daemon=True)
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



class Scorer:
    """A lazily started pool of scoring workers, reused across calls; close() or use as a context.

    `rules` maps names to module-level functions or `rewards.CustomRule`s (workers import them by
    name, so they must be importable: the recipe's directory is put on sys.path before the pool starts).
    """

    def __init__(self, rules: Mapping[str, Rule] = GRADERS, workers: int | None = None,
                 call_timeout_s: float = CALL_TIMEOUT_S, start_margin_s: float = START_MARGIN_S):
        self.rules = dict(rules)
        self.workers = workers or max(1, min(4, os.cpu_count() or 1))
        self.call_timeout_s = call_timeout_s
        self.start_margin_s = start_margin_s
        self._pool: _Pool | None = None
        self._started_at = 0.0

    def _ensure_pool(self):
        if self._pool is None:
            # spawn, not fork: the parent holds torch's threads, which fork does not copy safely.
            context = multiprocessing.get_context("spawn")
            self._started_at = time.monotonic()
            with _stops_held_back():
                self._pool = _Pool(context, self.workers)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _limit(self, chunk: list[Item], rules: dict[str, Rule]) -> float:
        """How long a chunk may take before its worker is killed: every call's alarm, plus start-up."""
        calls = sum(rules[name].timeout_s if isinstance(rules[name], CustomRule) else self.call_timeout_s
                    for name, *_ in chunk)
        return calls + self.call_timeout_s + self.start_margin_s

    def _submit(self, chunks: list[list[Item]], rules: dict[str, Rule]) -> list:
        jobs = self._ensure_pool().submit([(chunk, rules, self.call_timeout_s) for chunk in chunks])
        return list(zip(chunks, jobs))

    def _collect(self, jobs: list, rules: dict[str, Rule]) -> dict[Item, tuple[float, int, str]]:
        results: dict[Item, tuple[float, int, str]] = {}
        while jobs:
            retry = []
            for chunk, job in jobs:
                try:
                    values = self._wait(job, self._limit(chunk, rules))
                except multiprocessing.TimeoutError:
                    if self._pool is not None:
                        self._pool.cut_off(job)  # stuck where its alarm cannot reach it
                    status, what = TIMEOUT, "stopped answering; its worker was killed"
                except WorkerDied as died:
                    status, what = ERROR, str(died)
                else:
                    results.update(zip(chunk, values))
                    continue
                if len(chunk) == 1:
                    results[chunk[0]] = (0.0, status, f"{chunk[0][0]}: {what}")
                else:  # which of its calls it was is unknown: each is tried again on its own
                    retry.extend([item] for item in chunk)
            jobs = self._submit(retry, rules) if retry else []
        return results

    def _wait(self, job, limit: float):
        """The job's results; multiprocessing.TimeoutError after `limit` seconds. While no worker has
        started, WorkersDidNotStart once START_LIMIT_S have passed since the pool was started."""
        deadline = time.monotonic() + limit
        while True:
            remaining = deadline - time.monotonic()
            try:
                return job.get(timeout=max(0.0, min(remaining, 1.0)))
            except multiprocessing.TimeoutError:
                if remaining <= 1.0:
                    raise
                started = self._pool is None or self._pool.started > 0
                if not started and time.monotonic() - self._started_at > START_LIMIT_S:
                    self.close()
                    raise WorkersDidNotStart(
                        f"the reward-scoring worker processes did not start: none was ready {START_LIMIT_S:g} s "
                        "after the pool started, so they are most likely failing as they start (their errors are "
                        "printed above). " + UNGUARDED_SCRIPT_HINT) from None

    def submit(self, rules: list[str] | tuple[str, ...], completions: list[str], answers: list[str],
               contexts: list[dict] | None = None) -> "Pending":
        """Start scoring every rule on every (completion, answer) pair; `.result()` waits for it.

        `contexts` (the prompt and the row's fields, one dict per completion) reach custom rules
        only. The work runs in the worker processes, so the caller can do other work meanwhile.
        """
        rules = tuple(rules)
        unknown = [r for r in rules if r not in self.rules]
        if unknown:
            raise KeyError(f"no reward rule named {unknown[0]!r}; known: {', '.join(self.rules)}")
        used = {name: self.rules[name] for name in rules}
        encoded = [json.dumps(c, default=str, sort_keys=True) for c in contexts] if contexts else [""] * len(completions)
        keys = [[(r, c, a, ctx if isinstance(used[r], CustomRule) else "") for r in rules]
                for c, a, ctx in zip(completions, answers, encoded, strict=True)]
        settled, pooled = {}, []
        for item in dict.fromkeys(item for row in keys for item in row):
            value = _settle(used[item[0]], item)
            if value is None:
                pooled.append(item)
            else:
                settled[item] = (value, OK, "")
        jobs = self._submit([pooled[i : i + CHUNK] for i in range(0, len(pooled), CHUNK)], used) if pooled else []
        return Pending(self, jobs, used, rules, keys, settled)

    def score(self, rules: list[str] | tuple[str, ...], completions: list[str], answers: list[str],
              contexts: list[dict] | None = None) -> Scores:
        """Every rule on every (completion, answer) pair."""
        return self.submit(rules, completions, answers, contexts).result()


@dataclass
class Pending:
    """Scoring under way in the pool."""

    scorer: Scorer
    jobs: list
    used: dict
    rules: tuple[str, ...]
    keys: list[list[Item]]  # [N][R] the item behind each value
    settled: dict  # items graded in this process: item -> (value, status, message)

    def result(self) -> Scores:
        results = {**self.settled, **self.scorer._collect(self.jobs, self.used)}
        shape = (len(self.keys), len(self.rules))
        values = np.array([[results[item][0] for item in row] for row in self.keys], dtype=np.float64).reshape(shape)
        status = np.array([[results[item][1] for item in row] for row in self.keys], dtype=np.int8).reshape(shape)
        statuses = [code for _, code, _ in results.values()]  # each distinct call once
        messages = tuple(dict.fromkeys(m for _, _, m in results.values() if m))[:3]
        return Scores(values, self.rules, statuses.count(TIMEOUT), statuses.count(ERROR), messages, status)
