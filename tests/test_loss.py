"""The loss variants against hand-computed values."""

import dataclasses
import math

import pytest
import torch

from grpo_cli.update.loss import LOSSES, SURROGATE_LOSSES, LossSettings, dapo, dr_grpo, grpo, gspo, k3_kl
from grpo_cli.config.recipe import RecipeError, validate

S = LossSettings(clip_low=0.2, clip_high=0.2)


def settings_with(**changes) -> LossSettings:
    """S with some settings changed, by name."""
    return dataclasses.replace(S, **changes)


def _one_token(logp, old, adv, settings=S, ref=None, fn=grpo):
    return fn(torch.tensor([[logp]], requires_grad=True), torch.tensor([[old]]), torch.tensor([adv]),
              torch.ones(1, 1), settings, None if ref is None else torch.tensor([[ref]]))


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_registered_loss_is_a_recipe_choice_and_trains_on_a_small_batch(name):
    loss = LOSSES[validate({"grpo": {"loss": name}}).grpo.loss]
    logp = LOGP.clone().requires_grad_(True)
    step = settings_with(kl_beta=0.1, entropy_bonus=0.01, step_completions=2, step_tokens=4, max_new_tokens=3)
    terms = loss(logp, logp.detach() - 0.1, ADV, MASK, step, ref_logp=torch.full((2, 3), -0.2),
                 entropy=torch.ones(2, 3))
    terms.per_completion.sum().backward()
    assert terms.per_completion.shape == (2,) and torch.isfinite(terms.per_completion).all()
    assert terms.kl.shape == (2,) and terms.tokens.item() == 4
    assert (logp.grad[MASK == 0] == 0).all() and (logp.grad[MASK == 1] != 0).all()  # padding takes no part


@pytest.mark.parametrize("name", SURROGATE_LOSSES)
def test_a_completion_with_advantage_0_adds_nothing_without_kl_or_entropy(name):
    """What lets the update skip such completions (train.rows_with_gradient): its gradient is exactly 0, while
    the other completion's, its ratio inside the clip range, is not."""
    logp = LOGP.clone().requires_grad_(True)
    step = settings_with(step_completions=2, step_tokens=4, max_new_tokens=3)
    terms = LOSSES[name](logp, logp.detach() - 0.05, torch.tensor([0.0, 1.5]), MASK, step)  # ratio 1.05: unclipped
    terms.per_completion.sum().backward()
    assert (logp.grad[0] == 0).all() and (logp.grad[1][MASK[1] == 1] != 0).all()


def test_an_unknown_loss_is_refused_with_the_names_it_could_be():
    with pytest.raises(RecipeError) as error:
        validate({"grpo": {"loss": "dpo"}})
    message = str(error.value)
    assert "grpo.loss: Input should be " in message and "(got 'dpo')" in message
    assert all(f"'{name}'" in message for name in LOSSES)


def test_ratio_one_loss_is_minus_advantage():
    terms = _one_token(-1.0, -1.0, 0.5)
    assert terms.per_completion.item() == pytest.approx(-0.5)
    assert terms.clipped_tokens.item() == 0


def test_clipping_binds_above_for_positive_advantage():
    # ratio = e^0.5 = 1.6487 > 1.2: min(1.6487*2, 1.2*2) = 2.4
    terms = _one_token(0.0, -0.5, 2.0)
    assert terms.per_completion.item() == pytest.approx(-2.4)
    assert terms.clipped_tokens.item() == 1


def test_clipping_binds_below_for_negative_advantage():
    # ratio = e^-0.5 = 0.6065 < 0.8: min(0.6065*-1, 0.8*-1) = -0.8
    terms = _one_token(-0.5, 0.0, -1.0)
    assert terms.per_completion.item() == pytest.approx(0.8)
    assert terms.clipped_tokens.item() == 1


