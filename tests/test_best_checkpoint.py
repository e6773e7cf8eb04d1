"""output.keep_best: the checkpoint with the highest held-out accuracy is kept beside the last ones,
survives keep_last and resume, and is what `grpo export --best` and `grpo eval --best` load."""

import json
import re
from types import SimpleNamespace

import pytest

from conftest import small_recipe
from grpo_cli.checkpoint import locating, manifest, retention, store
from grpo_cli.run import held_out
from grpo_cli.config import recipe as recipe_module
from grpo_cli.commands.benchmark import EvalOptions, run as run_benchmark
from grpo_cli.run.console import TrainConsole
from grpo_cli.errors import UserError
from grpo_cli.export.build import export
from grpo_cli.run.log import read_jsonl
from grpo_cli.run.train import train


def recipe_for(run_dir, steps, max_new_tokens=8, **output):
    """Evaluated every step; short completions where the accuracy is scripted (a real run: 40)."""
    return recipe_module.validate(small_recipe(
        run_dir, train={"steps": steps, "lr": 5e-3, "warmup_steps": 1, "seed": 0},
        grpo={"group_size": 4, "prompts_per_step": 2, "max_new_tokens": max_new_tokens, "kl_beta": 0.04},
        output={"dir": str(run_dir), "samples_every": 10, "eval_every": 1, **output}))


def go(run_dir, steps, resume=False, **output):
    return train(recipe_for(run_dir, steps, **output), resume=resume, console=TrainConsole(quiet=True))


def kept(run_dir) -> list[int]:
    return [int(p.name.removeprefix("step-")) for p in manifest.complete_checkpoints(run_dir)]


@pytest.fixture
def scripted(monkeypatch):
    """Held-out accuracy as the test says, per step, without generating: logged as evaluate_held_out logs it."""
    accuracies = {}

    def evaluate_held_out(run, scorer, step):
        run.log.metrics({"step": step, "eval/accuracy": accuracies[step], "eval/n": len(run.eval_set.items)})
        return accuracies[step]

    monkeypatch.setattr(held_out, "evaluate_held_out", evaluate_held_out)
    return accuracies


def test_the_best_survives_keep_last_and_resume(tmp_path, tiny_model_path, scripted):
    """Step 3 is best (a tie at step 4 keeps the earlier) though checkpoints are due at even steps only:
    it is saved when evaluated, kept by keep_last 1 beside the last, and still known after resume."""
    run_dir = tmp_path / "run"
    scripted.update({0: 0.9, 1: 0.2, 2: 0.1, 3: 0.6, 4: 0.6, 5: 0.3})  # step 0 (the base) is no candidate
    summary = go(run_dir, 5, save_every=2, keep_last=1)
    assert kept(run_dir) == [3, 5]
    marker = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    assert marker == {"step": 3, "checkpoint": "step-3", "accuracy": 0.6, "n": 16} == summary.best

    # Resumed, a worse step 6 is no new best: the best (read from disk) is kept beside step 6.
    scripted.update({6: 0.5, 7: 0.9})
    summary = go(run_dir, 6, resume=True, save_every=2, keep_last=1)
    assert kept(run_dir) == [3, 6] and summary.best["step"] == 3
    # A better one replaces it, and keep_last no longer keeps the old best.
    summary = go(run_dir, 7, resume=True, save_every=2, keep_last=1)
    assert kept(run_dir) == [7] and summary.best["step"] == 7 and retention.read_best(run_dir)["step"] == 7


