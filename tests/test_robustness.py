"""Runs that survive: kills, Ctrl-C, non-finite numbers, out of memory, full disks, changed recipes.

docs/failure-modes.md lists every case with the behaviour promised and the test that checks it.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, small_recipe
from grpo_cli.checkpoint import locating, manifest
from grpo_cli.config import recipe as recipe_module
from grpo_cli.run.console import TrainConsole
from grpo_cli.errors import UserError
from grpo_cli.run.guard import Halted
from grpo_cli.run.metrics import MACHINE_METRICS
from grpo_cli.run.log import read_jsonl
from grpo_cli.run.train import train

SIX_STEPS = {"train": {"steps": 6, "lr": 2e-3, "warmup_steps": 1, "seed": 0},
             "output": {"save_every": 2, "eval_every": 3, "samples_every": 1}}


def sections(run_dir, **overrides):
    base = {**SIX_STEPS, **overrides}
    # These runs count the checkpoints save_every writes; keep_best would add the best evaluated step's
    # (test_best_checkpoint.py tests that, resume and pruning included).
    base["output"] = {"keep_best": False, **base.get("output", {}), "dir": str(run_dir)}
    return small_recipe(run_dir, **base)


def run_in_process(run_dir, resume=False, **overrides):
    return train(recipe_module.validate(sections(run_dir, **overrides)), resume=resume,
                 console=TrainConsole(quiet=True))


def metrics(run_dir):
    return [{k: v for k, v in r.items() if k not in MACHINE_METRICS} for r in read_jsonl(run_dir / "metrics.jsonl")]


def adapter(run_dir, step):
    return load_file(str(run_dir / "checkpoints" / f"step-{step}" / "adapter_model.safetensors"))


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model_path):
    """An uninterrupted six-step run, the reference every interrupted run must reproduce."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    run_in_process(run_dir)
    return run_dir


def start_cli(tmp_path, *extra):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(sections(tmp_path / "run")))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "grpo_cli", "train", str(path), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path, start_new_session=True)


