"""The network's frames: how an image grid (:mod:`itk_gradicon.io.grid`) reaches the network and back.

The WORLD, INDEX and ARRAY frames are defined in :mod:`itk_gradicon.io.grid` (the one place that reads
origin, spacing and direction); this module adds the network's:

``CUBE``
    The network's coordinates: a point of ``[0, 1]^d`` whose component ``c`` runs along spatial axis
    ``c`` of the network tensor ``[batch, channel, n_0, ..., n_{d-1}]``; grid node ``m`` of that axis
    sits at ``m / (n_c - 1)`` (the convention of the published GradICON models).

How an image reaches the network (:class:`NetworkFrame`): each network axis ``c`` is one axis of the
image's index, possibly reversed, and the image is resized to the network shape with linear
interpolation and ``align_corners=False`` (voxel *edges* of the image meet the cube's outer voxel
edges). The convention chosen here:

* the FIXED image keeps the reference implementation's layout, network axis ``c`` = index axis
  ``d-1-c`` (the array's axis ``c``), so that with identical direction matrices our network input
  equals the reference's;
* the MOVING image is reordered and flipped (exactly, without interpolation) so that its network
  axes point, in physical space, along the fixed image's network axes as closely as possible. Two
  files that store the same anatomy with different axis orders or flips therefore reach the network
  as the same tensor, and give the same physical transform.

Every transform this package writes is assembled from these frames: a fixed voxel's world point goes
to CUBE through the fixed frame, through the network's map, and back to WORLD through the moving frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..io.grid import ImageGrid, IndexBox, apply_affine, best_axis_alignment, canonical_axes  # noqa: F401  (re-exported)
from ..network.sampling import cube_identity  # noqa: F401  (re-exported)
from ..network.sampling import MIN_NATIVE_POINTS_PER_THREAD, NATIVE, native_sampling_on, run_pieces, thread_ranges
from ..network.sampling import sample_cube_field as fast_sample



@dataclass(frozen=True)
class NetworkFrame:
    """How one image is laid out on the network grid, and the affine maps between CUBE and WORLD.

    Args:
        grid: the image grid.
        shape: network spatial shape ``(n_0, ..., n_{d-1})`` in tensor order.
        axes: ``axes[c]`` is the image INDEX axis that network axis ``c`` runs along.
        flips: ``flips[c]`` reverses that axis.
        source_box: where ``grid`` lies in the image whose arrays :meth:`tensor` is given (see
            :meth:`cropped`); ``None``: ``grid`` is that image's grid.
    """

    grid: ImageGrid
    shape: Tuple[int, ...]
    axes: Tuple[int, ...]
    flips: Tuple[bool, ...]
    source_box: Optional[IndexBox] = None

    @classmethod
    def reference_layout(cls, grid: ImageGrid, shape: Sequence[int]) -> "NetworkFrame":
        """The layout of the reference implementation: the ARRAY axes, unchanged."""
        d = grid.dimension
        return cls(grid, tuple(int(s) for s in shape), tuple(range(d - 1, -1, -1)), (False,) * d)

    @classmethod
    def for_layout(cls, layout: str, grid: ImageGrid, shape: Sequence[int]) -> "NetworkFrame":
        """The frame of the fixed (or anchor) image in a model's ``layout``: ``reference`` or ``canonical``."""
        if layout == "canonical":
            return cls.aligned_to(grid, shape, canonical_axes(grid.dimension))
        if layout == "reference":
            return cls.reference_layout(grid, shape)
        raise InputError(f"unknown network layout {layout!r}; allowed: reference, canonical")

    @classmethod
    def aligned_to(cls, grid: ImageGrid, shape: Sequence[int], world_axes: np.ndarray) -> "NetworkFrame":
        """The layout whose network axes best follow ``world_axes`` (column ``c`` for network axis ``c``)."""
        perm, flips = best_axis_alignment(grid.direction_matrix, np.asarray(world_axes, np.float64))
        return cls(grid, tuple(int(s) for s in shape), perm, flips)

    @property
    def dimension(self) -> int:
        return self.grid.dimension

    def companion(self, grid: ImageGrid) -> "NetworkFrame":
        """The frame of the other image of a pair whose first (fixed, anchor) image has this frame: its
        network axes follow this frame's world axes as closely as possible. The one rule by which
        registration (the moving image) and training (every image of a pair) lay out a pair."""
        return NetworkFrame.aligned_to(grid, self.shape, self.world_axes())

    def cropped(self, box: IndexBox) -> "NetworkFrame":
        """The same layout over the voxels of ``box`` only: the network grid spans the box's sub-grid (finer
        where the box is smaller than the image), and :meth:`tensor` still takes the whole image's arrays.
        Maps out of the cube (:func:`displacement_on_grid`) continue their border values beyond the box."""
        if self.source_box is not None:
            raise ValueError("the frame is cropped already")
        return NetworkFrame(box.grid_within(self.grid), self.shape, self.axes, self.flips, box)

    def world_axes(self) -> np.ndarray:
        """``d x d`` matrix: column ``c`` is the WORLD direction of increasing network axis ``c``."""
        cols = [self.grid.direction_matrix[:, a] * (-1.0 if f else 1.0) for a, f in zip(self.axes, self.flips)]
        return np.stack(cols, axis=1)

    def cube_to_index(self) -> np.ndarray:
        """Homogeneous matrix taking CUBE to the image's INDEX (``align_corners=False`` resizing)."""
        d = self.dimension
        m = np.zeros((d + 1, d + 1))
        m[d, d] = 1.0
        for c, (a, flip) in enumerate(zip(self.axes, self.flips)):
            n_img, n_net = self.grid.size[a], self.shape[c]
            ratio = n_img / n_net
            scale = (n_net - 1) * ratio  # CUBE -> network voxel -> image voxel
            offset = 0.5 * ratio - 0.5
            if flip:
                m[a, c], m[a, d] = -scale, (n_img - 1) - offset
            else:
                m[a, c], m[a, d] = scale, offset
        return m

    def cube_to_world(self) -> np.ndarray:
        return self.grid.index_to_world() @ self.cube_to_index()

    def world_to_cube(self) -> np.ndarray:
        return np.linalg.inv(self.cube_to_world())

    def index_to_cube(self) -> np.ndarray:
        return np.linalg.inv(self.cube_to_index())

    # ---- arrays -------------------------------------------------------------------------------
    def to_network_layout(self, array: np.ndarray) -> np.ndarray:
        """Reorder an ARRAY-ordered voxel array into network axis order (no resizing, no copy)."""
        d = self.dimension
        index_order = np.transpose(array, tuple(range(d - 1, -1, -1)))  # axis a <-> index axis a
        out = np.transpose(index_order, self.axes)
        flip_axes = tuple(c for c, f in enumerate(self.flips) if f)
        return np.flip(out, flip_axes) if flip_axes else out

    def tensor(self, array: np.ndarray, *, mode: str = "linear", device=None) -> torch.Tensor:
        """An ARRAY-ordered image as a ``[1, 1, *shape]`` float32 tensor on the network grid.

        ``mode`` is ``"linear"`` (trilinear/bilinear, ``align_corners=False``, the reference's
        resizing) or ``"nearest"`` (for masks and label maps).
        """
        if self.source_box is not None:
            array = array[self.source_box.array_slices()]
        if array.shape != self.grid.array_shape:
            raise ValueError(f"array of shape {array.shape} given for a grid of ARRAY shape {self.grid.array_shape}")
        laid_out = np.ascontiguousarray(self.to_network_layout(array), dtype=np.float32)
        if not laid_out.flags.writeable:  # a read-only view (SimpleITK's, ITK's): torch wants its own buffer
            laid_out = laid_out.copy()
        t = torch.from_numpy(laid_out)[None, None]
        if device is not None:
            t = t.to(device)
        if tuple(t.shape[2:]) == self.shape:
            return t
        if mode == "nearest":
            return F.interpolate(t, size=self.shape, mode="nearest")
        interp = {1: "linear", 2: "bilinear", 3: "trilinear"}[self.dimension]
        return F.interpolate(t, size=self.shape, mode=interp, align_corners=False)


