import pytest
import torch

from grpo_cli.update.advantages import STD_EPS, group_advantages, step_rewards


def test_hand_computed_group():
    # rewards 1, 0, 0, 1: mean 0.5, population std 0.5 -> z = +-1 (up to eps)
    adv, zero = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=4)
    expected = 0.5 / (0.5 + STD_EPS)
    assert adv.tolist() == pytest.approx([expected, -expected, -expected, expected])
    assert zero.tolist() == [False]


def test_groups_are_normalized_separately():
    # group 1: 2, 4 -> mean 3, std 1 -> -1, +1; group 2: 10, 10, equal -> 0, 0
    adv, zero = group_advantages(torch.tensor([2.0, 4.0, 10.0, 10.0]), group_size=2)
    scale = 1.0 / (1.0 + STD_EPS)
    assert adv.tolist() == pytest.approx([-scale, scale, 0.0, 0.0])
    assert zero.tolist() == [False, True]


def test_equal_rewards_give_zero_advantage_and_are_counted():
    adv, zero = group_advantages(torch.full((6,), 0.7), group_size=3)
    assert torch.count_nonzero(adv) == 0
    assert zero.tolist() == [True, True]


def test_advantages_sum_to_zero_in_every_group():
    generator = torch.Generator().manual_seed(0)
    for group_size in (2, 3, 8, 16):
        rewards = torch.rand(5 * group_size, generator=generator)
        adv, _ = group_advantages(rewards, group_size)
        assert adv.view(5, group_size).sum(1).abs().max() < 1e-5


def test_scale_of_rewards_does_not_matter():
    rewards = torch.tensor([0.0, 1.0, 3.0, 0.5])
    a, _ = group_advantages(rewards, 4)
    b, _ = group_advantages(rewards * 10 + 5, 4)
    assert torch.allclose(a, b, atol=1e-3)


def test_batch_scaling_divides_by_the_std_of_the_whole_step():
    rewards = torch.tensor([0.0, 2.0, 1.0, 1.0])  # group means 1, 1; batch std = sqrt(0.5)
    adv, _ = group_advantages(rewards, 2, scale="batch")
    scale = 1 / (0.5 ** 0.5 + STD_EPS)
    assert adv.tolist() == pytest.approx([-scale, scale, 0.0, 0.0])


def test_no_scaling_only_centers_each_group():
    adv, zero = group_advantages(torch.tensor([0.0, 3.0, 5.0, 5.0]), 2, scale="none")
    assert adv.tolist() == [-1.5, 1.5, 0.0, 0.0] and zero.tolist() == [False, True]


def test_overlong_penalty_hand_values():
    from grpo_cli.update.advantages import overlong_penalty

    lengths = torch.tensor([10, 12, 14, 15, 16])
    # max 16, buffer 4: free up to 12 tokens, then -0.5 per... -(L - 12) / 4 x penalty 0.5
    assert overlong_penalty(lengths, 16, 4, 0.5).tolist() == pytest.approx([0.0, 0.0, -0.25, -0.375, -0.5])
    assert overlong_penalty(lengths, 16, 0).tolist() == [0.0] * 5


def test_total_reward_skips_missing_values():
    from grpo_cli.update.advantages import total_reward

    values = [[1.0, float("nan")], [0.0, 2.0]]
    assert total_reward(values, torch.tensor([1.0, 0.5])).tolist() == [1.0, 1.0]


def test_step_rewards_add_the_overlong_penalty_and_leave_unweighted_columns_out():
    # two rules weighted 1 and 0.5, a third column (correctness for the accuracy figure) with no weight
    values = torch.tensor([[1.0, 0.0, 9.0], [1.0, 0.0, 9.0], [0.0, 1.0, 9.0], [0.0, 1.0, 9.0]])
    weights = torch.tensor([1.0, 0.5])
    lengths = torch.tensor([10, 30, 10, 40])  # max 40, buffer 20: penalties 0, -0.5, 0, -1 (penalty 1)
    rewards, overlong = step_rewards(values, weights, lengths, 40, 20, 1.0)
    assert overlong.tolist() == [0.0, -0.5, 0.0, -1.0]
    assert rewards.tolist() == [1.0, 0.5, 0.5, -0.5]


def test_a_group_flat_by_its_rules_is_not_flat_once_the_overlong_penalty_splits_it():
    """Dynamic sampling and the advantages read the same rewards: with overlong_buffer on, a group whose rules
    all agree but whose lengths differ inside the buffer carries a signal, and neither calls it flat."""
    values = torch.ones(4, 1)
    lengths = torch.tensor([10, 10, 10, 35])  # the last completion runs 15 tokens into a 20-token buffer
    rewards, _ = step_rewards(values, torch.tensor([1.0]), lengths, 40, 20, 1.0)
    advantages, zero_std = group_advantages(rewards, 4)
    assert zero_std.tolist() == [False] and advantages[3] < 0
    rewards, _ = step_rewards(values, torch.tensor([1.0]), lengths, 40, 0, 1.0)  # buffer off: flat
    assert group_advantages(rewards, 4)[1].tolist() == [True]
