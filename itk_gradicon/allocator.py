"""Keep freed memory in the process for reuse by the next tensor (glibc's malloc).

A registration at 175^3 creates and frees hundreds of tensors of 20 to 200 MB. glibc's malloc
serves every block above its mmap threshold (at most 32 MB by default) from fresh pages that the
kernel must map and zero on first touch, and returns them to the kernel when the tensor is freed:
this page-fault work is a noticeable share of a prediction and of an instance-optimisation step
(figures: ``benchmarks/README.md``, "Design figures"). :func:`keep_freed_memory` makes malloc serve
large blocks from its heap (mmap threshold 2 GiB), keep freed memory there instead of giving it back
(trim threshold 2 GiB), and use that one heap from every thread (one arena: the sampling threads'
outputs would otherwise be mapped afresh in per-thread arenas, whose heaps hold at most 64 MB): faster,
for a slightly higher peak.

The ``gradicon`` command calls :func:`keep_freed_memory` when it starts. Library users can call it
themselves. It does nothing where the C library is not glibc, when the environment already tunes
malloc (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_ARENA_MAX`` or
``GLIBC_TUNABLES``: the user's choice wins), or when ``ITK_GRADICON_SYSTEM_MALLOC=1``.

Example:
    >>> from itk_gradicon.allocator import keep_freed_memory
    >>> keep_freed_memory()                                      # doctest: +SKIP
    True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

#: ``mallopt`` parameter numbers in glibc's ``malloc.h``.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
#: Environment variables through which users tune glibc's malloc themselves.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "GLIBC_TUNABLES")
#: Blocks below this size come from malloc's heap: the largest value ``mallopt``'s ``int`` carries
#: (2 GiB - 1), above any single tensor of a 175^3 registration.
HEAP_THRESHOLD = 2 ** 31 - 1
#: Environment variable that turns the tuning off.
OPT_OUT = "ITK_GRADICON_SYSTEM_MALLOC"

_applied = False


def keep_freed_memory() -> bool:
    """Serve large blocks from glibc malloc's one heap, reused after ``free``, instead of fresh mappings.

    Returns:
        whether the setting is in force (``False`` on other C libraries, on request, or when
        ``mallopt`` refuses the value).
    """
    global _applied
    if _applied:
        return True
    if os.environ.get(OPT_OUT, "").strip() not in ("", "0") or any(v in os.environ for v in USER_SETTINGS):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = all([mallopt(M_ARENA_MAX, 1), mallopt(M_TRIM_THRESHOLD, HEAP_THRESHOLD),
                    mallopt(M_MMAP_THRESHOLD, HEAP_THRESHOLD)])
    return _applied
