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

from grpo_cli.tools.sandbox import Limits, Outcome, Sandbox

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
    server, mark = sandbox._server, f"{time.time() % 1000 + 2000:.6f}"
    before = set(Path(tempfile.gettempdir()).glob("grpo-tool-*"))
    sandbox.submit(f"import subprocess, time\nopen('marker', 'w').close()\nsubprocess.Popen(['sleep', '{mark}'])\n"
                   "time.sleep(60)")
    deadline = time.monotonic() + 10
    while not processes_with_argument(mark) and time.monotonic() < deadline:
        time.sleep(0.05)
    workdirs = set(Path(tempfile.gettempdir()).glob("grpo-tool-*")) - before  # the call's (its tmpfs is its own)
    assert workdirs and sandboxed_processes()
    sandbox.close()
    assert server.returncode is not None
    assert sandboxed_processes() == [] and processes_with_argument(mark) == []
    assert not any(workdir.exists() for workdir in workdirs)
    with pytest.raises(RuntimeError, match="closed"):
        sandbox.submit("print(1)")


def test_a_dead_server_is_restarted_its_calls_fail_and_the_next_ones_run():
    with Sandbox() as sandbox:
        first = sandbox._server.pid
        running = sandbox.submit("import time\ntime.sleep(30)")
        os.kill(first, signal.SIGKILL)
        lost = sandbox.collect(wait=True)[running]
        assert (lost.status, lost.error) == ("error", "the sandbox's server died during this call; it was restarted")
        assert sandbox.restarts == 1 and sandbox._server.pid != first
        assert_still_works(sandbox)
        os.kill(sandbox._server.pid, signal.SIGKILL)  # again, after a call finished: restarted again
        assert sandbox.run("print(1)").status == "error" and sandbox.restarts == 2
        os.kill(sandbox._server.pid, signal.SIGKILL)  # and again with no call finished since: it gives up
        with pytest.raises(RuntimeError, match="server process .* ended .* again before any call finished"):
            sandbox.run("print(1)")


# --- what an attacker tried: each test fails with its hole open ---------------------------------------------

def test_the_code_holds_no_descriptor_but_stdin_stdout_and_stderr(box):
    outcome = box.run("import os\nopen_fds = []\nfor fd in range(3, 1024):\n    try:\n        os.fstat(fd)\n"
                      "        open_fds.append(fd)\n    except OSError:\n        pass\nprint(open_fds)")
    assert (outcome.status, outcome.stdout) == ("ok", "[]\n")


WRITE_EVERYWHERE = "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, {!r})\n    except OSError:\n        pass\n"


def test_a_forged_report_is_not_taken(box):
    success_then_raise = box.run(WRITE_EVERYWHERE.format(b'{"exit": 0}\n') + "raise ValueError('real')")
    assert (success_then_raise.status, success_then_raise.error) == ("error", "ValueError: real")
    forged_setup = box.run(WRITE_EVERYWHERE.format(b'{"setup": "forged"}\n') + "print('fine')")
    assert (forged_setup.status, forged_setup.stdout, forged_setup.error) == ("ok", "fine\n", "")
    forged_signal = box.run(WRITE_EVERYWHERE.format(b'{"signal": 9}\n') + "print('fine')")
    assert forged_signal.status == "ok"


@pytest.mark.parametrize("garbage", [b"1\n", b"[" * 3000, b"\xff\xfe", b'{"exit": "0"}\n', b"null\n"])
def test_garbage_on_any_descriptor_never_kills_the_server(box, garbage):
    outcome = box.run(WRITE_EVERYWHERE.format(garbage) + "print('done')")
    assert (outcome.status, outcome.stdout) == ("ok", "done\n")
    assert_still_works(box)


