"""The code sandbox's server process, started by `grpo_cli.sandbox.Sandbox` as
`python -I sandbox_server.py CONFIG` with a scrubbed environment. It imports the maths libraries once,
probes once which isolation this machine allows, then forks one small process tree per call:

    server ─ C ─ I ─ P
    C  a session of its own, so the server can SIGKILL the call's whole process group; unshares the
       network, PID and IPC namespaces (SysV shared memory would outlive the call), forks I, waits for it.
    I  the first process of the new PID namespace (its init): sets the limits, becomes nobody, confines
       the filesystem with Landlock, forks P, reaps until P ends and reports how it ended. When I ends,
       the kernel kills every process left in the namespace, even one that left the group with setsid().
    P  runs the code. P is not I because init ignores the signals it sends itself, so
       `os.kill(os.getpid(), SIGKILL)` would do nothing.

Output comes back over pipes that the server reads while the call runs, not through files: the output
limit then ends a call the moment it is passed (a file would first grow to RLIMIT_FSIZE), and nothing the
code prints touches the disk. The code's stderr counts towards the limit but is not shown; the error line
comes from P over a pipe of its own (fd 3), so text the code writes to stderr cannot pass for it.

A separate file without grpo_cli imports: isolated mode (-I) puts neither PYTHONPATH nor the script's
folder on sys.path, so nothing from the trainer's environment steers what this process imports.
"""

import builtins
import ctypes
import io
import json
import math
import os
import resource
import selectors
import shutil
import signal
import site
import socket
import stat
import sys
import tempfile
import time
import traceback
from collections import deque

NOBODY = 65534
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SETUP_FAILED = 70  # C's or I's exit code when the call could not be set up; its report says why
PRELOAD = ("math", "cmath", "fractions", "itertools", "functools", "collections", "decimal", "re", "random",
           "statistics", "string", "json", "heapq", "bisect", "operator", "sympy", "numpy")
LINUX = sys.platform.startswith("linux")
_libc = ctypes.CDLL(None, use_errno=True) if LINUX else None
if _libc:
    _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    _libc.syscall.restype = ctypes.c_long


def _c(result: int, what: str) -> int:
    """`result` of a libc call, or the OSError that -1 stands for."""
    if result < 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")
    return result


def _syscall(number: int, *args) -> int:
    return _libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) if isinstance(a, int) else a for a in args))


def _unshare(flags: int) -> None:
    _c(_libc.unshare(ctypes.c_int(flags)), "unshare")


def _die_with_parent() -> None:
    if LINUX:
        _c(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "PR_SET_PDEATHSIG")


# Landlock (kernel 5.13+): an unprivileged process gives up filesystem rights for itself and its children.
_LL_READ = 1 | 4 | 8  # EXECUTE, READ_FILE, READ_DIR
_LL_FILE = 1 | 2 | 4 | 1 << 14 | 1 << 15  # the rights a rule on a file (not a folder) may hold


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    return max(_syscall(444, None, 0, 1), 0) if LINUX else 0  # LANDLOCK_CREATE_RULESET_VERSION


def landlock(abi: int, read: list[str], write: list[str]) -> None:
    """Confine this process: every right this ABI knows is denied except reading beneath `read` and
    anything beneath `write`; from ABI 4 TCP bind/connect too, from ABI 6 signals and abstract unix
    sockets towards processes outside the sandbox."""
    fs = (1 << {1: 13, 2: 14, 3: 15, 4: 15}.get(abi, 16)) - 1
    attr = _RulesetAttr(fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24  # older kernels reject fields they do not know
    ruleset = _c(_syscall(444, ctypes.byref(attr), size, 0), "landlock_create_ruleset")
    for paths, rights in ((read, _LL_READ), (write, fs)):
        for path in paths:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:  # /lib64 is not everywhere
                continue
            try:
                allowed = rights & fs & (~0 if stat.S_ISDIR(os.fstat(fd).st_mode) else _LL_FILE)
                _c(_syscall(445, ruleset, 1, ctypes.byref(_PathBeneath(allowed, fd)), 0), f"landlock_add_rule {path}")
            finally:
                os.close(fd)
    _c(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    _c(_syscall(446, ruleset, 0), "landlock_restrict_self")
    os.close(ruleset)


def python_roots() -> list[str]:
    """The folders the code's imports read: the Python installation and every import path, outermost only."""
    found = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *site.getsitepackages(), *sys.path}
    roots: list[str] = []
    for path in sorted({os.path.realpath(p) for p in found if p and os.path.isdir(p)}):
        if not any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots):
            roots.append(path)
    return roots


