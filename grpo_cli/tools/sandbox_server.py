"""The code sandbox's server process, started by `grpo_cli.tools.sandbox.Sandbox` as
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

Contents, in the order of the `# ---- N. ... ----` banners below:

     1. Set-up: imports, constants, the C library, the system-call filter (sandbox_filter.py, by path)
     2. The C library: checked calls, credentials, descriptors
     3. Landlock: the filesystem rights a call keeps
     4. The filesystem a call sees: the Python installation for nobody, the working folder's tmpfs,
        removing a working folder
     5. Isolation: a call's keyring, user, namespaces, id maps and capabilities (C's `_enter`)
     6. Probing, once at start-up, which layers this machine allows (`probe`); refusing when too few
     7. Limits: the processes RLIMIT_NPROC counts
     8. Running a call: C (`_session`), I (`_init`: the limits, the user, Landlock), P (`_run`)
     9. How a call ended: the report pipe, the error line, signals
    10. The server: one select loop over the trainer's socket, the calls' pipes and SIGCHLD (`Server`)
    11. Start-up (`main`): the maths libraries imported and warmed, the probe, the loop
"""

# ---- 1. Set-up: imports, constants, the C library, the system-call filter ----

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
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x1000, 0x4000, 0x40000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
KEYCTL_JOIN_SESSION_KEYRING, CAPABILITY_VERSION_3 = 1, 0x20080522
STDERR_TAIL = 2048  # bytes of a call's stderr kept apart from the output limit: the error line is its last line
SETUP_FAILED = 70  # C's or I's exit code when the call could not be set up; its report says why
PRELOAD = ("math", "cmath", "fractions", "itertools", "functools", "collections", "decimal", "re", "random",
           "statistics", "string", "json", "heapq", "bisect", "operator", "sympy", "numpy")
LINUX = sys.platform.startswith("linux")
_libc = ctypes.CDLL(None, use_errno=True) if LINUX else None


