"""Which tracker run a grpo run reports to, kept in the run directory (trackers.json: tracker name -> its run's
id and name), so that `grpo train --resume` continues the same W&B, MLflow or Trackio run instead of opening
a new one. Written once when a tracker run starts, whole or not at all."""

from __future__ import annotations

import json
from pathlib import Path

from grpo_cli import atomic

TRACKER_RUNS = "trackers.json"


def kept_run(run_dir: Path, tracker: str) -> dict | None:
    """What `keep_run` kept for `tracker` in this run directory, or None."""
    path = run_dir / TRACKER_RUNS
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text()).get(tracker)
    except (json.JSONDecodeError, AttributeError):
        return None  # an unreadable file: a new tracker run rather than a stopped training


def keep_run(run_dir: Path, tracker: str, **fields: str) -> None:
    path = run_dir / TRACKER_RUNS
    kept = json.loads(path.read_text()) if path.exists() else {}
    kept[tracker] = fields
    atomic.write_file(path, json.dumps(kept, indent=2) + "\n")
