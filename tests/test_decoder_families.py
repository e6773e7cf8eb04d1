"""The table of popular families in docs/performance.md ("Which families take the lean decoder"):
for each row, a tiny config set as the family's checkpoints set it, and `decoder.supports` must answer
as the row says."""

import re

import pytest
import torch
import transformers
from conftest import ROOT
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_cli.rollout import decoder
from grpo_cli.rollout import sampling as rollout
from grpo_cli.rollout.settings import Sampling

SHAPE = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128,
             pad_token_id=0, bos_token_id=2, eos_token_id=1)  # inside the tiny vocabulary (phi3's pad is 32000)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=32)

# The table's family column -> (the transformers config class, what the family's checkpoints set).
# Four layers: SmolLM3 drops the rotary embedding on every fourth.
CONFIGS = {
    "Llama 3.1 / 3.2 / 3.3": ("LlamaConfig", dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)),
    "SmolLM2": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "Mistral 7B v0.2 / v0.3": ("MistralConfig", dict(sliding_window=None)),
    "Mistral 7B v0.1": ("MistralConfig", dict(sliding_window=4096)),
    "Qwen2.5, DeepSeek-R1-Distill-Qwen": ("Qwen2Config", dict(use_sliding_window=False, sliding_window=32768)),
    "Qwen3": ("Qwen3Config", dict(head_dim=32, use_sliding_window=False, sliding_window=None)),
    "Qwen3-MoE": ("Qwen3MoeConfig", dict(MOE, use_sliding_window=False, sliding_window=None)),
    "Gemma 3": ("Gemma3TextConfig", dict(head_dim=16)),
    "Phi-3, Phi-3.5, Phi-4": ("Phi3Config", {}),
    "SmolLM3": ("SmolLM3Config", {}),
}
PATHS = {"lean decoder": True, "transformers' forward": False}


def documented_rows() -> list[tuple[str, str, str]]:
    """(family, model_type, path) for each row of the table under the heading."""
    text = (ROOT / "docs" / "performance.md").read_text()
    section = text.split("## Which families take the lean decoder", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| ([^|`]+?) \| `(\w+)` \| ([^|]+?) \|", section, re.M)
    return [row for row in rows if row[0] != "family"]  # the header row


def tiny_model(family: str):
    name, settings = CONFIGS[family]
    if not hasattr(transformers, name):
        pytest.skip(f"this transformers ({transformers.__version__}) has no {name}")
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(getattr(transformers, name)(**SHAPE, **settings)).eval()


def test_the_table_lists_the_families_the_test_builds():
    rows = documented_rows()
    assert [family for family, _, _ in rows] == list(CONFIGS)
    assert {path for _, _, path in rows} == set(PATHS)


@pytest.mark.parametrize("family, model_type, path", documented_rows(), ids=[row[0] for row in documented_rows()])
def test_each_family_takes_the_documented_path(family, model_type, path):
    model = tiny_model(family)
    assert model.config.model_type == model_type
    assert decoder.supports(model) == PATHS[path]


def test_qwen3_moe_falls_back_to_transformers_forward(tiny_model_path, monkeypatch):
    """Refused cleanly: no lean decoder is built, and the fast engine samples through the model's forward."""
    built = {"lean": 0, "forward": 0}

    class Lean(decoder.LeanDecoder):
        def __init__(self, *args, **kwargs):
            built["lean"] += 1
            super().__init__(*args, **kwargs)

    class Forward(rollout._TransformersStepper):
        def __init__(self, *args, **kwargs):
            built["forward"] += 1
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(decoder, "LeanDecoder", Lean)
    monkeypatch.setattr(rollout, "_TransformersStepper", Forward)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)  # the builtin's: 101 tokens, pad 0, EOS 1
    torch.manual_seed(0)
    out = rollout.generate(tiny_model("Qwen3-MoE"), tokenizer, ["What is 2 + 3?", "What is 7 * 38?"],
                           Sampling(max_new_tokens=6, samples_per_prompt=2))
    assert built == {"lean": 0, "forward": 1}
    assert out.input_ids.shape[0] == 4 and out.completion_mask.sum() > 0
