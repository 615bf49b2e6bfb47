"""Registration quality: label overlap (Dice), surface distance (HD95), landmark error (TRE), folding.

Conventions:

* Label maps are compared on one grid (the fixed image's): warp the moving labels first
  (:func:`itk_gradicon.spatial.resample.resample_labels`). Background is 0 and is not a label.
* Distances are in millimetres, in physical space. Because direction matrices are orthonormal, the
  distance between two voxel centres is ``|diag(spacing) (i - j)|`` whatever the direction.
* HD95 of a label: the surface of a label is its voxels with a face neighbour (or the image edge)
  outside it; for each surface voxel of one map the distance to the nearest surface voxel of the other
  is taken, both ways; HD95 is the larger of the two 95th percentiles (numpy's linear percentile).
* TRE: the forward transform maps FIXED points to MOVING points, so each fixed landmark ``f`` is mapped
  through it and compared with its moving landmark ``m``: ``|T(f) - m|``. The error before
  registration is ``|f - m|``.
* Folding and smoothness: % of voxels with a negative Jacobian determinant and SDlogJ, computed in
  physical space (:mod:`itk_gradicon.spatial.jacobian`).

Landmark files (:func:`read_landmarks`), one landmark per line, fixed and moving files in the same order:

* elastix / ITK point-set text (``.txt``, e.g. ``ITKElastix_CT_3D_lung_fixed_point_set.txt``)::

      point            <- "point": physical LPS mm; "index": ITK voxel index (i j k) of the image
      3                <- number of points
      -36.35 -36.97 -1204.5
      ...

* CSV (``.csv``): ``x,y,z`` in LPS mm (``x,y`` in 2-D). An optional first line naming the columns
  (e.g. ANTs' ``x,y,z,t``) selects the columns called x, y, z; without it the rows must have 2 or 3
  numbers. Lines starting with ``#`` are skipped. Slicer's RAS ``.fcsv`` files are not read: negate
  x and y to get LPS.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..errors import InputError
from ..io.grid import ImageGrid, apply_affine
from ..io.images import describe_grid, image_array, same_grid
from ..io.itk_bridge import to_simpleitk
from ..io.outputs import PathLike
from ..spatial.jacobian import jacobian_determinant, jacobian_summary



# --------------------------------------------------------------------------------------------
# Label overlap
# --------------------------------------------------------------------------------------------

def labels_present(*arrays: np.ndarray) -> List[int]:
    """The sorted non-zero labels found in any of ``arrays``."""
    found = set()
    for array in arrays:
        found.update(int(v) for v in np.unique(array))
    found.discard(0)
    return sorted(found)


def dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    """Dice overlap ``2|A & B| / (|A| + |B|)`` of one label in two arrays of the same shape.

    Returns:
        The overlap in [0, 1]; NaN when the label is in neither array.
    """
    in_a, in_b = a == label, b == label
    total = int(np.count_nonzero(in_a)) + int(np.count_nonzero(in_b))
    if total == 0:
        return float("nan")
    return 2.0 * int(np.count_nonzero(in_a & in_b)) / total


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (the image edge counts as outside)."""
    mask = np.asarray(mask, dtype=bool)
    interior = mask.copy()
    for axis in range(mask.ndim):
        n = mask.shape[axis]
        lower = [slice(None)] * mask.ndim
        upper = [slice(None)] * mask.ndim
        lower[axis], upper[axis] = slice(0, n - 1), slice(1, n)
        neighbour_above = np.zeros_like(mask)
        neighbour_above[tuple(lower)] = mask[tuple(upper)]
        neighbour_below = np.zeros_like(mask)
        neighbour_below[tuple(upper)] = mask[tuple(lower)]
        interior &= neighbour_above & neighbour_below
    return mask & ~interior


