"""Linear sampling of network-grid tensors at CUBE points, using every CPU core.

PyTorch's CPU kernel for 3-D ``grid_sample`` (and its backward) runs on one thread, and a prediction
samples eight 3-channel fields at the nodes of the network grid; instance optimisation samples more and
differentiates them (figures: ``benchmarks/README.md``, "Design figures").
:func:`sample_cube_field` computes exactly what :func:`grid_sample_cube_field` (PyTorch's ``grid_sample``)
computes, faster on the CPU:

* float32 3-D tensors on the CPU go through ``itk_gradicon._linear``, a small C kernel with
  ``grid_sample``'s arithmetic (bitwise the same values, several times faster per core), run on one
  range of points per thread; with autograd (instance optimisation) its backward kernel computes
  ``grid_sample``'s gradients the same way (the field's gradient summed over one buffer per thread).
  It is an optional part of the build: where it was not compiled, :data:`NATIVE` is ``None`` and
  ``grid_sample`` is used.
* otherwise ``grid_sample`` itself, split into one slab of output points per thread (the value at
  each point is computed by the same kernel, so the result is bitwise identical; gradients with
  respect to the sampled tensor are summed over the slabs, which changes only float rounding).

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
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import performance

try:
    from .. import _linear as NATIVE
except ImportError:  # built without a C compiler: grid_sample does all the sampling
    NATIVE = None

#: Below this many output points per call ``grid_sample``'s work is not split into slabs.
MIN_POINTS_PER_THREAD = 1 << 16
#: The compiled kernel starts faster: its ranges of points are split down to this many per thread
#: (the GradICON term of a 96^3 training step samples 48^3-point grids, which then use both cores).
MIN_NATIVE_POINTS_PER_THREAD = 1 << 13

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


def _grid(points: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """``grid_sample``'s grid for CUBE ``points``: in ``[-1, 1]``, last spatial axis first."""
    d = points.shape[1]
    grid = (points * 2.0 - 1.0).flip(1)
    grid = grid.permute(0, *range(2, d + 2), 1)
    if grid.shape[0] != field.shape[0]:
        grid = grid.expand(field.shape[0], *grid.shape[1:])
    return grid.to(field.dtype)


