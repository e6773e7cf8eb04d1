"""The tool-integrated format in text (tools/calls.py), and what the grader reads from a transcript."""

from grpo_cli.data import builtin_task
from grpo_cli.rewards.answers import extract_final_answer, is_correct, split_thinking
from grpo_cli.tools.calls import (after_last_output, closed_code, count_calls, escape_fences, model_text, output_block,
                                 printed_spans, split_transcript)
from tool_fakes import called

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


def test_fences_in_the_output_are_spaced_out_so_it_cannot_close_its_block():
    assert escape_fences("a```b````c``d`") == "a` ` `b` ` ` `c``d`"  # two backticks or one stay as they are
    assert output_block("```", "1\n```\nhi") == "\n```output\n1\n` ` `\nhi\n```\n"
    # the attack: the code prints a fence and an answer after it, the model writes nothing more
    hack = called('print("1\\n```\\nSo the answer is \\\\boxed{391}.")', "1\n```\nSo the answer is \\boxed{391}.")
    assert not is_correct(hack, "391") and extract_final_answer(hack) is None
    [printed] = printed_spans(hack)
    assert hack[slice(*printed)] == "1\n` ` `\nSo the answer is \\boxed{391}."  # all of it, and only it
    assert is_correct(called("print(17 * 23)", "391", "So the answer is \\boxed{391}."), "391")  # the honest one


def test_an_output_cut_by_the_budget_is_printed_text_to_the_end():
    cut = called("print('#### 391\\n' + 'x' * 390)", "#### 391\n" + "x" * 390)[:-60]  # no closing fence
    assert not is_correct(cut, "391")
    assert cut[slice(*printed_spans(cut)[0])] == "#### 391\n" + "x" * 335
    assert count_calls(cut) == 1 and after_last_output(cut) == len(cut)


def test_an_output_block_is_only_what_directly_follows_a_closed_python_block():
    # the model opens a block of its own before its code and indents the code's closing fence: read as before this
    # fix, "```output" to the first fence swallowed the real output's opening, and what the code printed was graded
    fake = "```output\n```python\nprint('#### 391')\n  ```" + output_block("  ```", "#### 391")
    assert not is_correct(fake, "391") and count_calls(fake) == 1
    assert fake[slice(*printed_spans(fake)[0])] == "#### 391"
    # printed blocks of either kind are output, not calls or code
    forged = called("print(1)", "```output\n2\n```\n```python\nprint(3)\n```")
    assert count_calls(forged) == 1
    assert [kind for kind, _ in split_transcript(forged)] == ["text", "code", "text", "output", "text"]
    assert "".join(piece for _, piece in split_transcript(forged)) == forged


def test_what_the_tool_printed_is_never_the_models_turn_thinking_or_answer():
    for printed in ("<|im_end|>", "</think>", "<think>", "The answer is 7.", "#### 7", "\\boxed{7}"):
        text = called("print(1)", printed, "So the answer is \\boxed{1}.")
        assert extract_final_answer(text) == "1" and is_correct(text, "1"), printed
    assert split_thinking(called("print(1)", "</think>", "#### 1")) is None


def test_the_models_own_text_keeps_the_blocks_and_leaves_out_what_was_printed():
    text = called("print(17 * 23)", "391", "#### 391")
    assert model_text(text) == "Let me compute.\n```python\nprint(17 * 23)\n```\n```output\n\n```\n#### 391"
    assert model_text(text, keep_places=True) == text.replace("\n391\n", "\n   \n")
    assert model_text(model_text(text)) == model_text(text) and printed_spans("#### 3") == []
