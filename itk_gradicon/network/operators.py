"""Maps in CUBE coordinates and the operators that compose registration steps.

A network returns a :class:`CubeMap`: the composition ``x -> psi_1(psi_2(... psi_n(x)))`` of
displacement steps ``psi_k(x) = x + D_k(x)``, where each ``D_k`` is a displacement field on some
network grid (it may be coarser than the input: the Downsample operator predicts at half
resolution) interpolated linearly, with border values outside ``[0, 1]^d``.

Operators (GradICON paper, section 3; names of the attributes are those of the published weights):

* :class:`RegistrationStep` ``{Psi}``: a UNet predicts one displacement field from the two images.
* :class:`Downsample` ``Down{Phi}``: average-pool both images by 2 and run ``Phi`` on them. Maps live
  in CUBE coordinates, so the coarse result needs no rescaling.
* :class:`TwoStep` ``TS{Phi, Psi}``: ``Phi[A, B] o Psi[A o Phi[A, B], B]``: register, warp ``A`` with
  the first map, register the warped image to ``B`` and compose.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import performance
from .sampling import cube_identity, sample_cube_field

_IDENTITY_CACHE: Dict[Tuple, torch.Tensor] = {}


def identity_on(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """Cached CUBE identity ``[1, d, *shape]`` with ``like``'s device and dtype (never requires grad)."""
    key = (tuple(int(s) for s in shape), like.device, like.dtype)
    ident = _IDENTITY_CACHE.get(key)
    if ident is None:
        with torch.inference_mode(False), torch.no_grad():
            ident = cube_identity(key[0], device=like.device, dtype=like.dtype)
        if len(_IDENTITY_CACHE) > 16:
            _IDENTITY_CACHE.clear()
        _IDENTITY_CACHE[key] = ident
    return ident


class CubeMap:
    """A composition of displacement steps in CUBE coordinates.

    Args:
        fields: displacement fields ``[B, d, *shape_k]``, outermost first: the map is
            ``x -> x_1`` with ``x_n = x + D_n(x)``, ``x_{k} = x_{k+1} + D_k(x_{k+1})``.
    """

    def __init__(self, fields: Sequence[torch.Tensor]) -> None:
        if not fields:
            raise ValueError("a CubeMap needs at least one field")
        self.fields = tuple(fields)

    @property
    def dimension(self) -> int:
        return self.fields[0].shape[1]

    def compose(self, inner: "CubeMap") -> "CubeMap":
        """``self o inner``: apply ``inner`` first."""
        return CubeMap(self.fields + inner.fields)

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        """Map CUBE points ``[B or 1, d, *out]`` to CUBE points ``[B, d, *out]``."""
        for field in reversed(self.fields):
            points = points + sample_cube_field(field, points)
        return points

    def on_grid(self, shape: Sequence[int]) -> torch.Tensor:
        """The map evaluated at the nodes of a network grid of ``shape``: ``[B, d, *shape]``.

        When the first step's field lives on that grid, its values are used directly rather than
        interpolated at its own nodes.
        """
        innermost = self.fields[-1]
        ident = identity_on(shape, innermost)
        shape = tuple(int(s) for s in shape)
        if tuple(innermost.shape[2:]) == shape:
            points = ident + innermost
            rest = self.fields[:-1]
        elif performance.current().enabled and performance.current().resample_on_grid:
            # at the nodes of another grid, linear interpolation with align_corners=True is the same
            # sampling as grid_sample at the identity, by a vectorised, multi-threaded kernel
            mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(shape)]
            points = ident + F.interpolate(innermost, size=shape, mode=mode, align_corners=True)
            rest = self.fields[:-1]
        else:
            points, rest = ident, self.fields
        for field in reversed(rest):
            points = points + sample_cube_field(field, points)
        return points

    def displacement_on_grid(self, shape: Sequence[int]) -> torch.Tensor:
        """``on_grid(shape)`` minus the identity: the displacement ``[B, d, *shape]`` in CUBE units."""
        innermost = self.fields[-1]
        return self.on_grid(shape) - identity_on(shape, innermost)


class RegistrationStep(nn.Module):
    """``{Psi}``: wrap a network that outputs a displacement field into a map."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image_A: torch.Tensor, image_B: torch.Tensor) -> CubeMap:
        displacement = self.net(image_A, image_B)
        if displacement.dtype in (torch.float16, torch.bfloat16):
            # under autocast only the convolutions run in reduced precision: maps, warps and their
            # composition stay in float32 (a 175-node identity in bfloat16 would be off by 0.3 voxels)
            displacement = displacement.float()
        return CubeMap((displacement,))


class Downsample(nn.Module):
    """``Down{Phi}``: run ``net`` on both images average-pooled by 2 (``ceil_mode``)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image_A: torch.Tensor, image_B: torch.Tensor) -> CubeMap:
        pool = F.avg_pool3d if image_A.dim() == 5 else F.avg_pool2d
        return self.net(pool(image_A, 2, ceil_mode=True), pool(image_B, 2, ceil_mode=True))


class TwoStep(nn.Module):
    """``TS{Phi, Psi}[A, B] = Phi[A, B] o Psi[A o Phi[A, B], B]``."""

    def __init__(self, netPhi: nn.Module, netPsi: nn.Module) -> None:
        super().__init__()
        self.netPhi = netPhi
        self.netPsi = netPsi

    def forward(self, image_A: torch.Tensor, image_B: torch.Tensor) -> CubeMap:
        phi = self.netPhi(image_A, image_B)
        warped_A = sample_cube_field(image_A, phi.on_grid(image_A.shape[2:]))
        psi = self.netPsi(warped_A, image_B)
        return phi.compose(psi)
