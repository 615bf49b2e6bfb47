"""The file commands as library functions: warp an image or a label map, a transform's Jacobian, an
evaluation, from files to files, through SimpleITK.

``gradicon apply-transform``, ``warp-labels``, ``jacobian`` and ``evaluate`` are these functions; they
are usable from Python as they are::

    from itk_gradicon.commands.files import apply_transform_file
    apply_transform_file("moving.nii.gz", "fixed.nii.gz", ["moving_to_fixed.h5"], "warped.nii.gz")

Why SimpleITK: it and ITK Python run the same ITK C++ filters (ITK 5.4's
``ResampleImageFilter``, interpolators, transforms, NIfTI and HDF5 readers and writers), so the values
are the same to the bit (``tests/test_files.py`` compares every interpolation and transform kind with
the ITK Python functions of :mod:`itk_gradicon.spatial.resample` and :mod:`itk_gradicon.spatial.jacobian`). But
SimpleITK is one library that loads in a fraction of a second, where ITK Python loads its wrapped
modules one by one (reading one HDF5 transform loads the modules of every filter the displacement-field
module depends on). ``itk.Image`` objects given to the library functions are converted at the edge
(:func:`from_itk`).

Conventions are those of the ITK Python functions: transforms map reference (fixed) points to input
(moving) points and compose as ``antsApplyTransforms -t`` (see :mod:`itk_gradicon.io.transform_specs`);
outputs are written all-or-nothing through :class:`~itk_gradicon.io.images.OutputTransaction`.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError
from ..io.grid import ImageGrid
from ..io.images import (IMAGE_SUFFIXES, ImageHeader, OutputTransaction, check_output_path, check_resample_headers,
                         image_array, is_time_series, read_float32, read_image_header, read_mask_on_grid,
                         read_simpleitk_image)
from ..io.itk_bridge import to_simpleitk as from_itk  # noqa: F401  (its former name here)
from ..spatial.resample import (  # noqa: F401  (resample_image, resample_labels: the one resampler, re-exported)
    INTERPOLATIONS, check_interpolation, resample_image, resample_labels, resample_labels_on_grid, resample_simpleitk)
from ..io.outputs import PathLike
from ..io.transform_files import (  # noqa: F401  (re-exported: the transform reader's names, their former home)
    TransformName, compose_transforms, describe_coverage, field_transform, first_field_grid, read_transform,
    sample_displacement, transform_parts)


def _sitk():
    import SimpleITK as sitk  # imported on first use: importing the package stays instant

    return sitk


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def read_header(path: PathLike, *, what: str = "image") -> ImageHeader:
    """An image file's header (dimension, size, components, geometry) without its pixels: the one header
    reader, :func:`itk_gradicon.io.images.read_image_header`.

    Raises:
        InputError: the file is missing, unreadable, or not an image ITK recognises.
    """
    return read_image_header(path, what=what)


# --------------------------------------------------------------------------------------------
# Sampling and resampling
# --------------------------------------------------------------------------------------------

def write_warped(moving, fixed, field, path: Path, *, transform_of=field_transform) -> None:
    """``moving`` resampled onto ``fixed``'s grid through a forward field, linear, written at ``path``:
    the ``--out-warped`` image of ``gradicon register`` (``SimpleITK.Image`` inputs). ``transform_of`` builds
    the field's transform (:class:`~itk_gradicon.io.transform_files.SharedFieldTransforms` to share it)."""
    _write(resample_simpleitk(moving, fixed, transform_of(field), interpolation="linear"), path)


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
    warnings: Tuple[str, ...] = ()

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
        interpolation: one of :data:`~itk_gradicon.spatial.resample.INTERPOLATIONS`.
        default_value: value of voxels whose sample point falls outside the input.
        labels: warp a label map (``label`` interpolation; values must be integers).

    A 4-D input with a 3-D reference is a series of volumes (fMRI, DWI, a stack of maps): each volume is
    resampled as a 3-D input would be, and the output keeps the fourth axis (its size, spacing and origin),
    as ``antsApplyTransforms -e 3``.

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
    reference_grid = ImageGrid.from_image(reference)
    if is_time_series(input_header, reference_header):
        warped = _resample_series(image, reference, transform, interpolation, default_value)
    elif interpolation == "label":
        warped = resample_labels_on_grid(image, reference_grid, transform, default_value=default_value)
    else:
        warped = resample_simpleitk(image, reference, transform, interpolation=interpolation,
                                    default_value=default_value)
    warnings = tuple(describe_coverage(transform, reference_grid, list(transforms)))
    with OutputTransaction() as out:
        _write(warped, out.path(output))
    if interpolation != "label":
        return WarpSummary(output, warnings=warnings)
    return WarpSummary(output, np.unique(image_array(image)).tolist(), np.unique(image_array(warped)).tolist(),
                       warnings)


