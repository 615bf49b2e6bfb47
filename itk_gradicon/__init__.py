"""itk_gradicon: the GradICON family of deep registration networks for ITK users.

Images are ``itk.Image``; registration results are ``itk.DisplacementFieldTransform`` objects on the
fixed image's grid that map FIXED physical points to MOVING physical points (the resampling
convention of ITK, ANTs and elastix).

Example:
    >>> import itk, itk_gradicon
    >>> fixed, moving = itk.imread("fixed.nii.gz"), itk.imread("moving.nii.gz")   # doctest: +SKIP
    >>> result = itk_gradicon.register(fixed, moving, model="unigradicon")         # doctest: +SKIP
    >>> warped = itk.resample_image_filter(moving, transform=result.forward_transform,
    ...                                    use_reference_image=True, reference_image=fixed)  # doctest: +SKIP

Heavy modules (torch, itk) are imported on first use of the names below, so that
``import itk_gradicon`` and ``gradicon --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "register": "itk_gradicon.registration",
    "RegistrationResult": "itk_gradicon.registration",
    "GradICONRegistrationMethod": "itk_gradicon.registration_method",
    "load_model": "itk_gradicon.models",
    "apply_transforms_to_points": "itk_gradicon.points",
    "GradiconError": "itk_gradicon.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'itk_gradicon' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
