"""Image grids in physical space: the one place that reads origin, spacing and direction.

Coordinate frames, named as everywhere in this package:

``WORLD``
    ITK physical space: LPS millimetres, components in ITK order (x, y, z).
``INDEX``
    An image's continuous ITK index (i, j, k): ``world = origin + direction @ diag(spacing) @ index``.
``ARRAY``
    numpy/ITK array order, which reverses the index: ``array[k, j, i]``.

This module needs numpy only (no torch, no itk at import), so that the file commands start fast; the
network's frames (``CUBE``) live in :mod:`itk_gradicon.spatial.frames`. :meth:`ImageGrid.from_image` reads
``SimpleITK.Image`` objects, the package's one image type; the grid of an ``itk.Image`` is
:func:`itk_gradicon.io.itk_bridge.grid_of`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Tuple

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class ImageGrid:
    """The sampling grid of an ITK image: size, spacing and origin in ITK order, direction matrix.

    Args:
        size: number of voxels along each index axis (i, j, k).
        spacing: voxel size in mm along each index axis.
        origin: WORLD position of voxel (0, 0, 0).
        direction: ``d x d`` matrix whose column ``a`` is the WORLD direction of index axis ``a``.
    """

    size: Tuple[int, ...]
    spacing: Tuple[float, ...]
    origin: Tuple[float, ...]
    direction: Tuple[Tuple[float, ...], ...]

    @classmethod
    def from_image(cls, image) -> "ImageGrid":
        """The grid of a ``SimpleITK.Image`` (validated)."""
        d = int(image.GetDimension())
        direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(d, d)
        return cls.from_geometry(image.GetSize(), image.GetSpacing(), image.GetOrigin(), direction)

    @classmethod
    def from_geometry(cls, size, spacing, origin, direction) -> "ImageGrid":
        """The grid of a size, a spacing, an origin (index order) and a ``d x d`` direction (validated)."""
        grid = cls(
            size=tuple(int(s) for s in size),
            spacing=tuple(float(s) for s in spacing),
            origin=tuple(float(s) for s in origin),
            direction=tuple(tuple(float(v) for v in row) for row in direction),
        )
        grid.validate()
        return grid

    def validate(self) -> None:
        """Raise :class:`InputError` unless spacing is finite and positive, the origin finite and the
        direction matrix orthonormal (``D^T D = I``: no shear or scaling hides in it)."""
        if not all(np.isfinite(s) and s > 0 for s in self.spacing):
            raise InputError(f"spacing must be strictly positive and finite, not {self.spacing}")
        if not all(np.isfinite(o) for o in self.origin):
            raise InputError(f"origin must be finite, not {self.origin}")
        direction = self.direction_matrix
        if not np.all(np.isfinite(direction)):
            raise InputError(f"direction matrix {direction.tolist()} holds NaN or infinite values")
        deviation = float(np.max(np.abs(direction.T @ direction - np.eye(direction.shape[0]))))
        if deviation > 1e-3:
            raise InputError(f"direction matrix {direction.tolist()} is not orthonormal (D^T D differs from the "
                             f"identity by {deviation:.3g}; sheared or scaled directions are not supported)")

    def matches(self, other: "ImageGrid", *, tolerance: float = 1e-4) -> bool:
        """Whether ``other`` has the same size, spacing, origin and direction.

        Spacing may differ by ``tolerance`` times the largest spacing (at least 1 mm), the origin by ten
        times that (headers round positions more coarsely), direction cosines by ``tolerance``.
        """
        if self.size != other.size:
            return False
        scale = max(1.0, float(np.max(np.abs(self.spacing))))
        return (np.allclose(self.spacing, other.spacing, atol=tolerance * scale)
                and np.allclose(self.origin, other.origin, atol=tolerance * scale * 10)
                and np.allclose(self.direction_matrix, other.direction_matrix, atol=tolerance))

    @property
    def dimension(self) -> int:
        return len(self.size)

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64)

    @property
    def array_shape(self) -> Tuple[int, ...]:
        """Shape of the voxel array in ARRAY (reversed) order."""
        return tuple(reversed(self.size))

    @property
    def num_voxels(self) -> int:
        return int(np.prod(self.size))

    def index_to_world(self) -> np.ndarray:
        """Homogeneous ``(d+1) x (d+1)`` matrix taking INDEX to WORLD."""
        d = self.dimension
        m = np.eye(d + 1)
        m[:d, :d] = self.direction_matrix @ np.diag(self.spacing)
        m[:d, d] = self.origin
        return m

    def world_to_index(self) -> np.ndarray:
        return np.linalg.inv(self.index_to_world())

    def apply_to(self, image) -> None:
        """Give a ``SimpleITK.Image`` of this grid's size this grid's origin, spacing and direction."""
        image.SetOrigin([float(v) for v in self.origin])
        image.SetSpacing([float(v) for v in self.spacing])
        image.SetDirection([float(v) for v in self.direction_matrix.reshape(-1)])

    def world_points(self, array_slice: slice = slice(None)) -> np.ndarray:
        """WORLD coordinates of the voxel centres, shape ``array_shape + (d,)``.

        ``array_slice`` restricts the first ARRAY axis (the slowest index axis), for chunked work.
        """
        return apply_affine(self.index_to_world(), self.index_points(array_slice))

    def index_points(self, array_slice: slice = slice(None)) -> np.ndarray:
        """INDEX coordinates of the voxel centres, shape ``(rows,) + array_shape[1:] + (d,)``."""
        d = self.dimension
        ranges = [np.arange(n, dtype=np.float64) for n in self.array_shape]
        ranges[0] = ranges[0][array_slice]
        mesh = np.meshgrid(*ranges, indexing="ij")  # ARRAY order: k, j, i
        return np.stack(mesh[::-1], axis=-1) if d > 1 else mesh[0][..., None]


@dataclass(frozen=True)
class IndexBox:
    """A box of an image's voxels: ``start`` (inclusive) and ``stop`` (exclusive) along each INDEX axis."""

    start: Tuple[int, ...]
    stop: Tuple[int, ...]

    @property
    def size(self) -> Tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.start, self.stop))

    def array_slices(self) -> Tuple[slice, ...]:
        """The box as slices of a voxel array (ARRAY order)."""
        return tuple(slice(a, b) for a, b in zip(reversed(self.start), reversed(self.stop)))

    def grid_within(self, grid: ImageGrid) -> ImageGrid:
        """The sub-grid of ``grid`` that the box's voxels form (same spacing and direction)."""
        if len(self.start) != grid.dimension or any(
                not 0 <= a < b <= n for a, b, n in zip(self.start, self.stop, grid.size)):
            raise InputError(f"index box {self.start}..{self.stop} does not lie within a grid of size {grid.size}")
        origin = apply_affine(grid.index_to_world(), np.asarray(self.start, dtype=np.float64))
        return ImageGrid(size=self.size, spacing=grid.spacing, origin=tuple(float(v) for v in origin),
                         direction=grid.direction)


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a homogeneous ``(d+1) x (d+1)`` matrix to points of shape ``(..., d)``."""
    d = matrix.shape[0] - 1
    return points @ matrix[:d, :d].T + matrix[:d, d]


def best_axis_alignment(axes: np.ndarray, targets: np.ndarray) -> Tuple[Tuple[int, ...], Tuple[bool, ...]]:
    """Match image axes to target directions by permutation and sign.

    Args:
        axes: ``d x d`` matrix whose column ``a`` is the WORLD direction of image index axis ``a``.
        targets: ``d x d`` matrix whose column ``c`` is the WORLD direction wanted for network axis ``c``.

    Returns:
        ``(perm, flips)``: network axis ``c`` runs along index axis ``perm[c]``, reversed when
        ``flips[c]``. The permutation maximises the sum of ``|cos|`` between matched axes; ties go to the
        first permutation in lexicographic order (so equal directions give the identity).
    """
    d = axes.shape[0]
    cos = targets.T @ axes  # cos[c, a] = <target_c, axis_a>
    best, best_score = None, -np.inf
    for perm in itertools.permutations(range(d)):
        score = sum(abs(cos[c, perm[c]]) for c in range(d))
        if score > best_score + 1e-9:
            best, best_score = perm, score
    flips = tuple(bool(cos[c, best[c]] < 0) for c in range(d))
    return tuple(best), flips


def canonical_axes(dimension: int) -> np.ndarray:
    """World directions of the network axes in the ``canonical`` layout (LPS world coordinates).

    3-D: network axis 0 runs to superior, axis 1 to anterior, axis 2 to the right, which is how a
    NIfTI file stored in RAS order reaches the network in the reference layout; 2-D: anterior, right.
    """
    full = np.array([[0.0, 0.0, -1.0], [0.0, -1.0, 0.0], [1.0, 0.0, 0.0]])  # columns: S, A, R
    if dimension == 3:
        return full
    if dimension == 2:
        return np.array([[0.0, -1.0], [-1.0, 0.0]])  # columns: A, R
    raise InputError(f"images must be 2-D or 3-D, not {dimension}-D")
