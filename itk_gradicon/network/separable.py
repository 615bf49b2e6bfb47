"""Linear maps applied along one spatial axis: matrix products (BLAS) and short filters.

A separable linear filter or resampling of a network-grid tensor is a product with one small matrix
per axis. PyTorch's CPU kernels for depthwise 3-D convolutions and for ``interpolate`` (and their
backward passes) are slow where the same sums as matrix products run on the BLAS kernels:
:func:`itk_gradicon.network.unet.upsample_by_products` is built on :func:`product_along_axis`.

A short filter (a Gaussian window of 9 taps on a 96-node axis) as a banded matrix product also
multiplies the band's zeros, ten times the work of its taps. :func:`filter_along_axis` runs such a
filter on the compiled kernel of :mod:`itk_gradicon.network.sampling` (float32 on the CPU, forward and
backward, one range of rows per core; 3.3x faster than the banded product for sigma 2 at 96^3, figures:
``benchmarks/README.md``, "Design figures") and falls back to the banded product elsewhere:
:func:`itk_gradicon.pipeline.losses.gaussian_blur` is built on it.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from . import performance
from .sampling import NATIVE, run_pieces, thread_ranges

#: Below this many values per thread a filter pass is not split over the threads.
MIN_FILTER_VALUES_PER_THREAD = 1 << 15


def product_along_axis(x: torch.Tensor, matrix: torch.Tensor, axis: int) -> torch.Tensor:
    """``y[..., i, ...] = sum_j matrix[i, j] x[..., j, ...]`` along spatial ``axis`` of ``x``.

    Args:
        x: ``[B, C, *spatial]``, contiguous.
        matrix: ``[m, n]`` with ``n = x.shape[2 + axis]``.
        axis: spatial axis (0 = the first after the channels).

    Returns:
        ``x``'s shape with ``m`` nodes along ``axis``.
    """
    n = x.shape[2 + axis]
    shape = list(x.shape)
    shape[2 + axis] = matrix.shape[0]
    if axis == x.dim() - 3:  # the last axis: one product of every row of x with matrix^T
        return (x.reshape(-1, n) @ matrix.T).reshape(shape)
    return torch.matmul(matrix, x.reshape(-1, n, math.prod(x.shape[3 + axis:]))).reshape(shape)


def banded_matrix(length: int, kernel: torch.Tensor) -> torch.Tensor:
    """``M [length, length]`` with ``(M x)[i] = sum_t kernel[t] x[i + t - half]``, zero outside ``x``.

    ``half = (taps - 1) // 2``: the alignment of ``conv(..., padding="same")``, for odd and even kernels.
    """
    half = (kernel.numel() - 1) // 2
    i = torch.arange(length, device=kernel.device)
    offset = i[None, :] - i[:, None] + half  # column j minus row i, as a kernel tap
    inside = (offset >= 0) & (offset < kernel.numel())
    return torch.where(inside, kernel[offset.clamp(0, kernel.numel() - 1)], kernel.new_zeros(()))


def filter_along_axis(x: torch.Tensor, kernel: torch.Tensor, axis: int) -> torch.Tensor:
    """``y[..., i, ...] = sum_t kernel[t] x[..., i + t - half, ...]`` along spatial ``axis``, zero outside.

    ``half = (taps - 1) // 2`` (the alignment of ``conv(..., padding="same")``): the product with
    :func:`banded_matrix`. Float32 CPU tensors (and a kernel that needs no gradient) use the compiled
    kernel where it was built and :class:`~itk_gradicon.network.performance.FastPaths` allows it; the
    two compute the same sums, in another order.

    Args:
        x: ``[B, C, *spatial]``.
        kernel: 1-D, ``taps`` values.
        axis: spatial axis (0 = the first after the channels).
    """
    if uses_native_filter(x, kernel):
        return _AxisFilter.apply(x, kernel.contiguous(), axis)
    return product_along_axis(x.contiguous(), banded_matrix(x.shape[2 + axis], kernel), axis)


def uses_native_filter(x: torch.Tensor, kernel: torch.Tensor) -> bool:
    """Whether :func:`filter_along_axis` runs ``kernel`` over ``x`` on the compiled kernel."""
    settings = performance.current()
    return (NATIVE is not None and settings.enabled and settings.native_filtering
            and x.device.type == "cpu" and kernel.device.type == "cpu"
            and x.dtype == torch.float32 and kernel.dtype == torch.float32
            and x.dim() >= 3 and x.numel() > 0 and kernel.dim() == 1 and kernel.numel() > 0
            and not kernel.requires_grad)


def _axis_pass(function, x: torch.Tensor, axis: int, kernel: torch.Tensor, *options) -> torch.Tensor:
    """One pass of a compiled axis filter of ``_linear.c`` (``filter_axis``, ``filter_axis_replicate``) over
    ``x`` along ``axis``: ``function(x, out, n, inner, kernel, taps, *options, start, end)``, its units (rows of
    ``inner`` values, or whole lines along the axis) split over the threads."""
    x = x.contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    n = x.shape[2 + axis]
    inner = math.prod(x.shape[3 + axis:])
    outer = x.numel() // (n * inner)
    units = outer * n if inner > 1 else outer  # rows of `inner` values, or whole lines along the axis
    ranges = thread_ranges(units, x.numel() // units, MIN_FILTER_VALUES_PER_THREAD)
    run_pieces(function, [(x.data_ptr(), out.data_ptr(), n, inner, kernel.data_ptr(), kernel.numel(), *options,
                           start, end) for start, end in ranges])
    return out  # x, out and kernel stay referenced until every call has returned


def _native_filter(x: torch.Tensor, kernel: torch.Tensor, axis: int, half: int) -> torch.Tensor:
    """One pass of the compiled axis filter (see ``_linear.c``), rows split over the threads."""
    return _axis_pass(NATIVE.filter_axis, x, axis, kernel, half)


def filter_along_axis_replicate(x: torch.Tensor, kernel: torch.Tensor, axis: int) -> torch.Tensor:
    """``y[..., i, ...] = sum_t kernel[t] x[..., clamp(i + t - half), ...]`` along spatial ``axis``: the axis padded
    by its end values. On the compiled kernel; requires :func:`uses_native_filter`."""
    return _ReplicateAxisFilter.apply(x, kernel.contiguous(), axis)


def _native_replicate_filter(x: torch.Tensor, kernel: torch.Tensor, axis: int, adjoint: bool) -> torch.Tensor:
    return _axis_pass(NATIVE.filter_axis_replicate, x, axis, kernel, (kernel.numel() - 1) // 2, int(adjoint))


class _ReplicateAxisFilter(torch.autograd.Function):
    """:func:`filter_along_axis_replicate`; the backward pass is the transposed map on the same kernel."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: torch.Tensor, axis: int) -> torch.Tensor:
        ctx.save_for_backward(kernel)
        ctx.axis = axis
        return _native_replicate_filter(x, kernel, axis, adjoint=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], None, None]:
        (kernel,) = ctx.saved_tensors
        return _native_replicate_filter(grad, kernel, ctx.axis, adjoint=True), None, None


