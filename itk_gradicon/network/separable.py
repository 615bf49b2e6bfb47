"""Linear maps applied along one spatial axis as matrix products (BLAS, forward and backward).

A separable linear filter or resampling of a network-grid tensor is a product with one small matrix
per axis. PyTorch's CPU kernels for depthwise 3-D convolutions and for ``interpolate`` (and their
backward passes) are slow where the same sums as matrix products run on the BLAS kernels:
:func:`itk_gradicon.pipeline.losses.gaussian_blur` and :func:`itk_gradicon.network.unet.upsample_by_products`
are both built on :func:`product_along_axis`.
"""

from __future__ import annotations

import math

import torch


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
