import random

import pytest
import sympy
from sympy.parsing.sympy_parser import implicit_multiplication, parse_expr, standard_transformations

from grpo_cli.model import builtin as builtin_model
from grpo_cli.data import builtin_task


IMPLICIT = standard_transformations + (implicit_multiplication,)


def test_the_reference_quadratic_is_in_the_task_family():
    rng = random.Random(0)
    problems = [builtin_task.quadratic(rng) for _ in range(400)]
    drawn = [p for p in problems if p.question == "Solve x^2 - 5x + 6 = 0."]
    assert drawn, "x^2 - 5x + 6 = 0 should be drawn"
    assert drawn[0].answer == "2, 3"
    assert drawn[0].worked == " (x-2)(x-3)=0, x=2 or x=3. #### 2, 3"


def test_problem_answers_are_right():
    rng = random.Random(1)
    for _ in range(200):
        p = builtin_task.sample(rng)
        if p.kind == "add":
            a, b = map(int, p.question.removeprefix("What is ").rstrip("?").split(" + "))
            assert int(p.answer) == a + b
        elif p.kind == "mul":
            a, b = map(int, p.question.removeprefix("What is ").rstrip("?").split(" * "))
            assert int(p.answer) == a * b
        else:
            roots = [int(r) for r in p.answer.split(", ")]
            polynomial = parse_expr(p.question.removeprefix("Solve ").removesuffix(" = 0.").replace("^", "**"),
                                    transformations=IMPLICIT)
            assert sorted(int(r) for r in sympy.solve(polynomial)) == roots
        assert p.worked.endswith(f"#### {p.answer}") and p.bare == f" #### {p.answer}"


def test_splits_are_deterministic_and_disjoint():
    train, test = builtin_task.train_split(), builtin_task.test_split()
    assert len(train) == builtin_task.TRAIN_ROWS and len(test) == builtin_task.TEST_ROWS
    assert [p.question for p in builtin_task.test_split()] == [p.question for p in test]
    assert not {p.question for p in train} & {p.question for p in test}


def test_warm_start_never_sees_a_test_question():
    test_questions = {p.question for p in builtin_task.test_split()}
    pairs = builtin_model.warm_start_texts(seed=0, n=2000)
    assert not {q for q, _ in pairs} & test_questions
    worked = sum("=" in c.split("####")[0] for _, c in pairs) / len(pairs)
    assert abs(worked - builtin_model.WORKED_FRACTION) < 0.05


def test_the_tools_warm_start_mixes_three_forms_and_never_trains_on_tool_output():
    pairs = builtin_model.warm_start_texts(seed=0, n=2000, worked=0.4, tool=0.2)
    tool = sum("```output" in c for _, c in pairs) / len(pairs)
    worked = sum("=" in c.split("####")[0] and "```" not in c for _, c in pairs) / len(pairs)
    assert abs(tool - 0.2) < 0.03 and abs(worked - 0.4) < 0.04
    # tool = 0 draws the very texts of the plain mix: builtin:tiny-math is unchanged by the variant
    assert builtin_model.warm_start_texts(seed=0, n=300) == builtin_model.warm_start_texts(0, 300, 0.5, 0.0)
    tokenizer = builtin_model.build_tokenizer()
    tokenizer.padding_side = "right"
    question, completion = "What is 6 * 7?", "\n```python\nprint(6 * 7)\n```\n```output\n42\n```\n#### 42<|endoftext|>"
    enc, labels = builtin_model.supervised_batch(tokenizer, [(question, completion), ("What is 1 + 1?", " #### 2")],
                                                 masks_output=True)
    trained = tokenizer.decode([t for t in labels[0].tolist() if t != -100])
    assert trained == "\n```python\nprint(6 * 7)\n```#### 42<|endoftext|>"  # the output block left out
    assert tokenizer.decode([t for t in labels[1].tolist() if t != -100]) == " #### 2"


def test_tokenizer_is_character_level_and_round_trips():
    tokenizer = builtin_model.build_tokenizer()
    text = "What is 23 + 48? 3+8=11.\n#### 71"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text


def test_cached_model_loads_through_from_pretrained(tiny_model_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    assert model.config.vocab_size == len(tokenizer)
    assert (tiny_model_path / "builtin.json").exists()
    # a second call reuses the cache: it builds nothing
    monkeypatch.setattr(builtin_model, "build", lambda *args, **kwargs: pytest.fail("built the cached model again"))
    assert builtin_model.ensure() == tiny_model_path


def test_warm_start_reports_every_step():
    tokenizer = builtin_model.build_tokenizer()
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(builtin_model.build_config(tokenizer))
    seen = []
    losses = builtin_model.warm_start(model, tokenizer, steps=3, batch=2, lr=1e-3, seed=0,
                                      on_step=lambda *args: seen.append(args))
    assert [(step, steps) for step, steps, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    assert [loss for _, _, loss in seen] == losses


def test_build_report_says_how_far_every_ten_seconds_not_every_step():
    now = [0.0]
    lines = []
    report = builtin_model.BuildReport(lines.append, clock=lambda: now[0])
    report.stage(1, "warm start")
    for step in range(1, 501):
        now[0] += 0.25  # 125 s in all
        report.step(step, 500, 1.0 / step)
    report.stage(2, "saving")
    report.done()
    steps = [line for line in lines if "warm start step" in line]
    assert 10 <= len(steps) <= 14  # about one a PROGRESS_EVERY_S, not 500
    counted = [int(line.split("step ")[1].split("/")[0]) for line in steps]
    assert counted == sorted(counted) and counted[-1] == 500
    assert "warm start step 40/500 (8%), 10s elapsed, about 115s left" in steps[0]
    assert lines[0].startswith("  [1/3] warm start") and "[2/3] saving (125s elapsed)" in lines[-2]
    assert "built builtin:tiny-math in 125s" in lines[-1]


def test_a_first_build_says_each_stage_and_how_far(tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_CACHE", str(tmp_path))
    monkeypatch.setitem(builtin_model.WARM_START, "steps", 3)
    monkeypatch.setitem(builtin_model.WARM_START, "batch", 2)
    lines = []
    path = builtin_model.ensure(progress=lines.append)
    assert path.parent == tmp_path / "builtin" and (path / "builtin.json").exists()
    assert lines[0].startswith("building builtin:tiny-math (first use only")
    assert [line.split("]")[0].strip() for line in lines if line.strip().startswith("[")] == ["[1/3", "[2/3", "[3/3"]
    assert any("warm start step 3/3 (100%)" in line for line in lines) and "built builtin:tiny-math" in lines[-1]
    again = []
    assert builtin_model.ensure(progress=again.append) == path and again == []  # cached: nothing to say
