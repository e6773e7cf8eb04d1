"""Metric sinks: RunLog sends every row to each sink of the run (trackers/sink.py, run/log.py)."""

import json
import math

import pytest

from grpo_cli.errors import UserError
from grpo_cli.run.guard import Halted, Stopped
from grpo_cli.run.log import RunLog, run_status
from grpo_cli.trackers.sink import SINKS, MetricSink, SinkContext, metric_sink
from grpo_cli.trackers.tensorboard_sink import TensorBoardSink

ROW = {"step": 1, "reward_mean": 0.5, "kl": float("nan"), "reward/correctness": 1.0, "ok": True,
       "loss": float("inf"), "note": "x"}
SAMPLE = {"step": 1, "prompt": "What is 2 + 2?", "completion": "2+2=4.\n#### 4", "reward": 1.2, "advantage": 0.7,
          "rewards": {"correctness": 1.0}}


class Recording:
    """A sink that keeps what it was given."""

    def __init__(self, context: SinkContext):
        self.context, self.calls = context, []

    def start(self, config):
        self.calls.append(("start", config))

    def log_metrics(self, row):
        self.calls.append(("metrics", row))

    def log_samples(self, rows):
        self.calls.append(("samples", rows))

    def finish(self, status):
        self.calls.append(("finish", status))


@pytest.fixture
def recording():
    """The sink "recording", registered for the test only; the instances it made."""
    made = []

    @metric_sink("recording")
    def make(context):
        made.append(Recording(context))
        return made[-1]

    yield made
    del SINKS["recording"]


def test_a_registered_sink_gets_the_config_every_row_and_the_status(tmp_path, recording):
    log = RunLog(tmp_path, config={"grpo": {"group_size": 8}}, sinks=["recording"])
    log.metrics(ROW)
    log.samples([SAMPLE])
    log.close()
    [sink] = recording
    assert isinstance(sink, MetricSink) and sink.context == SinkContext(run_dir=tmp_path, resume_step=None)
    assert sink.calls == [("start", {"grpo": {"group_size": 8}}), ("metrics", ROW), ("samples", [SAMPLE]),
                          ("finish", "finished")]
    log.close()  # once only
    assert sink.calls[-2:] == [("samples", [SAMPLE]), ("finish", "finished")]


def test_without_a_config_the_sinks_start_with_the_run_directorys_recipe(tmp_path, recording):
    from grpo_cli.config.recipe import dump, validate

    recipe = validate({"grpo": {"group_size": 4}})
    (tmp_path / "recipe.yaml").write_text(dump(recipe))
    RunLog(tmp_path, sinks=["recording"]).close()
    assert recording[0].calls[0] == ("start", recipe.model_dump(mode="json"))
    RunLog(tmp_path, config=recipe, sinks=["recording"]).close()  # a Recipe: the same dict
    assert recording[1].calls[0] == recording[0].calls[0]


@pytest.mark.parametrize("error, status", [(None, "finished"), (Stopped("stopped by Ctrl-C"), "stopped"),
                                           (KeyboardInterrupt(), "stopped"), (Halted("non-finite"), "failed"),
                                           (RuntimeError("boom"), "failed")])
def test_close_in_a_finally_says_how_the_run_ended(tmp_path, recording, error, status):
    def loop():
        log = RunLog(tmp_path, config={}, sinks=["recording"])
        try:
            if error is not None:
                raise error
        finally:
            log.close()

    if error is None:
        loop()
    else:
        with pytest.raises(type(error)):
            loop()
    assert recording[0].calls[-1] == ("finish", status)
    assert run_status(error) == status


def test_an_explicit_status_wins(tmp_path, recording):
    RunLog(tmp_path, config={}, sinks=["recording"]).close("stopped")
    assert recording[0].calls[-1] == ("finish", "stopped")


