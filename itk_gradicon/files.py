"""The file commands as library functions: warp an image or a label map, a transform's Jacobian, an
evaluation, from files to files, through SimpleITK.

``gradicon apply-transform``, ``warp-labels``, ``jacobian`` and ``evaluate`` are these functions; they
are usable from Python as they are::

    from itk_gradicon.files import apply_transform_file
    apply_transform_file("moving.nii.gz", "fixed.nii.gz", ["moving_to_fixed.h5"], "warped.nii.gz")

Why SimpleITK: it and ITK Python run the same ITK C++ filters (ITK 5.4's
``ResampleImageFilter``, interpolators, transforms, NIfTI and HDF5 readers and writers), so the values
are the same to the bit (``tests/test_files.py`` compares every interpolation and transform kind with
the ITK Python functions of :mod:`itk_gradicon.resample` and :mod:`itk_gradicon.jacobian`). But
SimpleITK is one library that loads in a fraction of a second, where ITK Python loads its wrapped
modules one by one (reading one HDF5 transform loads the modules of every filter the displacement-field
module depends on). ``itk.Image`` objects given to the library functions are converted at the edge
(:func:`from_itk`).

Conventions are those of the ITK Python functions: transforms map reference (fixed) points to input
(moving) points and compose as ``antsApplyTransforms -t`` (see :mod:`itk_gradicon.transform_specs`);
outputs are written all-or-nothing through :class:`~itk_gradicon.imageio.OutputTransaction`.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from .errors import InputError
from .grid import ImageGrid
from .imageio import (IMAGE_SUFFIXES, ImageHeader, OutputTransaction, _is_simpleitk, check_output_path,
                      check_resample_headers, image_array, read_image_header, read_simpleitk_image)
from .resample import (INTERPOLATIONS, check_default_value, check_interpolation, check_label_values, check_scalar,
                       resample_label_array, with_dtype)
from .outputs import PathLike
from .simpleitk_transforms import field_transform, read_field_transform, read_transform_file, transform_parts
from .transform_specs import TransformSpec, elastix_field_path, inverse_hint, transform_file_kind

TransformName = Union[str, Path, TransformSpec]


def _sitk():
    import SimpleITK as sitk  # imported on first use: importing the package stays instant

    return sitk


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def read_header(path: PathLike, *, what: str = "image") -> ImageHeader:
    """An image file's header (dimension, size, components, geometry) without its pixels: the one header
    reader, :func:`itk_gradicon.imageio.read_image_header`.

    Raises:
        InputError: the file is missing, unreadable, or not an image ITK recognises.
    """
    return read_image_header(path, what=what)


def _dimension(transform) -> int:
    return int(transform.GetDimension())


def read_transform(spec: TransformName, *, dimension: Optional[int] = None):
    """One transform a user names (``FILE`` or ``[FILE,1]``), as a SimpleITK transform.

    Accepts what :func:`itk_gradicon.transforms.read_transform` accepts, with the same errors.
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
    :func:`itk_gradicon.transforms.compose_transforms`)."""
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


# --------------------------------------------------------------------------------------------
# Sampling and resampling
# --------------------------------------------------------------------------------------------

def _blank(grid: ImageGrid):
    """A one-byte image carrying ``grid`` (the reference of filters that read only the geometry)."""
    sitk = _sitk()
    image = sitk.Image([int(s) for s in grid.size], sitk.sitkUInt8)
    grid.apply_to(image)
    return image


def sample_displacement(transform, grid: ImageGrid) -> np.ndarray:
    """``T(p) - p`` at every voxel centre of ``grid`` (``grid.array_shape + (d,)``, float64, LPS mm).

    A single displacement field already on ``grid`` is returned exactly; anything else is evaluated by
    ITK's ``TransformToDisplacementFieldFilter`` in float32, as
    :func:`itk_gradicon.transforms.sample_transform` does.
    """
    sitk = _sitk()
    parts = transform_parts(transform)
    if len(parts) == 1 and parts[0].GetName() == "DisplacementFieldTransform":
        field = parts[0].GetDisplacementField()
        if ImageGrid.from_image(field).matches(grid, tolerance=1e-6):
            return np.array(sitk.GetArrayViewFromImage(field), dtype=np.float64)
    sampler = sitk.TransformToDisplacementFieldFilter()
    sampler.SetOutputPixelType(sitk.sitkVectorFloat32)
    sampler.SetReferenceImage(_blank(grid))
    sampled = sampler.Execute(transform)
    return np.array(sitk.GetArrayViewFromImage(sampled), dtype=np.float64)


#: numpy dtypes that ITK Python resamples in their own type with nearest-neighbour interpolation (the
#: rest goes through float64): the same choice, so that both give the same values.
_NEAREST_NATIVE = {np.dtype(np.uint8), np.dtype(np.int16), np.dtype(np.uint16), np.dtype(np.float32),
                   np.dtype(np.float64)}


def resample_image(image, reference, transform, *, interpolation: str = "linear", default_value: float = 0.0):
    """``image`` resampled onto ``reference``'s grid (``SimpleITK`` objects); the rules and values of
    :func:`itk_gradicon.resample.resample_image`."""
    sitk = _sitk()
    check_interpolation(interpolation)
    check_scalar(image, "the image to resample")
    dtype = image_array(image).dtype
    default_value = check_default_value(default_value, dtype)
    if interpolation == "label":
        return resample_labels(image, reference, transform, default_value=default_value)
    if interpolation == "nearest":
        work = image if dtype in _NEAREST_NATIVE else sitk.Cast(image, sitk.sitkFloat64)
        interpolator = sitk.sitkNearestNeighbor
    else:
        low_precision = dtype == np.float32 or (np.issubdtype(dtype, np.integer) and dtype.itemsize <= 2)
        pixel = sitk.sitkFloat32 if interpolation == "linear" and low_precision else sitk.sitkFloat64
        work = sitk.Cast(image, pixel)
        interpolator = sitk.sitkBSpline3 if interpolation == "bspline" else sitk.sitkLinear
    integer_work = np.issubdtype(image_array(work).dtype, np.integer)
    out = sitk.Resample(work, reference, transform, interpolator,
                        float(int(default_value)) if integer_work else default_value, work.GetPixelID())
    return with_dtype(out, dtype)


def resample_labels(labels, reference, transform, *, default_value: float = 0.0,
                    displacement: Optional[np.ndarray] = None):
    """Label-preserving resampling (ANTs' ``GenericLabel``) of ``SimpleITK`` objects; the rules and
    values of :func:`itk_gradicon.resample.resample_labels`. ``displacement``: the transform already
    sampled on ``reference``'s grid (:func:`sample_displacement`), if the caller has it."""
    sitk = _sitk()
    check_scalar(labels, "the label map to resample")
    array = np.asarray(image_array(labels))
    check_label_values(array, "the label map to resample")
    default_value = check_default_value(default_value, array.dtype)
    out_grid = ImageGrid.from_image(reference)
    if displacement is None:
        displacement = sample_displacement(transform, out_grid)
    out = resample_label_array(array, ImageGrid.from_image(labels), out_grid, displacement, default_value)
    image = sitk.GetImageFromArray(out)
    out_grid.apply_to(image)
    return image


def from_itk(image):
    """An ``itk.Image`` (scalar or vector) as a ``SimpleITK.Image``: the same voxels (copied) and grid.
    A ``SimpleITK.Image`` is returned as it is."""
    if _is_simpleitk(image):
        return image
    import itk

    sitk = _sitk()
    vector = image.GetNumberOfComponentsPerPixel() > 1
    out = sitk.GetImageFromArray(np.array(itk.array_view_from_image(image)), isVector=vector)
    ImageGrid.from_image(image).apply_to(out)
    return out


def write_warped(moving, fixed, field, path: Path) -> None:
    """``moving`` resampled onto ``fixed``'s grid through a forward field, linear, written at ``path``:
    the ``--out-warped`` image of ``gradicon register`` (``itk.Image`` inputs are converted)."""
    _write(resample_image(from_itk(moving), from_itk(fixed), field_transform(field), interpolation="linear"), path)


def _write(image, path: Path) -> None:
    _sitk().WriteImage(image, str(path), useCompression=True)


# --------------------------------------------------------------------------------------------
# The commands
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WarpSummary:
    """What :func:`apply_transform_file` did: the output, and for label maps the labels kept and lost."""

    output: Path
    labels_in: Optional[List] = None
    labels_out: Optional[List] = None

    @property
    def lost_labels(self) -> List:
        return sorted(set(self.labels_in or ()) - set(self.labels_out or ()))


def apply_transform_file(input_path: PathLike, reference_path: PathLike, transforms: Sequence[TransformName],
                         output: PathLike, *, interpolation: str = "linear", default_value: float = 0.0,
                         labels: bool = False) -> WarpSummary:
    """Resample an image file onto a reference grid through transforms; write the result (all or nothing).

    Args:
        input_path: the image to resample (its pixel type is kept).
        reference_path: the image whose grid the output gets.
        transforms: ``FILE`` / ``[FILE,1]`` names, composed as ``antsApplyTransforms -t``.
        output: the output image file.
        interpolation: one of :data:`~itk_gradicon.resample.INTERPOLATIONS`.
        default_value: value of voxels whose sample point falls outside the input.
        labels: warp a label map (``label`` interpolation; values must be integers).

    Returns:
        A :class:`WarpSummary` (the label sets for ``label`` interpolation).

    Raises:
        InputError: for every user mistake, before anything is written.
    """
    # everything that headers and transform files can tell is checked before any pixel is read
    check_interpolation(interpolation)
    if labels:
        interpolation = "label"
    output = check_output_path(output, what="--output", suffixes=IMAGE_SUFFIXES)
    input_header = read_header(input_path, what="--input")
    reference_header = read_header(reference_path, what="--reference")
    check_resample_headers(input_header, reference_header)
    transform = compose_transforms(list(transforms), dimension=reference_header.dimension)
    image = read_simpleitk_image(input_path, "--input")
    reference = read_simpleitk_image(reference_path, "--reference")
    if labels:
        warped = resample_labels(image, reference, transform, default_value=default_value)
    else:
        warped = resample_image(image, reference, transform, interpolation=interpolation,
                                default_value=default_value)
    with OutputTransaction() as out:
        _write(warped, out.path(output))
    if interpolation != "label":
        return WarpSummary(output)
    return WarpSummary(output, np.unique(image_array(image)).tolist(), np.unique(image_array(warped)).tolist())


def jacobian_file(transforms: Sequence[TransformName], *, reference: Optional[PathLike] = None,
                  output: Optional[PathLike] = None, summary_json: Optional[PathLike] = None,
                  log: bool = False) -> Dict[str, object]:
    """Jacobian determinant of composed transforms on a grid; optionally written as an image and JSON.

    Args:
        transforms: ``FILE`` / ``[FILE,1]`` names (fixed -> moving), composed as ``antsApplyTransforms``.
        reference: the image whose grid is used; default: the grid of the first displacement field.
        output: determinant image (float32), or its clamped log with ``log``.
        summary_json: also write the summary there.
        log: write ``log(max(det, 0.001))`` instead of ``det``.

    Returns:
        The summary: ``{"transforms": [...], **jacobian_summary}``.
    """
    from .jacobian import determinant_of_displacement, jacobian_summary, log_jacobian

    sitk = _sitk()
    if output is not None:
        output = check_output_path(output, what="--output", suffixes=IMAGE_SUFFIXES)
    if summary_json is not None:
        summary_json = check_output_path(summary_json, what="--summary-json", suffixes=(".json",))
    if output is not None and summary_json is not None and output == summary_json:
        raise InputError("--output and --summary-json name the same file")
    if reference is not None:
        grid = ImageGrid.from_image(read_simpleitk_image(reference, "--reference"))
        transform = compose_transforms(list(transforms), dimension=grid.dimension)
    else:
        transform = compose_transforms(list(transforms))
        grid = first_field_grid(transform)
        if grid is None:
            raise InputError("no displacement field among the transforms to take the grid from; give "
                             "--reference (the fixed image)")
    det = determinant_of_displacement(sample_displacement(transform, grid), grid)
    summary = {"transforms": [str(t) for t in transforms], **jacobian_summary(det)}
    with OutputTransaction() as out:
        if output is not None:
            values = log_jacobian(det) if log else det
            image = sitk.GetImageFromArray(np.ascontiguousarray(values, dtype=np.float32))
            grid.apply_to(image)
            _write(image, out.path(output))
        if summary_json is not None:
            out.path(summary_json).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def evaluate_files(transforms: Sequence[TransformName] = (), *, fixed_labels: Optional[PathLike] = None,
                   moving_labels: Optional[PathLike] = None, label_values: Optional[Sequence[int]] = None,
                   hd95: bool = True, fixed_landmarks: Optional[PathLike] = None,
                   moving_landmarks: Optional[PathLike] = None, reference: Optional[PathLike] = None,
                   output_json: Optional[PathLike] = None) -> Dict[str, object]:
    """Measure a registration from files: label overlap, landmark error and folding (``gradicon evaluate``).

    Args:
        transforms: forward transforms (fixed -> moving), composed as ``antsApplyTransforms``; none: identity.
        fixed_labels, moving_labels: label maps; the moving one is warped onto the fixed grid (GenericLabel).
        label_values: labels to evaluate (default: every non-zero label in either map).
        hd95: also compute HD95 (mm).
        fixed_landmarks, moving_landmarks: corresponding points (see :func:`itk_gradicon.metrics.read_landmarks`).
        reference: the fixed image: grid of the Jacobian and of ``index`` landmarks.
        output_json: also write the report there.

    Returns:
        The report: ``transforms``, and ``labels``, ``landmarks``, ``jacobian`` where their inputs are given.
    """
    from .jacobian import determinant_of_displacement, jacobian_summary
    from .metrics import label_overlap, read_landmarks, target_registration_error

    _check_evaluate_options(transforms, fixed_labels, moving_labels, label_values, fixed_landmarks, moving_landmarks)
    if output_json is not None:
        output_json = check_output_path(output_json, what="--output-json", suffixes=(".json",))
    fixed_lab = read_simpleitk_image(fixed_labels, "--fixed-labels") if fixed_labels is not None else None
    moving_lab = read_simpleitk_image(moving_labels, "--moving-labels") if moving_labels is not None else None
    reference_image = read_simpleitk_image(reference, "--reference") if reference is not None else fixed_lab
    transform, grid = _evaluated_transform(transforms, reference_image, fixed_lab, moving_lab)
    labels_grid = ImageGrid.from_image(fixed_lab) if fixed_lab is not None else None
    displacement = sample_displacement(transform, grid) if transform is not None else None
    report: Dict[str, object] = {"transforms": [str(t) for t in transforms]}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradicon-jacobian") as pool:
        # the Jacobian (numpy on one core) runs beside the label work (SimpleITK and numpy on the others)
        folding = (pool.submit(lambda: jacobian_summary(determinant_of_displacement(displacement, grid)))
                   if transform is not None else None)
        if fixed_lab is not None:
            compared = moving_lab
            if transform is not None:
                compared = resample_labels(moving_lab, fixed_lab, transform,
                                           displacement=displacement if labels_grid == grid else None)
            report["labels"] = label_overlap(fixed_lab, compared, label_values=list(label_values or ()) or None,
                                             with_hd95=hd95)
        if fixed_landmarks is not None:
            moving_grid = ImageGrid.from_image(moving_lab) if moving_lab is not None else None
            report["landmarks"] = target_registration_error(
                read_landmarks(fixed_landmarks, grid=grid), read_landmarks(moving_landmarks, grid=moving_grid),
                transform)
        if folding is not None:
            report["jacobian"] = folding.result()
    if output_json is not None:
        with OutputTransaction() as out:
            out.path(output_json).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _check_evaluate_options(transforms, fixed_labels, moving_labels, label_values, fixed_landmarks,
                            moving_landmarks) -> None:
    if (fixed_labels is None) != (moving_labels is None):
        raise InputError("--fixed-labels and --moving-labels must be given together")
    if (fixed_landmarks is None) != (moving_landmarks is None):
        raise InputError("--fixed-landmarks and --moving-landmarks must be given together")
    if fixed_labels is None and fixed_landmarks is None and not transforms:
        raise InputError("nothing to evaluate: give --fixed-labels/--moving-labels, "
                         "--fixed-landmarks/--moving-landmarks, or --transform (folding)")
    if label_values and fixed_labels is None:
        raise InputError("--label needs --fixed-labels and --moving-labels")


def _evaluated_transform(transforms, reference_image, fixed_lab, moving_lab):
    """``(transform, grid)``: the composed transforms (``None`` without any) and the grid of the Jacobian
    (the reference image's, else the fixed labels', else the first displacement field's)."""
    dimensions = {int(image.GetDimension()) for image in (reference_image, fixed_lab, moving_lab)
                  if image is not None}
    if len(dimensions) > 1:
        raise InputError("the images given are not all of one dimension")
    dimension = dimensions.pop() if dimensions else None
    transform = compose_transforms(list(transforms), dimension=dimension) if transforms else None
    grid = ImageGrid.from_image(reference_image) if reference_image is not None else None
    if grid is None and transform is not None:
        grid = first_field_grid(transform)
    if transform is not None and grid is None:
        raise InputError("the Jacobian needs a grid: give --reference (the fixed image) or "
                         "--fixed-labels, or a displacement field among the transforms")
    return transform, grid


#: :func:`itk_gradicon.imageio.read_simpleitk_image` under the name the file commands have always used.
read_image = read_simpleitk_image

__all__ = ["INTERPOLATIONS", "WarpSummary", "apply_transform_file", "compose_transforms", "evaluate_files",
           "first_field_grid", "jacobian_file", "read_header", "read_image", "read_transform",
           "resample_image", "resample_labels", "sample_displacement"]