def displacement_on_grid(cube_displacement: torch.Tensor, points_grid: ImageGrid,
                         source_frame: NetworkFrame, target_frame: NetworkFrame, *,
                         preaffine: Optional[np.ndarray] = None, postaffine: Optional[np.ndarray] = None,
                         max_voxels_per_chunk: int = 1_000_000) -> np.ndarray:
    """WORLD displacement of a network map at every voxel centre of ``points_grid``.

    The network map sends CUBE points of ``source_frame`` to CUBE points of ``target_frame``:
    ``y = x + u(x)`` with ``u`` = ``cube_displacement`` (``[1, d, *shape]``, linear interpolation,
    border values outside the cube). For a voxel centre ``p`` the transform is

        ``T(p) = post(world_target(y(cube_source(pre(p)))))``

    where ``pre`` and ``post`` are optional homogeneous WORLD->WORLD matrices (an affine
    pre-alignment composed into the result). The work is done in slabs of the slowest axis, so the
    memory used beyond the output is bounded by ``max_voxels_per_chunk``.

    Returns:
        float32 array ``points_grid.array_shape + (d,)`` of ``T(p) - p`` (LPS mm).
    """
    d = points_grid.dimension
    eye = np.eye(d + 1)
    index_to_world = points_grid.index_to_world()
    index_to_cube = source_frame.world_to_cube() @ (eye if preaffine is None else preaffine) @ index_to_world
    cube_to_out = (eye if postaffine is None else postaffine) @ target_frame.cube_to_world()
    out = np.empty(points_grid.array_shape + (d,), dtype=np.float32)
    if _native_grid_field(cube_displacement, d):
        return _native_displacement_on_grid(cube_displacement, out, index_to_cube, cube_to_out, index_to_world)
    as_t = lambda m: torch.from_numpy(np.ascontiguousarray(m, dtype=np.float64))  # noqa: E731
    index_to_cube_t, cube_to_out_t, index_to_world_t = as_t(index_to_cube), as_t(cube_to_out), as_t(index_to_world)
    slab = int(np.prod(points_grid.array_shape[1:])) if d > 1 else 1
    rows_per_chunk = max(1, max_voxels_per_chunk // max(1, slab))
    disp = cube_displacement.detach()
    if disp.dtype != torch.float32:
        disp = disp.float()
    for start in range(0, points_grid.array_shape[0], rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, points_grid.array_shape[0]))
        idx = torch.from_numpy(points_grid.index_points(rows))  # (..., d) float64, INDEX order
        cube = idx @ index_to_cube_t[:d, :d].T + index_to_cube_t[:d, d]
        cube_t = cube.movedim(-1, 0)[None]  # [1, d, *chunk]
        u = fast_sample(disp, cube_t.to(device=disp.device, dtype=torch.float32))
        y = (cube_t + u.to(device="cpu", dtype=torch.float64))[0].movedim(0, -1)
        moved = y @ cube_to_out_t[:d, :d].T + cube_to_out_t[:d, d]
        points = idx @ index_to_world_t[:d, :d].T + index_to_world_t[:d, d]
        out[rows] = (moved - points).numpy()
    return out