def _resample_series(series, reference, transform, interpolation: str, default_value: float):
    """Each 3-D volume of the 4-D ``series`` resampled onto ``reference`` as a 3-D input would be, joined
    along the series' fourth axis (its spacing and origin kept)."""
    sitk = _sitk()
    size = list(series.GetSize())
    grid = ImageGrid.from_image(reference)
    # the label interpolation samples the transform on the grid once for every volume
    displacement = sample_displacement(transform, grid) if interpolation == "label" else None
    volumes = []
    for index in range(size[3]):
        volume = sitk.Extract(series, size[:3] + [0], [0, 0, 0, index])
        if interpolation == "label":
            volumes.append(resample_labels_on_grid(volume, grid, transform, default_value=default_value,
                                                   displacement=displacement))
        else:
            volumes.append(resample_simpleitk(volume, reference, transform, interpolation=interpolation,
                                              default_value=default_value))
    return sitk.JoinSeries(volumes, float(series.GetOrigin()[3]), float(series.GetSpacing()[3]))


def _chain_onto(transforms: Sequence[TransformName], reference_path: PathLike, output: PathLike):
    """``(output, transform, grid)`` of compose-transforms and invert-transform: the output path checked (a
    transform file or a field image), the chain composed, the reference's grid (from its header)."""
    from ..io.transform_specs import TRANSFORM_OUTPUT_SUFFIXES

    output = check_output_path(output, what="--output", suffixes=TRANSFORM_OUTPUT_SUFFIXES)
    reference_header = read_header(reference_path, what="--reference")
    transform = compose_transforms(list(transforms), dimension=reference_header.dimension)
    return output, transform, reference_header.grid


@dataclass(frozen=True)
class ComposedField:
    """What :func:`compose_transform_file` wrote: the file, its grid's size and the largest displacement (mm)."""

    output: Path
    size: Tuple[int, ...]
    max_displacement_mm: float
    warnings: Tuple[str, ...] = ()


def compose_transform_file(transforms: Sequence[TransformName], reference_path: PathLike,
                           output: PathLike) -> ComposedField:
    """Compose transforms into one displacement field on a reference grid and write it (all or nothing):
    ``antsApplyTransforms -o [field.nii.gz,1]``, ``ComposeMultiTransform``, or ``transformix -def all``.

    Args:
        transforms: ``FILE`` / ``[FILE,1]`` names (fixed -> moving), composed as ``antsApplyTransforms -t``.
        reference_path: the image whose grid the field is sampled on (the fixed image).
        output: an ITK transform file (``.h5``) or a displacement-field image (``.nii.gz``, ``.nrrd``,
            ``.mha``; LPS mm, as antsRegistration's ``Warp.nii.gz``).

    Returns:
        A :class:`ComposedField`. Resampling with the written field equals resampling with the transforms
        (to float32's precision for a field image; the field is sampled in double precision).

    Raises:
        InputError: for every user mistake, before anything is written.
    """
    from ..spatial.transforms import DisplacementField, write_transform

    output, transform, grid = _chain_onto(transforms, reference_path, output)
    field = DisplacementField(grid, sample_displacement(transform, grid, double=True))
    warnings = tuple(describe_coverage(transform, grid, list(transforms)))
    with OutputTransaction() as out:
        write_transform(field, output, out)
    return ComposedField(output, grid.size, field.max_norm(), warnings)


