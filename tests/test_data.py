import json

import pytest

from conftest import TEST_DATA
from grpo_cli.data import builtin_task
from grpo_cli.rewards.answers import is_equivalent
from grpo_cli.model.builtin import build_tokenizer
from grpo_cli.data.examples import PromptOrder, build_examples, load_examples, load_rows, template_variables
from grpo_cli.errors import UserError
from grpo_cli.config.recipe import DataSpec, HubDataset
from thinking_template import QWEN3_STYLE_TEMPLATE, thinking_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_builtin_rows():
    # the held-out problems, in order, under the fields a recipe's defaults read (and kind, for rules
    # that ask for it)
    rows = load_rows("builtin:arithmetic-test")
    spec = DataSpec()
    assert [(r[spec.prompt_field], r[spec.answer_field], r["kind"]) for r in rows] == \
        [(p.question, p.answer, p.kind) for p in builtin_task.test_split()]


def test_unknown_builtin_set_is_explained():
    with pytest.raises(UserError, match="builtin:arithmetic, builtin:arithmetic-test"):
        load_rows("builtin:algebra")


def test_gsm8k_file_gives_bare_gold_answers(tokenizer):
    examples = load_examples(str(TEST_DATA / "gsm8k_test_200.jsonl"), DataSpec(), tokenizer)
    assert len(examples.items) == 200 and examples.skipped == 0
    first = examples.items[0]
    assert first.answer == "18" and first.prompt.startswith("Janet")


def test_math500_uses_its_answer_field(tokenizer):
    spec = DataSpec(prompt_field="problem", template="Problem: {problem}\nSolution:")
    examples = load_examples(str(TEST_DATA / "math500_test.jsonl"), spec, tokenizer)
    assert len(examples.items) == 500
    assert examples.items[0].prompt.startswith("Problem: Convert the point")
    assert is_equivalent(examples.items[0].answer, "\\left( 3, \\frac{\\pi}{2} \\right)")


@pytest.mark.parametrize("suffix, write", [
    (".jsonl", lambda rows: "".join(json.dumps(r) + "\n" for r in rows)),
    (".json", lambda rows: json.dumps(rows)),
    (".csv", lambda rows: "q,a\n" + "".join(f"{r['q']},{r['a']}\n" for r in rows)),
])
def test_local_file_formats(tmp_path, tokenizer, suffix, write):
    rows = [{"q": "1+1?", "a": "2"}, {"q": "2+2?", "a": "4"}]
    path = tmp_path / f"data{suffix}"
    path.write_text(write(rows))
    examples = load_examples(str(path), DataSpec(prompt_field="q", answer_field="a"), tokenizer)
    assert [(e.prompt, e.answer) for e in examples.items] == [("1+1?", "2"), ("2+2?", "4")]


def test_relative_paths_fall_back_to_the_recipe_directory(tmp_path, tokenizer, monkeypatch):
    (tmp_path / "d.jsonl").write_text('{"question": "q", "answer": "1"}\n')
    monkeypatch.chdir(tmp_path.parent)
    examples = load_examples("d.jsonl", DataSpec(), tokenizer, base_dir=tmp_path)
    assert examples.items[0].answer == "1"


def test_missing_file_is_explained(tokenizer):
    with pytest.raises(UserError, match="data file missing.jsonl not found"):
        load_examples("missing.jsonl", DataSpec(), tokenizer)


def test_missing_fields_name_the_available_ones(tokenizer):
    rows = [{"problem": "1+1", "solution": "2"}]
    with pytest.raises(UserError) as error:
        build_examples(rows, DataSpec(), tokenizer, "mine")
    message = str(error.value)
    assert "'answer', 'question'" in message and "Its fields are: problem, solution" in message


def test_rows_without_an_answer_are_skipped_and_counted(tokenizer):
    rows = [{"question": "a", "answer": "1"}, {"question": "b", "answer": ""}, {"question": "c", "answer": None}]
    examples = build_examples(rows, DataSpec(), tokenizer, "mine")
    assert len(examples.items) == 1 and examples.skipped == 2


def test_empty_dataset_is_an_error(tokenizer):
    with pytest.raises(UserError, match="empty"):
        build_examples([], DataSpec(), tokenizer, "mine")


def test_chat_template_with_system_prompt(tokenizer):
    spec = DataSpec(chat=True, system_prompt="Be brief.")
    example = build_examples([{"question": "1+1?", "answer": "2"}], spec, tokenizer, "mine").items[0]
    assert example.prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert example.prefill == ""


