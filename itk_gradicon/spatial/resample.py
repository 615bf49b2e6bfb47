"""Warping images and label maps with ITK transforms onto a reference grid: the one resampler.

Output voxel ``p`` of the reference grid takes ``image(transform(p))``: ``transform`` maps reference
(fixed) points to image (moving) points, as every transform this package writes does. The output has
the input's pixel type.

Interpolations (``INTERPOLATIONS``):

* ``linear`` and ``bspline`` (cubic B-spline, ITK's ``BSplineInterpolateImageFunction``) for intensity
  images. They are computed in floating point (float32 for float32 and <= 16-bit integer inputs,
  float64 otherwise); integer outputs are rounded and clamped to the pixel type's range.
* ``nearest`` for anything discrete; computed in the input's own pixel type where ITK wraps it
  (uint8, int16, uint16, float32, float64), else in float64 (exact for integers below 2**53).
* ``label``: label-preserving interpolation as ANTs' ``GenericLabel``: every label is interpolated
  linearly as a 0/1 map and the output voxel takes the label of largest weight (ties go to the
  smaller label). Output labels are always input labels; points outside the input get
  ``default_value`` (0). It runs in one pass over the eight neighbours of each sample point, so its
  cost does not grow with the number of labels.

Points outside the input image (ITK's rule: continuous index outside ``[-0.5, n - 0.5)``) take
``default_value``.

The work is done by SimpleITK (ITK's ``ResampleImageFilter`` and interpolators). ``itk.Image`` inputs
and ITK Python transforms are converted on the way in and the output handed back as an ``itk.Image``
(:mod:`itk_gradicon.io.itk_bridge`): the same values as ITK Python's own ``resample_image_filter``, which
``tests/test_files.py`` checks for every interpolation and transform kind.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..io.grid import ImageGrid, apply_affine
from ..io.images import check_label_values, image_array, image_like
from ..io.itk_bridge import grid_of, like_input, to_simpleitk, to_simpleitk_transform
from ..io.transform_files import sample_displacement
from ..resources import for_each_slab

INTERPOLATIONS = ("linear", "nearest", "bspline", "label")

#: numpy dtypes resampled in their own type with nearest-neighbour interpolation (the pixel types ITK
#: Python wraps; the rest goes through float64, exact for integers below 2**53).
_NEAREST_NATIVE = {np.dtype(np.uint8), np.dtype(np.int16), np.dtype(np.uint16), np.dtype(np.float32),
                   np.dtype(np.float64)}
#: voxels per chunk of label interpolation (bounds its memory to about 1 GB).
_LABEL_CHUNK_VOXELS = 1_000_000


def check_interpolation(name: str) -> str:
    """Return ``name`` if it is one of :data:`INTERPOLATIONS`, else raise :class:`InputError`."""
    if name not in INTERPOLATIONS:
        raise InputError(f"unknown interpolation {name!r}; allowed: {', '.join(INTERPOLATIONS)}")
    return name


def check_scalar(image, what: str) -> None:
    components = int(image.GetNumberOfComponentsPerPixel())
    if components != 1:
        raise InputError(f"{what} has {components} components per voxel; only scalar images are "
                         "resampled (split vector images into components first)")


def check_default_value(default_value: float, dtype: np.dtype) -> float:
    """The default value as the output type will hold it; refuse values the type cannot hold."""
    if not np.isfinite(default_value) and np.issubdtype(dtype, np.integer):
        raise InputError(f"default value {default_value} cannot be stored in an image of {dtype} voxels")
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if default_value != round(default_value) or not info.min <= default_value <= info.max:
            raise InputError(f"default value {default_value:g} cannot be stored in an image of {dtype} "
                             f"voxels (integers {info.min}..{info.max})")
    return float(default_value)


def resample_image(image, reference, transform, *, interpolation: str = "linear",
                   default_value: float = 0.0):
    """``image`` resampled onto ``reference``'s grid: output voxel ``p`` takes ``image(transform(p))``.

    Args:
        image: scalar image (``SimpleITK.Image`` or ``itk.Image``) of any pixel type ITK reads.
        reference: image whose grid (size, origin, spacing, direction) the output gets.
        transform: a transform (SimpleITK or ITK Python) mapping reference points to image points
            (fixed -> moving).
        interpolation: one of ``linear``, ``nearest``, ``bspline``, ``label``.
        default_value: value outside the input image; must fit the input's pixel type.

    Returns:
        An image of the input's pixel type on the reference grid, in the input's library.

    Raises:
        InputError: unknown interpolation, a vector image, or a default value the pixel type cannot hold.

    Example:
        >>> warped = resample_image(moving, fixed, result.forward_transform)   # doctest: +SKIP
    """
    check_interpolation(interpolation)
    resampled = resample_simpleitk(to_simpleitk(image), to_simpleitk(reference), to_simpleitk_transform(transform),
                                   interpolation=interpolation, default_value=default_value)
    return like_input(resampled, image)


def resample_simpleitk(image, reference, transform, *, interpolation: str = "linear", default_value: float = 0.0):
    """:func:`resample_image` of a scalar ``SimpleITK.Image`` through a SimpleITK transform (the commands'
    resampler; interpolation already checked)."""
    import SimpleITK as sitk

    check_scalar(image, "the image to resample")
    dtype = image_array(image).dtype
    default_value = check_default_value(default_value, dtype)
    if interpolation == "label":
        return resample_labels_on_grid(image, ImageGrid.from_image(reference), transform, default_value=default_value)
    if interpolation == "nearest":
        work = image if dtype in _NEAREST_NATIVE else sitk.Cast(image, sitk.sitkFloat64)
        interpolator = sitk.sitkNearestNeighbor
    else:  # float32 for float32 and <= 16-bit integers (exact enough), float64 for the rest and B-splines
        low_precision = dtype == np.float32 or (np.issubdtype(dtype, np.integer) and dtype.itemsize <= 2)
        pixel = sitk.sitkFloat32 if interpolation == "linear" and low_precision else sitk.sitkFloat64
        work = sitk.Cast(image, pixel)
        interpolator = sitk.sitkBSpline3 if interpolation == "bspline" else sitk.sitkLinear
    integer_work = np.issubdtype(image_array(work).dtype, np.integer)
    out = sitk.Resample(work, reference, transform, interpolator,
                        float(int(default_value)) if integer_work else default_value, work.GetPixelID())
    return with_dtype(out, dtype)


def as_dtype_array(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``array`` as ``dtype``: integers rounded and clamped to the type's range (never wrapped)."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        array = np.clip(np.rint(array), info.min, info.max)
    return np.ascontiguousarray(array.astype(dtype))


def with_dtype(image, dtype: np.dtype):
    """A ``SimpleITK.Image`` with voxels of ``dtype`` (integers rounded and clamped), same geometry;
    ``image`` itself when it already has them."""
    array = image_array(image)
    if array.dtype == dtype:
        return image
    return image_like(as_dtype_array(array, dtype), image)


def resample_labels(labels, reference, transform, *, default_value: float = 0.0, displacement=None):
    """Label-preserving resampling (ANTs' ``GenericLabel``); keeps the pixel type and the label set.

    For each output voxel the sample point's continuous index in ``labels`` is found, and each of the
    eight (four in 2-D) neighbouring voxels votes for its label with its linear-interpolation weight:
    the label with the largest total weight wins (ties: the smaller label). This equals interpolating
    every label's 0/1 map linearly and taking the largest, at the cost of one pass whatever the number
    of labels. Neighbours beyond the edge repeat the edge voxel (ITK's linear interpolator); points
    outside the image (continuous index outside ``[-0.5, n - 0.5)``) get ``default_value``.

    Args:
        labels: scalar label map (integer pixels, or floats holding integers).
        reference: image whose grid the output gets.
        transform: reference (fixed) points -> label-map (moving) points.
        default_value: label outside the input (0).
        displacement: the transform already sampled on ``reference``'s grid
            (:func:`~itk_gradicon.io.transform_files.sample_displacement`), if the caller has it.

    Returns:
        An image of the input's pixel type and library on the reference grid; its labels are a subset of
        the input's, plus ``default_value`` where points fall outside.
    """
    resampled = resample_labels_on_grid(to_simpleitk(labels), grid_of(reference), to_simpleitk_transform(transform),
                                        default_value=default_value, displacement=displacement)
    return like_input(resampled, labels)


def resample_labels_on_grid(labels, out_grid: ImageGrid, transform, *, default_value: float = 0.0,
                            displacement=None):
    """:func:`resample_labels` of a ``SimpleITK.Image`` label map onto ``out_grid`` through a SimpleITK
    transform (or ``displacement`` already sampled on that grid)."""
    import SimpleITK as sitk

    check_scalar(labels, "the label map to resample")
    array = np.asarray(image_array(labels))
    check_label_values(array, "the label map to resample")
    default_value = check_default_value(default_value, array.dtype)
    if displacement is None:
        displacement = sample_displacement(transform, out_grid)
    out = resample_label_array(array, ImageGrid.from_image(labels), out_grid, displacement, default_value)
    image = sitk.GetImageFromArray(np.ascontiguousarray(out))
    out_grid.apply_to(image)
    return image


def resample_label_array(array: np.ndarray, in_grid, out_grid, displacement: np.ndarray,
                         default_value: float) -> np.ndarray:
    """The label-map arithmetic of :func:`resample_labels` on arrays.

    Args:
        array: the label map's voxels (ARRAY order) on ``in_grid``.
        in_grid, out_grid: :class:`~itk_gradicon.io.grid.ImageGrid` of the input and of the output.
        displacement: ``T(p) - p`` (WORLD, mm) at every voxel centre ``p`` of ``out_grid``.
        default_value: label of points outside the input.

    Returns:
        The output labels, ``out_grid.array_shape``, the input's dtype.
    """
    world_to_index = in_grid.world_to_index()
    d = out_grid.dimension
    size = np.asarray(in_grid.size)
    flat = array.reshape(-1)
    # ARRAY order strides: index (i, j, k) sits at i + n_i * (j + n_j * k)
    strides = np.cumprod([1] + list(in_grid.size[:-1])).astype(np.int64)
    out = np.empty(out_grid.array_shape, dtype=array.dtype)
    rows_total = out_grid.array_shape[0]
    per_row = int(np.prod(out_grid.array_shape[1:])) if d > 1 else 1
    rows_per_chunk = max(1, _LABEL_CHUNK_VOXELS // max(per_row, 1))
    corners = np.array(np.meshgrid(*[[0, 1]] * d, indexing="ij")).reshape(d, -1).T  # (2^d, d)

    def slab(rows: slice) -> None:
        points = out_grid.world_points(rows) + displacement[rows]
        cindex = apply_affine(world_to_index, points).reshape(-1, d)
        out[rows] = _generic_label(cindex, flat, size, strides, corners, default_value).reshape(out[rows].shape)

    for_each_slab(rows_total, rows_per_chunk, slab)
    return out


def _generic_label(cindex: np.ndarray, flat: np.ndarray, size: np.ndarray, strides: np.ndarray,
                   corners: np.ndarray, default_value: float) -> np.ndarray:
    """Labels at continuous indices ``(n, d)`` of a label array (raveled as ``flat``).

    Most points have one label at all their neighbours and take it at once; only the others
    weigh their neighbours.
    """
    n, d = cindex.shape
    columns = np.ascontiguousarray(cindex.T)  # one contiguous row per axis: the loops below stream
    inside = np.ones(n, dtype=bool)
    low, high = [], []
    for a in range(d):
        inside &= (columns[a] >= -0.5) & (columns[a] < size[a] - 0.5)
        base = np.floor(columns[a]).astype(np.int64)
        # ITK's linear interpolator repeats the edge voxel
        low.append(np.clip(base, 0, size[a] - 1) * strides[a])
        high.append(np.clip(base + 1, 0, size[a] - 1) * strides[a])
    by_corner = np.empty((len(corners), n), dtype=flat.dtype)  # the label at each neighbour
    for c, corner in enumerate(corners):
        offset = (high[0] if corner[0] else low[0]).copy()
        for a in range(1, d):
            offset += high[a] if corner[a] else low[a]
        by_corner[c] = flat.take(offset)
    chosen = by_corner[0].copy()
    uniform = np.ones(n, dtype=bool)
    for c in range(1, len(corners)):
        uniform &= by_corner[c] == chosen
    mixed = np.flatnonzero(~uniform)
    if mixed.size:
        votes = by_corner[:, mixed].T
        frac = cindex[mixed] - np.floor(cindex[mixed])
        weights = np.stack([np.prod(np.where(corner == 1, frac, 1.0 - frac), axis=1) for corner in corners])
        totals = weights.copy()  # total weight of each neighbour's label among the neighbours
        for c in range(len(corners)):
            for c2 in range(c + 1, len(corners)):
                same = by_corner[c, mixed] == by_corner[c2, mixed]
                totals[c] += np.where(same, weights[c2], 0.0)  # adding 0 elsewhere leaves the sums exact
                totals[c2] += np.where(same, weights[c], 0.0)
        totals = totals.T
        best = totals.max(axis=1, keepdims=True)
        candidates = np.where(totals >= best - 1e-9, votes, _largest(flat.dtype))
        chosen[mixed] = candidates.min(axis=1)
    chosen[~inside] = default_value
    return chosen


def _largest(dtype: np.dtype):
    return np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else np.inf
