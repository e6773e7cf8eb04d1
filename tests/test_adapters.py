"""Adapters made elsewhere: a Hugging Face Trainer's (TRL's) checkpoint and a plain PEFT directory are read as the
adapters they hold by grpo eval and grpo export, not taken for broken grpo checkpoints."""

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from grpo_cli.model import adapters
from grpo_cli.checkpoint import layout, locating, manifest, store
from grpo_cli.cli import app
from grpo_cli.errors import UserError
from grpo_cli.export.build import export
from grpo_cli.model.loading import load_for_inference, resolve

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
    assert not locating.is_grpo_checkpoint(trainer_checkpoint)
    assert locating.locate(trainer_checkpoint) is None  # it used to say "incomplete checkpoint"
    adapter = adapters.foreign(trainer_checkpoint)
    assert adapter.step == 40 and adapter.base == resolve("builtin:tiny-math") and "Trainer" in adapter.what
    # ours are still recognised, torn before the manifest arrived too: recipe.yaml is only ever ours
    torn = tmp_path / "step-3"
    torn.mkdir()
    (torn / layout.STATE_FILE).write_text(json.dumps({"step": 3}))
    (torn / layout.RECIPE_FILE).write_text("model: {}\n")
    assert locating.is_grpo_checkpoint(torn)
    with pytest.raises(UserError, match="incomplete checkpoint"):
        locating.locate(torn)


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

    exported = export(str(trainer_checkpoint), tmp_path / "out", dtype="float32",
                      format="adapter" if adapter_only else None)
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


# ---------------------------------------------------------------- starting a run from an adapter (model.adapter)

TWO_STEPS = {"steps": 2, "lr": 5e-3, "warmup_steps": 0, "seed": 0}
NO_EVAL = {"eval": None}


def train_run(run_dir, resume=False, **sections):
    from conftest import small_recipe
    from grpo_cli.config import recipe as recipe_module
    from grpo_cli.run.console import TrainConsole
    from grpo_cli.run.train import train

    sections = {"train": TWO_STEPS, "data": NO_EVAL, "output": {"save_every": 1}, **sections}
    train(recipe_module.validate(small_recipe(run_dir, **sections)), resume=resume, console=TrainConsole(quiet=True))
    return run_dir


def kls(run_dir) -> dict[int, float]:
    from grpo_cli.run.log import METRICS, read_jsonl

    return {row["step"]: row["kl"] for row in read_jsonl(run_dir / METRICS) if row.get("kl") is not None}


def step_dir(run_dir, n):
    return run_dir / "checkpoints" / f"step-{n}"


