"""A checkpoint that changed after it was written is never loaded silently.

Each checkpoint lists a SHA-256 of every file (SHA256SUMS, itself in manifest.json); resume, `grpo eval`
and `grpo export` check them before loading. docs/failure-modes.md lists the cases.
"""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import ROOT, small_recipe
from grpo_cli.checkpoint import layout, locating, manifest, store
from grpo_cli.config import recipe as recipe_module
from grpo_cli.run.console import TrainConsole
from grpo_cli.errors import UserError
from grpo_cli.run.train import train

ADAPTER = "adapter_model.safetensors"
FOUR_STEPS = {"train": {"steps": 4, "lr": 2e-3, "warmup_steps": 1, "seed": 0},
              "output": {"save_every": 2, "eval_every": 4, "samples_every": 4}}


def recipe_for(run_dir, **overrides):
    sections = {**FOUR_STEPS, **overrides}
    sections["output"] = {**FOUR_STEPS["output"], **overrides.get("output", {}), "dir": str(run_dir)}
    return recipe_module.validate(small_recipe(run_dir, **sections))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_path):
    """A four-step LoRA run with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train(recipe_for(run_dir), console=TrainConsole(quiet=True))
    return run_dir


@pytest.fixture
def run_dir(tmp_path, trained):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def step(run_dir, n):
    return run_dir / "checkpoints" / f"step-{n}"


def flip_a_byte(path: Path, at_end: int = 1) -> None:
    """Change one byte near the end (in a tensor's data, not the header); the size stays the same."""
    data = bytearray(path.read_bytes())
    data[-at_end] ^= 0x40
    path.write_bytes(bytes(data))


def make_old_style(ckpt: Path) -> None:
    """Rewrite the manifest as grpo wrote it before checksums: {file: size}, no SHA256SUMS."""
    (ckpt / "SHA256SUMS").unlink(missing_ok=True)
    files = {str(f.relative_to(ckpt)): f.stat().st_size for f in sorted(ckpt.rglob("*"))
             if f.is_file() and f.name != layout.MANIFEST}
    (ckpt / layout.MANIFEST).write_text(json.dumps(files, indent=1))


def test_every_file_has_a_sha256_that_sha256sum_can_check(run_dir):
    ckpt = step(run_dir, 4)
    sums = (ckpt / "SHA256SUMS").read_text().splitlines()
    listed = dict(reversed(line.split("  ", 1)) for line in sums)
    files = {str(f.relative_to(ckpt)) for f in ckpt.rglob("*") if f.is_file()} - {"SHA256SUMS", "manifest.json"}
    assert set(listed) == files and ADAPTER in files and "optimizer.pt" in files
    for name, digest in listed.items():
        assert hashlib.sha256((ckpt / name).read_bytes()).hexdigest() == digest
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["SHA256SUMS"] == (ckpt / "SHA256SUMS").stat().st_size  # the sums are covered by the sizes
    if shutil.which("sha256sum"):
        assert subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=ckpt).returncode == 0


def test_a_flipped_byte_is_refused_naming_the_file(run_dir):
    flip_a_byte(step(run_dir, 4) / ADAPTER)
    assert manifest.is_complete(step(run_dir, 4))  # the size is right: only the checksum tells
    for ref in (step(run_dir, 4), run_dir):  # the checkpoint itself, or the run directory's latest
        with pytest.raises(UserError) as error:
            locating.locate(ref)
        message = str(error.value)
        assert ADAPTER in message and str(step(run_dir, 4)) in message and "checksum" in message
        assert "\n" not in message
    assert locating.locate(step(run_dir, 2)) == step(run_dir, 2)  # the others are fine


def test_a_damaged_optimizer_state_stops_resume_there_but_not_eval_or_export(run_dir):
    flip_a_byte(step(run_dir, 4) / "optimizer.pt", at_end=200)
    warnings = []
    assert locating.latest_intact(run_dir, warn=warnings.append) == step(run_dir, 2)
    assert "optimizer.pt" in warnings[0]
    assert locating.locate(run_dir) == step(run_dir, 4)  # eval and export never read the optimizer state


def test_resume_skips_a_damaged_checkpoint_with_a_warning(run_dir):
    assert locating.latest_intact(run_dir, warn=pytest.fail) == step(run_dir, 4)
    flip_a_byte(step(run_dir, 4) / ADAPTER)
    warnings = []
    assert locating.latest_intact(run_dir, warn=warnings.append) == step(run_dir, 2)
    assert len(warnings) == 1
    assert str(step(run_dir, 4)) in warnings[0] and ADAPTER in warnings[0] and "step-2" in warnings[0]


def test_resume_refuses_when_every_checkpoint_is_damaged(run_dir):
    """Not a silent fresh start that would drop the run's metrics."""
    flip_a_byte(step(run_dir, 4) / ADAPTER)
    flip_a_byte(step(run_dir, 2) / "rng.pt", at_end=100)
    with pytest.raises(UserError) as error:
        locating.latest_intact(run_dir, warn=lambda _: None)
    assert "step-4" in str(error.value) and "step-2" in str(error.value) and "rng.pt" in str(error.value)


def test_restoring_a_damaged_checkpoint_fails_before_any_weight_is_loaded(run_dir):
    """The last line of defence, for a caller that picked the checkpoint with the cheap `latest()`."""
    from grpo_cli.model.loading import load_policy

    flip_a_byte(step(run_dir, 4) / ADAPTER)
    assert locating.latest(run_dir) == step(run_dir, 4)
    recipe = recipe_for(run_dir)
    policy = load_policy(recipe.model, recipe.grpo.kl_beta)
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    with pytest.raises(UserError, match=ADAPTER):
        store.restore_weights(step(run_dir, 4), policy)
    after = policy.model.state_dict()
    assert all((before[k] == after[k]).all() for k in before)


