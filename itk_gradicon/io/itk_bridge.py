"""The one door to ITK Python: ``itk.Image`` objects and ITK transforms to and from SimpleITK.

Inside the package images are ``SimpleITK.Image`` and transforms are SimpleITK transforms: the same
ITK C++ readers, filters and transforms as ITK Python, in one library that loads in a fraction of a
second. Users of ITK Python hand ``itk.Image`` objects and ITK transforms to the public functions
(:func:`itk_gradicon.register`, :func:`itk_gradicon.spatial.resample.resample_image`, ...) and get ITK objects
back; those functions convert here, once, on the way in and on the way out.

Conversions are exact: voxels are copied in their pixel type, origin, spacing and direction as doubles,
and a transform keeps its class and its parameters (a displacement field its float64 vectors), so a
result does not depend on the library the caller used.

This module imports nothing of the package but :mod:`itk_gradicon.io.outputs` (for the HDF5 lock) and
:mod:`itk_gradicon.io.grid` (numpy only), so that every other module may use it; ITK Python itself is
imported on first use (it costs seconds). It is the one module that asks which library an object belongs to.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any, List, Sequence, Tuple

import numpy as np

from .grid import ImageGrid
from .outputs import TRANSFORM_WRITE_LOCK


def _itk():
    import itk  # imported on first use: importing itk costs seconds

    return itk


def _sitk():
    import SimpleITK as sitk  # imported on first use: importing the package stays instant

    return sitk


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

def is_simpleitk(obj: Any) -> bool:
    """Whether ``obj`` is a SimpleITK object (an image or a transform)."""
    return type(obj).__module__.startswith("SimpleITK")


def is_itk_image(obj: Any) -> bool:
    """Whether ``obj`` is an ``itk.Image`` (or another ITK Python image class)."""
    return not is_simpleitk(obj) and hasattr(obj, "GetImageDimension") and hasattr(obj, "GetLargestPossibleRegion")


def itk_geometry(image) -> Tuple[Tuple[int, ...], Tuple[float, ...], Tuple[float, ...], np.ndarray]:
    """``(size, spacing, origin, direction)`` of an ``itk.Image``: index order, doubles, ``d x d`` matrix."""
    d = int(image.GetImageDimension())
    direction = _itk().array_from_matrix(image.GetDirection()).astype(np.float64).reshape(d, d)
    size = tuple(int(s) for s in image.GetLargestPossibleRegion().GetSize())
    return size, tuple(float(s) for s in image.GetSpacing()), tuple(float(s) for s in image.GetOrigin()), direction


def grid_of(image) -> ImageGrid:
    """The grid of an ``itk.Image`` or a ``SimpleITK.Image`` (validated): for callers that hold either."""
    if is_simpleitk(image):
        return ImageGrid.from_image(image)
    return ImageGrid.from_geometry(*itk_geometry(image))


def set_itk_geometry(image, spacing: Sequence[float], origin: Sequence[float], direction: np.ndarray) -> None:
    """Give an ``itk.Image`` a spacing, an origin and a direction matrix."""
    image.SetOrigin([float(v) for v in origin])
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection(_itk().matrix_from_array(np.array(direction, dtype=np.float64)))


def itk_array(image) -> np.ndarray:
    """A numpy view (ARRAY order) of an ``itk.Image``'s voxels."""
    return _itk().array_view_from_image(image)


def _sitk_geometry(image) -> Tuple[Tuple[float, ...], Tuple[float, ...], np.ndarray]:
    d = int(image.GetDimension())
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(d, d)
    return tuple(image.GetSpacing()), tuple(image.GetOrigin()), direction


def to_simpleitk(image):
    """A ``SimpleITK.Image`` with the voxels (copied, same pixel type) and grid of an ``itk.Image``;
    a ``SimpleITK.Image`` (or ``None``) as it is."""
    if image is None or is_simpleitk(image):
        return image
    sitk = _sitk()
    out = sitk.GetImageFromArray(np.array(itk_array(image)), isVector=int(image.GetNumberOfComponentsPerPixel()) > 1)
    _, spacing, origin, direction = itk_geometry(image)
    _set_sitk_geometry(out, spacing, origin, direction)
    return out


def _set_sitk_geometry(image, spacing: Sequence[float], origin: Sequence[float], direction: np.ndarray) -> None:
    image.SetOrigin([float(v) for v in origin])
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection([float(v) for v in np.asarray(direction, dtype=np.float64).reshape(-1)])


def to_itk(image):
    """An ``itk.Image`` with the voxels (copied, same pixel type) and grid of a ``SimpleITK.Image``;
    an ITK image (or ``None``) as it is."""
    if image is None or not is_simpleitk(image):
        return image
    sitk = _sitk()
    out = _itk().image_from_array(np.array(sitk.GetArrayViewFromImage(image)),
                                  is_vector=int(image.GetNumberOfComponentsPerPixel()) > 1)
    set_itk_geometry(out, *_sitk_geometry(image))
    return out


