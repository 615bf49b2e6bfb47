"""Network architectures of the GradICON family, described by a small typed record.

:class:`Architecture` is what our model files store, so that a model never has to be guessed:

* published uniGradICON / multiGradICON: 3-D, input ``175^3``, three resolutions plus one refinement
  step (GradICON's "Stage 2", four UNets, 70,680,916 parameters);
* GradICON "Stage 1": three resolutions, no refinement step (three UNets);
* smaller variants (other input sizes, channel widths, 2-D) for training on modest hardware.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Tuple

from torch import nn

from ..errors import ModelError
from .operators import Downsample, RegistrationStep, TwoStep
from .unet import NORMALIZATIONS, PUBLISHED_DOWN_CHANNELS, PUBLISHED_UP_CHANNELS, UNetStep


def minimum_input_size(levels: int, unet_levels: int) -> int:
    """Smallest input size for which every average pooling of every step sees at least 2 voxels."""
    def ok(n: int) -> bool:
        for _ in range(levels - 1 + unet_levels):
            if n < 2:
                return False
            n = -(-n // 2)
        return True

    n = 2
    while not ok(n):
        n += 1
    return n


@dataclass(frozen=True)
class Architecture:
    """Everything needed to build a network before loading its weights.

    Attributes:
        dimension: 2 or 3.
        input_shape: network grid in tensor order; images are resized to it.
        levels: number of resolutions of Stage 1 (3 in the papers): ``Down`` is applied
            ``levels - 1`` times.
        refinement_steps: full-resolution steps composed after Stage 1 (1 for Stage 2).
        input_channels: channels per image.
        down_channels, up_channels: UNet widths per level (finest first).
        normalization: ``batch`` (published) or ``instance`` (see :class:`~itk_gradicon.network.unet.UNetStep`).
    """

    dimension: int = 3
    input_shape: Tuple[int, ...] = (175, 175, 175)
    levels: int = 3
    refinement_steps: int = 1
    input_channels: int = 1
    down_channels: Tuple[int, ...] = field(default=PUBLISHED_DOWN_CHANNELS)
    up_channels: Tuple[int, ...] = field(default=PUBLISHED_UP_CHANNELS)
    normalization: str = "batch"

    def __post_init__(self) -> None:
        problems = []
        if self.normalization not in NORMALIZATIONS:
            problems.append(f"normalization must be one of {', '.join(NORMALIZATIONS)}, not {self.normalization!r}")
        if self.dimension not in (2, 3):
            problems.append(f"dimension must be 2 or 3, not {self.dimension!r}")
        if len(self.input_shape) != self.dimension:
            problems.append(f"input_shape {tuple(self.input_shape)} must have {self.dimension} sizes")
        smallest = minimum_input_size(self.levels, len(self.down_channels))
        if any(int(s) < smallest for s in self.input_shape):
            problems.append(f"input_shape {tuple(self.input_shape)}: with {self.levels} levels of "
                            f"{len(self.down_channels)}-level UNets every size must be at least {smallest}")
        if self.levels < 1 or self.refinement_steps < 0:
            problems.append(f"levels must be >= 1 and refinement_steps >= 0, not "
                            f"{self.levels}, {self.refinement_steps}")
        if len(self.down_channels) != len(self.up_channels) or not self.down_channels:
            problems.append(f"down_channels {tuple(self.down_channels)} and up_channels "
                            f"{tuple(self.up_channels)} must be non-empty and of equal length")
        if problems:
            raise ModelError("invalid architecture: " + "; ".join(problems))
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        object.__setattr__(self, "down_channels", tuple(int(s) for s in self.down_channels))
        object.__setattr__(self, "up_channels", tuple(int(s) for s in self.up_channels))

    @property
    def num_steps(self) -> int:
        """Number of UNets."""
        return self.levels + self.refinement_steps

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["normalization"] == "batch":  # files of published-style networks stay readable by older versions
            del d["normalization"]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Architecture":
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ModelError(f"unknown architecture keys {sorted(unknown)}; known: {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


#: The architecture of the published uniGradICON and multiGradICON weights.
PUBLISHED_3D = Architecture()


def build_network(arch: Architecture) -> nn.Module:
    """Build the registration network ``(image_A, image_B) -> CubeMap`` for ``arch``.

    Stage 1 is ``TS{Down{TS{Down{Psi1}, Psi2}}, Psi3}`` for three levels; each refinement step
    wraps the result as ``TS{net, Psi}``. Freshly built, every step outputs zero displacement.
    """

    def step() -> nn.Module:
        return RegistrationStep(UNetStep(arch.dimension, arch.input_channels,
                                         arch.down_channels, arch.up_channels, arch.normalization))

    net: nn.Module = step()
    for _ in range(arch.levels - 1):
        net = TwoStep(Downsample(net), step())
    for _ in range(arch.refinement_steps):
        net = TwoStep(net, step())
    return net


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
