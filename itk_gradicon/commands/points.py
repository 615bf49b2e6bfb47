"""Point sets through transforms: landmarks, fiducials and surfaces' vertices in the files users have.

Which way a transform moves points: every transform this package (and antsRegistration, and elastix)
writes maps **fixed** physical points to **moving** physical points, which is what warping the moving
image onto the fixed grid needs. The same transform therefore carries points *of the fixed image* to
where they are in the moving image. To carry points of the moving image onto the fixed image, use the
inverse outputs (``--out-inverse-transform``, ``PREFIX1InverseWarp.nii.gz`` with ``[PREFIX0GenericAffine.mat,1]``).
This is ``antsApplyTransformsToPoints``' and ``transformix -def``'s convention too.

Formats (:func:`read_points`, chosen by the file name; written back in the format read):

* ``.csv``: a header naming columns ``x``, ``y`` (and ``z``) in LPS millimetres, as ANTs writes and
  reads them (``x,y,z,t``); other columns (``t``, labels, comments) are carried through unchanged;
* ``.txt`` / ``.pts``: an elastix/ITK point set: ``point`` (LPS mm) or ``index`` (voxel indices of the
  ``reference`` image), then the number of points, then one point per line; written as ``point``;
* ``.mrk.json``: 3D Slicer markups (``coordinateSystem`` ``LPS`` or ``RAS``);
* ``.fcsv``: 3D Slicer fiducials (``# CoordinateSystem = LPS``/``RAS``, or Slicer's codes 0 = RAS, 1 = LPS).

Slicer files keep their coordinate system: RAS points are converted to LPS on the way in and back on
the way out (a sign change of x and y, exact in floating point), and everything else in the file is kept.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError
from ..evaluation.metrics import index_points_to_world, transform_points
from ..io.grid import ImageGrid
from ..io.images import atomic_output, check_output_path, read_image_header
from ..io.outputs import PathLike
from ..io.transform_files import compose_transforms

#: Formats by file name ending (longest first).
SUFFIXES = ((".mrk.json", "slicer-json"), (".fcsv", "fcsv"), (".csv", "csv"), (".txt", "elastix"),
            (".pts", "elastix"))
_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])


@dataclass
class PointSet:
    """Points read from a file (``(n, d)`` WORLD points, LPS mm) and what is needed to write the file back."""

    points: np.ndarray
    kind: str
    path: Path
    system: str = "LPS"  # the file's coordinate system (Slicer files), points are LPS whatever it is
    document: Any = None  # csv: (rows, body rows, columns); slicer-json: the document; fcsv: (lines, body lines, columns)

    @property
    def dimension(self) -> int:
        return int(self.points.shape[1])


def _ending(path: PathLike) -> Tuple[str, str]:
    """``(file name ending, format)`` of a point file (see the module docstring)."""
    name = Path(path).name.lower()
    for suffix, kind in SUFFIXES:
        if name.endswith(suffix):
            return suffix, kind
    raise InputError(f"points file '{path}': unknown format; allowed endings: "
                     f"{', '.join(s for s, _ in SUFFIXES)}")


def points_format(path: PathLike) -> str:
    """The format of a point file from its name (see the module docstring)."""
    return _ending(path)[1]


def read_points(path: PathLike, *, reference: Optional[ImageGrid] = None, what: str = "points file") -> PointSet:
    """Read a point file (module docstring).

    Args:
        path: the file.
        reference: the grid that an elastix ``index`` point set refers to.
        what: how messages name the file.

    Raises:
        InputError: a missing file, an unknown format, a missing column, a value that is not a finite
            number, an unknown coordinate system, or a wrong count; one line naming the file and line.
    """
    path = Path(path)
    kind = points_format(path)
    if not path.is_file():
        raise InputError(f"{what} '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{what} '{path}' is not a text file") from None
    reader = {"csv": _read_csv, "elastix": _read_elastix, "slicer-json": _read_slicer_json, "fcsv": _read_fcsv}[kind]
    return reader(text, path, what, reference)


def _number(value: str, path: Path, line: int, column: str, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} '{path}' line {line}: column {column} is {value!r}, not a number") from None
    if not math.isfinite(number):
        raise InputError(f"{what} '{path}' line {line}: column {column} is {value}, not a finite number")
    return number


def _columns(header: Sequence[str], path: Path, what: str, line: int = 1) -> List[int]:
    names = [c.strip().lower() for c in header]
    if "x" not in names or "y" not in names:
        raise InputError(f"{what} '{path}' line {line}: the header {list(header)} lacks column "
                         f"{'x' if 'x' not in names else 'y'}; expected x, y, z (LPS mm), as ANTs' x,y,z,t")
    return [names.index(c) for c in ("x", "y", "z") if c in names]


def _points_of(body: Sequence[Tuple[int, Sequence[str]]], columns: List[int], path: Path, what: str) -> np.ndarray:
    """The points of numbered rows ``(line, values)``, columns ``columns`` as x, y (and z)."""
    points = []
    for line, row in body:
        if len(row) <= max(columns):
            raise InputError(f"{what} '{path}' line {line}: {len(row)} values, the header names "
                             f"{max(columns) + 1} or more")
        points.append([_number(row[c], path, line, "xyz"[i], what) for i, c in enumerate(columns)])
    if not points:
        raise InputError(f"{what} '{path}' holds no point")
    return np.asarray(points, dtype=np.float64)


def _read_csv(text: str, path: Path, what: str, reference) -> PointSet:
    rows = list(csv.reader(io.StringIO(text)))
    numbered = [(i + 1, r) for i, r in enumerate(rows) if r and not r[0].lstrip().startswith("#")]
    if not numbered:
        raise InputError(f"{what} '{path}' is empty")
    header_line, header = numbered[0]
    columns = _columns(header, path, what, header_line)
    body = numbered[1:]
    return PointSet(_points_of(body, columns, path, what), "csv", path,
                    document=(rows, [i - 1 for i, _ in body], columns))


def _read_elastix(text: str, path: Path, what: str, reference: Optional[ImageGrid]) -> PointSet:
    lines = [(i + 1, ln.strip()) for i, ln in enumerate(text.splitlines()) if ln.strip()]
    if len(lines) < 2 or lines[0][1].lower() not in ("point", "index"):
        raise InputError(f"{what} '{path}' line 1: an elastix point set starts with 'point' or 'index', then "
                         "the number of points")
    kind = lines[0][1].lower()
    try:
        count = int(lines[1][1])
    except ValueError:
        raise InputError(f"{what} '{path}' line {lines[1][0]}: {lines[1][1]!r} is not the number of points") from None
    body = lines[2:]
    if count != len(body):
        raise InputError(f"{what} '{path}' line {lines[1][0]}: announces {count} points, the file lists {len(body)}")
    widths = {len(ln.split()) for _, ln in body}
    if len(widths) > 1 or not widths <= {2, 3}:
        bad = next(i for i, ln in body if len(ln.split()) not in (2, 3) or len(ln.split()) != len(body[0][1].split()))
        raise InputError(f"{what} '{path}' line {bad}: every point needs the same 2 or 3 coordinates")
    points = np.asarray([[_number(v, path, i, "xyz"[k], what) for k, v in enumerate(ln.split())] for i, ln in body])
    if not len(points):
        raise InputError(f"{what} '{path}' holds no point")
    if kind == "index":
        points = index_points_to_world(points, reference, source=f"{what} '{path}'", image="reference image",
                                       missing="give the image they belong to with --reference, or write "
                                               "physical points ('point')")
    return PointSet(points, "elastix", path)


def _system(value: Any, path: Path, what: str, line: Optional[int] = None) -> str:
    where = f" line {line}" if line else ""
    system = {"0": "RAS", "1": "LPS"}.get(str(value).strip(), str(value).strip().upper())
    if system not in ("LPS", "RAS"):
        raise InputError(f"{what} '{path}'{where}: coordinate system {value!r}; allowed: LPS, RAS (Slicer's 0 = RAS, "
                         "1 = LPS)")
    return system


def _read_slicer_json(text: str, path: Path, what: str, reference) -> PointSet:
    try:
        document = json.loads(text)
        markups = document["markups"]
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{what} '{path}': not a Slicer markups file (a JSON object with a 'markups' list)") from None
    if not isinstance(markups, list) or not markups:
        raise InputError(f"{what} '{path}': its 'markups' list is empty")
    systems = {_system(m.get("coordinateSystem", "LPS"), path, what) for m in markups}
    if len(systems) != 1:
        raise InputError(f"{what} '{path}': markups in different coordinate systems {sorted(systems)}")
    system = systems.pop()
    points = []
    for m, markup in enumerate(markups):
        for p, control in enumerate(markup.get("controlPoints") or []):
            position = control.get("position") if isinstance(control, dict) else None
            if not isinstance(position, list) or len(position) != 3:
                raise InputError(f"{what} '{path}': markup {m} control point {p} has no 3-D position")
            try:
                points.append([float(v) for v in position])
            except (TypeError, ValueError):
                raise InputError(f"{what} '{path}': markup {m} control point {p} has the position {position!r}, "
                                 "not three numbers") from None
    if not points:
        raise InputError(f"{what} '{path}' holds no control point")
    array = np.asarray(points, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise InputError(f"{what} '{path}': a control point position is NaN or infinite")
    if system == "RAS":
        array = array * _RAS_TO_LPS
    return PointSet(array, "slicer-json", path, system=system, document=document)


def _read_fcsv(text: str, path: Path, what: str, reference) -> PointSet:
    lines = text.splitlines()
    system, columns_line = "RAS", None  # Slicer's default for .fcsv is RAS
    for i, line in enumerate(lines):
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            if key.strip().lower() == "coordinatesystem":
                system = _system(value, path, what, i + 1)
            elif key.strip().lower() == "columns":
                columns_line = [c.strip() for c in value.split(",")]
    header = columns_line or ["id", "x", "y", "z"]
    columns = _columns(header, path, what)
    body = [(i + 1, row) for i, row in enumerate(csv.reader(io.StringIO(text)))
            if row and not row[0].startswith("#")]
    points = _points_of(body, columns, path, what)
    if len(columns) != 3:
        raise InputError(f"{what} '{path}': Slicer fiducials have x, y and z columns")
    if system == "RAS":
        points = points * _RAS_TO_LPS
    return PointSet(points, "fcsv", path, system=system, document=(lines, [i - 1 for i, _ in body], columns))


def _text(value: float) -> str:
    """The shortest text that reads back as the same float."""
    return repr(float(value))


def points_text(point_set: PointSet, points: np.ndarray) -> str:
    """The file ``point_set`` was read from, with its points replaced by ``points`` (LPS, ``(n, d)``)."""
    points = np.asarray(points, dtype=np.float64)
    if points.shape != point_set.points.shape:
        raise ValueError(f"{points.shape} points for a set of {point_set.points.shape}")
    kind = point_set.kind
    if kind == "elastix":
        return "point\n" + f"{len(points)}\n" + "".join(" ".join(_text(v) for v in p) + "\n" for p in points)
    stored = points * _RAS_TO_LPS[: points.shape[1]] if point_set.system == "RAS" else points
    if kind == "slicer-json":
        document = copy.deepcopy(point_set.document)
        values = iter(stored)
        for markup in document["markups"]:
            for control in markup.get("controlPoints") or []:
                control["position"] = [float(v) for v in next(values)]
        return json.dumps(document, indent=4) + "\n"
    if kind == "csv":
        rows, body, columns = point_set.document
        rows = [list(r) for r in rows]
        for row_index, p in zip(body, stored):
            for c, v in zip(columns, p):
                rows[row_index][c] = _text(v)
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(rows)
        return out.getvalue()
    lines, body, columns = point_set.document  # fcsv
    lines = list(lines)
    for line_index, p in zip(body, stored):
        row = next(csv.reader([lines[line_index]]))
        for c, v in zip(columns, p):
            row[c] = _text(v)
        out = io.StringIO()
        csv.writer(out, lineterminator="").writerow(row)
        lines[line_index] = out.getvalue()
    return "\n".join(lines) + "\n"


def write_points(point_set: PointSet, points: np.ndarray, path: PathLike) -> Path:
    """Write ``points`` in ``point_set``'s format to ``path`` atomically (the whole file or nothing)."""
    path = Path(path)
    text = points_text(point_set, points)
    with atomic_output(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path


def apply_transforms_to_points(input_path: PathLike, transforms: Sequence[str], output: PathLike, *,
                               reference: Optional[PathLike] = None) -> PointSet:
    """Read a point file, map its points through ``transforms`` (composed as ``apply-transform`` composes
    them: ``-t T1 -t T2`` gives ``T2(T1(x))``) and write them to ``output`` in the same format.

    Args:
        input_path: the points (module docstring).
        transforms: ``FILE`` / ``[FILE,1]`` specifications.
        output: where to write (same format as the input; checked before any work).
        reference: the image an elastix ``index`` point set refers to.

    Returns:
        The input :class:`PointSet` (its ``points`` are the input points).

    Raises:
        InputError: see :func:`read_points` and :func:`itk_gradicon.io.transform_files.compose_transforms`; a
            point dimension other than the transforms'; an output of another format.
    """
    suffix, kind = _ending(input_path)
    if points_format(output) != kind:
        raise InputError(f"the output '{output}' must be written in the input's format "
                         f"({kind}: {suffix}); it ends differently")
    output = check_output_path(output, what="--output")
    grid = None
    if reference is not None:
        grid = read_image_header(reference, what="--reference").grid
    point_set = read_points(input_path, reference=grid)
    transform = compose_transforms(list(transforms))
    d = int(transform.GetDimension())
    if point_set.dimension != d:
        raise InputError(f"points file '{input_path}' holds {point_set.dimension}-D points; the transforms are {d}-D")
    write_points(point_set, transform_points(transform, point_set.points), output)
    return point_set


__all__ = ["PointSet", "read_points", "write_points", "points_text", "transform_points",
           "apply_transforms_to_points", "points_format"]