def test_keep_best_off_marks_nothing_and_best_is_refused(tmp_path, tiny_model_path, scripted):
    run_dir = tmp_path / "run"
    scripted.update({0: 0.1, 1: 0.5, 2: 0.2})
    summary = go(run_dir, 2, save_every=2, keep_best=False, keep_last=1)
    assert summary.best is None and not (run_dir / "checkpoints" / "best.json").exists() and kept(run_dir) == [2]
    for attempt in (lambda: export(str(run_dir), tmp_path / "out", best=True),
                    lambda: run_benchmark(EvalOptions(model=str(run_dir), best=True, limit=2))):
        with pytest.raises(UserError, match="has no best checkpoint.*keep_best.*Drop --best"):
            attempt()
    with pytest.raises(UserError, match="is a checkpoint; --best takes the run directory"):
        export(str(run_dir / "checkpoints" / "step-2"), tmp_path / "out", best=True)


def test_a_resume_from_before_the_best_forgets_it(tmp_path, tiny_model_path, scripted):
    """Resume skipped a damaged newer checkpoint: the steps after it are trained again, so a best among them
    would name weights about to be replaced."""
    run_dir = tmp_path / "run"
    scripted.update({0: 0.1, 1: 0.2, 2: 0.5, 3: 0.3, 4: 0.4})
    go(run_dir, 2, save_every=1)
    assert retention.read_best(run_dir)["step"] == 2
    adapter = run_dir / "checkpoints" / "step-2" / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 0x40  # damaged: resume goes back to step 1
    adapter.write_bytes(bytes(data))
    scripted[2] = 0.25  # step 2 trained again evaluates otherwise: the old 0.5 names weights no longer there
    summary = go(run_dir, 4, resume=True, save_every=1)
    assert summary.best["step"] == 4 and retention.read_best(run_dir)["step"] == 4  # not step 2 at the forgotten 0.5


@pytest.fixture(scope="module")
def peaked(tmp_path_factory, tiny_model_path):
    """A real run evaluated every step, checkpoints due only at the end, keep_last 1."""
    run_dir = tmp_path_factory.mktemp("best") / "run"
    summary = go(run_dir, 4, max_new_tokens=40, save_every=10, keep_last=1)
    return run_dir, summary


def test_export_and_eval_best_load_the_weights_that_were_evaluated(peaked, tmp_path):
    run_dir, summary = peaked
    evals = {r["step"]: r["eval/accuracy"] for r in read_jsonl(run_dir / "metrics.jsonl") if "eval/accuracy" in r}
    top = max(accuracy for step, accuracy in evals.items() if step >= 1)
    best_step = min(step for step, accuracy in evals.items() if step >= 1 and accuracy == top)  # ties: the earlier
    assert summary.best["step"] == best_step and kept(run_dir) == sorted({best_step, 4})
    evaluation = run_benchmark(EvalOptions(model=str(run_dir), best=True, limit=16))
    assert f"step-{best_step}" in evaluation.settings["model"]
    assert evaluation.report.accuracy == evals[best_step]  # the same weights as that step's evaluation in training
    assert export(str(run_dir), tmp_path / "out", best=True).step == best_step


class Saved:
    """Stands for the model, tokenizer and scheduler a checkpoint saves: one small file."""

    def save_pretrained(self, path, **_):
        (path / "weights.bin").write_bytes(b"w")

    def state_dict(self):
        return {}


def save_fake(run_dir, steps, keep_last=None):
    """Checkpoints of these steps as store.save writes them (manifest, checksums), in a fraction of a second."""
    policy = SimpleNamespace(model=Saved(), tokenizer=Saved())
    for n in steps:
        store.save(run_dir, n, policy, {}, Saved(), {"data": {}}, "recipe: x\n", keep_last=keep_last)
    return run_dir


def test_pruning_spares_the_marked_checkpoint(tmp_path):
    run_dir = save_fake(tmp_path / "run", (1, 2))
    retention.mark_best(run_dir, 2, 0.5, 8, keep_last=1)
    save_fake(run_dir, (3, 4), keep_last=1)
    assert kept(run_dir) == [2, 4]
    retention.mark_best(run_dir, 4, 0.7, 8, keep_last=1)  # the old best goes at once
    assert kept(run_dir) == [4]
    assert locating.locate_best(run_dir) == run_dir / "checkpoints" / "step-4"


