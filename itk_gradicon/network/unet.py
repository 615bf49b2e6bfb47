"""The atomic registration step: a UNet that predicts a displacement field from two images.

Architecture (GradICON paper, "tallUNet2" of the reference implementation): ``L`` levels; the
down path applies leaky-ReLU then a stride-2 ``3^d`` convolution and adds an average-pooled copy of
its input (a residual skip whose channels are truncated or zero-padded at the front to fit); the up
path applies leaky-ReLU then a stride-2 ``4^d`` transposed convolution, adds a linearly upsampled
copy of its input (channels fitted the same way), normalises with BatchNorm, crops to the skip's
size and concatenates the skip. A final ``3^d`` convolution, initialised to zero so that an untrained
step is the identity map, gives ``d`` channels that are divided by 10: the displacement in CUBE units.

Parameter names (``downConvs``, ``upConvs``, ``batchNorms``, ``lastConv``) are those of the
published weight files, so that their state dicts load without renaming.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BATCH_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {2: F.avg_pool2d, 3: F.avg_pool3d}
_LINEAR_MODE = {2: "bilinear", 3: "trilinear"}

#: Channel widths of the published GradICON / uniGradICON / multiGradICON steps.
PUBLISHED_DOWN_CHANNELS = (16, 32, 64, 256, 512)
PUBLISHED_UP_CHANNELS = (16, 32, 64, 128, 256)


def fit_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Keep the first ``channels`` channels of ``x``, or prepend zero channels to reach that number."""
    have = x.shape[1]
    if have >= channels:
        return x[:, :channels]
    pad = x.new_zeros((x.shape[0], channels - have, *x.shape[2:]))
    return torch.cat([pad, x], dim=1)


class UNetStep(nn.Module):
    """One registration step: ``(image_A, image_B) -> displacement`` in CUBE units.

    Args:
        dimension: 2 or 3.
        input_channels: channels per image (1 for intensity images).
        down_channels: output channels of each down level (the published models: 16, 32, 64, 256, 512).
        up_channels: output channels of each up level, finest first (published: 16, 32, 64, 128, 256).

    Shapes:
        ``image_A``, ``image_B``: ``[B, input_channels, *spatial]``; output ``[B, dimension, *spatial]``.
    """

    def __init__(self, dimension: int = 3, input_channels: int = 1,
                 down_channels: Sequence[int] = PUBLISHED_DOWN_CHANNELS,
                 up_channels: Sequence[int] = PUBLISHED_UP_CHANNELS) -> None:
        super().__init__()
        if dimension not in _CONV:
            raise ValueError(f"dimension must be 2 or 3, not {dimension}")
        if len(down_channels) != len(up_channels):
            raise ValueError(f"down_channels {tuple(down_channels)} and up_channels "
                             f"{tuple(up_channels)} must have the same number of levels")
        self.dimension = dimension
        levels = len(down_channels)
        widths = [2 * input_channels, *down_channels]
        # the up level at depth k receives the down output of depth k plus the up output of depth k+1
        up_inputs = [widths[k + 1] + (up_channels[k + 1] if k + 1 < levels else 0) for k in range(levels)]
        conv, conv_t, norm = _CONV[dimension], _CONV_T[dimension], _BATCH_NORM[dimension]
        self.downConvs = nn.ModuleList(
            conv(widths[k], widths[k + 1], kernel_size=3, padding=1, stride=2) for k in range(levels))
        self.upConvs = nn.ModuleList(
            conv_t(up_inputs[k], up_channels[k], kernel_size=4, padding=1, stride=2) for k in range(levels))
        self.batchNorms = nn.ModuleList(norm(up_channels[k]) for k in range(levels))
        self.lastConv = conv(widths[0] + up_channels[0], dimension, kernel_size=3, padding=1)
        nn.init.zeros_(self.lastConv.weight)
        nn.init.zeros_(self.lastConv.bias)

    def forward(self, image_A: torch.Tensor, image_B: torch.Tensor) -> torch.Tensor:
        pool, mode = _POOL[self.dimension], _LINEAR_MODE[self.dimension]
        x = torch.cat([image_A, image_B], dim=1)
        skips = []
        for down in self.downConvs:
            skips.append(x)
            y = down(F.leaky_relu(x))
            x = y + fit_channels(pool(x, 2, ceil_mode=True), y.shape[1])
        for depth in reversed(range(len(self.upConvs))):
            y = self.upConvs[depth](F.leaky_relu(x))
            x = y + F.interpolate(fit_channels(x, y.shape[1]), scale_factor=2, mode=mode,
                                  align_corners=False)
            x = self.batchNorms[depth](x)
            skip = skips[depth]
            x = x[(slice(None), slice(None), *(slice(0, n) for n in skip.shape[2:]))]
            x = torch.cat([x, skip], dim=1)
        return self.lastConv(x) / 10
