"""A real pretrained model: SmolLM2-135M-Instruct from its GGUF file (BPE tokenizer, chat template, 9 query
and 3 key-value heads, tied embeddings, 30 layers), converted once per session (conftest.smollm2_path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, SMOLLM2, smollm2_recipe

from grpo_cli.rollout import decoder
from grpo_cli.model import gguf as gguf_model
from grpo_cli.data.examples import build_examples
from grpo_cli.model.calls import position_ids
from grpo_cli.config.recipe import DataSpec

SYSTEM = "Put the final answer in \\boxed{}."


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from grpo_cli.model.loading import load_tokenizer

    return load_tokenizer(str(smollm2_path))


def model_in(smollm2_path, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=dtype, attn_implementation="sdpa").eval()


def test_the_conversion_says_what_it_read_and_keeps_the_architecture(smollm2_path):
    from transformers import AutoConfig

    info = json.loads((smollm2_path / gguf_model.INFO_FILE).read_text())
    assert info["architecture"] == "llama"
    assert info["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    config = AutoConfig.from_pretrained(smollm2_path)
    assert (config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers) == (9, 3, 30)
    assert config.tie_word_embeddings and not hasattr(config, "quantization_config")


def test_the_weights_are_the_file_s_dequantized(smollm2_path):
    """Every tensor equals gguf's own dequantization of the file (transformers' GGUF loader, read directly)."""
    from transformers import AutoModelForCausalLM

    file = gguf_model.locate(SMOLLM2)
    direct = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    ours = model_in(smollm2_path, torch.float32)
    theirs = direct.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()  # still tied


def test_a_second_use_reads_the_cache_and_the_key_is_the_content(smollm2_path, tmp_path):
    said = []
    assert gguf_model.ensure(SMOLLM2, said.append) == smollm2_path
    assert not any("converting" in line for line in said) and "Q4_1 x210" in said[0]
    renamed = tmp_path / "renamed.gguf"  # the same bytes under another name: the same conversion
    os.link(gguf_model.locate(SMOLLM2), renamed) if _same_device(tmp_path) else renamed.write_bytes(
        gguf_model.locate(SMOLLM2).read_bytes())
    said.clear()
    assert gguf_model.ensure(str(renamed), said.append) == smollm2_path
    assert not any("converting" in line for line in said)


def _same_device(tmp_path: Path) -> bool:
    return os.stat(tmp_path).st_dev == os.stat(gguf_model.locate(SMOLLM2)).st_dev


def test_the_chat_prompt_is_apply_chat_template_s(tokenizer, smollm2_path):
    """What grpo trains on is the model's own chat format, token for token, with no BOS added twice."""
    spec = DataSpec(train="builtin:arithmetic", chat=True, system_prompt=SYSTEM)
    rows = [{"question": "What is 12 + 35?", "answer": "47"}]
    prompt = build_examples(rows, spec, tokenizer, "t").items[0].prompt
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 12 + 35?"}]
    assert prompt == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # SmolLM2's ChatML, as its model card writes it
    assert prompt == ("<|im_start|>system\nPut the final answer in \\boxed{}.<|im_end|>\n"
                      "<|im_start|>user\nWhat is 12 + 35?<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                return_dict=True)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    assert tokenizer.eos_token == "<|im_end|>"  # generation ends at the end of the assistant's turn


def lean_against_forward(model, tokenizer, steps=6):
    """Next-token logits of the lean decoder against transformers' forward as `generate` runs it (its KV
    cache, the head on the last position only), over a prefill and `steps` decode steps of two left-padded
    chat prompts. (max |difference| to that, max |difference| to a full forward without a cache (whose
    matmuls have other shapes, so other roundings), largest |logit|)."""
    from transformers import DynamicCache

    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True)
             for q in ("What is 12 + 35?", "Solve x^2 - 5x + 6 = 0 and give both roots.")]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert mask[0].min() == 0  # the shorter prompt is left-padded
    lean = decoder.LeanDecoder(model, capacity=ids.shape[1] + steps, foldable=[])
    cache = DynamicCache(config=model.config)
    worst = worst_full = scale = 0.0
    with torch.no_grad():
        logits = lean.prefill(ids, mask, 1)
        new = ids
        for _ in range(steps):
            positions = position_ids(mask)[:, -new.shape[1]:]
            cached = model(input_ids=new, attention_mask=mask, position_ids=positions, cache=cache,
                           use_cache=True, logits_to_keep=1).logits[:, -1]
            full = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, -1]
            worst = max(worst, (logits.float() - cached.float()).abs().max().item())
            worst_full = max(worst_full, (logits.float() - full.float()).abs().max().item())
            scale = max(scale, full.float().abs().max().item())
            token = full.argmax(-1)
            logits = lean.step(token)
            new = token[:, None]
            ids = torch.cat([ids, new], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return worst, worst_full, scale


def test_lean_decoder_equals_transformers_in_float32(smollm2_path, tokenizer):
    model = model_in(smollm2_path, torch.float32)
    assert decoder.supports(model)
    worst, worst_full, scale = lean_against_forward(model, tokenizer)
    assert worst == 0.0, worst  # the model's own modules, the same shapes, the same order: bit for bit
    assert worst_full <= 1e-5 * scale, (worst_full, scale)


def test_lean_decoder_agrees_with_transformers_in_bfloat16(smollm2_path, tokenizer):
    model = model_in(smollm2_path, torch.bfloat16)
    worst, worst_full, scale = lean_against_forward(model, tokenizer)
    assert worst <= BFLOAT16_TOLERANCE * scale, (worst, scale)
    assert worst_full <= BFLOAT16_TOLERANCE * scale, (worst_full, scale)


def test_train_export_eval_round_trip_from_the_command_line(smollm2_path, tmp_path):
    """The GGUF named in a recipe, as a user runs it: train two steps, export, evaluate the export."""
    recipe = smollm2_recipe(tmp_path / "run", SYSTEM)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def grpo(*args):
        result = subprocess.run([sys.executable, "-m", "grpo_cli", *args], capture_output=True, text=True,
                                env=env, cwd=tmp_path, timeout=900)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        return result.stdout

    trained = grpo("train", str(path))
    assert "Q4_1 x210" in trained and "done: 2 steps" in trained
    exported = grpo("export", str(tmp_path / "run"), "--out", str(tmp_path / "merged"))
    assert "verified" in exported.lower()
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    evaluated = grpo("eval", "--model", str(tmp_path / "merged"), "--limit", "2", "--max-new-tokens", "12",
                     "-o", str(tmp_path / "eval.json"))
    assert "accuracy" in evaluated
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["n"] == 2
    # the export prompts as it was trained: the chat template with the recipe's system prompt
    assert report["items"][0]["completion"] is not None


BFLOAT16_TOLERANCE = 0.02  # of the largest logit: bf16 keeps 8 bits of mantissa, and the two paths round apart


def test_validate_the_shipped_real_model_recipe(smollm2_path):
    """grpo validate on the GGUF recipe: the file read (no second conversion), the data read with its tokenizer,
    the memory estimate with the interpreter's share on the CPU."""
    from typer.testing import CliRunner

    from grpo_cli.cli import app

    result = CliRunner().invoke(app, ["validate", str(ROOT / "recipes" / "smollm2-arithmetic.yaml")])
    assert result.exit_code == 0, result.output
    assert "valid." in result.output and "converting" not in result.output
    assert "8,192 tokens" in result.output  # SmolLM2's context, from the converted config
    assert "134,515,008" in result.output  # parameters: the tied head counted once
    assert "Python, torch and libraries" in result.output and "estimated peak" in result.output


def test_an_adapter_trained_on_the_gguf_is_recognised_as_its_base(smollm2_path, tmp_path):
    """A checkpoint records the converted directory as its base; the GGUF name, any other spelling of the file,
    and that directory in another cache are the same base."""
    from grpo_cli.model import adapters

    copy = tmp_path / "elsewhere" / "gguf" / smollm2_path.name  # the same conversion in another cache
    assert adapters.same_base(str(smollm2_path), SMOLLM2)
    assert adapters.same_base(str(copy), str(gguf_model.locate(SMOLLM2)))
    assert not adapters.same_base(str(smollm2_path), "builtin:tiny-math")
