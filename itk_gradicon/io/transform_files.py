"""The one transform reader: ITK/ANTs transform files and displacement fields as SimpleITK transforms.

Everything that reads a transform goes through here: the file commands (:mod:`itk_gradicon.commands.files`),
affine files (:mod:`itk_gradicon.spatial.transforms`), landmarks, and the ITK Python functions
:func:`itk_gradicon.spatial.transforms.read_transform` /
:func:`~itk_gradicon.spatial.transforms.compose_transforms`, which
hand the result over through :mod:`itk_gradicon.io.itk_bridge`. Here: one file's transforms (several in one
text file or composite .h5 come back as one ``CompositeTransform``), a composite's parts in ITK queue order,
a displacement-field image or a :class:`~itk_gradicon.spatial.transforms.DisplacementField` as a
``DisplacementFieldTransform``, a transform a user names (``FILE`` / ``[FILE,1]``), several composed as
``antsApplyTransforms -t`` does, and a transform sampled on a grid.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import InputError
from .grid import ImageGrid, apply_affine
from .images import read_simpleitk_image
from .itk_bridge import transform_parts
from .transform_specs import (TransformSpec, check_field_components, elastix_field_path, inverse_hint,
                              transform_file_kind)


def _sitk():
    import SimpleITK as sitk  # imported on first use: importing the package stays instant

    return sitk


def read_field_transform(path: Path):
    """A displacement-field image (LPS mm vectors, one component per axis) as a
    ``SimpleITK.DisplacementFieldTransform``."""
    sitk = _sitk()
    image = read_simpleitk_image(path, "displacement field")
    check_field_components(path, int(image.GetDimension()), int(image.GetNumberOfComponentsPerPixel()))
    ImageGrid.from_image(image)  # the geometry checks of the ITK reader
    return sitk.DisplacementFieldTransform(sitk.Cast(image, sitk.sitkVectorFloat64))


def read_transform_file(path: Path):
    """Every transform of an ITK/ANTs transform file; several (a text file listing more than one, or a
    composite .h5) come back as one ``CompositeTransform`` that applies the last listed first, as ITK
    composes them."""
    sitk = _sitk()
    try:
        chunks = _text_transforms(path)
        if len(chunks) > 1:  # SimpleITK reads only the first transform of such a file (with a warning)
            return sitk.CompositeTransform([_read_text_transform(chunk, path.suffix) for chunk in chunks])
        return sitk.ReadTransform(str(path))
    except RuntimeError as err:
        raise InputError(f"'{path}' could not be read as an ITK/ANTs transform file (.h5, .tfm, .txt, "
                         ".mat): it is not a transform, or it is damaged") from err


_TEXT_HEADER = "#Insight Transform File"


def _text_transforms(path: Path) -> List[str]:
    """The transforms of an ITK text transform file (``.tfm``/``.txt``), each as a file of its own;
    ``[]`` for any other file."""
    if path.suffix.lower() not in (".tfm", ".txt"):
        return []
    try:
        text = path.read_text(encoding="ascii")
    except (UnicodeDecodeError, OSError):
        return []
    lines = text.splitlines()
    if not lines or not lines[0].startswith(_TEXT_HEADER):
        return []
    starts = [i for i, line in enumerate(lines) if line.startswith("#Transform ")]
    ends = starts[1:] + [len(lines)]
    return ["\n".join([lines[0], *lines[a:b]]) + "\n" for a, b in zip(starts, ends)]


def _read_text_transform(chunk: str, suffix: str):
    with tempfile.TemporaryDirectory(prefix="gradicon-tfm-") as folder:
        single = Path(folder) / f"transform{suffix}"
        single.write_text(chunk, encoding="ascii")
        return _sitk().ReadTransform(str(single))


def field_transform(field) -> object:
    """A :class:`~itk_gradicon.spatial.transforms.DisplacementField` as a ``SimpleITK.DisplacementFieldTransform``
    (float64 vectors, linear interpolation between nodes: what ``field.to_transform()`` is in ITK Python)."""
    return _sitk().DisplacementFieldTransform(field.to_simpleitk_image())


class SharedFieldTransforms:
    """:func:`field_transform` for several writers of one registration's outputs (threads included): each field's
    transform is built once, on first use, and the same object returned to every caller, so that the ``.h5``, the
    warped image and the QC picture share one float64 copy of the field (3 x 8 bytes per fixed voxel: 2.4 GB for
    a 512 x 512 x 380 image) instead of building one each. Read-only use only: ITK's transform writers and
    resamplers do not change the transform. The transforms live as long as this object."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._made: Dict[int, list] = {}  # id(field) -> [field (keeps the id unique), its lock, its transform]

    def __call__(self, field) -> object:
        with self._lock:
            entry = self._made.setdefault(id(field), [field, threading.Lock(), None])
        with entry[1]:  # one build per field; other fields are built meanwhile
            if entry[2] is None:
                entry[2] = field_transform(field)
            return entry[2]


