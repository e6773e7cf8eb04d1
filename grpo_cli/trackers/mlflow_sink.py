"""The sink "mlflow": an MLflow run, in the store MLFLOW_TRACKING_URI names, else in a SQLite store in the run
directory (<run dir>/mlflow.db, artifacts beside it in <run dir>/mlflow-artifacts): `mlflow ui
--backend-store-uri sqlite:///<run dir>/mlflow.db`. The experiment is output.project."""

from __future__ import annotations

import logging
import os
import time

from grpo_cli.trackers.runs import keep_run, kept_run
from grpo_cli.trackers.sink import SinkContext, flat, metric_sink, numbers, sample_table

STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}  # MLflow's run statuses
PARAM_LENGTH = 6000  # MLflow's limit on a parameter's value


@metric_sink("mlflow", requires="mlflow", install="pip install 'grpo-cli[mlflow]'")
class MlflowSink:
    """Metrics as the run's metric histories (one batch per row), each batch of samples as a table of its own
    (samples/step-000010.json: MLflow appends to a table by downloading and rewriting it, a cost that grows
    with the run), the recipe as the run's parameters (dotted keys); the run's id is kept in the run directory,
    and a resumed run continues it."""

    def __init__(self, context: SinkContext):
        self.context, self.client, self.run_id = context, None, None
        self.pending = []  # MLflow's asynchronous logging operations, waited for at the end

    def start(self, config: dict) -> None:
        from mlflow import MlflowClient

        run_dir = self.context.run_dir.resolve()
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir / 'mlflow.db'}"
        store = logging.getLogger("mlflow.store")  # "Creating initial MLflow database tables...": not news
        level = store.level
        store.setLevel(logging.WARNING)
        try:
            self.client = MlflowClient(tracking_uri=uri)
            self._open_run(run_dir, config)
        finally:
            store.setLevel(level)

    def _open_run(self, run_dir, config: dict) -> None:
        from mlflow.entities import Param

        kept = kept_run(run_dir, "mlflow") if self.context.resume_step is not None else None
        if kept:
            self.run_id = kept["id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(self.context.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            self.context.project, artifact_location=None if "MLFLOW_TRACKING_URI" in os.environ
            else (run_dir / "mlflow-artifacts").as_uri())
        self.run_id = self.client.create_run(experiment_id, run_name=self.context.name,
                                             tags={"grpo.run_dir": str(run_dir)}).info.run_id
        keep_run(run_dir, "mlflow", id=self.run_id)
        params = [Param(key, value[:PARAM_LENGTH]) for key, value in flat(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def where(self) -> str:
        return f"MLflow run {self.run_id} in {self.client.tracking_uri}"

    def log_metrics(self, row: dict) -> None:
        from mlflow.entities import Metric

        if self.context.fresh(row["step"]):
            now = int(time.time() * 1000)
            # asynchronous: a write to the store costs about 14 ms a row, in MLflow's thread instead of the step's
            self.pending.append(self.client.log_batch(self.run_id, metrics=[
                Metric(key, value, now, row["step"]) for key, value in numbers(row).items()], synchronous=False))

    def log_samples(self, rows: list[dict]) -> None:
        if rows and self.context.fresh(rows[0]["step"]):
            columns, data = sample_table(rows)
            self.client.log_table(self.run_id, data={column: [line[i] for line in data]
                                                     for i, column in enumerate(columns)},
                                  artifact_file=f"samples/step-{rows[0]['step']:06d}.json")

    def finish(self, status: str) -> None:
        for operation in self.pending:
            operation.wait()
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=STATUS[status])
