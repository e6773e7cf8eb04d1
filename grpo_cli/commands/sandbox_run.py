"""grpo sandbox run: one file through the code tool's sandbox, exactly as a rollout's call runs it.

Users run it to see what the tool does on their machine (which layers hold, what a piece of code
prints, where it is stopped); the tests run it as a real subprocess. The file's text is the code of
one ```python block; what is printed is the output block a completion would get appended, and the
layers in force go to stderr.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from grpo_cli.tools import calls as tool_calls
from grpo_cli.errors import UserError
from grpo_cli.tools.sandbox import Limits, Outcome, Sandbox


@dataclass(frozen=True)
class FileRun:
    outcome: Outcome
    block: str  # the output block as appended after the block's closing fence and its newline
    isolation: dict[str, str]


def check_tool_limits(options: dict[str, str], **values) -> None:
    """UserError unless each value lies within the recipe's bounds for its grpo field (tool_timeout_s,
    tool_memory_mb, max_tool_calls): the bounds are stated once, in config/sections.py. `options` names the command
    line option each field was given as, for the message."""
    from grpo_cli.config.recipe import GrpoSpec, out_of_bounds

    for name, value in values.items():
        problem = out_of_bounds(GrpoSpec, name, value)
        if problem:
            raise UserError(f"{options[name]} {value}: {problem.lower()} (as grpo.{name} in a recipe: "
                            f"{GrpoSpec.model_fields[name].description})")


def run_file(path: Path, timeout_s: float, memory_mb: int) -> FileRun:
    """Run the Python in `path` as one tool call with these limits (a rollout's: grpo.tool_timeout_s,
    grpo.tool_memory_mb); UserError if the file cannot be read as text or this machine refuses the tool."""
    try:
        code = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot be read as UTF-8 text ({e})") from None
    # parallel=1: one call; the server's start-up (imports, probe) is most of the time anyway
    with Sandbox(Limits(timeout_s=timeout_s, memory_mb=memory_mb), parallel=1) as sandbox:
        outcome = sandbox.run(code)
        isolation = dict(sandbox.isolation)
    return FileRun(outcome=outcome, block=tool_calls.output_block("```\n", outcome.shown(tool_calls.SHOWN_CHARS)),
                   isolation=isolation)
