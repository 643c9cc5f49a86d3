"""The CLI keeps freed memory in glibc's heap, and leaves a user's own setting alone."""

import subprocess
import sys

import pytest

from spade_faiss.apps import allocator

PROBE = """
import ctypes, sys
from spade_faiss.apps import allocator
applied = allocator.keep_freed_memory()
# glibc cannot report its thresholds: malloc a block between the default mmap threshold
# (128 KiB) and ours, and see whether it lies in the heap (below the program break) or was
# mmap'd (far above it)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.sbrk.restype = ctypes.c_void_p
p = libc.malloc(8 << 20)
print(applied, p < libc.sbrk(0))
"""


def run_probe(env_extra):
    import os
    env = {k: v for k, v in os.environ.items() if k not in allocator.USER_VARIABLES} | env_extra
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env,
                          check=True).stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_large_blocks_come_from_the_heap_unless_the_user_chose():
    assert run_probe({}) == ["True", "True"]              # 8 MiB from the heap: reused, no page faults
    assert run_probe({"MALLOC_TRIM_THRESHOLD_": "131072"}) == ["False", "False"]  # glibc's default: mmap