def wait_for(predicate, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError
        time.sleep(0.05)


def resume_and_compare(tmp_path, straight):
    """Resume the CLI run in tmp_path and check it ends as the uninterrupted run did."""
    resumed = start_cli(tmp_path, "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert metrics(tmp_path / "run") == metrics(straight)
    assert same_weights(adapter(tmp_path / "run", 6), adapter(straight, 6))


def test_sigkill_then_resume_reaches_the_same_run(tmp_path, straight):
    proc = start_cli(tmp_path)
    wait_for(lambda: manifest.is_complete(tmp_path / "run" / "checkpoints" / "step-4") or proc.poll() is not None)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    assert not manifest.is_complete(tmp_path / "run" / "checkpoints" / "step-6"), "killed too late to test"
    resume_and_compare(tmp_path, straight)


@pytest.mark.parametrize("signum, code, name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_ctrl_c_or_sigterm_saves_and_stops_then_resume_continues_exactly(tmp_path, straight, signum, code, name):
    # SIGTERM: what schedulers (Slurm, Kubernetes, docker stop, spot preemption) send
    proc = start_cli(tmp_path)
    wait_for(lambda: len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) >= 2 or proc.poll() is not None)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err
    assert f"stopped by {name}" in err and "--resume" in err and "Traceback" not in err
    assert "leaked semaphore" not in err  # the scoring pool was closed, not abandoned
    saved = locating.latest(tmp_path / "run")
    assert saved is not None and saved.name != "step-6" and f"saved {saved}" in err
    assert not list((tmp_path / "run" / "checkpoints").glob(".*partial"))
    resume_and_compare(tmp_path, straight)


def test_a_second_ctrl_c_stops_at_once(tmp_path, tiny_model_path):
    proc = start_cli(tmp_path)
    wait_for(lambda: len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) >= 1 or proc.poll() is not None)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err


def test_torn_checkpoints_and_metrics_lines_are_never_loaded(tmp_path, straight):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    torn = run_dir / "checkpoints" / "step-6" / "optimizer.pt"
    torn.write_bytes(torn.read_bytes()[:100])  # a copy that did not finish
    shutil.rmtree(run_dir / "checkpoints" / "step-4")
    (run_dir / "checkpoints" / ".step-8.partial").mkdir()  # a save that crashed half way
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 7, "reward_me')  # and a torn last line
    assert locating.latest(run_dir) == run_dir / "checkpoints" / "step-2"
    run_in_process(run_dir, resume=True)
    assert metrics(run_dir) == metrics(straight)
    assert same_weights(adapter(run_dir, 6), adapter(straight, 6))


def test_keep_last_prunes_only_complete_older_checkpoints(tmp_path, tiny_model_path):
    run_in_process(tmp_path / "run", output={"save_every": 1, "keep_last": 2})
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-5", "step-6"]


def nan_loss_on(monkeypatch, steps: set[int]):
    """Make the loss NaN during the given training steps (counted by optimizer-step calls)."""
    import grpo_cli.update.policy as update

    original = update.LOSSES["grpo"]
    calls = {"step": 0}

    def poisoned(logp, *args, **kwargs):
        terms = original(logp, *args, **kwargs)
        if calls["step"] in steps:
            return type(terms)(terms.per_completion * float("nan"), terms.kl, terms.clipped_tokens, terms.tokens)
        return terms

    original_update = update.update_policy

    def counting(*args, **kwargs):
        calls["step"] += 1
        return original_update(*args, **kwargs)

    monkeypatch.setitem(update.LOSSES, "grpo", poisoned)
    monkeypatch.setattr("grpo_cli.run.train.update_policy", counting)


def test_a_non_finite_step_is_skipped_and_logged(tmp_path, monkeypatch, tiny_model_path):
    nan_loss_on(monkeypatch, {2})
    run_in_process(tmp_path / "run", train={"steps": 3, "lr": 2e-3, "warmup_steps": 0, "seed": 0},
                   output={"save_every": 1})
    rows = {r["step"]: r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "reward_mean" in r}
    assert rows[2]["skipped_update"] == "loss, gradients" and rows[2]["loss"] is None
    assert "skipped_update" not in rows[1] and "skipped_update" not in rows[3]
    # the skipped step changed nothing: the adapter after step 2 is the adapter after step 1
    assert same_weights(adapter(tmp_path / "run", 1), adapter(tmp_path / "run", 2))
    assert not same_weights(adapter(tmp_path / "run", 2), adapter(tmp_path / "run", 3))


def test_too_many_bad_steps_stop_the_run_with_the_last_checkpoint_intact(tmp_path, monkeypatch, tiny_model_path):
    nan_loss_on(monkeypatch, {3, 4, 5})
    with pytest.raises(Halted) as error:
        run_in_process(tmp_path / "run", train={"steps": 6, "lr": 2e-3, "warmup_steps": 0, "seed": 0,
                                                "max_bad_steps": 3})
    message = str(error.value)
    assert "stopped at step 5: 3 steps in a row had non-finite loss, gradients" in message
    # named: the checkpoint saved before the first bad step (step-4 was saved during the streak)
    assert "The last checkpoint saved before step 3, the first of them, is" in message and "step-2;" in message
    assert "intact" not in message
    assert locating.latest(tmp_path / "run") == tmp_path / "run" / "checkpoints" / "step-4"


def test_weights_wrecked_by_a_finite_step_are_not_called_intact(tmp_path, tiny_model_path):
    # a learning rate far too high: a finite update sends the weights to huge values, the next steps
    # overflow; the checkpoint saved after the wrecking step must not be offered as intact
    with pytest.raises(Halted) as error:
        run_in_process(tmp_path / "run", train={"steps": 6, "lr": 1e9, "warmup_steps": 0, "seed": 0,
                                                "max_bad_steps": 2}, output={"save_every": 1, "eval_every": 100})
    message = str(error.value)
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "reward_mean" in r]
    first_bad = next(r["step"] for r in rows if r.get("skipped_update"))
    assert first_bad >= 2  # the first step's numbers were finite: it is the one that wrecked the weights
    assert f"saved before step {first_bad}" in message and f"step-{first_bad - 1};" in message
    assert "intact" not in message and "may already have damaged" in message


