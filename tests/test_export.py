"""grpo export on the builtin model: LoRA, full fine-tune and 4-bit runs, verified merges."""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import small_recipe
from grpo_cli.data import builtin_task
from grpo_cli.checkpoint import layout, manifest
from grpo_cli.config import recipe as recipe_module
from grpo_cli.commands.benchmark import EvalOptions, run as run_eval
from grpo_cli.run.console import TrainConsole
from grpo_cli.errors import UserError
from grpo_cli.export.build import export
from grpo_cli.export.formats import FORMATS
from grpo_cli.run.train import train

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
                 "tokenizer_config.json", "README.md"):
        assert (out / name).exists(), name
    assert not (out / "adapter_config.json").exists()
    assert not (out / "chat_template.jinja").exists()  # trained on plain prompts: see the prompting tests
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
    from grpo_cli.model.loading import load_for_inference

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
    exported = export(str(lora_run), tmp_path / "adapter", format="adapter")
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
        export(str(run_dir), tmp_path / "x", format="adapter")


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
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="without a complete checkpoint"):
        export(str(tmp_path / "empty_run"), tmp_path / "o1")
    with pytest.raises(UserError, match="not a grpo run directory or checkpoint"):
        export(str(tmp_path), tmp_path / "o2")
    with pytest.raises(UserError, match="--dtype"):
        export(str(lora_run), tmp_path / "o3", dtype="int8")



# The builtin model's character-level tokenizer has no GGUF form: gguf is exported from SmolLM2 in
# test_gguf_export.py, with the same assertions and its own
ON_THE_BUILTIN_MODEL = sorted(set(FORMATS) - {"gguf"})


def test_every_registered_format_is_tested():
    assert set(ON_THE_BUILTIN_MODEL) | {"gguf"} == set(FORMATS)


@pytest.mark.parametrize("name", ON_THE_BUILTIN_MODEL)
def test_every_registered_format_writes_and_verifies_itself(lora_run, tmp_path, name):
    """A format registered in formats.FORMATS is exported, reloaded and checked by the one path, with the
    transaction's marker and a model card: what a new format gets by being registered."""
    exported = export(str(lora_run), tmp_path / name, format=name)
    assert exported.format == name and exported.label
    assert exported.check.vs_adapter <= exported.check.tolerance < exported.check.vs_base
    written = json.loads((exported.out / "grpo_export.json").read_text())["files"]
    assert "README.md" in written and "tokenizer_config.json" in written
    assert sorted(written) == sorted(f.relative_to(exported.out).as_posix() for f in exported.out.rglob("*")
                                     if f.is_file() and f.name != "grpo_export.json")
    assert hidden(tmp_path) == []


def test_an_unknown_format_is_refused_with_the_list(lora_run, tmp_path):
    with pytest.raises(UserError, match="--format onnx") as refused:
        export(str(lora_run), tmp_path / "o", format="onnx")
    assert all(f"{name} (" in str(refused.value) for name in FORMATS)
    assert not (tmp_path / "o").exists() and hidden(tmp_path) == []


def test_format_on_the_command_line(lora_run, tmp_path):
    from typer.testing import CliRunner

    from grpo_cli.cli import app

    runner = CliRunner()
    unknown = runner.invoke(app, ["export", str(lora_run), "--out", str(tmp_path / "o"), "--format", "onnx"])
    assert unknown.exit_code == 2 and all(name in unknown.output for name in FORMATS)
    both = runner.invoke(app, ["export", str(lora_run), "--out", str(tmp_path / "o"), "--adapter-only",
                               "--format", "safetensors"])
    assert both.exit_code == 2 and "--adapter-only is short for --format adapter" in " ".join(both.output.split())
    adapter = runner.invoke(app, ["export", str(lora_run), "--out", str(tmp_path / "a"), "--format", "adapter"])
    assert adapter.exit_code == 0 and "as a LoRA adapter" in adapter.output, adapter.output
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "o").exists()


