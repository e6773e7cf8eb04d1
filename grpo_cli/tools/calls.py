"""Tool calls in a completion's text: the format (text only; rollout/with_tools.py makes the calls).

The format is Qwen2.5-Math's tool-integrated reasoning, so models trained for it work
unchanged: the model writes a ```` ```python ```` block and closes it; the block runs
on its own, in a fresh sandboxed process (no state carries over from an earlier block,
as in Qwen's evaluation); and

    \\n```output\\n<stdout, or the error's last line>\\n```\\n

is appended to the transcript, after which the model continues. The output block's
tokens are context, not actions: the update leaves them out of the loss, the KL, the
entropy and every length normalization (`Rollout.action_mask`), and the grader reads
the final answer after the last output block (`answers.find_final`).

What the tool printed is never the model's text. In training the rollout knows its characters
from its tool mask (`Rollout.tool_outputs`, `printed_in`); where only text is left (`grpo score`,
`grpo eval`, `grpo samples`) they are found by reading the transcript as the rollout wrote it
(`printed_spans`): an output block directly follows a closed python block, and ends at the first
line that starts with three backticks, or at the text's end. So that no output can end its block
early, every run of three or more backticks in it is written with a space between each two
(three become "` ` `", four "` ` ` `"; one or two stay as they are): still backticks to a reader,
never a fence, nothing a tokenizer here lacks (`escape_fences`; characters the tokenizer cannot
encode are dropped before, tool_rollout._as_decoded). So the two readings agree (tested). The
builtin reward rules grade `model_text`: the transcript with what the tool printed left out, its
blocks kept empty.

Budget: `grpo.max_new_tokens` bounds the whole completion, tool output included, since
the output occupies the same KV cache and the same training sequence as the model's
own tokens; an output that does not fit is cut at the budget, which ends the row
(truncated): its block then runs to the end of the text. A block closed after
`grpo.max_tool_calls` calls is not run: its output block says so.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

TOOLS = ("python",)  # the tools a recipe can name in grpo.tools
OUTPUT_OPEN = "```output\n"
OUTPUT_CLOSE = "\n```\n"
SHOWN_CHARS = 400  # of a call's output, shown to the model (first and last halves around a marker)
Span = tuple[int, int]  # [start, end) characters of a transcript
# A closed python block: the opening fence, the code, a fence at the start of a line.
_CODE_BLOCK = re.compile(r"```python[^\n]*\n(.*?)\n[ \t]*```", re.DOTALL)
# From a closed python block's fence to its output: the rest of the fence's token, the newline output_block puts
# in. The row paused at that token, so nothing the model wrote can stand here.
_OUTPUT_OPENING = re.compile(r"[^\n]*\n*" + re.escape(OUTPUT_OPEN))
_OUTPUT_END = "\n```"  # the first line of an output block that starts with a fence ends it (escaped, none inside)
_FENCE_RUN = re.compile(r"`{3,}")


def closed_code(text: str) -> str | None:
    """The code of the first python block `text` closes, or None while none is closed."""
    match = _CODE_BLOCK.search(text)
    return match.group(1) if match else None


def escape_fences(shown: str) -> str:
    """`shown` with every run of three or more backticks spaced out ("```" -> "` ` `"): a fence in what the
    code printed would end its output block early, and what it printed after that would read as the model's."""
    return _FENCE_RUN.sub(lambda run: " ".join(run.group()), shown)


def output_block(text_so_far: str, shown: str) -> str:
    """The block appended after a closed code block, `shown` escaped (escape_fences): one newline between the
    closing fence and "```output" whether or not the model already wrote it (the closing token may carry it)."""
    lead = "" if text_so_far.endswith("\n") else "\n"
    return f"{lead}{OUTPUT_OPEN}{escape_fences(shown)}{OUTPUT_CLOSE}"


def limit_note(max_calls: int) -> str:
    return f"not run: this completion has used its {max_calls} tool calls (grpo.max_tool_calls)"


def printed_in(text: str, block: Span) -> Span | None:
    """What the tool printed inside the output block that spans `block` of `text`, known from the rollout's
    mask: the block less the frame output_block put around it, its closing fence only where the budget left
    it whole. None when the budget cut the block before its opening line was whole: nothing printed is there."""
    start, end = block
    for lead in ("", "\n"):
        if text.startswith(lead + OUTPUT_OPEN, start, end):
            printed = start + len(lead) + len(OUTPUT_OPEN)
            closing = next((c for c in (OUTPUT_CLOSE, _OUTPUT_END) if text.endswith(c, printed, end)), "")
            return printed, end - len(closing)
    return None


def _calls(text: str) -> Iterator[tuple[Span, Span | None]]:
    """(code block, output block or None) of each python block `text` closes, in order, read as the rollout
    wrote them: from the end of the last output, the first closed python block, then directly its output,
    from "```output" to the end of its closing fence (the text's end when the budget cut it)."""
    at = 0
    while code := _CODE_BLOCK.search(text, at):
        opening = _OUTPUT_OPENING.match(text, code.end())
        if opening is None:  # no output: the text ended at its fence, or was written without the tool
            yield code.span(), None
            at = code.end()
            continue
        closing = text.find(_OUTPUT_END, opening.end())
        end = len(text) if closing < 0 else closing + len(_OUTPUT_END)
        yield code.span(), (opening.end() - len(OUTPUT_OPEN), end)
        at = end


def printed_spans(text: str) -> list[Span]:
    """The characters of `text` that the tool printed, one span per output block (see _calls)."""
    return [printed_in(text, output) for _, output in _calls(text) if output is not None]


def model_text(text: str, printed: list[Span] | None = None, keep_places: bool = False) -> str:
    """`text` without what the tool printed (`printed`, default printed_spans(text)), the output blocks kept empty:
    the model's own text, which the builtin reward rules grade. `keep_places`: blanked instead, so indices stay."""
    printed = printed_spans(text) if printed is None else printed
    pieces, at = [], 0
    for start, end in printed:
        pieces += [text[at:start], " " * (end - start) if keep_places else ""]
        at = end
    return "".join(pieces) + text[at:]


def after_last_output(text: str) -> int:
    """Index in `text` just past its last output block's closing fence (0 without one): the final answer is
    read from there on, so a number the code printed is never taken for the model's answer."""
    ends = [output[1] for _, output in _calls(text) if output is not None]
    return ends[-1] if ends else 0


def split_transcript(text: str) -> list[tuple[str, str]]:
    """(kind, text) pieces in order, kind one of "text", "code", "output": for showing a transcript
    with its code and outputs told apart."""
    pieces, at = [], 0
    for code, output in _calls(text):
        for kind, span in (("code", code), ("output", output)):
            if span is None:
                continue
            if span[0] > at:
                pieces.append(("text", text[at : span[0]]))
            pieces.append((kind, text[span[0] : span[1]]))
            at = span[1]
    if at < len(text):
        pieces.append(("text", text[at:]))
    return pieces


def count_calls(text: str) -> int:
    """Output blocks in a transcript: the calls made (a refused call shows its note as output)."""
    return sum(output is not None for _, output in _calls(text))
