"""Linear sampling of network-grid tensors at CUBE points, using every CPU core.

PyTorch's CPU kernel for 3-D ``grid_sample`` (and its backward) runs on one thread. Sampling a
3-channel field at the 175^3 nodes of the published network takes about 0.6 s on one core, and a
prediction samples seven such fields; instance optimisation samples more and differentiates them.
:func:`sample_cube_field` computes exactly what :func:`itk_gradicon.geometry.sample_cube_field`
computes, splitting the output points into one slab per thread on the CPU (the value at each point
is computed by the same kernel, so the result is bitwise identical; gradients with respect to the
sampled tensor are summed over the slabs, which changes only float rounding).

Example:
    >>> import torch
    >>> from itk_gradicon.network.sampling import sample_cube_field
    >>> field = torch.zeros(1, 3, 8, 8, 8)
    >>> points = torch.rand(1, 3, 4, 4, 4)
    >>> sample_cube_field(field, points).shape
    torch.Size([1, 3, 4, 4, 4])
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

#: Below this many output points per call the work is not split (thread start-up would dominate).
MIN_POINTS_PER_THREAD = 1 << 16

_POOL: Optional[ThreadPoolExecutor] = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE != workers:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="itk_gradicon-sample")
            _POOL_SIZE = workers
        return _POOL


def _slabs(grid: torch.Tensor) -> int:
    """Number of slabs to split ``grid`` ``[B, *out, d]`` into (1: do not split)."""
    if grid.device.type != "cpu":
        return 1
    threads = torch.get_num_threads()
    points = grid[..., 0].numel()
    if threads < 2 or grid.shape[1] < 2 or points < 2 * MIN_POINTS_PER_THREAD:
        return 1
    return int(min(threads, grid.shape[1], points // MIN_POINTS_PER_THREAD))


def _run(function, pieces: List[tuple]) -> list:
    if len(pieces) == 1:
        return [function(*pieces[0])]
    return list(_pool(len(pieces)).map(lambda args: function(*args), pieces))


def _sample(field: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(field, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _forward_in_slabs(field: torch.Tensor, grid: torch.Tensor, slabs: int) -> torch.Tensor:
    with torch.autograd.set_grad_enabled(False):
        outputs = _run(_sample, [(field, part) for part in grid.tensor_split(slabs, dim=1)])
    return torch.cat(outputs, dim=2)


class _ParallelGridSample(torch.autograd.Function):
    """``grid_sample(field, grid)`` (linear, border, ``align_corners=True``) over slabs in threads."""

    @staticmethod
    def forward(ctx, field: torch.Tensor, grid: torch.Tensor, slabs: int) -> torch.Tensor:
        ctx.save_for_backward(field, grid)
        ctx.slabs = slabs
        return _forward_in_slabs(field, grid, slabs)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], None]:
        field, grid = ctx.saved_tensors
        need_field, need_grid = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        backward = (torch.ops.aten.grid_sampler_3d_backward if field.dim() == 5
                    else torch.ops.aten.grid_sampler_2d_backward)
        grid_parts = grid.tensor_split(ctx.slabs, dim=1)
        grad_parts = grad_output.tensor_split(ctx.slabs, dim=2)

        def one(grad_part: torch.Tensor, grid_part: torch.Tensor):
            # interpolation 0 = bilinear, padding 1 = border
            return backward(grad_part.contiguous(), field, grid_part, 0, 1, True, [need_field, need_grid])

        results = _run(one, list(zip(grad_parts, grid_parts)))
        grad_field = grad_grid = None
        if need_field:
            grad_field = results[0][0]
            for partial, _ in results[1:]:
                grad_field = grad_field + partial
        if need_grid:
            grad_grid = torch.cat([g for _, g in results], dim=1)
        return grad_field, grad_grid, None


def grid_sample_border(field: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``F.grid_sample(field, grid, "bilinear", "border", align_corners=True)``, threaded on the CPU."""
    slabs = _slabs(grid)
    if slabs < 2:
        return _sample(field, grid)
    if torch.is_grad_enabled() and (field.requires_grad or grid.requires_grad):
        return _ParallelGridSample.apply(field, grid, slabs)
    return _forward_in_slabs(field, grid, slabs)


def sample_cube_field(field: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of a CUBE-grid field at CUBE points; border values outside.

    The same function as :func:`itk_gradicon.geometry.sample_cube_field` (see there for the
    conventions), computed on all CPU threads.

    Args:
        field: ``[B, C, *shape]`` values on the network grid.
        points: ``[B or 1, d, *out]`` CUBE coordinates (component ``c`` along network axis ``c``).

    Returns:
        ``[B, C, *out]``.
    """
    d = points.shape[1]
    grid = (points * 2.0 - 1.0).flip(1)
    grid = grid.permute(0, *range(2, d + 2), 1)
    if grid.shape[0] != field.shape[0]:
        grid = grid.expand(field.shape[0], *grid.shape[1:])
    return grid_sample_border(field, grid.to(field.dtype))
