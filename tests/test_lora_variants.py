"""model.lora.use_rslora and use_dora: PEFT's variants, trained, decoded and exported as PEFT computes them."""

import json

import pytest
import torch
from conftest import small_recipe, trained_lora_policy
from peft import get_peft_model_state_dict
from safetensors.torch import load_file
from test_decoder import check_against_forward

from grpo_cli.model import lora_linear
from grpo_cli.config import recipe as recipe_module
from grpo_cli.run.console import TrainConsole
from grpo_cli.export.build import export
from grpo_cli.model.logprobs import completion_logprobs
from grpo_cli.model.loading import load_policy, lora_layers
from grpo_cli.config.recipe import ModelSpec
from grpo_cli.rollout.sampling import foldable_lora_layers, folded_lora
from grpo_cli.run.log import read_jsonl
from grpo_cli.run.train import train

MAGNITUDE = "lora_magnitude_vector"


def dora_policy():
    """DoRA adapters as after some training: B not zero, magnitudes moved off the weight norms they start at."""
    policy = trained_lora_policy(lora={"r": 8, "alpha": 16, "use_dora": True})
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if MAGNITUDE in name:
                param.mul_(1 + 0.2 * torch.rand_like(param))
    return policy


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_rslora_scales_by_alpha_over_sqrt_r_in_peft_the_fold_and_lora_linear():
    policy = trained_lora_policy(lora={"r": 4, "alpha": 8, "use_rslora": True})
    model, layers = policy.model, lora_layers(policy.model)
    assert layers and all(layer.scaling["default"] == 4.0 for layer in layers)  # 8 / sqrt(4), not 8 / 4
    ids = policy.tokenizer(["What is 2 + 3?"], return_tensors="pt")["input_ids"]
    peft = logits(model, ids)
    assert foldable_lora_layers(model) == layers
    with folded_lora(model):  # the fast engine's sampling: W + s*B@A with PEFT's s
        torch.testing.assert_close(logits(model, ids), peft, rtol=1e-5, atol=1e-5)
    assert lora_linear.install(model) == len(layers)  # the fast engine's training forward, with PEFT's s
    torch.testing.assert_close(logits(model, ids), peft, rtol=1e-5, atol=1e-5)


def test_dora_is_never_computed_as_plain_lora_by_the_fast_engine(monkeypatch):
    policy = dora_policy()
    model = policy.model
    assert foldable_lora_layers(model) == [] and lora_linear.install(model) == 0
    check_against_forward(model, foldable=foldable_lora_layers(model))  # the lean decoder runs PEFT's modules

    ids = policy.tokenizer(["What is 2 + 3? Answer: 5"], return_tensors="pt")["input_ids"]
    mask = torch.ones_like(ids)
    fast = completion_logprobs(model, ids, mask, prompt_len=4).detach()  # [1, C]: the update's, autograd on
    with torch.no_grad():
        expected = torch.log_softmax(model(input_ids=ids).logits[:, 3:-1].float(), -1)
        expected = expected.gather(-1, ids[:, 4:, None])[..., 0]  # PEFT's forward, DoRA included
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5)
    # The check can fail: trained through lora_linear's plain-LoRA function, DoRA layers give other log-probs.
    monkeypatch.setattr(lora_linear, "eligible", lambda layer: True)
    assert lora_linear.install(model) > 0
    plain = completion_logprobs(model, ids, mask, prompt_len=4).detach()
    assert not torch.allclose(plain, expected, atol=1e-3)


def test_validate_counts_dora_s_magnitudes(tmp_path):
    from grpo_cli.commands.estimate import count_parameters, model_config

    recipe = recipe_module.validate(small_recipe(tmp_path, model={"lora": {"r": 8, "alpha": 16, "use_dora": True}}))
    plain = recipe_module.validate(small_recipe(tmp_path))
    _, dora_trainable = count_parameters(recipe, model_config(recipe))
    _, plain_trainable = count_parameters(plain, model_config(plain))
    loaded = load_policy(ModelSpec(name="builtin:tiny-math", dtype="float32", lora={"r": 8, "use_dora": True}), 0.0)
    magnitudes = sum(p.numel() for n, p in loaded.model.named_parameters() if MAGNITUDE in n)
    assert magnitudes > 0 and dora_trainable == plain_trainable + magnitudes
    assert dora_trainable == sum(p.numel() for p in loaded.trainable_parameters())


@pytest.fixture(scope="module")
def variant_run(tmp_path_factory, tiny_model_path):
    run_dir = tmp_path_factory.mktemp("variants") / "run"
    lora = {"r": 8, "alpha": 16, "use_dora": True, "use_rslora": True}
    recipe = recipe_module.validate(small_recipe(
        run_dir, model={"lora": lora}, data={"eval": None},
        train={"steps": 2, "lr": 5e-3, "warmup_steps": 0, "seed": 0}, output={"dir": str(run_dir), "save_every": 2}))
    train(recipe, console=TrainConsole(quiet=True))
    return run_dir


def test_dora_with_rslora_trains_its_adapters_and_magnitudes(variant_run):
    rows = [r for r in read_jsonl(variant_run / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    trained = load_file(str(variant_run / "checkpoints" / "step-2" / "adapter_model.safetensors"))
    start = load_policy(ModelSpec(name="builtin:tiny-math", dtype="float32",
                                  lora={"r": 8, "alpha": 16, "use_dora": True, "use_rslora": True}), 0.0)
    initial = get_peft_model_state_dict(start.model)  # under the names the checkpoint saves
    magnitudes = [n for n in trained if MAGNITUDE in n]
    assert magnitudes and all(n in initial for n in trained)
    moved = {n for n in trained if not torch.equal(trained[n], initial[n])}
    assert set(magnitudes) <= moved  # DoRA's magnitude vectors trained
    assert any("lora_B" in n for n in moved)


def test_a_dora_rslora_run_exports_merged_and_as_an_adapter(variant_run, tmp_path):
    merged = export(str(variant_run), tmp_path / "merged")  # raises unless the reloaded export matches the adapter
    assert merged.check.vs_base > merged.check.tolerance
    export(str(variant_run), tmp_path / "adapter", format="adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["use_rslora"] is True
