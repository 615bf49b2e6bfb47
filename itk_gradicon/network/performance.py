"""Switches for the network's fast paths, all exact up to float rounding.

The network computes the same function in two ways:

* the *plain* path, a line-by-line transcription of the published architecture; the UNet
  (:class:`~itk_gradicon.network.unet.UNetStep`) always takes it while training (BatchNorm then
  normalises with batch statistics and nothing can be folded), with ``channels_last`` and
  ``upsample_by_products`` where they are on;
* the *fast* path: in evaluation mode (prediction and instance optimisation, where BatchNorm
  applies its running statistics, a fixed affine map) the UNet reorders linear operations only,
  and composing maps (:class:`~itk_gradicon.network.operators.CubeMap`) uses a faster kernel for
  the same interpolation:

  ``fold_batch_norm``
      BatchNorm after each up level is folded into the transposed convolution's weights and bias
      and into the coarse copy that is upsampled (``BN(T(x) + up(x')) = T_s(x) + up(s x') + c``), so
      no full-resolution normalisation pass is made.
  ``fuse_last_level``
      The finest level's transposed convolution, upsampled residual, BatchNorm and the final
      ``3^d`` convolution are linear, so they compose into one ``3^d`` convolution on the coarse
      grid with ``2^d x d`` output channels (one per output phase), rearranged into the fine grid.
      The finest up level (a 16-channel tensor of ``176^3``) is never formed: about 40 of a UNet's
      155 GFLOP at 175^3 are saved and the largest activations disappear. Voxels on the outer faces,
      where the final convolution's zero padding differs from the composed operator, are
      recomputed exactly on thin slabs.
  ``channels_last``
      Convolutions run on channels-last (NDHWC) tensors, the layout oneDNN's CPU kernels prefer.
      ``None`` (the default) means: on the CPU only; GPU tensors keep PyTorch's default layout.
  ``resample_on_grid``
      A coarse field evaluated at the nodes of a finer network grid (the first step of composing a
      map on that grid) is resized with ``interpolate(..., align_corners=True)``, which samples
      exactly those positions, instead of ``grid_sample`` at the identity (PyTorch's 3-D
      ``grid_sample`` runs on one thread).
  ``upsample_by_products``
      On the training path (and wherever the plain path runs with the fast paths enabled) the up
      levels' linear upsampling by 2 is a product with a banded matrix per axis on the CPU (BLAS,
      forward and backward; :func:`~itk_gradicon.network.unet.upsample_by_products`), 3-4 times
      faster than ``interpolate`` there. Evaluation keeps ``interpolate``.
  ``native_sampling``
      Float32 3-D sampling without autograd uses the compiled kernel of
      :mod:`itk_gradicon.network.sampling` (bitwise ``grid_sample``'s values) when it was built.
  ``native_filtering``
      Float32 separable filters on the CPU (the Gaussian windows of LNCC, the blur of field IO's
      coarse level) run on the compiled kernel's axis filter
      (:func:`~itk_gradicon.network.separable.filter_along_axis`): the sum over the kernel's taps
      only, where the banded matrix product also multiplies the band's zeros; and instance
      optimisation's LNCC against the fixed image computes its pointwise parts there too, with a
      backward of its own (``pipeline.losses._CompiledLNCC``). Only float rounding differs.

:func:`fast_paths` changes the switches for a block of code (tests compare every combination with
the plain path); the settings are per thread / task (a :class:`contextvars.ContextVar`).

Example:
    >>> from itk_gradicon.network.performance import fast_paths
    >>> with fast_paths(enabled=False):      # the plain path, e.g. to compare       # doctest: +SKIP
    ...     reference = net(a, b)
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional

import torch


@dataclass(frozen=True)
class FastPaths:
    """Which exact rewrites the UNet may use in evaluation mode (see the module documentation).

    Attributes:
        enabled: master switch; ``False`` runs the plain path everywhere.
        fold_batch_norm: fold BatchNorm's running statistics into the up levels.
        fuse_last_level: compose the finest up level with the final convolution.
        channels_last: run convolutions on channels-last tensors (``None``: on the CPU only).
        resample_on_grid: resize a coarse field to a finer grid's nodes with ``interpolate``.
        native_sampling: sample with the compiled kernel where it applies.
        native_filtering: run separable filters and LNCC's pointwise parts on the compiled kernel where
            it applies.
        upsample_by_products: the plain path's upsampling by matrix products on the CPU.
    """

    enabled: bool = True
    fold_batch_norm: bool = True
    fuse_last_level: bool = True
    channels_last: Optional[bool] = None
    resample_on_grid: bool = True
    native_sampling: bool = True
    native_filtering: bool = True
    upsample_by_products: bool = True

    def use_channels_last(self, device: torch.device) -> bool:
        """Whether tensors on ``device`` are laid out channels-last."""
        if self.channels_last is None:
            return device.type == "cpu"
        return bool(self.channels_last)


_SETTINGS: contextvars.ContextVar[FastPaths] = contextvars.ContextVar("itk_gradicon_fast_paths",
                                                                      default=FastPaths())


def current() -> FastPaths:
    """The switches in force."""
    return _SETTINGS.get()


@contextlib.contextmanager
def fast_paths(**changes) -> Iterator[FastPaths]:
    """Change some switches of :class:`FastPaths` inside a ``with`` block.

    Args:
        changes: field names of :class:`FastPaths` and their values.

    Raises:
        TypeError: an unknown switch.
    """
    settings = dataclasses.replace(current(), **changes)
    token = _SETTINGS.set(settings)
    try:
        yield settings
    finally:
        _SETTINGS.reset(token)
