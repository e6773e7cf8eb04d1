"""export/gguf_file.py: SmolLM2 written as GGUF and read back by transformers' GGUF reader gives the model it
was written from (f16: the same greedy continuations and top-1 tokens; q8_0: the same top-1 tokens at nearly
every position); the tokenizer and chat template travel with it; what it cannot write is refused by name."""

from types import SimpleNamespace

import pytest
import torch

from grpo_cli.errors import UserError
from grpo_cli.export.gguf_file import QUANTS, check_architecture, check_quant, write_gguf

PROMPTS = ["What is 12 + 30?", "Name a prime number larger than 10.", "Solve for x: 2x + 6 = 10."]


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32),
            AutoTokenizer.from_pretrained(smollm2_path))


def read_back(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32),
            AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))


def chat_ids(tokenizer, prompt):
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return text, tokenizer(text, return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("quant, top1_at_least", [("f16", 1.0), ("q8_0", 0.9)])
def test_smollm2_written_as_gguf_reads_back_as_the_same_model(smollm2, tmp_path, quant, top1_at_least):
    model, tokenizer = smollm2
    path = tmp_path / f"smollm2-{quant}.gguf"
    write_gguf(model, tokenizer, path, quant, name="SmolLM2 test", pre="smollm")
    back, back_tokenizer = read_back(path)
    assert back_tokenizer.eos_token_id == tokenizer.eos_token_id and back_tokenizer.chat_template
    agree = total = 0
    for prompt in PROMPTS:
        text, ids = chat_ids(tokenizer, prompt)
        back_text, back_ids = chat_ids(back_tokenizer, prompt)
        assert back_text == text and torch.equal(back_ids, ids)  # the prompt grpo trained on, token for token
        with torch.no_grad():
            a, b = model(ids).logits[0], back(ids).logits[0]  # [T, V]
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(a)
        if quant == "f16":
            assert (a.log_softmax(-1) - b.log_softmax(-1)).abs().max() < 0.1  # f16 rounding of the weights
            greedy = [m.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1]:] for m in (model, back)]
            assert torch.equal(*greedy)
    assert agree / total >= top1_at_least


def test_what_cannot_be_written_is_refused_by_name():
    with pytest.raises(UserError, match="q4_k_m") as refused:
        check_quant("q4_k_m")
    assert all(name in str(refused.value) for name in QUANTS)
    with pytest.raises(UserError, match="gpt2 model has no GGUF mapping"):
        check_architecture(SimpleNamespace(model_type="gpt2"))
    assert check_architecture(SimpleNamespace(model_type="qwen2")) == ("QWEN2", False)
