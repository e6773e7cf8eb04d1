import pytest

from grpo_cli.answers import _parse, extract_final_answer, find_final, gold_answer, is_correct, is_equivalent


@pytest.mark.parametrize("completion, expected", [
    ("3+8=11, 2+4+1=7. #### 71", "71"),
    ("so she has 18 left.\n#### 18", "18"),
    ("Thus the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{2}, \\boxed{3}", "2, 3"),
    ("first \\boxed{7}\nthen we fix it: \\boxed{9}", "9"),
    ("The answer is 42.", "42."),
    ("Final answer: x = 5", "x = 5"),
    ("Answer: 12 apples", "12 apples"),
    ("She makes 13 * 2 = $26\nA: 26", "26"),
    ("(x-2)(x-3)=0, so x = 2 or x = 3.", "x = 2 or x = 3"),
    ("she has 1,234 marbles in the end", "1,234"),
    ("\\boxed{\\frac{a}{\\sqrt{b}}}", "\\frac{a}{\\sqrt{b}}"),
])
def test_extraction(completion, expected):
    assert extract_final_answer(completion) == expected


def test_no_answer_at_all():
    assert extract_final_answer("I do not know.") is None
    assert extract_final_answer("The answer is \\boxed{}") is None


def test_marked_and_unmarked_answers_are_told_apart():
    assert find_final("#### 5").marked
    assert not find_final("it is 5").marked


@pytest.mark.parametrize("raw, gold", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
    ("#### 1,000", "1,000"),
    ("The set is \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("  17 ", "17"),
])
def test_gold_answers(raw, gold):
    assert gold_answer(raw) == gold


@pytest.mark.parametrize("pred, gold", [
    ("3, 2", "2, 3"),                          # roots in any order
    ("x = 3 or x = 2", "2, 3"),                # and any wording
    ("x=2, x=3", "2,3"),
    ("\\{2, 3\\}", "2, 3"),
    ("\u22125", "-5"),                         # unicode minus
    ("\\dfrac{1}{2}", "\\frac12"),
    ("0.5", "1/2"),
    ("1,234", "1234"),                         # thousands separators
    ("$1,000", "1000"),
    ("3\\sqrt{13}", "\\sqrt{117}"),            # equivalent radicals
    ("\\text{Evelyn}", "\\text{Evelyn}"),      # text answers
    ("Evelyn", "\\text{Evelyn}"),
    ("18.00", "18"),
    ("12 apples", "12"),
])
def test_equivalent(pred, gold):
    assert is_equivalent(pred, gold)


@pytest.mark.parametrize("pred, gold", [
    ("2", "2, 3"),                 # a partial set earns nothing
    ("2, 3, 4", "2, 3"),
    ("", "5"),                     # an empty answer earns nothing
    (None, "5"),
    ("71", "17"),
    ("\\text{Evelyn}", "\\text{Amy}"),
    ("1.234", "1234"),
])
def test_not_equivalent(pred, gold):
    assert not is_equivalent(pred, gold)


@pytest.mark.parametrize("pred, gold", [
    ("-3, 6", "-6, 7"), ("2, 9", "1, 9"), ("5", "-6, 7"), ("-6, 7", "-6"), ("1, 2, 3", "1, 2"),
    ("3, 2", "2, 3"), ("2, 2", "2"), ("-7, 0", "0, -7"),
])
def test_the_integer_list_shortcut_agrees_with_math_verify(pred, gold):
    from math_verify import verify

    assert is_equivalent(pred, gold) == verify(_parse(gold), _parse(pred), timeout_seconds=None)


@pytest.mark.parametrize("pred, gold", [
    ("71", "17"), ("-5", "5"), ("007", "7"), ("-0", "0"), ("12", "12"), ("1000000000000000000001", "1e21"),
    ("1000000000000000000001", "1000000000000000000000"), ("-6", "-06"), ("3", "3.0"),
])
def test_the_integer_shortcut_agrees_with_math_verify(pred, gold):
    from math_verify import verify

    assert is_equivalent(pred, gold) == verify(_parse(gold), _parse(pred), timeout_seconds=None)


@pytest.mark.parametrize("completion, gold, correct", [
    ("The answer is \\boxed{}", "5", False),
    ("7+5=12. #### 12", "12", True),
    ("So the roots are x = 2 and x = 3. The answer is \\boxed{3, 2}", "2, 3", True),
    ("\\boxed{2}", "2, 3", False),
    ("A: 26", "#### 26".split()[-1], True),
])
def test_is_correct(completion, gold, correct):
    assert is_correct(completion, gold) is correct
