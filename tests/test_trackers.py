"""The trackers (trackers/*_sink.py) with the real libraries in their offline or local modes: W&B offline,
MLflow's SQLite store, Trackio's local store, TensorBoard's event files. What was logged is read back through
each library's own reader (W&B: its offline run file, decoded with W&B's record schema) and compared with what
grpo sent: values, steps, the config, the samples table, how the run ended, and that a resume continues the
same tracker run with no step logged twice."""

from __future__ import annotations

import glob
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, small_recipe
from grpo_cli.config import recipe as recipe_module
from grpo_cli.errors import UserError
from grpo_cli.run.console import TrainConsole
from grpo_cli.run.log import RunLog, read_jsonl
from grpo_cli.trackers.sink import metric_tag

TRACKERS = ["tensorboard", "wandb", "mlflow", "trackio"]
CONFIG = {"grpo": {"group_size": 8}, "train": {"lr": 1e-5}}


def row(step: int) -> dict:
    return {"step": step, "reward_mean": 0.125 * step, "kl": math.nan, "reward/correctness": step % 2, "ok": True,
            "note": "text"}


def sample(step: int) -> dict:
    return {"step": step, "group": 0, "prompt": f"What is {step} + 2?", "completion": f"{step + 2}",
            "answer": str(step + 2), "reward": 1.25, "advantage": -0.5, "rewards": {"correctness": 1.0, "format": 0.25}}


@pytest.fixture
def tracker_env(tmp_path, monkeypatch):
    """Every tracker kept on this machine: W&B offline, Trackio's store in tmp_path (read when trackio is first
    imported: conftest sets TRACKIO_DIR for the session), MLflow's default SQLite store in the run directory."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def require(tracker: str) -> None:
    module = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}[tracker]
    if __import__("importlib").util.find_spec(module) is None:
        reason = f"needs {module}: pip install -e '.[trackers]'"
        if os.environ.get("GRPO_REQUIRE_TRACKERS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


# ---- each library's reader: {"history": {tag: [(step, value)]}, "samples": [row dicts], "ends": [status],
#      "config": dict, "runs": how many tracker runs}


def _wandb_records(path: str):
    """The records of a W&B run file (.wandb): W&B's LevelDB-style log of protobuf Records, 32 KiB blocks,
    each record [crc32, length, type] then data; a 7-byte header (':W&B', magic, version) opens the file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, block = 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def read_wandb(run_dir: Path, project: str) -> dict:
    history, samples, ends, config, ids = {}, [], [], {}, set()
    files = sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb")))
    for path in files:
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
                assert record.run.project == project
                config.update({u.key: json.loads(u.value_json) for u in record.run.config.update if u.key != "_wandb"})
            elif kind == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                for key, value in items.items():
                    if not key.startswith("_") and not key.startswith("samples"):
                        history.setdefault(key, []).append((items["_step"], value))
                if "samples/path" in items:  # the table, a file beside the run record
                    table = json.loads((Path(path).parent / "files" / items["samples/path"]).read_text())
                    samples += [dict(zip(table["columns"], line)) for line in table["data"]]
            elif kind == "summary":
                for item in record.summary.update:
                    if item.key == "grpo/status" or list(item.nested_key) == ["grpo", "status"]:
                        ends.append(json.loads(item.value_json))
            elif kind == "exit":
                ends.append({0: "exit 0", 1: "exit 1", 130: "exit 130"}[record.exit.exit_code])
    return {"history": history, "samples": samples, "ends": ends, "config": config, "runs": len(ids)}


def read_mlflow(run_dir: Path, project: str) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir.resolve() / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name(project).experiment_id])
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
               for key in run.data.metrics}
    samples = []
    for artifact in client.list_artifacts(run.info.run_id, "samples"):
        table = json.loads(Path(client.download_artifacts(run.info.run_id, artifact.path, str(run_dir / "read"))
                                ).read_text())
        samples += [dict(zip(table["columns"], line)) for line in table["data"]]
    return {"history": history, "samples": samples,
            "ends": [run.info.status], "config": run.data.params, "runs": 1, "run": run}


