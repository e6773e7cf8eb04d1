"""`grpo eval` as a function: model and data resolution, prompt formats, results."""

import json

import pytest

from conftest import TEST_DATA, small_recipe
from grpo_cli.config import recipe as recipe_module
from grpo_cli.commands.benchmark import BOXED_SYSTEM_PROMPT, EvalOptions, run
from grpo_cli.run.console import TrainConsole
from grpo_cli.errors import UserError
from grpo_cli.run.log import read_jsonl
from grpo_cli.run.train import train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_path):
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    recipe = recipe_module.validate(small_recipe(run_dir, data={"eval_limit": 40}))
    train(recipe, console=TrainConsole(quiet=True))
    return run_dir


def test_a_run_directory_scores_as_its_training_eval_did(trained_run):
    evaluation = run(EvalOptions(model=str(trained_run), limit=40))
    last = [r for r in read_jsonl(trained_run / "metrics.jsonl") if "eval/accuracy" in r][-1]
    assert evaluation.report.accuracy == last["eval/accuracy"]
    settings = evaluation.settings
    assert settings["data"] == "builtin:arithmetic-test" and settings["protocol"] == "greedy pass@1"
    assert "step 3" in settings["model"] and settings["max_new_tokens"] == 40 and settings["chat"] is False


def test_a_checkpoint_and_the_builtin_base(trained_run):
    checkpoint = trained_run / "checkpoints" / "step-2"
    assert "step 2" in run(EvalOptions(model=str(checkpoint), limit=8)).settings["model"]
    base = run(EvalOptions(model="builtin:tiny-math", data="builtin:arithmetic-test", limit=8, max_new_tokens=40))
    assert base.settings["template"] is None and base.settings["chat"] is False


def test_results_have_one_record_per_row_in_order(trained_run):
    results = run(EvalOptions(model=str(trained_run), limit=10)).results()
    assert [item["index"] for item in results["items"]] == list(range(10))
    first = results["items"][0]
    assert {"question", "gold", "extracted", "correct", "completion", "kind"} <= set(first)
    assert isinstance(first["correct"], bool)
    assert results["accuracy"] == sum(i["correct"] for i in results["items"]) / 10
    json.dumps(results)  # serializable as is


def test_samples_give_the_other_protocols(trained_run):
    results = run(EvalOptions(model=str(trained_run), limit=6, samples=4, seed=1)).results()
    assert results["samples"] == 4
    assert {"mean_accuracy", "pass@1", "pass@2", "pass@4", "maj@4"} <= set(results)
    assert results["pass@1"] == pytest.approx(results["accuracy"])
    assert results["pass@4"] >= results["pass@2"] >= results["pass@1"]
    assert all(len(item["correct"]) == 4 for item in results["items"])
    assert results["settings"]["temperature"] == 0.6


def test_same_seed_same_samples(trained_run):
    a = run(EvalOptions(model=str(trained_run), limit=4, samples=3, seed=5)).results()["items"]
    b = run(EvalOptions(model=str(trained_run), limit=4, samples=3, seed=5)).results()["items"]
    assert [i["completions"] for i in a] == [i["completions"] for i in b]


def test_named_set_from_a_local_file(trained_run):
    evaluation = run(EvalOptions(model=str(trained_run), data="gsm8k", data_file=str(TEST_DATA / "gsm8k_test_200.jsonl"),
                                 limit=3, max_new_tokens=8))
    assert evaluation.settings["data"].startswith("gsm8k (") and evaluation.report.items[0].gold == "18"
    assert evaluation.report.items[0].fields["question"].startswith("Janet")
    math = run(EvalOptions(model=str(trained_run), data="math500", data_file=str(TEST_DATA / "math500_test.jsonl"),
                           limit=2, max_new_tokens=8))
    # the run was trained on {question}; MATH rows carry {problem}, renamed for its prompt
    assert math.report.items[0].fields["problem"].startswith("Convert the point")


