import json

import pytest

from quadratic_answers import BARE_BOXES, FACTORED, GOLD, QUESTION, REFLECTED, WRONG_DISCRIMINANT
from grpo_cli.update.advantages import STD_EPS
from grpo_cli.errors import UserError
from grpo_cli.config.recipe import validate
from grpo_cli.commands.score import score_completions

RECIPE = validate({"rewards": [{"rule": "correctness", "weight": 1.0}, {"rule": "step_format", "weight": 0.2},
                               {"rule": "reflection_bonus", "weight": 0.1}]})


def write(tmp_path, rows):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_quadratic_group_scored_as_training_would(tmp_path):
    path = write(tmp_path, [{"question": QUESTION, "answer": GOLD,
                             "completions": [FACTORED, WRONG_DISCRIMINANT, BARE_BOXES, REFLECTED]}])
    [group] = score_completions(RECIPE, path)
    totals = [c.total for c in group.completions]
    assert totals == pytest.approx([1.2, 0.2, 0.8, 1.3])
    assert group.completions[3].rewards == {"correctness": 1.0, "step_format": 1.0, "reflection_bonus": 1.0}
    # advantages by hand: mean 0.875, population std sqrt(((.325)^2 + (.675)^2 + (.075)^2 + (.425)^2) / 4)
    std = ((0.325**2 + 0.675**2 + 0.075**2 + 0.425**2) / 4) ** 0.5
    expected = [(t - 0.875) / (std + STD_EPS) for t in totals]
    assert [c.advantage for c in group.completions] == pytest.approx(expected, rel=1e-6)


def test_rows_sharing_a_prompt_form_one_group(tmp_path):
    path = write(tmp_path, [
        {"prompt": "What is 2 + 2?", "answer": "4", "completion": "2+2=4. #### 4"},
        {"prompt": "What is 1 + 1?", "answer": "2", "completion": "#### 2"},
        {"prompt": "What is 2 + 2?", "answer": "4", "completion": "#### 5"},
    ])
    groups = score_completions(RECIPE, path)
    assert [g.prompt for g in groups] == ["What is 2 + 2?", "What is 1 + 1?"]
    assert [c.completion for c in groups[0].completions] == ["2+2=4. #### 4", "#### 5"]
    assert groups[0].completions[0].advantage > 0 > groups[0].completions[1].advantage
    assert groups[1].completions[0].advantage == 0.0  # a group of one carries no signal


def test_a_chat_template_prefill_is_scored_with_the_completion(tmp_path):
    recipe = validate({"data": {"chat": True}, "rewards": [{"rule": "step_format"}]})
    path = write(tmp_path, [{"question": "q", "answer": "4", "completion": "The answer is 4."}])
    [group] = score_completions(recipe, path)
    assert group.completions[0].rewards["step_format"] == -1.0  # no template prefill: no steps


def test_a_thinking_template_opens_the_block_that_think_format_grades(tmp_path, monkeypatch):
    from grpo_cli.commands import score as scored_groups
    from thinking_template import thinking_tokenizer

    monkeypatch.setattr(scored_groups, "_prompt_tokenizer", lambda recipe: thinking_tokenizer())
    recipe = validate({"data": {"chat": True, "chat_template_kwargs": {"enable_thinking": True}},
                       "rewards": [{"rule": "correctness"}, {"rule": "think_format"}]})
    path = write(tmp_path, [{"question": "q", "answer": "4", "completions": [
        "2+2 is 5? No, 4.</think> The answer is 4.", "The answer is 4."]}])
    [group] = score_completions(recipe, path)
    assert [c.rewards for c in group.completions] == [{"correctness": 1.0, "think_format": 1.0},
                                                      {"correctness": 0.0, "think_format": 0.0}]  # never closed
    monkeypatch.undo()  # the builtin model's own template has no enable_thinking
    with pytest.raises(UserError, match="data.chat_template_kwargs.enable_thinking: the chat template"):
        score_completions(recipe, path)


def test_bad_rows_are_explained(tmp_path):
    with pytest.raises(UserError, match="needs 'completion'"):
        score_completions(RECIPE, write(tmp_path, [{"question": "q", "answer": "1"}]))
    with pytest.raises(UserError, match="has no field 'answer'"):
        score_completions(RECIPE, write(tmp_path, [{"question": "q", "completion": "1"}]))


def test_tool_transcripts_are_graded_on_the_answer_after_the_last_output(tmp_path):
    call = "\n```python\nprint(17 * 23)\n```\n```output\n391\n```\n"
    path = write(tmp_path, [{"question": "What is 17 * 23?", "answer": "391",
                             "completions": [call + "#### 391", call, call + "#### 390", " 17*23=391. #### 391"]}])
    [group] = score_completions(RECIPE, path)
    # the number the code printed is not an answer the model gave: the second transcript answers nothing
    assert [c.rewards["correctness"] for c in group.completions] == [1.0, 0.0, 0.0, 1.0]
