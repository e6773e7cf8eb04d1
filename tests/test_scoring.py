import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import rules_for_tests as bad
from grpo_cli.rewards.rules import RULE_FUNCTIONS, correctness, step_format
from grpo_cli.rewards import scoring
from grpo_cli.rewards.scoring import ERROR, OK, Scorer


def test_pool_scores_match_the_pure_functions():
    completions = ["3+8=11. #### 11", " #### 12", "x = 2 or x = 3", "no idea"] * 3
    answers = ["11", "11", "2, 3", "4"] * 3
    with Scorer() as scorer:
        scores = scorer.score(["correctness", "step_format"], completions, answers)
    expected = [[correctness(c, a), step_format(c, a)] for c, a in zip(completions, answers)]
    assert scores.values.tolist() == expected
    assert scores.column("correctness").tolist() == [1.0, 0.0, 1.0, 0.0] * 3
    assert scores.timeouts == 0 and scores.errors == 0


def test_answers_that_need_no_parsing_are_graded_without_the_pool():
    with Scorer() as scorer:
        scores = scorer.score(["correctness"], ["3+8=11. #### 11", "#### 12", "no idea", "#### 1,000"],
                              ["11", "11", "4", "1000"])
        assert scorer._pool is None  # no worker process was started for these
        assert scores.values[:, 0].tolist() == [1.0, 0.0, 0.0, 1.0]
        # answers that need math-verify go to the pool
        assert scorer.score(["correctness"], ["\\boxed{\\frac{1}{2}}", "x = 2 or x = 3"],
                            ["0.5", "2, 3"]).values.tolist() == [[1.0], [1.0]]
        assert scorer._pool is not None


def test_works_from_a_worker_thread():
    # math-verify's own timeouts use signal.alarm and break off the main thread; ours do not.
    result = {}

    def run():
        with Scorer(workers=1) as scorer:
            result["scores"] = scorer.score(["correctness"], ["\\boxed{\\frac{1}{2}}"], ["0.5"])

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(120)
    assert result["scores"].values.tolist() == [[1.0]]


def test_a_slow_rule_times_out_and_scores_zero():
    rules = {**RULE_FUNCTIONS, "sleeps": bad.sleeps, "length": bad.length}
    with Scorer(rules, workers=1, call_timeout_s=0.5) as scorer:
        started = time.perf_counter()
        scores = scorer.score(["length", "sleeps"], ["abc", "de"], ["1", "2"])
        elapsed = time.perf_counter() - started
    assert scores.values.tolist() == [[3.0, 0.0], [2.0, 0.0]]
    assert scores.timeouts == 2
    assert elapsed < 30


def test_a_rule_that_ignores_the_alarm_is_cut_off_from_outside():
    rules = {"stuck": bad.ignores_alarms, "length": bad.length}
    with Scorer(rules, workers=1, call_timeout_s=0.5, start_margin_s=2.0) as scorer:
        scorer.score(["length"], ["warm-up"], ["x"])  # start the worker before timing
        started = time.perf_counter()
        scores = scorer.score(["length", "stuck"], ["abcd"], ["1"])
        elapsed = time.perf_counter() - started
        after = scorer.score(["length"], ["again"], ["1"])  # the pool came back
    assert scores.values.tolist() == [[4.0, 0.0]]
    assert scores.timeouts == 1
    assert elapsed < 30
    assert after.values.tolist() == [[5.0]]


def test_a_raising_rule_scores_zero_and_is_counted():
    with Scorer({"raises": bad.raises, "length": bad.length}, workers=1) as scorer:
        scores = scorer.score(["raises", "length"], ["ab"], ["1"])
    assert scores.values.tolist() == [[0.0, 2.0]] and scores.errors == 1


def test_duplicates_are_scored_once_but_returned_for_every_row():
    with Scorer({"length": bad.length}, workers=1) as scorer:
        scores = scorer.score(["length"], ["aa", "aa", "b"], ["1", "1", "1"])
    assert np.array_equal(scores.values, np.array([[2.0], [2.0], [1.0]]))


def test_unknown_rule_is_refused():
    with pytest.raises(KeyError, match="no reward rule named 'nope'"):
        Scorer().score(["nope"], ["a"], ["b"])


def test_custom_rules_get_their_context_skip_and_fail_cleanly():
    from grpo_cli.rewards.rules import CustomRule

    rules = {"skips": CustomRule(function=bad.skips_odd, timeout_s=2.0),
             "text": CustomRule(function=bad.returns_text, timeout_s=2.0),
             "slow": CustomRule(function=bad.sleeps, timeout_s=0.3)}
    with Scorer(rules, workers=1) as scorer:
        scores = scorer.score(["skips", "text", "slow"], ["ab", "abc"], ["1", "1"],
                              [{"prompt": "p", "level": 3}, {"prompt": "p", "level": 4}])
    assert scores.column("skips")[0] == 3.0 and np.isnan(scores.column("skips")[1])  # None: skipped
    assert scores.column("text").tolist() == [0.0, 0.0] and scores.errors == 2
    assert scores.column("slow").tolist() == [0.0, 0.0] and scores.timeouts == 2
    assert any("text: returned 'high', not a finite number" in m for m in scores.messages)
    assert any("slow: took longer than 0.3s" in m for m in scores.messages)