def test_protocol_for_a_chat_model_without_a_recipe(tiny_model_path, tmp_path):
    # a plain model directory whose tokenizer has a chat template: chat + the boxed system prompt
    evaluation = run(EvalOptions(model=str(tiny_model_path), data="gsm8k",
                                 data_file=str(TEST_DATA / "gsm8k_test_200.jsonl"), limit=1, max_new_tokens=4))
    assert evaluation.settings["chat"] is True and evaluation.settings["system_prompt"] == BOXED_SYSTEM_PROMPT
    plain = run(EvalOptions(model=str(tiny_model_path), data="gsm8k", data_file=str(TEST_DATA / "gsm8k_test_200.jsonl"),
                            limit=1, max_new_tokens=4, chat=False))
    assert plain.settings["template"] == "Question: {question}\nAnswer:"


def test_predictions_need_no_model(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"answer": "#### 5", "completion": "2+3=5. A: 5"}) + "\n")
    results = run(EvalOptions(predictions=str(path))).results()
    assert results["accuracy"] == 1.0 and results["items"][0]["extracted"] == "5"


@pytest.mark.parametrize("options, message", [
    (EvalOptions(), "--model"),
    (EvalOptions(model="builtin:tiny-math"), "--data"),
    (EvalOptions(predictions="/no/such.jsonl"), "not found"),
    (EvalOptions(model="builtin:tiny-math", data="builtin:arithmetic-test", data_file="x.jsonl"), "named set"),
    (EvalOptions(model="builtin:tiny-math", samples=0), "at least 1"),
])
def test_mistakes_are_explained(options, message, tiny_model_path):
    with pytest.raises(UserError, match=message):
        run(options)


def test_a_run_without_checkpoints_is_explained(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="without a complete checkpoint"):
        run(EvalOptions(model=str(tmp_path)))


def test_a_scoring_worker_that_runs_the_script_again_stops_before_loading_the_model(monkeypatch):
    # What a spawned worker sees while it re-runs an unguarded script (multiprocessing's own flag).
    import multiprocessing

    from grpo_cli.commands import benchmark

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(benchmark, "load_for_inference", no_loading)
    monkeypatch.setattr(multiprocessing.current_process(), "_inheriting", True, raising=False)
    with pytest.raises(SystemExit, match=r"run\(\) was called again by a scoring worker .* `if __name__"):
        run(EvalOptions(model="builtin:tiny-math", data="builtin:arithmetic-test"))
    monkeypatch.undo()
    monkeypatch.setattr(benchmark, "load_for_inference", no_loading)
    with pytest.raises(AssertionError, match="the model was loaded"):  # the same call in the script's own process
        run(EvalOptions(model="builtin:tiny-math", data="builtin:arithmetic-test"))


def test_malformed_prediction_lines_are_refused_not_skipped(tmp_path):
    # the wrong answers are on the broken lines: skipping them would read 100%
    path = tmp_path / "p.jsonl"
    path.write_text('{"answer": "1", "completion": "#### 1"}\n{"answer": "2", "completion": "#### 3"\n'
                    '{"answer": "3", "completion": "#### 3"}\n{"answer": "4", completion: "#### 5"}\n')
    with pytest.raises(UserError) as error:
        run(EvalOptions(predictions=str(path)))
    assert f"{path}: 2 of 4 lines are not JSON objects: line 2 (" in str(error.value)
    assert ", line 4 (" in str(error.value)


@pytest.mark.parametrize("lines, says", [
    ('{"answer": "1", "completion": "#### 1"}\n"#### 2"\n',  # a line that is not an object
     r"p.jsonl: 1 of 2 lines are not JSON objects: line 2 \(a string"),
    ('{"answer": "1", "completion": "#### 1"}\n\n{"answer": "2", "completions": ["#### 2"]}\n'
     '{"completion": "#### 3"}\n', r"p.jsonl: 1 of 3 rows cannot be graded: line 4 needs 'answer'"),
    ('{"answer": "1", "completions": ["#### 1", "#### 2"]}\n{"answer": "2", "completion": "#### 2"}\n'
     '{"answer": "3", "completions": ["#### 3", "#### 3"]}\n',  # ragged: pass@k needs the same k
     r"p.jsonl: line 2 has 1 completions where the other 2 rows have 2"),
])
def test_prediction_rows_that_cannot_all_be_graded_refuse_the_file_naming_the_line(tmp_path, lines, says):
    path = tmp_path / "p.jsonl"
    path.write_text(lines)
    with pytest.raises(UserError, match=says):
        run(EvalOptions(predictions=str(path)))