@pytest.mark.parametrize("phase, target", [("reference pass", "logprobs_no_grad"), ("update", "update_policy")])
def test_out_of_memory_names_its_phase_saves_the_step_before_and_says_what_to_lower(tmp_path, monkeypatch, straight,
                                                                                    phase, target):
    import grpo_cli.run.train as train_module

    original = getattr(train_module, target)  # called once a step in this recipe (kl_beta > 0, one update)
    calls = {"n": 0}

    def runs_out(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, target, runs_out)
    with pytest.raises(Halted) as error:
        run_in_process(tmp_path / "run", output={"save_every": 100, "eval_every": 3})
    message = str(error.value)
    assert f"CUDA ran out of memory during the {phase} of step 4." in message
    assert "grpo.micro_batch_size" in message and "grpo.group_size" in message and "grpo.max_new_tokens" in message
    saved = locating.latest(tmp_path / "run")
    assert saved == tmp_path / "run" / "checkpoints" / "step-3" and f"saved as {saved}" in message
    monkeypatch.setattr(train_module, target, original)
    run_in_process(tmp_path / "run", resume=True, output={"save_every": 100, "eval_every": 3})
    assert [r for r in metrics(tmp_path / "run") if "reward_mean" in r] == \
        [r for r in metrics(straight) if "reward_mean" in r]


def test_out_of_memory_after_an_applied_update_does_not_save_it_as_the_step_before(tmp_path, monkeypatch,
                                                                                  tiny_model_path):
    """With two updates per rollout, running out in the second leaves weights the first update moved:
    they are neither step 1's nor step 2's, so nothing is saved under step 1's name."""
    import grpo_cli.update.policy as update

    original = update._accumulate
    calls = {"n": 0}

    def runs_out(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the second update of step 2
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(*args, **kwargs)

    monkeypatch.setattr(update, "_accumulate", runs_out)
    with pytest.raises(Halted) as error:
        run_in_process(tmp_path / "run", grpo={"group_size": 4, "prompts_per_step": 2, "max_new_tokens": 24,
                                               "updates_per_rollout": 2},
                       output={"save_every": 100, "eval_every": 100})
    assert "during the update of step 2" in str(error.value)
    assert "Nothing newer than the last checkpoint could be saved" in str(error.value)
    assert locating.latest(tmp_path / "run") is None


def test_resume_refuses_a_recipe_that_trains_something_else(tmp_path, straight):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    with pytest.raises(UserError) as error:
        run_in_process(run_dir, resume=True, model={"name": "builtin:tiny-math", "dtype": "float32",
                                                    "lora": {"r": 4, "alpha": 16}},
                       grpo={"group_size": 8, "prompts_per_step": 2, "max_new_tokens": 40})
    message = str(error.value)
    assert "model.lora.r: 8 -> 4" in message and "grpo.group_size: 4 -> 8" in message
    assert "model.lora.alpha" not in message  # unchanged keys are not listed


def test_resume_allows_and_records_harmless_changes(tmp_path, straight):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    summary = run_in_process(run_dir, resume=True, train={"steps": 7, "lr": 2e-3, "warmup_steps": 1, "seed": 0},
                             output={"save_every": 2, "eval_every": 3, "samples_every": 5})
    assert summary.step == 7
    record = [json.loads(line) for line in (run_dir / "resumes.jsonl").read_text().splitlines()][-1]
    assert record["from_step"] == 6
    # the copy moved the run, so output.dir changed too
    assert set(record["changed"]) == {"output.samples_every", "train.steps", "output.dir"}
    assert record["changed"]["train.steps"] == [6, 7] and record["changed"]["output.samples_every"] == [1, 5]


@pytest.mark.parametrize("full_disk", [
    lambda: OSError(errno.ENOSPC, "No space left on device"),
    # what safetensors raises when the disk fills while it writes weights: not an OSError
    lambda: __import__("safetensors").SafetensorError("Error while serializing: I/O error: No space left on "
                                                      "device (os error 28)"),
])
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, tiny_model_path, full_disk):
    real_save = torch.save
    calls = {"n": 0}

    def fills_up(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:  # the second checkpoint's first torch.save
            raise full_disk()
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_up)
    with pytest.raises(UserError) as error:
        run_in_process(tmp_path / "run")
    message = str(error.value)
    assert "could not save the checkpoint for step 4" in message and "No space left on device" in message
    assert "step-2, is intact" in message and "--resume" in message
    assert locating.latest(tmp_path / "run") == tmp_path / "run" / "checkpoints" / "step-2"
    assert not list((tmp_path / "run" / "checkpoints").glob(".*partial"))


