import math

import pytest
import torch

from grpo_cli.loss import grpo_loss, k3_kl


def _one_token(logp, old, adv, eps=0.2, ref=None, beta=0.0):
    return grpo_loss(
        torch.tensor([[logp]], requires_grad=True), torch.tensor([[old]]), torch.tensor([adv]),
        torch.ones(1, 1), eps, None if ref is None else torch.tensor([[ref]]), beta,
    )


def test_ratio_one_loss_is_minus_advantage():
    terms = _one_token(-1.0, -1.0, 0.5)
    assert terms.per_completion.item() == pytest.approx(-0.5)
    assert terms.clipped_tokens.item() == 0


def test_clipping_binds_above_for_positive_advantage():
    # ratio = e^0.5 = 1.6487 > 1.2: min(1.6487*2, 1.2*2) = 2.4
    terms = _one_token(0.0, -0.5, 2.0)
    assert terms.per_completion.item() == pytest.approx(-2.4)
    assert terms.clipped_tokens.item() == 1
    terms.per_completion.sum().backward()


def test_clipping_binds_below_for_negative_advantage():
    # ratio = e^-0.5 = 0.6065 < 0.8: min(0.6065*-1, 0.8*-1) = -0.8
    terms = _one_token(-0.5, 0.0, -1.0)
    assert terms.per_completion.item() == pytest.approx(0.8)
    assert terms.clipped_tokens.item() == 1


def test_no_clipping_in_the_direction_that_lowers_the_objective():
    # positive advantage, ratio below 1 - eps: the unclipped (smaller) term is kept
    ratio = math.exp(-0.5)
    terms = _one_token(-0.5, 0.0, 1.0)
    assert terms.per_completion.item() == pytest.approx(-ratio)
    assert terms.clipped_tokens.item() == 0
    # negative advantage, ratio above 1 + eps: unclipped again
    terms = _one_token(0.5, 0.0, -1.0)
    assert terms.per_completion.item() == pytest.approx(math.exp(0.5))


def test_clipped_gradient_is_zero():
    logp = torch.tensor([[0.0]], requires_grad=True)
    grpo_loss(logp, torch.tensor([[-0.5]]), torch.tensor([2.0]), torch.ones(1, 1), 0.2).per_completion.sum().backward()
    assert logp.grad.item() == 0.0


def test_unclipped_gradient_is_minus_ratio_times_advantage():
    logp = torch.tensor([[-0.1]], requires_grad=True)
    grpo_loss(logp, torch.tensor([[0.0]]), torch.tensor([3.0]), torch.ones(1, 1), 0.2).per_completion.sum().backward()
    assert logp.grad.item() == pytest.approx(-math.exp(-0.1) * 3.0)


def test_k3_hand_values():
    # ref - logp = d: kl = e^d - d - 1
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.0, -1.0, -1.5]])
    expected = [0.0, math.e - 1 - 1, math.exp(-1) + 1 - 1]
    assert k3_kl(logp, ref)[0].tolist() == pytest.approx(expected)


def test_k3_is_never_negative():
    generator = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(50, 20, generator=generator), torch.randn(50, 20, generator=generator)
    assert (k3_kl(logp, ref) >= 0).all()


def test_kl_penalty_enters_the_loss_with_beta():
    # ratio 1, advantage 0: loss = beta * kl = 0.5 * (e^1 - 1 - 1)
    terms = _one_token(-2.0, -2.0, 0.0, ref=-1.0, beta=0.5)
    assert terms.per_completion.item() == pytest.approx(0.5 * (math.e - 2))
    assert terms.kl.item() == pytest.approx(math.e - 2)


def test_each_completion_is_averaged_over_its_own_tokens():
    # completion 0 has 1 token, completion 1 has 3: each gets weight 1 in the batch, not by length
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    terms = grpo_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), mask, 0.2)
    assert terms.per_completion.tolist() == pytest.approx([-1.0, 1.0])
    assert terms.tokens.item() == 4
    terms.per_completion.sum().backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-1.0, 0.0, 0.0, 1 / 3, 1 / 3, 1 / 3])


def test_micro_batches_add_up_to_the_full_batch_gradient():
    generator = torch.Generator().manual_seed(1)
    logp = torch.randn(8, 5, generator=generator, requires_grad=True)
    old = logp.detach() + 0.3 * torch.randn(8, 5, generator=generator)
    ref = logp.detach() + 0.1 * torch.randn(8, 5, generator=generator)
    adv = torch.randn(8, generator=generator)
    mask = (torch.rand(8, 5, generator=generator) > 0.3).long()
    mask[:, 0] = 1
    (grpo_loss(logp, old, adv, mask, 0.2, ref, 0.04).per_completion.sum() / 8).backward()
    full = logp.grad.clone()
    logp.grad = None
    for part in (slice(0, 4), slice(4, 8)):
        (grpo_loss(logp[part], old[part], adv[part], mask[part], 0.2, ref[part], 0.04).per_completion.sum() / 8).backward()
    assert torch.allclose(logp.grad, full, atol=1e-6)


def test_clipping_never_increases_the_objective():
    generator = torch.Generator().manual_seed(2)
    for _ in range(20):
        logp = torch.randn(4, 6, generator=generator)
        old = torch.randn(4, 6, generator=generator)
        adv = torch.randn(4, generator=generator)
        mask = torch.ones(4, 6)
        clipped = -grpo_loss(logp, old, adv, mask, 0.2).per_completion
        unclipped = -grpo_loss(logp, old, adv, mask, 1e6).per_completion
        assert (clipped <= unclipped + 1e-6).all()
