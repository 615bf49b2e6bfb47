"""Quality-control picture of one registration, written as a PNG through SimpleITK (ITK's PNG writer; no
plotting library).

:func:`write_qc` draws, for three orthogonal slices of the FIXED image (axial and coronal through its
centre, sagittal a tenth of its field of view off the midline; one row each; a single row for 2-D
images), six panels on the fixed grid:

``FIXED``
    the fixed image;
``MOVING BEFORE``
    the moving image sampled on the fixed grid through the identity (physical space: where the
    two files put the anatomy before registration);
``MOVING AFTER``
    the moving image sampled through the forward transform (the registration result);
``OVERLAY BEFORE``, ``OVERLAY AFTER``
    fixed in magenta, moving in green: aligned structures turn grey/white, misaligned ones keep
    their colour;
``LOG JACOBIAN``
    ``log(max(det J, 0.001))`` of the forward transform in physical space (:mod:`itk_gradicon.spatial.jacobian`), blue
    for contraction (-1 and below) through white (0, volume kept) to red for expansion (+1 and
    above); voxels where ``det J <= 0`` (folds) are yellow.

Slices are shown in physical proportions (non-isotropic voxels are stretched to square millimetres)
and turned to a common display orientation: axial slices with anterior up and the patient's left on
the right of the picture; coronal and sagittal slices with superior up. Each image's grey levels
span its 1st to 99th percentile.

Example:
    >>> from itk_gradicon.evaluation.qc import write_qc
    >>> write_qc(fixed, moving, result, "qc.png")          # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError
from ..io.images import OutputTransaction, to_simpleitk
from ..io.outputs import PathLike
from ..io.transform_files import field_transform
from ..spatial.frames import ImageGrid, best_axis_alignment
from ..spatial.jacobian import determinant_of_displacement, log_jacobian


COLUMNS = ("FIXED", "MOVING BEFORE", "MOVING AFTER", "OVERLAY BEFORE", "OVERLAY AFTER", "LOG JACOBIAN")
#: Largest side of one panel, in display pixels.
PANEL_PIXELS = 220
_FONT_SCALE = 2
_GAP = 4
_BACKGROUND = np.array([24, 24, 24], dtype=np.uint8)
_TEXT = np.array([235, 235, 235], dtype=np.uint8)
_FOLD = np.array([255, 230, 0], dtype=np.uint8)

# A 5 x 7 pixel font, drawn for this module: one string of 7 rows of 5 cells per character.
_GLYPHS: Dict[str, Tuple[str, ...]] = {
    "A": (" ### ", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"),
    "B": ("#### ", "#   #", "#   #", "#### ", "#   #", "#   #", "#### "),
    "C": (" ####", "#    ", "#    ", "#    ", "#    ", "#    ", " ####"),
    "D": ("#### ", "#   #", "#   #", "#   #", "#   #", "#   #", "#### "),
    "E": ("#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#####"),
    "F": ("#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#    "),
    "G": (" ####", "#    ", "#    ", "#  ##", "#   #", "#   #", " ####"),
    "H": ("#   #", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"),
    "I": ("#####", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "#####"),
    "J": ("  ###", "   # ", "   # ", "   # ", "   # ", "#  # ", " ##  "),
    "K": ("#   #", "#  # ", "# #  ", "##   ", "# #  ", "#  # ", "#   #"),
    "L": ("#    ", "#    ", "#    ", "#    ", "#    ", "#    ", "#####"),
    "M": ("#   #", "## ##", "# # #", "#   #", "#   #", "#   #", "#   #"),
    "N": ("#   #", "##  #", "# # #", "#  ##", "#   #", "#   #", "#   #"),
    "O": (" ### ", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "),
    "P": ("#### ", "#   #", "#   #", "#### ", "#    ", "#    ", "#    "),
    "Q": (" ### ", "#   #", "#   #", "#   #", "# # #", "#  # ", " ## #"),
    "R": ("#### ", "#   #", "#   #", "#### ", "# #  ", "#  # ", "#   #"),
    "S": (" ####", "#    ", "#    ", " ### ", "    #", "    #", "#### "),
    "T": ("#####", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  "),
    "U": ("#   #", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "),
    "V": ("#   #", "#   #", "#   #", "#   #", " # # ", " # # ", "  #  "),
    "W": ("#   #", "#   #", "#   #", "# # #", "# # #", "## ##", "#   #"),
    "X": ("#   #", "#   #", " # # ", "  #  ", " # # ", "#   #", "#   #"),
    "Y": ("#   #", "#   #", " # # ", "  #  ", "  #  ", "  #  ", "  #  "),
    "Z": ("#####", "    #", "   # ", "  #  ", " #   ", "#    ", "#####"),
    "0": (" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "),
    "1": ("  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "),
    "2": (" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"),
    "3": ("#### ", "    #", "    #", " ### ", "    #", "    #", "#### "),
    "4": ("   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "),
    "5": ("#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "),
    "6": (" ### ", "#    ", "#    ", "#### ", "#   #", "#   #", " ### "),
    "7": ("#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "),
    "8": (" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "),
    "9": (" ### ", "#   #", "#   #", " ####", "    #", "    #", " ### "),
    " ": ("     ",) * 7,
    "-": ("     ", "     ", "     ", "#####", "     ", "     ", "     "),
    "+": ("     ", "  #  ", "  #  ", "#####", "  #  ", "  #  ", "     "),
    ".": ("     ", "     ", "     ", "     ", "     ", "     ", "  #  "),
    ",": ("     ", "     ", "     ", "     ", "     ", "  #  ", " #   "),
    ":": ("     ", "  #  ", "     ", "     ", "     ", "  #  ", "     "),
    "=": ("     ", "     ", "#####", "     ", "#####", "     ", "     "),
    "(": ("   # ", "  #  ", " #   ", " #   ", " #   ", "  #  ", "   # "),
    ")": (" #   ", "  #  ", "   # ", "   # ", "   # ", "  #  ", " #   "),
    "/": ("    #", "    #", "   # ", "  #  ", " #   ", "#    ", "#    "),
    "%": ("##  #", "## # ", "   # ", "  #  ", " #   ", " # ##", "#  ##"),
    "<": ("   # ", "  #  ", " #   ", "#    ", " #   ", "  #  ", "   # "),
    ">": (" #   ", "  #  ", "   # ", "    #", "   # ", "  #  ", " #   "),
}
_GLYPH_BITMAPS = {ch: np.array([[c == "#" for c in row] for row in rows], dtype=bool)
                  for ch, rows in _GLYPHS.items()}


def text_bitmap(text: str, scale: int = _FONT_SCALE) -> np.ndarray:
    """A boolean ``(7 * scale, width)`` bitmap of ``text`` (upper-cased; unknown characters blank).

    Args:
        text: the text.
        scale: size of one font cell in pixels.

    Returns:
        Boolean array, ``True`` where ink is.
    """
    blank = _GLYPH_BITMAPS[" "]
    cells = [_GLYPH_BITMAPS.get(ch, blank) for ch in text.upper()]
    if not cells:
        return np.zeros((7 * scale, 0), dtype=bool)
    spaced = []
    for cell in cells:
        spaced.append(cell)
        spaced.append(np.zeros((7, 1), dtype=bool))
    bitmap = np.concatenate(spaced[:-1], axis=1)
    return np.kron(bitmap, np.ones((scale, scale), dtype=bool))


def _draw_text(canvas: np.ndarray, text: str, row: int, col: int, color=_TEXT) -> None:
    bitmap = text_bitmap(text)
    h = min(bitmap.shape[0], canvas.shape[0] - row)
    w = min(bitmap.shape[1], canvas.shape[1] - col)
    if h <= 0 or w <= 0:
        return
    region = canvas[row:row + h, col:col + w]
    region[bitmap[:h, :w]] = color


# ------------------------------------------------------------------------------------------------
# slices
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SliceView:
    """How one slice of a grid is shown.

    Attributes:
        axis: the INDEX axis held constant (``None`` for a 2-D image).
        index: the slice's position along it.
        vertical, horizontal: the INDEX axes shown top-to-bottom and left-to-right.
        flip_vertical, flip_horizontal: reverse them for display.
        spacing: ``(vertical, horizontal)`` voxel sizes in mm.
    """

    axis: Optional[int]
    index: int
    vertical: int
    horizontal: int
    flip_vertical: bool
    flip_horizontal: bool
    spacing: Tuple[float, float]


#: The sagittal slice sits this share of the field of view off the centre, towards the patient's left (the
#: same anatomy however the image is stored): at the centre of a head it shows
#: the interhemispheric fissure, where two thin layers of CSF and a slight misalignment draw dark streaks
#: across a well-registered brain.
SAGITTAL_OFFSET = 0.1


def slice_views(grid: ImageGrid) -> List[SliceView]:
    """The display slices of ``grid``: three orthogonal slices in 3-D (axial and coronal through the
    centre, sagittal :data:`SAGITTAL_OFFSET` of the field of view off it), the image in 2-D.

    Each index axis is matched to the WORLD (LPS) axis it runs closest to. Display orientation:
    superior (+z) up in coronal and sagittal slices, anterior (-y) up in axial slices (and in 2-D
    images); the patient's left (+x) to the right, and posterior (+y) to the right in sagittal slices.

    Args:
        grid: the fixed image's grid.

    Returns:
        One :class:`SliceView` per picture row.
    """
    d = grid.dimension
    directions = grid.direction_matrix
    along, _ = best_axis_alignment(directions, np.eye(d))  # along[w]: index axis closest to world axis w
    if d == 2:
        horizontal, vertical = along[0], along[1]
        return [SliceView(None, 0, vertical, horizontal, bool(directions[1, vertical] < 0),
                          bool(directions[0, horizontal] < 0),
                          (grid.spacing[vertical], grid.spacing[horizontal]))]
    views = []
    for held_world in (2, 1, 0):  # axial, coronal, sagittal
        axis = along[held_world]
        if held_world == 2:    # axial: x to the right, y (anterior up) downwards
            horizontal, vertical, up_is_negative = along[0], along[1], True
        elif held_world == 1:  # coronal: x to the right, z up
            horizontal, vertical, up_is_negative = along[0], along[2], False
        else:                  # sagittal: y to the right, z up
            horizontal, vertical, up_is_negative = along[1], along[2], False
        world_v = 1 if held_world == 2 else 2
        world_h = 1 if held_world == 0 else 0
        # rows grow downwards: flip when the index axis points the way that should go up
        v_component = directions[world_v, vertical]
        flip_v = bool(v_component < 0) if up_is_negative else bool(v_component > 0)
        flip_h = bool(directions[world_h, horizontal] < 0)
        index = grid.size[axis] // 2
        if held_world == 0:  # towards the patient's left, off the midline (see SAGITTAL_OFFSET)
            step = int(round(SAGITTAL_OFFSET * grid.size[axis])) * (1 if directions[0, axis] > 0 else -1)
            index = min(grid.size[axis] - 1, max(0, index + step))
        views.append(SliceView(axis, index, vertical, horizontal, flip_v, flip_h,
                               (grid.spacing[vertical], grid.spacing[horizontal])))
    return views


def _plane(array: np.ndarray, view: SliceView, d: int) -> np.ndarray:
    """The 2-D display plane of an ARRAY-ordered array (rows = ``view.vertical``).

    In 3-D, ``array`` may be a one-voxel-thick slab along ``view.axis``.
    """
    array = np.asarray(array)
    if d == 2:
        plane = array  # ARRAY order [j, i]: rows run along index axis 1
        rows_axis = 1
    else:
        index = [slice(None)] * 3
        along = d - 1 - view.axis
        index[along] = view.index if array.shape[along] > view.index else 0
        plane = array[tuple(index)]
        rows_axis = [a for a in (2, 1, 0) if a != view.axis][0]
    if rows_axis != view.vertical:
        plane = plane.T
    if view.flip_vertical:
        plane = plane[::-1]
    if view.flip_horizontal:
        plane = plane[:, ::-1]
    return plane


def _resize_linear(plane: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """Bilinear resizing of a 2-D array to ``shape`` (pixel centres aligned)."""
    out = np.asarray(plane, dtype=np.float64)
    for axis, n_out in enumerate(shape):
        n_in = out.shape[axis]
        if n_in == n_out:
            continue
        pos = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        pos = np.clip(pos, 0, n_in - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        w = pos - lo
        a = np.take(out, lo, axis=axis)
        b = np.take(out, hi, axis=axis)
        shape_w = [1, 1]
        shape_w[axis] = n_out
        out = a * (1 - w.reshape(shape_w)) + b * w.reshape(shape_w)
    return out


def _display_shape(view: SliceView, plane_shape: Tuple[int, int], pixel_mm: float) -> Tuple[int, int]:
    return (max(1, int(round(plane_shape[0] * view.spacing[0] / pixel_mm))),
            max(1, int(round(plane_shape[1] * view.spacing[1] / pixel_mm))))


def _window(array: np.ndarray) -> Tuple[float, float]:
    finite = np.asarray(array, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [1.0, 99.0])
    if not hi > lo:
        lo, hi = float(finite.min()), float(finite.max())
    if not hi > lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def _grey(plane: np.ndarray, window: Tuple[float, float]) -> np.ndarray:
    lo, hi = window
    return np.clip((np.asarray(plane, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)


def _rgb(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.stack([r, g, b], axis=-1) * 255.0), 0, 255).astype(np.uint8)


def _log_jacobian_colors(log_det: np.ndarray, folded: np.ndarray) -> np.ndarray:
    """Blue (-1) - white (0) - red (+1) for the log-Jacobian; folds yellow; unknown grey."""
    t = np.clip(np.nan_to_num(log_det, nan=0.0), -1.0, 1.0)
    r = np.where(t < 0, 1.0 + t, 1.0)
    g = 1.0 - np.abs(t)
    b = np.where(t > 0, 1.0 - t, 1.0)
    rgb = _rgb(r, g, b)
    rgb[np.isnan(log_det)] = 96
    rgb[folded] = _FOLD
    return rgb


# ------------------------------------------------------------------------------------------------
# sampling on the fixed slices
# ------------------------------------------------------------------------------------------------

def _slab(image, view: SliceView, lo: int, hi: int):
    """The part ``[lo, hi)`` along ``view.axis`` of a ``SimpleITK.Image``, keeping its physical placement."""
    import SimpleITK as sitk

    start = [0] * image.GetDimension()
    size = list(image.GetSize())
    if view.axis is not None:
        start[view.axis] = lo
        size[view.axis] = hi - lo
    return sitk.RegionOfInterest(image, size, start)


def _sample(moving, reference, transform) -> np.ndarray:
    """``moving`` sampled at the voxel centres of ``reference`` through ``transform`` (linear, 0 outside;
    ``SimpleITK`` objects)."""
    import SimpleITK as sitk

    out = sitk.Resample(sitk.Cast(moving, sitk.sitkFloat32), reference,
                        sitk.Transform() if transform is None else transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return np.asarray(sitk.GetArrayViewFromImage(out), dtype=np.float64)


def _log_jacobian_slice(field, fixed, view: SliceView, d: int) -> Tuple[np.ndarray, np.ndarray]:
    """``log(max(det J, 0.001))`` and ``det J <= 0`` on one slice, from a 3-slice slab of the field."""
    grid = field.grid
    if d == 2:
        if min(grid.size) < 2:
            nan = np.full(grid.array_shape, np.nan)
            return nan, np.zeros(grid.array_shape, bool)
        det = determinant_of_displacement(field.array, grid)
        return log_jacobian(det), det <= 0
    n = grid.size[view.axis]
    lo, hi = max(view.index - 1, 0), min(view.index + 2, n)
    slab_image = _slab(fixed, view, lo, hi)
    slab_grid = ImageGrid.from_image(slab_image)
    index = [slice(None)] * 3
    index[d - 1 - view.axis] = slice(lo, hi)
    if min(slab_grid.size) < 2:
        shape = list(slab_grid.array_shape)
        shape[d - 1 - view.axis] = 1
        return np.full(shape, np.nan), np.zeros(shape, bool)
    det = determinant_of_displacement(np.asarray(field.array[tuple(index)]), slab_grid)
    take = [slice(None)] * 3
    take[d - 1 - view.axis] = slice(view.index - lo, view.index - lo + 1)
    det = det[tuple(take)]
    return log_jacobian(det), det <= 0


def qc_picture(fixed, moving, result, *, transform_of=field_transform) -> np.ndarray:
    """The QC picture as an RGB ``uint8`` array ``(height, width, 3)``.

    Args:
        fixed: the fixed ``itk.Image`` or ``SimpleITK.Image`` (any scalar pixel type), whose grid the
            forward field lives on.
        moving: the moving image, of either library.
        result: a :class:`~itk_gradicon.registration.RegistrationResult` of this pair.
        transform_of: builds the forward field's SimpleITK transform
            (:class:`~itk_gradicon.io.transform_files.SharedFieldTransforms` shares it with other writers).

    Returns:
        The picture described in the module docstring.
    """
    import SimpleITK as sitk

    fixed, moving = to_simpleitk(fixed), to_simpleitk(moving)  # ITK Python images converted; the command's as read
    d = int(fixed.GetDimension())
    grid = ImageGrid.from_image(fixed)
    if grid != result.forward_field.grid and not _grids_close(grid, result.forward_field.grid):
        raise InputError("the QC picture needs the fixed image the registration was computed on "
                         "(its grid differs from the forward field's)")
    fixed_array = sitk.GetArrayViewFromImage(fixed)
    moving_array = sitk.GetArrayViewFromImage(moving)
    forward = transform_of(result.forward_field)
    fixed_window, moving_window = _window(fixed_array), _window(moving_array)
    views = slice_views(grid)

    rows = []
    for view in views:
        if d == 2:
            reference = fixed
        else:
            reference = _slab(fixed, view, view.index, view.index + 1)
        fixed_plane = np.array(sitk.GetArrayViewFromImage(reference), dtype=np.float64)
        before = _sample(moving, reference, None)
        after = _sample(moving, reference, forward)
        log_det, folded = _log_jacobian_slice(result.forward_field, fixed, view, d)
        on_slab = view if d == 2 else dataclasses.replace(view, index=0)
        planes = [_plane(a, on_slab, d) for a in (fixed_plane, before, after, log_det, folded.astype(np.float64))]
        rows.append((view, planes))

    extents = [max(p[0].shape[0] * v.spacing[0], p[0].shape[1] * v.spacing[1]) for v, p in rows]
    pixel_mm = max(extents) / PANEL_PIXELS
    rendered_rows = []
    for view, (f, b, a, lj, fo) in rows:
        shape = _display_shape(view, f.shape, pixel_mm)
        f, b, a, lj, fo = (_resize_linear(x, shape) if not np.all(np.isnan(x)) else np.full(shape, np.nan)
                           for x in (f, b, a, lj, fo))
        fg, bg, ag = _grey(f, fixed_window), _grey(b, moving_window), _grey(a, moving_window)
        panels = [_rgb(fg, fg, fg), _rgb(bg, bg, bg), _rgb(ag, ag, ag),
                  _rgb(fg, bg, fg), _rgb(fg, ag, fg),
                  _log_jacobian_colors(lj, np.nan_to_num(fo) > 0.5)]
        rendered_rows.append(panels)
    return _compose(rendered_rows)


def _grids_close(a: ImageGrid, b: ImageGrid) -> bool:
    return (a.size == b.size and np.allclose(a.spacing, b.spacing, rtol=1e-5)
            and np.allclose(a.origin, b.origin, atol=1e-3)
            and np.allclose(a.direction_matrix, b.direction_matrix, atol=1e-5))


def _compose(rows: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """Lay the panels out with column titles and a legend line."""
    text_h = 7 * _FONT_SCALE
    col_w = max(max(p.shape[1] for p in row) for row in rows)
    col_w = max(col_w, max(text_bitmap(c).shape[1] for c in COLUMNS) + 2)
    n_cols = max(len(row) for row in rows)
    width = n_cols * col_w + (n_cols + 1) * _GAP
    row_heights = [max(p.shape[0] for p in row) for row in rows]
    legend = ["OVERLAYS: FIXED MAGENTA, MOVING GREEN (GREY = ALIGNED)",
              "LOG JACOBIAN: BLUE <= -1 (SHRINK), WHITE 0, RED >= +1 (GROW), YELLOW = FOLD"]
    height = (_GAP + text_h + _GAP + sum(h + _GAP for h in row_heights)
              + len(legend) * (text_h + _GAP) + _GAP)
    width = max(width, max(text_bitmap(line).shape[1] for line in legend) + 2 * _GAP)
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:] = _BACKGROUND
    for c, title in enumerate(COLUMNS[:n_cols]):
        _draw_text(canvas, title, _GAP, _GAP + c * (col_w + _GAP))
    top = _GAP + text_h + _GAP
    for row, h in zip(rows, row_heights):
        for c, panel in enumerate(row):
            left = _GAP + c * (col_w + _GAP) + (col_w - panel.shape[1]) // 2
            offset = (h - panel.shape[0]) // 2
            canvas[top + offset:top + offset + panel.shape[0], left:left + panel.shape[1]] = panel
        top += h + _GAP
    for line in legend:
        _draw_text(canvas, line, top, _GAP)
        top += text_h + _GAP
    return canvas


def write_qc(fixed, moving, result, path: PathLike, *, transaction=None, transform_of=field_transform) -> Path:
    """Write the QC picture of a registration as a PNG.

    Args:
        fixed, moving: the registered pair, ``itk.Image`` or ``SimpleITK.Image`` (original intensities are fine).
        result: the :class:`~itk_gradicon.registration.RegistrationResult`.
        path: destination ``.png``.
        transaction: an :class:`~itk_gradicon.io.images.OutputTransaction` to stage the file in;
            without one the file is written atomically at once.
        transform_of: builds the forward field's transform (as :func:`qc_picture`'s).

    Returns:
        The final path.
    """
    import SimpleITK as sitk

    picture = qc_picture(fixed, moving, result, transform_of=transform_of)
    image = sitk.GetImageFromArray(np.ascontiguousarray(picture), isVector=True)  # 8-bit RGB
    path = Path(path).expanduser().absolute()
    if transaction is None:
        with OutputTransaction() as out:
            sitk.WriteImage(image, str(out.path(path)))
    else:
        sitk.WriteImage(image, str(transaction.path(path)))
    return path


__all__ = ["COLUMNS", "SAGITTAL_OFFSET", "qc_picture", "write_qc", "slice_views", "text_bitmap", "SliceView"]
