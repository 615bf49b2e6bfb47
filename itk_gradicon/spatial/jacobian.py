"""Jacobian determinant of a transform, in physical space.

For a transform ``T`` (fixed -> moving points) sampled at the voxel centres of a reference grid, the
Jacobian is ``J = dT/dx``, the derivative with respect to WORLD (LPS mm) coordinates. With the grid's
``world = origin + D diag(s) index``, the chain rule gives

    ``dT/dx = (dT/d index) (d index/dx) = (dT/d index) diag(1/s) D^T``

where ``dT/d index`` comes from finite differences along the index axes (second-order central
differences inside, one-sided at the edges: exact for affine transforms everywhere). This is correct
for oblique and flipped direction matrices; ITK's ``DisplacementFieldJacobianDeterminantFilter``
ignores the direction and gives, for a pure rotation, 0.81 on an oblique grid and 1.07 on a
diag(-1, -1, 1) grid instead of 1.

``det J`` > 1 is local expansion (the fixed voxel maps to a larger moving region), < 1 contraction,
<= 0 folding. Unlike ANTs' ``CreateJacobianDeterminantImage``, which clamps the determinant to >= 0,
the values here keep their sign so that folds can be counted.

Log-Jacobian: ``log(max(det J, 0.001))``, ANTs' floor (it clamps to >= 0, then to >= 0.001, before
the log), so a fold gives ``log(0.001) = -6.91`` rather than NaN. SDlogJ is the standard deviation of
that clamped log.

Example:
    >>> import itk
    >>> from itk_gradicon.spatial.frames import ImageGrid
    >>> from itk_gradicon.spatial.transforms import read_transform
    >>> det = jacobian_determinant(read_transform("moving_to_fixed.h5"),
    ...                            ImageGrid.from_image(itk.imread("fixed.nii.gz")))   # doctest: +SKIP
    >>> jacobian_summary(det)["percent_negative"]                                       # doctest: +SKIP
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from ..errors import InputError
from ..io.grid import ImageGrid
from ..io.itk_bridge import grid_of, like_input
from ..resources import for_each_slab
from .transforms import sample_transform

#: ANTs' floor of the determinant before a log.
LOG_FLOOR = 1e-3
#: voxels per slab of the computation (bounds memory to about 100 MB; smaller slabs stay in cache).
_CHUNK_VOXELS = 250_000


def _difference(values: np.ndarray, axis: int, out: np.ndarray) -> None:
    """``np.gradient(values, axis=axis, edge_order=1)`` (unit spacing) written into ``out``, value for value:
    central differences ``(f[i+1] - f[i-1]) / 2`` inside, one-sided ``f[1] - f[0]`` and
    ``f[n-1] - f[n-2]`` at the ends (one point along the axis: 0)."""
    n = values.shape[axis]

    def at(index):
        key = [slice(None)] * values.ndim
        key[axis] = index
        return tuple(key)

    if n < 2:
        out[...] = 0.0
        return
    np.subtract(values[at(slice(2, None))], values[at(slice(None, -2))], out=out[at(slice(1, -1))])
    out[at(slice(1, -1))] /= 2.0
    np.subtract(values[at(1)], values[at(0)], out=out[at(0)])
    np.subtract(values[at(n - 1)], values[at(n - 2)], out=out[at(n - 1)])


def determinant_of_displacement(displacement: np.ndarray, grid: ImageGrid) -> np.ndarray:
    """``det(I + du/dx)`` for a displacement field ``u`` sampled on ``grid``.

    Args:
        displacement: ``grid.array_shape + (d,)``, WORLD vectors (mm), ARRAY order ``[k, j, i]``.
        grid: the sampling grid.

    Returns:
        float64 array of ``grid.array_shape``.
    """
    d = grid.dimension
    if displacement.shape != grid.array_shape + (d,):
        raise ValueError(f"displacement of shape {displacement.shape} is not on a grid of shape "
                         f"{grid.array_shape} with {d} components")
    if min(grid.size) < 2:
        raise InputError(f"a Jacobian needs at least 2 voxels along every axis; the grid has size {grid.size}")
    index_per_world = grid.world_to_index()[:d, :d]  # d index / d world = diag(1/s) D^T
    rows_total = grid.array_shape[0]
    per_row = int(np.prod(grid.array_shape[1:])) if d > 1 else 1
    out = np.empty(grid.array_shape, dtype=np.float64)

    def slab(rows: slice) -> None:
        start, stop = rows.start, rows.stop
        lo, hi = max(start - 1, 0), min(stop + 1, rows_total)  # one row of halo for the differences
        block = np.asarray(displacement[lo:hi], dtype=np.float64)
        du_dindex = np.empty(block.shape + (d,), dtype=np.float64)  # [..., comp, a]
        for a in range(d):  # du/d(index a): index axis a is ARRAY axis d-1-a
            _difference(block, d - 1 - a, du_dindex[..., a])
        jac = du_dindex[start - lo:start - lo + (stop - start)] @ index_per_world + np.eye(d)
        out[start:stop] = np.linalg.det(jac)

    # one thread: numpy's determinant holds the interpreter lock, and two threads measured slower
    for_each_slab(rows_total, max(1, _CHUNK_VOXELS // max(per_row, 1)), slab, threads=1)
    return out


def jacobian_determinant(transform, grid: ImageGrid) -> np.ndarray:
    """Determinant of the physical Jacobian of a transform at the voxel centres of ``grid``.

    Args:
        transform: any transform, ITK Python or SimpleITK (a displacement field, an affine, a composite).
        grid: the reference grid, normally the fixed image's.

    Returns:
        float64 array of ``grid.array_shape`` (ARRAY order).
    """
    return determinant_of_displacement(sample_transform(transform, grid).array, grid)


def log_jacobian(det: np.ndarray) -> np.ndarray:
    """``log(max(det, 0.001))``: ANTs' clamped log-Jacobian."""
    return np.log(np.maximum(det, LOG_FLOOR))


