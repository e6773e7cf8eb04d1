"""torch's thread count from the CPUs that are free: the override, the count a deterministic run keeps, and a
real busy neighbour seen as one (while this process's own children are not)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from grpo_cli.run import threads

SPIN = "import time\nend = time.time() + 30\nwhile time.time() < end: pass\n"


@pytest.fixture(autouse=True)
def keep_torch_threads(monkeypatch):
    for name in threads.OVERRIDES:
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("others, usable, free", [
    (0.0, 2, 2), (0.4, 2, 2), (0.6, 2, 1), (1.0, 2, 1), (1.9, 2, 1), (3.0, 2, 1), (1.0, 8, 7), (2.5, 8, 5),
])
def test_a_cpu_others_keep_more_than_half_busy_is_taken(others, usable, free):
    assert threads.free_count(others, usable) == free


def test_an_explicit_count_wins_and_is_never_changed(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    said = []
    watch = threads.apply(said.append)
    assert torch.get_num_threads() == 3 and said == ["CPU threads: 3 (OMP_NUM_THREADS=3)"] and not watch.adapt
    monkeypatch.setenv("GRPO_NUM_THREADS", "1")  # grpo's own name first
    assert threads.choose().threads == 1


def test_a_deterministic_run_keeps_its_count_and_a_resumed_one_the_count_it_had():
    said = []
    watch = threads.apply(said.append, deterministic=True)
    assert not watch.adapt and "kept for the run" in said[0]
    watch = threads.apply(said.append, deterministic=True, resumed=1)
    assert torch.get_num_threads() == 1 and watch.threads == 1 and "before it was resumed" in said[1]
    assert threads.apply(None, deterministic=False).adapt


def spinner_outside_this_process_tree() -> int:
    """A busy Python loop that is not our descendant (its parent exits at once), for 30 s at most."""
    started = subprocess.run(["sh", "-c", f"{sys.executable} -c '{SPIN}' >/dev/null 2>&1 & echo $!"],
                             capture_output=True, text=True, check=True)
    return int(started.stdout.strip())


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: a busy neighbour leaves it 'free' as 1")
def test_a_busy_neighbour_is_seen_and_this_run_s_own_children_are_not():
    pid = spinner_outside_this_process_tree()
    try:
        time.sleep(0.3)
        free, usable = threads.free_cpus(1.0)
        assert free <= usable - 1, (free, usable)
    finally:
        os.kill(pid, signal.SIGKILL)
    child = subprocess.Popen([sys.executable, "-c", SPIN])  # this process's own work, as a scoring worker's
    try:
        time.sleep(0.3)
        before = threads.CpuSample()
        time.sleep(1.0)
        after = threads.CpuSample()
        allowed, _ = threads.usable_cpus()
        assert threads.others_busy(before, after, allowed) < 0.5 + _background(allowed)
    finally:
        child.kill()
        child.wait()


def _background(allowed) -> float:
    """What the rest of the machine keeps busy right now, measured with nothing of ours running."""
    before = threads.CpuSample()
    time.sleep(0.5)
    return threads.others_busy(before, threads.CpuSample(), allowed)
