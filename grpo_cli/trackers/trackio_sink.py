"""The sink "trackio": a Trackio run in its local store (TRACKIO_DIR, by default ~/.cache/huggingface/trackio),
the project output.project: `trackio show --project <project>`."""

from __future__ import annotations

import contextlib
import io

from grpo_cli.trackers.runs import keep_run, kept_run
from grpo_cli.trackers.sink import SinkContext, WandbStyle, metric_sink


@metric_sink("trackio", requires="trackio", install="pip install 'grpo-cli[trackio]'")
class TrackioSink(WandbStyle):
    """Metrics at each step, samples as a trackio.Table per logged step, the recipe as the run's config. Trackio
    resumes a run by its name, which is kept in the run directory. It has no run status: a run that stopped or
    failed gets an alert saying so before it is finished."""

    def __init__(self, context: SinkContext):
        self.context, self.run, self.table = context, None, None

    def start(self, config: dict) -> None:
        import trackio

        kept = kept_run(self.context.run_dir, "trackio") if self.context.resume_step is not None else None
        with quiet():
            self.run = trackio.init(project=self.context.project, name=kept["name"] if kept else self.context.name,
                                    config=config, resume="allow" if kept else "never", embed=False,
                                    auto_log_gpu=False, auto_log_cpu=False)
        self.table = trackio.Table
        keep_run(self.context.run_dir, "trackio", name=self.run.name)

    def where(self) -> str:
        from trackio.utils import TRACKIO_DIR

        return f"Trackio run {self.run.name} in {TRACKIO_DIR} (trackio show --project {self.context.project})"

    def finish(self, status: str) -> None:
        import trackio

        if self.run is None:
            return
        with quiet():
            if status != "finished":
                level = trackio.AlertLevel.WARN if status == "stopped" else trackio.AlertLevel.ERROR
                self.run.alert(title=f"grpo run {status}", text="Ctrl-C or SIGTERM" if status == "stopped"
                               else "the run failed; see its console", level=level)
            trackio.finish()  # the module's: also forgets the run, which trackio would finish again at exit


def quiet():
    """Trackio prints where its store is and how to see it at each start and end; grpo's console says it once."""
    return contextlib.redirect_stdout(io.StringIO())
