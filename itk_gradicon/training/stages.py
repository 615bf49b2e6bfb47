"""Coarse-to-fine stages: the network of the coarsest levels alone, the grid its pairs are made on, and the
next stage's network grown around the previous one's weights."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, Tuple

import torch
from torch import nn

from ..network import Architecture, build_network
from .seeds import PURPOSE_INIT, derived_seed


def coarse_architecture(architecture: Architecture, levels: int) -> Architecture:
    """The network of the ``levels`` coarsest levels alone, on the grid those levels see.

    ``build_network`` nests ``TS{Down{net}, Psi}`` once per level, so the coarsest ``levels`` levels
    of ``architecture`` are the module reached through ``netPhi.net`` ``architecture.levels - levels``
    times, and they see the images average-pooled by 2 (``ceil_mode``) that many times.
    """
    shape = tuple(architecture.input_shape)
    for _ in range(architecture.levels - levels):
        shape = tuple(-(-n // 2) for n in shape)
    return replace(architecture, levels=levels, refinement_steps=0, input_shape=shape)


def data_shape(full: Tuple[int, ...], stage: Tuple[int, ...]) -> Tuple[int, ...]:
    """The grid a stage's training pairs are made on: twice the resolution its network sees (then
    average-pooled by :func:`pool_batch`, as ``Down`` pools the images at inference), or the full
    network grid where twice would be finer."""
    doubled = tuple(2 * int(s) for s in stage)
    return doubled if all(d <= f for d, f in zip(doubled, full)) else tuple(int(f) for f in full)


def pool_batch(batch: Dict[str, Any], shape: Tuple[int, ...]) -> Dict[str, Any]:
    """A batch on a coarser network grid: images average-pooled by 2 (``ceil_mode``, as ``Down``
    pools them) until they have ``shape``; masks and label maps take every second voxel."""
    out = dict(batch)
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor) or value.dim() < 3 or tuple(value.shape[2:]) == tuple(shape):
            continue
        while tuple(value.shape[2:]) != tuple(shape):
            if key.startswith(("mask_", "seg_")):
                value = value[(slice(None), slice(None)) + (slice(None, None, 2),) * (value.dim() - 2)]
            else:
                pool = torch.nn.functional.avg_pool3d if value.dim() == 5 else torch.nn.functional.avg_pool2d
                value = pool(value, 2, ceil_mode=True)
        out[key] = value
    return out


def grow_network(previous: nn.Module, previous_architecture: Architecture, architecture: Architecture,
                 seed: int) -> nn.Module:
    """The next stage's network, with the previous stage's weights inside and new steps around them.

    ``build_network`` nests ``TS{Down{net}, Psi}`` once per level above the first and
    ``TS{net, Psi}`` once per refinement step, so the previous network is the module reached through
    ``netPhi`` once per added refinement step, then ``netPhi.net`` once per added level. New steps are
    zero-initialised at their last layer (the identity), their other layers drawn from a generator
    seeded by ``seed``.
    """
    grows_levels = architecture.levels > previous_architecture.levels
    torch.manual_seed(derived_seed(seed, PURPOSE_INIT, 100 + architecture.levels if grows_levels else 2))
    network = build_network(architecture)
    inner = network
    for _ in range(architecture.refinement_steps - previous_architecture.refinement_steps):
        inner = inner.netPhi
    for _ in range(architecture.levels - previous_architecture.levels):
        inner = inner.netPhi.net
    inner.load_state_dict(previous.state_dict(), strict=True)
    return network


__all__ = ["coarse_architecture", "data_shape", "grow_network", "pool_batch"]
