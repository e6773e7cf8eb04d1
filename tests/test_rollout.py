import pytest
import torch
from conftest import trained_lora_policy

from grpo_cli.model.loading import load_policy
from grpo_cli.config.recipe import ModelSpec
from grpo_cli.rollout.sampling import foldable_lora_layers, folded_lora, generate
from grpo_cli.rollout.settings import Sampling


def test_groups_masks_and_texts(tiny_model_path):
    policy = load_policy(ModelSpec(name="builtin:tiny-math", dtype="float32"), kl_beta=0.0)
    torch.manual_seed(0)
    rollout = generate(policy.model, policy.tokenizer, ["What is 2 + 3?", "What is 7 * 38?"],
                       Sampling(max_new_tokens=40, samples_per_prompt=3))
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
    a = generate(policy.model, policy.tokenizer, ["What is 12 + 30?"], Sampling(max_new_tokens=40, greedy=True))
    b = generate(policy.model, policy.tokenizer, ["What is 12 + 30?"], Sampling(max_new_tokens=40, greedy=True))
    assert a.texts == b.texts and "####" in a.texts[0]


@pytest.mark.parametrize("options", [{}, {"temperature": 0.7, "top_p": 0.9}, {"greedy": True}])
def test_fast_engine_samples_what_transformers_generate_samples(tiny_model_path, options):
    policy = load_policy(ModelSpec(name="builtin:tiny-math", dtype="float32"), kl_beta=0.0)
    prompts = ["What is 2 + 3?", "Solve x^2 - 5x + 6 = 0.", "What is 7 * 38?", "What is 41 + 9?"]
    samples = 1 if options.get("greedy") else 8
    out = {}
    for engine in ("generate", "fast"):
        torch.manual_seed(5)
        out[engine] = generate(policy.model, policy.tokenizer, prompts,
                               Sampling(max_new_tokens=40, samples_per_prompt=samples, engine=engine, **options))
    assert out["fast"].texts == out["generate"].texts
    assert torch.equal(out["fast"].input_ids, out["generate"].input_ids)
    assert torch.equal(out["fast"].attention_mask, out["generate"].attention_mask)
    assert len(set(out["fast"].lengths.tolist())) > 1  # rows ended at different steps: the compaction ran


def test_folded_lora_samples_what_the_adapters_sample_and_restores_the_weights(tiny_model_path):
    policy = trained_lora_policy()
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    prompts = ["What is 2 + 3?", "What is 7 * 38?", "What is 41 + 9?"]
    out = {}
    for fold in (True, False):
        torch.manual_seed(5)
        out[fold] = generate(policy.model, policy.tokenizer, prompts,
                             Sampling(max_new_tokens=40, samples_per_prompt=8, fold_lora=fold))
    assert out[True].texts == out[False].texts
    assert torch.equal(out[True].input_ids, out[False].input_ids)
    # the adapters changed what is sampled (so the fold had something to fold)
    base = load_policy(ModelSpec(name="builtin:tiny-math", dtype="float32"), kl_beta=0.0)
    torch.manual_seed(5)
    assert generate(base.model, base.tokenizer, prompts, Sampling(max_new_tokens=40, samples_per_prompt=8)).texts != out[True].texts
    # every weight, base and adapter, is bit for bit what it was, and the adapters are on again
    after = policy.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not layer.disable_adapters for layer in foldable_lora_layers(policy.model))
    assert all(p.requires_grad for n, p in policy.model.named_parameters() if "lora_" in n)


def test_the_folded_model_computes_what_the_adapters_compute(tiny_model_path):
    policy = trained_lora_policy()
    ids = policy.tokenizer(["What is 2 + 3?"], return_tensors="pt")["input_ids"]
    policy.model.eval()
    with torch.no_grad():
        adapted = policy.model(input_ids=ids).logits
        with folded_lora(policy.model):
            folded = policy.model(input_ids=ids).logits
        with policy.reference():
            reference = policy.model(input_ids=ids).logits
    torch.testing.assert_close(folded, adapted, rtol=1e-5, atol=1e-5)
    assert (adapted - reference).abs().max() > 1e-2  # what was folded is not nothing


