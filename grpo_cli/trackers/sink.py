"""Where a run's metrics and samples go: the metric-sink protocol and the registry of sinks by name.

A sink is started once with the run's resolved recipe as a plain dict (`start(config)`), then gets
every metrics row (`log_metrics(row)`: one per step and one per evaluation, the rows metrics.jsonl
holds) and every batch of sample rows (`log_samples(rows)`: the rows samples.jsonl holds), and is
finished once with how the run ended (`finish(status)`, one of STATUSES). Rows are the trainer's own
dicts: read them, do not change them. `run.log.RunLog` sends every row to each of the run's sinks; a
sink's error does not stop training unless the sink is `required` (see RunLog).

A sink is registered by name with `@metric_sink("name", requires=..., install=...)` on a class (or
function) that takes a `SinkContext` and returns the sink. The JSONL files are the sink "jsonl"
(run/log.py, always on); the trackers a recipe names in `output.report_to` are the modules beside this
one (builtin.py lists them). docs/extending.md, "A metric sink", shows a new one end to end.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from grpo_cli.errors import UserError

STATUSES = ("finished", "stopped", "failed")  # how a run ended: all its steps; Ctrl-C or SIGTERM; an error


@dataclass(kw_only=True, frozen=True)
class SinkContext:
    """What a sink is made from."""

    run_dir: Path
    resume_step: int | None = None  # the checkpoint's step when the run resumes (later rows come again), else None
    # when resuming: the last step the run logged before it stopped (metrics.jsonl's last row, which is written
    # before any tracker gets the row). A tracker holds the rows up to it already: they are not sent again.
    logged_through: int | None = None
    project: str = "grpo"  # output.project
    run_name: str | None = None  # output.run_name; None: the run directory's name

    @property
    def name(self) -> str:
        return self.run_name or self.run_dir.resolve().name

    def fresh(self, step: int) -> bool:
        """Whether a row of `step` is new to a tracker that was given the rows of the run so far."""
        return self.logged_through is None or step > self.logged_through


@runtime_checkable
class MetricSink(Protocol):
    """One destination of a run's metrics and samples. `required` (optional, default False): an error of
    this sink stops the run, as the JSONL files' do; any other sink's error is counted and reported.
    `where()` (optional): once started, where to look at the run (shown when the run starts)."""

    def start(self, config: dict) -> None: ...

    def log_metrics(self, row: dict) -> None: ...

    def log_samples(self, rows: list[dict]) -> None: ...

    def finish(self, status: str) -> None: ...


SinkFactory = Callable[[SinkContext], MetricSink]
SINKS: dict[str, SinkFactory] = {}  # name -> what makes the sink


@dataclass(frozen=True)
class Requirement:
    module: str  # what must be importable
    install: str  # the command that installs it


REQUIREMENTS: dict[str, Requirement] = {}  # sink name -> the package it needs


def metric_sink(name: str, *, requires: str | None = None, install: str | None = None
                ) -> Callable[[SinkFactory], SinkFactory]:
    """Register a sink under `name`: `@metric_sink("wandb", requires="wandb", install="pip install ...")` on a
    class whose __init__ takes a SinkContext. `requires`: the module the sink imports when it starts, checked
    before the model loads (`check_installed`). A name already taken is refused."""

    def register(factory: SinkFactory) -> SinkFactory:
        if name in SINKS:
            raise ValueError(f"a metric sink named {name!r} is already registered ({SINKS[name]!r})")
        SINKS[name] = factory
        if requires is not None:
            REQUIREMENTS[name] = Requirement(requires, install or f"pip install {requires}")
        return factory

    return register


def make_sink(name: str, context: SinkContext) -> MetricSink:
    """The registered sink `name`, made for this run; a UserError naming the known sinks otherwise."""
    if name not in SINKS:
        raise UserError(f"no metric sink named {name!r}; known: {', '.join(sorted(SINKS))}.")
    return SINKS[name](context)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or the module blocked in sys.modules
        return False


def check_installed(names: Iterable[str]) -> None:
    """Refuse, with the install command, a sink whose package is missing: before anything heavy loads."""
    for name in names:
        needed = REQUIREMENTS.get(name)
        if needed is not None and not _importable(needed.module):
            raise UserError(f"output.report_to has {name}, but the {needed.module} package is not installed: "
                            f"{needed.install}, or take {name} out of output.report_to.")


def metric_tag(name: str) -> str:
    """A metrics column's name in the trackers: train/<name> for plain ones, as-is for reward/..., eval/...,
    so that each tracker groups them into the same panels."""
    return name if "/" in name else f"train/{name}"


def numbers(row: dict) -> dict[str, float]:
    """A metrics row's finite numbers by tracker name (booleans, text, NaN and inf left out), without step."""
    return {metric_tag(key): float(value) for key, value in row.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


SAMPLE_COLUMNS = ["step", "group", "prompt", "completion", "answer", "reward", "advantage"]


def sample_table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """(columns, data) of sample rows as one table: SAMPLE_COLUMNS, then one reward/<rule> column per rule."""
    rules = list(dict.fromkeys(rule for row in rows for rule in row.get("rewards", {})))
    columns = SAMPLE_COLUMNS + [f"reward/{rule}" for rule in rules]
    data = [[row.get(key) for key in SAMPLE_COLUMNS] + [row.get("rewards", {}).get(rule) for rule in rules]
            for row in rows]
    return columns, data


class WandbStyle:
    """log_metrics and log_samples for a tracker with W&B's API, which Trackio copies: `run.log(values, step=)`
    and a `Table(columns=, data=)` class. The sink sets `context`, `run` and `table` (its Table class)."""

    context: SinkContext
    run: object
    table: Callable

    def log_metrics(self, row: dict) -> None:
        if self.context.fresh(row["step"]):
            self.run.log(numbers(row), step=row["step"])

    def log_samples(self, rows: list[dict]) -> None:
        if rows and self.context.fresh(rows[0]["step"]):
            columns, data = sample_table(rows)
            self.run.log({"samples": self.table(columns=columns, data=data)}, step=rows[0]["step"])


def flat(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys and text values, for trackers whose parameters are flat (MLflow)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out