def cast_image(image, pixel_type):
    """An ``itk.Image`` cast to another scalar pixel type (``itk.F``, ``itk.UC`` ...), same geometry."""
    itk = _itk()
    target = itk.Image[pixel_type, int(image.GetImageDimension())]
    if type(image) is target:
        return image
    return itk.cast_image_filter(image, ttype=(type(image), target))


def like_input(image, given):
    """``image`` (SimpleITK) in the library of ``given``: converted to ``itk.Image`` when ``given`` is one."""
    return image if given is None or is_simpleitk(given) else to_itk(image)


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------

def transform_parts(transform) -> List:
    """A transform's parts in ITK queue order (nested composites flattened), each as its own class; for
    SimpleITK and ITK Python transforms alike."""
    if is_simpleitk(transform):
        transform = transform.Downcast()
        name = transform.GetName()
    else:
        transform = _itk().down_cast(transform)  # parts come back typed as the Transform base class
        name = transform.GetNameOfClass()
    if name != "CompositeTransform":
        return [transform]
    return [part for i in range(transform.GetNumberOfTransforms())
            for part in transform_parts(transform.GetNthTransform(i))]


def itk_displacement_field_transform(vectors: np.ndarray, spacing: Sequence[float], origin: Sequence[float],
                                     direction: np.ndarray):
    """An ``itk.DisplacementFieldTransform[itk.D, d]`` holding ``vectors`` (ARRAY order, ``(..., d)``,
    WORLD mm) on the grid given by ``spacing``, ``origin`` and ``direction``."""
    d = int(vectors.shape[-1])
    image = _itk().image_from_array(np.ascontiguousarray(vectors, dtype=np.float64), is_vector=True)
    set_itk_geometry(image, spacing, origin, direction)
    transform = displacement_field_transform_type(d).New()
    transform.SetDisplacementField(image)
    return transform


# ITK's Python package loads its wrapping lazily, by module group: the first use of
# ``itk.DisplacementFieldTransform`` imports the whole ITKDisplacementField group and every group it
# depends on (smoothing, convolution, FFT, thresholding, ...). The class itself lives in one small
# wrapping module, imported directly where it exists.
def displacement_field_transform_type(dimension: int):
    """ITK's ``DisplacementFieldTransform[double, dimension]`` class (see the note above)."""
    try:
        from itk import itkDisplacementFieldTransformPython as wrapping
        return getattr(wrapping, f"itkDisplacementFieldTransformD{dimension}")
    except (ImportError, AttributeError):
        itk = _itk()
        return itk.DisplacementFieldTransform[itk.D, dimension]


def to_itk_transform(transform):
    """The ITK Python transform of a SimpleITK transform: the same class and parameters (a composite
    of the converted parts, in the same order; a displacement field with the same float64 vectors).
    An ITK transform is returned as it is."""
    if not is_simpleitk(transform):
        return transform
    parts = [_itk_part(part) for part in transform_parts(transform)]
    if len(parts) == 1 and transform.Downcast().GetName() != "CompositeTransform":
        return parts[0]
    itk = _itk()
    composite = itk.CompositeTransform[itk.D, int(transform.GetDimension())].New()
    for part in parts:
        composite.AddTransform(part)
    return composite


def _itk_part(part):
    """One SimpleITK transform (not a composite) as an ITK Python transform."""
    name = part.GetName()
    d = int(part.GetDimension())
    if name == "DisplacementFieldTransform":
        sitk = _sitk()
        field = part.GetDisplacementField()
        return itk_displacement_field_transform(sitk.GetArrayViewFromImage(field), *_sitk_geometry(field))
    made = _new_itk_transform(name, d)
    if made is None:
        return _through_file(part, to_itk=True)
    made.SetFixedParameters(_itk_parameters(part.GetFixedParameters()))
    made.SetParametersByValue(_itk_parameters(part.GetParameters()))
    return made


def _new_itk_transform(name: str, dimension: int):
    """A new ITK transform of class ``name`` in double precision, or ``None`` where ITK Python does not
    wrap it under that name."""
    itk = _itk()
    template = getattr(itk, name, None)
    if template is None or name == "BSplineTransform":  # B-splines: through a file (their order is a parameter)
        return None
    for arguments in ((itk.D, dimension), (itk.D,)):
        try:
            return template[arguments].New()
        except (KeyError, TypeError, AttributeError):
            continue
    return None


def _itk_parameters(values: Sequence[float]):
    itk = _itk()
    out = itk.OptimizerParameters[itk.D](len(values))
    for i, v in enumerate(values):
        out[i] = float(v)
    return out


