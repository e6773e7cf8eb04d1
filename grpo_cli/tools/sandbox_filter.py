"""The code sandbox's system-call filter (seccomp): what a maths tool never needs is refused.

Loaded by sandbox_server.py by path (the server runs in isolated mode and imports nothing of grpo_cli),
installed in the process that runs the model's code just before the code runs, and inherited by
everything that process starts. A refused call fails with EACCES ("PermissionError: [Errno 13]"), an
error the code sees and Python reports, rather than a kill that would hide what was tried; EACCES and
not EPERM, so that a test can tell our refusal from the kernel's own.

Refused, and why:
- socket(): no new sockets of any family. The network namespace already has no interface up, but a
  pathname unix socket (/tmp/x.sock, /var/run/docker.sock, a user's D-Bus) crosses a network namespace,
  and Landlock before ABI 6 does not cover it. socketpair() stays allowed: two connected ends with no
  address reach nothing, and asyncio's event loop needs one.
- keyctl, add_key, request_key: the kernel keyring holds login and SSH secrets and outlives a call.
- memfd_create, memfd_secret: memory held through a file descriptor escapes RLIMIT_AS.
- ptrace, process_vm_readv/writev, pidfd_getfd: reaching into another process.
- bpf, perf_event_open, userfaultfd, io_uring_*: large kernel attack surface no maths needs
  (io_uring also bypasses this very filter for the operations it performs).
- mount and the new mount API, umount2, pivot_root, chroot, unshare, setns, and clone() with a
  namespace flag (clone3, whose flags the filter cannot read, answers ENOSYS so that libc falls back
  to clone): new namespaces would undo the call's own.
- open_by_handle_at, name_to_handle_at: opening files by handle bypasses path-based confinement.
- Any system call of another ABI (x32, or 32-bit calls on a 64-bit kernel): the numbers above would
  not apply to them.

Known on x86_64 and aarch64; elsewhere `supported()` is False and the server says so.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
RET_ALLOW, RET_ERRNO = 0x7FFF0000, 0x00050000
DENIED_ERRNO = errno.EACCES
# clone() flags that create a namespace; CLONE_NEWTIME (0x80) shares bits with clone()'s exit signal,
# and only unshare/clone3 take it, both refused outright.
NAMESPACE_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000

# (audit arch, {name: number}) per machine; names as in the kernel's syscall tables
_TABLES = {
    "x86_64": (0xC000003E, {
        "socket": 41, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "pidfd_getfd": 438,
        "keyctl": 250, "add_key": 248, "request_key": 249, "memfd_create": 319, "memfd_secret": 447,
        "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
        "mount_setattr": 442, "open_by_handle_at": 304, "name_to_handle_at": 303,
        "clone": 56, "clone3": 435}),
    "aarch64": (0xC00000B7, {
        "socket": 198, "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "pidfd_getfd": 438,
        "keyctl": 219, "add_key": 217, "request_key": 218, "memfd_create": 279, "memfd_secret": 447,
        "bpf": 280, "perf_event_open": 241, "userfaultfd": 282,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51, "unshare": 97, "setns": 268,
        "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433,
        "mount_setattr": 442, "open_by_handle_at": 265, "name_to_handle_at": 264,
        "clone": 220, "clone3": 435}),
}
_OTHERS = {"x86_64": {"capset": 126}, "aarch64": {"capset": 91}}  # calls the server makes itself, not refused
X32_BIT = 0x40000000  # x86_64's x32 ABI marks its numbers with this bit


def syscall_numbers() -> dict[str, int]:
    """This machine's numbers for the calls the filter knows, and capset ({} where it knows none)."""
    return {**_TABLES.get(platform.machine(), (0, {}))[1], **_OTHERS.get(platform.machine(), {})}


def supported() -> bool:
    return platform.system() == "Linux" and platform.machine() in _TABLES


class _Instruction(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Instruction))]


_LOAD_WORD, _RET = 0x20, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_RET|BPF_K
_JEQ, _JGE, _JSET = 0x15, 0x35, 0x45  # BPF_JMP|BPF_JEQ/JGE/JSET|BPF_K
_NR, _ARCH, _ARG0 = 0, 4, 16  # offsets in struct seccomp_data (arg0's low word on a little-endian machine)


def program(machine: str) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions for `machine`. Jumps are relative, so each test jumps
    to one of three returns at the end: deny (EACCES), no (ENOSYS, clone3) or the clone flag check."""
    arch, numbers = _TABLES[machine]
    denied = [n for name, n in numbers.items() if name not in ("clone", "clone3")]
    tests = [(_JGE, X32_BIT, "deny")] if machine == "x86_64" else []
    tests += [(_JEQ, n, "deny") for n in denied] + [(_JEQ, numbers["clone3"], "no"), (_JEQ, numbers["clone"], "clone")]
    # layout: 0 load arch, 1 arch check, 2 deny foreign ABI, 3 load nr, tests..., allow, clone check (3), deny, no
    first_test = 4
    allow = first_test + len(tests)
    targets = {"clone": allow + 1, "deny": allow + 4, "no": allow + 5}
    code = [(_LOAD_WORD, 0, 0, _ARCH), (_JEQ, 1, 0, arch), (_RET, 0, 0, RET_ERRNO | DENIED_ERRNO), (_LOAD_WORD, 0, 0, _NR)]
    for at, (op, k, target) in enumerate(tests, start=first_test):
        code.append((op, targets[target] - at - 1, 0, k))
    code += [(_RET, 0, 0, RET_ALLOW),
             (_LOAD_WORD, 0, 0, _ARG0), (_JSET, 1, 0, NAMESPACE_FLAGS), (_RET, 0, 0, RET_ALLOW),
             (_RET, 0, 0, RET_ERRNO | DENIED_ERRNO), (_RET, 0, 0, RET_ERRNO | errno.ENOSYS)]
    assert all(jt < 256 for _, jt, _, _ in code)
    return code


def install() -> None:
    """Install the filter on this process (and so on all it starts from now on); OSError if the kernel
    refuses. Needs no privilege: no_new_privs is set first, as the kernel requires."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    code = program(platform.machine())
    instructions = (_Instruction * len(code))(*(_Instruction(*i) for i in code))
    prog = _Program(len(code), ctypes.cast(instructions, ctypes.POINTER(_Instruction)))
    for args in ((PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), (PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0)):
        if libc.prctl(*args) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl({args[0]}): {os.strerror(err)}")