def test_no_clipping_in_the_direction_that_lowers_the_objective():
    terms = _one_token(-0.5, 0.0, 1.0)  # positive advantage, ratio below 1 - eps: unclipped term kept
    assert terms.per_completion.item() == pytest.approx(-math.exp(-0.5))
    assert terms.clipped_tokens.item() == 0
    terms = _one_token(0.5, 0.0, -1.0)  # negative advantage, ratio above 1 + eps: unclipped again
    assert terms.per_completion.item() == pytest.approx(math.exp(0.5))


def test_clip_higher_lets_positive_ratios_rise_to_one_plus_eps_high():
    # ratio e^0.22 = 1.246: clipped at 1.2 with symmetric eps, free under eps_high = 0.28
    symmetric = _one_token(0.22, 0.0, 1.0)
    higher = _one_token(0.22, 0.0, 1.0, settings_with(clip_high=0.28))
    assert symmetric.per_completion.item() == pytest.approx(-1.2)
    assert higher.per_completion.item() == pytest.approx(-math.exp(0.22))
    # and caps at 1 + eps_high beyond it
    assert _one_token(0.5, 0.0, 1.0, settings_with(clip_high=0.28)).per_completion.item() == pytest.approx(-1.28)
    # the lower clip is unchanged: negative advantage, ratio 0.6065 -> 0.8
    assert _one_token(-0.5, 0.0, -1.0, settings_with(clip_high=0.28)).per_completion.item() == pytest.approx(0.8)


def test_clipped_gradient_is_zero_and_unclipped_is_minus_ratio_times_advantage():
    logp = torch.tensor([[0.0]], requires_grad=True)
    grpo(logp, torch.tensor([[-0.5]]), torch.tensor([2.0]), torch.ones(1, 1), S).per_completion.sum().backward()
    assert logp.grad.item() == 0.0
    logp = torch.tensor([[-0.1]], requires_grad=True)
    grpo(logp, torch.tensor([[0.0]]), torch.tensor([3.0]), torch.ones(1, 1), S).per_completion.sum().backward()
    assert logp.grad.item() == pytest.approx(-math.exp(-0.1) * 3.0)


def test_k3_hand_values_and_sign():
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.0, -1.0, -1.5]])
    assert k3_kl(logp, ref)[0].tolist() == pytest.approx([0.0, math.e - 2, math.exp(-1)])
    generator = torch.Generator().manual_seed(0)
    assert (k3_kl(torch.randn(50, 20, generator=generator), torch.randn(50, 20, generator=generator)) >= 0).all()


def test_kl_penalty_enters_the_loss_with_beta():
    # ratio 1, advantage 0: loss = beta * kl = 0.5 * (e^1 - 1 - 1)
    terms = _one_token(-2.0, -2.0, 0.0, settings_with(kl_beta=0.5), ref=-1.0)
    assert terms.per_completion.item() == pytest.approx(0.5 * (math.e - 2))
    assert terms.kl.item() == pytest.approx(math.e - 2)


def test_entropy_bonus_is_added_to_the_objective():
    logp = torch.zeros(1, 2, requires_grad=True)
    entropy = torch.tensor([[1.0, 3.0]])
    terms = grpo(logp, logp.detach(), torch.tensor([0.0]), torch.ones(1, 2), settings_with(entropy_bonus=0.1),
                 entropy=entropy)
    assert terms.per_completion.item() == pytest.approx(-0.1 * 2.0)  # minus bonus x token-mean entropy


# A hand-built batch with a length bias: completion 0 is short (1 token), completion 1 long (3 tokens),
# equal and opposite advantages, ratio 1 everywhere.
LOGP = torch.zeros(2, 3)
MASK = torch.tensor([[1, 0, 0], [1, 1, 1]])
ADV = torch.tensor([1.0, -1.0])


def shares(fn, settings):
    logp = LOGP.clone().requires_grad_(True)
    terms = fn(logp, logp.detach(), ADV, MASK, settings)
    terms.per_completion.sum().backward()
    return terms.per_completion.tolist(), logp.grad.flatten().tolist()


