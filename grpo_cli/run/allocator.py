"""How the process's C allocator treats tensor-sized buffers on the CPU.

glibc's malloc serves a block larger than its mmap threshold (128 KiB, raised up to 32 MiB
as it sees such blocks freed) with a fresh mmap, and returns freed heap memory to the
system. A training step allocates and frees thousands of activations of a few hundred KiB
to a few MiB; served fresh, every page of each one is faulted in again. Kept in the heap,
they are reused warm: the update's forward and backward and a whole run take less wall and
system time, with the same peak resident set (docs/performance.md, "CPU memory"). The cost
is that the resident set does not shrink back after the step's peak.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters (malloc.h)
MIB = 2**20


def keep_freed_memory() -> bool:
    """Blocks up to 32 MiB (glibc's most) from the heap; freed memory kept unless over 1 GiB; the
    heap grown 64 MiB at a time. False where the C library is not glibc (nothing changes there)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no glibc mallopt
        return False
    settings = ((M_MMAP_THRESHOLD, 32 * MIB), (M_TRIM_THRESHOLD, 1024 * MIB), (M_TOP_PAD, 64 * MIB))
    return all(mallopt(param, value) == 1 for param, value in settings)
