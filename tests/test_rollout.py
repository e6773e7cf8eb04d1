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
