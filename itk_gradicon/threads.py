"""How many threads the computing libraries use: torch, ITK (and elastix), SimpleITK.

``--threads N`` on every command that computes sets all of them to ``N``. Without it, each library gets
what the environment asks for, as ANTs users expect on cluster nodes: ``OMP_NUM_THREADS`` for torch,
``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` for ITK, SimpleITK and elastix, and otherwise the cores of the
process's affinity mask (what ``taskset`` or a batch scheduler granted, not every core of the machine).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional

from .errors import InputError

TORCH_ENV = "OMP_NUM_THREADS"
ITK_ENV = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"


def available_threads() -> int:
    """Number of CPU cores this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Threads:
    """Threads per library and where each count came from."""

    torch: int
    itk: int
    source: str

    def describe(self) -> str:
        if self.torch == self.itk:
            return f"threads: {self.torch} ({self.source})"
        return f"threads: torch {self.torch}, ITK/elastix {self.itk} ({self.source})"


def _from_env(name: str) -> Optional[int]:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        count = int(value)
    except ValueError:
        raise InputError(f"${name} is {value!r}; it must be a whole number >= 1") from None
    if count < 1:
        raise InputError(f"${name} is {value!r}; it must be a whole number >= 1")
    return count


def resolve_threads(requested: Optional[int] = None) -> Threads:
    """The counts for ``--threads requested`` (``None``: the environment, else the affinity mask).

    Raises:
        InputError: ``requested`` below 1, or an environment variable that is not a whole number >= 1.
    """
    if requested is not None:
        if isinstance(requested, bool) or int(requested) != requested or requested < 1:
            raise InputError(f"--threads must be a whole number >= 1, not {requested!r}")
        return Threads(int(requested), int(requested), "--threads")
    cores = available_threads()
    torch_env, itk_env = _from_env(TORCH_ENV), _from_env(ITK_ENV)
    sources = [f"${name}" for name, value in ((TORCH_ENV, torch_env), (ITK_ENV, itk_env)) if value is not None]
    return Threads(torch_env or cores, itk_env or cores,
                   " and ".join(sources) if sources else "the cores this process may run on")


_CURRENT: Optional[Threads] = None


def apply_threads(threads: Threads) -> Threads:
    """Make every library use ``threads``: the environment for libraries not imported yet, their own
    settings for those already imported (torch, ITK Python, SimpleITK). Returns ``threads``."""
    global _CURRENT
    os.environ[TORCH_ENV] = str(threads.torch)
    os.environ[ITK_ENV] = str(threads.itk)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads.torch)
    if "itk" in sys.modules:
        try:
            sys.modules["itk"].MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads.itk)
        except AttributeError:  # ITK's lazy loader before its core module is loaded: the variable applies
            pass
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads.itk)
    _CURRENT = threads
    return threads


def itk_threads() -> int:
    """Threads for ITK-based work that takes a count (elastix): the applied setting, else the environment
    or the affinity mask."""
    return (_CURRENT or resolve_threads()).itk


__all__ = ["Threads", "available_threads", "resolve_threads", "apply_threads", "itk_threads"]
