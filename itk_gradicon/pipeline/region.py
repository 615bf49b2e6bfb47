"""The part of the fixed grid that the network and instance optimisation see.

The network sees its fixed-size grid (96^3 for the bundled model) stretched over the fixed image. When the
fixed image's field of view is much larger than the anatomy (a brain in a 256^3 FreeSurfer-conformed
volume, a template padded with air), most of that grid is spent on background and the anatomy is sampled
at 2.7 mm rather than 1.5-2 mm. :func:`foreground_box` finds the box that holds the foreground of both
images (the moving one pre-aligned onto the fixed grid), with a margin of background around it; the
network's frames are then :meth:`~itk_gradicon.spatial.frames.NetworkFrame.cropped` to it. Beyond the box
the transform continues the displacement at the box's border (so it stays continuous); the box holds the
foreground of both images (only slices with a few bright voxels of noise are left out), so no tissue is.
The pre-alignment cuts each image to its own box the same way before elastix
(:func:`raw_foreground_threshold` stands for the normalisation there).

The box is used only where it is smaller than the grid by at least :data:`MIN_SAVING` of its volume: images
whose field of view fits their anatomy (most skull-stripped research images, every head scan with its air
noise) keep the whole grid, and their results do not change.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from ..io.grid import ImageGrid, IndexBox

#: Normalised intensity above which a voxel counts as foreground (the coverage check's too): air and a
#: stripped image's zero background stay below it; tissue, skull and scalp of an MRI or a CT are above.
FOREGROUND = 0.05

#: Background kept around the foreground on each side: this share of the foreground's extent, and at
#: least :data:`MIN_MARGIN_MM`.
MARGIN = 0.04
MIN_MARGIN_MM = 4.0
#: The box is used only where it is smaller than the grid by at least this share of its volume.
MIN_SAVING = 0.3
#: A slice (across an axis) counts as foreground where at least this share of its voxels does (isolated
#: bright voxels of noise or of an artefact do not stretch the box).
MIN_SLICE_SHARE = 1e-3


def foreground_box(arrays: Sequence[np.ndarray], grid: ImageGrid, *, threshold: float = FOREGROUND,
                   margin: float = MARGIN, min_margin_mm: float = MIN_MARGIN_MM,
                   min_saving: float = MIN_SAVING) -> Optional[IndexBox]:
    """The box of ``grid`` that holds the foreground of every array, with a margin; ``None`` where it would
    not save ``min_saving`` of the grid's volume (or no voxel is foreground).

    Args:
        arrays: images on ``grid`` (ARRAY order), normalised to ``[0, 1]`` (e.g. the fixed image and the moving
            one pre-aligned onto the fixed grid), or with raw intensities and a ``threshold`` of their own
            (:func:`raw_foreground_threshold`); a voxel is foreground where any of them exceeds ``threshold``.
        grid: their grid (its spacing turns ``min_margin_mm`` into voxels).
    """
    d = grid.dimension
    foreground = np.zeros(grid.array_shape, dtype=bool)
    for array in arrays:
        if array.shape != grid.array_shape:
            raise ValueError(f"array of shape {array.shape} given for a grid of ARRAY shape {grid.array_shape}")
        foreground |= array > threshold
    if not foreground.any():
        return None
    start: List[int] = []
    stop: List[int] = []
    for axis in range(d):  # INDEX axis; its ARRAY axis is d - 1 - axis
        array_axis = d - 1 - axis
        others = tuple(a for a in range(d) if a != array_axis)
        per_slice = foreground.sum(axis=others)
        area = foreground.size // foreground.shape[array_axis]
        present = np.flatnonzero(per_slice >= max(1, MIN_SLICE_SHARE * area))
        if present.size == 0:
            present = np.flatnonzero(per_slice)
        n = grid.size[axis]
        extent = int(present[-1]) + 1 - int(present[0])
        pad = int(np.ceil(max(margin * extent, min_margin_mm / grid.spacing[axis])))
        start.append(max(0, int(present[0]) - pad))
        stop.append(min(n, int(present[-1]) + 1 + pad))
    box = IndexBox(tuple(start), tuple(stop))
    if np.prod(box.size, dtype=np.float64) > (1.0 - min_saving) * grid.num_voxels:
        return None
    return box


def raw_foreground_threshold(array: np.ndarray, *, share: float = FOREGROUND, sample_step: int = 64) -> float:
    """The intensity above which a voxel of an image with raw intensities counts as foreground: ``share`` of the
    way from its minimum to its 99th percentile (estimated on every ``sample_step``-th voxel), as the image
    would be normalised for the network."""
    flat = np.asarray(array).reshape(-1)
    low = float(flat.min())
    high = float(np.quantile(flat[::sample_step], 0.99)) if flat.size > sample_step else float(flat.max())
    return low + share * (high - low)


def describe_box(box: IndexBox, grid: ImageGrid) -> str:
    """``"voxels 30..226 x 20..236 x 40..210 of 256 x 256 x 256"`` (INDEX order, stop exclusive)."""
    spans = " x ".join(f"{a}..{b}" for a, b in zip(box.start, box.stop))
    return f"voxels {spans} of {' x '.join(str(n) for n in grid.size)}"


__all__ = ["FOREGROUND", "MARGIN", "MIN_MARGIN_MM", "MIN_SAVING", "MIN_SLICE_SHARE", "describe_box", "foreground_box",
           "raw_foreground_threshold"]
