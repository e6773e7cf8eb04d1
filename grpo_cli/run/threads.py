"""How many threads torch computes with on the CPU: as many as there are CPUs free right now.

torch starts one OpenMP thread per core it may run on, and each parallel region waits for all of
them. On a machine where another process keeps a core busy, the thread that lands on that core
runs late every time and the others spin waiting for it: on 2 cores beside one busy process the
quickstart's step takes several times as long with torch's default as with one thread
(scripts/busy_cpu.py measures it). So the CPUs
this process may use (its affinity mask, capped by a cgroup CPU quota) are sampled for a moment,
and a CPU that others keep more than half busy is not counted. An explicit choice always wins:
GRPO_NUM_THREADS, else OMP_NUM_THREADS, as the user set it. A run with train.deterministic (the
default) keeps the count it started with; one without follows its neighbours step by step (`Watch`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

SAMPLE_S = 0.25  # long enough to see a busy process, short enough not to be noticed at start-up
BUSY = 0.5  # a CPU others use more than this share of the time is not free
OVERRIDES = ("GRPO_NUM_THREADS", "OMP_NUM_THREADS")


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    why: str


def _allowed_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def _quota() -> float | None:
    """CPUs' worth of time the cgroup (v2) allows this process, or None without a limit."""
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _cpu_times() -> dict[int, tuple[int, int]]:
    """cpu -> (busy ticks, all ticks) from /proc/stat."""
    times = {}
    with open("/proc/stat") as stat:
        for line in stat:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu":
                continue
            ticks = [int(f) for f in fields[:8]]
            idle = ticks[3] + ticks[4]  # idle + iowait
            times[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    return times


def _stat(pid: int | str) -> list[str]:
    """/proc/PID/stat's fields after the command name (which may hold spaces): [0] state, [1] ppid ..."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()


def _own_ticks() -> int:
    """Ticks this process and its live descendants have run (user + system), threads included: the
    scoring workers and the code sandbox are this run's work, not a neighbour's."""
    me = os.getpid()
    parents, ticks = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = _stat(entry)
        except (OSError, IndexError):  # ended while we looked
            continue
        parents[int(entry)] = int(fields[1])
        ticks[int(entry)] = int(fields[11]) + int(fields[12])

    def ours(pid: int) -> bool:
        seen = 0
        while pid > 1 and seen < 64:
            if pid == me:
                return True
            pid, seen = parents.get(pid, 0), seen + 1
        return False

    return sum(count for pid, count in ticks.items() if ours(pid))


class CpuSample:
    """The CPUs' and this process's ticks at one moment; two samples tell how busy others kept the CPUs."""

    def __init__(self):
        self.cpus, self.own = _cpu_times(), _own_ticks()


def others_busy(before: CpuSample, after: CpuSample, allowed: list[int]) -> float:
    """CPUs' worth of work other processes did on `allowed` between the samples (ours taken off)."""
    busy = total = counted = 0
    for cpu in allowed:
        if cpu in before.cpus and cpu in after.cpus:
            busy += after.cpus[cpu][0] - before.cpus[cpu][0]
            total += after.cpus[cpu][1] - before.cpus[cpu][1]
            counted += 1
    if total <= 0 or counted == 0:
        return 0.0
    per_cpu = total / counted  # ticks one CPU had in the interval
    return max(0.0, (busy - (after.own - before.own)) / per_cpu)


def usable_cpus() -> tuple[list[int], int]:
    """(the CPUs this process may run on, how many it may keep busy: the affinity mask capped by a quota)."""
    allowed = _allowed_cpus()
    quota = _quota()
    return allowed, len(allowed) if quota is None else max(1, min(len(allowed), int(quota)))


def free_count(others: float, usable: int) -> int:
    """CPUs left when others keep `others` CPUs' worth busy: a CPU they use more than BUSY of is taken."""
    taken = int(others + (1 - BUSY))
    return max(1, usable - taken)


def free_cpus(sample_s: float = SAMPLE_S) -> tuple[int, int]:
    """(CPUs free of other processes, CPUs this process may use), over a short sample."""
    allowed, usable = usable_cpus()
    try:
        before = CpuSample()
        time.sleep(sample_s)
        after = CpuSample()
    except (OSError, ValueError):  # no /proc: nothing known about others
        return usable, usable
    return free_count(others_busy(before, after, allowed), usable), usable


def override() -> ThreadChoice | None:
    """The count the user set (GRPO_NUM_THREADS, else OMP_NUM_THREADS), or None."""
    for name in OVERRIDES:
        value = os.environ.get(name, "").strip()
        if value:
            try:
                threads = int(value)
            except ValueError:
                continue
            if threads >= 1:
                return ThreadChoice(threads, f"{name}={threads}")
    return None


def choose() -> ThreadChoice:
    """The thread count to use and why (for the start-up line)."""
    chosen = override()
    if chosen is not None:
        return chosen
    free, usable = free_cpus()
    if free == usable:
        return ThreadChoice(free, f"{usable} CPUs, all free; GRPO_NUM_THREADS=N to choose")
    return ThreadChoice(free, f"{free} of {usable} CPUs free, the others busy with other processes; "
                              "GRPO_NUM_THREADS=N to choose")


class Watch:
    """The thread count kept right while a run goes on: after each step, how busy other processes kept
    the CPUs during it decides the next step's count (a busy neighbour may start or stop mid-run).
    An explicit GRPO_NUM_THREADS / OMP_NUM_THREADS is never changed, and neither is a share of torchrun's.
    Nor is a deterministic run's (train.deterministic): the thread count changes how float sums are split,
    so a run that must give the same bits for its seed keeps the count it started with, across a resume too."""

    def __init__(self, choice: ThreadChoice, adapt: bool):
        self.threads, self.adapt = choice.threads, adapt
        self.allowed, self.usable = usable_cpus()
        self.last = CpuSample() if adapt else None

    def recheck(self, progress=None) -> None:
        if not self.adapt:
            return
        try:
            now = CpuSample()
        except (OSError, ValueError):
            return
        free = free_count(others_busy(self.last, now, self.allowed), self.usable)
        self.last = now
        if free != self.threads:
            import torch

            if progress:
                progress(f"CPU threads: {self.threads} -> {free} (other processes now keep "
                         f"{self.usable - free} of {self.usable} CPUs busy)")
            self.threads = free
            torch.set_num_threads(free)


def apply(progress=None, processes: int = 1, deterministic: bool = False, resumed: int | None = None) -> Watch:
    """Set torch's intra-op threads to the choice and say so. `processes`: how many processes of this
    run share the machine (torchrun's local world); each takes its share of the free CPUs. `deterministic`:
    keep the count for the whole run, and `resumed`, the count the run used before a resume, is kept."""
    import torch

    choice = override()
    overridden = choice is not None
    if not overridden and deterministic and resumed is not None:  # the run's count is known: no CPUs sampled
        choice = ThreadChoice(resumed, "the count the run had before it was resumed: train.deterministic keeps it, "
                                       "as float sums depend on it; GRPO_NUM_THREADS=N to choose")
    elif not overridden:
        choice = choose()
        if processes > 1:
            choice = ThreadChoice(max(1, choice.threads // processes),
                                  f"{choice.why}; shared by {processes} processes")
        elif deterministic:
            choice = ThreadChoice(choice.threads, f"{choice.why}; kept for the run, as train.deterministic needs")
    torch.set_num_threads(choice.threads)
    if progress:
        progress(f"CPU threads: {choice.threads} ({choice.why})")
    return Watch(choice, adapt=not overridden and processes == 1 and not deterministic)
