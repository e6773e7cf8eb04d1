import copy

import pytest
import torch

from grpo_cli.model import logprobs
from grpo_cli.model.logprobs import chunk_tokens_for, completion_logprobs
from grpo_cli.model.calls import position_ids
from grpo_cli.model.loading import load_policy
from grpo_cli.config.recipe import ModelSpec
from grpo_cli.rollout.sampling import generate
from grpo_cli.rollout.settings import Sampling


@pytest.fixture(scope="module")
def policy(tiny_model_path):
    policy = load_policy(ModelSpec(name="builtin:tiny-math", dtype="float32"), kl_beta=0.0)
    with torch.no_grad():  # give the adapters a non-zero effect
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return policy


@pytest.fixture(scope="module")
def rollout(policy):
    torch.manual_seed(0)
    prompts = ["What is 2 + 3?", "Solve x^2 - 5x + 6 = 0."]  # different lengths: left padding
    return generate(policy.model, policy.tokenizer, prompts,
                    Sampling(max_new_tokens=12, samples_per_prompt=2, temperature=0.7))


def full_logits_reference(model, rollout, temperature):
    ids, mask = rollout.input_ids, rollout.attention_mask
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits.float() / temperature
    logp = logits.log_softmax(-1)[:, rollout.prompt_len - 1 : -1]
    return logp.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)


def test_chunked_equals_full_logits(policy, rollout):
    with torch.no_grad():
        expected = full_logits_reference(policy.model, rollout, 0.7)
        for chunk in (1, 5, 10_000):
            got = completion_logprobs(policy.model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len,
                                      temperature=0.7, chunk_tokens=chunk)
            mask = rollout.completion_mask.bool()
            assert torch.allclose(got[mask], expected[mask], atol=1e-5)


def test_chunk_shrinks_with_the_vocabulary():
    assert chunk_tokens_for(101) == 1024  # the builtin model: the token cap
    assert chunk_tokens_for(151936) == 220  # Qwen2.5: 2**25 // 151936 logits per chunk
    assert chunk_tokens_for(10**8) == 16  # never fewer than 16 tokens


def test_automatic_chunks_follow_the_logit_budget(policy, rollout, monkeypatch):
    vocab = policy.model.get_base_model().get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(logprobs, "CHUNK_LOGITS", vocab * 20)  # 20 tokens per chunk
    rows = []
    hook = policy.model.get_base_model().get_output_embeddings().register_forward_hook(
        lambda module, args, out: rows.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            got = completion_logprobs(policy.model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len)
    finally:
        hook.remove()
    with torch.no_grad():
        expected = full_logits_reference(policy.model, rollout, 1.0)
    assert rows[:-1] == [20] * (len(rows) - 1) and 0 < rows[-1] <= 20 and sum(rows) == rollout.completion_mask.numel()
    mask = rollout.completion_mask.bool()
    assert torch.allclose(got[mask], expected[mask], atol=1e-5)


def test_matches_what_generation_sampled_from(policy):
    # The training pass must see the distribution the rollout sampled from (same positions under left
    # padding, same temperature); otherwise the ratio is not 1 at the first update.
    torch.manual_seed(1)
    enc = policy.tokenizer(["What is 2 + 3?", "Solve x^2 - 5x + 6 = 0."], return_tensors="pt", padding=True)
    policy.model.eval()
    with torch.no_grad():
        out = policy.model.generate(**enc, max_new_tokens=8, do_sample=True, temperature=0.7, top_k=0,
                                    output_logits=True, return_dict_in_generate=True,
                                    pad_token_id=policy.tokenizer.pad_token_id, eos_token_id=[])
        seq = out.sequences
        prompt_len = enc["input_ids"].shape[1]
        sampled = seq[:, prompt_len:]
        step_logits = torch.stack(out.logits, dim=1).float() / 0.7
        expected = step_logits.log_softmax(-1).gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
        mask = torch.cat([enc["attention_mask"], torch.ones_like(sampled)], dim=1)
        got = completion_logprobs(policy.model, seq, mask, prompt_len, temperature=0.7)
    assert torch.allclose(got, expected, atol=1e-4)


def test_gradients_do_not_depend_on_the_chunk(policy, rollout):
    grads = []
    for chunk in (3, 10_000):
        policy.model.zero_grad()
        logp = completion_logprobs(policy.model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len,
                                   chunk_tokens=chunk)
        (logp * rollout.completion_mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.trainable_parameters()]))
    policy.model.zero_grad()
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_models_that_postprocess_logits_take_the_full_forward(policy, rollout):
    config = policy.model.get_base_model().config
    head_inputs = {}  # per path, the shape of what the output head was called on
    head = policy.model.get_base_model().get_output_embeddings()
    calls = []
    handle = head.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    try:
        with torch.no_grad():
            fast = completion_logprobs(policy.model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len)
            head_inputs["fast"], calls[:] = list(calls), []
            config.final_logit_softcapping = 30.0  # Llama ignores it, so both paths must agree
            try:
                slow = completion_logprobs(policy.model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len)
            finally:
                config.final_logit_softcapping = None
            head_inputs["slow"] = list(calls)
    finally:
        handle.remove()
    n, c = rollout.completion_ids.shape
    # the plain path feeds the head chunks of completion states; the other runs the model's own
    # forward, its head over every completion position at once (and the prompt's last)
    assert head_inputs["fast"] and all(len(shape) == 2 for shape in head_inputs["fast"])
    assert head_inputs["slow"] == [(n, c + 1, head.in_features)]
    mask = rollout.completion_mask.bool()
    assert torch.allclose(fast[mask], slow[mask], atol=1e-5)


