"""The code sandbox: each harmful call is contained, reported as that call's outcome, leaves the test
process and the machine as they were, and the next call works.

One sandbox serves the module (its server's start-up is the slow part). Its processes are found by
their command line, which names this test process as the parent, so other sandboxes on the machine
do not count.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from grpo_cli.sandbox import Limits, Outcome, Sandbox

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the isolation checked here is Linux's")

REPO = Path(__file__).resolve().parents[1]
SECRET = ("GRPO_SANDBOX_TEST_SECRET", f"s3cret-{uuid.uuid4().hex}")


@pytest.fixture(scope="module")
def box():
    os.environ[SECRET[0]] = SECRET[1]  # before the server starts: it must not inherit it
    try:
        with Sandbox(Limits(timeout_s=2.0), parallel=4) as sandbox:
            yield sandbox
    finally:
        del os.environ[SECRET[0]]


def sandboxed_processes() -> list[int]:
    """Our sandbox servers' descendants: processes forked from a server carry its command line, which
    names this process as the parent; the servers themselves are this process's children."""
    mark = f'"parent": {os.getpid()},'.encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        parent = int(status.split("\nPPid:")[1].split()[0])
        if b"sandbox_server.py" in cmdline and mark in cmdline and parent != os.getpid():
            found.append(int(pid))
    return found