def to_simpleitk_transform(transform):
    """The SimpleITK transform of an ITK Python transform, mapping every point exactly as it does:
    displacement fields keep their float64 vectors, matrix-offset transforms (affine, rigid, Euler, ANTs'
    ``MatrixOffsetTransformBase``) become an ``AffineTransform`` of the same matrix and offset, composites
    keep their order. A SimpleITK transform is returned as it is."""
    if transform is None or is_simpleitk(transform):
        return transform
    parts = [_sitk_part(part) for part in transform_parts(transform)]
    if len(parts) == 1 and _itk().down_cast(transform).GetNameOfClass() != "CompositeTransform":
        return parts[0]
    d = int(transform.GetInputSpaceDimension())
    return _sitk().CompositeTransform(parts) if parts else _sitk().CompositeTransform(d)


def _sitk_part(part):
    """One ITK Python transform (not a composite) as a SimpleITK transform."""
    sitk = _sitk()
    name = part.GetNameOfClass()
    d = int(part.GetInputSpaceDimension())
    if name == "DisplacementFieldTransform":
        field = part.GetDisplacementField()
        image = sitk.GetImageFromArray(np.array(itk_array(field), dtype=np.float64), isVector=True)
        _set_sitk_geometry(image, *itk_geometry(field)[1:])
        return sitk.DisplacementFieldTransform(image)
    if name == "IdentityTransform":
        return sitk.Transform(d, sitk.sitkIdentity)
    if name == "TranslationTransform":
        return sitk.TranslationTransform(d, [float(v) for v in part.GetOffset()])
    if hasattr(part, "GetMatrix") and hasattr(part, "GetOffset"):
        out = sitk.AffineTransform(d)
        out.SetMatrix([float(v) for v in affine_from_itk(part)[:d, :d].ravel()])
        out.SetTranslation([float(v) for v in part.GetOffset()])
        return out
    return _through_file(part, to_itk=False)


def _through_file(transform, *, to_itk: bool):
    """A transform of a class the two libraries name differently, converted through an HDF5 transform
    file (binary doubles: exact)."""
    with tempfile.TemporaryDirectory(prefix="gradicon-transform-") as folder:
        path = str(Path(folder) / "transform.h5")
        with TRANSFORM_WRITE_LOCK:
            if to_itk:
                _sitk().WriteTransform(transform, path)
            else:
                _itk().transformwrite([transform], path)
        if to_itk:
            read = list(_itk().transformread(path))
            return read[0]
        return _sitk().ReadTransform(path)


def write_compressed_transform(transform, path) -> None:
    """Write an ITK Python transform to an HDF5 transform file with deflate compression (an option only
    ITK Python's writer offers). The caller holds :data:`~itk_gradicon.io.outputs.TRANSFORM_WRITE_LOCK`."""
    writer_type = _hdf5_transform_writer_type()
    if writer_type is None:
        _itk().transformwrite([transform], str(path), compression=True)
        return
    writer = writer_type.New()
    writer.SetFileName(str(path))
    writer.SetInput(transform)
    writer.SetUseCompression(True)
    writer.Update()


@functools.lru_cache(maxsize=None)
def _hdf5_transform_writer_type():
    """``TransformFileWriterTemplate[double]`` with ITK's HDF5 transform IO registered (loaded from its two
    wrapping modules, not through ITK's lazy loader), or ``None``."""
    try:
        from itk import itkHDF5TransformIOPython, itkTransformFileWriterPython
    except ImportError:
        return None
    itkHDF5TransformIOPython.itkHDF5TransformIOFactory.RegisterOneFactory()
    return itkTransformFileWriterPython.itkTransformFileWriterTemplateD


def affine_to_itk(matrix: np.ndarray):
    """A homogeneous WORLD matrix as an ``itk.AffineTransform[itk.D, d]``."""
    itk = _itk()
    d = matrix.shape[0] - 1
    transform = itk.AffineTransform[itk.D, d].New()
    transform.SetMatrix(itk.matrix_from_array(np.ascontiguousarray(matrix[:d, :d], dtype=np.float64)))
    transform.SetTranslation([float(v) for v in matrix[:d, d]])
    return transform


def affine_from_itk(transform) -> np.ndarray:
    """The homogeneous WORLD matrix of an ITK matrix-offset transform (affine, rigid, Euler, ...)."""
    d = int(transform.GetInputSpaceDimension())
    m = np.eye(d + 1)
    m[:d, :d] = _itk().array_from_matrix(transform.GetMatrix())
    m[:d, d] = np.asarray(transform.GetOffset(), dtype=np.float64)
    return m


__all__ = ["affine_from_itk", "affine_to_itk", "cast_image", "displacement_field_transform_type", "is_itk_image",
           "is_simpleitk", "itk_array", "itk_displacement_field_transform", "itk_geometry",
           "like_input", "set_itk_geometry", "to_itk", "to_itk_transform", "to_simpleitk",
           "to_simpleitk_transform", "transform_parts", "write_compressed_transform"]
