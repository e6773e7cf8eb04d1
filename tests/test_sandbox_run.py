"""grpo sandbox run: a file through the sandbox as a rollout's call, through Typer's runner and as a real
subprocess: the output block exactly as a completion would get it, the layers on stderr, the exit status."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from grpo_cli.cli import app

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox runs code on Linux only")
runner = CliRunner()


def run(tmp_path, code: str, *options: str):
    path = tmp_path / "attempt.py"
    path.write_text(code)
    return runner.invoke(app, ["sandbox", "run", str(path), *options])


def test_a_call_that_works_prints_its_output_block_and_exits_0(tmp_path):
    result = run(tmp_path, "print(17 * 23)")
    assert result.exit_code == 0, result.output
    assert result.stdout == "```output\n391\n```\n"
    assert "system calls:" in result.stderr and "status: ok" in result.stderr


def test_printed_fences_cannot_close_the_block(tmp_path):
    result = run(tmp_path, 'print("1\\n```\\nSo the answer is \\\\boxed{391}.")')
    assert result.exit_code == 0
    assert result.stdout == "```output\n1\n` ` `\nSo the answer is \\boxed{391}.\n```\n"


def test_a_failing_call_exits_1_with_the_error_line(tmp_path):
    raised = run(tmp_path, "print('partial')\nraise ValueError('no')")
    assert (raised.exit_code, raised.stdout) == (1, "```output\npartial\nValueError: no\n```\n")
    slow = run(tmp_path, "while True: pass", "--timeout", "1")
    assert (slow.exit_code, slow.stdout) == (1, "```output\ntimed out after 1 s\n```\n")


@pytest.mark.parametrize("options", [["--timeout", "0"], ["--timeout", "-1"], ["--timeout", "601"],
                                     ["--memory-mb", "10"], ["--memory-mb", "-5"]])
def test_limits_out_of_the_recipes_bounds_are_refused(tmp_path, options):
    result = run(tmp_path, "print(1)", *options)
    assert result.exit_code == 2 and f"error: {options[0]} " in result.stderr and "grpo.tool_" in result.stderr
    assert result.stdout == ""


def test_a_file_that_is_not_there_or_not_text_is_refused(tmp_path):
    missing = runner.invoke(app, ["sandbox", "run", str(tmp_path / "missing.py")])
    assert missing.exit_code == 2 and "no such file" in missing.stderr
    binary = tmp_path / "binary.py"
    binary.write_bytes(b"\xff\xfe\x00print(1)")
    unreadable = runner.invoke(app, ["sandbox", "run", str(binary)])
    assert unreadable.exit_code == 2 and "cannot be read as UTF-8 text" in unreadable.stderr


def test_as_a_subprocess(tmp_path):
    from grpo_cli.tools import sandbox_filter

    if not sandbox_filter.supported():
        pytest.skip("the call below is refused by the system-call filter, which this machine's kernel or CPU lacks")
    path = tmp_path / "attempt.py"
    path.write_text("import socket\nsocket.socket(socket.AF_UNIX)")
    done = subprocess.run([sys.executable, "-m", "grpo_cli", "sandbox", "run", str(path), "--timeout", "2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stdout == "```output\nPermissionError: [Errno 13] Permission denied\n```\n"
    assert "limits: 2 s wall clock" in done.stderr