def cube_identity(shape: Sequence[int], *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Identity map on a network grid: ``[1, d, *shape]``, node ``m`` of axis ``c`` at ``m/(n_c-1)``."""
    axes = [torch.arange(n, device=device, dtype=torch.float64) / (n - 1) for n in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(mesh, dim=0)[None].to(dtype)


def grid_sample_cube_field(field: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of a CUBE-grid field at CUBE points, border values outside: PyTorch's
    ``grid_sample`` on one thread, the definition :func:`sample_cube_field` reproduces faster.

    Args:
        field: ``[B, C, *shape]`` values on the network grid.
        points: ``[B or 1, d, *out]`` CUBE coordinates (component ``c`` along network axis ``c``).

    Returns:
        ``[B, C, *out]``. Points outside ``[0, 1]^d`` take the value of the nearest border node
        (the published models' convention). ITK's displacement-field transforms do the same within
        half a voxel of their grid and leave points farther out unmoved; a fixed voxel never maps
        farther than half a network voxel outside the cube, so both agree on every output we write.
    """
    return F.grid_sample(field, _grid(points, field), mode="bilinear", padding_mode="border", align_corners=True)


_sample = grid_sample_cube_field


def _slabs(points: torch.Tensor) -> int:
    """Number of slabs to split ``points`` ``[B, d, *out]`` into (1: do not split)."""
    if points.device.type != "cpu" or points.dim() < 3:
        return 1
    threads = torch.get_num_threads()
    count = points[:, 0].numel()
    if threads < 2 or points.shape[2] < 2 or count < 2 * MIN_POINTS_PER_THREAD:
        return 1
    return int(min(threads, points.shape[2], count // MIN_POINTS_PER_THREAD))


def run_pieces(function, pieces: List[tuple]) -> list:
    """``[function(*piece) for piece in pieces]``, the pieces on this module's thread pool (one thread per
    core torch may use) where there are several; for functions that release the GIL (the compiled
    kernels, PyTorch's operators)."""
    if len(pieces) == 1:
        return [function(*pieces[0])]
    return list(_pool(max(2, torch.get_num_threads())).map(lambda args: function(*args), pieces))


def native_sampling_on() -> bool:
    """Whether the compiled sampling loops may run: built, and allowed by
    :class:`~itk_gradicon.network.performance.FastPaths` (``native_sampling``). Each caller adds what its loop
    takes (3-D float32 tensors on the CPU)."""
    settings = performance.current()
    return NATIVE is not None and settings.enabled and settings.native_sampling


def compiled_kernels_on(device: torch.device) -> bool:
    """Whether work on ``device`` runs on the compiled CPU loops (for the memory it needs: PyTorch's own
    operators, on a GPU or without the build, keep more intermediate tensors)."""
    return device.type == "cpu" and native_sampling_on()


def _use_native(field: torch.Tensor, points: torch.Tensor) -> bool:
    return (native_sampling_on()
            and field.dim() == 5 and points.dim() == 5 and points.shape[1] == 3
            and field.device.type == "cpu" and points.device.type == "cpu"
            and field.dtype == torch.float32 and points.dtype == torch.float32
            and points.shape[0] in (1, field.shape[0]) and field.numel() > 0)


def thread_ranges(count: int, work_per_item: int = 1, min_work_per_thread: int = 1) -> List[Tuple[int, int]]:
    """``count`` items split into one range per thread torch may use (none empty), but no more ranges
    than leave each at least ``min_work_per_thread`` units of work (``work_per_item`` per item)."""
    parts = max(1, min(torch.get_num_threads(), count, count * work_per_item // max(1, min_work_per_thread)))
    bounds = [count * k // parts for k in range(parts + 1)]
    return [(bounds[k], bounds[k + 1]) for k in range(parts) if bounds[k] < bounds[k + 1]]


def _point_ranges(count: int) -> List[Tuple[int, int]]:
    """One range of the ``count`` output points per thread for the C kernel (none empty)."""
    return thread_ranges(count, min_work_per_thread=MIN_NATIVE_POINTS_PER_THREAD)


def _kernel_inputs(field: torch.Tensor, flat: torch.Tensor, b: int) -> tuple:
    """The C kernel's leading arguments for batch item ``b``: the field's address, sizes and strides,
    and the address and row length of its points (``flat`` ``[1 or B, 3, count]``, contiguous)."""
    volume, rows = field[b], flat[min(b, flat.shape[0] - 1)]
    return (volume.data_ptr(), *volume.shape, *volume.stride(), rows.data_ptr(), rows.shape[1])


def _flat_points(points: torch.Tensor) -> torch.Tensor:
    return points.reshape(points.shape[0], 3, points[0, 0].numel()).contiguous()


def _native_sample(field: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``_sample(field, points)`` by the C kernel, one range of points per thread."""
    batch, channels = field.shape[:2]
    flat = _flat_points(points)
    count = flat.shape[2]
    out = torch.empty((batch, channels, count), dtype=torch.float32)
    ranges = _point_ranges(count)
    calls = [(*_kernel_inputs(field, flat, b), out[b].data_ptr(), count, start, end)
             for b in range(batch) for start, end in ranges]
    run_pieces(NATIVE.sample_3d, calls)  # field, flat and out stay referenced until every call returns
    return out.view(batch, channels, *points.shape[2:])


def _native_sample_backward(field: torch.Tensor, points: torch.Tensor, grad_output: torch.Tensor,
                            need_field: bool, need_points: bool
                            ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of :func:`_native_sample` by the C kernel (``grid_sample``'s backward arithmetic).

    Each thread adds its points' contributions to the field's gradient into a buffer of its own;
    the buffers are summed at the end (as the slabs of the ``grid_sample`` path are).
    """
    batch, channels = field.shape[:2]
    flat = _flat_points(points)
    count = flat.shape[2]
    upstream = grad_output.reshape(batch, channels, count).contiguous()
    ranges = _point_ranges(count)
    buffers = [torch.zeros(field.shape, dtype=torch.float32) for _ in ranges] if need_field else None
    grad_points = torch.empty((batch, 3, count), dtype=torch.float32) if need_points else None
    calls = [(*_kernel_inputs(field, flat, b), upstream[b].data_ptr(), count,
              buffers[k][b].data_ptr() if need_field else 0, grad_points[b].data_ptr() if need_points else 0,
              start, end)
             for b in range(batch) for k, (start, end) in enumerate(ranges)]
    run_pieces(NATIVE.sample_3d_backward, calls)  # every tensor above stays referenced until the calls return
    grad_field = None
    if need_field:
        grad_field = buffers[0]
        for partial in buffers[1:]:
            grad_field += partial
    if need_points:
        if flat.shape[0] != batch:  # points shared by the batch: their gradients add up
            grad_points = grad_points.sum(0, keepdim=True)
        grad_points = grad_points.view(points.shape)
    return grad_field, grad_points


def _forward(field: torch.Tensor, points: torch.Tensor, slabs: int) -> torch.Tensor:
    """The sampled values, without autograd."""
    if _use_native(field, points):
        return _native_sample(field, points)
    if slabs < 2:
        return _sample(field, points)
    return _forward_in_slabs(field, points, slabs)


def _forward_in_slabs(field: torch.Tensor, points: torch.Tensor, slabs: int) -> torch.Tensor:
    with torch.autograd.set_grad_enabled(False):
        outputs = run_pieces(_sample, [(field, part) for part in points.tensor_split(slabs, dim=2)])
    return torch.cat(outputs, dim=2)


class _ParallelCubeSample(torch.autograd.Function):
    """:func:`sample_cube_field` over slabs of the output points, each slab on its own thread."""

    @staticmethod
    def forward(ctx, field: torch.Tensor, points: torch.Tensor, slabs: int) -> torch.Tensor:
        ctx.save_for_backward(field, points)
        ctx.slabs = slabs
        return _forward(field, points, slabs)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], None]:
        field, points = ctx.saved_tensors
        need_field, need_points = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if _use_native(field, points) and grad_output.dtype == torch.float32:
            grad_field, grad_points = _native_sample_backward(field, points, grad_output, need_field, need_points)
            return grad_field, grad_points, None
        backward = (torch.ops.aten.grid_sampler_3d_backward if field.dim() == 5
                    else torch.ops.aten.grid_sampler_2d_backward)
        d = points.shape[1]

        def one(grad_part: torch.Tensor, points_part: torch.Tensor):
            # interpolation 0 = bilinear, padding 1 = border
            grad_field, grad_grid = backward(grad_part.contiguous(), field, _grid(points_part, field), 0, 1, True,
                                             [need_field, need_points])
            grad_points = None
            if need_points:  # grid = flip(2 points - 1) in the last axis: undo permutation and flip
                grad_points = grad_grid.permute(0, d + 1, *range(1, d + 1)).flip(1) * 2.0
                if points_part.shape[0] != grad_points.shape[0]:
                    grad_points = grad_points.sum(0, keepdim=True)
                grad_points = grad_points.to(points_part.dtype)
            return grad_field, grad_points

        results = run_pieces(one, list(zip(grad_output.tensor_split(ctx.slabs, dim=2),
                                     points.tensor_split(ctx.slabs, dim=2))))
        grad_field = grad_points = None
        if need_field:
            grad_field = results[0][0]
            for partial, _ in results[1:]:
                grad_field = grad_field + partial
        if need_points:
            grad_points = torch.cat([g for _, g in results], dim=2)
        return grad_field, grad_points, None


def sample_cube_field(field: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of a CUBE-grid field at CUBE points; border values outside.

    The same function as :func:`grid_sample_cube_field` (see there for the conventions), computed on
    all CPU threads.

    Args:
        field: ``[B, C, *shape]`` values on the network grid.
        points: ``[B or 1, d, *out]`` CUBE coordinates (component ``c`` along network axis ``c``).

    Returns:
        ``[B, C, *out]``.
    """
    slabs = _slabs(points)
    if torch.is_grad_enabled() and (field.requires_grad or points.requires_grad):
        if slabs < 2 and not _use_native(field, points):
            return _sample(field, points)
        return _ParallelCubeSample.apply(field, points, slabs)
    with torch.autograd.set_grad_enabled(False):
        return _forward(field, points, slabs)
