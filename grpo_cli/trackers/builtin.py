"""The trackers grpo ships, registered by importing their modules: the names output.report_to takes."""

from __future__ import annotations

from grpo_cli.trackers import mlflow_sink, tensorboard_sink, trackio_sink, wandb_sink
from grpo_cli.trackers.sink import SINKS

MODULES = (tensorboard_sink, wandb_sink, mlflow_sink, trackio_sink)


def tracker_names() -> list[str]:
    """Every registered sink a recipe may name (the JSONL files are always written: not one of them)."""
    return sorted(name for name in SINKS if name != "jsonl")
