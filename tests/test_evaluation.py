"""Grading and the protocol figures, on hand-made rows and on real data kept in tests/data."""

import json

import pytest

from conftest import TEST_DATA
from grpo_cli.rewards.answers import gold_answer
from grpo_cli.run.evaluation import EvalReport, grade, grade_predictions
from grpo_cli.rewards.scoring import Scorer


@pytest.fixture(scope="module")
def scorer():
    with Scorer() as scorer:
        yield scorer


def read(name):
    return [json.loads(line) for line in open(TEST_DATA / name)]


def test_sampled_protocol_figures(scorer):
    golds = ["4", "1/2"]
    completions = [
        ["#### 4", "#### 5", "#### 5", "#### 4"],             # 2 of 4 correct; vote tie 4 vs 5 -> 4 came first
        ["#### 0.5", "#### 3", "\\boxed{\\frac12}", "#### 3"],  # 2 of 4; 0.5 and 1/2 are one answer
    ]
    items = grade(golds, completions, scorer)
    assert [i.correct for i in items] == [[True, False, False, True], [True, False, True, False]]
    summary = EvalReport(items, 0.0).summary()
    assert summary["accuracy"] == pytest.approx(0.5) and summary["samples"] == 4 and summary["correct"] == 4
    # pass@2 per problem with n=4, c=2: 1 - C(2,2)/C(4,2) = 5/6
    assert summary["pass@2"] == pytest.approx(5 / 6)
    assert summary["pass@4"] == pytest.approx(1.0)
    assert summary["maj@4"] == pytest.approx(1.0)
    assert items[1].extracted[items[1].majority] == "0.5"


def test_majority_can_be_wrong(scorer):
    items = grade(["7"], [["#### 7", "#### 8", "#### 8.0"]], scorer)
    assert items[0].extracted[items[0].majority] == "8"
    assert EvalReport(items, 0.0).summary()["maj@3"] == 0.0


def test_predictions_keep_order_and_fields(scorer):
    rows = [
        {"answer": "Some work\n#### 1,000", "completion": "so 1000 in all. A: 1000", "model": "m1", "id": 7},
        {"answer": "3", "completions": ["#### 3", "#### 2"], "subject": "Algebra"},
    ]
    report = grade_predictions(rows, scorer)
    assert [i.gold for i in report.items] == ["1,000", "3"]
    assert report.items[0].fields == {"answer": "Some work\n#### 1,000", "model": "m1", "id": 7}
    assert [i.correct for i in report.items] == [[True], [True, False]]
    assert report.accuracy == pytest.approx((1.0 + 0.5) / 2)


@pytest.mark.parametrize("row, message", [
    ({"completion": "x"}, "needs 'answer'"),
    ({"answer": "1"}, "needs 'answer' and 'completion'"),
    ({"answer": "1", "completions": "just a string"}, "non-empty list"),
])
def test_malformed_prediction_rows(scorer, row, message):
    with pytest.raises(ValueError, match=message):
        grade_predictions([row], scorer)


def test_gsm8k_model_completions_agree_with_their_labels(scorer):
    rows = read("gsm8k_test_model_solutions_1000.jsonl")
    report = grade_predictions(rows, scorer)
    disagree = [r["completion"][-80:] for i, r in zip(report.items, rows) if i.correct[0] != r["is_correct"]]
    assert len(rows) == 1000 and sum(r["is_correct"] for r in rows) == 386
    assert disagree == []  # all 5276 agree too (scripts/grader_check.py, on ../shared/data)
    # the figures per model are the labelled ones of that model's rows
    by_model = report.summary()["by_model"]
    models = {r["model"] for r in rows}
    assert len(models) > 1 and set(by_model) == models
    for model in models:
        labels = [r["is_correct"] for r in rows if r["model"] == model]
        assert by_model[model] == {"accuracy": pytest.approx(sum(labels) / len(labels)), "n": len(labels)}, model


def test_math500_reference_solutions_grade_correct(scorer):
    rows = read("math500_test.jsonl")
    items = grade([r["answer"] for r in rows], [[r["solution"]] for r in rows], scorer)
    assert sum(i.correct[0] for i in items) >= 499


