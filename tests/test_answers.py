import pytest

from grpo_cli.rewards.answers import _parse, extract_final_answer, find_final, gold_answer, is_correct, is_equivalent


@pytest.mark.parametrize("completion, expected", [
    ("3+8=11, 2+4+1=7. #### 71", "71"),
    ("so she has 18 left.\n#### 18", "18"),
    ("Thus the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{2}, \\boxed{3}", "2, 3"),
    ("first \\boxed{7}\nthen we fix it: \\boxed{9}", "9"),
    ("The answer is 42.", "42"),
    ("Final answer: x = 5", "x = 5"),
    ("Answer: 12 apples", "12 apples"),
    ("She makes 13 * 2 = $26\nA: 26", "26"),
    ("(x-2)(x-3)=0, so x = 2 or x = 3.", "x = 2 or x = 3"),
    ("she has 1,234 marbles in the end.", "1,234"),
    ("\\boxed{\\frac{a}{\\sqrt{b}}}", "\\frac{a}{\\sqrt{b}}"),
])
def test_extraction(completion, expected):
    assert extract_final_answer(completion) == expected


def test_no_answer_at_all():
    assert extract_final_answer("I do not know.") is None
    assert extract_final_answer("The answer is \\boxed{}") is None


@pytest.mark.parametrize("completion, expected", [
    ("<think>Maybe \\boxed{5}? The answer is 5.</think> It comes to 4.", "4"),  # marked drafts in the thinking
    ("<think>2+3 = 5</think> It comes to 4.", "4"),
    ("2+3 = 5. The answer is 5.</think>\nIt comes to 4.", "4"),  # the chat template opened the block
    ("<think>2+2=4, so the answer is 4.", None),  # thinking that never closed states no answer
    ("<think>The answer is 4.</think>", None),  # nothing after the thinking
])
def test_answers_come_after_the_thinking(completion, expected):
    assert extract_final_answer(completion) == expected


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
    ("1,234", "1234"), ("-1,000,000", "-1000000"), ("1,234", "1243"), ("12,345", "12345.5"),
    ("0,500", "500"),  # a first group of 0 is no thousands group: math-verify reads 0 and 500
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


# ---- classes of answers found in other graders' test data: each class, right and wrong

@pytest.mark.parametrize("pred, gold, equal", [
    ("4, 9, and 17", "4, 9, 17", True),              # "and" closes a list: every member counts
    ("4, 8, and 17", "4, 9, 17", False),
    ("4, 9, and 17", "17", False),
    ("17", "4, 9, and 17", False),
    ("(1,5) \\cup (5,250)", "(1,5)\\cup(5,250)", True),  # commas inside intervals are not thousands separators
    ("(1,5250)", "(1,5) \\cup (5,250)", False),
    ("(1,5) \\cup (5,250)", "(1,5250)", False),
    ("11,\\! 250", "11250", True),                   # LaTeX thin space in a number
    ("11{,}250", "11250", True),
    ("11,\\! 250", "11,\\!350", False),
    ("\\sum_{j=1}^n j", "\\frac{n(n+1)}{2}", True),   # the index is not an assignment to drop
    ("\\sum_{j=1}^{n} j^2", "\\frac{n(n+1)}{2}", False),
    ("2 1/4", "2.25", True),                          # a mixed number
    ("2 1/4", "\\frac{9}{4}", True),
    ("-2 1/4", "-2.25", True),
    ("2 1/4", "0.5", False),                          # not 2 * 1/4
    ("x = 2 or x = 3", "2, 3", True),
    ("x \\in [1,2]", "[1,2]", True),
    ("3.5 hours", "3.5", True),
    ("10 dollars per day", "10", True),               # mostly words: math-verify finds the number
    ("\\frac{NO}{BO}=\\frac{1}{\\sqrt{6}}", "\\frac{1}{\\sqrt{6}}", True),
])
def test_equivalence_classes(pred, gold, equal):
    assert is_equivalent(pred, gold) is equal


