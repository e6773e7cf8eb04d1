"""The run's logs: metrics.jsonl (one JSON object per step or evaluation) and samples.jsonl,
and the same scalars and sample completions for TensorBoard when the recipe asks.

Each line is written whole and flushed to disk before the next step starts, so
after a crash the file ends at a complete line or one torn line, which `read_jsonl`
skips. On resume, rows past the checkpoint's step are dropped: the resumed run
writes them again.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from grpo_cli import atomic
from grpo_cli.errors import UserError
from grpo_cli.run.metrics import tensorboard_tag

METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"


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


def tensorboard_writer(log_dir: Path):
    """A SummaryWriter, or a UserError saying how to install the optional dependency."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("output.tensorboard is true but the tensorboard package is not installed: "
                        "pip install tensorboard (or pip install 'grpo-cli[tensorboard]'), or set "
                        "output.tensorboard: false.") from None
    return SummaryWriter(log_dir=str(log_dir))


class RunLog:
    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard=None, enabled: bool = True):
        self.metrics_path = run_dir / METRICS
        self.samples_path = run_dir / SAMPLES
        self.tensorboard = tensorboard  # a SummaryWriter, or None
        self.enabled = enabled  # only the first of several processes writes
        if resume_step is not None and enabled:
            for path in (self.metrics_path, self.samples_path):
                kept = [row for row in read_jsonl(path) if row.get("step", 0) <= resume_step]
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

    def metrics(self, row: dict) -> None:
        if not self.enabled:
            return
        self._append(self.metrics_path, [row])
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and math.isfinite(value):
                    self.tensorboard.add_scalar(tensorboard_tag(key), value, row["step"])
            self.tensorboard.flush()

    def samples(self, rows: list[dict]) -> None:
        if not self.enabled:
            return
        self._append(self.samples_path, rows)
        if self.tensorboard is not None and rows:
            text = "\n\n".join(
                f"**reward {r['reward']:+.3f}, advantage {r['advantage']:+.3f}** — {r['prompt']}\n\n    "
                + r["completion"].replace("\n", "\n    ") for r in rows)
            self.tensorboard.add_text("samples", text, rows[0]["step"])
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def write_whole(path: Path, text: str) -> None:
    """Write `path` whole or not at all (atomic.write_file); a failure the user can act on says so."""
    try:
        atomic.write_file(Path(path), text)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}.") from None