@dataclass(frozen=True)
class InvertedField:
    """What :func:`invert_transform_file` wrote, and how well the inverse was found.

    Attributes:
        output: the file written.
        iterations, last_step_mm, outside_fraction, unsolved_fraction: see
            :class:`~itk_gradicon.spatial.inverse.InverseField`.
        check_median_mm, check_max_mm: ``|T(T^-1(y)) - y|`` over up to 2,000 points ``y`` of the reference
            whose preimage lies in the forward field's grid, ``T`` evaluated by ITK through the given files.
        warnings: what the caller should say.
    """

    output: Path
    iterations: int
    last_step_mm: float
    outside_fraction: float
    unsolved_fraction: float
    check_median_mm: float
    check_max_mm: float
    warnings: Tuple[str, ...] = ()


def invert_transform_file(transforms: Sequence[TransformName], reference_path: PathLike, output: PathLike, *,
                          fixed_path: Optional[PathLike] = None, iterations: int = 50) -> InvertedField:
    """Invert a transform chain onto the reference (moving) grid and write it (all or nothing).

    Args:
        transforms: the forward chain (fixed -> moving points), ``FILE`` / ``[FILE,1]`` as ``antsApplyTransforms``.
        reference_path: the image whose grid the inverse gets (the moving image).
        output: ``.h5`` or a displacement-field image: moving -> fixed points.
        fixed_path: the fixed image, where the forward transform is sampled (default: the grid of the chain's
            first displacement field, else, for linear transforms, the reference grid).
        iterations: at most this many Newton steps (:func:`itk_gradicon.spatial.inverse.invert_transform`).

    Returns:
        An :class:`InvertedField`.
    """
    from ..spatial.inverse import SOLVED_MM, invert_transform
    from ..spatial.transforms import DisplacementField, write_transform

    output, transform, grid = _chain_onto(transforms, reference_path, output)
    if fixed_path is not None:
        domain = read_header(fixed_path, what="--fixed").grid
    else:
        domain = first_field_grid(transform) or grid
    found = invert_transform(transform, domain, grid, iterations=iterations)
    # the inverse checked by ITK itself: T(T^-1(y)) should be y
    targets = grid.world_points().reshape(-1, grid.dimension)
    displacement = found.displacement.reshape(-1, grid.dimension)
    chosen = np.unique(np.linspace(0, len(targets) - 1, min(2000, len(targets))).astype(int))
    to_index = domain.world_to_index()
    errors = []
    for y, v in zip(targets[chosen], displacement[chosen]):
        x = y + v
        index = to_index[:-1, :-1] @ x + to_index[:-1, -1]
        if np.all(index >= -0.5) and np.all(index <= np.asarray(domain.size) - 0.5):
            errors.append(np.linalg.norm(np.asarray(transform.TransformPoint([float(c) for c in x])) - y))
    median = float(np.median(errors)) if errors else float("nan")
    largest = float(np.max(errors)) if errors else float("nan")
    warnings = []
    if found.outside_fraction > 0.01:
        warnings.append(f"{100 * found.outside_fraction:.1f} % of the reference grid's points map outside the "
                        "forward transform's grid (where a displacement field does nothing): the inverse there "
                        "continues the field's edge; give --fixed if the fixed image covers more")
    if found.unsolved_fraction > 0:
        warnings.append(f"{100 * found.unsolved_fraction:.3g} % of the points stayed more than {SOLVED_MM} mm off "
                        f"after {found.iterations} steps (at most {found.last_step_mm:.2f} mm): the forward "
                        "transform folds there (no point, or several, map there); see gradicon jacobian")
    with OutputTransaction() as out:
        write_transform(DisplacementField(grid, found.displacement), output, out)
    return InvertedField(output, found.iterations, found.last_step_mm, found.outside_fraction,
                         found.unsolved_fraction, median, largest, tuple(warnings))


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
    from ..spatial.jacobian import determinant_of_displacement, jacobian_summary, log_jacobian

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
    if reference is not None:  # (the grid of the first field otherwise: covered by it)
        summary.update(_warnings(describe_coverage(transform, grid, list(transforms))))
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
                   output_json: Optional[PathLike] = None,
                   label_interpolation: str = "label") -> Dict[str, object]:
    """Measure a registration from files: label overlap, landmark error and folding (``gradicon evaluate``).

    Args:
        transforms: forward transforms (fixed -> moving), composed as ``antsApplyTransforms``; none: identity.
        fixed_labels, moving_labels: label maps; the moving one is warped onto the fixed grid through the
            transforms by ``label_interpolation``.
        label_values: labels to evaluate (default: every non-zero label in either map).
        hd95: also compute HD95 (mm).
        fixed_landmarks, moving_landmarks: corresponding points (see
            :func:`itk_gradicon.evaluation.metrics.read_landmarks`).
        reference: the fixed image: grid of the Jacobian and of ``index`` landmarks.
        output_json: also write the report there.
        label_interpolation: one of :data:`LABEL_INTERPOLATIONS`: ``label`` (ANTs' GenericLabel: each label
            interpolated linearly as a 0/1 map, the largest wins) or ``nearest`` (nearest neighbour, as many
            published evaluations warp labels; its Dice is lower by up to about 0.01 on many small regions).

    Returns:
        The report: ``transforms``, and ``labels`` (with the ``interpolation`` used), ``landmarks``,
        ``jacobian`` where their inputs are given.
    """
    from ..spatial.jacobian import determinant_of_displacement, jacobian_summary
    from ..evaluation.metrics import label_overlap, read_landmarks, target_registration_error

    _check_evaluate_options(transforms, fixed_labels, moving_labels, label_values, fixed_landmarks, moving_landmarks)
    if label_interpolation not in LABEL_INTERPOLATIONS:
        raise InputError(f"label interpolation '{label_interpolation}' is not one of "
                         f"{', '.join(LABEL_INTERPOLATIONS)}")
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
            if transform is not None and label_interpolation == "nearest":
                compared = resample_simpleitk(moving_lab, fixed_lab, transform, interpolation="nearest")
            elif transform is not None:
                compared = resample_labels_on_grid(moving_lab, labels_grid, transform,
                                                   displacement=displacement if labels_grid == grid else None)
            report["labels"] = label_overlap(fixed_lab, compared, label_values=list(label_values or ()) or None,
                                             with_hd95=hd95)
            if transform is not None:
                report["labels"]["interpolation"] = label_interpolation
        if fixed_landmarks is not None:
            moving_grid = ImageGrid.from_image(moving_lab) if moving_lab is not None else None
            report["landmarks"] = target_registration_error(
                read_landmarks(fixed_landmarks, grid=grid), read_landmarks(moving_landmarks, grid=moving_grid),
                transform)
        if folding is not None:
            report["jacobian"] = folding.result()
    if transform is not None:
        report.update(_warnings(describe_coverage(transform, grid, list(transforms))))
    if output_json is not None:
        with OutputTransaction() as out:
            out.path(output_json).write_text(json.dumps(report, indent=2) + "\n")
    return report


