"""Whether two pre-aligned images show the same extent of tissue: the check that catches a skull-stripped
(or masked) image registered to one with the whole head.

Deformable registration moves edges onto edges. When the moving image's foreground is a brain and the
fixed image's is a head, the only edges the moving brain can meet are the skull's and the scalp's, and
instance optimisation stretches the cortex toward them; the affine stage's mutual information does the
same to the scales (where its plausibility check then falls back to rigid). ANTs and elastix users mask
one image or strip both for this reason; :func:`coverage_warning` says so when the two foregrounds
differ this way, measured on the network grid after the pre-alignment:

* the *foreground* of an image normalised to ``[0, 1]`` is its voxels above :data:`FOREGROUND` (air and a
  stripped image's zero background stay below it; tissue, skull and scalp of an MRI or a CT are above);
* only voxels that fall inside the moving image's field of view count, so a slab or a partial field of
  view registered to a whole image is not mistaken for a stripped one.

The thresholds below were chosen on real pairs of both kinds (``benchmarks/ACCURACY.md``, run 15).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..io.grid import ImageGrid
from ..spatial.frames import NetworkFrame
from .region import FOREGROUND  # noqa: F401  (re-exported)

#: Below this share of the fixed image's foreground covered by the moving image's, while the moving
#: image's foreground lies within the fixed one's (:data:`MOVING_INSIDE`), the pair is said to differ.
FIXED_COVERED_BELOW = 0.7
MOVING_INSIDE = 0.9
#: Fewer foreground voxels than this (on the subsampled network grid) in either image: nothing to tell.
MIN_VOXELS = 100
#: The check looks at every this-many-th node of the network grid along each axis.
COVERAGE_STRIDE = 2


@dataclass(frozen=True)
class Coverage:
    """How much of each image's foreground the other one's covers, over the voxels where both are
    defined (inside the moving image's field of view)."""

    fixed_covered: float
    moving_covered: float

    @property
    def differs(self) -> bool:
        """The fixed image shows tissue the moving one lacks, and not the other way round."""
        return self.fixed_covered < FIXED_COVERED_BELOW and self.moving_covered >= MOVING_INSIDE


def foreground_coverage(moving: torch.Tensor, fixed: torch.Tensor, inside: Optional[torch.Tensor] = None, *,
                        stride: int = COVERAGE_STRIDE) -> Optional[Coverage]:
    """:class:`Coverage` of two network-grid images (``[1, 1, *shape]``, normalised to ``[0, 1]``, the moving
    one pre-aligned onto the fixed grid), on every ``stride``-th node along each axis; ``inside`` (boolean,
    on those nodes) marks the ones within the moving image's field of view. ``None`` where either
    foreground has fewer than :data:`MIN_VOXELS` voxels."""
    every = (slice(None), slice(None)) + (slice(None, None, stride),) * (moving.dim() - 2)
    a, b = moving.detach()[every] > FOREGROUND, fixed.detach()[every] > FOREGROUND
    if inside is not None:
        within = inside.reshape(a.shape)
        a, b = a & within, b & within
    count_a, count_b = int(a.sum()), int(b.sum())
    if min(count_a, count_b) < MIN_VOXELS:
        return None
    both = int((a & b).sum())
    return Coverage(fixed_covered=both / count_b, moving_covered=both / count_a)


def coverage_warning(coverage: Optional[Coverage]) -> Optional[str]:
    """The warning for a pair whose foregrounds differ (:attr:`Coverage.differs`), else ``None``."""
    if coverage is None or not coverage.differs:
        return None
    return (f"warning: after the pre-alignment the moving image's foreground covers only "
            f"{100 * coverage.fixed_covered:.0f} % of the fixed image's (the fixed image shows tissue the moving one "
            f"lacks, as when a skull-stripped image is registered to a whole head): the deformable stage pulls the "
            f"moving image's edges toward the fixed image's. Prepare both images alike (both skull-stripped), or zero "
            f"the fixed image outside a brain mask (--fixed-mask); check the result (--out-qc)")


def inside_field_of_view(fixed_frame: NetworkFrame, moving_grid: ImageGrid, affine: np.ndarray, *,
                         stride: int = COVERAGE_STRIDE, device=None) -> torch.Tensor:
    """Boolean on every ``stride``-th node of the fixed image's network grid: whether the node's point, through
    the pre-alignment ``affine`` (fixed -> moving WORLD), lies within the moving image's voxels (their outer
    edges included)."""
    d = fixed_frame.dimension
    to_index = moving_grid.world_to_index() @ affine @ fixed_frame.cube_to_world()
    axes = [torch.arange(0, n, stride, dtype=torch.float64) / (n - 1) for n in fixed_frame.shape]
    nodes = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)
    index = torch.from_numpy(to_index[:d, :d]) @ nodes.reshape(d, -1) + torch.from_numpy(to_index[:d, d:])
    size = torch.tensor(moving_grid.size, dtype=torch.float64).reshape(d, 1)
    inside = ((index >= -0.5) & (index <= size - 0.5)).all(dim=0)
    return inside.reshape(nodes.shape[1:]).to(device)


def prealigned_coverage_warning(moving: torch.Tensor, fixed: torch.Tensor, fixed_frame: NetworkFrame,
                                moving_grid: ImageGrid, affine: np.ndarray) -> Optional[str]:
    """The check of a registration: ``moving`` and ``fixed`` on the fixed image's network grid (``fixed_frame``),
    the moving one resampled through the pre-alignment ``affine`` from its own grid ``moving_grid``; the
    warning of :func:`coverage_warning`, or ``None``."""
    inside = inside_field_of_view(fixed_frame, moving_grid, affine, device=moving.device)
    return coverage_warning(foreground_coverage(moving, fixed, inside))


__all__ = ["COVERAGE_STRIDE", "Coverage", "FIXED_COVERED_BELOW", "FOREGROUND", "MOVING_INSIDE", "coverage_warning",
           "foreground_coverage", "inside_field_of_view", "prealigned_coverage_warning"]