def test_reports_are_read_strictly():
    from grpo_cli.tools.sandbox_server import read_report

    assert read_report(b'{"exit": 0}\n') == {"exit": 0}
    assert read_report(b'{"signal": 9}\n') == {"signal": 9}
    assert read_report(b'{"setup": "OSError: x"}\n') == {"setup": "OSError: x"}
    for garbage in (b"1\n", b"[" * 3000, b'{"exit": "0"}', b'{"exit": true}', b'{"exit": 0, "signal": 9}',
                    b'{"error": "x"}', b"\xff", b"null"):
        assert set(read_report(garbage)) == {"malformed"}, garbage
    assert read_report(b'{"exit": 1}\n1\n') == {"exit": 1, "malformed": "1"}


def test_the_error_line_is_the_last_line_of_stderr_only_for_exit_code_1(box):
    told, coded = box.run_many(["import sys\nsys.stderr.write('warning: x\\nlast words\\n')\nsys.exit(1)",
                                "import sys\nsys.stderr.write('warning\\n')\nsys.exit(4)"])
    assert (told.status, told.error) == ("error", "last words")
    assert (coded.status, coded.error) == ("error", "exited with code 4")


def test_a_deep_folder_tree_is_freed_and_the_server_lives(box):
    outcome = box.run("import os\nprint(os.getcwd())\nfor _ in range(1500):\n    os.mkdir('d')\n    os.chdir('d')\n"
                      "print(os.getcwd().count('/d'))")
    workdir, depth = outcome.stdout.split()
    assert (outcome.status, depth) == ("ok", "1500")
    assert not Path(workdir).exists()
    assert_still_works(box)


def test_files_and_bytes_written_are_bounded(box):
    if "tmpfs" not in box.isolation["filesystem"]:
        pytest.skip(box.isolation["filesystem"])
    many = box.run("import os\nprint(os.getcwd())\nfor i in range(100_000):\n    open(f'f{i}', 'w').close()")
    assert many.status == "error" and many.error.startswith("OSError: [Errno 28] No space left on device"), many
    assert not Path(many.stdout.strip()).exists()
    big = box.run("for i in range(8):\n    open(f'big{i}', 'wb').write(bytes(15 << 20))")
    assert big.status == "error" and big.error.startswith("OSError: [Errno 28]"), big
    assert_still_works(box)