def test_an_unwritable_output_dir(tmp_path, tiny_model_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="cannot write the run directory"):
        run_in_process(tmp_path / "a_file" / "run")


def test_a_model_directory_without_weights(tmp_path, tiny_model_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_path, model)
    (model / "model.safetensors").unlink()
    with pytest.raises(UserError, match=f"could not load the model for '{model}'"):
        run_in_process(tmp_path / "run", model={"name": str(model), "dtype": "float32"})


def test_a_tokenizer_without_a_pad_token_pads_with_eos(tmp_path, tiny_model_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_path, model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(model)
    assert AutoTokenizer.from_pretrained(model).pad_token is None
    summary = run_in_process(tmp_path / "run", model={"name": str(model), "dtype": "float32"},
                             train={"steps": 2, "lr": 2e-3, "warmup_steps": 0, "seed": 0})
    assert summary.step == 2


def test_an_empty_dataset(tmp_path, tiny_model_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="empty"):
        run_in_process(tmp_path / "run", data={"train": str(tmp_path / "empty.jsonl"), "eval": None})


def test_prompts_longer_than_the_context(tmp_path, tiny_model_path):
    rows = [{"question": "x" * 300, "answer": "1"}, {"question": "What is 2 + 3?", "answer": "5"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    messages = []
    recipe = recipe_module.validate(sections(tmp_path / "run", data={"train": str(tmp_path / "d.jsonl"), "eval": None},
                                             train={"steps": 1, "lr": 1e-3, "warmup_steps": 0, "seed": 0}))
    console = TrainConsole(quiet=True)
    console.message = messages.append
    train(recipe, console=console)
    assert any("1 prompts too long for the context skipped" in m for m in messages)
    (tmp_path / "long.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(UserError, match="every prompt of .* is too long: the longest is 300 tokens"):
        run_in_process(tmp_path / "run2", data={"train": str(tmp_path / "long.jsonl"), "eval": None})


def test_ctrl_c_at_a_terminal_stops_cleanly_while_workers_score(tmp_path, tiny_model_path):
    # A terminal sends Ctrl-C to every process of the group, scoring workers included. A worker
    # that took it printed a KeyboardInterrupt traceback, and one that died mid-job left the
    # trainer waiting out the job's time limit.
    (tmp_path / "slow_rules.py").write_text("import time\n\ndef slow(completion, answer):\n"
                                            "    time.sleep(0.02)\n    return 0.0\n")
    recipe = sections(tmp_path / "run", train={"steps": 40, "lr": 2e-3, "warmup_steps": 1, "seed": 0},
                      rewards=[{"rule": "correctness"}, {"rule": "python", "function": "slow_rules:slow"}])
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "grpo_cli", "train", str(tmp_path / "recipe.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            start_new_session=True)
    wait_for(lambda: len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) >= 2 or proc.poll() is not None)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "stopped by Ctrl-C after step" in err and "Traceback" not in err and "KeyboardInterrupt" not in err


def test_a_script_that_calls_train_without_the_main_guard_gets_told_how_to_fix_it(tmp_path, tiny_model_path):
    # Scoring workers are spawned: each runs the calling script's top level again as it starts. Unguarded,
    # every worker loaded the model before failing, the pool started another, and the run waited forever.
    recipe = sections(tmp_path / "run", data={"train": "builtin:arithmetic", "eval": None})
    (tmp_path / "unguarded.py").write_text(
        "import grpo_cli.rewards.scoring\nfrom grpo_cli.config import recipe\nfrom grpo_cli.run.train import train\n\n"
        "grpo_cli.rewards.scoring.START_LIMIT_S = 5.0\n"
        f"train(recipe.validate({recipe!r}))\nprint('trained')\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "unguarded.py"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the workers too
        raise
    assert proc.returncode == 1 and "trained" not in out, err[-2000:]
    assert time.monotonic() - started < 120
    assert "WorkersDidNotStart" in err and 'if __name__ == "__main__":' in err
    assert "train() was called again by a scoring worker process as it started" in err
    assert out.count("model builtin:tiny-math") == 1  # only the script's own process loaded it


# ---- SIGTERM beyond the stop after a step (test_ctrl_c_or_sigterm_saves_and_stops_then_resume_continues_exactly)

def test_sigterm_during_a_rollout_drops_it_and_saves_the_step_before(tmp_path, monkeypatch, straight):
    import grpo_cli.run.train as train_module
    from grpo_cli.run.guard import Stopped

    original = train_module.sample_step
    calls = {"n": 0}

    def terminated_in_step_4(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-rollout; the next decode step drops it
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "sample_step", terminated_in_step_4)
    with pytest.raises(Stopped) as stopped:
        run_in_process(tmp_path / "run", output={"save_every": 100, "eval_every": 3, "samples_every": 1})
    assert stopped.value.exit_code == 143
    assert "during step 4, whose rollout was dropped" in str(stopped.value)
    assert locating.latest(tmp_path / "run") == tmp_path / "run" / "checkpoints" / "step-3"
    assert max(r["step"] for r in metrics(tmp_path / "run")) == 3  # nothing of step 4 was logged
    monkeypatch.setattr(train_module, "sample_step", original)
    run_in_process(tmp_path / "run", resume=True, output={"save_every": 100, "eval_every": 3, "samples_every": 1})
    assert [r for r in metrics(tmp_path / "run") if "reward_mean" in r] == \
        [r for r in metrics(straight) if "reward_mean" in r]


def test_sigterm_before_training_starts_stops_at_once_without_a_traceback(tmp_path, monkeypatch, tiny_model_path):
    import grpo_cli.run.setup as setup_module
    from grpo_cli.run.guard import Terminated

    def terminated_while_loading(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM did not stop the set-up")

    monkeypatch.setattr(setup_module, "load_policy", terminated_while_loading)
    with pytest.raises(Terminated):
        run_in_process(tmp_path / "run")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # put back


def test_sigterm_during_grpo_eval_writes_nothing_and_exits_143(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import grpo_cli.commands.benchmark as benchmark
    from grpo_cli.cli import app

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not stop the evaluation")

    monkeypatch.setattr(benchmark, "run", terminated)
    out = tmp_path / "results.json"
    result = CliRunner().invoke(app, ["eval", "--predictions", "p.jsonl", "--output", str(out)])
    assert result.exit_code == 143 and "stopped by SIGTERM" in result.output and "was not written" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_an_output_file_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from grpo_cli.run.log import write_whole

    target = tmp_path / "results.json"
    write_whole(target, "old")

    class Interrupted(BaseException):
        pass

    def interrupted(*args, **kwargs):
        raise Interrupted

    monkeypatch.setattr(os, "fsync", interrupted)  # written, not yet in place: a Ctrl-C or a power cut now
    with pytest.raises(Interrupted):
        write_whole(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


# ---- one process per run directory

def test_a_second_process_on_a_run_directory_is_refused_naming_the_first(tmp_path, tiny_model_path):
    first = start_cli(tmp_path)
    try:
        wait_for(lambda: len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) >= 1 or first.poll() is not None)
        assert first.poll() is None
        second = start_cli(tmp_path, "--resume")
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        assert "is in use by another grpo process" in err and f"pid {first.pid}" in err and "Traceback" not in err
    finally:
        first.kill()  # SIGKILL: the kernel drops its lock
        first.wait()
    rows_before = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert len({r["step"] for r in rows_before if "reward_mean" in r}) == \
        len([r for r in rows_before if "reward_mean" in r])  # no row was written twice
    third = start_cli(tmp_path, "--resume")  # a killed holder leaves no lock behind
    out, err = third.communicate(timeout=600)
    assert third.returncode == 0, err[-2000:]


# ---- a run directory holds a run only once a step was recorded; the user's files are theirs

def test_a_run_that_failed_before_its_first_step_does_not_block_the_corrected_rerun(tmp_path, monkeypatch,
                                                                                      tiny_model_path):
    import grpo_cli.run.train as train_module

    def fails(*args, **kwargs):  # a mistake that shows only once training starts
        raise UserError("reward rule python: my_rules.score failed on the first completion")

    monkeypatch.setattr(train_module, "sample_step", fails)
    with pytest.raises(UserError, match="failed on the first completion"):
        run_in_process(tmp_path / "run")
    # the failed attempt left its recipe and its step-0 evaluation, but no step
    assert (tmp_path / "run" / "recipe.yaml").exists()
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [0]
    monkeypatch.undo()
    summary = run_in_process(tmp_path / "run", train={"steps": 2, "lr": 2e-3, "warmup_steps": 1, "seed": 0})
    assert summary.step == 2
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "eval/accuracy" in r] == [0, 2]


def test_resume_never_overwrites_the_recipe_file_it_was_given(tmp_path, tiny_model_path):
    run_dir = tmp_path / "exp1"
    run_dir.mkdir()
    recipe_file = run_dir / "recipe.yaml"
    written = "# my notes on this run\n" + yaml.safe_dump(
        sections(run_dir, train={"steps": 2, "lr": 2e-3, "warmup_steps": 1, "seed": 0}))
    recipe_file.write_text(written)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for extra in ([], ["--resume", "--set", "train.steps=3"]):
        proc = subprocess.run([sys.executable, "-m", "grpo_cli", "train", str(recipe_file), "--quiet", *extra],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert recipe_file.read_text() == written
    assert locating.latest(run_dir).name == "step-3"
    assert "train:\n  steps: 3" in (run_dir / "checkpoints" / "step-3" / "recipe.yaml").read_text()


def test_resume_applies_a_changed_learning_rate_and_weight_decay(tmp_path, straight):
    from grpo_cli.update.policy import lr_factor

    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    new = {"steps": 8, "lr": 5e-4, "warmup_steps": 1, "seed": 0, "weight_decay": 0.1}
    run_in_process(run_dir, resume=True, train=new)
    rows = {r["step"]: r for r in metrics(run_dir) if "reward_mean" in r}
    # the lr logged after an update is the rate the next one uses: the new base rate on the new schedule
    for step in (7, 8):
        assert rows[step]["lr"] == pytest.approx(new["lr"] * lr_factor(step, 1, 8, "cosine"))
    optimizer = torch.load(run_dir / "checkpoints" / "step-8" / "optimizer.pt", weights_only=False)
    assert {g["weight_decay"] for g in optimizer["param_groups"]} == {0.1}
    scheduler = torch.load(run_dir / "checkpoints" / "step-8" / "scheduler.pt", weights_only=True)
    assert scheduler["base_lrs"] == [new["lr"]]


def wait_for_handler(pid: int, signum: int) -> None:
    """Until process `pid` has a handler of its own for `signum` (Linux: SigCgt in /proc/<pid>/status)."""
    def caught() -> bool:
        status = open(f"/proc/{pid}/status").read()
        mask = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
        return bool(mask >> (signum - 1) & 1)

    wait_for(caught, timeout=120)


def test_sigterm_stops_grpo_eval_and_grpo_export_leaving_nothing_half_written(tmp_path, straight):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}

    def start(*args):
        return subprocess.Popen([sys.executable, "-m", "grpo_cli", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)

    evaluation = start("eval", "--model", str(straight), "--data", "builtin:arithmetic-test", "--max-new-tokens", "60",
                       "--output", str(tmp_path / "results.json"))
    wait_for_handler(evaluation.pid, signal.SIGTERM)
    time.sleep(1.0)  # into the evaluation
    evaluation.send_signal(signal.SIGTERM)
    out, err = evaluation.communicate(timeout=120)
    assert evaluation.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in err and "was not written" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no results file, no hidden temporary one

    export = start("export", str(straight), "--out", str(tmp_path / "model"))
    wait_for(lambda: (tmp_path / ".model.partial").exists() or export.poll() is not None)
    export.send_signal(signal.SIGTERM)
    out, err = export.communicate(timeout=120)
    assert export.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # neither the export nor its hidden .partial
