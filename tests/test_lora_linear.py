import copy

import pytest
import torch
from conftest import trained_lora_policy

from grpo_cli.model import lora_linear
from grpo_cli.model.logprobs import completion_logprobs
from grpo_cli.model.loading import load_policy, lora_layers
from grpo_cli.config.recipe import ModelSpec


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


def saved_for_backward_bytes(model, ids) -> int:
    """Bytes of the distinct storages autograd keeps for backward after one forward pass."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        completion_logprobs(model, ids, torch.ones_like(ids), prompt_len=4)
    return sum(storages.values())


def test_16_bit_weights_with_float32_adapters_as_peft_computes_them():
    # PEFT's default with bfloat16 weights: adapters in float32, their arithmetic in float32.
    policy = trained_lora_policy(dtype="bfloat16", lora={"r": 8, "alpha": 16})
    assert {p.dtype for n, p in policy.model.named_parameters() if "lora_" in n} == {torch.float32}
    plain, exact = copy.deepcopy(policy.model), copy.deepcopy(policy.model).double()
    assert lora_linear.install(policy.model) == 28
    ids = policy.tokenizer(["What is 2 + 3? #### 5", "What is 7 * 8? 7*8=56"] * 8, return_tensors="pt",
                           padding=True)["input_ids"]
    fused_logp, fused_grads = logprobs_and_grads(policy.model, ids)
    peft_logp, peft_grads = logprobs_and_grads(plain, ids)
    exact_logp, exact_grads = logprobs_and_grads(exact, ids)
    torch.testing.assert_close(fused_logp, peft_logp)  # the forward is the same arithmetic

    def error(grads, name):
        return ((grads[name].double() - exact_grads[name]).norm() / exact_grads[name].norm()).item()

    for name in peft_grads:  # gradients: summed in another order, as close to float64's as PEFT's are
        assert fused_grads[name].dtype == torch.float32
        assert error(fused_grads, name) <= 1.2 * error(peft_grads, name) + 1e-3, name
    # x is kept once in 16 bits for the projections that share it, not in float32 per adapter
    assert saved_for_backward_bytes(policy.model, ids) < 0.75 * saved_for_backward_bytes(plain, ids)


def test_one_16_bit_layer_matches_peft_s_to_rounding():
    # the model-level test above sits at bfloat16's noise; one layer shows the arithmetic itself
    policy = trained_lora_policy(dtype="bfloat16", lora={"r": 8, "alpha": 16})
    plain = lora_layers(policy.model)[0]
    fused = copy.deepcopy(plain)
    assert lora_linear.install(fused) == 1
    torch.manual_seed(0)
    x = torch.randn(3, 5, plain.in_features, dtype=torch.bfloat16)
    grad_out = torch.randn(3, 5, plain.out_features, dtype=torch.bfloat16)
    results = []
    for layer in (plain, fused):
        x_in = x.clone().requires_grad_()
        out = layer(x_in)
        out.backward(grad_out)
        adapter = layer.active_adapters[0]
        results.append((out, x_in.grad, layer.lora_A[adapter].weight.grad, layer.lora_B[adapter].weight.grad))
    for peft_value, fused_value in zip(*results):
        assert fused_value.dtype == peft_value.dtype
        tolerance = {"rtol": 1e-5, "atol": 1e-6} if peft_value.dtype == torch.float32 else {}
        torch.testing.assert_close(fused_value, peft_value, **tolerance)


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
    from grpo_cli.model.logprobs import can_share_prompts

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