def test_a_template_that_opens_think_is_recorded_as_prefill(tokenizer):
    tokenizer = build_tokenizer()
    tokenizer.chat_template = tokenizer.chat_template + "{% if add_generation_prompt %}<think>\n{% endif %}"
    example = build_examples([{"question": "q", "answer": "1"}], DataSpec(chat=True), tokenizer, "m").items[0]
    assert example.prompt.endswith("<think>\n") and example.prefill == "<think>\n"


THINKING = DataSpec(chat=True, chat_template_kwargs={"enable_thinking": True})


def test_chat_template_kwargs_reach_the_template_and_what_it_opens_is_the_prefill():
    tokenizer = thinking_tokenizer()
    rows = [{"question": "q", "answer": "1"}]
    thinking = build_examples(rows, THINKING, tokenizer, "m").items[0]
    assert thinking.prompt == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert thinking.prefill == "<think>\n"  # graded as the start of the completion
    plain = build_examples(rows, DataSpec(chat=True), tokenizer, "m").items[0]
    assert plain.prompt.endswith("assistant\n") and plain.prefill == ""


def test_a_chat_template_kwarg_the_template_ignores_is_refused():
    spec = DataSpec(chat=True, chat_template_kwargs={"enable_thinkng": True})  # misspelt
    with pytest.raises(UserError, match=r"data.chat_template_kwargs.enable_thinkng: the chat template of the model "
                                        r"does not use it; its variables are enable_thinking\."):
        build_examples([{"question": "q", "answer": "1"}], spec, thinking_tokenizer(), "m")
    with pytest.raises(UserError, match="enable_thinking: the chat template .* it reads no variables of its own"):
        build_examples([{"question": "q", "answer": "1"}], THINKING, build_tokenizer(), "m")


def test_a_kwarg_the_template_reads_is_kept_even_when_it_renders_as_the_default():
    # Qwen3: enable_thinking true is its default, so the prompt does not change; the template still reads it
    tokenizer = thinking_tokenizer(QWEN3_STYLE_TEMPLATE)
    assert build_examples([{"question": "q", "answer": "1"}], THINKING, tokenizer, "m").items[0].prefill == ""
    off = DataSpec(chat=True, chat_template_kwargs={"enable_thinking": False})
    assert build_examples([{"question": "q", "answer": "1"}], off, tokenizer, "m").items[0].prompt.endswith(
        "<think>\n\n</think>\n\n")
    assert template_variables(tokenizer.chat_template) == ["enable_thinking"]  # messages, add_generation_prompt: ours


def test_hub_failure_is_a_user_error():
    with pytest.raises(UserError, match="could not load dataset no-such-org/no-such-set"):
        load_rows(HubDataset(name="no-such-org/no-such-set"))


def test_prompt_order_is_a_seeded_permutation_per_epoch():
    order = PromptOrder(5, seed=3)
    first = order.take(5)
    assert sorted(first) == [0, 1, 2, 3, 4]
    second = order.take(5)
    assert sorted(second) == [0, 1, 2, 3, 4] and second != first
    assert PromptOrder(5, seed=3).take(10) == first + second


def test_prompt_order_resumes_from_its_state():
    order = PromptOrder(7, seed=1)
    order.take(4)
    resumed = PromptOrder(7, seed=1, **order.state())
    assert resumed.take(9) == order.take(9)


def test_a_template_replaces_the_prompt_field(tokenizer):
    rows = [{"problem": "1+1", "answer": "2"}]
    examples = build_examples(rows, DataSpec(template="Problem: {problem}"), tokenizer, "m")
    assert examples.items[0].prompt == "Problem: 1+1"


def test_a_broken_template_is_explained(tokenizer):
    with pytest.raises(UserError, match="not a valid format string"):
        build_examples([{"question": "q", "answer": "1"}], DataSpec(template="Q: {question"), tokenizer, "m")


def test_columnar_json_is_read_as_its_rows(tmp_path, tokenizer):
    # {"question": [...], "answer": [...]} (pandas' to_dict("list")) and pandas' to_json() ({column: {index: value}})
    spec = DataSpec(prompt_field="q", answer_field="a")
    lists = tmp_path / "lists.json"
    lists.write_text(json.dumps({"q": ["1+1?", "2+2?", "3+3?"], "a": ["2", "4", "6"]}))
    examples = load_examples(str(lists), spec, tokenizer)
    assert [(e.prompt, e.answer) for e in examples.items] == [("1+1?", "2"), ("2+2?", "4"), ("3+3?", "6")]
    indexed = tmp_path / "indexed.json"
    indexed.write_text(json.dumps({"q": {"0": "1+1?", "1": "2+2?"}, "a": {"0": "2", "1": "4"}}))
    assert [e.prompt for e in load_examples(str(indexed), spec, tokenizer).items] == ["1+1?", "2+2?"]
    ragged = tmp_path / "ragged.json"
    ragged.write_text(json.dumps({"q": ["1+1?", "2+2?"], "a": ["2"]}))
    with pytest.raises(UserError, match=r"ragged.json holds columns of different lengths \(q: 2, a: 1\)"):
        load_rows(str(ragged))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 1, "data": [{"q": "1+1?", "a": "2"}]}))
    with pytest.raises(UserError, match=r"wrapped.json holds an object, not rows.*one object per line"):
        load_rows(str(wrapped))
    wrapped.write_text(json.dumps({"data": [{"q": "1+1?", "a": "2"}]}))
    with pytest.raises(UserError, match=r"wrapped.json holds its rows under 'data'; write the list itself"):
        load_rows(str(wrapped))


