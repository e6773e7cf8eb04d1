"""A stand-in for the sandbox in tests of the decode loop: runs the (trusted, test-written) code in this
process, so those tests exercise the loop alone; tests/test_sandbox.py covers the sandbox. And transcripts
written as the rollout writes them."""

from __future__ import annotations

import contextlib
import io
import itertools
from dataclasses import dataclass

from grpo_cli.tools.calls import output_block
from grpo_cli.rollout.with_tools import ToolSettings


def called(code: str, printed: str, after: str = "") -> str:
    """A transcript as the rollout writes it: the model's block, the tool's output block, what the model wrote next."""
    block = f"Let me compute.\n```python\n{code}\n```"
    return block + output_block(block, printed) + after


@dataclass(kw_only=True, frozen=True)
class FakeOutcome:
    status: str
    stdout: str
    error: str = ""
    seconds: float = 0.001
    truncated: bool = False

    def shown(self, max_chars: int = 400) -> str:
        return self.stdout.rstrip("\n") if self.status == "ok" else self.error


class InProcessTools:
    isolation = {"process": "none: the test's own process (a stand-in for the sandbox)"}
    restarts = 0  # a process of its own never dies under it

    def __init__(self, max_calls: int = 4):
        self.settings = ToolSettings(max_calls=max_calls)
        self.calls: dict[int, str] = {}
        self.ids = itertools.count()

    def start_rollout(self) -> None:
        pass

    def submit(self, code: str) -> int:
        call = next(self.ids)
        self.calls[call] = code
        return call

    def wait(self, ids: list[int]):
        outcomes = {}
        for call in ids:
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    exec(self.calls[call], {})
                outcomes[call] = FakeOutcome(status="ok", stdout=out.getvalue())
            except Exception as error:  # the error line, as the sandbox reports it
                outcomes[call] = FakeOutcome(status="error", stdout=out.getvalue(),
                                             error=f"{type(error).__name__}: {error}")
        return outcomes, 0.0
