"""The tool-integrated format in text (tool_calls.py), and what the grader reads from a transcript."""

from grpo_cli import builtin_task
from grpo_cli.answers import extract_final_answer, is_correct
from grpo_cli.tool_calls import (after_last_output, closed_code, count_calls, output_block, split_transcript)

CALL = "Let me compute.\n```python\nprint(17 * 23)\n```\n```output\n391\n```\n"


def test_a_block_counts_as_closed_only_once_its_fence_is_written():
    assert closed_code("```python\nprint(1)\n") is None
    assert closed_code("```python\nprint(1)\n``") is None
    assert closed_code("```python\nprint(1)\n```") == "print(1)"
    assert closed_code("```python\nx = 2\nprint(x)\n  ```\n") == "x = 2\nprint(x)"
    assert closed_code("```\nprint(1)\n```") is None  # Qwen's format runs python blocks only
    assert closed_code("```python\na = 1\n```\n```python\nb = 2\n```") == "a = 1"  # the first one closed


def test_the_output_block_has_one_newline_after_the_fence_however_the_fence_token_ended():
    assert output_block("```python\nprint(1)\n```", "1") == "\n```output\n1\n```\n"
    assert output_block("```python\nprint(1)\n```\n", "1") == "```output\n1\n```\n"


def test_the_final_answer_is_read_after_the_last_output_never_from_it():
    assert extract_final_answer(CALL + "So the product is 391. #### 391") == "391"
    assert is_correct(CALL + "#### 391", "391")
    # the code printed the answer but the model never wrote one after it: nothing to grade
    printed = "```python\nprint('#### 391')\n```\n```output\n#### 391\n```\n"
    assert extract_final_answer(printed) is None and not is_correct(printed, "391")
    # an answer written before the call and not after it was not the model's last word
    assert not is_correct("#### 390\n" + CALL, "390")


def test_transcripts_split_into_text_code_and_output_in_order():
    text = CALL + "#### 391"
    assert [kind for kind, _ in split_transcript(text)] == ["text", "code", "text", "output", "text"]
    assert "".join(piece for _, piece in split_transcript(text)) == text
    assert count_calls(text) == 1 and count_calls("#### 3") == 0
    assert after_last_output(text) == text.index("#### 391") - 1 and after_last_output("#### 3") == 0


def test_the_builtin_tool_solutions_are_in_the_format_the_rollout_appends():
    for problem in builtin_task.generate(60, seed=5):
        code = closed_code(problem.tool)
        assert code == problem.code
        before = problem.tool[: problem.tool.index(code) + len(code)] + "\n```"
        assert problem.tool.startswith(before + output_block(before, problem.printed))
        assert is_correct(problem.tool, problem.answer)