@pytest.mark.parametrize("raw, gold", [
    ("\\(\\boxed{3}\\) and \\(\\boxed{-5}\\)", "3, -5"),  # a gold with several boxes is all of them
    ("The roots are \\boxed{3} and \\boxed{\\frac{1}{2}}.", "3, \\frac{1}{2}"),
    ("\\boxed{\\boxed{7}}", "\\boxed{7}"),                # a box inside a box is one answer
])
def test_gold_answers_with_several_boxes(raw, gold):
    assert gold_answer(raw) == gold


def test_a_gold_with_several_boxes_needs_every_member():
    gold = gold_answer("\\(\\boxed{3}\\) and \\(\\boxed{-5}\\)")
    assert is_correct("The solutions are $x = 3$ and $x = -5$. So \\boxed{-5, 3}", gold)
    assert not is_correct("So \\boxed{-5}", gold)


@pytest.mark.parametrize("completion, expected", [
    ("Final Answer: The final answer is $2x+y=3$. I hope it is correct.", "$2x+y=3$"),  # Minerva's ending
    ("Final Answer: The final answer is 42. I hope it is correct.", "42"),
    ("The answer is 3.5 hours. That is all.", "3.5 hours"),
    ("The answer is $x = 1. 5$ or so.", "$x = 1. 5$ or so"),  # a full stop inside math is not an end
    ("The final answer is: 7", "7"),
])
def test_a_marked_answer_ends_with_its_sentence(completion, expected):
    assert extract_final_answer(completion) == expected


def test_minerva_endings_grade_on_the_answer():
    assert is_correct("Final Answer: The final answer is $2x+y=3$. I hope it is correct.", "y = 3 - 2x")
    assert not is_correct("Final Answer: The final answer is $2x+y=4$. I hope it is correct.", "y = 3 - 2x")


@pytest.mark.parametrize("completion, expected", [
    ("Converting, $r = 1$ and $\\theta = \\pi/3$, so the point is $(1, \\pi/3)$.", "(1, \\pi/3)"),
    ("so the point is\n\\[\n\\left( 1, \\frac{\\pi}{3} \\right)\n\\]", "\\left( 1, \\frac{\\pi}{3} \\right)"),
    ("\\frac{10}{9}", "\\frac{10}{9}"),                  # a bare answer is read whole, not as its last number
    ("x = 5", "x = 5"),
    ("so the probability is 2/3.", "2/3"),
    ("The ordered pair is $(7, 6)$. <|im_start|>user\nNext question 5", "(7, 6)"),  # the turn ended
])
def test_an_unmarked_closing_expression_is_the_answer(completion, expected):
    assert extract_final_answer(completion) == expected


def test_an_unmarked_tuple_is_graded_whole():
    completion = "Here $r = 1$ and $\\theta = \\pi/3$, so the point is $(1, \\pi/3)$."
    assert is_correct(completion, "\\left( 1, \\frac{\\pi}{3} \\right)")
    assert not is_correct(completion, "3")  # not its last number


@pytest.mark.parametrize("completion", [
    "First 6 * 3 = 18, then we add the 4 remaining eggs and",        # cut off mid-sentence
    "The total is 18 + 4 = 22 so the price per egg is 22 /",
    "She sells 9 eggs at $2 each, so 9 * 2 = 18 dollars per day, so the",
])
def test_a_completion_cut_off_mid_solution_states_no_answer(completion):
    assert extract_final_answer(completion) is None
    assert not is_correct(completion, "18")


@pytest.mark.parametrize("completion", [
    "She sells 9 eggs at $2 each, so she makes 18 dollars.",
    "9 * 2 = 18",
    "So she makes $18 every day at the market.",
])
def test_a_finished_completion_keeps_its_unmarked_answer(completion):
    assert is_correct(completion, "18")


# ---- every rewrite keeps the meaning of a correct answer