def _distance_to(target: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Euclidean distance (mm) from every voxel to the nearest ``True`` voxel of ``target``.

    ITK's ``SignedMaurerDistanceMapImageFilter``, through SimpleITK (one library, loaded in a fraction
    of the time ITK Python takes to load the distance-map module and its dependencies).
    """
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(target.astype(np.uint8))
    image.SetSpacing([float(s) for s in reversed(spacing)])  # ITK order
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)
    out = np.array(sitk.GetArrayViewFromImage(distance), dtype=np.float64)
    out[target] = 0.0
    return out


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]):
    """Distances (mm) from each surface voxel of ``a`` to the surface of ``b``, and back.

    Args:
        a, b: boolean masks of one shape (ARRAY order), both non-empty.
        spacing: voxel size per ARRAY axis (the reverse of ITK's spacing).

    Returns:
        ``(a_to_b, b_to_a)``: 1-D float64 arrays.
    """
    surface_a, surface_b = surface(a), surface(b)
    both = surface_a | surface_b
    box = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(both))  # exact on the crop
    surface_a, surface_b = surface_a[box], surface_b[box]
    a_to_b = _distance_to(surface_b, spacing)[surface_a]
    b_to_a = _distance_to(surface_a, spacing)[surface_b]
    return a_to_b, b_to_a


def hausdorff95(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> float:
    """HD95 (mm): the larger of the two directed 95th-percentile surface distances.

    Returns:
        The distance; NaN when either mask is empty.
    """
    if not np.any(a) or not np.any(b):
        return float("nan")
    a_to_b, b_to_a = surface_distances(a, b, spacing)
    return float(max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95)))


def _crop_to_label(in_a: np.ndarray, in_b: np.ndarray):
    """Both masks cut to the box around either, one voxel wider where the image allows: surfaces,
    overlaps and distances are unchanged, and many small labels cost little."""
    either = in_a | in_b
    if not either.any():
        return in_a[:0], in_b[:0]
    box = []
    for axis in range(either.ndim):
        other = tuple(a for a in range(either.ndim) if a != axis)
        hit = np.flatnonzero(either.any(axis=other))
        box.append(slice(max(int(hit[0]) - 1, 0), min(int(hit[-1]) + 2, either.shape[axis])))
    box = tuple(box)
    return in_a[box], in_b[box]


def label_overlap(reference, labels, *, label_values: Optional[Sequence[int]] = None,
                  with_hd95: bool = True) -> Dict[str, object]:
    """Dice (and HD95) per label between two label maps on one grid.

    Args:
        reference: fixed label map (``itk.Image`` or ``SimpleITK.Image``).
        labels: label map on the same grid (e.g. the moving labels warped onto the fixed grid).
        label_values: labels to evaluate; default: every non-zero label in either map.
        with_hd95: also compute HD95 (mm).

    Returns:
        ``{"labels": [...], "dice": {label: value}, "mean_dice": ..., "hd95_mm": {...},
        "mean_hd95_mm": ...}``; labels are strings (JSON keys). A label missing from one map has Dice 0
        and HD95 ``None``; means are over labels with a value.

    Raises:
        InputError: the maps are not on one grid, or no label is found.
    """
    reference, labels = to_simpleitk(reference), to_simpleitk(labels)
    if not same_grid(reference, labels):
        raise InputError(f"the label maps are not on one grid ({describe_grid(labels)} vs "
                         f"{describe_grid(reference)}); warp one onto the other first "
                         "(gradicon warp-labels, or evaluate --transform)")
    a = np.asarray(image_array(reference))
    b = np.asarray(image_array(labels))
    values = list(label_values) if label_values is not None else labels_present(a, b)
    if not values:
        raise InputError("no label to evaluate: both label maps are empty (all 0)")
    spacing = tuple(reversed(ImageGrid.from_image(reference).spacing))
    dice_by_label: Dict[str, float] = {}
    hd_by_label: Dict[str, Optional[float]] = {}
    for value in values:
        in_a, in_b = _crop_to_label(a == value, b == value)
        total = int(np.count_nonzero(in_a)) + int(np.count_nonzero(in_b))
        dice_by_label[str(value)] = 2.0 * int(np.count_nonzero(in_a & in_b)) / total if total else 0.0
        if with_hd95:
            hd = hausdorff95(in_a, in_b, spacing)
            hd_by_label[str(value)] = None if math.isnan(hd) else hd
    result: Dict[str, object] = {
        "labels": [int(v) for v in values],
        "dice": dice_by_label,
        "mean_dice": float(np.mean(list(dice_by_label.values()))),
    }
    if with_hd95:
        finite = [v for v in hd_by_label.values() if v is not None]
        result["hd95_mm"] = hd_by_label
        result["mean_hd95_mm"] = float(np.mean(finite)) if finite else None
    return result


# --------------------------------------------------------------------------------------------
# Landmarks
# --------------------------------------------------------------------------------------------

def read_landmarks(path: PathLike, *, grid: Optional[ImageGrid] = None) -> np.ndarray:
    """Read a landmark file (elastix/ITK point-set text or CSV; see the module docstring).

    Args:
        path: the file.
        grid: the image grid that ``index`` point sets refer to (needed only for those).

    Returns:
        ``(n, d)`` float64 WORLD points (LPS mm).

    Raises:
        InputError: a missing file, an unknown layout, a wrong count, or an ``index`` file without a grid.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"landmark file '{path}' does not exist")
    if path.suffix.lower() == ".csv":
        return _read_csv_landmarks(path)
    return _read_point_set(path, grid)


