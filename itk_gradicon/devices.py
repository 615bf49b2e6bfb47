"""Where a registration runs and whether it fits: the compute device, and its memory checked before any work.

:func:`estimate_memory` predicts a registration's peak from the images' sizes alone (before any pixel is
read); :func:`check_memory` compares it with what the device and the host have free
(:func:`itk_gradicon.resources.available_host_memory`) and refuses work that would not fit.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import DeviceError, ResourceError
from .resources import available_host_memory

# Measured peaks of the published network per voxel of the network grid (175^3 on CPU, float32):
# prediction of one direction about 1.8 GB, one network-IO step (both directions + backward) about 9.6 GB;
# field IO after the prediction of both directions, whole process, BraTS FLAIR -> T1c: on the compiled CPU kernels
# 3.3 GB with LNCC, 6.7 GB with MIND-SSC; through PyTorch alone (a GPU, or an install without a C compiler)
# 4.3 GB and 9.8 GB. MIND's figure is used whatever the similarity (chosen later, from the pair).
_BYTES_PER_NETWORK_VOXEL_PREDICT = 360
_BYTES_PER_NETWORK_VOXEL_IO = {"network": 1900, "field": 1250, "field without the compiled kernels": 1800}


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"cannot use --device {name!r}: torch.cuda.is_available() is False "
                              "(no GPU, or a CPU-only PyTorch); use --device cpu or auto")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"cannot use --device {name!r}: only {torch.cuda.device_count()} GPU(s)")
        return device
    raise DeviceError(f"unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N")


def available_memory_bytes(device: torch.device) -> Tuple[Optional[int], str]:
    """Free memory on ``device`` and where it was read (``None`` when the platform cannot tell; see
    :func:`itk_gradicon.resources.available_host_memory`)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"GPU {device}"
    return available_host_memory()


def estimate_memory(fixed_voxels: int, moving_voxels: int, dimension: int, network_shape: Sequence[int], *,
                    io: bool, inverse: bool, affine: bool = False, originals: bool = False,
                    io_method: str = "network", compiled: bool = True) -> Dict[str, int]:
    """Peak bytes a registration needs, from the images' sizes alone (before any pixel is read).

    Args:
        fixed_voxels, moving_voxels: number of voxels of each image.
        dimension: 2 or 3.
        network_shape: the model's input size.
        io: instance optimisation is run.
        io_method: which (``"network"``: the network tuned, forwards and backwards; ``"field"``: the two
            predicted fields refined, far less).
        compiled: field IO runs on the compiled CPU kernels (else through PyTorch alone: a GPU, or an
            install without a C compiler, about 1.5 times the memory).
        inverse: the inverse transform is computed.
        affine: an affine pre-alignment is composed in (the moving image is resampled onto the fixed
            grid and the deformable parts are kept as well).
        originals: the images are also kept in their own pixel types (warped image, QC picture).

    Returns:
        ``{"network": bytes of the network's work (on the device), "host": bytes of images and fields
        in host memory}``.
    """
    net_voxels = int(np.prod(network_shape, dtype=np.int64))
    kind = io_method if io_method != "field" or compiled else "field without the compiled kernels"
    network = net_voxels * (_BYTES_PER_NETWORK_VOXEL_IO[kind] if io else _BYTES_PER_NETWORK_VOXEL_PREDICT)
    f, m, d = int(fixed_voxels), int(moving_voxels), int(dimension)
    # per image: float32 copy, float64 normalisation temporaries (clip + quantile partition), float32 result
    images = 28 * (f + m)
    if affine:
        images += 4 * f * 3  # moving image, mask and labels resampled onto the fixed grid
    if originals:
        images += 8 * (f + m) + 4 * f  # pixels as stored (up to float64) and the warped image
    # float32 fields plus the float64 copy ITK's transform holds while writing
    fields = (4 + 8) * d * f
    if inverse:
        fields += (4 + 8) * d * m
    if affine:
        fields += 4 * d * f * (2 if inverse else 1)  # deformable parts on the fixed grid
    fields += 6 * 8 * d * 1_000_000  # one chunk of points in flight (float64)
    return {"network": int(network), "host": int(images + fields)}


def check_memory(estimate: Dict[str, int], device: torch.device) -> None:
    """Refuse work that would not fit, before it starts.

    Args:
        estimate: from :func:`estimate_memory`.
        device: where the network runs; on a GPU its free memory must hold the network's work and
            host memory the rest, on the CPU host memory must hold both.

    Raises:
        ResourceError: naming what is needed and what is free.
    """
    gib = 1024 ** 3
    if device.type == "cuda":
        free, where = available_memory_bytes(device)
        if estimate["network"] > free:
            raise ResourceError(f"not enough GPU memory: this registration needs about "
                                f"{estimate['network'] / gib:.1f} GiB on {where}, {free / gib:.1f} GiB free")
        needed_host = estimate["host"]
    else:
        needed_host = estimate["host"] + estimate["network"]
    free, where = available_memory_bytes(torch.device("cpu"))
    if free is None:  # the platform cannot tell: nothing to compare with (the work may still fit)
        return
    if needed_host > free:
        raise ResourceError(f"images too large for the available memory: this registration needs about "
                            f"{needed_host / gib:.1f} GiB, {where} reports {free / gib:.1f} GiB free")


__all__ = ["available_memory_bytes", "check_memory", "estimate_memory", "resolve_device"]