def test_shared_prompt_pass_equals_the_plain_pass(policy):
    from grpo_cli.update.batching import split
    from grpo_cli.model.logprobs import micro_batch_logprobs

    torch.manual_seed(2)
    rollout = generate(policy.model, policy.tokenizer, ["What is 2 + 3?", "Solve x^2 - 5x + 6 = 0.", "What is 7 * 8?"],
                       Sampling(max_new_tokens=20, samples_per_prompt=4))
    model = copy.deepcopy(policy.model).double()  # so the two summation orders agree far below any real error
    for micro in split(rollout, max_rows=5, spread=0.75):
        mask = micro.completion_mask.bool()
        values, grads, entropies = [], [], []
        for shared in (True, False):
            model.zero_grad()
            logp, entropy = micro_batch_logprobs(model, micro, temperature=0.8, shared_prompts=shared,
                                                 with_entropy=True)
            (logp * micro.completion_mask).sum().backward()
            entropies.append(entropy[mask].detach())
            values.append(logp[mask].detach())
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
        torch.testing.assert_close(values[0], values[1], atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(entropies[0], entropies[1], atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_one_prompt_pass_for_the_step_equals_one_per_micro_batch(policy):
    # The step's prompts run once; each micro-batch continues from that pass, and the prompt pass's
    # backward runs once with the gradients all micro-batches sent it.
    from grpo_cli.update.batching import split
    from grpo_cli.model.logprobs import as_leaves, backward_into_prompts, micro_batch_logprobs, step_prompts

    torch.manual_seed(3)
    rollout = generate(policy.model, policy.tokenizer, ["What is 2 + 3?", "Solve x^2 - 5x + 6 = 0.", "What is 7 * 8?"],
                       Sampling(max_new_tokens=20, samples_per_prompt=4))
    batches = split(rollout, max_rows=5, spread=0.75)
    assert len(batches) >= 3 and all(len(set(b.groups.tolist())) > 1 for b in batches[:1])
    model = copy.deepcopy(policy.model).double()  # so the two summation orders agree far below any real error
    results = {}
    for step_level in (True, False):
        model.zero_grad()
        states = step_prompts(model, rollout) if step_level else None
        leaves = as_leaves(states) if step_level else None
        values = []
        for micro in batches:
            logp, _ = micro_batch_logprobs(model, micro, temperature=0.8, prompts=leaves, with_entropy=True)
            (logp * micro.completion_mask * torch.linspace(0.5, 1.5, logp.shape[1])).sum().backward()
            values.append(logp[micro.completion_mask.bool()].detach())
        if step_level:
            assert all(leaf.grad is not None for leaf in leaves.tensors())
            backward_into_prompts(states, leaves)
        results[step_level] = (torch.cat(values),
                               torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(results[True][1], results[False][1], atol=1e-6, rtol=1e-5)


def test_the_head_never_sees_more_than_a_chunk(policy, rollout):
    # The [batch, length, vocab] logits never exist at once: each head call covers at most one chunk.
    seen = []
    head = policy.model.get_base_model().get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, output: seen.append(tuple(output.shape)))
    try:
        logp = completion_logprobs(policy.model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len,
                                   chunk_tokens=7)
        (logp * rollout.completion_mask).sum().backward()  # the backward rebuilds chunk by chunk
    finally:
        handle.remove()
        policy.model.zero_grad()
    n, c = rollout.completion_ids.shape
    assert seen and max(rows for rows, _ in seen) <= 7
    assert sum(rows for rows, _ in seen) == 2 * n * c  # forward once, recomputed once in backward


def test_entropy_matches_the_full_distribution(policy, rollout):
    from grpo_cli.model.logprobs import _completion_pass

    with torch.no_grad():
        logp, entropy = _completion_pass(policy.model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len,
                                         0.7, 5, True)
        logits = policy.model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                              position_ids=position_ids(rollout.attention_mask)).logits.float() / 0.7
        dist = torch.distributions.Categorical(logits=logits[:, rollout.prompt_len - 1 : -1])
    mask = rollout.completion_mask.bool()
    assert torch.allclose(entropy[mask], dist.entropy()[mask], atol=1e-5)
    assert torch.allclose(logp[mask], dist.log_prob(rollout.completion_ids)[mask], atol=1e-5)


def test_entropy_carries_gradients_only_when_trained_on(policy, rollout):
    """As a metric the entropy has no graph: under the chunk checkpoints a recomputed branch that
    backward never reaches would keep a chunk of [K, V] tensors alive per chunk until the end."""
    from grpo_cli.model.logprobs import _completion_pass

    out = {}
    for grad in (False, True):
        policy.model.zero_grad()
        logp, entropy = _completion_pass(policy.model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len,
                                         0.7, 5, True, entropy_grad=grad)
        assert entropy.requires_grad == grad
        (logp * rollout.completion_mask).sum().backward()
        out[grad] = (logp.detach(), entropy.detach(),
                     torch.cat([p.grad.flatten() for p in policy.trainable_parameters()]))
    policy.model.zero_grad()
    for plain, trained in zip(out[False], out[True]):
        torch.testing.assert_close(plain, trained)