def _native_grid_field(cube_displacement: torch.Tensor, d: int) -> bool:
    """Whether :func:`displacement_on_grid` runs on the compiled kernel: a 3-D float32 map of one batch item on the
    CPU, the kernel built and the fast paths on (:mod:`itk_gradicon.network.performance`)."""
    return (native_sampling_on() and d == 3
            and cube_displacement.dim() == 5 and cube_displacement.shape[:2] == (1, 3)
            and cube_displacement.device.type == "cpu" and cube_displacement.dtype == torch.float32)


def _native_displacement_on_grid(cube_displacement: torch.Tensor, out: np.ndarray, index_to_cube: np.ndarray,
                                 cube_to_out: np.ndarray, index_to_world: np.ndarray) -> np.ndarray:
    """:func:`displacement_on_grid`'s loop in one compiled pass per voxel (``_linear.grid_field_3d``: the same
    float64 arithmetic, dot products in axis order), one range of the slowest axis per thread."""
    field = cube_displacement.detach()[0].contiguous()
    matrices = [np.ascontiguousarray(m[:3, :4], dtype=np.float64) for m in (index_to_cube, cube_to_out, index_to_world)]
    nk, nj, ni = out.shape[:3]
    calls = [(field.data_ptr(), *field.shape[1:], *field.stride(), *(m.ctypes.data for m in matrices),
              out.ctypes.data, nk, nj, ni, start, end)
             for start, end in thread_ranges(nk, nj * ni, MIN_NATIVE_POINTS_PER_THREAD)]
    run_pieces(NATIVE.grid_field_3d, calls)  # field, matrices and out stay referenced until every call returns
    return out