def _sibling(name: str):
    """A module beside this file, imported by path: isolated mode (-I) leaves this folder off sys.path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


seccomp = _sibling("sandbox_filter")
if _libc:
    _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    _libc.syscall.restype = ctypes.c_long


# ---- 2. The C library: checked calls, credentials, descriptors ----


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


def _become(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def _close_from(first: int) -> None:
    try:
        last = max(map(int, os.listdir("/proc/self/fd")))
    except OSError:  # no /proc (macOS)
        last = os.sysconf("SC_OPEN_MAX")
    os.closerange(first, last + 1)


# ---- 3. Landlock ----

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


# ---- 4. The filesystem a call sees: the Python installation, its working folder's tmpfs, removing the folder ----


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


def _private_tmpfs(workdir: str, limits: dict, owner: int | None) -> None:
    """Cover the working folder with a tmpfs of the call's own mount namespace. Its size and inode count
    bound what the code writes (folders count as inodes, so a tree's depth is bounded too), and the kernel
    frees it when the call's last process ends: nothing is left for the server to delete."""
    _c(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")  # the trainer never sees it
    options = f"size={limits['disk_mb']}m,nr_inodes={limits['files']},mode=700"
    if owner is not None:  # root's call, which becomes `owner` later; in a user namespace the mounter owns it
        options += f",uid={owner},gid={owner}"
    _c(_libc.mount(b"tmpfs", workdir.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options.encode()), f"tmpfs on {workdir}")


def remove_tree(top: str) -> None:
    """Delete `top` and all beneath it without recursion and without paths longer than two names: each
    folder found is first moved up into `top` under a random name, so a tree 100,000 folders deep costs
    no more stack, and no longer paths, than a flat one. Symlinks are removed, never followed."""
    import uuid

    queue = [top]
    while queue:
        folder = queue.pop()
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if folder == top:
                    queue.append(entry.path)
                else:
                    queue.append(os.path.join(top, uuid.uuid4().hex))
                    os.rename(entry.path, queue[-1])
            else:
                os.unlink(entry.path)
        if folder != top:
            os.rmdir(folder)
    os.rmdir(top)


# ---- 5. Isolation: a call's keyring, user, namespaces, id maps and capabilities ----


def _keyring() -> None:
    """Join a new, empty session keyring: the trainer's (SSH agent keys, login secrets) goes out of reach."""
    _c(_syscall(seccomp.syscall_numbers()["keyctl"], KEYCTL_JOIN_SESSION_KEYRING, None), "keyctl(JOIN_SESSION_KEYRING)")


def _map_ids(uid: int, gid: int) -> None:
    """Map the process's own uid and gid (outside) to themselves in its new user namespace, the one mapping
    an unprivileged process may write: files on the call's tmpfs need an owner the namespace knows."""
    # a change of uid (root to nobody) made the process undumpable, which gives /proc/self to root
    _c(_libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "PR_SET_DUMPABLE")
    for name, text in (("uid_map", f"{uid} {uid} 1"), ("setgroups", "deny"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def _enter(plan: dict, cfg: dict, workdir: str) -> None:
    """C's isolation, in order: a fresh keyring; its user (before the user namespace, so that outside of it
    the call is nobody); its namespaces; its ids mapped in them; the working folder a tmpfs of its own."""
    if plan["keyring"]:
        _keyring()
    if plan["userns"] and plan["uid"] is not None:
        _become(plan["uid"])
    outer_uid, outer_gid = os.geteuid(), os.getegid()
    if plan["ns"]:
        _unshare(plan["ns"])
    if plan["userns"] and plan["tmpfs"]:
        _map_ids(outer_uid, outer_gid)
    if plan["tmpfs"]:
        _private_tmpfs(workdir, cfg["limits"], None if plan["userns"] else plan["uid"])


def _drop_capabilities() -> None:
    """Give up every capability. A process that creates a user namespace holds them all inside it, and
    without an exec nothing takes them away: the code would keep them (mount, chown within the namespace)."""
    header = (ctypes.c_uint32 * 2)(CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable, twice (64 bits each), all zero
    _c(_syscall(seccomp.syscall_numbers()["capset"], ctypes.byref(header), ctypes.byref(data)), "capset")


# ---- 6. Probing, once at start-up, which layers this machine allows; refusing when too few ----


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


def probe(cfg: dict, preloaded: list[str]) -> tuple[dict, dict, str]:
    """Try each layer once in throwaway children: (the plan every call follows, what it amounts to, why the
    tool is refused on this machine or "")."""
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
    filter_here = LINUX and seccomp.supported()
    for layer, attempt in (("keyring", _keyring), ("seccomp", _filtered)):
        why[layer] = _attempt(attempt) if filter_here else f"no system-call filter for {sys.platform} on {os.uname().machine}"
        plan[layer] = not why[layer]
    plan["tmpfs"] = False
    why["tmpfs"] = _attempt_tmpfs(plan, cfg) if plan["ns"] else "no mount namespace without the others"
    if not why["tmpfs"]:
        plan.update(tmpfs=True, ns=plan["ns"] | CLONE_NEWNS)
    who = f"nobody (uid {NOBODY})" if plan["uid"] is not None else f"same user (uid {os.geteuid()})"
    extra = f"at most {limits['max_processes']} more processes or threads (RLIMIT_NPROC)"
    isolation = {
        "process": "a forked process per call, in its own session" + (
            ", PID and IPC namespaces; everything it started is killed when it ends" if plan["ns"] else
            f"; its process group is killed when it ends, but a process that left the group survives ({why['ns']})"),
        "user": f"same user (root), no process limit (root has none): {why['user']}" if root and plan["uid"] is None else
                f"{who} in a user namespace of its own, {extra}" if plan["userns"] and root else
                f"your user (uid {os.geteuid()}) and its groups, which a trainer that is not root cannot hand to the call, "
                f"in a user namespace of its own with no capability; Landlock, the PID namespace and the system-call "
                f"filter cut what that user reaches; {extra}" if plan["userns"] else
                f"{who}, at most {limits['max_processes'] + (cfg['parallel'] - 1) * (2 + limits['max_processes'])} more "
                f"processes or threads: RLIMIT_NPROC counts them with the other calls', whose room they may take, for the "
                f"call has no user namespace of its own ({why['userns']})",
        "network": "own network namespace, no interface up" if plan["ns"] else f"not isolated: {why['ns']}",
        "filesystem": (f"Landlock ABI {abi}: writes only in the working directory, reads only beneath "
                       + ", ".join(plan["read"]) if plan["landlock"] else f"not restricted: {why['landlock']}")
                      + (f"; {', '.join(covered)} shown as empty but for the Python installation" if covered else "")
                      + (f"; the working directory a tmpfs of its own ({limits['disk_mb']} MB, {limits['files']} files and "
                         f"folders), freed by the kernel when the call ends" if plan["tmpfs"] else
                         f"; files in the working directory not limited in number or depth ({why['tmpfs']})"),
        "system calls": ("seccomp: socket(), the kernel keyring, memfd, ptrace, bpf, perf events, userfaultfd, io_uring, "
                         "mount and new namespaces refused (PermissionError)" if plan["seccomp"] else
                         f"no filter: {why['seccomp']}"),
        "keyring": ("a new, empty session keyring per call" if plan["keyring"] else
                    f"the trainer's session keyring is inherited ({why['keyring']})"),
        "environment": "PATH, LANG, PYTHONIOENCODING, *_NUM_THREADS; HOME and TMPDIR are the working directory",
        "limits": (f"{limits['timeout_s']:g} s wall clock, {math.ceil(limits['timeout_s']) + 1} s CPU, "
                   f"{limits['memory_mb']} MB address space, {limits['file_mb']} MB per file, {limits['open_files']} "
                   f"open files, {limits['output_bytes']} bytes of output"),
        "preloaded": ", ".join(preloaded),
    }
    if plan["landlock"] >= 4:
        isolation["network"] += "; Landlock denies TCP bind and connect"
    return plan, isolation, _refusal(root, plan, why)


def _refusal(root: bool, plan: dict, why: dict) -> str:
    """Why the code tool cannot run here, or "": a call never runs with the trainer's own rights unchecked."""
    if not LINUX:
        return (f"the code tool's isolation needs Linux (namespaces, Landlock, seccomp) and {sys.platform} has none "
                f"of them, so the model's code would run as you: run grpo in a Linux container or VM")
    if root and plan["uid"] is None:
        return (f"as root, each call must run as nobody (uid {NOBODY}), and this machine refused that "
                f"({why['user']}): run grpo as an ordinary user, or in a container where root can change its uid")
    missing = [f"{what} ({why[layer]})" for layer, what in (("userns", "a user namespace"), ("landlock", "Landlock"),
                                                            ("seccomp", "the system-call filter")) if why[layer]]
    if root or not missing:
        return ""
    return ("as a user other than root, a call keeps your uid and groups, so it is only safe inside a user "
            "namespace, Landlock and the system-call filter together, and this machine lacks "
            + ", ".join(missing) + ". Enable unprivileged user namespaces (sysctl user.max_user_namespaces=10000; "
            "kernel.unprivileged_userns_clone=1 on Debian's older kernels; "
            "kernel.apparmor_restrict_unprivileged_userns=0 on Ubuntu 24.04), use Linux 5.13 or newer for Landlock, "
            "or run grpo as root inside a container")


def _filtered() -> None:
    seccomp.install()
    try:
        socket.socket(socket.AF_UNIX).close()
    except PermissionError:
        return
    raise RuntimeError("the filter was installed but did not refuse socket()")


def _attempt_tmpfs(plan: dict, cfg: dict) -> str:
    """'' when a call's working folder can be a tmpfs of its own here, written by the call's user and
    unseen by the trainer, else why not."""
    workdir = tempfile.mkdtemp(prefix="grpo-tool-probe-", dir=cfg["tmpdir"])

    def mounted():
        _enter({**plan, "ns": plan["ns"] | CLONE_NEWNS, "tmpfs": True, "keyring": False}, cfg, workdir)
        if plan["uid"] is not None and not plan["userns"]:
            _become(plan["uid"])
        open(os.path.join(workdir, "inside"), "w").close()

    try:
        if plan["uid"] is not None:
            os.chown(workdir, plan["uid"], plan["uid"])
        return _attempt(mounted) or ("the mount reached the trainer's view" if os.listdir(workdir) else "")
    finally:
        remove_tree(workdir)


# ---- 7. Limits: the processes RLIMIT_NPROC counts (I sets every limit: _init, section 8) ----


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


# ---- 8. Running a call: C, I and P ----


def _session(plan: dict, cfg: dict, workdir: str, code: str, fds: list[int]) -> None:
    """C: the call's session leader (see the module's docstring). Never returns."""
    status, report, server = SETUP_FAILED, None, os.getppid()
    try:
        signal.set_wakeup_fd(-1)  # the server's, whose fd is closed below and could be reused
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for target, fd in zip((0, 1, 2, 3), (null, *fds)):  # stdin, stdout, stderr, report (C and I only)
            os.dup2(fd, target)
        _close_from(4)  # the server's socket and the other calls' pipes
        report = 3
        _enter(plan, cfg, workdir)
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
        if plan["userns"]:
            _drop_capabilities()
        if LINUX:  # no ptrace-style access to I (its /proc/<pid>/mem) from the code, even at the same uid
            _c(_libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "PR_SET_DUMPABLE")
        _die_with_parent()  # after the uid change, which clears it
        if nproc is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc + limits["max_processes"],) * 2)
        if plan["landlock"]:
            landlock(plan["landlock"], plan["read"], [workdir, "/dev/null"])
        os.chdir(workdir)
        pid = os.fork()
        if pid == 0:
            _run(code, workdir, plan["seccomp"])
        while (ended := os.waitpid(-1, 0))[0] != pid:  # as init, orphans are ours to reap
            pass
        how = ended[1]
        _report(3, **({"signal": os.WTERMSIG(how)} if os.WIFSIGNALED(how) else {"exit": os.WEXITSTATUS(how)}))
        status = 0
    except BaseException as e:
        _report(3, setup=f"{type(e).__name__}: {e}")
    finally:
        os._exit(status)


def _run(code: str, workdir: str, filtered: bool) -> None:
    """P: run `code` as `python script.py` would, writing straight through to the pipes so that output
    printed before an os._exit is not lost in a buffer. Never returns (neither do processes it forks).

    The code holds no descriptor but stdin (/dev/null), stdout and stderr: I's report pipe is closed before
    it runs, so nothing the code writes can pass for how the call ended. An uncaught exception ends it with
    exit code 1 and its traceback on stderr, whose last line the server takes as the error line, as a
    terminal shows `python script.py`'s."""
    status = 1
    try:
        _close_from(3)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.environ.update(HOME=workdir, TMPDIR=workdir)
        tempfile.tempdir, sys.argv, sys.dont_write_bytecode = workdir, ["<tool>"], True
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")  # /dev/null, fd 0: no fd 3
        sys.stdout, sys.stderr = (io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding="utf-8",
                                                   errors="backslashreplace", write_through=True) for fd in (1, 2))
        if "numpy" in sys.modules:  # else every call draws the same numbers, forked from one state
            sys.modules["numpy"].random.seed()
        if filtered:
            seccomp.install()
        try:
            exec(compile(code, "<tool>", "exec"), {"__name__": "__main__", "__builtins__": builtins})
            status = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                status = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except BaseException as e:
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # from the code's frames on
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(status)


# ---- 9. How a call ended: the report pipe, the error line, signals ----


def _report(fd: int, **record) -> None:
    os.write(fd, (json.dumps(record) + "\n").encode())


def read_report(raw: bytes) -> dict:
    """C's and I's word on how the call ended, checked strictly: each line one JSON object of exactly one
    known key and type ({"exit": int}, {"signal": int}, {"setup": str}). Anything else is set aside as
    {"malformed": ...}, which the call's outcome reports, and never reaches the server's loop as an error."""
    kinds = {"exit": int, "signal": int, "setup": str}
    report: dict = {}
    for line in raw.splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: 3000 "[" nest deeper than json's parser goes
            record = None
        ok = (isinstance(record, dict) and len(record) == 1 and (key := next(iter(record))) in kinds
              and type(record[key]) is kinds[key])
        if ok:
            report.update(record)
        else:
            report["malformed"] = line[:200].decode("utf-8", "replace")
    return report


def _error_line(stderr_tail: bytes, code: int) -> str:
    """The error line of a call that exited with `code`: for 1, Python's code for an uncaught exception,
    the last line of stderr (the traceback's "NameError: name 'x' is not defined"), as a terminal shows it;
    otherwise, or when stderr is empty, the exit code."""
    lines = stderr_tail.decode("utf-8", "replace").strip().splitlines()
    return lines[-1].strip()[:1000] if code == 1 and lines else f"exited with code {code}"


def _signalled(signum: int, limits: dict) -> tuple[str, str]:
    if signum == signal.SIGXCPU:
        return "timeout", f"used more than {math.ceil(limits['timeout_s']) + 1} s of CPU time"
    try:
        return "killed", f"killed by {signal.Signals(signum).name}"
    except ValueError:
        return "killed", f"killed by signal {signum}"


# ---- 10. The server: one select loop over the trainer's socket, the calls' pipes and SIGCHLD ----


class _Call:
    def __init__(self, call_id: int, pid: int, workdir: str, timeout_s: float):
        self.id, self.pid, self.workdir = call_id, pid, workdir
        self.start = time.monotonic()
        self.deadline = self.start + timeout_s
        self.out = {"stdout": bytearray(), "stderr": bytearray(), "report": bytearray()}
        self.stderr_tail = bytearray()  # the last STDERR_TAIL bytes, wherever the output limit cut
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
        self.cleaners: set[int] = set()  # processes deleting working folders the kernel did not free
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
                self.discard(workdir)
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
        if name == "stderr":
            call.stderr_tail = (call.stderr_tail + data)[-STDERR_TAIL:]
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
            self.cleaners.discard(info.si_pid)
            call = self.running.pop(info.si_pid, None)
            if call:
                try:
                    outcome = self.finish(call, status)
                except Exception as e:  # whatever a call did, the server goes on: that call fails, no other
                    outcome = {"status": "error", "stdout": "", "error": f"the sandbox could not read how the call "
                               f"ended ({type(e).__name__}: {e})", "seconds": 0.0, "truncated": False}
                self.send({"id": call.id, **outcome})

    def discard(self, workdir: str) -> None:
        """Remove a call's working folder. With its tmpfs the kernel already freed the contents, and an
        empty mount point is one rmdir; otherwise a child process deletes the tree, so that a folder of
        150,000 files or 100,000 levels never holds up the loop and the other calls."""
        try:
            os.rmdir(workdir)
            return
        except FileNotFoundError:
            return
        except OSError:
            pass
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                remove_tree(workdir)
                code = 0
            finally:
                os._exit(code)
        self.cleaners.add(pid)

    def finish(self, call: _Call, status: int) -> dict:
        for fd, name in list(call.fds.items()):  # what was written before the end; never waits
            try:
                while (data := os.read(fd, 1 << 16)) and not self._keep(call, name, data):
                    pass
            except BlockingIOError:
                pass
            self.sel.unregister(fd)
            os.close(fd)
        self.discard(call.workdir)
        report = read_report(bytes(call.out["report"]))
        limits = self.limits
        if call.killed_for == "timeout":
            state, error = "timeout", f"timed out after {limits['timeout_s']:g} s"
        elif call.killed_for == "output":
            state, error = "killed", f"output limit of {limits['output_bytes']} bytes reached"
        elif "setup" in report:
            state, error = "error", f"sandbox setup failed: {report['setup']}"
        elif "malformed" in report:  # only C and I write reports: a bug of ours, never the code's doing
            state, error = "error", f"the sandbox's report was malformed: {report['malformed']!r}"
        elif "signal" in report or os.WIFSIGNALED(status):  # P killed, or C: the code killed its own group
            state, error = _signalled(report.get("signal") or os.WTERMSIG(status), limits)
        elif "exit" in report:
            code = report["exit"]
            state, error = ("ok", "") if code == 0 else ("error", _error_line(call.stderr_tail, code))
        else:
            state, error = "error", f"ended without a report (exit status {os.waitstatus_to_exitcode(status)})"
        return {"status": state, "stdout": call.out["stdout"].decode("utf-8", "replace"), "error": error,
                "seconds": round(time.monotonic() - call.start, 4), "truncated": call.killed_for == "output"}

    def shutdown(self) -> None:
        for call in self.running.values():
            self.kill(call, "closed")
        for call in self.running.values():
            os.waitpid(call.pid, 0)
            try:
                remove_tree(call.workdir)
            except OSError:
                pass
        for pid in self.cleaners:
            os.waitpid(pid, 0)


# ---- 11. Start-up: the maths libraries imported and warmed, the probe, the loop ----


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
    if "numpy" in sys.modules:  # its first seeding loads more, which every call would pay again (docs/performance.md)
        sys.modules["numpy"].random.seed(0)
    if "sympy" in sys.modules:  # so do its parser and printer, on every call
        str(sys.modules["sympy"].sympify("sqrt(8) + x/3"))
    plan, isolation, refused = probe(cfg, preloaded)
    server = Server(cfg, plan, socket.socket(fileno=cfg["fd"]))
    server.send({"hello": isolation, "refused": refused})
    if not refused:
        server.serve()


if __name__ == "__main__":
    main()