def _adjoint(kernel: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """The transposed filter of ``kernel`` (aligned ``(taps - 1) // 2``): the kernel reversed, and its
    alignment ``taps - 1 - (taps - 1) // 2``."""
    taps = kernel.numel()
    return kernel.flip(0).contiguous(), taps - 1 - (taps - 1) // 2


class _AxisFilter(torch.autograd.Function):
    """:func:`filter_along_axis` on the compiled kernel; the backward pass is the adjoint filter (the
    kernel reversed, aligned ``taps - 1 - half``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: torch.Tensor, axis: int) -> torch.Tensor:
        ctx.save_for_backward(kernel)
        ctx.axis = axis
        return _native_filter(x, kernel, axis, (kernel.numel() - 1) // 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], None, None]:
        (kernel,) = ctx.saved_tensors
        adjoint, half = _adjoint(kernel)
        return _native_filter(grad, adjoint, ctx.axis, half), None, None


def replicate_filter_axes(x: torch.Tensor, kernel: torch.Tensor, *, adjoint: bool = False,
                          axes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """:func:`filter_along_axis_replicate` along every spatial axis of ``x`` (or along ``axes``), without autograd
    (the caller writes its own backward); ``adjoint``: the transposed map. Requires :func:`uses_native_filter`."""
    axes = list(range(x.dim() - 2)) if axes is None else list(axes)
    for axis in (reversed(axes) if adjoint else axes):  # the adjoint of the passes in autograd's order
        x = _native_replicate_filter(x, kernel, axis, adjoint=adjoint)
    return x


def filter_axes(x: torch.Tensor, kernel: torch.Tensor, *, adjoint: bool = False) -> torch.Tensor:
    """``kernel`` along every spatial axis of ``x`` on the compiled kernel, without autograd (the caller
    writes its own backward); ``adjoint``: the transposed filter (the kernel reversed). Requires
    :func:`uses_native_filter`."""
    kernel, half = _adjoint(kernel) if adjoint else (kernel, (kernel.numel() - 1) // 2)
    for axis in range(x.dim() - 2):
        x = _native_filter(x, kernel, axis, half)
    return x