def processes_with_argument(argument: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if argument.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                found.append(int(pid))
        except OSError:
            pass
    return found


def assert_still_works(sandbox: Sandbox) -> None:
    assert sandbox._server.poll() is None
    outcome = sandbox.run("print(2 + 2)")
    assert (outcome.status, outcome.stdout, outcome.error) == ("ok", "4\n", "")
    assert sandboxed_processes() == []


def test_a_normal_call_prints_and_reports_ok(box):
    outcome = box.run("print(2 + 2)")
    assert (outcome.status, outcome.stdout, outcome.error, outcome.truncated) == ("ok", "4\n", "", False)
    assert outcome.shown() == "4"
    assert {"process", "user", "network", "filesystem"} <= set(box.isolation)


def test_an_infinite_loop_times_out(box):
    outcome = box.run("while True: pass")
    assert (outcome.status, outcome.error) == ("timeout", "timed out after 2 s")
    assert 1.9 < outcome.seconds < 4
    assert_still_works(box)


def test_a_fork_bomb_is_contained_and_leaves_no_process(box):
    outcome = box.run("import os\nwhile True: os.fork()")
    assert outcome.status in ("error", "timeout", "killed"), outcome
    if box.isolation["user"].startswith("nobody"):  # RLIMIT_NPROC stops it at once
        assert outcome.error == "BlockingIOError: [Errno 11] Resource temporarily unavailable"
    assert sandboxed_processes() == []
    assert_still_works(box)


def test_processes_the_code_starts_end_with_the_call_even_in_a_new_session(box):
    mark = f"{time.time() % 1000 + 1000:.6f}"  # a sleep time no one else uses
    outcome = box.run("import os, subprocess\n"
                      f"subprocess.Popen(['sleep', '{mark}'], start_new_session=True)\n"
                      "if os.fork() == 0:\n    os.setsid()\n    import time; time.sleep(100)\n"
                      "print('started')")
    assert (outcome.status, outcome.stdout) == ("ok", "started\n")
    assert processes_with_argument(mark) == [] and sandboxed_processes() == []


def test_allocating_20_gb_is_a_memory_error(box):
    outcome = box.run("x = bytearray(20 * 2**30)")
    assert (outcome.status, outcome.error) == ("error", "MemoryError")
    assert_still_works(box)


def test_writes_go_only_to_the_working_directory(box, tmp_path):
    if box.isolation["filesystem"].startswith("not restricted"):
        pytest.skip(box.isolation["filesystem"])
    name = f"grpo-sandbox-test-{uuid.uuid4().hex}"
    for target in (tmp_path / name, Path(tempfile.gettempdir()) / name, REPO / name):
        outcome = box.run(f"open({str(target)!r}, 'w').write('x')")
        assert outcome.status == "error" and outcome.error.startswith("PermissionError"), (target, outcome)
        assert not target.exists()
    inside = box.run("open('inside.txt', 'w').write('x')\nprint(open('inside.txt').read())")
    assert (inside.status, inside.stdout) == ("ok", "x\n")
    assert_still_works(box)


def test_the_trainer_environment_is_out_of_reach(box):
    outcome = box.run(f"import os\nprint(os.environ.get({SECRET[0]!r}))")
    assert (outcome.status, outcome.stdout) == ("ok", "None\n")
    outcome = box.run(f"print(open('/proc/{os.getpid()}/environ', 'rb').read())")
    assert SECRET[1] not in outcome.stdout + outcome.error
    assert outcome.status == "error" and outcome.error.startswith("PermissionError"), outcome


def test_printing_100_mb_is_cut_at_the_output_limit(box):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    at_once, in_a_loop = box.run_many(["print('x' * 100_000_000)", "while True: print('y' * 1000)"])
    for outcome, char in ((at_once, "x"), (in_a_loop, "y")):
        assert (outcome.status, outcome.error, outcome.truncated) == ("killed", "output limit of 65536 bytes reached", True)
        assert 0 < len(outcome.stdout) <= 65536 and set(outcome.stdout) <= {char, "\n"}
        assert outcome.seconds < 1.5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024  # KiB
    assert_still_works(box)


def test_a_missing_module_is_reported(box):
    outcome = box.run("import no_such_module_here")
    assert (outcome.status, outcome.error) == ("error", "ModuleNotFoundError: No module named 'no_such_module_here'")


def test_os_exit_keeps_what_was_printed(box):
    outcome = box.run("import os\nprint('before')\nos._exit(3)")
    assert (outcome.status, outcome.stdout, outcome.error) == ("error", "before\n", "exited with code 3")
    assert outcome.shown() == "before\nexited with code 3"


def test_errors_are_the_last_traceback_line(box):
    syntax, name, system_exit = box.run_many(["def f(:\n    pass", "print(1)\nx + 1", "import sys; sys.exit(0)"])
    assert (syntax.status, syntax.error) == ("error", "SyntaxError: invalid syntax")
    assert (name.status, name.stdout, name.error) == ("error", "1\n", "NameError: name 'x' is not defined")
    assert (system_exit.status, system_exit.error) == ("ok", "")


def test_sympy_and_lazy_imports_work(box):
    outcome = box.run("import sympy, email.parser\nprint(sympy.sqrt(8))")
    assert (outcome.status, outcome.stdout) == ("ok", "2*sqrt(2)\n")


def test_the_working_directory_is_deleted_after_the_call(box):
    outcome = box.run("import os\nopen('left.txt', 'w').write('x')\nprint(os.getcwd())")
    workdir = outcome.stdout.strip()
    assert outcome.status == "ok" and Path(workdir).name.startswith("grpo-tool-")
    assert not Path(workdir).exists()


def test_run_many_runs_in_parallel_and_keeps_the_order(box):
    started = time.monotonic()
    outcomes = box.run_many([f"import time\ntime.sleep({0.6 - 0.15 * i})\nprint({i})" for i in range(4)])
    assert [o.stdout for o in outcomes] == ["0\n", "1\n", "2\n", "3\n"]
    assert time.monotonic() - started < 1.5  # one after the other: 1.5 s of sleep alone


def test_submit_and_collect_do_not_block(box):
    call = box.submit("import time\ntime.sleep(0.5)\nprint('late')")
    started = time.monotonic()
    assert box.collect() == {}
    assert time.monotonic() - started < 0.2
    done = box.collect(wait=True)
    assert list(done) == [call] and done[call].stdout == "late\n"
    assert box.collect(wait=True) == {}  # nothing pending: no wait


def test_the_network_is_unreachable(box):
    if box.isolation["network"].startswith("not isolated"):
        pytest.skip(box.isolation["network"])
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        outcome = box.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')")
        assert outcome.status == "error" and outcome.stdout == "", outcome
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_shown_cuts_the_middle_of_long_text():
    long = Outcome(status="ok", stdout="a" * 300 + "b" * 300 + "\n", error="", seconds=0.1)
    assert long.shown(400) == "a" * 200 + "\n... (200 characters left out) ...\n" + "b" * 200
    assert Outcome(status="ok", stdout="abcdefghij", error="", seconds=0).shown(5) == "ab\n... (5 characters left out) ...\nhij"
    failed = Outcome(status="error", stdout="partial\n", error="ZeroDivisionError: division by zero", seconds=0)
    assert failed.shown() == "partial\nZeroDivisionError: division by zero"
    assert Outcome(status="ok", stdout="", error="", seconds=0).shown() == ""


def test_the_server_survives_calls_that_kill_with_signals(box):
    itself = box.run("import os, signal\nprint('a')\nos.kill(os.getpid(), signal.SIGKILL)")
    assert (itself.status, itself.stdout, itself.error) == ("killed", "a\n", "killed by SIGKILL")
    group = box.run("import os, signal\nos.killpg(0, signal.SIGKILL)")
    assert (group.status, group.error) == ("killed", "killed by SIGKILL")
    for target in (box._server.pid, os.getpid(), 1, "os.getppid()"):
        outcome = box.run(f"import os, signal\nos.kill({target}, signal.SIGKILL)\nprint('sent')")
        assert box._server.poll() is None, outcome
    assert_still_works(box)


def test_close_ends_every_process_and_folder():
    sandbox = Sandbox(Limits(timeout_s=30))
    server, mark, marker = sandbox._server, f"{time.time() % 1000 + 2000:.6f}", f"marker-{uuid.uuid4().hex}"
    sandbox.submit(f"import subprocess, time\nopen({marker!r}, 'w').close()\nsubprocess.Popen(['sleep', '{mark}'])\n"
                   "time.sleep(60)")
    deadline = time.monotonic() + 10
    while not (markers := list(Path(tempfile.gettempdir()).glob(f"grpo-tool-*/{marker}"))) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert markers and sandboxed_processes()
    sandbox.close()
    assert server.returncode is not None
    assert sandboxed_processes() == [] and processes_with_argument(mark) == []
    assert not markers[0].parent.exists()
    with pytest.raises(RuntimeError, match="closed"):
        sandbox.submit("print(1)")


def test_a_dead_server_is_reported():
    with Sandbox() as sandbox:
        os.kill(sandbox._server.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="server process .* ended"):
            sandbox.run("print(1)")