def test_grpo_averages_per_completion_then_over_completions():
    values, grad = shares(grpo, settings_with(step_completions=2))
    assert values == pytest.approx([-0.5, 0.5])
    # the short completion's token gets weight 1/(1*2); each long one 1/(3*2): GRPO's length bias
    assert grad == pytest.approx([-0.5, 0, 0, 1 / 6, 1 / 6, 1 / 6])


def test_dapo_averages_over_all_tokens_of_the_step():
    values, grad = shares(dapo, settings_with(step_completions=2, step_tokens=4))
    assert values == pytest.approx([-1 / 4, 3 / 4])
    assert grad == pytest.approx([-0.25, 0, 0, 0.25, 0.25, 0.25])  # every token weighs the same


def test_dr_grpo_divides_by_a_constant_budget():
    values, grad = shares(dr_grpo, settings_with(step_completions=2, max_new_tokens=5))
    assert values == pytest.approx([-1 / 10, 3 / 10])
    assert grad == pytest.approx([-0.1, 0, 0, 0.1, 0.1, 0.1])  # token weight independent of the length


def test_gspo_uses_one_clipped_ratio_per_sequence():
    # sequence 1: log ratios 0.5, 0, 0.1 over 3 tokens -> s = exp(0.2) = 1.2214, clipped to 1.2 with A = 1
    logp = torch.tensor([[0.5, 0.0, 0.1]], requires_grad=True)
    old = torch.zeros(1, 3)
    terms = gspo(logp, old, torch.tensor([1.0]), torch.ones(1, 3), settings_with(step_completions=1))
    assert terms.per_completion.item() == pytest.approx(-1.2)
    assert terms.clipped_tokens.item() == 3
    # inside the range the gradient is s x (1/|o|) for every token
    logp = torch.tensor([[0.1, 0.0, 0.2]], requires_grad=True)
    gspo(logp, old, torch.tensor([1.0]), torch.ones(1, 3), S).per_completion.sum().backward()
    s = math.exp(0.1)
    assert logp.grad.flatten().tolist() == pytest.approx([-s / 3] * 3)


def test_micro_batches_add_up_to_the_full_batch_gradient():
    generator = torch.Generator().manual_seed(1)
    logp = torch.randn(8, 5, generator=generator, requires_grad=True)
    old = logp.detach() + 0.3 * torch.randn(8, 5, generator=generator)
    ref = logp.detach() + 0.1 * torch.randn(8, 5, generator=generator)
    adv = torch.randn(8, generator=generator)
    mask = (torch.rand(8, 5, generator=generator) > 0.3).long()
    mask[:, 0] = 1
    step = settings_with(clip_high=0.28, kl_beta=0.04, step_completions=8, step_tokens=int(mask.sum()),
                         max_new_tokens=5)
    for fn in LOSSES.values():
        logp.grad = None
        fn(logp, old, adv, mask, step, ref).per_completion.sum().backward()
        full = logp.grad.clone()
        logp.grad = None
        for part in (slice(0, 3), slice(3, 8)):
            fn(logp[part], old[part], adv[part], mask[part], step, ref[part]).per_completion.sum().backward()
        assert torch.allclose(logp.grad, full, atol=1e-6), fn.__name__


def test_clipping_never_increases_the_objective():
    generator = torch.Generator().manual_seed(2)
    for fn in LOSSES.values():
        for _ in range(10):
            logp, old = torch.randn(4, 6, generator=generator), torch.randn(4, 6, generator=generator)
            adv, mask = torch.randn(4, generator=generator), torch.ones(4, 6)
            sizes = {"step_completions": 4, "step_tokens": 24, "max_new_tokens": 6}
            clipped = -fn(logp, old, adv, mask, settings_with(clip_high=0.28, **sizes)).per_completion
            free = -fn(logp, old, adv, mask, settings_with(clip_low=1e6, clip_high=1e6, **sizes)).per_completion
            assert (clipped <= free + 1e-6).all(), fn.__name__
