"""Run reward rules over many completions without letting one of them hang or break the run.

The rules are pure functions (`rewards`). Here they run in worker processes
(`worker_pool.WorkerPool`), each call under a per-call alarm. Inside a worker the call runs on
the process's main thread, so the alarm works whatever thread called us (the trap math-verify's
own timeouts fall into). A call that ignores the alarm (stuck in C code) is cut off from
outside: its worker is killed. A worker can also die on its own (a rule calls `sys.exit` or
`os._exit`, the OOM killer picks it); the pool knows at once which chunk a death lost. Either
way the pool starts another worker and the rest of the lost chunk is tried again one item at a
time, so only the offender is lost.

A call cut off scores 0 and is counted in `Scores.timeouts`; a call whose worker died, and
a rule that raises or returns something that is not a finite number, score 0 and are
counted in `Scores.errors`, with the first messages kept for a warning; a custom rule that
returns None skips that completion (NaN here: it adds nothing to the reward and is left out
of the rule's mean). Identical calls are made once. The workers leave Ctrl-C and SIGTERM to
the trainer, and nothing a rule started and left running outlives the scorer (rewards/worker_pool.py).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import time
from collections import ChainMap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from grpo_cli.rewards.answers import equivalence, extract_final_answer, settled_without_parsing
from grpo_cli.rewards.rules import RULE_FUNCTIONS, CustomRule, Rule, correctness
from grpo_cli.tools.calls import Span, model_text, printed_spans
from grpo_cli.rewards.worker_pool import WorkerDied, WorkerPool, stops_held_back

CALL_TIMEOUT_S = 5.0
START_MARGIN_S = 30.0  # a fresh worker imports SymPy and math-verify before its first item
START_LIMIT_S = 60.0  # no worker started by then: they fail as they start (see WorkersDidNotStart)
CHUNK = 32
OK, TIMEOUT, ERROR = 0, 1, 2
# What the pool runs by default: the reward rules, and answer-to-answer equivalence for majority votes.
GRADERS: Mapping[str, Rule] = ChainMap({"equivalent": equivalence}, RULE_FUNCTIONS)  # live: registered rules too

# (rule, completion as the rule sees it (builtin: the model's own text), answer, context as JSON; "" for builtin rules)
Item = tuple[str, str, str, str]


def _settled_correctness(completion: str, answer: str) -> float | None:
    settled = settled_without_parsing(extract_final_answer(completion), answer)
    return None if settled is None else float(settled)


def _settled_equivalence(pred: str, gold: str) -> float | None:
    settled = settled_without_parsing(pred, gold)
    return None if settled is None else float(settled)


# Graders whose verdict usually needs no parsing (no answer, equal text, two integers): those
# items are graded in the calling process, the rest in the pool. Each is a little string work
# that cannot hang, while a pool busy beside the update takes a core from torch's threads and
# slows the reference pass (docs/performance.md, "Scoring").
SETTLED_IN_PROCESS: dict[Rule, Callable[[str, str], float | None]] = {
    correctness: _settled_correctness, equivalence: _settled_equivalence}


@dataclass(kw_only=True, frozen=True)
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


def _prepare_worker() -> None:
    """Import SymPy and math-verify in a starting worker, before the first timed call, so no alarm
    counts the imports."""
    from grpo_cli.rewards.answers import is_equivalent

    is_equivalent("1/2", "0.5")


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
        self._pool: WorkerPool | None = None
        self._started_at = 0.0

    def _ensure_pool(self):
        if self._pool is None:
            # spawn, not fork: the parent holds torch's threads, which fork does not copy safely.
            context = multiprocessing.get_context("spawn")
            self._started_at = time.monotonic()
            with stops_held_back():
                self._pool = WorkerPool(context, self.workers, task=_score_items, prepare=_prepare_worker)
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
               contexts: list[dict] | None = None, tool_outputs: list[list[Span]] | None = None) -> "Pending":
        """Start scoring every rule on every (completion, answer) pair; `.result()` waits for it.

        `contexts` (the prompt and the row's fields, one dict per completion) reach custom rules
        only. `tool_outputs`: per completion, the characters the code tool printed (a rollout knows
        them from its masks); without them they are read from the text (tool_calls.printed_spans).
        Builtin rules grade the model's own text (tool_calls.model_text); custom rules get the whole
        transcript and `tool_outputs`. The work runs in the worker processes, so the caller can do
        other work meanwhile.
        """
        rules = tuple(rules)
        unknown = [r for r in rules if r not in self.rules]
        if unknown:
            raise KeyError(f"no reward rule named {unknown[0]!r}; known: {', '.join(self.rules)}")
        used = {name: self.rules[name] for name in rules}
        custom = any(isinstance(rule, CustomRule) for rule in used.values())
        printed = tool_outputs if tool_outputs is not None else [printed_spans(c) for c in completions]
        keys = []
        for c, a, context, spans in zip(completions, answers, contexts or [{}] * len(completions), printed,
                                        strict=True):
            own = model_text(c, spans)
            encoded = json.dumps({**context, "tool_outputs": spans}, default=str, sort_keys=True) if custom else ""
            keys.append([(r, c, a, encoded) if isinstance(used[r], CustomRule) else (r, own, a, "") for r in rules])
        settled, pooled = {}, []
        for item in dict.fromkeys(item for row in keys for item in row):
            value = _settle(used[item[0]], item)
            if value is None:
                pooled.append(item)
            else:
                settled[item] = (value, OK, "")
        jobs = self._submit([pooled[i : i + CHUNK] for i in range(0, len(pooled), CHUNK)], used) if pooled else []
        return Pending(scorer=self, jobs=jobs, used=used, rules=rules, keys=keys, settled=settled)

    def score(self, rules: list[str] | tuple[str, ...], completions: list[str], answers: list[str],
              contexts: list[dict] | None = None, tool_outputs: list[list[Span]] | None = None) -> Scores:
        """Every rule on every (completion, answer) pair (see submit)."""
        return self.submit(rules, completions, answers, contexts, tool_outputs).result()


@dataclass(kw_only=True)
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
        return Scores(values=values, rules=self.rules, timeouts=statuses.count(TIMEOUT), errors=statuses.count(ERROR),
                      messages=messages, status=status)