def expose(roots: list[str]) -> list[str]:
    """Make `roots` reachable for nobody when a folder above one is closed to others (pyenv under /root,
    mode 0700), else lazy imports would fail once the call is nobody: in a mount namespace of this server's
    own (the trainer's view is untouched), such a folder is covered by an empty tmpfs into which only the
    roots are bind-mounted. Returns the covered folders."""
    covered: dict[str, list[str]] = {}
    for root in roots:
        parts = root.split("/")
        closed = [d for d in ("/".join(parts[:i]) for i in range(2, len(parts))) if not os.stat(d).st_mode & 0o001]
        if closed:
            covered.setdefault(closed[0], []).append(root)
    if covered:
        _unshare(CLONE_NEWNS)
        _c(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
        for folder, inner in covered.items():
            fds = [os.open(r, os.O_PATH) for r in inner]  # before the tmpfs hides them
            _c(_libc.mount(b"tmpfs", folder.encode(), b"tmpfs", 0, b"mode=755,size=64k"), f"tmpfs on {folder}")
            for root, fd in zip(inner, fds):
                os.makedirs(root, exist_ok=True)
                _c(_libc.mount(f"/proc/self/fd/{fd}".encode(), root.encode(), None, MS_BIND | MS_REC, None), f"bind {root}")
                os.close(fd)
    return list(covered)


def _attempt(step) -> str:
    """'' when `step()` succeeds in a throwaway child process, else why it failed."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            step()
            code = 0
        except BaseException as e:
            os.write(w, f"{type(e).__name__}: {e}".encode()[:300])
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        why = f.read().decode(errors="replace")
    status = os.waitpid(pid, 0)[1]
    return why or ("" if status == 0 else f"wait status {status}")


def _become(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def probe(cfg: dict, preloaded: list[str]) -> tuple[dict, dict]:
    """Try each layer once in throwaway children: (the plan every call follows, what it amounts to)."""
    limits, root = cfg["limits"], os.geteuid() == 0
    roots, plan, why = python_roots(), {"ns": 0, "uid": None, "userns": False, "landlock": 0}, {}
    plan["read"] = roots + ["/usr", "/lib", "/lib64", "/etc", "/dev/urandom"]
    covered: list[str] = []
    if root:
        try:
            covered = expose(roots) if LINUX else []
        except OSError as e:
            why["expose"] = str(e)
        why["user"] = _attempt(lambda: (_become(NOBODY), [os.listdir(r) for r in roots]))
        plan["uid"] = None if why["user"] else NOBODY
    base = CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC

    def own_user_namespace():  # as nobody, or as the trainer's user when not root
        if plan["uid"] is not None:
            _become(plan["uid"])
        _unshare(base | CLONE_NEWUSER)

    if not LINUX:
        why["userns"] = why["ns"] = f"no namespaces on {sys.platform}"
    else:  # a user namespace counts root's processes no more than before: root stays without one
        why["userns"] = _attempt(own_user_namespace) if plan["uid"] is not None or not root else "root"
        why["ns"] = "" if not why["userns"] else _attempt(lambda: _unshare(base)) if root else why["userns"]
        plan.update(ns=0 if why["ns"] else base | (0 if why["userns"] else CLONE_NEWUSER), userns=not why["userns"])
    abi = landlock_abi()
    workdir = tempfile.mkdtemp(prefix="grpo-tool-probe-", dir=cfg["tmpdir"])

    def confined():
        if plan["uid"] is not None:
            os.chown(workdir, NOBODY, NOBODY)
            _become(NOBODY)
        landlock(abi, plan["read"], [workdir, "/dev/null"])
        [os.listdir(r) for r in roots]
        open(os.path.join(workdir, "inside"), "w").close()
        try:
            open(workdir + "-outside", "w").close()
        except PermissionError:
            return
        raise RuntimeError("a write outside the working directory was not stopped")

    try:
        why["landlock"] = (f"no Landlock on {sys.platform}" if not LINUX else
                           _attempt(confined) if abi else "the kernel has no Landlock")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if os.path.exists(workdir + "-outside"):
            os.remove(workdir + "-outside")
    plan["landlock"] = 0 if why["landlock"] else abi
    who = f"nobody (uid {NOBODY})" if plan["uid"] is not None else f"same user (uid {os.geteuid()})"
    extra = f"at most {limits['max_processes']} more processes or threads (RLIMIT_NPROC)"
    isolation = {
        "process": "a forked process per call, in its own session" + (
            ", PID and IPC namespaces; everything it started is killed when it ends" if plan["ns"] else
            f"; its process group is killed when it ends, but a process that left the group survives ({why['ns']})"),
        "user": f"same user (root), no process limit (root has none): {why['user']}" if root and plan["uid"] is None else
                f"{who} in a user namespace of its own, {extra}" if plan["userns"] else
                f"{who}, at most {limits['max_processes'] + (cfg['parallel'] - 1) * (2 + limits['max_processes'])} more "
                f"processes or threads: RLIMIT_NPROC counts them with the other calls', whose room they may take, for the "
                f"call has no user namespace of its own ({why['userns']})",
        "network": "own network namespace, no interface up" if plan["ns"] else f"not isolated: {why['ns']}",
        "filesystem": (f"Landlock ABI {abi}: writes only in the working directory, reads only beneath "
                       + ", ".join(plan["read"]) if plan["landlock"] else f"not restricted: {why['landlock']}")
                      + (f"; {', '.join(covered)} shown as empty but for the Python installation" if covered else ""),
        "environment": "PATH, LANG, PYTHONIOENCODING, *_NUM_THREADS; HOME and TMPDIR are the working directory",
        "limits": (f"{limits['timeout_s']:g} s wall clock, {math.ceil(limits['timeout_s']) + 1} s CPU, "
                   f"{limits['memory_mb']} MB address space, {limits['file_mb']} MB per file, {limits['open_files']} "
                   f"open files, {limits['output_bytes']} bytes of output"),
        "preloaded": ", ".join(preloaded),
    }
    if plan["landlock"] >= 4:
        isolation["network"] += "; Landlock denies TCP bind and connect"
    return plan, isolation


def _tasks_of(uid: int) -> int:
    """Processes and threads whose real uid is `uid`, as RLIMIT_NPROC counts them (outside a user
    namespace of the call's own). Racy: the other calls start and end processes meanwhile (see _init)."""
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                fields = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
        except OSError:  # ended meanwhile
            continue
        if int(fields[b"Uid"].split()[0]) == uid:
            count += int(fields[b"Threads"])
    return count


def _report(fd: int, **record) -> None:
    os.write(fd, (json.dumps(record) + "\n").encode())


def _session(plan: dict, cfg: dict, workdir: str, code: str, fds: list[int]) -> None:
    """C: the call's session leader (see the module's docstring). Never returns."""
    status, report, server = SETUP_FAILED, None, os.getppid()
    try:
        signal.set_wakeup_fd(-1)  # the server's, whose fd is closed below and could be reused
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for target, fd in zip((0, 1, 2, 3), (null, *fds)):  # stdin, stdout, stderr, report
            os.dup2(fd, target)
        try:  # the server's socket and the other calls' pipes
            last = max(map(int, os.listdir("/proc/self/fd")))
        except OSError:  # no /proc (macOS)
            last = os.sysconf("SC_OPEN_MAX")
        os.closerange(4, last + 1)
        report = 3
        if plan["userns"] and plan["uid"] is not None:
            _become(plan["uid"])  # before its user namespace, so that outside of it the call is nobody
        if plan["ns"]:
            _unshare(plan["ns"])
        _die_with_parent()  # after the changes of credentials above, which clear it
        if os.getppid() != server:  # it died before the line above
            return
        pid = os.fork()
        if pid == 0:
            _init(plan, cfg, workdir, code)
        os.waitpid(pid, 0)
        status = 0
    except BaseException as e:
        if report:
            _report(report, setup=f"{type(e).__name__}: {e}")
    finally:
        os._exit(status)


def _init(plan: dict, cfg: dict, workdir: str, code: str) -> None:
    """I: limits, user, Landlock; then P, and how P ended. Never returns."""
    status, limits, uid = SETUP_FAILED, cfg["limits"], plan["uid"]
    try:
        # RLIMIT_NPROC limits the processes and threads of a real uid, counted per user namespace (Linux
        # 5.14+), and never root's. In a namespace of its own, the call's count starts afresh: C, I and P.
        # Without one it is shared with all that uid runs, the other calls too, which may start processes
        # between this count and P's fork (and fail it): the limit leaves room for theirs.
        counted = uid if uid is not None else os.getuid() or None
        nproc = 3 if plan["userns"] else None if counted is None else (
            _tasks_of(counted) + 2 + (cfg["parallel"] - 1) * (2 + limits["max_processes"]))
        for resource_id, value in ((resource.RLIMIT_AS, limits["memory_mb"] << 20),
                                   (resource.RLIMIT_CPU, math.ceil(limits["timeout_s"]) + 1),
                                   (resource.RLIMIT_FSIZE, limits["file_mb"] << 20),
                                   (resource.RLIMIT_NOFILE, limits["open_files"]), (resource.RLIMIT_CORE, 0)):
            try:
                resource.setrlimit(resource_id, (value, value))
            except (ValueError, OSError):
                if LINUX:  # elsewhere some do not exist (RLIMIT_AS on macOS); Linux has them all
                    raise
        if uid is not None and not plan["userns"]:
            _become(uid)
        _die_with_parent()  # after the uid change, which clears it
        if nproc is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc + limits["max_processes"],) * 2)
        if plan["landlock"]:
            landlock(plan["landlock"], plan["read"], [workdir, "/dev/null"])
        os.chdir(workdir)
        pid = os.fork()
        if pid == 0:
            _run(code, workdir)
        while (ended := os.waitpid(-1, 0))[0] != pid:  # as init, orphans are ours to reap
            pass
        how = ended[1]
        _report(3, **({"signal": os.WTERMSIG(how)} if os.WIFSIGNALED(how) else {"exit": os.WEXITSTATUS(how)}))
        status = 0
    except BaseException as e:
        _report(3, setup=f"{type(e).__name__}: {e}")
    finally:
        os._exit(status)