def test_a_failing_sink_is_counted_and_reported_and_training_goes_on(tmp_path, recording):
    class Broken(Recording):
        name = "broken"

        def log_metrics(self, row):
            raise ConnectionError("tracker unreachable")

    said = []
    log = RunLog(tmp_path, config={}, sinks=[Broken(None), "recording"], notify=said.append)
    for step in (1, 2, 3):
        log.metrics({**ROW, "step": step})
    log.close()
    assert log.sink_errors == {"broken": 3}
    assert len(said) == 2  # the first error, then the count at the end
    assert "'broken' failed in log_metrics (ConnectionError: tracker unreachable)" in said[0]
    assert "broken 3" in said[1]
    # the sinks after it and the files got every row
    assert [call[1]["step"] for call in recording[0].calls if call[0] == "metrics"] == [1, 2, 3]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_failing_sink_warns_by_default(tmp_path):
    class Broken(Recording):
        def start(self, config):
            raise ValueError("no key")

    with pytest.warns(RuntimeWarning, match="'Broken' failed in start"):
        RunLog(tmp_path, config={}, sinks=[Broken(None)])


def test_the_jsonl_files_are_required(tmp_path):
    log = RunLog(tmp_path, config={})
    (tmp_path / "metrics.jsonl").mkdir()  # cannot be opened for appending
    with pytest.raises(OSError):
        log.metrics(ROW)


def test_the_jsonl_files_hold_the_rows_as_before(tmp_path):
    log = RunLog(tmp_path, config={})
    log.metrics(ROW)
    log.samples([SAMPLE, {**SAMPLE, "reward": math.nan}])
    log.close()
    assert (tmp_path / "metrics.jsonl").read_bytes() == (
        b'{"step": 1, "reward_mean": 0.5, "kl": null, "reward/correctness": 1.0, "ok": true, "loss": null, '
        b'"note": "x"}\n')
    sample = (b'"prompt": "What is 2 + 2?", "completion": "2+2=4.\\n#### 4", "reward": %s, "advantage": 0.7, '
              b'"rewards": {"correctness": 1.0}}\n')
    assert (tmp_path / "samples.jsonl").read_bytes() == b'{"step": 1, ' + sample % b"1.2" + b'{"step": 1, ' + \
        sample % b"null"


def test_a_resume_drops_the_rows_past_the_checkpoint(tmp_path):
    log = RunLog(tmp_path, config={})
    for step in (1, 2, 3):
        log.metrics({"step": step})
        log.samples([{"step": step}])
    log.close()
    RunLog(tmp_path, resume_step=2, config={}).close()
    for name in ("metrics.jsonl", "samples.jsonl"):
        assert (tmp_path / name).read_text() == '{"step": 1}\n{"step": 2}\n'


def test_only_the_first_process_writes(tmp_path, recording):
    log = RunLog(tmp_path, config={}, sinks=["recording"], enabled=False)
    log.metrics(ROW)
    log.samples([SAMPLE])
    log.close()
    assert recording == [] and list(tmp_path.iterdir()) == []


def test_unknown_and_repeated_sinks_are_refused(tmp_path, recording):
    with pytest.raises(UserError, match="no metric sink named 'neptune'; known: jsonl, mlflow, recording, "
                                        "tensorboard, trackio, wandb"):
        RunLog(tmp_path, config={}, sinks=["neptune"])
    with pytest.raises(UserError, match="'recording' is named twice"):
        RunLog(tmp_path, config={}, sinks=["recording", "recording"])
    with pytest.raises(ValueError, match="already registered"):
        metric_sink("jsonl")(Recording)


def test_the_tensorboard_sink_writes_events_that_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLog(tmp_path, config={}, sinks=["tensorboard"])
    assert isinstance(log.sinks["tensorboard"], TensorBoardSink)
    log.metrics(ROW)
    log.metrics({"step": 2, "reward_mean": 0.75, "eval/accuracy": 0.5})
    log.samples([SAMPLE])
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    # finite numbers only (no NaN kl, no inf loss, no bool, no text), under the catalogue's tags
    assert set(events.Tags()["scalars"]) == {"train/reward_mean", "reward/correctness", "eval/accuracy"}
    assert [(e.step, e.value) for e in events.Scalars("train/reward_mean")] == [(1, 0.5), (2, 0.75)]
    [text] = events.Tensors("samples/text_summary")
    assert text.step == 1 and "**reward +1.200, advantage +0.700** — What is 2 + 2?" in \
        text.tensor_proto.string_val[0].decode()


def test_the_tensorboard_sink_by_name_makes_its_own_writer(tmp_path):
    pytest.importorskip("tensorboard")
    log = RunLog(tmp_path, config={}, sinks=["tensorboard"])
    log.metrics(ROW)
    log.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