# --------------------------------------------------------------------------------------------
# A transform a user names, and several composed as antsApplyTransforms does
# --------------------------------------------------------------------------------------------

TransformName = Union[str, Path, TransformSpec]


def _dimension(transform) -> int:
    return int(transform.GetDimension())


def read_transform(spec: TransformName, *, dimension: Optional[int] = None):
    """One transform a user names (``FILE`` or ``[FILE,1]``), as a SimpleITK transform.

    Accepts what :func:`itk_gradicon.spatial.transforms.read_transform` accepts, with the same errors.
    """
    spec = TransformSpec.parse(spec)
    kind = transform_file_kind(spec.path)
    if kind == "field":
        transform = read_field_transform(spec.path)
    elif kind == "elastix":
        transform = read_field_transform(elastix_field_path(spec.path))
    else:
        transform = read_transform_file(spec.path)
    d = _dimension(transform)
    if dimension is not None and d != dimension:
        raise InputError(f"transform '{spec.path}' is {d}-D; the images here are {dimension}-D")
    if spec.invert:
        if not all(part.IsLinear() for part in transform_parts(transform)):
            raise InputError(f"cannot invert '{spec.path}' ([FILE,1]): it holds a displacement field, which "
                             f"neither ANTs nor gradicon inverts; {inverse_hint(spec.path)}")
        try:
            transform = transform.GetInverse()
        except RuntimeError:
            raise InputError(f"cannot invert '{spec.path}': its matrix is singular") from None
    return transform


def compose_transforms(specs: Sequence[TransformName], *, dimension: Optional[int] = None):
    """Several transforms composed as ``antsApplyTransforms -t T1 -t T2 ...``: a point ``x`` goes to
    ``Tn(...T1(x))``; a ``SimpleITK.CompositeTransform`` (see
    :func:`itk_gradicon.spatial.transforms.compose_transforms`)."""
    sitk = _sitk()
    if not specs:
        raise InputError("no transform given; give at least one transform file")
    transforms = []
    for spec in specs:
        transform = read_transform(spec, dimension=dimension)
        dimension = _dimension(transform)
        transforms.append(transform)
    composite = sitk.CompositeTransform(dimension)
    for transform in reversed(transforms):  # ITK applies the transform added last first
        for part in transform_parts(transform):
            composite.AddTransform(part)
    return composite


def first_field_grid(transform) -> Optional[ImageGrid]:
    """The grid of the displacement field nearest the fixed space in a composite, or ``None``."""
    for part in reversed(transform_parts(transform)):
        if part.GetName() == "DisplacementFieldTransform":
            return ImageGrid.from_image(part.GetDisplacementField())
    return None


#: Below this share of a grid's points inside a displacement field's domain the file commands warn: a field
#: is zero outside its domain (ITK, ANTs), so the points outside are silently not moved. A field written by
#: ``gradicon register`` or ANTs covers its fixed image's grid whole.
FIELD_COVERAGE_WARNING = 0.5


