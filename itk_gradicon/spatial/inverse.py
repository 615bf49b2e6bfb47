"""The inverse of a transform given as displacement fields and linear transforms, sampled on a grid.

A registration's forward transform ``T`` maps fixed points to moving points (``T(x) = x + u(x)``); its
inverse, defined on the moving image's grid, maps each moving point ``y`` to the fixed point ``x`` with
``T(x) = y``. ``gradicon register`` writes the network's own inverse; elastix writes none, and ANTs only
for its own warps: :func:`invert_transform` computes one for any transform chain.

Method: ``T`` is sampled on its domain (the grid of its first displacement field, in double precision) and
split into the affine map ``A x + b`` that fits it best (least squares over the domain) and a residual
``r(x) = T(x) - (A x + b)``, linear between the domain's nodes as ITK interpolates a displacement field. From
``x = A^-1 (y - b)``, ``T(x) = y`` is solved by Newton's method, ``x <- x - J(x)^-1 (T(x) - y)``, with ``J``
the Jacobian of ``T`` at the domain's nodes (central differences) interpolated between them: whatever the
rotation, scale or translation in ``A`` and however much the residual stretches, it converges wherever ``T``
does not fold (where ``J`` folds or nearly does, ``A`` stands in for it; a step moves a point at most four
voxels; each point keeps the best position it reached). Beyond the domain ``r`` keeps its edge values. The
result reports how far the iteration got and which points' preimages left the domain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..io.grid import ImageGrid
from ..io.transform_files import sample_displacement

#: Points per chunk of the iteration (bounds its memory to about 300 MB).
_CHUNK = 1_000_000
#: A point whose ``|T(x) - y|`` stays above this (mm) counts as unsolved.
SOLVED_MM = 0.01
#: Steps that sample the Jacobian where the points are; later steps keep the last one (a chord method).
_NEWTON_STEPS = 3


@dataclass(frozen=True)
class InverseField:
    """The inverse sampled on a grid, and how well it was found.

    Attributes:
        displacement: ``grid.array_shape + (d,)``, ``x - y`` at every voxel centre ``y`` (WORLD mm).
        iterations: Newton steps run (the largest over chunks).
        last_step_mm: the largest ``|T(x) - y|`` left at the points returned (by the sampled ``T``).
        outside_fraction: share of the grid's points whose preimage lies outside the forward field's grid.
        unsolved_fraction: share of the grid's points left more than :data:`SOLVED_MM` off (where ``T`` folds,
            no point maps there or several do).
    """

    displacement: np.ndarray
    iterations: int
    last_step_mm: float
    outside_fraction: float
    unsolved_fraction: float


def _affine_fit(points: np.ndarray, mapped: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares ``(A, b)`` with ``mapped ~ points @ A.T + b`` (every 3rd node along each axis)."""
    d = points.shape[-1]
    step = (slice(None, None, 3),) * d
    x = points[step].reshape(-1, d)
    y = mapped[step].reshape(-1, d)
    design = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    solution, *_ = np.linalg.lstsq(design, y, rcond=None)
    return solution[:d].T, solution[d]


