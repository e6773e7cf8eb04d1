import pytest

from brief_answers import BARE_BOXES, FACTORED, GOLD, REFLECTED, WRONG_DISCRIMINANT
from grpo_cli.rewards import RULES, correctness, count_steps, reflection_bonus, step_format

BRIEF_WEIGHTS = {"correctness": 1.0, "step_format": 0.2, "reflection_bonus": 0.1}


def total(completion):
    return sum(w * RULES[rule](completion, GOLD) for rule, w in BRIEF_WEIGHTS.items())


def test_the_brief_ranking():
    # reflection-then-correct >= worked and correct > bare right answer > worked but wrong
    assert total(REFLECTED) >= total(FACTORED) > total(BARE_BOXES) > total(WRONG_DISCRIMINANT)
    assert total(BARE_BOXES) < 1.0 <= total(REFLECTED)


def test_the_brief_rule_by_rule():
    assert [correctness(t, GOLD) for t in (FACTORED, WRONG_DISCRIMINANT, BARE_BOXES, REFLECTED)] == [1, 0, 1, 1]
    assert [step_format(t, GOLD) for t in (FACTORED, WRONG_DISCRIMINANT, BARE_BOXES, REFLECTED)] == [1, 1, -1, 1]
    assert [reflection_bonus(t, GOLD) for t in (FACTORED, WRONG_DISCRIMINANT, BARE_BOXES, REFLECTED)] == [0, 0, 0, 1]
    assert total(FACTORED) == pytest.approx(1.2)
    assert total(REFLECTED) == pytest.approx(1.3)
    assert total(BARE_BOXES) == pytest.approx(0.8)
    assert total(WRONG_DISCRIMINANT) == pytest.approx(0.2)


@pytest.mark.parametrize("completion, score", [
    (" 3+8=11, 2+4+1=7. #### 71", 1.0),       # the builtin task's worked form
    (" #### 71", -1.0),                        # its bare form
    ("3+8=11, 2+4+1=7, so 71", 0.0),          # work, but no marked final answer
    ("I think it is seventy-one.", -1.0),
    ("", -1.0),
])
def test_step_format(completion, score):
    assert step_format(completion, "71") == score


def test_count_steps():
    assert count_steps("3+8=11, 2+4+1=7.") == 2
    assert count_steps("Let us think about this carefully.") == 0


def test_reflection_needs_a_correct_ending():
    wrong = REFLECTED.replace("\\boxed{2, 3}", "\\boxed{2, 4}")
    assert reflection_bonus(wrong, GOLD) == 0.0


def test_reflection_cannot_be_farmed_by_repeating_the_phrase():
    farmed = "Wait. " * 10 + "(x-2)(x-3)=0, so x=2 or x=3. \\boxed{2, 3}"
    assert reflection_bonus(farmed, GOLD) == 0.0
    once = "Wait, let me check: (x-2)(x-3)=0, so x=2 or x=3. \\boxed{2, 3}"
    assert reflection_bonus(once, GOLD) == 1.0


def test_reflection_must_revise_something():
    # "wait" right before the answer, with no work after it
    assert reflection_bonus("(x-2)(x-3)=0. Wait. \\boxed{2, 3}", GOLD) == 0.0


def test_format_sees_what_the_template_already_opened():
    # a chat template that ends in "<think>\n": scored with that prefix, the completion is the same text
    prefill = "<think>\n"
    completion = "2+2=4.</think> The answer is 4."
    assert step_format(prefill + completion, "4") == 1.0
