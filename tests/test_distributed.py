"""Several processes through torchrun, on the CPU with gloo: the same run as one process
(2 processes with 4 prompts each per step against 1 with 8)."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, small_recipe
from grpo_cli.config import recipe as recipe_module
from grpo_cli.run.console import TrainConsole
from grpo_cli.distributed.world import World, check_recipe
from grpo_cli.errors import UserError
from grpo_cli.run.metrics import MACHINE_METRICS
from grpo_cli.run.log import read_jsonl
from grpo_cli.run.train import train

# top_p 0.9 makes the sampler's distribution the policy's nucleus, so every token's ratio pi_train / pi_sampler is
# its nucleus's mass, 0.9 to 1: a real gap in float32, the same in every process, which the mask correction acts on
SECTIONS = {"grpo": {"group_size": 4, "prompts_per_step": 8, "max_new_tokens": 40, "kl_beta": 0.04, "top_p": 0.9,
                     "sampler_correction": "mask", "sampler_ratio_low": 0.95},
            "train": {"steps": 4, "lr": 2e-3, "warmup_steps": 1, "seed": 0},
            "output": {"save_every": 2, "eval_every": 2, "samples_every": 1}}


FULL = {"model": {"name": "builtin:tiny-math", "dtype": "float32", "lora": None},
        "train": {"steps": 4, "lr": 5e-4, "warmup_steps": 1, "seed": 0}}


TOOLS = {"model": {"name": "builtin:tiny-math-tools", "dtype": "float32", "lora": {"r": 8, "alpha": 16}},
         "grpo": {**SECTIONS["grpo"], "max_new_tokens": 96, "tools": ["python"], "max_tool_calls": 2},
         "train": {**SECTIONS["train"], "steps": 3}}


def recipe_dict(run_dir, strategy="ddp", full=False, tools=False):
    sections = {k: dict(v) for k, v in SECTIONS.items()}
    if full:
        sections.update(FULL)
    if tools:
        sections.update(TOOLS)
    sections["output"]["dir"] = str(run_dir)
    return {**small_recipe(run_dir, **sections), "distributed": {"strategy": strategy}}


def torchrun(tmp_path, run_dir, processes=2, *extra, strategy="ddp", full=False, tools=False):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(run_dir, strategy, full, tools)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "grpo_cli", "train", str(path), "--quiet", *extra]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def compare(run_a, run_b):
    """Same metrics up to float rounding, and the same final adapter."""
    a, b = read_jsonl(run_a / "metrics.jsonl"), read_jsonl(run_b / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert {k for k in x if k not in MACHINE_METRICS} == {k for k in y if k not in MACHINE_METRICS}
        for key, value in x.items():
            if key in MACHINE_METRICS:
                continue
            if isinstance(value, float):
                assert value == pytest.approx(y[key], rel=1e-3, abs=1e-5), (x["step"], key)
            else:
                assert value == y[key], (x["step"], key)
    final = max(int(p.name.removeprefix("step-")) for p in (run_a / "checkpoints").glob("step-*"))
    weights = "model.safetensors" if (run_a / "checkpoints" / f"step-{final}" / "model.safetensors").exists() \
        else "adapter_model.safetensors"
    wa = load_file(str(run_a / "checkpoints" / f"step-{final}" / weights))
    wb = load_file(str(run_b / "checkpoints" / f"step-{final}" / weights))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model_path):
    run_dir = tmp_path_factory.mktemp("single") / "run"
    train(recipe_module.validate(recipe_dict(run_dir)), console=TrainConsole(quiet=True))
    return run_dir


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def double(request, tmp_path_factory, tiny_model_path):
    tmp = tmp_path_factory.mktemp(f"double-{request.param}")
    result = torchrun(tmp, tmp / "run", strategy=request.param)
    return tmp / "run", result, request.param


def test_two_processes_learn_as_one(single, double):
    run_dir, result, _ = double
    compare(single, run_dir)
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "reward_mean" in r]
    assert any(r["sampler_corrected_frac"] > 0 for r in rows)  # the correction dropped tokens, alike in both
    assert all(0.9 - 1e-4 < r["sampler_ratio_min"] and r["sampler_ratio_max"] < 1 + 1e-4 for r in rows)
    # only the first process wrote: one metrics row per step, one summary line
    assert result.stdout.count("done: 4 steps") == 1


def test_resume_at_two_processes(tmp_path, single, double):
    run_dir = tmp_path / "run"
    shutil.copytree(double[0], run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-4")  # as if stopped after step 2
    torchrun(tmp_path, run_dir, 2, "--resume", strategy=double[2])
    compare(single, run_dir)


def test_resume_a_two_process_run_in_one(tmp_path, single, double):
    run_dir = tmp_path / "run"
    shutil.copytree(double[0], run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-4")
    train(recipe_module.validate(recipe_dict(run_dir, double[2])), resume=True, console=TrainConsole(quiet=True))
    compare(single, run_dir)


def test_a_checkpoint_moves_between_strategies(tmp_path, single, double):
    run_dir = tmp_path / "run"
    shutil.copytree(double[0], run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-4")
    other = "fsdp" if double[2] == "ddp" else "ddp"
    torchrun(tmp_path, run_dir, 2, "--resume", strategy=other)
    compare(single, run_dir)


def test_fsdp_full_fine_tune_with_a_sharded_reference_learns_as_one(tmp_path, tiny_model_path):
    alone = tmp_path / "alone"
    train(recipe_module.validate(recipe_dict(alone, full=True)), console=TrainConsole(quiet=True))
    torchrun(tmp_path, tmp_path / "sharded", strategy="fsdp", full=True)
    compare(alone, tmp_path / "sharded")


def test_two_processes_with_the_code_tool_learn_as_one(tmp_path, tools_model_path):
    """Each process pauses its own rows for their calls and runs its own sandbox; the draws stay in lockstep,
    so the run is the one process's, tool figures included."""
    alone = tmp_path / "alone"
    train(recipe_module.validate(recipe_dict(alone, tools=True)), console=TrainConsole(quiet=True))
    torchrun(tmp_path, tmp_path / "two", tools=True)
    compare(alone, tmp_path / "two")
    rows = [r for r in read_jsonl(alone / "metrics.jsonl") if "tool_calls" in r]
    assert len(rows) == 3 and sum(r["tool_calls"] for r in rows) > 0


def test_recipes_that_cannot_split_are_refused():
    recipe = recipe_module.validate(recipe_dict("runs/x"))
    with pytest.raises(UserError, match="must divide evenly over the 3 processes"):
        check_recipe(recipe, World(0, 3, 0))
    dynamic = recipe.model_copy(update={"grpo": recipe.grpo.model_copy(update={"dynamic_sampling": True})})
    with pytest.raises(UserError, match="dynamic_sampling is not supported with several processes"):
        check_recipe(dynamic, World(0, 2, 0))
    check_recipe(recipe, World(0, 2, 0))
    check_recipe(dynamic, World())  # one process: anything goes
    four_bit = recipe_module.validate({**recipe_dict("runs/x", "fsdp"), "model": {"load_in_4bit": True}})
    with pytest.raises(UserError, match="does not shard 4-bit"):
        check_recipe(four_bit, World(0, 2, 0))
