"""What keeps a run alive: Ctrl-C, non-finite numbers, and running out of GPU memory.

- The first Ctrl-C lets the current step finish, saves a checkpoint and stops with
  exit code 130; a second one stops at once.
- A step whose rewards, loss or gradients are not finite is not applied (the
  optimizer skips it and it is logged); after `train.max_bad_steps` such steps in a
  row the run stops, its last checkpoint untouched, with a message saying why.
- CUDA running out of memory becomes a message naming the settings to lower.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from grpo_cli.errors import UserError


class Stopped(UserError):
    """The run stopped on purpose (Ctrl-C) after saving."""

    exit_code = 130


class Halted(UserError):
    """The run stopped because it could not go on safely."""

    exit_code = 3


class Interrupts:
    """Catches Ctrl-C while training: the first asks to stop after the step, the second stops now."""

    def __init__(self, notify):
        self.notify = notify
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.notify("Ctrl-C: finishing this step and saving a checkpoint; press Ctrl-C again to stop at once.")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class NonFiniteGuard:
    """Counts consecutive steps with non-finite values and stops the run after `limit` of them."""

    def __init__(self, limit: int):
        self.limit = limit
        self.streak = 0

    def record(self, step: int, problems: list[str], last_checkpoint: Path | None) -> None:
        if not problems:
            self.streak = 0
            return
        self.streak += 1
        if self.streak >= self.limit:
            kept = f"The last checkpoint, {last_checkpoint}, is intact." if last_checkpoint else "No checkpoint was saved."
            raise Halted(
                f"stopped at step {step}: {self.streak} steps in a row had non-finite {', '.join(problems)}, so "
                f"their updates were skipped. {kept} Usual causes: a learning rate too high for this model "
                "(train.lr), a reward rule returning huge values, or float16 overflow (try bfloat16). Fix the "
                "recipe and continue with --resume."
            )


def out_of_memory(phase: str, step: int, grpo, saved: Path | None) -> UserError:
    micro = grpo.micro_batch_size or "automatic"
    return Halted(
        f"CUDA ran out of memory during the {phase} of step {step}. Lower grpo.micro_batch_size (now {micro}), "
        f"grpo.group_size (now {grpo.group_size}) or grpo.max_new_tokens (now {grpo.max_new_tokens}), or turn on "
        "model.gradient_checkpointing or model.load_in_4bit. "
        + (f"The run was saved as {saved}; continue with --resume." if saved else
           "Nothing newer than the last checkpoint could be saved; continue with --resume.")
    )