def test_remove_tree_deletes_deeper_than_recursion_and_paths_allow(tmp_path):
    from grpo_cli.tools.sandbox_server import remove_tree

    top = tmp_path / "top"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY)
    for level in range(3000):  # 3000 levels of 'level-N': a path of some 25,000 characters
        os.mkdir(f"level-{level}", dir_fd=fd)
        (Path(f"/proc/self/fd/{fd}") / f"level-{level}" / "file").write_text("x")
        inner = os.open(f"level-{level}", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = inner
    os.symlink(tmp_path, "out", dir_fd=fd)  # a link out of the tree: removed, not followed
    os.close(fd)
    (tmp_path / "keep").write_text("kept")
    remove_tree(str(top))
    assert not top.exists() and (tmp_path / "keep").read_text() == "kept"


def test_pathname_unix_sockets_are_out_of_reach(box):
    # in a folder anyone may enter, as /tmp and /var/run are (pytest's tmp_path is not: nobody would be
    # stopped by its permissions, not by the sandbox)
    folder = Path(tempfile.mkdtemp(prefix="grpo-socket-test-"))
    folder.chmod(0o777)
    path = folder / "host.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        path.chmod(0o777)
        listener.listen()
        listener.setblocking(False)
        outcome = box.run(f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({str(path)!r})\ns.send(b'hi')")
        assert (outcome.status, outcome.error) == ("error", "PermissionError: [Errno 13] Permission denied"), outcome
        with pytest.raises(BlockingIOError):
            listener.accept()
    path.unlink()
    folder.rmdir()
    pair = box.run("import asyncio\nasyncio.run(asyncio.sleep(0))\nprint('event loop ran')")  # socketpair() is allowed
    assert (pair.status, pair.stdout) == ("ok", "event loop ran\n")


REFUSED = ["socket", "keyctl", "add_key", "request_key", "memfd_create", "ptrace", "process_vm_readv", "bpf",
           "perf_event_open", "userfaultfd", "io_uring_setup", "mount", "umount2", "unshare", "setns", "chroot",
           "pivot_root", "fsopen", "open_by_handle_at", "pidfd_getfd"]


@pytest.mark.parametrize("name", REFUSED)
def test_system_calls_a_maths_tool_never_needs_are_refused(box, name):
    from grpo_cli.tools import sandbox_filter

    if not sandbox_filter.supported():
        pytest.skip(f"no system-call filter for {os.uname().machine}")
    number = sandbox_filter.syscall_numbers()[name]
    outcome = box.run(f"import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                      f"print(libc.syscall({number}, 1, 0, 0, 0, 0), ctypes.get_errno())")
    assert (outcome.status, outcome.stdout) == ("ok", "-1 13\n"), outcome  # EACCES: the filter's, not the kernel's


def test_clone_into_new_namespaces_is_refused_and_plain_fork_and_threads_work(box):
    from grpo_cli.tools import sandbox_filter

    if not sandbox_filter.supported():
        pytest.skip(f"no system-call filter for {os.uname().machine}")
    clone = sandbox_filter.syscall_numbers()["clone"]
    outcome = box.run(f"import ctypes, os, signal, threading\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                      f"print(libc.syscall({clone}, 0x10000000 | signal.SIGCHLD, 0, 0, 0, 0), ctypes.get_errno())\n"
                      "pid = os.fork()\nif pid == 0:\n    os._exit(7)\nprint(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n"
                      "t = threading.Thread(target=print, args=('thread',))\nt.start()\nt.join()")
    assert (outcome.status, outcome.stdout) == ("ok", "-1 13\n7\nthread\n"), outcome


def test_memory_cannot_be_held_outside_the_address_space_limit(box):
    memfd = box.run("import os\nfds = [os.memfd_create(f'm{i}') for i in range(40)]")
    assert (memfd.status, memfd.error) == ("error", "PermissionError: [Errno 13] Permission denied")
    shm = box.run("open('/dev/shm/grpo-test', 'wb').write(bytes(16 << 20))")
    assert shm.status == "error" and shm.error.startswith(("PermissionError", "FileNotFoundError")), shm


def test_each_call_has_a_fresh_keyring_out_of_the_codes_reach(box):
    if "new, empty session keyring" not in box.isolation["keyring"]:
        pytest.skip(box.isolation["keyring"])
    from grpo_cli.tools import sandbox_filter

    keyctl = sandbox_filter.syscall_numbers()["keyctl"]
    read_session = (f"import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                    f"print(libc.syscall({keyctl}, 0, -3, 0), ctypes.get_errno())")  # KEYCTL_GET_KEYRING_ID @s
    assert box.run(read_session).stdout == "-1 13\n"


def test_the_isolation_names_every_layer(box):
    assert {"process", "user", "network", "filesystem", "system calls", "keyring", "limits"} <= set(box.isolation)
    if "PID and IPC namespaces" in box.isolation["process"]:  # then a mount namespace and its tmpfs are allowed too
        assert "the working directory a tmpfs of its own" in box.isolation["filesystem"]
    if os.geteuid() != 0:
        assert box.isolation["user"].startswith(f"your user (uid {os.geteuid()})")


def test_a_user_other_than_root_without_user_namespaces_is_refused():
    if os.geteuid() == 0:
        pytest.skip("root's calls run as nobody; the refusal is for a trainer that is not root (CI runs this file "
                    "as an unprivileged user too: scripts/test_sandbox_unprivileged.sh)")
    import subprocess

    from grpo_cli.tools import sandbox_filter

    # the filter refuses unshare() to this child, as a machine without unprivileged user namespaces would
    program = ("from grpo_cli.tools.sandbox import Sandbox, SandboxRefused\ntry:\n    Sandbox()\n"
               "except SandboxRefused as e:\n    print(e)")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=REPO, timeout=120,
                          preexec_fn=sandbox_filter.install)
    assert "the code tool cannot run here" in done.stdout and "a user namespace" in done.stdout, done