def _read_point_set(path: Path, grid: Optional[ImageGrid]) -> np.ndarray:
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError as err:
        raise InputError(f"landmark file '{path}' is not a text file") from err
    if len(lines) < 2 or lines[0].lower() not in ("point", "index"):
        raise InputError(f"landmark file '{path}' is not an elastix point set: its first line must be "
                         "'point' or 'index' and its second the number of points (or use a .csv of x,y,z)")
    kind = lines[0].lower()
    try:
        count = int(lines[1])
        rows = [[float(v) for v in ln.split()] for ln in lines[2:]]
    except ValueError as err:
        raise InputError(f"landmark file '{path}' has a line that is not numbers: {err}") from None
    if count != len(rows):
        raise InputError(f"landmark file '{path}' announces {count} points but lists {len(rows)}")
    points = _as_points(rows, path)
    if kind == "index":
        points = index_points_to_world(points, grid, source=f"landmark file '{path}'",
                                       missing="give the image they belong to, or convert them to physical "
                                               "points ('point')")
    return points


def index_points_to_world(points: np.ndarray, grid: Optional[ImageGrid], *, source: str, missing: str,
                          image: str = "image") -> np.ndarray:
    """The WORLD points of an elastix ``index`` point set on ``grid``.

    Raises:
        InputError: no grid (``missing`` says what to do), or indices of another dimension than the grid's.
    """
    if grid is None:
        raise InputError(f"{source} holds voxel indices ('index'); {missing}")
    if points.shape[1] != grid.dimension:
        raise InputError(f"{source} has {points.shape[1]}-D indices for a {grid.dimension}-D {image}")
    return apply_affine(grid.index_to_world(), points)


def _read_csv_landmarks(path: Path) -> np.ndarray:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.reader(fh) if r and not r[0].lstrip().startswith("#")]
    if not rows:
        raise InputError(f"landmark file '{path}' is empty")
    columns = None
    header = [c.strip().lower() for c in rows[0]]
    if not _all_numbers(rows[0]):
        wanted = [c for c in ("x", "y", "z") if c in header]
        if wanted[:2] != ["x", "y"]:
            raise InputError(f"landmark file '{path}' has the header {rows[0]}; it must name columns "
                             "x, y (and z)")
        columns = [header.index(c) for c in wanted]
        rows = rows[1:]
    try:
        values = [[float(r[c]) for c in columns] if columns else [float(v) for v in r] for r in rows]
    except (ValueError, IndexError) as err:
        raise InputError(f"landmark file '{path}' has a row that is not x,y,z numbers: {err}") from None
    return _as_points(values, path)


