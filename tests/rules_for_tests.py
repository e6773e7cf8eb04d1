"""Reward rules that misbehave on purpose, importable by the scoring workers."""

import signal
import time


def length(completion, answer):
    return float(len(completion))


def sleeps(completion, answer):
    time.sleep(60)  # interruptible: the worker's alarm stops it
    return 1.0


def ignores_alarms(completion, answer):
    signal.signal(signal.SIGALRM, signal.SIG_IGN)  # like a C extension stuck in a loop
    time.sleep(60)
    return 1.0


def raises(completion, answer):
    raise ValueError("broken rule")


def skips_odd(completion, answer, prompt, **fields):
    return None if len(completion) % 2 else float(fields["level"])


def returns_text(completion, answer):
    return "high"


def ctrl_c_ignored(completion, answer):
    return float(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)


def hangs_on_slow(completion, answer):
    """Grades like `correctness`, except that it never finishes when either text is 'slow'."""
    from grpo_cli.rewards.answers import is_correct

    if "slow" in (completion, answer):
        time.sleep(60)  # interruptible: the worker's alarm stops it
    return float(is_correct(completion, answer))


def exits_on_x(completion, answer):
    """Its length, except that on 'x' it ends its worker process at once (no cleanup, exit code 3)."""
    import os

    if completion == "x":
        os._exit(3)
    return float(len(completion))


def sys_exits_on_x(completion, answer):
    import sys

    if completion == "x":
        sys.exit(3)
    return float(len(completion))


def killed_on_x(completion, answer):
    """Its length, except that on 'x' its worker is killed from outside, as the OOM killer would."""
    import os

    if completion == "x":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)
    return float(len(completion))


def starts_a_sleeper(completion, answer):
    """Starts `sleep 600` without waiting for it; returns that process's pid."""
    import subprocess

    return float(subprocess.Popen(["sleep", "600"]).pid)


def worker_pid(completion, answer):
    import os

    return float(os.getpid())


def slow_worker_pid(completion, answer):
    """Creates the file named by `completion` (the call has begun), sleeps 2 s, returns the worker's pid."""
    import os
    from pathlib import Path

    Path(completion).touch()
    time.sleep(2.0)
    return float(os.getpid())