def read_trackio(run_dir: Path, project: str) -> dict:
    from trackio.fragments import import_inbox_dir
    from trackio.sqlite_storage import SQLiteStorage

    import_inbox_dir()  # what trackio's dashboard does first: records a run wrote as files, into the database

    name = json.loads((run_dir / "trackers.json").read_text())["trackio"]["name"]
    history, samples = {}, []
    for log in SQLiteStorage.get_logs(project, name):
        for key, value in log.items():
            if key == "samples":
                samples += [dict(zip(value["columns"], line)) for line in value["data"]] \
                    if "data" in value else value.get("_value", [])
            elif key not in ("step", "timestamp") and value is not None:
                history.setdefault(key, []).append((log["step"], value))
    alerts = SQLiteStorage.get_alerts(project, run_name=name)
    return {"history": history, "samples": samples, "ends": [a["title"] for a in alerts],
            "config": SQLiteStorage.get_run_config(project, name), "runs": len(SQLiteStorage.get_runs(project))}


def read_tensorboard(run_dir: Path, project: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    history = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    texts = [t.tensor_proto.string_val[0].decode() for t in events.Tensors("samples/text_summary")]
    return {"history": history, "samples": texts, "ends": [], "config": {}, "runs": 1}


def process_ends(tracker: str) -> None:
    """What the end of a training process does for W&B: its service process writes out the rest of the offline
    run file. Read right after run.finish() under CI's load, the resumed attempt's rows were once missing."""
    if tracker == "wandb":
        import wandb

        wandb.teardown()


READERS = {"wandb": read_wandb, "mlflow": read_mlflow, "trackio": read_trackio, "tensorboard": read_tensorboard}


def test_trackio_reads_its_store_from_the_test_session_s_directory():
    """conftest points TRACKIO_DIR at a temporary directory before anything imports trackio."""
    require("trackio")
    from trackio.utils import TRACKIO_DIR

    assert str(TRACKIO_DIR) == os.environ["TRACKIO_DIR"] and "grpo-trackio-" in str(TRACKIO_DIR)


@pytest.mark.parametrize("tracker", TRACKERS)
def test_a_tracker_holds_what_was_sent_and_a_resume_continues_its_run(tracker, tracker_env):
    """Steps 1-3 sent, stopped (Ctrl-C); resumed from the checkpoint of step 2, which sends 3 again and 4: the
    tracker has each step once, in one run, with the values sent, the samples as a table, and both endings."""
    require(tracker)
    run_dir, project = tracker_env / "run", f"grpo-test-{tracker_env.name}"[:60]
    run_dir.mkdir()
    log = RunLog(run_dir, config=CONFIG, sinks=[tracker], project=project)
    for step in (1, 2, 3):  # in the trainer's order: a step's row, then its samples
        log.metrics(row(step))
        if step != 2:
            log.samples([sample(step)])
    log.metrics({"step": 3, "eval/accuracy": 0.5})
    log.close("stopped")
    process_ends(tracker)
    resumed = RunLog(run_dir, resume_step=2, config=CONFIG, sinks=[tracker], project=project)
    for step in (3, 4):
        resumed.metrics({**row(step), "reward_mean": -1.0})  # a resent row would show as -1
    resumed.samples([sample(4)])
    resumed.close()
    process_ends(tracker)
    assert log.sink_errors == {} and resumed.sink_errors == {}
    got = READERS[tracker](run_dir, project)
    assert got["history"][metric_tag("reward_mean")] == [(1, 0.125), (2, 0.25), (3, 0.375), (4, -1.0)]
    assert got["history"]["reward/correctness"] == [(1, 1.0), (2, 0.0), (3, 1.0), (4, 0.0)]
    assert got["history"]["eval/accuracy"] == [(3, 0.5)]
    assert metric_tag("kl") not in got["history"] and metric_tag("ok") not in got["history"]  # NaN, bool
    assert got["runs"] == 1
    if tracker == "tensorboard":  # text, not a table
        assert len(got["samples"]) == 3 and "**reward +1.250, advantage -0.500** — What is 4 + 2?" in got["samples"][2]
        return
    assert [s["prompt"] for s in got["samples"]] == ["What is 1 + 2?", "What is 3 + 2?", "What is 4 + 2?"]
    assert got["samples"][2] == {"step": 4, "group": 0, "prompt": "What is 4 + 2?", "completion": "6", "answer": "6",
                                 "reward": 1.25, "advantage": -0.5, "reward/correctness": 1.0, "reward/format": 0.25}
    assert {"wandb": ["stopped", "exit 130", "finished", "exit 0"], "mlflow": ["FINISHED"],
            "trackio": ["grpo run stopped"]}[tracker] == got["ends"]
    config = got["config"]
    assert (config["grpo"]["group_size"] == 8) if tracker != "mlflow" else (config["grpo.group_size"] == "8")


def test_mlflow_says_how_a_run_ended(tracker_env):
    require("mlflow")
    for status, expected in (("stopped", "KILLED"), ("failed", "FAILED")):
        run_dir = tracker_env / status
        run_dir.mkdir()
        RunLog(run_dir, config=CONFIG, sinks=["mlflow"], project=status).close(status)
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{run_dir.resolve() / 'mlflow.db'}")
        [run] = client.search_runs([client.get_experiment_by_name(status).experiment_id])
        assert run.info.status == expected and run.info.run_name == status


def test_a_missing_tracker_package_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    from grpo_cli.run import setup
    from grpo_cli.run.train import train

    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setattr(setup, "load_policy", lambda *a, **k: pytest.fail("the model was loaded"))
    recipe = recipe_module.validate(small_recipe(tmp_path / "run", output={"report_to": ["wandb"]}))
    with pytest.raises(UserError, match=r"output.report_to has wandb, but the wandb package is not installed: "
                                        r"pip install 'grpo-cli\[wandb\]'"):
        train(recipe, console=TrainConsole(quiet=True))


def test_grpo_validate_says_which_tracker_package_is_missing(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from grpo_cli.cli import app

    monkeypatch.setitem(sys.modules, "mlflow", None)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(small_recipe(tmp_path / "run", output={"report_to": ["mlflow"]})))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert "output.report_to has mlflow, but the mlflow package is not installed: pip install 'grpo-cli[mlflow]'" \
        in " ".join(result.output.split())


def test_a_tracker_that_fails_during_training_is_counted_and_shown_and_the_run_goes_on(tmp_path, tracker_env,
                                                                                      monkeypatch):
    """MLflow's store goes away after the first rows: every later call fails; the run takes all its steps, the
    console says so once, then the count, and metrics.jsonl has every row."""
    require("mlflow")
    from grpo_cli.run.train import train
    from grpo_cli.trackers.mlflow_sink import MlflowSink

    sent = MlflowSink.log_metrics

    def goes_away(self, row):
        if row["step"] >= 2:
            raise ConnectionError("the tracking server went away")
        sent(self, row)

    monkeypatch.setattr(MlflowSink, "log_metrics", goes_away)
    said = []
    console = TrainConsole(quiet=True)
    monkeypatch.setattr(console, "message", said.append)
    recipe = recipe_module.validate(small_recipe(tmp_path / "run", output={"report_to": ["mlflow"]}))
    train(recipe, console=console)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows if "step_seconds" in r] == [1, 2, 3]
    failed = [m for m in said if "metric sink" in m]
    lost = len([r for r in rows if r["step"] >= 2])  # steps 2 and 3, and the evaluations at them
    assert len(failed) == 2 and "'mlflow' failed in log_metrics (ConnectionError: the tracking server went away)" \
        in failed[0] and failed[1].endswith(f"mlflow {lost}") and lost == 4


