"""Tool calls in a completion's text: the format (text only; tool_rollout.py makes the calls).

The format is Qwen2.5-Math's tool-integrated reasoning, so models trained for it work
unchanged: the model writes a ```` ```python ```` block and closes it; the block runs
on its own, in a fresh sandboxed process (no state carries over from an earlier block,
as in Qwen's evaluation); and

    \\n```output\\n<stdout, or the error's last line>\\n```\\n

is appended to the transcript, after which the model continues. The output block's
tokens are context, not actions: the update leaves them out of the loss, the KL, the
entropy and every length normalization (`Rollout.action_mask`), and the grader reads
the final answer after the last output block (`answers.find_final`).

Budget: `grpo.max_new_tokens` bounds the whole completion, tool output included, since
the output occupies the same KV cache and the same training sequence as the model's
own tokens; an output that does not fit is cut at the budget, which ends the row
(truncated). A block closed after `grpo.max_tool_calls` calls is not run: its output
block says so.
"""

from __future__ import annotations

import re

TOOLS = ("python",)  # the tools a recipe can name in grpo.tools
OUTPUT_OPEN = "```output\n"
OUTPUT_CLOSE = "\n```\n"
SHOWN_CHARS = 400  # of a call's output, shown to the model (first and last halves around a marker)
# A closed python block: the opening fence, the code, a fence at the start of a line.
_CODE_BLOCK = re.compile(r"```python[^\n]*\n(.*?)\n[ \t]*```", re.DOTALL)
_OUTPUT_BLOCK = re.compile(r"```output\n.*?\n```", re.DOTALL)
_PIECE = re.compile(f"{_CODE_BLOCK.pattern}|{_OUTPUT_BLOCK.pattern}", re.DOTALL)  # either block, in text order


def closed_code(text: str) -> str | None:
    """The code of the first python block `text` closes, or None while none is closed."""
    match = _CODE_BLOCK.search(text)
    return match.group(1) if match else None


def output_block(text_so_far: str, shown: str) -> str:
    """The block appended after a closed code block: one newline between the closing fence and
    "```output" whether or not the model already wrote it (the closing token may carry it)."""
    lead = "" if text_so_far.endswith("\n") else "\n"
    return f"{lead}{OUTPUT_OPEN}{shown}{OUTPUT_CLOSE}"


def limit_note(max_calls: int) -> str:
    return f"not run: this completion has used its {max_calls} tool calls (grpo.max_tool_calls)"


def after_last_output(text: str) -> int:
    """Index in `text` just past its last output block (0 without one): the final answer is read from
    there on, so a number the code printed is never taken for the model's answer."""
    last = None
    for last in _OUTPUT_BLOCK.finditer(text):
        pass
    return last.end() if last else 0


def split_transcript(text: str) -> list[tuple[str, str]]:
    """(kind, text) pieces in order, kind one of "text", "code", "output": for showing a transcript
    with its code and outputs told apart."""
    pieces, at = [], 0
    for match in _PIECE.finditer(text):
        if match.start() > at:
            pieces.append(("text", text[at : match.start()]))
        kind = "code" if match.group().startswith("```python") else "output"
        pieces.append((kind, match.group()))
        at = match.end()
    if at < len(text):
        pieces.append(("text", text[at:]))
    return pieces


def count_calls(text: str) -> int:
    """Output blocks in a transcript: the calls made (a refused call shows its note as output)."""
    return sum(1 for _ in _OUTPUT_BLOCK.finditer(text))