@pytest.mark.parametrize("text", [
    '{"step": 2, "checkpoint": "step-2", "accuracy": 0.5',  # cut short
    "\x00\x17 not json",
    '"step-2"',
    '{"step": "2", "checkpoint": "step-2", "accuracy": 0.5, "n": 8}',
    '{"step": 2, "checkpoint": "step-2"}',
], ids=["truncated", "garbage", "a-string", "step-as-text", "fields-missing"])
def test_a_garbled_best_marker_is_an_error_not_no_best(text, tmp_path):
    """It used to read as "no best checkpoint": --best said there was none, and pruning no longer spared the best."""
    from typer.testing import CliRunner

    from grpo_cli.cli import app

    run_dir = save_fake(tmp_path / "run", (1, 2))
    marker = run_dir / "checkpoints" / "best.json"
    marker.write_text(text)
    message = rf"{marker} (cannot be read|is not a marker as grpo writes it).*Delete it"
    with pytest.raises(UserError, match=message):
        locating.locate_best(run_dir)
    with pytest.raises(UserError, match=message):
        save_fake(run_dir, (3,), keep_last=1)  # pruning: which checkpoint to spare is not known
    assert kept(run_dir)[:2] == [1, 2]
    result = CliRunner().invoke(app, ["eval", "--model", str(run_dir), "--best", "--limit", "1"])
    assert result.exit_code == UserError.exit_code and "best.json" in result.output and "Delete it" in result.output


def test_a_best_marker_naming_a_checkpoint_outside_its_run_is_refused(tmp_path):
    """A best.json naming another run's checkpoint loaded that run's weights as this run's best."""
    other = save_fake(tmp_path / "other", (2,))
    run_dir = save_fake(tmp_path / "run", (1,))
    elsewhere = other / "checkpoints" / "step-2"
    for named in (str(elsewhere), "../../other/checkpoints/step-2"):
        retention.best_file(run_dir).write_text(json.dumps({"step": 2, "checkpoint": named, "accuracy": 0.9, "n": 8}))
        with pytest.raises(UserError, match=rf"names the checkpoint '{re.escape(named)}', not its step's 'step-2'"):
            locating.locate_best(run_dir)
    # a link in its checkpoints/ to another run's: named right, but leading out of the run
    (run_dir / "checkpoints" / "step-2").symlink_to(elsewhere)
    retention.best_file(run_dir).write_text(json.dumps({"step": 2, "checkpoint": "step-2", "accuracy": 0.9, "n": 8}))
    with pytest.raises(UserError, match=rf"best.json leads outside {run_dir / 'checkpoints'} \(to {elsewhere}\)"):
        locating.locate_best(run_dir)


def test_a_checkpoint_linked_from_another_run_is_not_taken_for_the_runs_own(tmp_path):
    """Resume, eval and export of a run directory take its latest checkpoint; a step-N linking to another run's
    (or a file of a checkpoint linking to another's, checksums and all) would load that run's weights."""
    other = save_fake(tmp_path / "other", (9,))
    run_dir = save_fake(tmp_path / "run", (1,))
    (run_dir / "checkpoints" / "step-9").symlink_to(other / "checkpoints" / "step-9")
    for attempt in (lambda: locating.latest(run_dir), lambda: locating.locate(run_dir),
                    lambda: locating.latest_intact(run_dir, warn=print)):
        with pytest.raises(UserError, match=r"step-9 leads outside .*Move that checkpoint into the run"):
            attempt()
    (run_dir / "checkpoints" / "step-9").unlink()
    own = run_dir / "checkpoints" / "step-1" / "weights.bin"
    own.unlink()
    own.symlink_to(other / "checkpoints" / "step-9" / "weights.bin")  # the same bytes: its checksum matches
    with pytest.raises(UserError, match=r"is damaged: weights.bin leads outside"):
        locating.locate(run_dir)