def test_missing_base_model_is_explained(lora_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(lora_run, copy)
    for path in [copy / "recipe.yaml", *copy.glob("checkpoints/*/recipe.yaml")]:
        path.write_text(path.read_text().replace("builtin:tiny-math", "./gone/base-model"))
    for step in copy.glob("checkpoints/step-*"):  # the edit is on purpose: record it as a save would have
        for record in (layout.MANIFEST, getattr(layout, "CHECKSUMS", None)):
            if record:
                (step / record).unlink(missing_ok=True)
        manifest.write_manifest(step)
    with pytest.raises(UserError, match="model directory ./gone/base-model not found"):
        export(str(copy), tmp_path / "o")


# --out must never cost the user data: what export may delete, and what is left when it fails.

def snapshot(directory):
    """Every file under `directory` with its bytes: what must survive a refused or failed export."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def hidden(directory):
    """Hidden directories under `directory`: where export writes before the final rename (a run's .lock is a file)."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob(".*") if p.is_dir())


@pytest.fixture
def run_copy(lora_run, tmp_path):
    """The trained run copied to runs/exp1 under tmp_path, for tests that may try to destroy it."""
    shutil.copytree(lora_run, tmp_path / "runs" / "exp1")
    return tmp_path / "runs" / "exp1"


@pytest.fixture
def earlier_export(lora_export, tmp_path):
    """A finished export at tmp_path/model, as an earlier `grpo export --out model` left it."""
    shutil.copytree(lora_export.out, tmp_path / "model")
    return tmp_path / "model"


class Terminated(BaseException):
    """Like the exception SIGTERM raises in grpo: not an Exception, so only `except BaseException` sees it."""


@pytest.mark.parametrize("cwd, source, out", [
    (".", "runs/exp1", "runs/exp1"),  # the run itself
    (".", "runs/exp1", "runs"),  # its parent
    ("runs/exp1", ".", "."),  # --out . from inside the run
    (".", "runs/exp1", "runs/exp1/merged"),  # inside the run
    (".", "runs/exp1/checkpoints/step-4", "runs/exp1"),  # the run that holds the exported checkpoint
    (".", "runs/exp1/checkpoints/step-4", "runs/exp1/checkpoints/step-4"),
])
def test_out_that_holds_or_lies_in_the_source_is_refused_even_with_force(run_copy, tmp_path, monkeypatch, cwd,
                                                                          source, out):
    monkeypatch.chdir(tmp_path / cwd)
    before = snapshot(run_copy)
    with pytest.raises(UserError) as refused:
        export(source, out, force=True)
    message = str(refused.value)
    assert str(Path(out).resolve()) in message and str(Path(source).resolve()) in message, message
    assert "would delete" in message or "inside" in message, message
    assert snapshot(run_copy) == before  # every checkpoint and the metrics, byte for byte
    assert hidden(tmp_path) == []


def test_force_replaces_only_an_earlier_export(lora_run, earlier_export, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an earlier grpo export") as refused:
        export(str(lora_run), mine, force=True)
    assert "--force" in str(refused.value) and str(mine) in str(refused.value)
    assert snapshot(mine) == {"notes.txt": b"keep me"}

    again = export(str(lora_run), earlier_export, dtype="bfloat16", force=True)  # replaces the float32 export
    assert json.loads((again.out / "config.json").read_text())["dtype"] == "bfloat16"
    assert not list(tmp_path.glob("model/*lora*"))

    (earlier_export / "my-eval.json").write_text("{}")  # an export the user added to is no longer only ours
    before = snapshot(earlier_export)
    with pytest.raises(UserError, match="my-eval.json"):
        export(str(lora_run), earlier_export, force=True)
    assert snapshot(earlier_export) == before
    assert hidden(tmp_path) == []


def test_out_that_is_a_file_is_refused(lora_run, tmp_path):
    target = tmp_path / "model.bin"
    target.write_text("a file")
    for force in (False, True):
        with pytest.raises(UserError, match="is a file") as refused:
            export(str(lora_run), target, force=force)
        assert str(target) in str(refused.value)
    with pytest.raises(UserError, match="Not a directory"):  # --out under a file
        export(str(lora_run), target / "model")
    assert target.read_text() == "a file" and hidden(tmp_path) == []


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_an_unwritable_out_is_explained(lora_run, tmp_path, monkeypatch, code):
    # As root, chmod does not stop writes: make the directory refuse them as a read-only one does.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).parent == locked:
            raise OSError(code, os.strerror(code), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.raises(UserError) as refused:
        export(str(lora_run), locked / "model")
    message = str(refused.value)
    assert os.strerror(code) in message and str(locked / "model") in message and "writable" in message, message
    assert list(locked.iterdir()) == []


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _no_space_in_safetensors(*args, **kwargs):
    from safetensors import SafetensorError

    # What safetensors really raises when the disk fills (checked on a 64 KiB tmpfs): not an OSError.
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("where, full", [
    ("transformers.PreTrainedModel.save_pretrained", _no_space),
    ("transformers.modeling_utils.safe_save_file", _no_space_in_safetensors),
])
def test_a_full_disk_leaves_nothing_half_written(run_copy, earlier_export, tmp_path, monkeypatch, where, full):
    before = snapshot(earlier_export), snapshot(run_copy)
    monkeypatch.setattr(where, full)
    with pytest.raises(UserError) as refused:
        export(str(run_copy), earlier_export, force=True)
    message = str(refused.value)
    assert "No space left on device" in message and str(earlier_export) in message and "free" in message, message
    assert (snapshot(earlier_export), snapshot(run_copy)) == before  # the earlier export stays as it was
    assert hidden(tmp_path) == []


def _raise_in_save(monkeypatch, error):
    def save_pretrained(*args, **kwargs):
        raise error

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", save_pretrained)


def _raise_in_final_rename(monkeypatch, error):
    real_rename = Path.rename

    def rename(self, target):
        if self.name.endswith(".partial"):
            raise error
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    monkeypatch.setattr(Path, "replace", rename)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), Terminated(), RuntimeError("a bug")],
                         ids=["ctrl-c", "sigterm", "bug"])
@pytest.mark.parametrize("when", [_raise_in_save, _raise_in_final_rename], ids=["saving", "renaming"])
def test_an_interruption_leaves_nothing_half_written(run_copy, earlier_export, tmp_path, monkeypatch, when, error):
    before = snapshot(earlier_export), snapshot(run_copy)
    when(monkeypatch, error)
    with pytest.raises(type(error)):
        export(str(run_copy), earlier_export, force=True)
    assert (snapshot(earlier_export), snapshot(run_copy)) == before
    assert hidden(tmp_path) == []


def test_a_hidden_partial_beside_out_is_removed_only_when_a_dead_export_left_it(lora_run, tmp_path):
    partial = tmp_path / ".model.partial"
    partial.mkdir()
    (partial / "notes.txt").write_text("not export's")
    with pytest.raises(UserError, match="in the way"):
        export(str(lora_run), tmp_path / "model")
    assert snapshot(partial) == {"notes.txt": b"not export's"}
    shutil.rmtree(partial)
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # another export, still writing
    try:
        partial.mkdir()
        (partial / "grpo_export.json").write_text(json.dumps({"written_by": "grpo export", "pid": writer.pid}))
        with pytest.raises(UserError, match=rf"another grpo export \(process {writer.pid}\)"):
            export(str(lora_run), tmp_path / "model")
        assert (partial / "grpo_export.json").exists()
    finally:
        writer.kill()
        writer.wait()
    # Its writer killed outright (SIGKILL), the leftover is export's own: removed, and the export goes ahead.
    assert export(str(lora_run), tmp_path / "model").out.joinpath("model.safetensors").exists()
    assert hidden(tmp_path) == []


def _card_snippet(out: Path) -> str:
    """The model card's Python snippet, pointed at `out`."""
    card = (out / "README.md").read_text()
    use = card.split("## Use")[1].split("## Recipe")[0]
    return use.split("```python\n")[1].split("\n```")[0].replace("<this dir>", str(out))


def _run_snippet(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_plain_prompt_run_exports_no_chat_template_and_its_card_shows_the_plain_prompt(lora_export):
    from transformers import AutoTokenizer

    out = lora_export.out
    assert AutoTokenizer.from_pretrained(out).chat_template is None  # the builtin base has one; training never used it
    card = (out / "README.md").read_text()
    prompting = card.split("## How to prompt it")[1].split("## Use")[0]
    assert "no chat" in prompting and "template" in prompting
    first = builtin_task.train_split()[0].question  # the example is the training set's first problem, verbatim
    assert f"```text\n{first}\n```" in prompting and "the problem's `question` field as it is" in prompting
    snippet = _card_snippet(out)
    assert f"prompt = {first!r}" in snippet and "apply_chat_template" not in snippet
    assert _run_snippet(snippet).strip()  # plain transformers runs the card's snippet and the model answers


def _prompted_with(run_dir: Path, **data) -> Path:
    """`run_dir` (a copy of the trained run) as if its recipe had prompted with `data`: its weights are
    trained, which export needs, and the prompt format is all the card and the tokenizer depend on."""
    for path in [run_dir / "recipe.yaml", *run_dir.glob(f"checkpoints/*/{layout.RECIPE_FILE}")]:
        loaded = recipe_module.load(path)
        path.write_text(recipe_module.dump(loaded.model_copy(update={"data": loaded.data.model_copy(update=data)})))
        if path.parent.parent.name == "checkpoints":  # the checkpoint's manifest and checksums, rewritten to match
            for name in (layout.MANIFEST, layout.CHECKSUMS):
                (path.parent / name).unlink()
            manifest.write_manifest(path.parent)
    return run_dir


def test_a_template_run_shows_its_format_string_and_an_example_built_with_it(run_copy, tmp_path):
    template = "Q: {question}\nA:"
    out = export(str(_prompted_with(run_copy, template=template)), tmp_path / "templated").out
    card = (out / "README.md").read_text()
    first = builtin_task.train_split()[0].question
    assert f"```text\n{template}\n```" in card and f"```text\nQ: {first}\nA:\n```" in card
    assert f"prompt = {f'Q: {first}' + chr(10) + 'A:'!r}" in _card_snippet(out)


def test_a_chat_run_exports_the_template_it_trained_with_and_its_card_shows_the_messages(run_copy, tmp_path):
    from transformers import AutoTokenizer

    from grpo_cli.model import builtin as builtin_model
    from grpo_cli.data.examples import render_prompt

    system = "Show your work, then the answer after ####."
    run_dir = _prompted_with(run_copy, chat=True, system_prompt=system)
    exported = export(str(run_dir), tmp_path / "chat")
    tokenizer = AutoTokenizer.from_pretrained(exported.out)
    assert tokenizer.chat_template == builtin_model.CHAT_TEMPLATE
    card = (exported.out / "README.md").read_text()
    first = builtin_task.train_split()[0].question
    recipe = recipe_module.load(exported.out / "grpo_recipe.yaml")
    trained_prompt = render_prompt({"question": first}, recipe.data, tokenizer)  # as training rendered it
    assert f"```text\n{trained_prompt}\n```" in card and "<|im_start|>system" in trained_prompt
    assert f"```text\n{system}\n```" in card
    snippet = _card_snippet(exported.out)
    assert "apply_chat_template(messages, tokenize=False, add_generation_prompt=True)" in snippet
    assert "messages = [" in snippet and repr(system) in snippet and repr(first) in snippet
    probe = snippet.replace("output = model.generate", "print(repr(prompt))\noutput = model.generate")
    assert _run_snippet(probe).splitlines()[0] == repr(trained_prompt)  # the snippet prompts as training did
    adapter = export(str(run_dir), tmp_path / "chat-adapter", format="adapter")
    assert AutoTokenizer.from_pretrained(adapter.out).chat_template == builtin_model.CHAT_TEMPLATE
    assert _run_snippet(_card_snippet(adapter.out)).strip()


def test_the_card_of_a_thinking_run_prompts_with_its_chat_template_kwargs():
    """The card's snippet passes data.chat_template_kwargs to apply_chat_template, so it renders the prompt
    training used (the opened <think> included); the example prompt shown is that same prompt."""
    from grpo_cli.data.examples import render_prompt
    from grpo_cli.export.card import prompting
    from grpo_cli.export.formats import format_named
    from thinking_template import thinking_tokenizer

    tokenizer = thinking_tokenizer()
    recipe = recipe_module.validate({"data": {"chat": True, "chat_template_kwargs": {"enable_thinking": True}}})
    section = prompting(recipe, tokenizer, format_named("safetensors"), base_path="base")
    trained_prompt = render_prompt({"question": builtin_task.train_split()[0].question}, recipe.data, tokenizer)
    assert trained_prompt.endswith("<think>\n") and f"```text\n{trained_prompt}\n```" in section
    assert "(`enable_thinking=True`)" in section
    snippet = section.split("```python\n")[-1].split("\n```")[0]
    assert "add_generation_prompt=True, enable_thinking=True)" in snippet
    making = "\n".join(line for line in snippet.splitlines() if line.startswith(("messages =", "prompt =")))
    namespace = {"tokenizer": tokenizer}
    exec(making, namespace)  # the card's own lines, with the tokenizer the export ships
    assert namespace["prompt"] == trained_prompt