def invert_transform(transform, domain: ImageGrid, grid: ImageGrid, *, iterations: int = 50,
                     tolerance_mm: float = 1e-4) -> InverseField:
    """The inverse of ``transform`` (a SimpleITK transform, e.g. a composed chain) on ``grid``.

    Args:
        transform: maps points of ``domain`` (the fixed space) to the moving space.
        domain: where ``transform`` is sampled (its displacement field's grid: the fixed image's).
        grid: where the inverse is wanted (the moving image's grid).
        iterations: at most this many Newton steps.
        tolerance_mm: stop once ``|T(x) - y|`` is below this at every point.

    Returns:
        An :class:`InverseField`.
    """
    import torch

    if domain.dimension != grid.dimension:
        raise InputError(f"a {domain.dimension}-D transform cannot be inverted on a {grid.dimension}-D grid")
    d = domain.dimension
    nodes = domain.world_points()
    forward = nodes + sample_displacement(transform, domain, double=True)
    matrix, offset = _affine_fit(nodes, forward)
    if abs(np.linalg.det(matrix)) < 1e-6:
        raise InputError("the transform is not invertible: its best affine fit is singular")
    inverse_matrix = np.linalg.inv(matrix)
    residual = forward - (nodes @ matrix.T + offset)
    to_index = domain.world_to_index()
    if min(domain.size) < 2:
        raise InputError(f"the forward transform's grid {domain.size} needs at least 2 voxels along every axis")
    # the Jacobian of T at the nodes, in single precision (it only steers the steps): by index (ARRAY axes
    # reversed to i, j, k), then by WORLD; inverted
    single = forward.astype(np.float32)
    by_world = to_index[:d, :d].astype(np.float32)
    jacobian = np.stack(np.gradient(single, axis=tuple(range(d)))[::-1], axis=-1) @ by_world
    del single
    # where T folds or nearly does (a determinant below a twentieth of A's, negative included) A steers instead
    determinant = np.linalg.det(jacobian) * np.sign(np.linalg.det(matrix))
    jacobian[determinant <= 0.05 * abs(np.linalg.det(matrix))] = matrix
    del determinant
    inverse_jacobian = np.linalg.inv(jacobian).reshape(domain.array_shape + (d * d,))
    del jacobian
    # as (1, channels, *array_shape) tensors (grid_sample's points are (i, j, k)): the residual in double
    # precision, which the solution's accuracy rests on; J^-1 in single
    field = torch.from_numpy(np.ascontiguousarray(np.moveaxis(residual, -1, 0)))[None]
    steering = torch.from_numpy(np.ascontiguousarray(np.moveaxis(inverse_jacobian, -1, 0)))[None]
    del inverse_jacobian, residual, forward, nodes
    sizes = np.asarray(domain.size, dtype=np.float64)
    a_inv = torch.from_numpy(inverse_matrix)
    b = torch.from_numpy(offset)
    to_index_m = torch.from_numpy(to_index[:d, :d])
    to_index_t = torch.from_numpy(to_index[:d, d])
    scale = torch.from_numpy(2.0 / np.maximum(sizes - 1, 1))

    def sampled_at(points: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """``image`` (linear between the domain's nodes, edge values beyond) at ``points``: ``(n, channels)``."""
        index = points @ to_index_m.T + to_index_t
        normalised = (index * scale - 1.0).to(image.dtype)
        sample_grid = normalised.reshape((1, -1) + (1,) * (d - 1) + (d,))
        sampled = torch.nn.functional.grid_sample(image, sample_grid, mode="bilinear", padding_mode="border",
                                                  align_corners=True)
        return sampled.reshape(image.shape[1], -1).T.to(torch.float64)

    a = torch.from_numpy(matrix)
    max_step = 4.0 * max(domain.spacing)
    last_node = torch.from_numpy(sizes - 1)

    def _beyond(points: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
        """Which points lie beyond the domain's outermost nodes (by ``margin`` voxels)."""
        index = points @ to_index_m.T + to_index_t
        return ((index < -margin) | (index > last_node + margin)).any(dim=1)

    targets = grid.world_points().reshape(-1, d)
    out = np.empty_like(targets)
    ran, last, outside, unsolved = 0, 0.0, 0, 0
    for start in range(0, len(targets), _CHUNK):
        y = torch.from_numpy(targets[start:start + _CHUNK])
        x = (y - b) @ a_inv.T
        best, best_miss = x.clone(), torch.full((len(x),), float("inf"), dtype=torch.float64)
        step = 0
        j_inv = None
        for step in range(1, iterations + 1):
            miss = x @ a.T + b + sampled_at(x, field) - y
            size = miss.norm(dim=1)
            better = size < best_miss
            best[better], best_miss[better] = x[better], size[better]
            if len(x) == 0 or float(best_miss.max()) <= tolerance_mm:
                break
            if step <= _NEWTON_STEPS or j_inv is None:  # then the last J^-1 steers (the points barely move)
                j_inv = sampled_at(x, steering).reshape(-1, d, d)
                # beyond the domain r keeps its edge values: there T is A x + const, and A^-1 steers
                j_inv[_beyond(x)] = a_inv
            move = (j_inv @ miss[:, :, None])[:, :, 0]
            # at most a few voxels a step, so that a point near a fold cannot be flung away
            length = move.norm(dim=1, keepdim=True)
            x = x - move * torch.clamp(max_step / torch.clamp(length, min=1e-12), max=1.0)
        ran = max(ran, step)
        last = max(last, float(best_miss.max()) if len(x) else 0.0)
        outside += int(_beyond(best, margin=0.5).sum())
        unsolved += int((best_miss > SOLVED_MM).sum())
        out[start:start + len(best)] = (best - y).numpy()
    count = max(len(targets), 1)
    return InverseField(out.reshape(grid.array_shape + (d,)), ran, last, outside / count, unsolved / count)


__all__ = ["SOLVED_MM", "InverseField", "invert_transform"]