def test_json_lines_in_a_txt_predictions_file_are_read(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text('{"answer": "1", "completion": "#### 1"}\n{"answer": "2", "completion": "#### 3"}\n')
    results = run(EvalOptions(predictions=str(path))).results()
    assert results["n"] == 2 and results["accuracy"] == 0.5
    other = tmp_path / "q.txt"
    other.write_text("1\t#### 1\n")  # plain text: the first value parses, what follows does not
    with pytest.raises(UserError, match=r"q.txt: 1 of 1 lines are not JSON objects: line 1 \(Extra data"):
        run(EvalOptions(predictions=str(other)))
    prose = tmp_path / "r.txt"
    prose.write_text("The answer is 4.\n")
    with pytest.raises(UserError, match=r"r.txt line 1: not valid JSON \(Expecting value, column 1\)"):
        run(EvalOptions(predictions=str(prose)))


def test_a_predictions_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"answer": "1", "completion": "#### 1"}\n{"answer": "2", "completion": "\xff#### 2"}\n')
    with pytest.raises(UserError, match=r"p.jsonl line 2: byte 0xff .* is not UTF-8"):
        run(EvalOptions(predictions=str(path)))


def test_the_graded_rows_are_counted_in_the_results(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"answer": str(i), "completion": f"#### {i}"}) + "\n" for i in range(5)))
    results = run(EvalOptions(predictions=str(path), limit=3)).results()
    assert results["n"] == 3 and results["settings"]["rows"] == 5 and results["settings"]["n"] == 3


def test_chat_template_kwargs_for_grpo_eval(tiny_model_path, tmp_path, monkeypatch):
    """--chat-template-kwarg reaches the chat template of a model evaluated without a recipe; what the template
    opens is graded with the completion, and a variable the template ignores is refused."""
    import shutil

    from grpo_cli.commands import benchmark
    from grpo_cli.commands.benchmark import parse_template_kwargs
    from thinking_template import THINKING_TEMPLATE

    evaluated = []
    evaluate = benchmark.evaluate
    monkeypatch.setattr(benchmark, "evaluate", lambda model, tokenizer, items, *args, **kwargs: (
        evaluated.extend(items), evaluate(model, tokenizer, items, *args, **kwargs))[1])

    assert parse_template_kwargs(["enable_thinking=true", "budget=3"]) == {"enable_thinking": True, "budget": 3}
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        parse_template_kwargs(["enable_thinking"])
    thinking = tmp_path / "thinking"
    shutil.copytree(tiny_model_path, thinking)
    (thinking / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    data = str(TEST_DATA / "gsm8k_test_200.jsonl")
    evaluation = run(EvalOptions(model=str(thinking), data="gsm8k", data_file=data, limit=1, max_new_tokens=2,
                                 chat_template_kwargs={"enable_thinking": True}))
    assert evaluation.settings["chat_template_kwargs"] == {"enable_thinking": True}
    assert evaluated[0].prompt.endswith("<|im_start|>assistant\n<think>\n") and evaluated[0].prefill == "<think>\n"
    assert evaluation.report.items[0].extracted == [None]  # its 2 characters are thinking that never closed
    with pytest.raises(UserError, match="enable_thinking: the chat template of .* does not use it"):
        run(EvalOptions(model=str(tiny_model_path), data="gsm8k", data_file=data, limit=1, max_new_tokens=2,
                        chat_template_kwargs={"enable_thinking": True}))
    with pytest.raises(UserError, match="add --chat"):
        run(EvalOptions(model=str(thinking), data="gsm8k", data_file=data, limit=1, chat=False,
                        chat_template_kwargs={"enable_thinking": True}))