def field_coverage(transform, grid: ImageGrid, *, per_axis: int = 16) -> List[Tuple[float, ImageGrid]]:
    """For each displacement field in ``transform`` (a SimpleITK transform, composites in the order ITK
    applies them): the share of ``grid``'s points that reach it inside its domain (continuous index within
    ``[-0.5, n - 0.5]``, the points carried by the parts applied before it), and the field's grid.
    The points are a lattice of at most ``per_axis`` voxel centres along each axis of ``grid``."""
    axes = [np.unique(np.linspace(0, n - 1, min(n, per_axis)).round()) for n in grid.size]
    index = np.stack([a.ravel() for a in np.meshgrid(*axes, indexing="ij")], axis=-1)
    points = apply_affine(grid.index_to_world(), index)
    parts = list(reversed(transform_parts(transform)))
    is_field = [part.GetName() == "DisplacementFieldTransform" for part in parts]
    fields, found = sum(is_field), []
    for part, field in zip(parts, is_field):
        if field:
            field_grid = ImageGrid.from_image(part.GetDisplacementField())
            at = apply_affine(field_grid.world_to_index(), points)
            inside = np.all((at >= -0.5) & (at <= np.asarray(field_grid.size) - 0.5), axis=1)
            found.append((float(inside.mean()), field_grid))
        if len(found) == fields:
            break  # no field left to reach: the points need not go further
        points = np.array([part.TransformPoint([float(v) for v in p]) for p in points])
    return found


def describe_coverage(transform, grid: ImageGrid, names: Sequence[TransformName]) -> List[str]:
    """A warning for each displacement field of ``transform`` that covers less than
    :data:`FIELD_COVERAGE_WARNING` of ``grid`` (``names``: the files, to name a lone one)."""
    warnings = []
    for share, field_grid in field_coverage(transform, grid):
        if share >= FIELD_COVERAGE_WARNING:
            continue
        which = (f"the displacement field of '{TransformSpec.parse(names[0]).path}'" if len(names) == 1
                 else "a displacement field among the transforms")
        warnings.append(f"{which} covers {100 * share:.0f} % of the reference grid; points outside the field are "
                        f"not moved (field: {_extent(field_grid)}; reference: {_extent(grid)}). Check that the "
                        "transform belongs to this reference: a forward transform covers its fixed image's grid")
    return warnings


def _extent(grid: ImageGrid) -> str:
    return (f"size {tuple(grid.size)}, spacing {tuple(round(s, 4) for s in grid.spacing)}, "
            f"origin {tuple(round(o, 1) for o in grid.origin)}")


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------

def _blank(grid: ImageGrid):
    """A one-byte image carrying ``grid`` (the reference of filters that read only the geometry)."""
    sitk = _sitk()
    image = sitk.Image([int(s) for s in grid.size], sitk.sitkUInt8)
    grid.apply_to(image)
    return image


def sample_displacement(transform, grid: ImageGrid, *, double: bool = False) -> np.ndarray:
    """``T(p) - p`` at every voxel centre of ``grid`` (``grid.array_shape + (d,)``, float64, LPS mm).

    A single displacement field already on ``grid`` is returned exactly; anything else is evaluated by
    ITK's ``TransformToDisplacementFieldFilter`` in float32 (``double``: in float64), as
    :func:`itk_gradicon.spatial.transforms.sample_transform` does.
    """
    sitk = _sitk()
    parts = transform_parts(transform)
    if len(parts) == 1 and parts[0].GetName() == "DisplacementFieldTransform":
        field = parts[0].GetDisplacementField()
        if ImageGrid.from_image(field).matches(grid, tolerance=1e-6):
            return np.array(sitk.GetArrayViewFromImage(field), dtype=np.float64)
    sampler = sitk.TransformToDisplacementFieldFilter()
    sampler.SetOutputPixelType(sitk.sitkVectorFloat64 if double else sitk.sitkVectorFloat32)
    sampler.SetReferenceImage(_blank(grid))
    sampled = sampler.Execute(transform)
    return np.array(sitk.GetArrayViewFromImage(sampled), dtype=np.float64)


__all__ = ["FIELD_COVERAGE_WARNING", "SharedFieldTransforms", "TransformName", "compose_transforms",
           "describe_coverage", "field_coverage", "field_transform", "first_field_grid", "read_field_transform",
           "read_transform", "read_transform_file", "sample_displacement", "transform_parts"]
