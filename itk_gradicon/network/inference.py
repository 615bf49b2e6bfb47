"""Prediction: the network's displacement fields on its own grid, one or both directions.

:func:`predict_displacements` is what registration calls once the images are on the network grid.
It evaluates only the directions asked for (the reference implementation evaluates both directions
and the whole training loss, twice, to predict one transform), and on a GPU it runs both directions
as one batch of two (BatchNorm uses running statistics, so each batch entry is computed exactly as
alone). Reduced precision is opt-in and only on CUDA devices (:func:`autocast_context`).

Example:
    >>> import torch
    >>> from itk_gradicon.network import Architecture, build_network
    >>> from itk_gradicon.network.inference import predict_displacements
    >>> arch = Architecture(input_shape=(24, 24, 24), levels=2, down_channels=(4, 8, 8), up_channels=(4, 8, 8))
    >>> net = build_network(arch).eval()
    >>> a, b = torch.rand(1, 1, 24, 24, 24), torch.rand(1, 1, 24, 24, 24)
    >>> ab, ba = predict_displacements(net, a, b, inverse=True)
    >>> ab.shape, ba.shape
    (torch.Size([1, 3, 24, 24, 24]), torch.Size([1, 3, 24, 24, 24]))
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Optional, Tuple

import torch

#: ``--precision`` names and the autocast dtype they stand for (``None``: full float32).
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def autocast_context(device: torch.device, precision: str = "float32") -> ContextManager:
    """Autocast for ``precision`` on a CUDA device; a no-op for float32 and on the CPU.

    Raises:
        ValueError: an unknown precision name.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None or torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def predict_displacements(net: torch.nn.Module, image_A: torch.Tensor, image_B: torch.Tensor, *,
                          inverse: bool, batch_directions: Optional[bool] = None,
                          precision: str = "float32") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Displacements ``phi_AB - id`` (and ``phi_BA - id``) on the network grid, in CUBE units.

    Args:
        net: registration network ``(A, B) -> CubeMap`` in evaluation mode.
        image_A, image_B: network inputs ``[B, C, *shape]``.
        inverse: also compute ``phi_BA`` (the network applied to ``(B, A)``).
        batch_directions: run both directions as one batch (default: on CUDA devices, where a
            larger batch uses the device better; on the CPU the two passes run one after the other,
            which halves the peak memory at the same speed).
        precision: ``float32`` (default), or ``bfloat16`` / ``float16`` autocast on CUDA devices.

    Returns:
        ``(disp_AB, disp_BA or None)``, float32 ``[B, d, *shape]``.
    """
    shape = tuple(image_A.shape[2:])
    if batch_directions is None:
        batch_directions = image_A.device.type == "cuda"
    with torch.inference_mode(), autocast_context(image_A.device, precision):
        if inverse and batch_directions:
            n = image_A.shape[0]
            both = net(torch.cat([image_A, image_B]), torch.cat([image_B, image_A]))
            disp = both.displacement_on_grid(shape).float()
            return disp[:n], disp[n:]
        disp_AB = net(image_A, image_B).displacement_on_grid(shape).float()
        disp_BA = net(image_B, image_A).displacement_on_grid(shape).float() if inverse else None
    return disp_AB, disp_BA