def _read_as_written(answer: str):
    """math-verify's reading of an answer as it stands (delimited LaTeX as it is, else wrapped in $)."""
    from math_verify import parse

    delimited = any(d in answer for d in ("$", "\\(", "\\["))
    return parse(answer if delimited else f"${answer}$", parsing_timeout=None)


def test_normalize_keeps_the_meaning_of_every_correct_answer_we_hold():
    """Over the 722 distinct answers of MATH-500 and of the labelled grader set:
    wherever normalize rewrites an answer, math-verify reads the result as it read the original.
    The one rewrite meant to change its reading is the plain mixed number ("1 1/2", read as 1)."""
    import json

    from conftest import TEST_DATA
    from math_verify import verify

    from grpo_cli.rewards.answers import normalize

    answers = {json.loads(line)["answer"] for line in open(TEST_DATA / "math500_test.jsonl")}
    answers |= {gold_answer(json.loads(line)["gold"]) for path in (TEST_DATA / "grader").glob("*.jsonl")
                for line in open(path)}
    changed = [a for a in answers if normalize(a) != a]
    assert len(answers) > 700 and len(changed) > 100  # the rewrites do fire ($ delimiters, \$ signs, ...)
    read_anew = [a for a in changed if _read_as_written(a) and not verify(
        _read_as_written(a), _read_as_written(normalize(a)), timeout_seconds=None)]
    assert read_anew == ["1 1/2"]


@pytest.mark.parametrize("answer, rewritten", [
    ("\u22125", "-5"),                          # unicode minus
    ("$\\frac{1}{2}$", "\\frac{1}{2}"),          # delimiters around the answer
    ("\\(x^2\\)", "x^2"),
    ("\\$18.50", "18.50"),                       # a currency sign
    ("42.", "42"),                              # a sentence's full stop
    ("2 1/4", "2\\frac{1}{4}"),                 # a plain mixed number, as LaTeX writes it
    ("-3 2/5", "-3\\frac{2}{5}"),
    ("1 000", "1000"),                          # digits grouped by a space, thin space or LaTeX's \,
    ("1\u2009000", "1000"),
    ("-12\u202f345.5", "-12345.5"),
    ("1\\,000\\,000", "1000000"),
    ("(1 000, 2\u2009000)", "(1000, 2000)"),
])
def test_each_rewrite(answer, rewritten):
    from grpo_cli.rewards.answers import normalize

    assert normalize(answer) == rewritten
    assert is_equivalent(answer, rewritten)


@pytest.mark.parametrize("answer", [
    "1, 2, 3, \\ldots",      # an ellipsis keeps its dots
    "2 5/4",                 # not a mixed number (5/4 is improper): left as written
    "\\sqrt[3]{2}",          # brackets that are not delimiters
    "\\left[ 0, 1 \\right)",
    "(1,5) \\cup (5,250)",
    "11,\\! 250",
    "\\sum_{j=1}^n j",
    "4, 9, \\text{ and } 17",
    "1 00",                  # not groups of three digits
    "12 34",
    "1 000 00",
    "1.5 000",
])
def test_rewrites_leave_other_answers_alone(answer):
    from grpo_cli.rewards.answers import normalize

    assert normalize(answer) == answer


# ---- a prime is part of the answer: math-verify drops "'" (E' would equal E), so primes are marked

@pytest.mark.parametrize("pred, gold", [
    ("E'", "E"), ("E^\\prime", "E"), ("E^{\\prime}", "E"), ("E\u2032", "E"),   # each spelling against no prime
    ("f'(x)", "f(x)"), ("f\u2019(x)", "f(x)"), ("f'(2)", "f(2)"), ("y' = 2x", "y = 2x"),
    ("E''", "E'"), ("E\u2033", "E'"), ("E^{\\prime\\prime}", "E^\\prime"), ("f''(x)", "f'(x)"),  # double and single
    ("A'B'", "AB"), ("AB'", "AB"), ("\\alpha'", "\\alpha"), ("x_1'", "x_1"), ("x_{1}'", "x_{1}"), ("(x^2)'", "x^2"),
    ("(1, f'(1))", "(1, f(1))"), ("\\{A', B\\}", "\\{A, B\\}"),
    ("\\text{E'}", "E"), ("\\mathrm{E'}", "\\mathrm{E}"), ("\\mathrm{E}'", "E"),  # a symbol set in roman
])
def test_a_primed_symbol_differs_from_the_unprimed_one(pred, gold):
    assert not is_equivalent(pred, gold)
    assert not is_equivalent(gold, pred)


