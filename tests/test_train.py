"""End-to-end runs on the builtin model: a few steps each, on the CPU."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, small_recipe
from grpo_cli.config import recipe as recipe_module
from grpo_cli.run.console import TrainConsole
from grpo_cli.errors import UserError
from grpo_cli.run.metrics import MACHINE_METRICS
from grpo_cli.run.log import read_jsonl
from grpo_cli.run.train import train

REQUIRED = {"step", "reward_mean", "reward_std", "accuracy", "kl", "clip_frac", "loss", "completion_len",
            "frac_zero_std", "step_seconds", "rollout_seconds", "score_seconds", "update_seconds"}


def run(tmp_path, name="run", resume=False, **sections):
    recipe = recipe_module.validate(small_recipe(tmp_path / name, **sections))
    return train(recipe, resume=resume, console=TrainConsole(quiet=True))


def metrics(run_dir, timing=False):
    rows = read_jsonl(run_dir / "metrics.jsonl")
    return rows if timing else [{k: v for k, v in r.items() if k not in MACHINE_METRICS} for r in rows]


def test_run_directory(tmp_path, tiny_model_path):
    summary = run(tmp_path)
    run_dir = tmp_path / "run"
    assert summary.step == 3 and summary.checkpoint == run_dir / "checkpoints" / "step-3"
    # the resolved recipe loads back to the same recipe
    assert recipe_module.load(run_dir / "recipe.yaml") == recipe_module.validate(small_recipe(run_dir))
    rows = metrics(run_dir, timing=True)
    steps = [r for r in rows if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for row in steps:
        assert REQUIRED <= set(row) and {"reward/correctness", "reward/step_format"} <= set(row)
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["frac_zero_std"] <= 1 and row["kl"] >= 0
        phases = [row["rollout_seconds"], row["score_seconds"], row["update_seconds"]]
        assert all(seconds > 0 for seconds in phases) and sum(phases) <= row["step_seconds"]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2, 3] and all(r["eval/n"] == 16 for r in evals)
    assert summary.eval_first == evals[0]["eval/accuracy"] and summary.eval_last == evals[-1]["eval/accuracy"]
    samples = read_jsonl(run_dir / "samples.jsonl")
    assert {s["step"] for s in samples} == {1, 2, 3} and len(samples) == 3 * 2 * 4
    assert {"prompt", "answer", "completion", "rewards", "reward", "advantage"} <= set(samples[0])
    for step in (2, 3):
        ckpt = run_dir / "checkpoints" / f"step-{step}"
        for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "optimizer.pt",
                     "scheduler.pt", "rng.pt", "trainer_state.json"):
            assert (ckpt / name).exists(), name
        assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == step
    assert not list((run_dir / "checkpoints").glob(".*partial"))


def test_each_phase_of_a_step_is_timed_on_its_own(tmp_path, tiny_model_path, monkeypatch):
    """update_seconds is the update's own time, not what the step left after rollout and scoring: a pause
    between the phases shows in step_seconds alone, a pause inside the update in update_seconds too."""
    import time

    from grpo_cli.run import train as train_module

    gap, inside = 0.4, 0.3
    rows_with_gradient, update_policy = train_module.rows_with_gradient, train_module.update_policy

    def slow_gap(*args):
        time.sleep(gap)  # between the score and the update phases, in no phase
        return rows_with_gradient(*args)

    def slow_update(*args, **kwargs):
        time.sleep(inside)
        return update_policy(*args, **kwargs)

    monkeypatch.setattr(train_module, "rows_with_gradient", slow_gap)
    monkeypatch.setattr(train_module, "update_policy", slow_update)
    run(tmp_path, train={"steps": 2, "lr": 1e-3, "warmup_steps": 0, "seed": 0}, data={"eval": None})
    for row in [r for r in metrics(tmp_path / "run", timing=True) if "reward_mean" in r]:
        phases = row["rollout_seconds"] + row["score_seconds"] + row["update_seconds"]
        assert row["update_seconds"] >= inside
        assert row["step_seconds"] - phases >= gap


def test_same_seed_same_metrics(tmp_path, tiny_model_path):
    run(tmp_path, "a")
    run(tmp_path, "b")
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")


def test_resume_continues_to_the_same_result(tmp_path, tiny_model_path):
    steps4 = {"train": {"steps": 4, "lr": 2e-3, "warmup_steps": 1, "seed": 0}}
    run(tmp_path, "straight", **steps4)
    run(tmp_path, "crashed", **steps4)
    crashed = tmp_path / "crashed"
    # as if the run died after its step-2 checkpoint
    for step in (3, 4):
        shutil.rmtree(crashed / "checkpoints" / f"step-{step}", ignore_errors=True)
    # a deterministic run keeps its CPU thread count (float sums depend on it), across the resume too
    state = json.loads((crashed / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["cpu_threads"] == torch.get_num_threads()
    summary = run(tmp_path, "crashed", resume=True, **steps4)
    assert summary.step == 4
    assert metrics(crashed) == metrics(tmp_path / "straight")
    a = load_file(str(crashed / "checkpoints/step-4/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "straight/checkpoints/step-4/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_can_extend_a_finished_run(tmp_path, tiny_model_path):
    run(tmp_path)
    summary = run(tmp_path, resume=True, train={"steps": 5, "lr": 2e-3, "warmup_steps": 1, "seed": 0})
    assert summary.step == 5
    assert [r["step"] for r in metrics(tmp_path / "run") if "reward_mean" in r] == [1, 2, 3, 4, 5]


def test_a_used_run_directory_is_refused_without_resume(tmp_path, tiny_model_path):
    run(tmp_path, train={"steps": 1, "lr": 2e-3, "warmup_steps": 0, "seed": 0})
    with pytest.raises(UserError, match="already holds a run. Pass --resume"):
        run(tmp_path)


def test_micro_batches_give_the_same_run(tmp_path, tiny_model_path, monkeypatch):
    from grpo_cli.run import train as train_module

    sizes = []  # per step, the rows of each micro-batch
    split = train_module.split

    def recorded(*args, **kwargs):
        batches = split(*args, **kwargs)
        sizes.append([len(b.rows) for b in batches])
        return batches

    monkeypatch.setattr(train_module, "split", recorded)
    run(tmp_path, "whole", grpo={"micro_batch_size": None})
    whole_sizes, sizes[:] = list(sizes), []
    run(tmp_path, "micro", grpo={"micro_batch_size": 2})
    # the step's 8 completions either way: split by length only, or also at most 2 a micro-batch
    assert len(whole_sizes) == len(sizes) == 3 and all(sum(s) == 8 for s in whole_sizes + sizes)
    assert all(len(s) >= 4 and max(s) <= 2 for s in sizes) and any(max(s) > 2 for s in whole_sizes)
    whole, micro = metrics(tmp_path / "whole"), metrics(tmp_path / "micro")
    assert [r["step"] for r in whole] == [r["step"] for r in micro]
    for a, b in zip(whole, micro):
        for key in a:
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def adapters_of(run_dir, step):
    return load_file(str(run_dir / f"checkpoints/step-{step}/adapter_model.safetensors"))


@pytest.mark.parametrize("loss", ["grpo", "dapo"])
def test_completions_without_gradient_are_skipped_and_the_run_is_the_same(tmp_path, tiny_model_path, monkeypatch,
                                                                           loss):
    """With kl_beta 0 a completion whose advantage is 0 adds nothing to the gradient: skipping it in the
    update changes no figure but the entropy's (over the completions that ran) and no weight."""
    from grpo_cli.run import train as train_module

    sections = {"grpo": {"kl_beta": 0.0, "group_size": 4, "prompts_per_step": 3, "loss": loss},
                "rewards": [{"rule": "correctness"}], "train": {"steps": 3, "lr": 5e-3, "warmup_steps": 0, "seed": 0}}
    chosen = []
    original = train_module.rows_with_gradient

    def recorded(*args):
        chosen.append(original(*args))
        return chosen[-1]

    monkeypatch.setattr(train_module, "rows_with_gradient", recorded)
    run(tmp_path, "skipping", **sections)
    assert len(chosen) == 3 and any(rows is not None and len(rows) < 12 for rows in chosen), chosen
    monkeypatch.setattr(train_module, "rows_with_gradient", lambda *args: None)
    run(tmp_path, "every", **sections)
    for a, b in zip(metrics(tmp_path / "skipping"), metrics(tmp_path / "every"), strict=True):
        for key in a:
            if isinstance(a[key], float) and key != "entropy":
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    # The sums run in another order without the skipped rows, so gradients differ in their last bits; AdamW
    # divides each element by its own running scale, so an element whose gradient is at that noise level
    # may move by a fraction of lr either way. The loss and the gradient norm above are compared at 1e-4.
    lr = sections["train"]["lr"]
    skipped, every = adapters_of(tmp_path / "skipping", 3), adapters_of(tmp_path / "every", 3)
    for name in every:
        torch.testing.assert_close(skipped[name], every[name], rtol=1e-4, atol=0.01 * lr)