def test_a_json_file_holding_json_lines_is_still_read(tmp_path, tokenizer):
    # what datasets' to_json writes, whatever the suffix
    path = tmp_path / "d.json"
    path.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?", "answer": "4"}\n')
    assert [e.answer for e in load_examples(str(path), DataSpec(), tokenizer).items] == ["2", "4"]


def test_malformed_lines_in_a_data_file_are_refused_with_their_numbers(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?", "answer": \n\n'
                    '{"question": "3+3?", "answer": "6"}\n{"question": "4+4?"\n')
    with pytest.raises(UserError) as error:
        load_examples(str(path), DataSpec(), tokenizer)
    message = str(error.value)
    assert f"{path}: 2 of 4 lines are not JSON objects: line 2 (" in message and ", line 5 (" in message


def test_a_data_line_that_is_not_an_object_is_refused(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "1+1?", "answer": "2"}\n["2+2?", "4"]\n')
    with pytest.raises(UserError, match=r"d.jsonl: 1 of 2 lines are not JSON objects: line 2 \(an array"):
        load_examples(str(path), DataSpec(), tokenizer)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_data_file_that_is_not_utf8_names_the_line(tmp_path, tokenizer, suffix):
    rows = {".jsonl": b'{"question": "1+1?", "answer": "2"}\n{"question": "caf\xe9?", "answer": "4"}\n',
            ".json": b'[{"question": "1+1?", "answer": "2"},\n {"question": "caf\xe9?", "answer": "4"}]\n',
            ".csv": b'question,answer\n1+1?,2\ncaf\xe9?,4\n'}
    path = tmp_path / f"d{suffix}"
    path.write_bytes(rows[suffix])
    line = 3 if suffix == ".csv" else 2
    with pytest.raises(UserError, match=rf"d\{suffix} line {line}: byte 0xe9 .* is not UTF-8"):
        load_examples(str(path), DataSpec(), tokenizer)


def test_skipped_rows_are_reported_with_their_reason_and_line(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    rows = [{"question": "1+1?", "answer": "2"}, {"question": "2+2?", "answer": ""}, {"question": "3+3?"},
            {"question": None, "answer": "6"}, {"question": "5+5?", "answer": "Work.\n####"},
            {"question": "6+6?", "answer": None}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_examples(str(path), DataSpec(), tokenizer)
    assert [e.answer for e in examples.items] == ["2"] and examples.skipped == 5
    assert examples.skips == {"no answer": ["line 2", "line 3", "line 6"], "no prompt": ["line 4"],
                              "an answer that reduces to nothing": ["line 5"]}
    assert examples.skip_note() == ("5 rows skipped: 3 with no answer (line 2, line 3, line 6), 1 with no prompt "
                                    "(line 4), 1 with an answer that reduces to nothing (line 5)")


def test_prompts_outside_the_tokenizer_vocabulary_are_skipped_and_reported(tmp_path, tokenizer):
    # the builtin tokenizer is character-level and English: Chinese reads as <|unk|> tokens
    path = tmp_path / "d.jsonl"
    rows = [{"question": "1+1?", "answer": "2"}, {"question": "一加一等于几？", "answer": "2"},
            {"question": "3加5等于多少？", "answer": "8"}, {"question": "What is 2+2? 请回答", "answer": "4"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    examples = load_examples(str(path), DataSpec(), tokenizer)
    assert [e.answer for e in examples.items] == ["2", "4"]  # 3 of its 16 characters unknown: kept
    assert examples.skips == {"a prompt mostly outside the tokenizer's vocabulary": ["line 2", "line 3"]}
    every = tmp_path / "zh.jsonl"
    every.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[1:3]))
    with pytest.raises(UserError, match=r"every prompt .* is mostly outside the tokenizer's vocabulary"):
        load_examples(str(every), DataSpec(), tokenizer)
