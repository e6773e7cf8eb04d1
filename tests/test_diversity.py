import pytest

from grpo_cli.rewards.diversity import answer_diversity, group_diversity, text_diversity


def test_answer_diversity_counts_distinct_final_answers():
    assert answer_diversity(["#### 5", "so 5.0 is it. #### 5", "#### 7", "#### 5"]) == 2 / 4
    assert answer_diversity(["#### 1", "#### 2", "#### 3"]) == 1.0
    # cosmetic differences are the same answer; no answer at all counts as its own
    assert answer_diversity(["#### 1,000", "#### 1000", "no idea", "no clue"]) == 3 / 4


def test_text_diversity_is_distinct_word_trigrams():
    # "a b c" twice: 1 distinct trigram of 2
    assert text_diversity(["a b c", "a b c"]) == 0.5
    assert text_diversity(["a b c d", "e f g"]) == 1.0
    assert text_diversity(["short", "tiny"]) == 1.0


def test_group_diversity_averages_over_groups():
    texts = ["#### 1", "#### 1", "#### 1", "#### 2"]  # groups of 2: [1, 1] -> 0.5, [1, 2] -> 1.0
    answers, _ = group_diversity(texts, 2)
    assert answers == pytest.approx(0.75)
