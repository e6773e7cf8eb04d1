"""The run's logs: metrics.jsonl (one JSON object per step or evaluation) and samples.jsonl,
the sink "jsonl"; and RunLog, which sends each row to every sink of the run (trackers/sink.py): the
JSONL files always, then the trackers the recipe names (output.report_to).

Each line is written whole and flushed to disk before the next step starts, so
after a crash the file ends at a complete line or one torn line, which `read_jsonl`
skips. On resume, rows past the checkpoint's step are dropped: the resumed run
writes them again.
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import yaml

from grpo_cli import atomic
from grpo_cli.errors import UserError
from grpo_cli.run.guard import Stopped, Terminated
from grpo_cli.trackers import builtin  # noqa: F401  (registers the trackers by name)
from grpo_cli.trackers.sink import MetricSink, SinkContext, make_sink, metric_sink

METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"
RECIPE = "recipe.yaml"  # the run's resolved recipe, as run/directory.py writes it

__all__ = ["METRICS", "SAMPLES", "JsonlSink", "RunLog", "read_jsonl", "write_whole"]


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the torn last line of a crashed run
    return rows


def _clean(value):
    """JSON has no NaN or inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@metric_sink("jsonl")
class JsonlSink:
    """metrics.jsonl and samples.jsonl in the run directory. Required: resume, the run's summary, grpo plot
    and grpo samples read these files, so an error writing them (a full disk) stops the run."""

    required = True

    def __init__(self, context: SinkContext):
        self.metrics_path = context.run_dir / METRICS
        self.samples_path = context.run_dir / SAMPLES
        if context.resume_step is not None:
            for path in (self.metrics_path, self.samples_path):
                kept = [row for row in read_jsonl(path) if row.get("step", 0) <= context.resume_step]
                self._rewrite(path, kept)

    @staticmethod
    def _rewrite(path: Path, rows: list[dict]) -> None:
        write_whole(path, "".join(json.dumps(r) + "\n" for r in rows))

    @staticmethod
    def _append(path: Path, rows: list[dict]) -> None:
        with open(path, "a") as handle:
            handle.write("".join(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n" for row in rows))
            handle.flush()
            os.fsync(handle.fileno())

    def start(self, config: dict) -> None:
        pass

    def log_metrics(self, row: dict) -> None:
        self._append(self.metrics_path, [row])

    def log_samples(self, rows: list[dict]) -> None:
        self._append(self.samples_path, rows)

    def finish(self, status: str) -> None:
        pass


def run_status(error: BaseException | None) -> str:
    """How a run ended, from the exception that ended it (None: it ran all its steps)."""
    if error is None:
        return "finished"
    if isinstance(error, (Stopped, Terminated, KeyboardInterrupt)):  # Ctrl-C, SIGTERM
        return "stopped"
    return "failed"


class RunLog:
    """Every metrics row and sample row of the run, sent to each of its sinks, in order: the JSONL files, then
    `sinks` (registered names, or sinks made already). Only the first of several processes writes (`enabled`).
    `project`, `run_name`: the trackers' (output.project, output.run_name).

    `config`: the run's resolved recipe (a Recipe or a dict) that the sinks start with; None reads
    <run dir>/recipe.yaml, which the run directory holds by then. A sink that is not `required` and raises
    does not stop training: its errors are counted (`sink_errors`), the first of each sink is reported
    through `notify` (default: a RuntimeWarning), and close() reports the counts. `say`: where the trackers
    started tell where to look at the run, once (default: nowhere)."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, enabled: bool = True, *,
                 config=None, sinks: Iterable[str | MetricSink] = (), project: str = "grpo",
                 run_name: str | None = None, notify: Callable[[str], None] | None = None,
                 say: Callable[[str], None] | None = None):
        self.metrics_path = run_dir / METRICS
        self.samples_path = run_dir / SAMPLES
        self.enabled = enabled  # only the first of several processes writes
        self.notify = notify or (lambda message: warnings.warn(message, RuntimeWarning, stacklevel=3))
        self.sink_errors: Counter[str] = Counter()  # sink name -> calls that raised
        self.sinks: dict[str, MetricSink] = {}
        self._closed = False
        if not enabled:
            return
        logged = [row["step"] for row in read_jsonl(self.metrics_path)] if resume_step is not None else []
        context = SinkContext(run_dir=run_dir, resume_step=resume_step, logged_through=max(logged, default=None),
                              project=project, run_name=run_name)
        self.sinks["jsonl"] = JsonlSink(context)  # which drops the rows past resume_step from the files
        for sink in sinks:
            name = sink if isinstance(sink, str) else getattr(sink, "name", type(sink).__name__)
            if name in self.sinks:
                raise UserError(f"the metric sink {name!r} is named twice.")
            self.sinks[name] = make_sink(sink, context) if isinstance(sink, str) else sink
        config = _config_dict(config, run_dir)
        self._each("start", config)
        places = [sink.where() for name, sink in self.sinks.items() if hasattr(sink, "where")
                  and not self.sink_errors[name]]
        if places and say is not None:
            say("metrics also go to " + "; ".join(places))

    def _each(self, method: str, *args) -> None:
        for name, sink in self.sinks.items():
            try:
                getattr(sink, method)(*args)
            except Exception as exc:
                if getattr(sink, "required", False):
                    raise
                self.sink_errors[name] += 1
                if self.sink_errors[name] == 1:
                    self.notify(f"warning: the metric sink {name!r} failed in {method} ({type(exc).__name__}: "
                                f"{exc}); training goes on, and its further errors are counted")

    def metrics(self, row: dict) -> None:
        if self.enabled:
            self._each("log_metrics", row)

    def samples(self, rows: list[dict]) -> None:
        if self.enabled:
            self._each("log_samples", rows)

    def close(self, status: str | None = None) -> None:
        """Finish every sink once. `status`: how the run ended ("finished", "stopped" or "failed"); None
        reads it from the exception being handled, if any, so that the loop's `finally: run.log.close()`
        says how the run ended without passing it."""
        if self._closed or not self.enabled:
            return
        self._closed = True
        self._each("finish", status or run_status(sys.exc_info()[1]))
        if self.sink_errors:
            self.notify("warning: metric sink errors over the run (training went on): "
                        + ", ".join(f"{name} {count}" for name, count in self.sink_errors.items()))


def _config_dict(config, run_dir: Path) -> dict:
    """The resolved recipe as a plain dict (JSON types), for the sinks' start."""
    if config is None:
        path = run_dir / RECIPE
        return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    if hasattr(config, "model_dump"):  # a Recipe
        return config.model_dump(mode="json")
    return dict(config)


def write_whole(path: Path, text: str) -> None:
    """Write `path` whole or not at all (atomic.write_file); a failure the user can act on says so."""
    try:
        atomic.write_file(Path(path), text)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}.") from None