def test_train_resume_falls_back_to_the_newest_intact_checkpoint(run_dir, trained):
    from safetensors.torch import load_file

    flip_a_byte(step(run_dir, 4) / ADAPTER)
    messages = []
    console = TrainConsole(quiet=True)
    console.message = messages.append
    summary = train(recipe_for(run_dir), resume=True, console=console)
    assert summary.step == 4
    assert any(str(step(run_dir, 4)) in m and ADAPTER in m and "step-2" in m for m in messages)
    assert locating.locate(step(run_dir, 4)) == step(run_dir, 4)  # steps 3 and 4 trained again, saved whole
    again, first = load_file(str(step(run_dir, 4) / ADAPTER)), load_file(str(step(trained, 4) / ADAPTER))
    assert again.keys() == first.keys() and all((again[k] == first[k]).all() for k in first)


def test_eval_and_export_refuse_a_damaged_checkpoint(run_dir, tmp_path):
    from grpo_cli.export.build import export
    from grpo_cli.model.loading import load_for_inference

    flip_a_byte(step(run_dir, 4) / ADAPTER)
    with pytest.raises(UserError, match=ADAPTER):
        load_for_inference(str(step(run_dir, 4)), device="cpu")
    with pytest.raises(UserError, match=ADAPTER):
        export(str(run_dir), tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


def test_grpo_eval_on_a_damaged_checkpoint_is_a_message_and_exit_2(run_dir):
    flip_a_byte(step(run_dir, 4) / ADAPTER)
    done = subprocess.run([sys.executable, "-m", "grpo_cli", "eval", "--model", str(step(run_dir, 4)),
                           "--data", "builtin:arithmetic-test", "--limit", "1", "--device", "cpu"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2, done.stderr
    assert ADAPTER in done.stderr and "Traceback" not in done.stderr


def test_an_old_manifest_without_checksums_still_loads(run_dir):
    """Checkpoints written before checksums: sizes are checked as before, and they load."""
    from grpo_cli.model.loading import load_for_inference

    for n in (2, 4):
        make_old_style(step(run_dir, n))
    assert locating.locate(run_dir) == step(run_dir, 4)
    assert locating.latest_intact(run_dir, warn=pytest.fail) == step(run_dir, 4)
    assert load_for_inference(str(run_dir), device="cpu").source.startswith(str(step(run_dir, 4)))
    torn = step(run_dir, 4) / "optimizer.pt"
    torn.write_bytes(torn.read_bytes()[:100])
    with pytest.raises(UserError, match="incomplete"):
        locating.locate(step(run_dir, 4))


@pytest.mark.parametrize("old_style", [False, True], ids=["with checksums", "old manifest"])
@pytest.mark.parametrize("damage", ["garbage header", "truncated"])
def test_a_corrupt_safetensors_file_is_a_user_error(run_dir, damage, old_style):
    from grpo_cli.model.loading import load_for_inference, load_policy

    ckpt = step(run_dir, 4)
    weights = ckpt / ADAPTER
    data = weights.read_bytes()
    if damage == "garbage header":
        weights.write_bytes(b"\xff" * 64 + data[64:])  # same size: an old manifest's sizes still match
    else:
        weights.write_bytes(data[: len(data) // 2])
    if old_style:
        make_old_style(ckpt)  # the sizes now describe the damaged file: only reading it can tell
    with pytest.raises(UserError, match=ADAPTER):
        locating.locate(ckpt)
    with pytest.raises(UserError, match=ADAPTER):
        load_for_inference(str(ckpt), device="cpu")
    recipe = recipe_for(run_dir)
    with pytest.raises(UserError, match=ADAPTER):
        store.restore_weights(ckpt, load_policy(recipe.model, recipe.grpo.kl_beta))


def test_a_corrupt_full_model_checkpoint_is_a_user_error(tmp_path, tiny_model_path):
    from grpo_cli.model.loading import load_policy
    from grpo_cli.config.recipe import ModelSpec

    ckpt = step(tmp_path / "run", 1)
    shutil.copytree(tiny_model_path, ckpt)
    (ckpt / layout.STATE_FILE).write_text(json.dumps({"step": 1}))
    weights = ckpt / "model.safetensors"
    weights.write_bytes(b"\xff" * 64 + weights.read_bytes()[64:])
    make_old_style(ckpt)
    with pytest.raises(UserError, match="model.safetensors"):
        locating.locate(ckpt)
    policy = load_policy(ModelSpec(name="builtin:tiny-math", dtype="float32", lora=None), kl_beta=0.0)
    with pytest.raises(UserError, match="model.safetensors"):
        store.restore_weights(ckpt, policy)


class _Saved:
    """Just enough of a policy, scheduler and tokenizer for store.save."""

    def save_pretrained(self, directory, state_dict=None):
        (Path(directory) / "weights.bin").write_bytes(b"w" * 10)

    def state_dict(self):
        return {}


def test_keep_last_never_prunes_the_new_checkpoint_for_a_damaged_newer_one(tmp_path):
    """After resume skipped a damaged step-4, saving step 3 with keep_last 1 keeps step 3."""
    run = tmp_path / "run"
    policy = SimpleNamespace(model=_Saved(), tokenizer=_Saved())
    for n in (2, 4):
        store.save(run, n, policy, {}, _Saved(), {"data": {}}, "recipe: x\n")
    flip_a_byte(step(run, 4) / "weights.bin")
    assert locating.latest_intact(run, warn=lambda _: None) == step(run, 2)
    store.save(run, 3, policy, {}, _Saved(), {"data": {}}, "recipe: x\n", keep_last=1)
    assert locating.latest_intact(run, warn=lambda _: None) == step(run, 3)
    assert not step(run, 2).exists()
