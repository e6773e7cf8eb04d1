"""The sink "tensorboard": scalars and samples in <run dir>/tensorboard, for `tensorboard --logdir`."""

from __future__ import annotations

from grpo_cli.trackers.sink import SinkContext, metric_sink, numbers


@metric_sink("tensorboard", requires="torch.utils.tensorboard",
             install="pip install tensorboard (or pip install 'grpo-cli[tensorboard]')")
class TensorBoardSink:
    """The metrics rows' finite numbers as scalars (named by `sink.metric_tag`) and each batch of samples as one
    text entry. TensorBoard has no runs to resume: a resumed run appends to the same directory, and its rows
    past the last one logged."""

    def __init__(self, context: SinkContext):
        self.context, self.writer = context, None

    def start(self, config: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.context.run_dir / "tensorboard"))

    def where(self) -> str:
        return f"TensorBoard (tensorboard --logdir {self.context.run_dir / 'tensorboard'})"

    def log_metrics(self, row: dict) -> None:
        if self.context.fresh(row["step"]):
            for tag, value in numbers(row).items():
                self.writer.add_scalar(tag, value, row["step"])
            self.writer.flush()

    def log_samples(self, rows: list[dict]) -> None:
        if not rows or not self.context.fresh(rows[0]["step"]):
            return
        text = "\n\n".join(
            f"**reward {r['reward']:+.3f}, advantage {r['advantage']:+.3f}** — {r['prompt']}\n\n    "
            + r["completion"].replace("\n", "\n    ") for r in rows)
        self.writer.add_text("samples", text, rows[0]["step"])
        self.writer.flush()

    def finish(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()
