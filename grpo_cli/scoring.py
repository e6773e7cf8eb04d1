"""Run reward rules over many completions without letting one of them hang the run.

The rules are pure functions (`rewards.RULES`). Here they run in a pool of worker
processes, each call under a per-call alarm. Inside a worker the call runs on
the process's main thread, so the alarm works whatever thread called us (the
trap math-verify's own timeouts fall into). A call that ignores the alarm (stuck
in C code) is cut off from outside: the pool is killed and the rest of its chunk
is retried one item at a time, so only the offender is lost. A call cut off
either way scores 0 and is counted in `Scores.timeouts`; a rule that raises
scores 0 and is counted in `Scores.errors`. Identical (rule, completion, answer)
triples are scored once.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from grpo_cli.answers import equivalence
from grpo_cli.rewards import RULES, Rule

CALL_TIMEOUT_S = 5.0
START_MARGIN_S = 30.0  # a fresh worker imports SymPy and math-verify before its first item
CHUNK = 32
# What the pool runs by default: the reward rules, and answer-to-answer equivalence for majority votes.
GRADERS: dict[str, Rule] = {**RULES, "equivalent": equivalence}
OK, TIMEOUT, ERROR = 0, 1, 2

Item = tuple[str, str, str]  # (rule, completion, answer)


@dataclass(frozen=True)
class Scores:
    values: np.ndarray  # [N, R] one column per rule, in the order asked
    rules: tuple[str, ...]
    timeouts: int  # calls cut off (scored 0)
    errors: int  # calls that raised (scored 0)

    def column(self, rule: str) -> np.ndarray:  # [N]
        return self.values[:, self.rules.index(rule)]


class _Alarm(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Alarm


def _prepare_worker() -> None:
    """Import SymPy and math-verify before the first timed call, so no alarm counts the imports."""
    from grpo_cli.answers import is_equivalent

    is_equivalent("1/2", "0.5")


def _score_items(items: list[Item], rules: dict[str, Rule], timeout_s: float) -> list[tuple[float, int]]:
    """Worker side: (value, status) for each item, each call under its own alarm."""
    signal.signal(signal.SIGALRM, _on_alarm)
    results = []
    for rule, completion, answer in items:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            results.append((float(rules[rule](completion, answer)), OK))
        except _Alarm:
            results.append((0.0, TIMEOUT))
        except Exception:
            results.append((0.0, ERROR))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    return results


class Scorer:
    """A lazily started pool of scoring workers, reused across calls; close() or use as a context.

    `rules` maps names to module-level functions (workers import them by name).
    """

    def __init__(self, rules: Mapping[str, Rule] = GRADERS, workers: int | None = None,
                 call_timeout_s: float = CALL_TIMEOUT_S, start_margin_s: float = START_MARGIN_S):
        self.rules = dict(rules)
        self.workers = workers or max(1, min(4, os.cpu_count() or 1))
        self.call_timeout_s = call_timeout_s
        self.start_margin_s = start_margin_s
        self._pool = None

    def _ensure_pool(self):
        if self._pool is None:
            # spawn, not fork: the parent holds torch's threads, which fork does not copy safely.
            self._pool = multiprocessing.get_context("spawn").Pool(self.workers, initializer=_prepare_worker)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _submit(self, chunks: list[list[Item]], rules: dict[str, Rule]) -> list:
        pool = self._ensure_pool()
        return [(chunk, pool.apply_async(_score_items, (chunk, rules, self.call_timeout_s))) for chunk in chunks]

    def _collect(self, jobs: list, rules: dict[str, Rule]) -> dict[Item, tuple[float, int]]:
        results: dict[Item, tuple[float, int]] = {}
        while jobs:
            retry = []
            for index, (chunk, job) in enumerate(jobs):
                try:
                    # The worker's alarm fires long before this; the margin covers a worker's start-up.
                    limit = self.call_timeout_s * (len(chunk) + 1) + self.start_margin_s
                    results.update(zip(chunk, job.get(timeout=limit)))
                except multiprocessing.TimeoutError:
                    self.close()
                    if len(chunk) == 1:
                        results[chunk[0]] = (0.0, TIMEOUT)
                    else:
                        retry.extend([item] for item in chunk)
                    retry.extend(c for c, j in jobs[index + 1 :])
                    break
            jobs = self._submit(retry, rules) if retry else []
        return results

    def submit(self, rules: list[str] | tuple[str, ...], completions: list[str], answers: list[str]) -> "Pending":
        """Start scoring every rule on every (completion, answer) pair; `.result()` waits for it.

        The work runs in the worker processes, so the caller can do other work meanwhile.
        """
        rules = tuple(rules)
        unknown = [r for r in rules if r not in self.rules]
        if unknown:
            raise KeyError(f"no reward rule named {unknown[0]!r}; known: {', '.join(self.rules)}")
        items = list(dict.fromkeys((r, c, a) for c, a in zip(completions, answers, strict=True) for r in rules))
        used = {name: self.rules[name] for name in rules}
        jobs = self._submit([items[i : i + CHUNK] for i in range(0, len(items), CHUNK)], used) if items else []
        return Pending(self, jobs, used, rules, list(completions), list(answers))

    def score(self, rules: list[str] | tuple[str, ...], completions: list[str], answers: list[str]) -> Scores:
        """Every rule on every (completion, answer) pair."""
        return self.submit(rules, completions, answers).result()


@dataclass
class Pending:
    """Scoring under way in the pool."""

    scorer: Scorer
    jobs: list
    used: dict
    rules: tuple[str, ...]
    completions: list[str]
    answers: list[str]

    def result(self) -> Scores:
        results = self.scorer._collect(self.jobs, self.used)
        values = np.array(
            [[results[(r, c, a)][0] for r in self.rules] for c, a in zip(self.completions, self.answers)],
            dtype=np.float64,
        ).reshape(len(self.completions), len(self.rules))
        statuses = [status for _, status in results.values()]
        return Scores(values, self.rules, statuses.count(TIMEOUT), statuses.count(ERROR))