def test_an_unknown_tracker_is_refused_by_the_recipe_with_the_choices(tmp_path):
    with pytest.raises(UserError, match="unknown tracker 'neptune': choose from mlflow, tensorboard, trackio, wandb"):
        recipe_module.validate(small_recipe(tmp_path, output={"report_to": ["neptune"]}))
    with pytest.raises(UserError, match="a tracker is named twice"):
        recipe_module.validate(small_recipe(tmp_path, output={"report_to": ["wandb", "wandb"]}))
    older = recipe_module.validate(small_recipe(tmp_path, output={"tensorboard": True, "report_to": ["mlflow"]}))
    assert older.output.trackers == ["mlflow", "tensorboard"]


STEPS = 12


def start_train(tmp_path: Path, steps: int, *extra: str) -> subprocess.Popen:
    recipe = small_recipe(tmp_path / "run", train={"steps": steps, "lr": 2e-3, "warmup_steps": 1, "seed": 0},
                          output={"save_every": 2, "eval_every": 4, "samples_every": 2, "keep_best": False,
                                  "report_to": TRACKERS, "project": "grpo-cli-test", "run_name": "subprocess"})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", "TRACKIO_DIR": str(tmp_path / "trackio")}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "grpo_cli", "train", "recipe.yaml", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            start_new_session=True)


