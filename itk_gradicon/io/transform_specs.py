"""Naming and recognising transform files, without reading them (numpy-free, itk-free).

Shared by the readers built on ITK Python (:mod:`itk_gradicon.spatial.transforms`) and on SimpleITK
(:mod:`itk_gradicon.commands.files`), so that both accept the same names and say the same things.

A transform is named as in ANTs: ``FILE`` or ``[FILE,1]`` for its inverse (linear transforms only).
Files recognised (:func:`transform_file_kind`): ITK transform files ``.h5``/``.hdf5``/``.tfm``/``.txt``/
``.mat``/``.xfm`` (single or composite; ANTs' ``0GenericAffine.mat``), displacement-field images
(ANTs' ``Warp``/``InverseWarp``, this package's outputs) and transformix parameter files of a
deformation field (or the folder holding ``TransformParameters.0.txt``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Union

from ..errors import InputError
from .images import compound_suffix
from .outputs import PathLike


FIELD_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
TRANSFORM_FILE_SUFFIXES = (".h5", ".hdf5")
TRANSFORM_OUTPUT_SUFFIXES = TRANSFORM_FILE_SUFFIXES + FIELD_IMAGE_SUFFIXES

ELASTIX_PARAMETER_FILE = "TransformParameters.0.txt"
ELASTIX_FIELD_FILE = "deformation_field.nii.gz"


def ants_file_names(prefix: str) -> dict:
    """antsRegistration's output names for ``prefix``."""
    return {"affine": f"{prefix}0GenericAffine.mat", "warp": f"{prefix}1Warp.nii.gz",
            "inverse_warp": f"{prefix}1InverseWarp.nii.gz"}


#: ITK transform-file endings (``.txt`` may also be a transformix parameter file; see below).
ITK_TRANSFORM_SUFFIXES = (".h5", ".hdf5", ".tfm", ".txt", ".mat", ".xfm")
#: Every ending :func:`read_transform` accepts, besides a transformix folder.
TRANSFORM_INPUT_SUFFIXES = ITK_TRANSFORM_SUFFIXES + FIELD_IMAGE_SUFFIXES

_ANTS_SPEC = re.compile(r"\[\s*(?P<path>[^\[\]]+?)\s*,\s*(?P<flag>[01])\s*\]")


@dataclass(frozen=True)
class TransformSpec:
    """A transform as a user names it: a file, inverted or not (ANTs' ``[FILE,1]`` spelling).

    Attributes:
        path: the transform file (or a folder holding ``TransformParameters.0.txt``).
        invert: use the inverse; possible for linear transforms only.
    """

    path: Path
    invert: bool = False

    @classmethod
    def parse(cls, text: Union[str, Path, "TransformSpec"]) -> "TransformSpec":
        """``FILE``, ``[FILE,0]`` or ``[FILE,1]`` (spaces allowed around the parts).

        Args:
            text: what the user typed, a path, or an existing spec (returned as is).

        Returns:
            The spec.

        Raises:
            InputError: brackets that do not make ``[FILE,0]`` or ``[FILE,1]``.

        Example:
            >>> TransformSpec.parse("[out/subj_0GenericAffine.mat,1]").invert
            True
        """
        if isinstance(text, TransformSpec):
            return text
        raw = str(text).strip()
        match = _ANTS_SPEC.fullmatch(raw)
        if match:
            return cls(Path(match["path"]).expanduser(), match["flag"] == "1")
        if raw.startswith("[") or raw.endswith("]"):
            raise InputError(f"transform {raw!r} is not in ANTs' form: allowed are FILE, [FILE,0] "
                             "and [FILE,1] (the inverse)")
        if not raw:
            raise InputError("a transform was given as an empty string; name a transform file")
        return cls(Path(raw).expanduser())

    def __str__(self) -> str:
        return f"[{self.path},1]" if self.invert else str(self.path)


