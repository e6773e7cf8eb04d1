"""grpo export on the builtin model: LoRA, full fine-tune and 4-bit runs, verified merges."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import small_recipe
from grpo_cli import recipe as recipe_module
from grpo_cli.benchmark import EvalOptions, run as run_eval
from grpo_cli.console import TrainConsole
from grpo_cli.errors import UserError
from grpo_cli.export import export
from grpo_cli.train import train

FOUR_STEPS = {"train": {"steps": 4, "lr": 5e-3, "warmup_steps": 0, "seed": 0}}


def trained(tmp_path_factory, name, **sections):
    run_dir = tmp_path_factory.mktemp(name) / "run"
    train(recipe_module.validate(small_recipe(run_dir, **{**FOUR_STEPS, **sections})), console=TrainConsole(quiet=True))
    return run_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_path):
    return trained(tmp_path_factory, "lora")


@pytest.fixture(scope="module")
def lora_export(lora_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "merged"
    return export(str(lora_run), out)


def test_merged_export_layout_and_check(lora_export):
    out = lora_export.out
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", "README.md"):
        assert (out / name).exists(), name
    assert not (out / "adapter_config.json").exists()
    weights = load_file(str(out / "model.safetensors"))
    assert not any("lora" in name for name in weights)
    assert lora_export.step == 4 and lora_export.dtype == "float32"
    assert lora_export.check.vs_adapter <= lora_export.check.tolerance < lora_export.check.vs_base


def test_plain_transformers_loads_it_without_peft_or_grpo(lora_export, lora_run):
    code = f"""
import sys
sys.modules["peft"] = None      # importing either now fails
sys.modules["grpo_cli"] = None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(lora_export.out)!r})
tok = AutoTokenizer.from_pretrained({str(lora_export.out)!r})
ids = tok("What is 12 + 30?", return_tensors="pt")["input_ids"]
torch.save(model(input_ids=ids).logits, {str(lora_export.out.parent / 'logits.pt')!r})
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    exported = torch.load(lora_export.out.parent / "logits.pt")
    from grpo_cli.modeling import load_for_inference

    trained_model = load_for_inference(str(lora_run))
    ids = trained_model.tokenizer("What is 12 + 30?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = trained_model.model(input_ids=ids).logits
    assert torch.allclose(exported, expected, atol=1e-4)


def test_export_scores_as_the_checkpoint_does(lora_export, lora_run):
    on_checkpoint = run_eval(EvalOptions(model=str(lora_run), limit=40))
    on_export = run_eval(EvalOptions(model=str(lora_export.out), data="builtin:arithmetic-test", limit=40,
                                     max_new_tokens=40))
    assert on_export.report.accuracy == on_checkpoint.report.accuracy
    assert [i.completions for i in on_export.report.items] == [i.completions for i in on_checkpoint.report.items]


def test_model_card_says_what_was_done(lora_export):
    card = (lora_export.out / "README.md").read_text()
    assert "step 4 of" in card and "builtin:tiny-math" in card and "merged in float32" in card
    assert "| 4 |" in card  # the run's last evaluation
    assert "grpo_cli" not in card.split("## Use")[1].split("## Recipe")[0]


def test_bfloat16_export(lora_run, tmp_path):
    exported = export(str(lora_run), tmp_path / "bf16", dtype="bfloat16")
    config = json.loads((exported.out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(exported.out / "model.safetensors")).values())


def test_adapter_only(lora_run, tmp_path):
    exported = export(str(lora_run), tmp_path / "adapter", adapter_only=True)
    assert (exported.out / "adapter_model.safetensors").exists()
    config = json.loads((exported.out / "adapter_config.json").read_text())
    assert os.path.isdir(config["base_model_name_or_path"])
    assert not (exported.out / "model.safetensors").exists()
    # grpo eval loads a PEFT adapter directory through its base
    assert run_eval(EvalOptions(model=str(exported.out), data="builtin:arithmetic-test", limit=4,
                                max_new_tokens=40)).report.items


def test_full_fine_tune_run(tmp_path_factory, tmp_path, tiny_model_path):
    run_dir = trained(tmp_path_factory, "full", model={"name": "builtin:tiny-math", "dtype": "float32", "lora": None})
    exported = export(str(run_dir / "checkpoints" / "step-4"), tmp_path / "full")
    assert exported.check.vs_adapter <= exported.check.tolerance < exported.check.vs_base
    with pytest.raises(UserError, match="needs a LoRA run"):
        export(str(run_dir), tmp_path / "x", adapter_only=True)


def test_4bit_run_merges_into_full_precision_weights(tmp_path_factory, tmp_path, tiny_model_path):
    run_dir = trained(tmp_path_factory, "qlora", model={"name": "builtin:tiny-math", "dtype": "float32",
                                                        "load_in_4bit": True, "lora": {"r": 8, "alpha": 16}})
    exported = export(str(run_dir), tmp_path / "from4bit")
    config = json.loads((exported.out / "config.json").read_text())
    assert "quantization_config" not in config
    assert all(t.dtype == torch.float32 for t in load_file(str(exported.out / "model.safetensors")).values())
    assert exported.check.vs_adapter <= exported.check.tolerance < exported.check.vs_base
    assert "trained in 4-bit" in (exported.out / "README.md").read_text()


def test_a_merge_that_loses_the_adapter_is_an_error(lora_run, tmp_path, monkeypatch):
    from peft import LoraModel

    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, **kw: self.unload())  # drops the delta
    with pytest.raises(UserError, match="does not reproduce the trained model"):
        export(str(lora_run), tmp_path / "broken")
    assert not (tmp_path / "broken").exists()
    assert not list(tmp_path.glob(".*partial"))


def test_refusals(lora_run, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        export(str(lora_run), tmp_path / "full")
    assert export(str(lora_run), tmp_path / "full", force=True).out.joinpath("model.safetensors").exists()
    assert not (tmp_path / "full" / "something").exists()
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="without a complete checkpoint"):
        export(str(tmp_path / "empty_run"), tmp_path / "o1")
    with pytest.raises(UserError, match="not a grpo run directory or checkpoint"):
        export(str(tmp_path), tmp_path / "o2")
    with pytest.raises(UserError, match="--dtype"):
        export(str(lora_run), tmp_path / "o3", dtype="int8")


def test_missing_base_model_is_explained(lora_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(lora_run, copy)
    for path in [copy / "recipe.yaml", *copy.glob("checkpoints/*/recipe.yaml")]:
        path.write_text(path.read_text().replace("builtin:tiny-math", "./gone/base-model"))
    with pytest.raises(UserError, match="model directory ./gone/base-model not found"):
        export(str(copy), tmp_path / "o")
