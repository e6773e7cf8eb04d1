"""Adapters made elsewhere: a Hugging Face Trainer's (TRL's) checkpoint and a plain PEFT directory are read as the
adapters they hold by grpo eval and grpo export, not taken for broken grpo checkpoints."""

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from grpo_cli import adapters, checkpoint
from grpo_cli.cli import app
from grpo_cli.errors import UserError
from grpo_cli.export import export
from grpo_cli.modeling import load_for_inference, resolve

runner = CliRunner()
PROMPT = "What is 47 + 85?"


def make_adapter(directory, seed: int = 0):
    """A PEFT LoRA adapter on the builtin model, its weights random (not zero: it changes the model), with the
    tokenizer, as `save_pretrained` writes them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_path = resolve("builtin:tiny-math")
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(directory)
    return directory


def make_trainer_checkpoint(directory):
    """What TRL 1.16's SFTTrainer writes into output_dir/checkpoint-40 for a LoRA run."""
    make_adapter(directory)
    state = {"best_metric": None, "best_model_checkpoint": None, "epoch": 0.5, "eval_steps": 500,
             "global_step": 40, "is_hyper_param_search": False, "is_local_process_zero": True,
             "is_world_process_zero": True, "log_history": [{"epoch": 0.25, "grad_norm": 1.3, "learning_rate": 2e-4,
                                                             "loss": 1.82, "step": 20}],
             "logging_steps": 20, "max_steps": 80, "num_train_epochs": 1, "save_steps": 40,
             "stateful_callbacks": {"TrainerControl": {"args": {"should_save": True}, "attributes": {}}},
             "total_flos": 1234.0, "train_batch_size": 8, "trial_name": None, "trial_params": None}
    (directory / "trainer_state.json").write_text(json.dumps(state, indent=2))
    torch.save({"output_dir": "out", "learning_rate": 2e-4, "per_device_train_batch_size": 8},
               directory / "training_args.bin")
    torch.save({"state": {}, "param_groups": [{"lr": 2e-4, "params": []}]}, directory / "optimizer.pt")
    torch.save({"last_epoch": 40, "_step_count": 41}, directory / "scheduler.pt")
    torch.save({"python": random.getstate(), "cpu": torch.get_rng_state()}, directory / "rng_state.pth")
    (directory / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    (directory / "README.md").write_text("---\nlibrary_name: peft\ntags: [trl, sft]\n---\n# out\n")
    return directory


@pytest.fixture(scope="module")
def trainer_checkpoint(tmp_path_factory, tiny_model_path):
    return make_trainer_checkpoint(tmp_path_factory.mktemp("trl") / "out" / "checkpoint-40")


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory, tiny_model_path):
    return make_adapter(tmp_path_factory.mktemp("peft") / "adapter")


def adapter_logits(directory) -> torch.Tensor:
    """The next-token logits of base + adapter loaded by peft itself: what every reading must reproduce."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(resolve("builtin:tiny-math"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(directory)).eval()
    ids = AutoTokenizer.from_pretrained(directory)(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


def logits_of(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


def test_a_trainer_checkpoint_is_not_taken_for_a_grpo_checkpoint(trainer_checkpoint, tmp_path):
    assert not checkpoint.is_grpo_checkpoint(trainer_checkpoint)
    assert checkpoint.locate(trainer_checkpoint) is None  # it used to say "incomplete checkpoint"
    adapter = adapters.foreign(trainer_checkpoint)
    assert adapter.step == 40 and adapter.base == resolve("builtin:tiny-math") and "Trainer" in adapter.what
    # ours are still recognised, torn before the manifest arrived too: recipe.yaml is only ever ours
    torn = tmp_path / "step-3"
    torn.mkdir()
    (torn / checkpoint.STATE_FILE).write_text(json.dumps({"step": 3}))
    (torn / checkpoint.RECIPE_FILE).write_text("model: {}\n")
    assert checkpoint.is_grpo_checkpoint(torn)
    with pytest.raises(UserError, match="incomplete checkpoint"):
        checkpoint.locate(torn)


@pytest.mark.parametrize("kind", ["trainer", "peft"])
def test_eval_loads_the_adapter_on_its_base(kind, trainer_checkpoint, peft_adapter):
    directory = trainer_checkpoint if kind == "trainer" else peft_adapter
    loaded = load_for_inference(str(directory), device="cpu", dtype="float32")
    assert torch.allclose(logits_of(loaded.model, loaded.tokenizer), adapter_logits(directory), atol=1e-5)
    assert loaded.source == str(directory) + (" (step 40)" if kind == "trainer" else "")
    result = runner.invoke(app, ["eval", "--model", str(directory), "--data", "builtin:arithmetic-test",
                                 "--limit", "2", "--max-new-tokens", "8", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "accuracy (pass@1)" in result.output


@pytest.mark.parametrize("adapter_only", [False, True], ids=["merged", "adapter-only"])
def test_export_of_a_trainer_checkpoint(adapter_only, trainer_checkpoint, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = export(str(trainer_checkpoint), tmp_path / "out", dtype="float32", adapter_only=adapter_only)
    out = exported.out
    assert exported.step == 40 and exported.check.vs_adapter <= exported.check.tolerance < exported.check.vs_base
    if adapter_only:
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == resolve("builtin:tiny-math")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]),
                                          str(out))
    else:
        assert not (out / "adapter_config.json").exists()
        model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert torch.allclose(logits_of(model.eval(), tokenizer), adapter_logits(trainer_checkpoint), atol=1e-4)
    assert "not trained by grpo" in (out / "README.md").read_text().replace("\n", " ") or \
        "grpo did not train" in (out / "README.md").read_text().replace("\n", " ")
    assert not (out / "grpo_recipe.yaml").exists()  # no recipe to claim: grpo eval prompts it by its options
    result = runner.invoke(app, ["export", str(trainer_checkpoint), "--out", str(tmp_path / "cli"),
                                 "--dtype", "float32"] + (["--adapter-only"] if adapter_only else []))
    assert result.exit_code == 0, result.output
    assert "exported step 40" in result.output


def test_a_directory_without_an_adapter_is_refused_by_export(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="adapter_config.json"):
        export(str(tmp_path / "empty"), tmp_path / "out")