def _all_numbers(row: Sequence[str]) -> bool:
    try:
        [float(v) for v in row]
    except ValueError:
        return False
    return True


def _as_points(rows: List[List[float]], path: Path) -> np.ndarray:
    if not rows:
        raise InputError(f"landmark file '{path}' holds no point")
    widths = {len(r) for r in rows}
    if len(widths) != 1 or widths.pop() not in (2, 3):
        raise InputError(f"landmark file '{path}' must have 2 or 3 coordinates on every line")
    points = np.asarray(rows, dtype=np.float64)
    if not np.all(np.isfinite(points)):
        raise InputError(f"landmark file '{path}' has NaN or infinite coordinates")
    return points


def _transform_dimension(transform) -> int:
    """The dimension of an ITK Python or a SimpleITK transform."""
    get = getattr(transform, "GetInputSpaceDimension", None) or transform.GetDimension
    return int(get())


def transform_points(transform, points: np.ndarray) -> np.ndarray:
    """Map ``(n, d)`` WORLD points through an ITK Python or SimpleITK transform (fixed -> moving)."""
    return np.asarray([list(transform.TransformPoint([float(v) for v in p])) for p in points],
                      dtype=np.float64).reshape(points.shape)


def _stats(distances: np.ndarray) -> Dict[str, float]:
    return {"mean": float(distances.mean()), "std": float(distances.std()),
            "median": float(np.median(distances)), "max": float(distances.max())}


def target_registration_error(fixed_points: np.ndarray, moving_points: np.ndarray,
                              transform=None) -> Dict[str, object]:
    """TRE of corresponding landmarks: ``|T(f_i) - m_i|`` with ``T`` fixed -> moving.

    Args:
        fixed_points, moving_points: ``(n, d)`` WORLD points in corresponding order.
        transform: the forward transform (fixed -> moving points); ``None`` is the identity.

    Returns:
        ``{"count", "tre_mm": {mean, std, median, max}, "before_mm": {...} (|f - m|),
        "per_point_mm": [...]}``.
    """
    fixed_points = np.asarray(fixed_points, dtype=np.float64)
    moving_points = np.asarray(moving_points, dtype=np.float64)
    if fixed_points.shape != moving_points.shape:
        raise InputError(f"the landmark files do not correspond: {fixed_points.shape[0]} fixed points of "
                         f"{fixed_points.shape[1]}-D vs {moving_points.shape[0]} moving points of "
                         f"{moving_points.shape[1]}-D")
    if transform is not None and _transform_dimension(transform) != fixed_points.shape[1]:
        raise InputError(f"{fixed_points.shape[1]}-D landmarks cannot go through a "
                         f"{_transform_dimension(transform)}-D transform")
    mapped = fixed_points if transform is None else transform_points(transform, fixed_points)
    errors = np.linalg.norm(mapped - moving_points, axis=1)
    before = np.linalg.norm(fixed_points - moving_points, axis=1)
    return {"count": int(errors.size), "tre_mm": _stats(errors), "before_mm": _stats(before),
            "per_point_mm": [float(e) for e in errors]}


# --------------------------------------------------------------------------------------------
# Folding
# --------------------------------------------------------------------------------------------

def folding(transform, grid: ImageGrid, mask: Optional[np.ndarray] = None) -> Dict[str, float]:
    """% negative Jacobian determinant, SDlogJ and the other statistics of
    :func:`itk_gradicon.spatial.jacobian.jacobian_summary`, on ``grid`` (within ``mask`` if given)."""
    return jacobian_summary(jacobian_determinant(transform, grid), mask)