def test_only_what_cannot_pull_on_a_flat_completion_skips_it():
    """Skipped only with a shipped loss, no KL, no entropy bonus, one process, and no pass already made over
    the whole batch; a loss registered elsewhere runs every completion."""
    from types import SimpleNamespace

    from grpo_cli.run.train import rows_with_gradient

    def rows(advantages=(0.0, 0.0, 1.0, -1.0), nothing_fixed=True, processes=1, **grpo):
        settings = SimpleNamespace(**{"kl_beta": 0.0, "entropy_bonus": 0.0, "loss": "grpo", **grpo})
        run = SimpleNamespace(recipe=SimpleNamespace(grpo=settings), world=SimpleNamespace(active=processes > 1))
        return rows_with_gradient(run, SimpleNamespace(advantages=torch.tensor(advantages)), nothing_fixed)

    assert rows() == [2, 3] and rows(loss="gspo") == [2, 3] and rows(advantages=(0.0, 0.0)) == []
    assert rows(advantages=(0.5, -0.5)) is None  # nothing to skip
    for other in ({"loss": "my_loss"}, {"kl_beta": 0.04}, {"entropy_bonus": 0.01}, {"processes": 2},
                  {"nothing_fixed": False}):
        assert rows(**other) is None, other


def test_a_step_where_every_advantage_is_0_still_steps_adamw_on_zero_gradients(tmp_path, tiny_model_path,
                                                                              monkeypatch):
    """No completion runs, yet the weights move as a zero gradient moves them (weight decay, momentum),
    not as a missing one would leave them."""
    from grpo_cli.run import train as train_module

    (tmp_path / "flat.py").write_text("def flat(completion, answer):\n    return 1.0\n")
    sections = {"grpo": {"kl_beta": 0.0}, "rewards": [{"rule": "python", "function": "flat:flat"}],
                "train": {"steps": 2, "lr": 5e-3, "warmup_steps": 0, "seed": 0, "weight_decay": 0.5}}

    def trained(name):
        recipe = recipe_module.validate(small_recipe(tmp_path / name, **sections))
        train(recipe, recipe_dir=tmp_path, console=TrainConsole(quiet=True))
        return adapters_of(tmp_path / name, 2)

    chosen = []
    original = train_module.rows_with_gradient
    monkeypatch.setattr(train_module, "rows_with_gradient", lambda *args: chosen.append(original(*args)) or chosen[-1])
    skipped = trained("skipping")
    assert chosen == [[], []]  # nothing ran in either step
    monkeypatch.setattr(train_module, "rows_with_gradient", lambda *args: None)
    every = trained("every")
    for name in every:
        torch.testing.assert_close(skipped[name], every[name], rtol=1e-5, atol=1e-7)


