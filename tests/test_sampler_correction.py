"""The sampler/trainer mismatch figures and the correction's weights (update/sampler_correction.py), against
hand-computed numbers; every loss with the weights; micro-batches adding up; the recipe keys."""

import math

import pytest
import torch

from grpo_cli.config.recipe import RecipeError, validate
from grpo_cli.update import sampler_correction as sc
from grpo_cli.update.loss import LOSSES, LossSettings, dapo, dr_grpo, grpo, gspo
from grpo_cli.update.sampler_correction import Correction

# Two completions. Row 0: three tokens whose ratios pi_train / pi_sampler are 1, 0.4 and 4; row 1: two
# tokens at 1.5, then a position off the mask (its log-probs are junk and must count for nothing).
TRAINER = torch.log(torch.tensor([[0.5, 0.2, 0.4], [0.6, 0.3, 0.9]]))
SAMPLER = torch.log(torch.tensor([[0.5, 0.5, 0.1], [0.4, 0.2, 0.01]]))
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
GEOMETRIC = (1 * 0.4 * 4) ** (1 / 3)  # row 0's one ratio at the sequence level: 1.1696


def same(actual, expected) -> bool:
    """A tensor (or rows of numbers) equal to nested expected values, to float32 rounding."""
    return torch.allclose(torch.as_tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                          atol=1e-6, rtol=1e-5)


def k3(r):
    return r - 1 - math.log(r)


def test_the_ratios_and_the_token_level_weights():
    ratios = sc.log_ratios(TRAINER, SAMPLER, MASK).exp()
    assert ratios[MASK.bool()].tolist() == pytest.approx([1.0, 0.4, 4.0, 1.5, 1.5])
    tis = sc.weights(TRAINER, SAMPLER, MASK, Correction(method="tis", high=2.0))
    assert same(tis, [[1.0, 0.4, 2.0], [1.5, 1.5, 0.0]])  # capped at 2; 0 off the mask
    mask = sc.weights(TRAINER, SAMPLER, MASK, Correction(method="mask", low=0.5, high=2.0))
    assert same(mask, [[1.0, 0.0, 0.0], [1.5, 1.5, 0.0]])  # 0.4 and 4 leave [0.5, 2]
    assert same(sc.weights(TRAINER, SAMPLER, MASK, Correction(method="tis", high=3.0)),
                [[1.0, 0.4, 3.0], [1.5, 1.5, 0.0]])


def test_the_sequence_level_weighs_every_token_of_a_completion_by_its_geometric_mean_ratio():
    tis = sc.weights(TRAINER, SAMPLER, MASK, Correction(method="tis", level="sequence", high=1.1))
    assert same(tis, [[1.1, 1.1, 1.1], [1.1, 1.1, 0.0]])  # 1.1696 and 1.5 both capped
    mask = sc.weights(TRAINER, SAMPLER, MASK, Correction(method="mask", level="sequence", low=0.5, high=1.4))
    assert same(mask, [[GEOMETRIC] * 3, [0.0, 0.0, 0.0]])  # row 1's 1.5 leaves the band


def test_the_mismatch_figures():
    total = sc.combine(sc.mismatch_sums(TRAINER, SAMPLER, MASK, Correction(method="tis", high=2.0))[None])
    row = sc.figures(total, Correction(method="tis", high=2.0))
    assert row["sampler_kl"] == pytest.approx((k3(1) + k3(0.4) + k3(4) + 2 * k3(1.5)) / 5)
    assert row["sampler_kl_max"] == pytest.approx(k3(4))
    assert row["sampler_ratio_mean"] == pytest.approx(8.4 / 5)
    assert (row["sampler_ratio_min"], row["sampler_ratio_max"]) == pytest.approx((0.4, 4.0))
    assert row["sampler_ratio_outside"] == pytest.approx(2 / 5)  # 0.4 and 4
    assert row["sampler_corrected_frac"] == pytest.approx(1 / 5)  # only 4 was capped
    dropped = sc.figures(sc.mismatch_sums(TRAINER, SAMPLER, MASK, Correction(method="mask")), Correction(method="mask"))
    assert dropped["sampler_corrected_frac"] == pytest.approx(2 / 5)
    assert "sampler_corrected_frac" not in sc.figures(total, Correction())  # no correction, no such column


