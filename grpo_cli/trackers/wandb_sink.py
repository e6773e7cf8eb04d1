"""The sink "wandb": a Weights & Biases run. WANDB_MODE=offline keeps it on disk (<run dir>/wandb) until
`wandb sync`; WANDB_PROJECT, WANDB_ENTITY and W&B's other variables apply as usual."""

from __future__ import annotations

from grpo_cli.trackers.runs import keep_run, kept_run
from grpo_cli.trackers.sink import SinkContext, WandbStyle, metric_sink

EXIT_CODES = {"finished": 0, "failed": 1, "stopped": 130}  # W&B marks a nonzero exit failed; 130: Ctrl-C's


@metric_sink("wandb", requires="wandb", install="pip install 'grpo-cli[wandb]'")
class WandbSink(WandbStyle):
    """Metrics as the run's history at each step, samples as a wandb.Table per logged step, the recipe as its
    config; the run's id is kept in the run directory, and a resumed run resumes it."""

    def __init__(self, context: SinkContext):
        self.context, self.run, self.table = context, None, None

    def start(self, config: dict) -> None:
        import wandb

        kept = kept_run(self.context.run_dir, "wandb") if self.context.resume_step is not None else None
        self.run = wandb.init(project=self.context.project, name=self.context.name, id=kept["id"] if kept else None,
                              resume="allow" if kept else None, dir=str(self.context.run_dir), config=config,
                              settings=wandb.Settings(console="off", silent=True))
        self.table = wandb.Table
        keep_run(self.context.run_dir, "wandb", id=self.run.id)

    def where(self) -> str:
        offline = self.run.settings.mode == "offline"
        return f"W&B run {self.run.id}" + (f" (offline: wandb sync {self.run.dir.rsplit('/files', 1)[0]})"
                                           if offline else f" ({self.run.url})")

    def finish(self, status: str) -> None:
        if self.run is not None:
            self.run.summary["grpo/status"] = status
            self.run.finish(exit_code=EXIT_CODES[status])