def transform_file_kind(path: PathLike) -> str:
    """What kind of transform ``path`` holds, from its name (and the first line of ``.txt`` files).

    Returns:
        ``"field"`` (a displacement-field image), ``"itk"`` (an ITK/ANTs transform file) or
        ``"elastix"`` (a transformix parameter file, or a folder holding ``TransformParameters.0.txt``).

    Raises:
        InputError: the file does not exist, or its ending is none of :data:`TRANSFORM_INPUT_SUFFIXES`.
    """
    path = Path(path)
    if path.is_dir():
        if (path / ELASTIX_PARAMETER_FILE).is_file():
            return "elastix"
        raise InputError(f"transform '{path}' is a folder without {ELASTIX_PARAMETER_FILE}; give a "
                         "transform file")
    if not path.exists():
        raise InputError(f"transform file '{path}' does not exist")
    suffix = compound_suffix(path)
    if suffix in FIELD_IMAGE_SUFFIXES:
        return "field"
    if suffix == ".txt" and _first_line(path).startswith("("):
        return "elastix"
    if suffix in ITK_TRANSFORM_SUFFIXES:
        return "itk"
    raise InputError(f"transform file '{path}' has the ending '{suffix or '(none)'}'; allowed: "
                     f"{', '.join(TRANSFORM_INPUT_SUFFIXES)} or a transformix folder")


def _first_line(path: Path) -> str:
    """The first line of a text file that is neither blank nor a ``//`` comment ('' if binary)."""
    try:
        with open(path, "r", encoding="utf-8", errors="strict") as fh:
            for _, line in zip(range(200), fh):
                line = line.strip()
                if line and not line.startswith("//"):
                    return line
    except (UnicodeDecodeError, OSError):
        return ""
    return ""


def read_elastix_parameters(path: PathLike) -> Dict[str, List[str]]:
    """Parse an elastix/transformix parameter file: ``(Key value ...)`` lines, ``//`` comments.

    Returns:
        ``{key: [values as strings, quotes removed]}``.
    """
    params: Dict[str, List[str]] = {}
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.split("//", 1)[0].strip()
        if not (line.startswith("(") and line.endswith(")")):
            continue
        parts = re.findall(r'"[^"]*"|[^\s"]+', line[1:-1])
        if parts:
            params[parts[0]] = [p.strip('"') for p in parts[1:]]
    return params


def elastix_field_path(path: Path) -> Path:
    """The displacement-field image named by a transformix ``DeformationFieldTransform`` parameter file
    (or the folder holding ``TransformParameters.0.txt``), after checking that nothing else is needed
    to read it (no initial transform, linear field interpolation)."""
    param_file = path / ELASTIX_PARAMETER_FILE if path.is_dir() else path
    params = read_elastix_parameters(param_file)
    kind = (params.get("Transform") or ["(none)"])[0]
    if kind != "DeformationFieldTransform":
        raise InputError(f"'{param_file}' is an elastix {kind} parameter file; only deformation-field "
                         "parameter files are read directly. Run 'transformix -def all -tp "
                         f"{param_file} -out DIR' and give DIR/deformationField.nii.gz instead")
    initial = (params.get("InitialTransformParametersFileName") or ["NoInitialTransform"])[0]
    if initial != "NoInitialTransform":
        raise InputError(f"'{param_file}' chains an initial transform ('{initial}'); give "
                         "'transformix -def all' output (deformationField.nii.gz) instead")
    order = (params.get("DeformationFieldInterpolationOrder") or ["0"])[0]
    if order != "1":
        raise InputError(f"'{param_file}' has DeformationFieldInterpolationOrder {order} (nearest "
                         "neighbour); only 1 (linear, as ITK and ANTs interpolate fields) is read")
    names = params.get("DeformationFieldFileName")
    if not names:
        raise InputError(f"'{param_file}' names no DeformationFieldFileName")
    field_path = Path(names[0])
    if not field_path.is_absolute():
        field_path = param_file.parent / field_path
    if not field_path.is_file():
        raise InputError(f"the deformation field '{field_path}' named in '{param_file}' does not exist")
    return field_path


def check_field_components(path: Path, dimension: int, components: int) -> None:
    """Refuse an image read as a displacement field whose voxels do not hold one component per axis."""
    if components != dimension:
        raise InputError(f"'{path}' is an image with {components} component(s) per voxel, not a "
                         f"displacement field (a {dimension}-D field has {dimension} components, LPS mm)")


def inverse_hint(path: Path) -> str:
    name = path.name
    if "InverseWarp" in name or name.startswith("Inverse"):
        return f"'{path}' itself is already an inverse; use the forward file written next to it"
    if "Warp" in name:
        return f"use '{path.with_name(name.replace('Warp', 'InverseWarp', 1))}' instead"
    if name.startswith("Composite"):
        return f"use '{path.with_name('Inverse' + name)}' instead"
    return ("use the inverse transform written with it instead (gradicon register "
            "--out-inverse-transform, or ANTs' ...InverseWarp.nii.gz)")