def test_sixteen_bit_weights_are_not_folded(tiny_model_path):
    # W + s*B@A in bfloat16 would round a small adapter update away
    assert foldable_lora_layers(trained_lora_policy(dtype="bfloat16").model) == []
    assert len(foldable_lora_layers(trained_lora_policy(dtype="float32").model)) > 0


# --- the sampler's log-probs (Rollout.sampler_logp) against the training forward's ---------------------------

PATHS = {"lean decoder, LoRA folded": {}, "lean decoder, adapters unfolded": {"fold_lora": False},
         "transformers cache": {"lean": False}, "transformers generate": {"engine": "generate"}}


def _trainer_logp(policy, rollout, temperature):
    from grpo_cli.model.logprobs import completion_logprobs

    with torch.no_grad():
        return completion_logprobs(policy.model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len,
                                   temperature)  # [N, C]


def _sampled(policy, path: dict, temperature=0.7, top_p=1.0, seed=5):
    prompts = ["What is 2 + 3?", "Solve x^2 - 5x + 6 = 0.", "What is 7 * 38?", "What is 41 + 9?"]
    torch.manual_seed(seed)
    return generate(policy.model, policy.tokenizer, prompts,
                    Sampling(max_new_tokens=40, samples_per_prompt=6, temperature=temperature, top_p=top_p, **path))


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
def test_the_sampler_records_the_log_prob_the_training_forward_gives_each_token(tiny_model_path, path):
    """In float32 the two computations agree to rounding: every token's recorded log-prob, at a temperature
    that is not 1 (so one taken before the temperature would differ), is the training forward's at the
    same position (one taken a position off would differ by far more)."""
    policy = trained_lora_policy()
    rollout = _sampled(policy, path)
    mask = rollout.action_mask.bool()
    assert int(mask.sum()) > 300
    trainer = _trainer_logp(policy, rollout, 0.7)
    gap = (trainer - rollout.sampler_logp)[mask].abs()
    assert gap.max() < 1e-4, f"largest gap {gap.max():.2e}"
    assert (rollout.sampler_logp[~mask] == 0).all()  # nothing recorded past the ends
    assert (rollout.sampler_logp[mask] < 0).all()


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
def test_with_top_p_the_recorded_log_prob_is_that_of_the_truncated_distribution(tiny_model_path, path):
    """Top-p is part of how the sampler draws: it renormalizes over the nucleus, so each drawn token is at
    least as likely to the sampler as to the policy, and exactly as the warper's renormalized distribution says."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from grpo_cli.model.calls import position_ids

    policy = trained_lora_policy()
    rollout = _sampled(policy, path, top_p=0.8)
    mask = rollout.action_mask.bool()
    trainer = _trainer_logp(policy, rollout, 0.7)
    assert ((rollout.sampler_logp - trainer)[mask] > -1e-4).all()
    assert ((rollout.sampler_logp - trainer)[mask] > 1e-3).any()  # the nucleus cut something somewhere
    with torch.no_grad():
        logits = policy.model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                              position_ids=position_ids(rollout.attention_mask)).logits[:, rollout.prompt_len - 1 : -1]
    warped = TopPLogitsWarper(0.8)(None, logits.float().reshape(-1, logits.shape[-1]) / 0.7).view_as(logits)
    expected = warped.log_softmax(-1).gather(-1, rollout.completion_ids[..., None]).squeeze(-1)  # [N, C]
    assert (expected - rollout.sampler_logp)[mask].abs().max() < 1e-4


@pytest.mark.parametrize("path", [PATHS["lean decoder, LoRA folded"], PATHS["transformers cache"]],
                         ids=["lean decoder, LoRA folded", "transformers cache"])
def test_after_the_adapters_change_the_sampler_samples_from_the_new_ones(tiny_model_path, path):
    """A fold (or fused weights) kept from an earlier rollout would sample from the old adapters: after an
    update-like change to every lora_B, the recorded log-probs still match the training forward's."""
    policy = trained_lora_policy()
    _sampled(policy, path)
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.05)
    rollout = _sampled(policy, path, seed=6)
    gap = (_trainer_logp(policy, rollout, 0.7) - rollout.sampler_logp)[rollout.action_mask.bool()].abs()
    assert gap.max() < 1e-4, f"largest gap {gap.max():.2e}"
