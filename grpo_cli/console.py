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


class TaskProgress:
    """A progress bar with ETA for a counted task (evaluation batches); silent when not a terminal."""

    def __init__(self, console: Console, label: str):
        self.console, self.label = console, label
        self._progress = None
        self._task = None

    def __enter__(self):
        if self.console.is_terminal:
            self._progress = Progress(TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                      console=self.console, transient=True)
            self._progress.start()
        return self

    def update(self, done: int, total: int) -> None:
        if self._progress is None:
            return
        if self._task is None:
            self._task = self._progress.add_task(self.label, total=total)
        self._progress.update(self._task, completed=done)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()


def print_eval(console: Console, results: dict) -> None:
    """The summary of `grpo eval` as tables: overall figures, then per subject and level."""
    from rich.table import Table

    settings = results["settings"]
    title = f"{settings.get('model') or settings.get('predictions')}"
    if settings.get("data"):
        title += f" on {settings['data']}"
    table = Table(title=title, title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("accuracy (pass@1)", f"{results['accuracy']:.2%}")
    table.add_row("problems", str(results["n"]))
    table.add_row("completions graded correct", str(results["correct"]))
    for key, value in results.items():
        if key.startswith(("pass@", "maj@")) and isinstance(value, float):
            table.add_row(key, f"{value:.2%}")
    table.add_row("protocol", str(settings.get("protocol")))
    table.add_row("seconds", f"{results['seconds']:.1f}")
    console.print(table)
    for key, groups in results.items():
        if key.startswith("by_"):
            breakdown = Table(title=f"by {key.removeprefix('by_')}", title_justify="left")
            breakdown.add_column(key.removeprefix("by_"))
            breakdown.add_column("accuracy", justify="right")
            breakdown.add_column("n", justify="right")
            for name, figures in groups.items():
                breakdown.add_row(name, f"{figures['accuracy']:.2%}", str(figures["n"]))
            console.print(breakdown)


def print_scores(console: Console, groups, rules: list[str]) -> None:
    """One table per prompt: each completion's reward per rule, total and advantage."""
    from rich.table import Table

    for number, group in enumerate(groups, 1):
        prompt = group.prompt if len(group.prompt) <= 70 else group.prompt[:67] + "..."
        table = Table(title=f"group {number}: {prompt}  (gold {group.answer})", title_justify="left")
        table.add_column("completion", overflow="fold", max_width=60)
        for rule in rules:
            table.add_column(rule, justify="right")
        table.add_column("total", justify="right")
        table.add_column("advantage", justify="right")
        for scored in group.completions:
            text = scored.completion.strip().replace("\n", " ")
            table.add_row(text if len(text) <= 120 else text[:117] + "...",
                          *[f"{scored.rewards[r]:+.2f}" for r in rules], f"{scored.total:+.3f}", f"{scored.advantage:+.3f}")
        console.print(table)
