"""How much host memory this process can still use, on Linux (containers included), macOS and Windows.

:func:`available_host_memory` is what the memory checks of ``gradicon register`` compare their estimates
with. It asks the operating system, never guesses:

* **Linux**: ``MemAvailable`` of ``/proc/meminfo`` (free memory plus what the kernel can reclaim), and,
  inside a container or a batch job's cgroup, the cgroup's limit minus its usage (cgroup v2
  ``memory.max`` / ``memory.current``, v1 ``memory.limit_in_bytes`` / ``memory.usage_in_bytes``): a
  scheduler's job sees its own allowance, not the whole machine's free memory;
* **macOS**: ``vm_stat``'s free, inactive, speculative and purgeable pages;
* **Windows**: ``GlobalMemoryStatusEx``'s ``ullAvailPhys``;
* elsewhere: ``sysconf(SC_AVPHYS_PAGES)``.

Each query returns ``(bytes, where)``; ``where`` names the source for error messages. When no query
works, the result is ``(None, reason)`` and the caller decides (the checks then skip the comparison
and say so, rather than pretending the memory is unlimited).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional, Tuple

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read_int(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _own_cgroup_paths(root: Path, proc_self_cgroup: Path = Path("/proc/self/cgroup")) -> list:
    """Folders of this process's memory cgroup (v2 unified and v1 ``memory`` controller)."""
    folders = []
    try:
        lines = proc_self_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, relative = parts
        relative = relative.lstrip("/")
        if controllers == "":  # cgroup v2
            folders.append(root / relative)
        elif "memory" in controllers.split(","):
            folders.append(root / "memory" / relative)
    folders += [root, root / "memory"]
    return folders


def cgroup_available(root: Path = CGROUP_ROOT, proc_self_cgroup: Path = Path("/proc/self/cgroup")) -> Optional[int]:
    """Bytes left under this process's cgroup memory limit, or ``None`` without a limit."""
    best: Optional[int] = None
    for folder in _own_cgroup_paths(root, proc_self_cgroup):
        for limit_name, usage_name in (("memory.max", "memory.current"),
                                       ("memory.limit_in_bytes", "memory.usage_in_bytes")):
            limit = _read_int(folder / limit_name)
            if limit is None or limit >= 1 << 60:  # v1 writes a huge number for "no limit"
                continue
            usage = _read_int(folder / usage_name) or 0
            left = max(0, limit - usage)
            best = left if best is None else min(best, left)
    return best


def _linux() -> Optional[Tuple[int, str]]:
    try:
        with open("/proc/meminfo") as fh:
            info = dict(line.split(":", 1) for line in fh if ":" in line)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        return None
    limited = cgroup_available()
    if limited is not None and limited < available:
        return limited, "RAM (cgroup limit minus usage)"
    return available, "RAM (MemAvailable)"


def parse_vm_stat(text: str) -> Optional[int]:
    """Available bytes from macOS ``vm_stat`` output (free + inactive + speculative + purgeable pages)."""
    size = re.search(r"page size of (\d+) bytes", text)
    if not size:
        return None
    pages = 0
    found = False
    for name in ("Pages free", "Pages inactive", "Pages speculative", "Pages purgeable"):
        match = re.search(rf"^{name}:\s+(\d+)\.?\s*$", text, re.MULTILINE)
        if match:
            pages += int(match.group(1))
            found = True
    return pages * int(size.group(1)) if found else None


def _macos() -> Optional[Tuple[int, str]]:
    try:
        text = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    available = parse_vm_stat(text)
    return None if available is None else (available, "RAM (vm_stat)")


def _windows() -> Optional[Tuple[int, str]]:
    import ctypes

    class MemoryStatusEx(ctypes.Structure):
        _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                    ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                    ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                    ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                    ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

    status = MemoryStatusEx()
    status.dwLength = ctypes.sizeof(MemoryStatusEx)
    try:
        if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):  # type: ignore[attr-defined]
            return None
    except (AttributeError, OSError):
        return None
    return int(status.ullAvailPhys), "RAM (GlobalMemoryStatusEx)"


def _sysconf() -> Optional[Tuple[int, str]]:
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE")), "RAM (sysconf)"
    except (AttributeError, ValueError, OSError):
        return None


def available_host_memory() -> Tuple[Optional[int], str]:
    """``(bytes this process can still use, source)``, or ``(None, reason)`` if no query works."""
    if sys.platform.startswith("linux"):
        queries = (_linux, _sysconf)
    elif sys.platform == "darwin":
        queries = (_macos, _sysconf)
    elif sys.platform.startswith("win"):
        queries = (_windows,)
    else:
        queries = (_sysconf,)
    for query in queries:
        found = query()
        if found is not None:
            return found
    return None, f"RAM (no query of free memory works on {sys.platform})"


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the platform has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def for_each_slab(rows_total: int, rows_per_slab: int, work: Callable[[slice], None], *,
                  threads: Optional[int] = None) -> None:
    """Run ``work(rows)`` for consecutive slabs ``rows`` of ``range(rows_total)`` on a few threads.

    The slabs are independent and each writes its own part of a preallocated output, so the result
    does not depend on the number of threads; numpy releases the interpreter lock in the large array
    operations, which therefore run in parallel. Memory grows with the number of threads (one slab
    each). An exception in any slab is raised here.

    Args:
        rows_total: rows to cover.
        rows_per_slab: rows per call of ``work``.
        work: the computation of one slab.
        threads: default :func:`usable_cores`, at most 4.
    """
    slabs = [slice(start, min(start + rows_per_slab, rows_total)) for start in range(0, rows_total, rows_per_slab)]
    threads = min(threads or min(usable_cores(), 4), len(slabs))
    if threads <= 1:
        for rows in slabs:
            work(rows)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gradicon-slab") as pool:
        for future in [pool.submit(work, rows) for rows in slabs]:
            future.result()