def test_full_fine_tune_with_several_updates_per_rollout(tmp_path, tiny_model_path, monkeypatch):
    sections = {"model": {"name": "builtin:tiny-math", "dtype": "float32", "lora": None},
                "grpo": {"updates_per_rollout": 2, "micro_batch_size": 4},
                "train": {"steps": 2, "lr": 1e-3, "warmup_steps": 0, "seed": 0}}
    from grpo_cli.run import train as train_module

    applied = []  # optimizer steps taken, per training step
    update_policy = train_module.update_policy

    def recorded(*args):
        stats = update_policy(*args)
        applied.append(stats.applied)
        return stats

    monkeypatch.setattr(train_module, "update_policy", recorded)
    run(tmp_path, **sections)
    assert applied == [2, 2]
    ckpt = tmp_path / "run" / "checkpoints" / "step-2"
    assert (ckpt / "model.safetensors").exists() and (ckpt / "config.json").exists()
    rows = [r for r in metrics(tmp_path / "run") if "reward_mean" in r]
    assert all(0 <= r["clip_frac"] <= 1 for r in rows)
    # within step 1 the second update sees a moved policy: some ratios leave 1, and the KL to the
    # reference (the policy as loaded) is positive; with one update per rollout it would be 0
    assert rows[0]["kl"] > 1e-6, rows[0]["kl"]
    summary = run(tmp_path, resume=True, **{**sections, "train": {**sections["train"], "steps": 3}})
    assert summary.step == 3 and applied == [2, 2, 2]


