import pytest
import torch

from grpo_cli.modeling import load_policy
from grpo_cli.recipe import ModelSpec
from grpo_cli.rollout import generate


def test_groups_masks_and_texts(tiny_model_path):
    policy = load_policy(ModelSpec(name="builtin:tiny-math", dtype="float32"), kl_beta=0.0)
    torch.manual_seed(0)
    rollout = generate(policy.model, policy.tokenizer, ["What is 2 + 3?", "What is 7 * 38?"], max_new_tokens=40,
                       samples_per_prompt=3)
    n, total = rollout.input_ids.shape
    assert n == 6 and rollout.attention_mask.shape == (6, total)
    eos = policy.tokenizer.eos_token_id
    for i in range(n):
        ids = rollout.completion_ids[i][rollout.completion_mask[i].bool()].tolist()
        # the mask covers the completion through its first EOS and nothing after it
        if not rollout.truncated[i]:
            assert ids[-1] == eos and eos not in ids[:-1]
        assert policy.tokenizer.decode(ids, skip_special_tokens=True) == rollout.texts[i]
    assert rollout.lengths.tolist() == rollout.completion_mask.sum(1).tolist()
    assert policy.model.training  # generation restored the mode it found


def test_greedy_is_deterministic(tiny_model_path):
    policy = load_policy(ModelSpec(name="builtin:tiny-math", dtype="float32"), kl_beta=0.0)
    a = generate(policy.model, policy.tokenizer, ["What is 12 + 30?"], 40, greedy=True)
    b = generate(policy.model, policy.tokenizer, ["What is 12 + 30?"], 40, greedy=True)
    assert a.texts == b.texts and "####" in a.texts[0]


@pytest.mark.parametrize("options", [{}, {"temperature": 0.7, "top_p": 0.9}, {"greedy": True}])
def test_fast_engine_samples_what_transformers_generate_samples(tiny_model_path, options):
    policy = load_policy(ModelSpec(name="builtin:tiny-math", dtype="float32"), kl_beta=0.0)
    prompts = ["What is 2 + 3?", "Solve x^2 - 5x + 6 = 0.", "What is 7 * 38?", "What is 41 + 9?"]
    samples = 1 if options.get("greedy") else 8
    out = {}
    for engine in ("generate", "fast"):
        torch.manual_seed(5)
        out[engine] = generate(policy.model, policy.tokenizer, prompts, 40, samples_per_prompt=samples, engine=engine,
                               **options)
    assert out["fast"].texts == out["generate"].texts
    assert torch.equal(out["fast"].input_ids, out["generate"].input_ids)
    assert torch.equal(out["fast"].attention_mask, out["generate"].attention_mask)
    assert len(set(out["fast"].lengths.tolist())) > 1  # rows ended at different steps: the compaction ran