#: How ``evaluate`` warps the moving labels: ANTs' GenericLabel (the default) or nearest neighbour.
LABEL_INTERPOLATIONS = ("label", "nearest")


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


def _warnings(lines: List[str]) -> Dict[str, List[str]]:
    """``{"warnings": lines}`` for a JSON report, or nothing where there is none."""
    return {"warnings": lines} if lines else {}


#: :func:`itk_gradicon.io.images.read_simpleitk_image` under the name the file commands have always used.
read_image = read_simpleitk_image

def read_images_and_masks(files: Dict[str, Optional[Path]], dimension: int):
    """``(fixed, moving, fixed_original, moving_original, masks)`` of ``--fixed``, ``--moving``, ``--fixed-mask``
    and ``--moving-mask`` in ``files``, as the command reads them (``gradicon register`` and its pre-alignment's
    second process): float32 images checked against ``dimension``, the images as stored, masks checked
    against their image's grid (``None`` where not given)."""
    fixed, fixed_original = read_float32(files["--fixed"], what="--fixed", dimension=dimension)
    moving, moving_original = read_float32(files["--moving"], what="--moving", dimension=dimension)
    masks = {f"{role}_mask": read_mask_on_grid(files[f"--{role}-mask"], image, what=f"--{role}-mask")
             if files[f"--{role}-mask"] else None for role, image in (("fixed", fixed), ("moving", moving))}
    return fixed, moving, fixed_original, moving_original, masks


__all__ = ["ComposedField", "INTERPOLATIONS", "InvertedField", "LABEL_INTERPOLATIONS", "WarpSummary",
           "apply_transform_file", "compose_transform_file", "compose_transforms", "evaluate_files",
           "first_field_grid", "invert_transform_file", "jacobian_file", "read_header", "read_image",
           "read_images_and_masks", "read_transform", "resample_image", "resample_labels", "sample_displacement"]