def test_a_gap_of_a_millionth_is_measured_not_rounded_to_zero():
    trainer = torch.full((1, 4), -2.0)
    sampler = trainer - 1e-6  # float32 holds the gap; float32 arithmetic would give k3 = 0
    row = sc.figures(sc.mismatch_sums(trainer, sampler, torch.ones(1, 4)), Correction())
    gap = float(trainer[0, 0].double() - sampler[0, 0].double())
    assert row["sampler_kl"] == pytest.approx(gap ** 2 / 2, rel=1e-3)
    assert 0 < row["sampler_kl"] < 1e-11


def test_micro_batches_and_processes_combine_to_the_whole():
    parts = [sc.mismatch_sums(TRAINER[i : i + 1], SAMPLER[i : i + 1], MASK[i : i + 1]) for i in range(2)]
    empty = sc.mismatch_sums(TRAINER[:0], SAMPLER[:0], MASK[:0])  # a process that ran no completion
    whole = sc.mismatch_sums(TRAINER, SAMPLER, MASK)
    assert torch.allclose(sc.combine(torch.stack([parts[0], empty, parts[1]])), whole)
    assert sc.figures(sc.combine(torch.stack([empty])), Correction()) == {}  # nothing measured: no columns


# --- the weights in every loss -------------------------------------------------------------------------------

SETTINGS = LossSettings(clip_low=0.2, clip_high=0.2, step_completions=2, step_tokens=5, max_new_tokens=4)
ADVANTAGES = torch.tensor([1.0, -1.0])
TIS = sc.weights(TRAINER, SAMPLER, MASK, Correction(method="tis", high=2.0))  # [[1, .4, 2], [1.5, 1.5, 0]]


def shares(fn, weights):
    """Each completion's share and d loss / d logp with ratio 1 (one update: logp = old)."""
    logp = TRAINER.clone().requires_grad_(True)
    terms = fn(logp, TRAINER, ADVANTAGES, MASK, SETTINGS, weights=weights)
    terms.per_completion.sum().backward()
    return terms.per_completion.tolist(), logp.grad.tolist()


def test_grpo_weighs_each_tokens_term():
    # row 0: -(1 x (1 + 0.4 + 2) / 3) / 2 completions; row 1: -(-1 x (1.5 + 1.5) / 2) / 2
    values, grad = shares(grpo, TIS)
    assert values == pytest.approx([-3.4 / 6, 0.75])
    assert same(grad, [[-1 / 6, -0.4 / 6, -2 / 6], [1.5 / 4, 1.5 / 4, 0.0]])


def test_dapo_and_dr_grpo_keep_their_denominators():
    values, grad = shares(dapo, TIS)  # over the step's 5 tokens, dropped or not
    assert values == pytest.approx([-3.4 / 5, 3.0 / 5])
    assert same(grad, [[-1 / 5, -0.4 / 5, -2 / 5], [1.5 / 5, 1.5 / 5, 0.0]])
    values, _ = shares(dr_grpo, TIS)  # over 2 completions x 4 tokens
    assert values == pytest.approx([-3.4 / 8, 3.0 / 8])


def test_gspo_weighs_its_sequence_term_by_the_mean_weight():
    values, grad = shares(gspo, TIS)
    assert values == pytest.approx([-(3.4 / 3) / 2, 1.5 / 2])
    # s = exp(mean log ratio): d s / d logp_t = s / |o| with s = 1, times A x w_seq / N
    assert same(grad, [[-(3.4 / 3) / 6] * 3, [1.5 / 4, 1.5 / 4, 0.0]])


