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

Layout (README, "Architecture"): ``cli/`` (the click commands) over ``commands/`` (what each command runs:
``register``, ``register-batch``, the file commands, points), the API (:mod:`.registration`), ``training/``,
``evaluation/``, ``pipeline/`` (options and the steps of a registration), ``spatial/`` (frames, fields,
resampling, Jacobians), ``io/`` (files, grids, the ITK bridge) and ``network/``.
Modules that lived at the top before the subpackages (``itk_gradicon.imageio``, ``itk_gradicon.transforms``
...) stay importable under their former names for one release (:data:`MOVED`): the former name is the same
module object as the new one.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import time
from typing import Any

__version__ = "0.1.0"

#: When this package was first imported (``time.perf_counter``): the start of the imports a command's
#: closing line counts, where the process itself began long before Python (a shell's ``exec``).
IMPORTED_AT = time.perf_counter()

_LAZY = {
    "register": "itk_gradicon.registration",
    "RegistrationResult": "itk_gradicon.registration",
    "GradICONRegistrationMethod": "itk_gradicon.registration_method",
    "load_model": "itk_gradicon.models",
    "apply_transforms_to_points": "itk_gradicon.commands.points",
    "GradiconError": "itk_gradicon.errors",
}

__all__ = ["__version__", *_LAZY]

#: Former module names (before the subpackages; kept for one release) -> the module's home now.
MOVED = {
    "outputs": "io.outputs", "imageio": "io.images", "itk_bridge": "io.itk_bridge",
    "transform_specs": "io.transform_specs", "simpleitk_transforms": "io.transform_files", "tables": "io.tables",
    "grid": "io.grid", "geometry": "spatial.frames", "transforms": "spatial.transforms",
    "resample": "spatial.resample", "jacobian": "spatial.jacobian", "options": "pipeline.options",
    "preprocess": "pipeline.preprocess", "affine": "pipeline.affine", "elastix": "pipeline.elastix",
    "instance": "pipeline.instance", "refinement": "pipeline.refinement", "losses": "pipeline.losses",
    "metrics": "evaluation.metrics", "qc": "evaluation.qc", "provenance": "evaluation.provenance",
    "registration_io": "commands.register", "batch": "commands.batch", "files": "commands.files",
    "points": "commands.points",
}


class _FormerName:
    """Imports ``itk_gradicon.<former name>`` as the module at its new home (the same object, so that
    ``monkeypatch`` and ``isinstance`` see one module): a meta-path finder and its loader (the protocol of
    ``importlib.abc.MetaPathFinder`` and ``Loader``, without importing ``importlib.abc``: 7 ms)."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.partition(".")
        if package != __name__ or name not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def __init__(self) -> None:
        self._specs = {}

    def create_module(self, spec):
        module = importlib.import_module(f"{__name__}.{MOVED[spec.name.partition('.')[2]]}")
        self._specs[spec.name] = module.__spec__  # the import system sets the former name's spec on it next
        return module

    def exec_module(self, module) -> None:
        """The module ran at its new home: only its own spec is given back to it."""
        module.__spec__ = self._specs.pop(module.__spec__.name, module.__spec__)


if not any(isinstance(finder, _FormerName) for finder in sys.meta_path):
    sys.meta_path.append(_FormerName())


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'itk_gradicon' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