def test_workers_leave_ctrl_c_to_the_trainer():
    with Scorer({"ignored": bad.ctrl_c_ignored}, workers=1) as scorer:
        assert scorer.score(["ignored"], ["x"], ["y"]).values.tolist() == [[1.0]]


def test_ctrl_c_while_the_pool_starts_arrives_once_it_is_up(monkeypatch):
    start = scoring.WorkerPool

    def interrupted_start(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of starting the workers
        return start(*args, **kwargs)

    monkeypatch.setattr(scoring, "WorkerPool", interrupted_start)
    # Python's own handler, whatever this process inherited: a shell starts a background job
    # (`pytest &`) with Ctrl-C ignored, and the held-back press is then rightly ignored too.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    scorer = Scorer({"length": bad.length}, workers=1)
    try:
        with pytest.raises(KeyboardInterrupt):
            scorer.score(["length"], ["abc"], ["x"])
        assert scorer._pool is not None  # the workers had all started when the interrupt landed
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the trainer's handler is back
    finally:
        scorer.close()
        signal.signal(signal.SIGINT, inherited)


def running(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


@pytest.mark.parametrize("rule, how", [(bad.exits_on_x, "exit code 3"), (bad.sys_exits_on_x, "exit code 3"),
                                       (bad.killed_on_x, "killed by SIGKILL")],
                         ids=["os._exit", "sys.exit", "SIGKILL"])
def test_a_worker_that_dies_costs_only_its_call(rule, how):
    # The pool replaced a dead worker silently and its job's result never came: every such call waited
    # out the job's time limit (one step took 685 s) and was reported as a timeout.
    with Scorer({"dies": rule, "length": bad.length}, workers=2) as scorer:
        scorer.score(["length"], ["warm-up"], ["x"])  # start the workers before timing
        started = time.perf_counter()
        scores = scorer.score(["length", "dies"], ["ab", "x", "abc"], ["1", "1", "1"])  # one chunk of 6 calls
        elapsed = time.perf_counter() - started
        after = scorer.score(["dies", "length"], ["abcd"], ["1"])  # the pool works on
    assert scores.column("length").tolist() == [2.0, 1.0, 3.0]
    assert scores.column("dies").tolist() == [2.0, 0.0, 3.0]  # only the call that killed its worker is lost
    assert scores.errors == 1 and scores.timeouts == 0
    assert scores.status[:, 1].tolist() == [OK, ERROR, OK]
    assert any(m.startswith("dies: ") and "worker process died" in m and how in m for m in scores.messages), \
        scores.messages
    assert elapsed < 15  # a hang check: the job limit was 45 s and more
    assert after.values.tolist() == [[4.0, 4.0]] and after.errors == 0


def test_processes_a_rule_leaves_running_end_with_the_scorer():
    with Scorer({"spawns": bad.starts_a_sleeper}, workers=1) as scorer:
        sleeper = int(scorer.score(["spawns"], ["a"], ["b"]).values[0, 0])
        assert running(sleeper)
    try:
        deadline = time.monotonic() + 5  # its new parent, init, reaps it after the kill
        while running(sleeper) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(sleeper), "the rule's child outlived the scorer"
    finally:
        if running(sleeper):
            os.kill(sleeper, signal.SIGKILL)


def test_workers_leave_sigterm_to_the_trainer_and_still_end_on_close(tmp_path):
    # Slurm sends SIGTERM to every process of a job; the trainer finishes its step on it, so a worker
    # must not die with that step's scores. The scorer still ends it when it closes.
    began = tmp_path / "began"
    scorer = Scorer({"pid": bad.worker_pid, "slow": bad.slow_worker_pid}, workers=1)
    try:
        pid = int(scorer.score(["pid"], ["x"], ["y"]).values[0, 0])
        pending = scorer.submit(["slow"], [str(began)], ["y"])
        deadline = time.monotonic() + 60
        while not began.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(pid, signal.SIGTERM)  # while the call runs
        scores = pending.result()
        assert scores.values.tolist() == [[float(pid)]] and scores.errors == 0 and scores.timeouts == 0
        assert running(pid)
    finally:
        started = time.perf_counter()
        scorer.close()
        closing = time.perf_counter() - started
    assert not running(pid) and closing < 10


def test_sigterm_while_the_pool_starts_arrives_once_it_is_up(monkeypatch):
    # `grpo eval` stops at once on SIGTERM, from wherever the main thread is: held back like Ctrl-C.
    class Terminated(BaseException):
        pass

    def stop(signum, frame):
        raise Terminated

    start = scoring.WorkerPool

    def terminated_start(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return start(*args, **kwargs)

    monkeypatch.setattr(scoring, "WorkerPool", terminated_start)
    inherited = signal.signal(signal.SIGTERM, stop)
    scorer = Scorer({"length": bad.length}, workers=1)
    try:
        with pytest.raises(Terminated):
            scorer.score(["length"], ["abc"], ["x"])
        assert scorer._pool is not None and signal.getsignal(signal.SIGTERM) is stop
    finally:
        scorer.close()
        signal.signal(signal.SIGTERM, inherited)
