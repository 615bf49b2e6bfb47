"""The GradICON family of registration networks (see :mod:`.unet`, :mod:`.operators`, :mod:`.builders`)."""

from .builders import PUBLISHED_3D, Architecture, build_network, count_parameters
from .operators import CubeMap, Downsample, RegistrationStep, TwoStep
from .unet import UNetStep

__all__ = ["Architecture", "PUBLISHED_3D", "build_network", "count_parameters", "CubeMap",
           "Downsample", "RegistrationStep", "TwoStep", "UNetStep"]
