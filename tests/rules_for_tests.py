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
    from grpo_cli.answers import is_correct

    if "slow" in (completion, answer):
        time.sleep(60)  # interruptible: the worker's alarm stops it
    return float(is_correct(completion, answer))