def test_math500_solutions_do_not_match_other_answers(scorer):
    rows = read("math500_test.jsonl")
    pairs = [(r["solution"], rows[(i + 1) % len(rows)]["answer"]) for i, r in enumerate(rows)
             if rows[(i + 1) % len(rows)]["answer"].strip() != r["answer"].strip()]
    items = grade([a for _, a in pairs], [[s] for s, _ in pairs], scorer)
    assert sum(i.correct[0] for i in items) <= 2


def test_math500_breakdown_by_subject_and_level(scorer):
    rows = read("math500_test.jsonl")[:60]
    report = grade_predictions([{**r, "completion": r["solution"]} for r in rows], scorer)
    summary = report.summary()
    assert set(summary["by_level"]) <= {"1", "2", "3", "4", "5"} and len(summary["by_level"]) > 1
    assert sum(g["n"] for g in summary["by_subject"].values()) == 60


def test_gold_answer_forms():
    assert gold_answer("#### 72") == "72"
    assert gold_answer("\\frac{1}{2}") == "\\frac{1}{2}"


def test_a_grading_past_the_time_limit_is_counted_and_shown(tmp_path):
    import rules_for_tests as bad
    from rich.console import Console

    from grpo_cli.commands.benchmark import Evaluation
    from grpo_cli.run.console import print_eval
    from grpo_cli.rewards.scoring import GRADERS

    rules = {**GRADERS, "correctness": bad.hangs_on_slow, "equivalent": bad.hangs_on_slow}
    with Scorer(rules, call_timeout_s=0.5) as slow_scorer:
        items = grade(["4", "slow"], [["#### 4", "#### 4"], ["#### 5", "#### 6"]], slow_scorer)
        voted = grade(["4"], [["#### 4", "slow"]], slow_scorer)  # the vote compares "4" with "slow"
    assert [i.timed_out for i in items] == [[False, False], [True, True]]
    assert [i.correct for i in items] == [[True, True], [False, False]]
    report = EvalReport(items, 1.0)
    assert report.summary()["timeouts"] == 2
    assert voted[0].vote_timeouts == 1 and voted[0].timed_out == [False, True]
    assert EvalReport(voted, 1.0).summary()["timeouts"] == 2
    results = Evaluation(report, {"predictions": "p.jsonl"}).results()
    assert results["timeouts"] == 2 and results["items"][1]["timed_out"] == [True, True]
    assert "timed_out" not in results["items"][0]
    console = Console(record=True, width=200)
    print_eval(console, results)
    shown = console.export_text()
    assert "grading timeouts" in shown and "2 answer comparisons ran past the 5 s limit" in shown


def test_no_timeouts_shows_no_warning():
    from rich.console import Console

    from grpo_cli.commands.benchmark import Evaluation
    from grpo_cli.run.console import print_eval

    with Scorer() as scorer:
        report = EvalReport(grade(["4"], [["#### 4"]], scorer), 1.0)
    results = Evaluation(report, {"predictions": "p.jsonl"}).results()
    assert results["timeouts"] == 0 and "timed_out" not in results["items"][0]
    console = Console(record=True, width=200)
    print_eval(console, results)
    assert "timeout" not in console.export_text()


def test_every_prediction_row_that_cannot_be_graded_is_named(scorer):
    rows = [{"answer": "1", "completion": "#### 1"}, {"answer": "2"}, {"answer": None, "completion": "#### 3"},
            {"answer": "4", "completion": None}, [1, 2], {"answer": "5", "completions": []}]
    with pytest.raises(ValueError) as error:
        grade_predictions(rows, scorer, places=[f"line {n}" for n in range(1, 7)])
    message = str(error.value)
    assert message.startswith("5 of 6 rows cannot be graded: line 2 needs 'answer' and 'completion'")
    assert "line 3 has an empty 'answer'" in message and "line 4 has a null completion" in message
    assert "line 5 is an array, not an object" in message and "line 6: 'completions' must be a non-empty list" in message



def test_problems_with_different_numbers_of_samples_get_figures_for_the_fewest(scorer):
    items = grade(["4", "5"], [["#### 4"], ["#### 5", "#### 6", "#### 5"]], scorer)
    summary = EvalReport(items, 0.0).summary()
    assert summary["samples"] == 1 and "pass@2" not in summary and "maj@3" not in summary
    assert summary["accuracy"] == pytest.approx((1.0 + 2 / 3) / 2)
