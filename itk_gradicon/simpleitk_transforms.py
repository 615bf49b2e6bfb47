"""ITK/ANTs transform files and displacement fields as SimpleITK transforms.

The readers under :mod:`itk_gradicon.files` (the file commands) and :mod:`itk_gradicon.transforms`
(affine files) share these: one file's transforms (several in one text file or composite .h5 come back
as one ``CompositeTransform``), a composite's parts in ITK queue order, a displacement-field image or a
:class:`~itk_gradicon.transforms.DisplacementField` as a ``DisplacementFieldTransform``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import List

from .errors import InputError
from .grid import ImageGrid
from .imageio import read_simpleitk_image
from .transform_specs import check_field_components


def _sitk():
    import SimpleITK as sitk  # imported on first use: importing the package stays instant

    return sitk


def transform_parts(transform) -> List:
    """A transform's parts in ITK queue order (nested composites flattened), each as its own class."""
    transform = transform.Downcast()
    if transform.GetName() == "CompositeTransform":
        parts = []
        for i in range(transform.GetNumberOfTransforms()):
            parts += transform_parts(transform.GetNthTransform(i))
        return parts
    return [transform]


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
    """A :class:`~itk_gradicon.transforms.DisplacementField` as a ``SimpleITK.DisplacementFieldTransform``
    (float64 vectors, linear interpolation between nodes: what ``field.to_transform()`` is in ITK Python)."""
    return _sitk().DisplacementFieldTransform(field.to_simpleitk_image())


__all__ = ["field_transform", "read_field_transform", "read_transform_file", "transform_parts"]
