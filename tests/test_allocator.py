"""The ``gradicon`` process keeps freed large blocks for reuse (glibc), and users can opt out."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the tuning applies to glibc's malloc only")

# Where does a 64 MiB block live, and what happens to its memory when it is freed? glibc's
# mallinfo2: `hblkhd` counts bytes in separate mappings, `arena` the bytes of the main heap.
_PROBE = r"""
import ctypes, json, sys
import numpy as np
from itk_gradicon.allocator import keep_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_memory() if sys.argv[1] == "tuned" else False
block = np.ones(16 * 1024 * 1024, dtype=np.float32)
alive = libc.mallinfo2()
del block
freed = libc.mallinfo2()
print(json.dumps({"applied": applied, "mapped_alive": alive.hblkhd, "heap_alive": alive.arena,
                  "heap_freed": freed.arena}))
"""
BLOCK = 64 * 1024 * 1024


def _probe(mode: str, **env: str) -> dict:
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "ITK_GRADICON_SYSTEM_MALLOC")}
    environment.update(env)
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True,
                         env=environment).stdout
    return json.loads(out.strip().splitlines()[-1])


@glibc_only
def test_large_blocks_come_from_the_heap_and_stay_there_when_freed():
    try:
        default, tuned = _probe("default"), _probe("tuned")
    except subprocess.CalledProcessError as error:  # mallinfo2 is glibc >= 2.33
        pytest.skip(f"no mallinfo2 here: {error.stderr.strip().splitlines()[-1]}")
    assert default["mapped_alive"] >= BLOCK                    # glibc's default: a mapping of its own,
    assert tuned["applied"] is True
    assert tuned["mapped_alive"] < BLOCK <= tuned["heap_alive"]  # tuned: from the heap
    assert tuned["heap_freed"] >= BLOCK                          # and kept there for the next tensor


@glibc_only
@pytest.mark.parametrize("env", [{"ITK_GRADICON_SYSTEM_MALLOC": "1"}, {"MALLOC_ARENA_MAX": "4"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"}])
def test_users_can_keep_their_own_malloc_settings(env):
    result = _probe("tuned", **env)
    assert result["applied"] is False
