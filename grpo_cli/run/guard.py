"""What keeps a run alive: Ctrl-C, SIGTERM, non-finite numbers, and running out of GPU memory.

- The first Ctrl-C lets the current step finish, saves a checkpoint and stops with
  exit code 130; a second one stops at once.
- SIGTERM (how Slurm, Kubernetes, `docker stop` and spot preemption stop a job) is a
  stop with a deadline: schedulers send SIGKILL after a grace period (30 s by default
  in Slurm and Kubernetes, 10 s in `docker stop`). A rollout or an evaluation in
  progress, the long phases, is dropped at its next decode step (nothing of it has
  changed the model); an update in progress finishes. Then the run saves (the state
  before a dropped step) and stops with exit code 143. Under torchrun every process
  finishes its step instead, since one leaving a collective would stall the others.
  Outside training (setting up, `grpo eval`, `grpo export`) SIGTERM stops at once,
  and each command removes what it had half written.
- A step whose rewards, loss or gradients are not finite is not applied (the
  optimizer skips it and it is logged); after `train.max_bad_steps` such steps in a
  row the run stops, its last checkpoint untouched, with a message saying why.
- CUDA running out of memory becomes a message naming the settings to lower.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

from grpo_cli.errors import UserError


EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal's number, as shells report it
NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class Stopped(UserError):
    """The run stopped on purpose (Ctrl-C, SIGTERM) after saving."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = EXIT_CODES[signum]


class Halted(UserError):
    """The run stopped because it could not go on safely."""

    exit_code = 3


class Terminated(BaseException):
    """SIGTERM where there was nothing to finish: stop at once. A BaseException, like KeyboardInterrupt,
    so that no `except Exception` swallows it on the way out and every `finally` cleans up."""

    exit_code = EXIT_CODES[signal.SIGTERM]


class Dropped(BaseException):
    """A stop request ended a rollout or an evaluation early; nothing of it is kept."""


_drop_requested = threading.Event()  # set by SIGTERM while a droppable phase runs; read at each decode step


def drop_point() -> None:
    """Called between decode steps and evaluation batches: raises Dropped once a stop with a deadline
    (SIGTERM) asked to drop the phase that is running."""
    if _drop_requested.is_set():
        raise Dropped


@contextlib.contextmanager
def terminate_at_once():
    """SIGTERM raises Terminated in the main thread (`grpo eval`, `grpo export`, a run's set-up)."""
    def handle(signum, frame):
        raise Terminated

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Interrupts:
    """Catches Ctrl-C and SIGTERM while training. The first asks to stop after the step; a SIGTERM
    during a droppable phase (see `droppable`) also drops that phase; a second signal stops now."""

    def __init__(self, notify, can_drop: bool = True):
        self.notify = notify
        self.can_drop = can_drop  # False under torchrun: every process must finish the step together
        self.signum: int | None = None  # the first stop request's signal
        self._dropping = False
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.signum = signum
        if signum == signal.SIGTERM and self._dropping:
            _drop_requested.set()
            self.notify("SIGTERM: dropping the rollout or evaluation in progress, saving a checkpoint and stopping.")
        elif signum == signal.SIGTERM:
            self.notify("SIGTERM: finishing this step, saving a checkpoint and stopping.")
        else:
            self.notify("Ctrl-C: finishing this step and saving a checkpoint; press Ctrl-C again to stop at once.")

    @contextlib.contextmanager
    def droppable(self):
        """A phase whose work a SIGTERM may drop (it changes nothing a checkpoint holds)."""
        self._dropping = self.can_drop
        if self.signum == signal.SIGTERM and self.can_drop:
            _drop_requested.set()  # asked to stop before the phase began: drop it at its first step
        try:
            yield
        finally:
            self._dropping = False
            _drop_requested.clear()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in EXIT_CODES}
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        _drop_requested.clear()


class NonFiniteGuard:
    """Counts consecutive steps with non-finite values and stops the run after `limit` of them."""

    def __init__(self, limit: int):
        self.limit = limit
        self.streak = 0
        self.before_streak: Path | None = None  # the last checkpoint saved before the streak's first step

    def record(self, step: int, problems: list[str], last_checkpoint: Path | None) -> None:
        """`last_checkpoint`: the newest saved before this step."""
        if not problems:
            self.streak = 0
            return
        if self.streak == 0:
            self.before_streak = last_checkpoint
        self.streak += 1
        if self.streak >= self.limit:
            first = step - self.streak + 1
            # Weights can be wrecked by a step whose numbers were still finite (a learning rate far too
            # high sends them to 1e30 before anything overflows), so no checkpoint is called intact.
            kept = (f"The last checkpoint saved before step {first}, the first of them, is {self.before_streak}; "
                    f"the step before {first} may already have damaged the weights it holds (look at that step's "
                    "grad_norm and loss in metrics.jsonl); if so, delete it and the newer checkpoint directories so that "
                    "--resume takes an earlier one." if self.before_streak else "No checkpoint was saved before them.")
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