def peft_logits(adapter_dirs) -> torch.Tensor:
    """Logits of the builtin model with each adapter in turn merged in (float32), the last one left unmerged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(resolve("builtin:tiny-math"), dtype=torch.float32)
    for index, directory in enumerate(adapter_dirs):
        model = PeftModel.from_pretrained(model, str(directory))
        if index < len(adapter_dirs) - 1:
            model = model.merge_and_unload(safe_merge=True)
    return logits_of(model.eval(), AutoTokenizer.from_pretrained(resolve("builtin:tiny-math")))


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_model_path):
    """Stands for the supervised stage: a short grpo run whose checkpoint moved away from the base."""
    return train_run(tmp_path_factory.mktemp("sft") / "run", output={"save_every": 2})


@pytest.fixture(scope="module")
def continued(sft_run, tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("continued") / "run", model={"adapter": str(step_dir(sft_run, 2))})


def test_continue_measures_the_kl_to_the_starting_adapter_not_to_the_bare_base(sft_run, continued, tmp_path,
                                                                             monkeypatch):
    from safetensors.torch import load_file

    from grpo_cli.model import loading as modeling

    assert kls(continued)[1] < 1e-5  # step 1: the policy is the reference, base plus the starting adapter
    begin = load_file(str(step_dir(sft_run, 2) / "adapter_model.safetensors"))
    end = load_file(str(step_dir(continued, 2) / "adapter_model.safetensors"))
    assert begin.keys() == end.keys() and any(not torch.equal(begin[k], end[k]) for k in begin)  # trained on
    # The same run with the reference a fresh LoRA has (adapters off: the bare base) is far from 0 at step 1.
    monkeypatch.setattr(modeling, "frozen_adapter_copies", lambda layers: None)
    wrong = train_run(tmp_path / "wrong", model={"adapter": str(step_dir(sft_run, 2))}, train={**TWO_STEPS, "steps": 1})
    assert kls(wrong)[1] > 1e-4 and kls(wrong)[1] > 100 * kls(continued)[1]


def test_a_resumed_continue_run_keeps_the_starting_adapter_as_reference(sft_run, continued, tmp_path):
    import shutil

    from grpo_cli.model.loading import load_policy
    from grpo_cli.config.recipe import load as load_recipe

    recipe = load_recipe(continued / "recipe.yaml")
    policy = load_policy(recipe.model.model_copy(update={"device": "cpu"}), recipe.grpo.kl_beta)
    store.restore_weights(step_dir(continued, 1), policy)
    with torch.no_grad(), policy.reference() as reference:
        ref_logits = logits_of(reference.eval(), policy.tokenizer)
    assert torch.allclose(ref_logits, peft_logits([step_dir(sft_run, 2)]), atol=1e-5)
    assert torch.allclose(logits_of(policy.model.eval(), policy.tokenizer), peft_logits([step_dir(continued, 1)]),
                          atol=1e-5)
    # and a real resume carries on from step 1 to the end
    copy = tmp_path / "copy"
    shutil.copytree(continued, copy)
    shutil.rmtree(step_dir(copy, 2))
    train_run(copy, resume=True, model={"adapter": str(step_dir(sft_run, 2))})
    assert kls(copy) == pytest.approx(kls(continued), rel=1e-4, abs=1e-7)


def test_a_continued_run_evaluates_and_exports(continued, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = load_for_inference(str(continued), device="cpu", dtype="float32")
    assert torch.allclose(logits_of(loaded.model, loaded.tokenizer), peft_logits([step_dir(continued, 2)]), atol=1e-5)
    merged = export(str(continued), tmp_path / "merged", dtype="float32")
    assert merged.check.vs_adapter <= merged.check.tolerance < merged.check.vs_base
    only = export(str(continued), tmp_path / "adapter", format="adapter")
    config = json.loads((only.out / "adapter_config.json").read_text())
    assert config["r"] == 8  # the starting adapter's own rank
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]),
                                      str(only.out))
    assert torch.allclose(logits_of(model.eval(), loaded.tokenizer), peft_logits([step_dir(continued, 2)]), atol=1e-5)


def test_merge_trains_a_fresh_lora_over_the_merged_adapter(sft_run, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = train_run(tmp_path / "merged-run", model={"adapter": str(sft_run), "adapter_mode": "merge",
                                                        "lora": {"r": 4, "alpha": 8}})
    assert kls(run_dir)[1] < 1e-5  # the reference (adapters off) is the merged base: the starting policy
    assert json.loads((step_dir(run_dir, 2) / "adapter_config.json").read_text())["r"] == 4
    expected = peft_logits([step_dir(sft_run, 2), step_dir(run_dir, 2)])
    loaded = load_for_inference(str(run_dir), device="cpu", dtype="float32")
    assert torch.allclose(logits_of(loaded.model, loaded.tokenizer), expected, atol=1e-4)
    exported = export(str(run_dir), tmp_path / "export", dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(exported.out).eval()
    assert torch.allclose(logits_of(model, loaded.tokenizer), expected, atol=1e-4)
    with pytest.raises(UserError, match="merged"):
        export(str(run_dir), tmp_path / "adapter", format="adapter")


def test_recipe_lora_values_that_continue_does_not_use_are_told(sft_run):
    from grpo_cli.model.loading import load_policy
    from grpo_cli.config.recipe import ModelSpec

    start = str(step_dir(sft_run, 2))
    messages = []
    policy = load_policy(ModelSpec(adapter=start, dtype="float32", device="cpu", lora={"r": 4, "alpha": 16}),
                         kl_beta=0.04, progress=messages.append)
    warning = [m for m in messages if m.startswith("warning: model.lora")]
    assert len(warning) == 1 and "r 4 (the adapter's: 8)" in warning[0] and "alpha" not in warning[0]
    assert any(m.startswith(f"starting from the grpo checkpoint {start} (step 2)") for m in messages)
    assert {p.shape[0] for n, p in policy.model.named_parameters() if "lora_A" in n} == {8}
    messages.clear()
    load_policy(ModelSpec(adapter=start, dtype="float32", device="cpu"), kl_beta=0.04, progress=messages.append)
    assert not [m for m in messages if m.startswith("warning")]  # defaults the recipe did not set are not compared


def test_an_adapter_for_another_base_is_refused(peft_adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    from grpo_cli.model.loading import load_policy
    from grpo_cli.config.recipe import ModelSpec

    other = tmp_path / "other-base"
    other.mkdir()
    config = json.loads((peft_adapter / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/other-model"}))
    shutil_copy(peft_adapter / "adapter_model.safetensors", other / "adapter_model.safetensors")
    with pytest.raises(UserError, match="org/other-model.*model.name"):
        load_policy(ModelSpec(adapter=str(other), device="cpu"), kl_beta=0.04)
    misshapen = tmp_path / "misshapen"
    misshapen.mkdir()
    (misshapen / "adapter_config.json").write_text(json.dumps(config))
    weights = {k: torch.zeros(v.shape[0], v.shape[1] + 3) if "lora_A" in k else v
               for k, v in load_file(str(peft_adapter / "adapter_model.safetensors")).items()}
    save_file(weights, str(misshapen / "adapter_model.safetensors"))
    with pytest.raises(UserError, match="does not fit"):
        load_policy(ModelSpec(adapter=str(misshapen), device="cpu"), kl_beta=0.04)
    with pytest.raises(UserError, match="no LoRA adapter"):
        load_policy(ModelSpec(adapter=str(tmp_path), device="cpu"), kl_beta=0.04)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        load_policy(ModelSpec(adapter="org/not-cached-adapter", device="cpu"), kl_beta=0.04)


def shutil_copy(source, target):
    import shutil

    shutil.copyfile(source, target)


@pytest.mark.parametrize("model, message", [
    ({"adapter": "a", "lora": None}, "model.lora cannot be null"),
    ({"adapter": "a", "adapter_mode": "merge", "load_in_4bit": True}, "round the adapter away"),
])
def test_settings_that_do_not_fit_an_adapter_are_refused(model, message, tmp_path):
    from conftest import small_recipe
    from grpo_cli.config import recipe as recipe_module

    with pytest.raises(UserError, match=message):
        recipe_module.validate(small_recipe(tmp_path, model={"name": "builtin:tiny-math", **model}))


def test_a_continued_adapter_stays_plain_peft_lora_for_the_fast_engine(sft_run):
    from grpo_cli.model import lora_linear
    from grpo_cli.model.loading import load_policy, lora_layers
    from grpo_cli.config.recipe import ModelSpec
    from grpo_cli.rollout.sampling import foldable_lora_layers

    policy = load_policy(ModelSpec(adapter=str(step_dir(sft_run, 2)), dtype="float32", device="cpu"), kl_beta=0.04)
    layers = lora_layers(policy.model)
    assert layers and len(foldable_lora_layers(policy.model)) == len(layers)  # the rollout folds every one
    assert lora_linear.install(policy.model) == len(layers)  # and the update trains every one in fewer passes
    with torch.no_grad(), policy.reference() as reference:
        assert torch.allclose(logits_of(reference.eval(), policy.tokenizer), peft_logits([step_dir(sft_run, 2)]),
                              atol=1e-5)


def test_continue_under_fsdp_measures_the_kl_to_the_starting_adapter(peft_adapter, tmp_path):
    """Under FSDP2 the frozen starting copies are swapped into gathered layers: step 1's KL is 0 (not measured to
    the bare base) and step 2's is not (not measured to the policy itself)."""
    import os
    import subprocess
    import sys

    import yaml

    from conftest import ROOT, small_recipe

    recipe = {**small_recipe(tmp_path / "run", model={"adapter": str(peft_adapter)}, train=TWO_STEPS, data=NO_EVAL,
                             output={"save_every": 2}), "distributed": {"strategy": "fsdp"}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "grpo_cli", "train", str(tmp_path / "recipe.yaml"), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    kl = kls(tmp_path / "run")
    assert kl[1] < 1e-5 and kl[2] > 1e-5


# ---------------------------------------------------------------- adapters that do not load whole, or cannot be read

def adapter_copy(peft_adapter, directory, change=None):
    """A copy of the PEFT adapter; `change` maps its tensors ({name: tensor}) to those the copy holds."""
    from safetensors.torch import load_file, save_file

    directory.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil_copy(peft_adapter / name, directory / name)
    if change is not None:
        weights = load_file(str(directory / "adapter_model.safetensors"))
        save_file(change(weights), str(directory / "adapter_model.safetensors"))
    return directory


NOT_WHOLE = {  # (what is changed, the part of the message that says it)
    "renamed": (lambda w: {k.replace(".layers.", ".blocks."): v for k, v in w.items()},
                r"56 of its 56 tensors match no weight of the model \(base_model\.model\.model\.blocks\.0\."),
    "extra": (lambda w: {**w, "base_model.model.model.layers.0.mlp.gate.lora_A.weight": torch.zeros(4, 64)},
              r"1 of its 57 tensors match no weight of the model \(base_model\.model\.model\.layers\.0\.mlp\.gate\."),
    "lacking": (lambda w: {k: v for k, v in w.items() if "layers.1.mlp.down_proj.lora_B" not in k},
                r"has 1 LoRA weights it holds no tensor for.*\(base_model\.model\.model\.layers\.1\.mlp\.down_proj\."
                r"lora_B\.weight\)"),
}


@pytest.mark.parametrize("kind", list(NOT_WHOLE))
def test_an_adapter_whose_tensors_are_not_the_models_lora_weights_is_refused(kind, peft_adapter, tmp_path):
    """PEFT loads by name and passes over names it does not know: renamed tensors used to train and evaluate the
    bare base model with exit 0 (step-0 accuracy 23.5% against the adapter's 60.5%)."""
    from grpo_cli.model.loading import load_policy
    from grpo_cli.config.recipe import ModelSpec

    change, message = NOT_WHOLE[kind]
    adapter = adapter_copy(peft_adapter, tmp_path / kind, change)
    with pytest.raises(UserError, match=message):
        load_policy(ModelSpec(adapter=str(adapter), dtype="float32", device="cpu"), kl_beta=0.04)  # train
    with pytest.raises(UserError, match=message):
        load_for_inference(str(adapter), device="cpu", dtype="float32")  # eval
    with pytest.raises(UserError, match=message):
        export(str(adapter), tmp_path / "out", dtype="float32")


def test_eval_of_an_adapter_that_matches_nothing_exits_with_the_message(peft_adapter, tmp_path):
    adapter = adapter_copy(peft_adapter, tmp_path / "renamed", NOT_WHOLE["renamed"][0])
    result = runner.invoke(app, ["eval", "--model", str(adapter), "--data", "builtin:arithmetic-test", "--limit", "2",
                                 "--max-new-tokens", "8", "--device", "cpu"])
    assert result.exit_code == UserError.exit_code
    assert "does not load whole" in result.output and "save_pretrained" in result.output


def test_resume_refuses_a_checkpoint_whose_adapter_does_not_load_whole(sft_run, tmp_path):
    """A checkpoint sealed (manifest, checksums) over an adapter of other names: its checksums cannot tell."""
    import shutil

    from safetensors.torch import load_file, save_file

    from grpo_cli.model.loading import load_policy
    from grpo_cli.config.recipe import load as load_recipe

    copied = tmp_path / "step-2"
    shutil.copytree(step_dir(sft_run, 2), copied)
    for name in (layout.MANIFEST, layout.CHECKSUMS):
        (copied / name).unlink()
    file = copied / "adapter_model.safetensors"
    save_file(NOT_WHOLE["renamed"][0](load_file(str(file))), str(file))
    manifest.write_manifest(copied)
    recipe = load_recipe(copied / layout.RECIPE_FILE)
    policy = load_policy(recipe.model.model_copy(update={"device": "cpu"}), recipe.grpo.kl_beta)
    with pytest.raises(UserError, match=rf"the adapter of the checkpoint {copied} does not load whole: \d+ of its"):
        store.restore_weights(copied, policy)


def truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def garble(file):
    file.write_bytes(bytes(range(256)) * 16)


@pytest.mark.parametrize("damage", [truncate, garble], ids=["truncated", "garbage"])
def test_an_adapter_file_that_cannot_be_read_is_called_unreadable_not_unfit(damage, peft_adapter, tmp_path):
    from grpo_cli.model.loading import load_policy
    from grpo_cli.config.recipe import ModelSpec

    adapter = adapter_copy(peft_adapter, tmp_path / "damaged")
    damage(adapter / "adapter_model.safetensors")
    message = rf"cannot be read: {adapter / 'adapter_model.safetensors'}: SafetensorError: .*corrupt or incomplete"
    with pytest.raises(UserError, match=message) as refused:
        load_policy(ModelSpec(adapter=str(adapter), dtype="float32", device="cpu"), kl_beta=0.04)
    assert "does not fit" not in str(refused.value)
    with pytest.raises(UserError, match=message):
        load_for_inference(str(adapter), device="cpu", dtype="float32")
    result = runner.invoke(app, ["export", str(adapter), "--out", str(tmp_path / "out")])
    assert result.exit_code == UserError.exit_code and "corrupt or incomplete" in result.output


@pytest.mark.parametrize("config_text, message", [
    ('{"base_model_name_or_path": "BASE", "peft_type": "NO_SUCH_TYPE"', r"adapter_config\.json cannot be read \("),
    ('{"base_model_name_or_path": "BASE", "peft_type": "NO_SUCH_TYPE"}',
     r"adapter_config\.json cannot be read as a PEFT adapter config \(KeyError"),
], ids=["not-json", "not-peft"])
def test_an_adapter_config_that_cannot_be_read_is_called_unreadable(config_text, message, peft_adapter, tmp_path):
    adapter = adapter_copy(peft_adapter, tmp_path / "config")
    (adapter / "adapter_config.json").write_text(config_text.replace("BASE", resolve("builtin:tiny-math")))
    with pytest.raises(UserError, match=message) as refused:
        load_for_inference(str(adapter), device="cpu", dtype="float32")
    assert "does not fit" not in str(refused.value)
