"""What runs show: a live dashboard on a terminal, plain lines otherwise, and the tables of
`grpo eval`, `grpo score` and `grpo samples`."""

from __future__ import annotations

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from grpo_cli.run.metrics import DASHBOARD
from grpo_cli.tools.calls import split_transcript

PLAIN_EVERY = 10  # steps between lines when the output is not a terminal
SHOWN_CHARS = 160  # of the best and worst completion


TRANSCRIPT_STYLES = {"text": "", "code": "cyan", "output": "green"}  # a tool call's code and output told apart


def _short(text: str, limit: int = SHOWN_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _transcript(text: str, limit: int = SHOWN_CHARS) -> Text:
    """A completion on one line, its tool calls' code and output in their own colours (their fences kept,
    so they stay apart without colour too), cut at `limit` characters."""
    shown = Text()
    for kind, piece in split_transcript(text):
        piece = " ".join(piece.split())
        if piece:
            shown.append(" " if shown.plain else "")
            shown.append(piece, style=TRANSCRIPT_STYLES[kind])
    if len(shown.plain) > limit:
        shown.truncate(limit - 3)
        shown.append("...")
    return shown


def _figure(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def dashboard(row: dict, best: tuple[str, float] | None, worst: tuple[str, float] | None) -> Group:
    """The per-step panel: the figures a GRPO run is judged by, and its best and worst completion."""
    figures = Table.grid(padding=(0, 2))
    for _ in range(4):
        figures.add_column(justify="left")
    rules = [(k.removeprefix("reward/"), v) for k, v in row.items() if k.startswith("reward/")]
    # a column the run does not write (tool_* without grpo.tools) is left off, and one under its shown_above
    # (the sampler/trainer mismatch, ~0 in float32); a null one shows as "-"
    cells = [(metric.label, _figure(row.get(metric.name), metric.fmt)) for metric in DASHBOARD
             if metric.on_dashboard(row)]
    cells += [(f"  {name}", _figure(value, "+.3f")) for name, value in rules]
    for i in range(0, len(cells), 2):
        pair = cells[i : i + 2]
        figures.add_row(*[part for label, value in pair for part in (Text(label, style="dim"), value)])
    parts = [Panel(figures, title=f"step {row['step']}", title_align="left")]
    if best and worst:
        samples = Table.grid(padding=(0, 1))
        samples.add_column(style="dim")
        samples.add_column()
        samples.add_row(f"best {best[1]:+.2f}", _transcript(best[0]))
        samples.add_row(f"worst {worst[1]:+.2f}", _transcript(worst[0]))
        parts.append(Panel(samples, title="completions", title_align="left"))
    return Group(*parts)


class TrainConsole:
    def __init__(self, quiet: bool = False, console: Console | None = None):
        self.console = console or Console(stderr=False)
        self.quiet = quiet
        self.live = self.console.is_terminal and not quiet
        self._progress: Progress | None = None
        self._live: Live | None = None
        self._task = None
        self._total = 0
        self._panel = None

    def message(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, highlight=False, soft_wrap=True)

    def start(self, total: int, done: int) -> None:
        self._total = total
        if not self.live:
            return
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console,
        )
        self._task = self._progress.add_task("train", total=total, completed=done, stats="")
        self._live = Live(Group(self._progress), console=self.console, refresh_per_second=4, transient=False)
        self._live.start()

    def step(self, row: dict, best: tuple[str, float] | None = None, worst: tuple[str, float] | None = None) -> None:
        stats = f"reward {row['reward_mean']:+.3f}  acc {row['accuracy']:.0%}  len {row['completion_len']:.0f}"
        if "tool_use_frac" in row:
            stats += f"  tool use {row['tool_use_frac']:.0%}"
        if self._live is not None:
            self._progress.update(self._task, completed=row["step"], stats=stats)
            self._live.update(Group(self._progress, dashboard(row, best, worst)))
        elif not self.quiet and (row["step"] % PLAIN_EVERY == 0 or row["step"] in (1, self._total)):
            line = f"step {row['step']}/{self._total}  {stats}  {row['step_seconds']:.2f}s/step"
            self.console.print(line, highlight=False, soft_wrap=True)

    def evaluation(self, step: int, accuracy: float, n: int, seconds: float, timeouts: int = 0) -> None:
        late = f"; {timeouts} gradings ran past the time limit and count as wrong" if timeouts else ""
        self.message(f"eval at step {step}: accuracy {accuracy:.1%} on {n} held-out problems ({seconds:.1f}s){late}")

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


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


def _graded(n: int, settings: dict) -> str:
    """How many problems were graded, and of how many rows the input held when that is known."""
    if settings.get("rows") is None:
        return str(n)
    cut = f" (--limit {settings['limit']})" if settings.get("limit") and n < settings["rows"] else ""
    return f"{n} of {settings['rows']} rows{cut}"


def print_eval(console: Console, results: dict) -> None:
    """The summary of `grpo eval` as tables: overall figures, then per subject and level."""
    settings = results["settings"]
    title = f"{settings.get('model') or settings.get('predictions')}"
    if settings.get("data"):
        title += f" on {settings['data']}"
    table = Table(title=title, title_justify="left")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("accuracy (pass@1)", f"{results['accuracy']:.2%}")
    table.add_row("problems graded", _graded(results["n"], settings))
    table.add_row("completions graded correct", str(results["correct"]))
    for key, value in results.items():
        if key.startswith(("pass@", "maj@")) and isinstance(value, float):
            table.add_row(key, f"{value:.2%}")
    table.add_row("protocol", str(settings.get("protocol")) + (
        f", tool {', '.join(settings['tools'])} (at most {settings['max_tool_calls']} calls)" if settings.get("tools")
        else ""))
    if "tool_use_frac" in results:
        table.add_row("completions that ran code", f"{results['tool_use_frac']:.1%}")
        table.add_row("code blocks run per completion", f"{results['tool_calls']:.2f}")
    table.add_row("seconds", f"{results['seconds']:.1f}")
    if results.get("timeouts"):
        table.add_row("[yellow]grading timeouts[/]", f"[yellow]{results['timeouts']}[/]")
    console.print(table)
    if settings.get("skipped_note"):
        console.print(f"[yellow]note:[/] {settings['skipped_note']}", highlight=False)
    if results.get("timeouts"):
        from grpo_cli.rewards.scoring import CALL_TIMEOUT_S

        console.print(f"[yellow]warning:[/] {results['timeouts']} answer comparisons ran past the "
                      f"{CALL_TIMEOUT_S:g} s limit and count as wrong; with --output, their items are marked "
                      "\"timed_out\" so you can check them.", highlight=False)
    for key, groups in results.items():
        if key.startswith("by_"):
            breakdown = Table(title=f"by {key.removeprefix('by_')}", title_justify="left")
            breakdown.add_column(key.removeprefix("by_"))
            breakdown.add_column("accuracy", justify="right")
            breakdown.add_column("n", justify="right")
            for name, figures in groups.items():
                breakdown.add_row(name, f"{figures['accuracy']:.2%}", str(figures["n"]))
            console.print(breakdown)


def print_scores(console: Console, groups, rules: list[str], title: str = "group") -> None:
    """One table per prompt: each completion's reward per rule, total and advantage."""
    for number, group in enumerate(groups, 1):
        prompt = _short(group.prompt, 70)
        table = Table(title=f"{title} {number}: {prompt}  (gold {group.answer})", title_justify="left")
        table.add_column("completion", overflow="fold", max_width=60)
        for rule in rules:
            table.add_column(rule, justify="right")
        table.add_column("total", justify="right")
        table.add_column("advantage", justify="right")
        for scored in group.completions:
            table.add_row(_transcript(scored.completion, 120), *[_figure(scored.rewards.get(r), "+.2f") for r in rules],
                          f"{scored.total:+.3f}", f"{scored.advantage:+.3f}")
        console.print(table)