def test_masked_tokens_add_nothing_and_all_ones_change_nothing():
    dropped = sc.weights(TRAINER, SAMPLER, MASK, Correction(method="mask"))  # [[1, 0, 0], [1.5, 1.5, 0]]
    _, grad = shares(grpo, dropped)
    assert grad[0][1] == 0 and grad[0][2] == 0
    for fn in LOSSES.values():
        (ones, ones_grad), (plain, plain_grad) = shares(fn, torch.ones(2, 3)), shares(fn, None)
        assert ones == pytest.approx(plain) and same(ones_grad, plain_grad), fn.__name__


@pytest.mark.parametrize("level", sc.LEVELS)
@pytest.mark.parametrize("method", ["tis", "mask"])
def test_micro_batches_add_up_to_the_whole_with_the_weights(method, level):
    generator = torch.Generator().manual_seed(3)
    logp = torch.randn(8, 5, generator=generator, requires_grad=True)
    old = logp.detach() + 0.3 * torch.randn(8, 5, generator=generator)
    sampler = old + 0.5 * torch.randn(8, 5, generator=generator)
    ref = logp.detach() + 0.1 * torch.randn(8, 5, generator=generator)
    adv = torch.randn(8, generator=generator)
    mask = (torch.rand(8, 5, generator=generator) > 0.3).long()
    mask[:, 0] = 1
    correction = Correction(method=method, level=level, low=0.7, high=1.3)
    settings = LossSettings(clip_low=0.2, clip_high=0.28, kl_beta=0.04, step_completions=8,
                            step_tokens=int(mask.sum()), max_new_tokens=5)
    for fn in LOSSES.values():
        logp.grad = None
        weights = sc.weights(old, sampler, mask, correction)
        assert 0 < int((weights[mask.bool()] == 0).sum()) or method == "tis"
        fn(logp, old, adv, mask, settings, ref, weights=weights).per_completion.sum().backward()
        full = logp.grad.clone()
        logp.grad = None
        for part in (slice(0, 3), slice(3, 8)):  # each micro-batch weighs its own rows, as the update does
            part_weights = sc.weights(old[part], sampler[part], mask[part], correction)
            fn(logp[part], old[part], adv[part], mask[part], settings, ref[part],
               weights=part_weights).per_completion.sum().backward()
        assert torch.allclose(logp.grad, full, atol=1e-6), fn.__name__


# --- the recipe -------------------------------------------------------------------------------------------------

def test_the_recipe_keys_and_their_checks():
    grpo_spec = validate({"grpo": {"sampler_correction": "mask", "sampler_correction_level": "sequence",
                                   "sampler_ratio_low": 0.8, "sampler_ratio_high": 1.25}}).grpo
    assert grpo_spec.correction == Correction(method="mask", level="sequence", low=0.8, high=1.25)
    assert validate({}).grpo.correction == Correction()  # the default: see docs/algorithm.md for why
    for bad in ({"sampler_correction": "is"}, {"sampler_ratio_low": 1.0}, {"sampler_ratio_high": 1.0},
                {"sampler_correction_level": "batch"}):
        with pytest.raises(RecipeError, match="sampler_"):
            validate({"grpo": bad})


def test_a_registered_loss_without_weights_is_refused_with_a_correction(monkeypatch):
    def plain(logp, old_logp, advantages, mask, settings, ref_logp=None, entropy=None):
        """A loss written before the correction existed."""
        return grpo(logp, old_logp, advantages, mask, settings, ref_logp, entropy)

    monkeypatch.setitem(LOSSES, "plain", plain)
    assert validate({"grpo": {"loss": "plain"}}).grpo.loss == "plain"
    with pytest.raises(RecipeError, match="takes no `weights` argument"):
        validate({"grpo": {"loss": "plain", "sampler_correction": "tis"}})
