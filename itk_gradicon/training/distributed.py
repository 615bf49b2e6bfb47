"""Distributed training: this process's place in a ``torchrun`` job, and joining its process group."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Tuple

import torch

from ..devices import resolve_device
from ..errors import InputError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a distributed run (``torchrun`` sets the environment)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> "DistInfo":
        """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (absent: a single process)."""
        try:
            return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                       int(os.environ.get("LOCAL_RANK", 0)))
        except ValueError as err:
            raise InputError(f"malformed torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {err}") from None


def init_distributed(device_name: str) -> Tuple[DistInfo, torch.device]:
    """Join the process group when started by ``torchrun``; returns this process's place and device.

    The backend is NCCL for GPUs and gloo for CPUs; with ``--device auto|cuda`` each process uses
    the GPU ``cuda:LOCAL_RANK``.
    """
    import torch.distributed as dist

    info = DistInfo.from_env()
    device = resolve_device(device_name)
    if device.type == "cuda" and info.distributed:
        device = torch.device(f"cuda:{info.local_rank}")
        torch.cuda.set_device(device)
    if info.distributed and not dist.is_initialized():
        if not dist.is_available():
            raise InputError("this PyTorch has no torch.distributed; run one process")
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


__all__ = ["DistInfo", "init_distributed"]
