import ctypes
import subprocess
import sys

import pytest


def glibc():
    try:
        return ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
    except OSError:
        return None


pytestmark = pytest.mark.skipif(glibc() is None or not hasattr(glibc(), "mallinfo2"),
                                reason="the settings are glibc's (mallopt; mallinfo2 from glibc 2.33 to check them)")

CHILD = """
import ctypes, torch
from grpo_cli.run import allocator

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
assert allocator.keep_freed_memory()
mapped = libc.mallinfo2().hblks
block = torch.empty(16 * 2**20, dtype=torch.uint8)  # an activation-sized buffer
print(libc.mallinfo2().hblks - mapped)
"""


def test_tensor_sized_blocks_come_from_the_heap_not_fresh_mappings():
    # In a fresh process: glibc would serve 16 MiB with its own mmap (threshold 128 KiB to start).
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "0"