def jacobian_summary(det: np.ndarray, mask: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Folding and smoothness statistics of a Jacobian-determinant array.

    Args:
        det: determinants (any shape).
        mask: optional boolean array of the same shape; only voxels where it is true count.

    Returns:
        ``voxels`` (count), ``negative_voxels`` and ``percent_negative`` (det < 0), ``min``, ``max``,
        ``mean``, ``std`` of det, and ``sdlogj``: the standard deviation of ``log(max(det, 0.001))``.
    """
    values = np.asarray(det, dtype=np.float64)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != values.shape:
            raise InputError(f"mask of shape {mask.shape} does not match the Jacobian's {values.shape}")
        values = values[mask]
    values = values.reshape(-1)
    if values.size == 0:
        raise InputError("no voxel to summarise (empty grid or empty mask)")
    negative = int(np.count_nonzero(values < 0))
    return {
        "voxels": int(values.size),
        "negative_voxels": negative,
        "percent_negative": 100.0 * negative / values.size,
        "min": float(values.min()),
        "max": float(values.max()),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "sdlogj": float(log_jacobian(values).std()),
    }


def jacobian_image(transform, reference, *, log: bool = False):
    """The Jacobian determinant (or its clamped log) as a float32 image on ``reference``'s grid.

    Args:
        transform: any transform, ITK Python or SimpleITK (fixed -> moving).
        reference: image whose grid is used (``SimpleITK.Image`` or ``itk.Image``).
        log: write ``log(max(det, 0.001))`` instead of ``det``.

    Returns:
        ``(image, det)``: a float32 image in ``reference``'s library and the float64 determinants (for a
        summary).
    """
    import SimpleITK as sitk

    grid = grid_of(reference)
    det = jacobian_determinant(transform, grid)
    values = log_jacobian(det) if log else det
    image = sitk.GetImageFromArray(np.ascontiguousarray(values, dtype=np.float32))
    grid.apply_to(image)
    return like_input(image, reference), det