def _run(code: str, workdir: str) -> None:
    """P: run `code` as `python script.py` would, writing straight through to the pipes so that output
    printed before an os._exit is not lost in a buffer. Never returns (neither do processes it forks)."""
    me, status = os.getpid(), 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.environ.update(HOME=workdir, TMPDIR=workdir)
        tempfile.tempdir, sys.argv, sys.dont_write_bytecode = workdir, ["<tool>"], True
        sys.stdin = open(os.devnull)
        sys.stdout, sys.stderr = (io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding="utf-8",
                                                   errors="backslashreplace", write_through=True) for fd in (1, 2))
        if "numpy" in sys.modules:  # else every call draws the same numbers, forked from one state
            sys.modules["numpy"].random.seed()
        error = ""
        try:
            exec(compile(code, "<tool>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
            status = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                status = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                error = f"SystemExit: {e.code}"
        except BaseException as e:
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # from the code's frames on
            error = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()[-1]
        if error and os.getpid() == me:  # not from processes the code forked
            _report(3, error=error[:1000])
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(status)


class _Call:
    def __init__(self, call_id: int, pid: int, workdir: str, timeout_s: float):
        self.id, self.pid, self.workdir = call_id, pid, workdir
        self.start = time.monotonic()
        self.deadline = self.start + timeout_s
        self.out = {"stdout": bytearray(), "stderr": bytearray(), "report": bytearray()}
        self.size = 0  # stdout and stderr bytes received
        self.killed_for = ""  # "timeout", "output" or "closed"
        self.fds: dict[int, str] = {}


class Server:
    """Runs up to `parallel` calls at once, queues the rest; one select loop over the trainer's socket,
    the calls' pipes and a SIGCHLD wake-up pipe. Never blocks on a call or on the trainer."""

    def __init__(self, cfg: dict, plan: dict, ctl: socket.socket):
        self.cfg, self.plan, self.limits = cfg, plan, cfg["limits"]
        self.ctl, self.inbox, self.outbox = ctl, bytearray(), bytearray()
        self.queue: deque = deque()
        self.running: dict[int, _Call] = {}  # by C's pid
        self.sel = selectors.DefaultSelector()
        ctl.setblocking(False)
        self.sel.register(ctl, selectors.EVENT_READ)
        self.wake, wake_w = os.pipe()
        os.set_blocking(self.wake, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # a handler, so the wake-up fd is written
        self.sel.register(self.wake, selectors.EVENT_READ)

    def send(self, message: dict) -> None:
        data = json.dumps(message).encode()
        self.outbox += len(data).to_bytes(4, "big") + data
        self._flush()

    def _flush(self) -> None:
        try:
            del self.outbox[:self.ctl.send(self.outbox)]
        except BlockingIOError:  # the trainer has not collected for a while; keep it here, not in its way
            pass
        except OSError:  # the trainer is gone; its socket's end of file ends the loop
            self.outbox.clear()
        self.sel.modify(self.ctl, selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbox else 0))

    def serve(self) -> None:
        while True:
            while self.queue and len(self.running) < self.cfg["parallel"]:
                self.start(*self.queue.popleft())
            deadline = min((c.deadline for c in self.running.values()), default=math.inf)
            for key, mask in self.sel.select(None if deadline == math.inf else max(0.0, deadline - time.monotonic())):
                if key.fileobj is self.ctl:
                    try:
                        if mask & selectors.EVENT_WRITE:
                            self._flush()
                        if mask & selectors.EVENT_READ and not self.receive():
                            return self.shutdown()
                    except OSError:  # the trainer is gone
                        return self.shutdown()
                elif key.fileobj == self.wake:
                    os.read(self.wake, 4096)
                else:
                    self.read(key.fileobj, key.data)
            self.reap()
            for call in [c for c in self.running.values() if c.deadline <= time.monotonic()]:
                self.kill(call, "timeout")

    def receive(self) -> bool:
        try:
            data = self.ctl.recv(1 << 20)
        except BlockingIOError:
            return True
        if not data:
            return False
        self.inbox += data
        while len(self.inbox) >= 4 and len(self.inbox) >= 4 + (size := int.from_bytes(self.inbox[:4], "big")):
            message = json.loads(self.inbox[4:4 + size])
            del self.inbox[:4 + size]
            self.queue.append((message["id"], message["code"]))
        return True

    def start(self, call_id: int, code: str) -> None:
        workdir, pipes = "", []
        try:
            workdir = tempfile.mkdtemp(prefix="grpo-tool-", dir=self.cfg["tmpdir"])
            if self.plan["uid"] is not None:
                os.chown(workdir, self.plan["uid"], self.plan["uid"])
            pipes = [os.pipe() for _ in range(3)]
            pid = os.fork()
        except OSError as e:  # a full disk, no more processes: this call fails, the server goes on
            for fd in [fd for pipe in pipes for fd in pipe]:
                os.close(fd)
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)
            self.send({"id": call_id, "status": "error", "stdout": "", "error": f"could not start the call: {e}",
                       "seconds": 0.0, "truncated": False})
            return
        if pid == 0:
            _session(self.plan, self.cfg, workdir, code, [w for _, w in pipes])
        call = self.running[pid] = _Call(call_id, pid, workdir, self.limits["timeout_s"])
        for (r, w), name in zip(pipes, ("stdout", "stderr", "report")):
            os.close(w)
            os.set_blocking(r, False)
            call.fds[r] = name
            self.sel.register(r, selectors.EVENT_READ, call)

    def read(self, fd: int, call: _Call) -> None:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        if not data:
            self.sel.unregister(fd)
            os.close(fd)
            del call.fds[fd]
        elif self._keep(call, call.fds[fd], data) and call.pid in self.running:
            self.kill(call, "output")

    def _keep(self, call: _Call, name: str, data: bytes) -> bool:
        """Keep what fits in the output limit; True when `data` went beyond it."""
        if name == "report":
            call.out[name] += data[:max(0, 4096 - len(call.out[name]))]
            return False
        call.out[name] += data[:max(0, self.limits["output_bytes"] - call.size)]
        call.size += len(data)
        return call.size > self.limits["output_bytes"]

    def kill(self, call: _Call, why: str) -> None:
        call.killed_for, call.deadline = call.killed_for or why, math.inf
        for kill in (os.killpg, os.kill):  # os.kill too: C may not have called setsid() yet
            try:
                kill(call.pid, signal.SIGKILL)
            except OSError:
                pass

    def reap(self) -> None:
        while True:
            try:  # WNOWAIT: C stays a zombie, so its pid, the group's id, cannot be reused while we kill the group
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None or info.si_pid == 0:
                return
            try:
                os.killpg(info.si_pid, signal.SIGKILL)  # whatever the code left in the group
            except OSError:
                pass
            status = os.waitpid(info.si_pid, 0)[1]
            call = self.running.pop(info.si_pid, None)
            if call:
                self.send({"id": call.id, **self.finish(call, status)})

    def finish(self, call: _Call, status: int) -> dict:
        for fd, name in list(call.fds.items()):  # what was written before the end; never waits
            try:
                while (data := os.read(fd, 1 << 16)) and not self._keep(call, name, data):
                    pass
            except BlockingIOError:
                pass
            self.sel.unregister(fd)
            os.close(fd)
        shutil.rmtree(call.workdir, ignore_errors=True)
        report: dict = {}
        for line in call.out["report"].splitlines():
            try:
                report.update(json.loads(line))  # P's error line, then I's word on how P ended
            except ValueError:
                pass
        limits = self.limits
        if call.killed_for == "timeout":
            state, error = "timeout", f"timed out after {limits['timeout_s']:g} s"
        elif call.killed_for == "output":
            state, error = "killed", f"output limit of {limits['output_bytes']} bytes reached"
        elif "setup" in report:
            state, error = "error", f"sandbox setup failed: {report['setup']}"
        elif "signal" in report or os.WIFSIGNALED(status):  # P killed, or C: the code killed its own group
            state, error = _signalled(report.get("signal") or os.WTERMSIG(status), limits)
        elif "exit" in report:
            code = report["exit"]
            state, error = ("ok", "") if code == 0 else ("error", report.get("error") or f"exited with code {code}")
        else:
            state, error = "error", f"ended without a report (exit status {os.waitstatus_to_exitcode(status)})"
        return {"status": state, "stdout": call.out["stdout"].decode("utf-8", "replace"), "error": error,
                "seconds": round(time.monotonic() - call.start, 4), "truncated": call.killed_for == "output"}

    def shutdown(self) -> None:
        for call in self.running.values():
            self.kill(call, "closed")
        for call in self.running.values():
            os.waitpid(call.pid, 0)
            shutil.rmtree(call.workdir, ignore_errors=True)


def _signalled(signum: int, limits: dict) -> tuple[str, str]:
    if signum == signal.SIGXCPU:
        return "timeout", f"used more than {math.ceil(limits['timeout_s']) + 1} s of CPU time"
    try:
        return "killed", f"killed by {signal.Signals(signum).name}"
    except ValueError:
        return "killed", f"killed by signal {signum}"


def main() -> None:
    cfg = json.loads(sys.argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the trainer decides when we stop: closing our socket
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    if os.getppid() != cfg["parent"]:  # it died before the line above
        return
    while os.open(os.devnull, os.O_RDWR) < 2:  # fds 0-2 taken, so no pipe of ours is ever given those numbers
        pass
    os.chdir("/")
    preloaded = []
    for name in PRELOAD:
        try:
            __import__(name)
            preloaded.append(name)
        except ImportError:
            pass
    if "numpy" in sys.modules:  # its first seeding loads more, 13 ms that every call would pay again
        sys.modules["numpy"].random.seed(0)
    if "sympy" in sys.modules:  # so do its parser and printer: 5 ms a call
        str(sys.modules["sympy"].sympify("sqrt(8) + x/3"))
    plan, isolation = probe(cfg, preloaded)
    server = Server(cfg, plan, socket.socket(fileno=cfg["fd"]))
    server.send({"hello": isolation})
    server.serve()


if __name__ == "__main__":
    main()