@pytest.mark.parametrize("pred, gold", [
    ("E'", "E^\\prime"), ("E'", "E^{\\prime}"), ("E'", "E\u2032"), ("E^\\prime", "E\u2032"), ("E'", "E ^{ \\prime }"),
    ("E''", "E^{\\prime\\prime}"), ("E''", "E\u2033"), ("E''", "E^{\\prime \\prime}"), ("E''", "E^{''}"),
    ("f'(x)", "f^{\\prime}(x)"), ("f'(x)", "f\u2019(x)"), ("A'B'", "A^\\prime B^\\prime"),
    ("f'(x) = 2x", "f^{\\prime}(x)=2x"), ("\\mathrm{E'}", "E'"), ("\\text{E}'", "E^\\prime"),
])
def test_every_spelling_of_a_prime_is_the_same_prime(pred, gold):
    assert is_equivalent(pred, gold)
    assert is_equivalent(gold, pred)


def test_a_prime_counts_in_every_comparison():
    """The shortcut the scoring pool takes outside its workers, the score, and the key that counts distinct
    answers, all keep the prime."""
    from grpo_cli.rewards.answers import equivalence, settled_without_parsing, text_key

    for pred, gold in [("E'", "E"), ("E", "E'"), ("f'(x)", "f(x)"), ("E''", "E'"), ("\\text{E}", "E'")]:
        assert settled_without_parsing(pred, gold) is not True
        assert equivalence(pred, gold) == 0.0
        assert text_key(pred) != text_key(gold)
    assert settled_without_parsing("E\u2032", "E'") is True
    assert len({text_key(a) for a in ("E'", "E^\\prime", "E^{\\prime}", "E\u2032")}) == 1
    assert is_correct("So the image of the point is $E'$.", "E'")
    assert not is_correct("So the image of the point is $E$.", "E'")
    assert not is_correct("The answer is \\boxed{f(x) = 3x^2}", "f'(x) = 3x^2")


@pytest.mark.parametrize("pred, gold", [
    ("\\text{O'Neil}", "O'Neil"),       # apostrophes in words
    ("\\text{Jones'}", "Jones'"),
    ("John's age", "John's age"),
    ("'A'", "A"),                       # a quote
    ("5'", "5"),                        # after a number a prime is a unit (feet, minutes of arc), read as units are
])
def test_apostrophes_that_are_not_primes_are_read_as_before(pred, gold):
    assert is_equivalent(pred, gold)


# ---- numbers grouped by spaces, and decimal commas (the rule: _DECIMAL_COMMA in rewards/answers.py, docs/grader.md)

@pytest.mark.parametrize("pred, gold", [
    ("1 000", "1000"), ("1\u2009000", "1000"), ("1\u202f000", "1000"), ("1\u00a0000", "1000"), ("1\\,000", "1000"),
    ("1\\;000", "1000"), ("1~000", "1000"), ("1 000 000", "1000000"), ("1\\,000\\,000", "10^6"),
    ("12 345.5", "12345.5"), ("12\u2009345.5", "24691/2"), ("-1 000", "-1000"), ("$1 000$", "1,000"),
    ("(1 000, 2 000)", "(1000, 2000)"), ("x = 1 000", "1000"), ("1 000 apples", "1000"),
])
def test_digits_grouped_by_spaces_are_one_number(pred, gold):
    assert is_equivalent(pred, gold)
    assert is_equivalent(gold, pred)


