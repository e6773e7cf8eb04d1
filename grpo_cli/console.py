"""What a training run shows: a rich progress bar on a terminal, plain lines otherwise."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

PLAIN_EVERY = 10  # steps between lines when the output is not a terminal


class TrainConsole:
    def __init__(self, quiet: bool = False, console: Console | None = None):
        self.console = console or Console(stderr=False)
        self.quiet = quiet
        self.live = self.console.is_terminal and not quiet
        self._progress: Progress | None = None
        self._task = None
        self._total = 0

    def message(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, highlight=False, soft_wrap=True)

    def start(self, total: int, done: int) -> None:
        self._total = total
        if not self.live:
            return
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console, transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=total, completed=done, stats="")

    def step(self, row: dict) -> None:
        stats = f"reward {row['reward_mean']:+.3f}  acc {row['accuracy']:.0%}  len {row['completion_len']:.0f}"
        if self._progress is not None:
            self._progress.update(self._task, completed=row["step"], stats=stats)
        elif not self.quiet and (row["step"] % PLAIN_EVERY == 0 or row["step"] in (1, self._total)):
            line = f"step {row['step']}/{self._total}  {stats}  {row['step_seconds']:.2f}s/step"
            self.console.print(line, highlight=False, soft_wrap=True)

    def evaluation(self, step: int, accuracy: float, n: int, seconds: float) -> None:
        self.message(f"eval at step {step}: accuracy {accuracy:.1%} on {n} held-out problems ({seconds:.1f}s)")

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
