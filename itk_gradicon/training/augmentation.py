"""Random augmentation of a training pair: flips and small affine motions, drawn per pair from the seed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .config import AugmentationConfig

@dataclass(frozen=True)
class Augmentation:
    """The random transform of one sample: shared axis flips/permutation, an affine per view.

    Attributes:
        flips: network axes to reverse.
        permutation: network axis ``c`` of the result is axis ``permutation[c]`` of the input.
        affines: view label -> ``d x (d+1)`` matrix for :func:`torch.nn.functional.affine_grid`.
        inverted: image roles whose CT image becomes ``1 - CT``.
    """

    flips: Tuple[int, ...]
    permutation: Tuple[int, ...]
    affines: Mapping[str, np.ndarray]
    inverted: Tuple[str, ...]


def draw_augmentation(cfg: AugmentationConfig, rng: np.random.Generator, shape: Sequence[int],
                      view_labels: Sequence[str], ct_roles: Sequence[str]) -> Augmentation:
    """Draw the flips, permutation, per-view affine matrices and CT inversions of one sample."""
    d = len(shape)
    flips = tuple(c for c in range(d) if rng.random() < 0.5) if cfg.flips else ()
    permutation = list(range(d))
    if cfg.permutations:
        for size in sorted(set(shape)):
            axes = [c for c in range(d) if shape[c] == size]
            shuffled = [axes[int(i)] for i in rng.permutation(len(axes))]
            for c, source in zip(axes, shuffled):
                permutation[c] = source
    affines = {}
    for label in sorted(set(view_labels)):
        noise = rng.standard_normal((d, d + 1))
        if cfg.affine_std > 0:
            theta = np.concatenate([np.eye(d), np.zeros((d, 1))], axis=1) + cfg.affine_std * noise
            affines[label] = theta
    inverted = tuple(r for r in ct_roles if rng.random() < cfg.invert_ct) if cfg.invert_ct > 0 else ()
    return Augmentation(flips, tuple(permutation), affines, inverted)


def apply_augmentation(tensor: torch.Tensor, aug: Augmentation, view: str, *, nearest: bool) -> torch.Tensor:
    """Apply the flips, permutation and the view's affine warp to a ``[C, *shape]`` tensor.

    Images are interpolated linearly with border values outside (as the reference's augmentation);
    masks and label maps (``nearest``) take the nearest value and 0 outside.
    """
    d = tensor.dim() - 1
    if aug.flips:
        tensor = torch.flip(tensor, [1 + c for c in aug.flips])
    if tuple(aug.permutation) != tuple(range(d)):
        tensor = tensor.permute(0, *[1 + p for p in aug.permutation])
    theta = aug.affines.get(view)
    if theta is not None:
        batch = tensor[None]
        grid = F.affine_grid(torch.as_tensor(theta, dtype=batch.dtype)[None], list(batch.shape), align_corners=True)
        batch = F.grid_sample(batch, grid, mode="nearest" if nearest else "bilinear",
                              padding_mode="zeros" if nearest else "border", align_corners=True)
        tensor = batch[0]
    return tensor.contiguous()