@pytest.mark.parametrize("pred, gold", [
    ("1 00", "100"), ("12 34", "1234"), ("1 000 00", "100000"), ("1 0000", "10000"),  # not groups of three
    ("1 000", "100"), ("1 000", "-1000"), ("12 345.5", "12345"), ("-1 000", "1000"),
    ("(1 000, 2 000)", "(1000, 3000)"),
])
def test_spaced_digits_that_are_not_that_number(pred, gold):
    assert not is_equivalent(pred, gold)
    assert not is_equivalent(gold, pred)


@pytest.mark.parametrize("completion, answer", [
    ("So the total is 1 000.", "1000"),
    ("The total comes to 12\u2009345.5 dollars.", "12345.5"),
    ("so he pays $1\\,250$ in all.", "1250"),
])
def test_a_closing_number_grouped_by_spaces_is_read_whole(completion, answer):
    assert is_correct(completion, answer)
    assert not is_correct(completion, answer[-3:])  # not its last group


@pytest.mark.parametrize("pred, gold", [
    ("1,22", "1.22"), ("1000,99", "1000.99"), ("0,5", "0.5"), ("0,5", "\\frac{1}{2}"), ("0,5", "1/2"),
    ("0,500", "0.5"), ("-1,5", "-1.5"), ("1,5", "3/2"), ("1000,00", "1000"), ("1000,00", "1,000"),
    ("1 000,5", "1000.5"), ("12\u2009345,5", "12345.5"), ("1,234", "1234"), ("1,000", "1000"),
])
def test_a_decimal_comma_reads_as_a_decimal_point(pred, gold):
    assert is_equivalent(pred, gold)
    assert is_equivalent(gold, pred)


@pytest.mark.parametrize("pred, gold", [
    ("1,234", "1.234"),                 # three digits after one comma: English thousands, 1234
    ("1,000", "1"),
    ("1,22", "1.23"), ("1,22", "122"), ("0,5", "5"), ("0,500", "500"), ("-1,5", "1.5"), ("1,5", "15"),
    ("(0,5)", "0.5"), ("[0,5]", "0.5"), ("(1,2)", "1.2"), ("\\{1,5\\}", "1.5"),  # an interval, a pair, a set
    ("1,2,3", "1.23"), ("1,2,3", "1.2"), ("x = 1,5", "1.5"), ("1,-2", "1.2"),
])
def test_a_comma_that_is_no_decimal_comma(pred, gold):
    assert not is_equivalent(pred, gold)
    assert not is_equivalent(gold, pred)


@pytest.mark.parametrize("pred, gold", [
    ("1,2", "2, 1"), ("1,5", "1, 5"), ("-2,1", "1, -2"), ("6,8", "6 \\text{ and } 8"), ("x=2, x=3", "2,3"),
    ("(1,2)", "(1, 2)"), ("(0,5)", "(0, 5)"), ("1,2,3", "3, 2, 1"), ("[0,5]", "[0, 5]"),
])
def test_lists_pairs_and_intervals_keep_their_commas(pred, gold):
    """Against a list, a lone "1,2" is the list it was (it may be two roots); a pair or interval always is."""
    assert is_equivalent(pred, gold)
    assert is_equivalent(gold, pred)


def test_decimal_commas_count_in_every_comparison():
    from grpo_cli.rewards.answers import settled_without_parsing, text_key

    assert settled_without_parsing("1,22", "1.22") is True
    assert settled_without_parsing("1000,99", "1000.99") is True
    assert settled_without_parsing("1 000", "1000") is True
    assert settled_without_parsing("0,500", "500") is not True
    assert text_key("1 000") == text_key("1\\,000") == text_key("1,000") == text_key("1000.") == "1000"
    assert text_key("0,500") != text_key("500")  # 0.5, not five hundred
    assert is_correct("The price is 2,74 euros.", "2.74")
    assert not is_correct("The price is 2,74 euros.", "274")