def read_in_subprocess(tmp_path: Path, tracker: str) -> dict:
    """A reader run in its own process where the store is a process-wide setting (Trackio's TRACKIO_DIR)."""
    code = (f"import json, os, sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); from pathlib import Path; "
            "from test_trackers import READERS; "  # conftest, imported with it, points TRACKIO_DIR elsewhere
            f"os.environ['TRACKIO_DIR'] = {str(tmp_path / 'trackio')!r}; "
            f"got = READERS[{tracker!r}](Path('run'), 'grpo-cli-test'); got.pop('run', None); print(json.dumps(got))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.splitlines()[-1])


def test_grpo_train_reports_every_step_to_every_tracker_and_sigterm_then_resume_keeps_one_run(tmp_path):
    """`grpo train` as a user runs it, reporting to all four: SIGTERM mid-run ends each tracker run as stopped;
    `--resume` continues the same runs; at the end every tracker holds metrics.jsonl's numbers, step for step."""
    for tracker in TRACKERS:
        require(tracker)
    proc = start_train(tmp_path, STEPS)
    deadline = time.time() + 300
    while len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err  # (0: it finished before the signal came)
    said = out + err
    assert "metrics also go to TensorBoard" in said, said
    assert "; W&B run" in said and "; MLflow run" in said and "; Trackio run subprocess" in said
    assert "Downloading artifacts" not in said and "Trackio project initialized" not in said
    assert "MLflow database tables" not in said
    stopped = {tracker: read_in_subprocess(tmp_path, tracker) for tracker in ("wandb", "mlflow", "trackio")}
    assert stopped["wandb"]["ends"] == ["stopped", "exit 130"]
    assert stopped["mlflow"]["ends"] == ["KILLED"] and stopped["trackio"]["ends"] == ["grpo run stopped"]
    resumed = start_train(tmp_path, STEPS, "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    for tracker in TRACKERS:
        got = read_in_subprocess(tmp_path, tracker)
        assert got["runs"] == 1, tracker
        for key in ("reward_mean", "loss", "eval/accuracy"):
            sent = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            held = [(step, value) for step, value in got["history"][metric_tag(key)]]
            assert [s for s, _ in held] == [s for s, _ in sent], (tracker, key)  # every step, once
            if tracker == "tensorboard":  # which keeps float32
                assert [v for _, v in held] == pytest.approx([v for _, v in sent], rel=1e-6), key
            else:
                assert held == sent, (tracker, key)
    assert read_in_subprocess(tmp_path, "mlflow")["ends"] == ["FINISHED"]


def test_under_torchrun_only_the_first_process_reports(tmp_path):
    """Two processes through torchrun, reporting to MLflow and TensorBoard: one MLflow run, each step once, one
    TensorBoard event file."""
    for tracker in ("mlflow", "tensorboard"):
        require(tracker)
    recipe = small_recipe(tmp_path / "run", grpo={"group_size": 4, "prompts_per_step": 4, "max_new_tokens": 40},
                          train={"steps": 2, "lr": 2e-3, "warmup_steps": 1, "seed": 0},
                          output={"save_every": 2, "eval_every": 2, "report_to": ["mlflow", "tensorboard"]})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "grpo_cli", "train", "recipe.yaml", "--quiet"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    got = read_mlflow(tmp_path / "run", "grpo")  # one run, or its unpacking fails
    assert [step for step, _ in got["history"]["train/reward_mean"]] == [1, 2]
    assert len(list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))) == 1
