"""runtime/host_memory.py: glibc keeps freed memory for reuse once asked, and gives large blocks back otherwise."""
from __future__ import annotations

import subprocess
import sys

import pytest

# A child process (the allocator setting lasts for the process): mallocs 256 MiB, touches every page, frees it and
# prints how much of it is still resident.
_CHILD = """
import ctypes, ctypes.util, sys
from megatron_slim.runtime.host_memory import retain_freed_memory

def rss_kib():
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("VmRSS:")))

if sys.argv[1] == "retain":
    assert retain_freed_memory() and retain_freed_memory()  # idempotent
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20
base = rss_kib()
block = libc.malloc(size)
ctypes.memset(block, 1, size)
libc.free(block)
print((rss_kib() - base) / (size >> 10))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc/self/status")
@pytest.mark.parametrize("mode, kept", [("default", False), ("retain", True)])
def test_freed_memory_is_kept_only_when_asked(mode, kept):
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True)
    resident = float(out.stdout)
    assert (resident > 0.9) if kept else (resident < 0.1), out.stdout
