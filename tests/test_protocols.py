import itertools
import math

import pytest

from grpo_cli.run.protocols import k_values, majority_vote, pass_at_k


def brute_force_pass_at_k(correct: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n, c, k", [(5, 0, 1), (5, 1, 1), (5, 2, 3), (6, 3, 2), (8, 1, 8), (8, 7, 1), (7, 4, 7)])
def test_pass_at_k_matches_a_brute_force_count(n, c, k):
    correct = [True] * c + [False] * (n - c)
    assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(correct, k))


def test_pass_at_1_is_the_fraction_correct():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)


def test_pass_at_k_hand_value():
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(200, 13, 50) == pytest.approx(1 - math.comb(187, 50) / math.comb(200, 50))


def test_pass_at_k_refuses_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def numeric_same(a, b):
    return abs(eval(a) - eval(b)) < 1e-9


def test_majority_uses_equivalence_not_string_equality():
    # "1/2" and "0.5" are one answer (2 votes) against "3" (2 string-equal votes)... then "0.50" breaks the tie
    answers = ["3", "1/2", "0.5", "3", "0.50"]
    assert answers[majority_vote(answers, numeric_same)] == "1/2"


def test_majority_tie_goes_to_the_answer_seen_first():
    assert majority_vote(["2", "5", "5", "2"], numeric_same) == 0
    assert majority_vote(["5", "2", "2", "5"], numeric_same) == 0


def test_majority_ignores_missing_answers():
    assert majority_vote([None, None, "4"], numeric_same) == 2
    assert majority_vote([None, None], numeric_same) is None


def test_k_values():
    assert k_values(1) == [1]
    assert k_values(8) == [1, 2, 4, 8]
    assert k_values(10) == [1, 2, 4, 8, 10]
