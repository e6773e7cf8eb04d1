import copy

import pytest
import torch
from conftest import trained_lora_policy

from grpo_cli import lora_linear
from grpo_cli.logprobs import completion_logprobs
from grpo_cli.modeling import load_policy, lora_layers
from grpo_cli.recipe import ModelSpec


def lora_policy(**lora):
    return trained_lora_policy(lora={"r": 8, "alpha": 16, **lora})


def logprobs_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    mask = torch.ones_like(ids)
    logp = completion_logprobs(model, ids, mask, prompt_len=4)  # [N, C]
    (logp * torch.linspace(0.5, 1.5, logp.shape[1])).sum().backward()
    return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_same_values_and_gradients_as_peft():
    # in float64, so the two summation orders agree far below any error of the formula
    policy = lora_policy()
    policy.model.double()
    plain = copy.deepcopy(policy.model)
    assert lora_linear.install(policy.model) == len(lora_layers(policy.model)) == 28  # 7 projections x 4 layers
    ids = policy.tokenizer(["What is 2 + 3? #### 5", "What is 7 * 8? 7*8=56"], return_tensors="pt",
                           padding=True)["input_ids"]
    fused_logp, fused_grads = logprobs_and_grads(policy.model, ids)
    peft_logp, peft_grads = logprobs_and_grads(plain, ids)
    torch.testing.assert_close(fused_logp, peft_logp, rtol=1e-6, atol=1e-6)
    assert fused_grads.keys() == peft_grads.keys() and len(fused_grads) == 56
    for name in peft_grads:
        assert peft_grads[name].abs().max() > 0, name  # every adapter weight got a gradient to compare
        torch.testing.assert_close(fused_grads[name], peft_grads[name], rtol=1e-6, atol=1e-9)


def test_a_deep_copy_runs_its_own_weights():
    policy = lora_policy()
    lora_linear.install(policy.model)
    twin = copy.deepcopy(policy.model)
    with torch.no_grad():
        for name, param in twin.named_parameters():
            if "lora_B" in name:
                param.zero_()
    ids = policy.tokenizer(["What is 2 + 3?"], return_tensors="pt")["input_ids"]
    assert not torch.allclose(twin(input_ids=ids).logits, policy.model(input_ids=ids).logits)


def test_the_reference_pass_and_sampling_are_peft_s():
    policy = lora_policy()
    lora_linear.install(policy.model)
    ids = policy.tokenizer(["What is 2 + 3?"], return_tensors="pt")["input_ids"]
    with torch.no_grad(), policy.reference():
        reference = policy.model(input_ids=ids).logits
    base = load_policy(ModelSpec(name="builtin:tiny-math", dtype="float32"), kl_beta=0.0)
    with torch.no_grad():
        torch.testing.assert_close(reference, base.model(input_ids=ids).logits)


@pytest.mark.parametrize("lora", [{"dropout": 0.1}])
def test_layers_peft_computes_differently_are_left_alone(lora):
    assert lora_linear.install(lora_policy(**lora).model) == 0


def test_with_activation_checkpointing_the_gradients_are_the_same(monkeypatch):
    # the GPU recipes recompute each layer in backward; our function must survive the recomputation
    from grpo_cli.logprobs import can_share_prompts

    calls = []
    apply = lora_linear._LoraLinear.apply
    monkeypatch.setattr(lora_linear._LoraLinear, "apply", lambda *a: calls.append(1) or apply(*a))
    grads = {}
    for checkpointing in (False, True):
        policy = trained_lora_policy(gradient_checkpointing=checkpointing)
        assert can_share_prompts(policy.model) is not checkpointing  # checkpointing is on where asked
        assert lora_linear.install(policy.model) == 28
        policy.model.train()
        ids = policy.tokenizer(["What is 2 + 3? #### 5", "What is 7 * 8? 7*8=56"], return_tensors="pt",
                               padding=True)["input_ids"]
        calls.clear()
        grads[checkpointing] = logprobs_and_grads(policy.model, ids)[1]
        assert len(calls) == (56 if checkpointing else 28)  # recomputed in backward under checkpointing
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-5, atol=1e-7)
