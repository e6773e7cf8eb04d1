"""Where a run's metrics and samples go: the metric-sink protocol, the registry of sinks by name,
and the TensorBoard sink.

A sink is started once with the run's resolved recipe as a plain dict (`start(config)`), then gets
every metrics row (`log_metrics(row)`: one per step and one per evaluation, the rows metrics.jsonl
holds) and every batch of sample rows (`log_samples(rows)`: the rows samples.jsonl holds), and is
finished once with how the run ended (`finish(status)`, one of STATUSES). Rows are the trainer's own
dicts: read them, do not change them. `run.log.RunLog` sends every row to each of the run's sinks; a
sink's error does not stop training unless the sink is `required` (see RunLog).

A sink is registered by name with `@metric_sink("name")` on a class (or function) that takes a
`SinkContext` and returns the sink. The JSONL files are the sink "jsonl" (run/log.py, always on), and
TensorBoard the sink "tensorboard" (here, on with `output.tensorboard`). docs/extending.md, "A metric
sink", shows a new one end to end.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from grpo_cli.errors import UserError
from grpo_cli.run.metrics import tensorboard_tag

STATUSES = ("finished", "stopped", "failed")  # how a run ended: all its steps; Ctrl-C or SIGTERM; an error


@dataclass(kw_only=True, frozen=True)
class SinkContext:
    """What a sink is made from."""

    run_dir: Path
    resume_step: int | None = None  # the checkpoint's step when the run resumes (later rows come again), else None


@runtime_checkable
class MetricSink(Protocol):
    """One destination of a run's metrics and samples. `required` (optional, default False): an error of
    this sink stops the run, as the JSONL files' do; any other sink's error is counted and reported."""

    def start(self, config: dict) -> None: ...

    def log_metrics(self, row: dict) -> None: ...

    def log_samples(self, rows: list[dict]) -> None: ...

    def finish(self, status: str) -> None: ...


SinkFactory = Callable[[SinkContext], MetricSink]
SINKS: dict[str, SinkFactory] = {}  # name -> what makes the sink


def metric_sink(name: str) -> Callable[[SinkFactory], SinkFactory]:
    """Register a sink under `name`: `@metric_sink("wandb")` on a class whose __init__ takes a SinkContext.
    A name already taken is refused."""

    def register(factory: SinkFactory) -> SinkFactory:
        if name in SINKS:
            raise ValueError(f"a metric sink named {name!r} is already registered ({SINKS[name]!r})")
        SINKS[name] = factory
        return factory

    return register


def make_sink(name: str, context: SinkContext) -> MetricSink:
    """The registered sink `name`, made for this run; a UserError naming the known sinks otherwise."""
    if name not in SINKS:
        raise UserError(f"no metric sink named {name!r}; known: {', '.join(sorted(SINKS))}.")
    return SINKS[name](context)


def tensorboard_writer(log_dir: Path):
    """A SummaryWriter, or a UserError saying how to install the optional dependency."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("output.tensorboard is true but the tensorboard package is not installed: "
                        "pip install tensorboard (or pip install 'grpo-cli[tensorboard]'), or set "
                        "output.tensorboard: false.") from None
    return SummaryWriter(log_dir=str(log_dir))


@metric_sink("tensorboard")
class TensorBoardSink:
    """The metrics rows' finite numbers as scalars (tags from the metric catalogue, `metrics.tensorboard_tag`)
    and each batch of samples as one text entry, in <run dir>/tensorboard. `writer`: a SummaryWriter made
    already (the trainer makes it before the model loads, so that a missing package is said at once)."""

    def __init__(self, context: SinkContext, writer=None):
        self.writer = writer if writer is not None else tensorboard_writer(context.run_dir / "tensorboard")

    def start(self, config: dict) -> None:
        pass

    def log_metrics(self, row: dict) -> None:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                self.writer.add_scalar(tensorboard_tag(key), value, row["step"])
        self.writer.flush()

    def log_samples(self, rows: list[dict]) -> None:
        if not rows:
            return
        text = "\n\n".join(
            f"**reward {r['reward']:+.3f}, advantage {r['advantage']:+.3f}** — {r['prompt']}\n\n    "
            + r["completion"].replace("\n", "\n    ") for r in rows)
        self.writer.add_text("samples", text, rows[0]["step"])
        self.writer.flush()

    def finish(self, status: str) -> None:
        self.writer.close()