def count_reference_passes(monkeypatch) -> list[bool]:
    """Record, for every log-prob pass the trainer runs through `Parallel.logprobs`, whether it was
    the reference's."""
    from grpo_cli.distributed.parallel import Parallel

    passes = []
    logprobs = Parallel.logprobs

    def counted(self, rollout, batches, temperature, shared_prompts, reference):
        passes.append(reference)
        return logprobs(self, rollout, batches, temperature, shared_prompts, reference)

    monkeypatch.setattr(Parallel, "logprobs", counted)
    return passes


def test_no_reference_pass_without_kl(tmp_path, tiny_model_path, monkeypatch):
    steps = {"train": {"steps": 2, "lr": 2e-3, "warmup_steps": 0, "seed": 0}, "data": {"eval": None}}
    passes = count_reference_passes(monkeypatch)
    run(tmp_path, "without", grpo={"kl_beta": 0.0}, **steps)
    assert passes.count(True) == 0
    assert all(r["kl"] is None for r in metrics(tmp_path / "without") if "reward_mean" in r)
    passes.clear()
    run(tmp_path, "with", grpo={"kl_beta": 0.04}, **steps)
    assert passes.count(True) == 2  # one reference pass a step, over all its micro-batches


def test_4bit_base(tmp_path, tiny_model_path, monkeypatch):
    """QLoRA: the base's linear layers are bitsandbytes NF4 (on the CPU too) and never change; only
    the adapters train, and a checkpoint holds only them."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    from grpo_cli.run import setup as setup_module
    from grpo_cli.model.loading import lora_layers

    def base_weights(model):
        """Every weight outside the adapters, 4-bit ones both as stored and dequantized."""
        out = {}
        for name, param in model.named_parameters():
            if "lora_" not in name:
                out[name] = param.detach().clone()
                if isinstance(param, bnb.nn.Params4bit):
                    out[name + " dequantized"] = dequantize_4bit(param.data, param.quant_state).clone()
        return out

    loaded = {}
    load_policy = setup_module.load_policy

    def load_and_keep(*args, **kwargs):
        policy = load_policy(*args, **kwargs)
        loaded.update(policy=policy, base=base_weights(policy.model))
        return policy

    monkeypatch.setattr(setup_module, "load_policy", load_and_keep)
    summary = run(tmp_path, model={"name": "builtin:tiny-math", "dtype": "float32", "load_in_4bit": True,
                                   "lora": {"r": 8, "alpha": 16}},
                  train={"steps": 2, "lr": 2e-3, "warmup_steps": 0, "seed": 0},
                  data={"eval": None}, output={"save_every": 1})
    assert summary.step == 2
    model = loaded["policy"].model
    # every adapted projection runs over an NF4 base layer, as load_base asks bitsandbytes for
    layers = lora_layers(model)
    assert len(layers) == 28  # 7 projections x 4 layers
    for layer in layers:
        base = layer.get_base_layer()
        assert isinstance(base, bnb.nn.Linear4bit) and base.weight.quant_type == "nf4", type(base)
    plain = [m for m in model.modules() if type(m) is torch.nn.Linear and m not in
             {a for layer in layers for a in (*layer.lora_A.values(), *layer.lora_B.values())}]
    assert plain == [model.get_output_embeddings()]  # bitsandbytes keeps the head in full precision
    # only the adapters train, and the base is bit for bit as loaded after two steps
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if "lora_" in n}
    after = base_weights(model)
    assert after.keys() == loaded["base"].keys()
    assert all(torch.equal(after[k], loaded["base"][k]) for k in after), \
        [k for k in after if not torch.equal(after[k], loaded["base"][k])]
    # a checkpoint holds the adapters alone, and they moved from one step to the next
    ckpts = [tmp_path / "run" / "checkpoints" / f"step-{n}" for n in (1, 2)]
    for ckpt in ckpts:
        assert {f.name for f in ckpt.glob("*.safetensors")} == {"adapter_model.safetensors"}
    first, second = (load_file(str(c / "adapter_model.safetensors")) for c in ckpts)
    assert first.keys() == second.keys() and len(first) == 2 * len(layers)
    assert all(".lora_A." in k or ".lora_B." in k for k in first)
    moved = [k for k in first if not torch.equal(first[k], second[k])]
    assert any(".lora_A." in k for k in moved) and any(".lora_B." in k for k in moved), moved


def test_training_data_without_the_named_field(tmp_path, tiny_model_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"problem": "1+1", "solution": "2"}\n')
    with pytest.raises(UserError, match="has no field"):
        run(tmp_path, data={"train": str(data), "eval": None})


def test_fast_engine_learns_as_the_plain_path(tmp_path, tiny_model_path):
    # Same seed: shared-prompt rollout and update, length-grouped micro-batches vs transformers'
    # generate and one padded batch. Only float rounding differs.
    steps = {"train": {"steps": 4, "lr": 2e-3, "warmup_steps": 1, "seed": 0}}
    run(tmp_path, "fast", grpo={"engine": "fast", "group_size": 8, "prompts_per_step": 3}, **steps)
    run(tmp_path, "plain", grpo={"engine": "plain", "group_size": 8, "prompts_per_step": 3}, **steps)
    fast, plain = metrics(tmp_path / "fast"), metrics(tmp_path / "plain")
    assert [r["step"] for r in fast] == [r["step"] for r in plain]
    for a, b in zip(fast, plain):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-5), (a["step"], key)
            else:
                assert a[key] == b[key], (a["step"], key)


def test_dynamic_sampling_trains_only_on_informative_groups(tmp_path, tiny_model_path):
    run(tmp_path, grpo={"dynamic_sampling": True, "max_sampling_rounds": 4, "group_size": 4, "prompts_per_step": 4},
        train={"steps": 3, "lr": 2e-3, "warmup_steps": 0, "seed": 0})
    rows = [r for r in metrics(tmp_path / "run") if "reward_mean" in r]
    for row in rows:
        assert {"dropped_groups", "sampling_rounds", "sampled_accuracy"} <= set(row)
        assert 1 <= row["sampling_rounds"] <= 4
        if row["sampling_rounds"] < 4:  # the quota was met: every trained group carries signal
            assert row["frac_zero_std"] == 0.0
    assert sum(r["dropped_groups"] for r in rows) > 0  # the warm-started model agrees with itself often


def test_overlong_shaping_masking_entropy_and_a_custom_rule(tmp_path, tiny_model_path):
    (tmp_path / "my_rules.py").write_text("def short(completion, answer, prompt, **fields):\n"
                                          "    return None if fields['kind'] == 'quadratic' else -len(completion) / 40\n")
    recipe = recipe_module.validate(small_recipe(
        tmp_path / "run",
        grpo={"max_new_tokens": 24, "overlong_buffer": 8, "overlong_penalty": 0.5, "mask_truncated": True,
              "entropy_bonus": 0.01, "loss": "dapo", "clip_eps_high": 0.28},
        rewards=[{"rule": "correctness"}, {"rule": "python", "function": "my_rules:short", "weight": 0.1}],
        train={"steps": 2, "lr": 2e-3, "warmup_steps": 0, "seed": 0},
    ))
    train(recipe, recipe_dir=tmp_path, console=TrainConsole(quiet=True))
    rows = [r for r in metrics(tmp_path / "run") if "reward_mean" in r]
    for row in rows:
        assert -0.5 <= row["reward/overlong"] <= 0
        assert row["entropy"] > 0 and row["reward/short"] <= 0 and row["score_errors"] == 0
    assert any(r["reward/overlong"] < 0 for r in rows) and any(r["truncated_frac"] > 0 for r in rows)
    samples = read_jsonl(tmp_path / "run" / "samples.jsonl")
    assert {"correctness", "short"} == set(samples[0]["rewards"])


def test_same_seed_same_run_bit_for_bit(tmp_path, tiny_model_path):
    # Separate processes at the quickstart's sizes: with two CPU threads and no deterministic
    # kernels, such runs drifted apart in the last float bit by step 4.
    runs = []
    for name in ("a", "b"):
        proc = subprocess.run(
            [sys.executable, "-m", "grpo_cli", "train", str(ROOT / "recipes" / "quickstart.yaml"), "--quiet",
             "--set", f"output.dir={tmp_path / name}", "--set", "train.steps=6", "--set", "output.eval_every=100",
             "--set", "output.save_every=6"],
            cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "deterministic" not in proc.stderr  # no op fell back with a warning
        runs.append(tmp_path / name)
    assert metrics(runs[0]) == metrics(runs[1])
    weights = [load_file(r / "checkpoints" / "step-6" / "adapter_model.safetensors") for r in runs]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def console_of_a_run(tmp_path, name, max_new_tokens, **grpo):
    """What a two-step run on the builtin model printed (as without a terminal), and its metrics."""
    import io

    from rich.console import Console

    console = Console(record=True, file=io.StringIO(), width=400)
    recipe = recipe_module.validate(small_recipe(
        tmp_path / name, data={"eval": None}, grpo={"max_new_tokens": max_new_tokens, **grpo},
        train={"steps": 2, "lr": 2e-3, "warmup_steps": 0, "seed": 0}, output={"save_every": 10}))
    train(recipe, console=TrainConsole(quiet=False, console=console))
    return console.export_text(), [r for r in metrics(tmp_path / name) if "reward_mean" in r]


def test_a_cap_that_cuts_off_completions_is_warned_about_and_an_ample_one_is_not(tmp_path, tiny_model_path):
    printed, rows = console_of_a_run(tmp_path, "short", max_new_tokens=4)
    assert all(r["truncated_frac"] > 0.5 for r in rows)
    warnings = [line for line in printed.splitlines() if "hit grpo.max_new_tokens" in line]
    # the first step it happens, then not again within TRUNCATION_WARN_EVERY steps
    assert len(warnings) == 1 and warnings[0].startswith("warning: step 1: ")
    assert "(4)" in warnings[0] and "Raise grpo.max_new_tokens" in warnings[0] and "of 8 completions" in warnings[0]
    printed, rows = console_of_a_run(tmp_path, "ample", max_new_tokens=40)
    assert all(r["truncated_frac"] <= 0.1 for r in rows) and "step 1/2" in printed
    assert "max_new_tokens" not in printed


def test_a_sampler_far_from_the_trainer_is_warned_about_and_shown_and_an_agreeing_one_is_not(tmp_path,
                                                                                           tiny_model_path):
    """top_p 0.3 samples from a nucleus of 30% of the policy's mass or more: a token's ratio pi_train / pi_sampler
    is that mass, often under 1/2. A real gap, not a made-up one; float32 without top-p agrees to rounding."""
    printed, rows = console_of_a_run(tmp_path, "nucleus", max_new_tokens=40, top_p=0.3)
    assert all(r["sampler_ratio_outside"] > 0.01 and r["sampler_ratio_max"] <= 1 + 1e-4 for r in rows)
    warnings = [line for line in printed.splitlines() if "the sampler and the trainer disagree" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: step 1: ")
    assert "sampler_correction: tis" in warnings[0] and "float32" in warnings[0]
    assert "ratio outside [1/2, 2]" in printed  # the dashboard shows it on these steps
    printed, rows = console_of_a_run(tmp_path, "corrected", max_new_tokens=40, top_p=0.3, sampler_correction="mask")
    assert all(r["sampler_corrected_frac"] > 0.05 for r in rows)
    assert "sampler_correction mask changed the weight of" in printed  # dropping that much is worth a word
    printed, rows = console_of_a_run(tmp_path, "agreeing", max_new_tokens=40)
    assert all(r["sampler_kl"] < 1e-9 and r["sampler_ratio_outside"] == 0 for r in rows)
    assert "sampler" not in printed and "ratio outside" not in printed


def test_the_mismatch_warning_is_throttled_and_each_threshold_counts():
    from grpo_cli.run.mismatch_watch import SAMPLER_KL_WARN, SAMPLER_OUTSIDE_WARN, SAMPLER_WARN_EVERY, MismatchWatch

    def row(kl=1e-12, outside=0.0, corrected=None):
        values = {"sampler_kl": kl, "sampler_ratio_outside": outside, "sampler_ratio_min": 0.9,
                  "sampler_ratio_max": 1.1}
        return values if corrected is None else {**values, "sampler_corrected_frac": corrected}

    watch = MismatchWatch()
    warned = [step for step in range(1, 25) if watch.check(step, row(kl=2 * SAMPLER_KL_WARN), "none")]
    assert warned == [1, 1 + SAMPLER_WARN_EVERY, 1 + 2 * SAMPLER_WARN_EVERY]
    assert MismatchWatch().check(1, row(kl=SAMPLER_KL_WARN), "none") is None  # at the threshold is not over it
    assert MismatchWatch().check(1, row(outside=2 * SAMPLER_OUTSIDE_WARN), "none") is not None
    assert MismatchWatch().check(1, {"sampler_kl": None}, "none") is None  # a step that measured nothing
    # with a correction on, the gap is being handled: only a correction that changes many tokens is worth a word
    assert MismatchWatch().check(1, row(kl=1.0, corrected=0.01), "tis") is None
    assert "tis changed the weight of 40.0%" in MismatchWatch().check(1, row(kl=1.0, corrected=0.4), "tis")


def test_the_truncation_warning_comes_at_first_then_every_ten_steps_with_the_count():
    from grpo_cli.run.truncation import TRUNCATION_WARN_EVERY, TruncationWatch

    watch, cut, fine = TruncationWatch(), torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.zeros(4)
    warned = {step: watch.check(step, cut if step not in (5, 6, 30) else fine, 16) for step in range(1, 33)}
    assert [s for s, w in warned.items() if w] == [1, 1 + TRUNCATION_WARN_EVERY, 1 + 2 * TRUNCATION_WARN_EVERY, 31]
    assert "2 of 4 completions (50%) hit grpo.max_new_tokens (16)" in warned[1]
    assert "(8 of the 10 steps since step 1 did)" in warned[11]  # steps 5 and 6 were under the threshold
    assert "(9 of the 10 steps since step 21 did)" in warned[31]
    # exactly at the threshold is not over it
    assert TruncationWatch().check(1, torch.tensor([1.0] + [0.0] * 9), 16) is None
    assert TruncationWatch().check(1, torch.tensor([1.0, 1.0] + [0.0] * 8), 16) is not None


def test_auto_max_new_tokens_is_the_context_left_after_the_longest_prompt_capped():
    from grpo_cli.config.recipe import AUTO_MAX_NEW_TOKENS_CAP, MIN_AUTO_MAX_NEW_TOKENS
    from grpo_cli.data.prompt_room import auto_max_new_tokens

    assert auto_max_new_tokens([25, 12], 256) == 231  # the builtin model: its whole context is 256 tokens
    assert auto_max_new_tokens([300], 32768) == AUTO_MAX_NEW_TOKENS_CAP == 1024  # a Qwen-class model
    assert auto_max_new_tokens([300], None) == AUTO_MAX_NEW_TOKENS_CAP
    # A prompt that leaves less than 32 tokens is skipped, not made every completion's limit (it was 6 here, and
    # training was cut off at 6 tokens every time).
    assert MIN_AUTO_MAX_NEW_TOKENS == 32
    assert auto_max_new_tokens([25, 250], 256) == 231 and auto_max_new_tokens([25, 224], 256) == 32
    with pytest.raises(UserError, match="auto, which leaves a completion at least 32 tokens of the model's 256-token "
                                        "context, but no training prompt leaves that: the shortest is 240 tokens. "
                                        "Set grpo.max_new_tokens to a number, at most 16"):
        auto_max_new_tokens([250, 240], 256)
    with pytest.raises(UserError, match="the shortest is 256 tokens. Shorten the prompts"):
        auto_max_new_tokens([256], 256)


def test_auto_max_new_tokens_is_resolved_recorded_and_kept_on_resume(tmp_path, tiny_model_path):
    # Prompts of 216 characters (the builtin tokenizer's tokens) leave 40 of its 256-token context.
    question = "What is 2 + 3?" + " " * 202
    (tmp_path / "d.jsonl").write_text(json.dumps({"question": question, "answer": "5"}) + "\n")
    sections = dict(data={"train": str(tmp_path / "d.jsonl"), "eval": None}, grpo={"max_new_tokens": "auto"},
                    output={"save_every": 1})
    messages = []
    console = TrainConsole(quiet=True)
    console.message = messages.append
    recipe = recipe_module.validate(small_recipe(tmp_path / "run", train={"steps": 1, "lr": 1e-3, "seed": 0,
                                                                          "warmup_steps": 0}, **sections))
    train(recipe, console=console)
    assert any(m.startswith("grpo.max_new_tokens: auto -> 40 (the model's 256-token context") for m in messages)
    assert recipe_module.load(tmp_path / "run" / "recipe.yaml").grpo.max_new_tokens == 40
    assert max(s["completion"].count("") - 1 for s in read_jsonl(tmp_path / "run" / "samples.jsonl")) <= 40
    # A longer prompt now would leave 30; the resumed run keeps the 40 it started with (and skips that prompt).
    rows = [{"question": question, "answer": "5"}, {"question": question + " " * 10, "answer": "5"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    messages.clear()
    recipe = recipe_module.validate(small_recipe(tmp_path / "run", train={"steps": 2, "lr": 1e-3, "seed": 0,
                                                                          "warmup_steps": 0}, **sections))
    train(recipe, resume=True, console=console)
    assert "grpo.max_new_tokens: auto, 40 as when the run started" in messages
    assert any("1 prompts too long for the context skipped" in m for m in messages)
    changed = [m for m in messages if m.startswith("resuming with changed settings")]
    assert changed == ["resuming with changed settings: train.steps: 1 -> 2"]  # auto is no change
    saved = tmp_path / "run" / "checkpoints" / "step-2" / "recipe.yaml"
    assert recipe_module.load(saved).grpo.max_new_tokens == 40


def test_a_run_with_the_tool_trains_on_the_model_tokens_only_and_logs_the_calls(tmp_path, monkeypatch,
                                                                                 tools_model_path):
    """Tool output is context: every loss mask the update uses is the rollout's action mask, which leaves the
    output blocks out; the token count that normalizes the loss counts actions only."""
    import contextlib

    from grpo_cli.run import train as train_module
    from grpo_cli.update.loss import LOSSES
    from tool_fakes import InProcessTools

    monkeypatch.setattr(train_module, "open_session", lambda *args: contextlib.nullcontext(InProcessTools(2)))
    masks, batches = [], []
    grpo_loss = LOSSES["grpo"]

    def recording_loss(logp, old, advantages, mask, settings, *rest):
        masks.append((mask.clone(), settings.step_tokens))
        return grpo_loss(logp, old, advantages, mask, settings, *rest)

    original_update = train_module.update_policy

    def capturing(parallel, optimizer, scheduler, recipe, batch, stats):
        batches.append(batch)
        return original_update(parallel, optimizer, scheduler, recipe, batch, stats)

    monkeypatch.setitem(LOSSES, "grpo", recording_loss)
    monkeypatch.setattr(train_module, "update_policy", capturing)
    run(tmp_path, model={"name": "builtin:tiny-math-tools"}, train={"steps": 3, "seed": 1},
        grpo={"group_size": 8, "prompts_per_step": 2, "max_new_tokens": 96, "tools": ["python"], "max_tool_calls": 2})
    used = 0
    for batch in batches:
        rollout = batch.rollout
        assert rollout.tool_mask is not None
        used += int(rollout.tool_use.calls.sum())
        for micro, (mask, step_tokens) in zip(batch.micro_batches, masks[: len(batch.micro_batches)]):
            c = micro.completion_ids.shape[1]
            assert torch.equal(mask, rollout.action_mask[micro.rows, :c])
            assert not mask[rollout.tool_mask[micro.rows, :c]].any()
            assert step_tokens == int(rollout.action_mask.sum())
        del masks[: len(batch.micro_batches)]
    assert used > 0, "the warm-started model calls the tool in some of 48 completions"
    rows = metrics(tmp_path / "run", timing=True)
    steps = [r for r in rows if "reward_mean" in r]
    assert all(r["tool_calls"] >= 0 and 0 <= r["tool_use_frac"] <= 1 for r in steps)
    assert sum(r["tool_calls"] for r in steps) > 0 and any(r["tool_tokens"] > 0 for r in steps)
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert any("```output" in s["completion"] for s in samples)
