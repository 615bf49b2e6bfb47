"""Reading and validating images.

Reading: :func:`read_image_header` reads only a file's header (dimension, size, components), so that
a wrong file or an image too large for the memory is refused before any pixel is read;
:func:`read_image` returns an image of float32 pixels after checking everything a registration needs
(the file exists and is an image, the dimension is the one asked for, one component per pixel, finite,
not constant). Label maps and masks keep an integer pixel type.

Every file is read by SimpleITK (:func:`read_simpleitk_image`); ``backend="itk"`` hands the result to
ITK Python users as an ``itk.Image`` through :mod:`itk_gradicon.io.itk_bridge`, the one module that
converts between the two. The helpers below (:func:`image_array`, :func:`same_grid`, ...) take the package's
one image type, ``SimpleITK.Image``; public functions convert an ``itk.Image`` at their door.

Writing (:class:`OutputTransaction` and the destination checks) lives in :mod:`itk_gradicon.io.outputs`; its
names stay importable from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from ..errors import InputError
from .grid import ImageGrid
from .itk_bridge import cast_image, itk_array, like_input  # noqa: F401
from .itk_bridge import to_itk, to_simpleitk  # noqa: F401  (re-exported: their former home)
from .outputs import (  # noqa: F401  (re-exported: the names users of this module know)
    IMAGE_SUFFIXES, STAGING_PREFIX, VOLUME_SUFFIXES, OutputTransaction, PathLike, atomic_output,
    check_output_dir, check_output_path, compound_suffix, remove_stale_staging)


def _check_readable_file(path: PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{what} '{path}' does not exist")
    if p.is_dir():
        raise InputError(f"{what} '{path}' is a folder, not an image file")
    if not os.access(p, os.R_OK):
        raise InputError(f"{what} '{path}' is not readable (permission denied)")
    try:
        with open(p, "rb") as fh:
            fh.read(1)
    except OSError as err:
        raise InputError(f"{what} '{path}' is not readable ({err.strerror or err})") from None
    return p


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says, read without its pixels.

    Attributes:
        path: the file.
        dimension: number of image axes.
        size: voxels along each axis (ITK order).
        components: values per voxel (1 for a scalar image).
        component_type: ITK's name of the stored value type (``"float"``, ``"short"``, ...).
        spacing, origin: per axis (ITK order).
        direction: ``d x d`` rows; column ``a`` is the world direction of index axis ``a``.
    """

    path: Path
    dimension: int
    size: Tuple[int, ...]
    components: int
    component_type: str
    spacing: Tuple[float, ...]
    origin: Tuple[float, ...]
    direction: Tuple[Tuple[float, ...], ...]

    @property
    def grid(self):
        """The :class:`~itk_gradicon.spatial.frames.ImageGrid` the header describes (validated)."""
        grid = ImageGrid(size=self.size, spacing=self.spacing, origin=self.origin, direction=self.direction)
        grid.validate()
        return grid

    @property
    def num_voxels(self) -> int:
        return int(np.prod(self.size, dtype=np.int64))


def not_an_image_error(path: PathLike, what: str) -> InputError:
    """The error for a file that no image reader recognises."""
    return InputError(f"{what} '{path}' is not an image file ITK can read (no image reader recognises "
                      f"its content; known endings include {', '.join(IMAGE_SUFFIXES[:6])})")


def unreadable_header_error(path: PathLike, what: str, err: BaseException) -> InputError:
    """The error for an image file whose header a reader recognised but could not read."""
    return InputError(f"{what} '{path}' could not be read as an image: {short_error_message(err)}")


def is_time_series(input_header: "ImageHeader", reference_header: "ImageHeader") -> bool:
    """Whether ``--input`` is a series of volumes on ``--reference``'s spatial axes: a 4-D image (fMRI, DWI,
    a stack of maps) with a 3-D reference, resampled volume by volume as ``antsApplyTransforms -e 3`` does."""
    return reference_header.dimension == 3 and input_header.dimension == 4


def check_resample_headers(input_header: "ImageHeader", reference_header: "ImageHeader") -> None:
    """Refuse, from the headers, an ``--input`` that is not scalar, or not of ``--reference``'s dimension
    (a 4-D series of 3-D volumes excepted, :func:`is_time_series`), or whose fourth axis mixes with space."""
    if input_header.components != 1:
        raise InputError(f"--input '{input_header.path}' has {input_header.components} components per voxel; "
                         "only scalar images are resampled (split vector images into components first)")
    if is_time_series(input_header, reference_header):
        direction = np.asarray(input_header.direction, dtype=float)
        if np.abs(direction[:3, 3]).max() > 1e-6 or np.abs(direction[3, :3]).max() > 1e-6:
            raise InputError(f"--input '{input_header.path}' is 4-D with a direction matrix that mixes its fourth "
                             "axis with space; a series of volumes needs the fourth axis apart (time, or volume "
                             "number)")
        return
    if input_header.dimension != reference_header.dimension:
        raise InputError(f"--input '{input_header.path}' is {input_header.dimension}-D and "
                         f"--reference '{reference_header.path}' is {reference_header.dimension}-D; "
                         "they must match (or a 4-D series of volumes with a 3-D reference)")


#: SimpleITK's names of pixel component types -> ITK's (``ImageIOBase::GetComponentTypeAsString``).
_ITK_COMPONENT_NAMES = {
    "8-bit unsigned integer": "unsigned_char", "8-bit signed integer": "char",
    "16-bit unsigned integer": "unsigned_short", "16-bit signed integer": "short",
    "32-bit unsigned integer": "unsigned_int", "32-bit signed integer": "int",
    "64-bit unsigned integer": "unsigned_long", "64-bit signed integer": "long",
    "32-bit float": "float", "64-bit float": "double",
}


def read_image_header(path: PathLike, *, what: str = "image") -> ImageHeader:
    """Read an image file's header only (fast, whatever the image's size), through SimpleITK's reader (ITK's
    image IO without loading ITK Python).

    Args:
        path: any format ITK reads.
        what: how the file is named in error messages (``"--fixed"``).

    Returns:
        An :class:`ImageHeader`.

    Raises:
        InputError: the file is missing, unreadable, or not an image ITK recognises.
    """
    import SimpleITK as sitk  # imported on first use: importing the package stays instant

    p = _check_readable_file(path, what)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        if "Unable to determine ImageIO reader" in str(err):
            raise not_an_image_error(path, what) from None
        raise unreadable_header_error(path, what, err) from err
    d = int(reader.GetDimension())
    pixel = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    component = pixel[len("vector of "):] if pixel.startswith("vector of ") else pixel
    return ImageHeader(path=p, dimension=d, size=tuple(int(n) for n in reader.GetSize()),
                       components=int(reader.GetNumberOfComponents()),
                       component_type=_ITK_COMPONENT_NAMES.get(component, component),
                       spacing=tuple(float(v) for v in reader.GetSpacing()),
                       origin=tuple(float(v) for v in reader.GetOrigin()),
                       direction=tuple(tuple(float(v) for v in row)
                                       for row in np.asarray(reader.GetDirection()).reshape(d, d)))


def check_header(header: ImageHeader, *, what: str, dimension: Optional[int] = None,
                 needed_by: str = "") -> None:
    """Refuse, from its header, an image that is not scalar or not of the wanted dimension.

    Args:
        header: from :func:`read_image_header`.
        what: how the image is named in error messages.
        dimension: the required dimension (``None``: 2 or 3).
        needed_by: who requires that dimension, for the message (e.g. ``"the model 'tiny2d'"``).

    Raises:
        InputError: with a one-line reason.
    """
    if header.components != 1:
        raise InputError(f"{what} '{header.path}' is a vector/multi-component image ({header.components} "
                         "components per voxel); a scalar image is required")
    allowed = (dimension,) if dimension is not None else (2, 3)
    if header.dimension not in allowed:
        who = f"{needed_by} registers" if needed_by else "this needs"
        series = (" (a series of volumes: register one volume, or the series' mean, and apply the transform "
                  "to the whole series with gradicon apply-transform)"
                  if header.dimension == 4 and 3 in allowed and needed_by else "")
        raise InputError(f"{what} '{header.path}' is a {header.dimension}-D image of size {header.size}; "
                         f"{who} {' or '.join(f'{d}-D' for d in allowed)} images{series}")


def read_itk_image(path: PathLike, what: str = "image"):
    """Any image ITK reads, in its stored pixel type (scalar or vector), as an ``itk.Image``: read by
    :func:`read_simpleitk_image` (the same ITK readers, the same errors) and converted.

    Raises:
        InputError: the file is missing, unreadable, not an image, or a truncated NIfTI file.
    """
    return to_itk(read_simpleitk_image(path, what))


def _nifti_layout(head: bytes) -> Optional[Tuple[int, int]]:
    """``(data offset, data bytes)`` from a NIfTI-1 or NIfTI-2 header, ``None`` if it is not one."""
    import struct

    for endian in ("<", ">"):
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            dims = struct.unpack(endian + "8q", head[16:80])
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            offset = int(struct.unpack(endian + "q", head[168:176])[0])
            break
    else:
        return None
    n = int(dims[0])
    if not 1 <= n <= 7 or bitpix <= 0:
        return None
    voxels = int(np.prod([max(int(v), 1) for v in dims[1:n + 1]], dtype=np.int64))
    return max(offset, 0), voxels * int(bitpix) // 8


def check_nifti_complete(path: PathLike, *, what: str = "image") -> None:
    """Refuse a NIfTI file (``.nii``, ``.nii.gz``) whose voxel data is cut short.

    ITK reads such a file without complaint and fills the missing voxels with zeros (an interrupted
    copy or download would be registered silently); other formats' readers fail on their own.

    Args:
        path: the file; other endings are not checked.
        what: how the file is named in error messages.

    Raises:
        InputError: the file holds fewer bytes than its header announces, or its compressed
            stream is damaged.
    """
    import gzip
    import zlib

    p = Path(path)
    name = p.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    try:
        with gzip.open(p, "rb") as fh:
            head = fh.read(540)
            layout = _nifti_layout(head)
            if layout is None:
                return
            held = len(head)
            while True:
                block = fh.read(1 << 22)
                if not block:
                    break
                held += len(block)
    except gzip.BadGzipFile:  # not compressed (ITK reads plain files whatever their ending)
        with open(p, "rb") as fh:
            layout = _nifti_layout(fh.read(540))
        if layout is None:
            return
        held = p.stat().st_size
    except (EOFError, zlib.error) as err:
        raise InputError(f"{what} '{path}' is damaged or truncated (its compressed data ends early: "
                         f"{err})") from None
    offset, data = layout
    if held < offset + data:
        raise InputError(f"{what} '{path}' is truncated: its header announces {offset + data} bytes, "
                         f"the file holds {held}")


def short_error_message(err: BaseException) -> str:
    """The informative line of an ITK or OS error (ITK's messages span several lines)."""
    text = str(err).strip()
    for line in text.splitlines():
        line = line.strip()
        if line.lower().startswith(("description:", "itk::error")) or "Could not create IO" in line:
            return line.split(":", 1)[-1].strip() if line.lower().startswith("description") else line
    return text.splitlines()[-1] if text else type(err).__name__


def pixel_components(image) -> int:
    """Number of components per pixel (1 for scalar images)."""
    return int(image.GetNumberOfComponentsPerPixel())


def image_dimension(image) -> int:
    """The dimension of a ``SimpleITK.Image``."""
    return int(image.GetDimension())


def image_size(image) -> Tuple[int, ...]:
    """Voxels along each index axis of a ``SimpleITK.Image``."""
    return tuple(int(s) for s in image.GetSize())


def image_array(image) -> np.ndarray:
    """A numpy view (ARRAY order) of a ``SimpleITK.Image``'s voxels."""
    import SimpleITK as sitk

    return sitk.GetArrayViewFromImage(image)


#: Image libraries the readers return: ITK Python (``itk.Image``) or SimpleITK (``SimpleITK.Image``:
#: the same ITK readers and filters, loaded in a fraction of a second; what the commands use).
BACKENDS = ("itk", "simpleitk")


def read_simpleitk_image(path: PathLike, what: str = "image"):
    """Any image ITK reads, in its stored pixel type, as a ``SimpleITK.Image``.

    Raises:
        InputError: the file is missing, unreadable, not an image, or a truncated NIfTI file.
    """
    import SimpleITK as sitk  # imported on first use: importing the package stays instant

    p = _check_readable_file(path, what)
    try:
        image = sitk.ReadImage(str(p))
    except RuntimeError as err:
        raise InputError(f"{what} '{path}' could not be read as an image: {short_error_message(err)}") from err
    check_nifti_complete(p, what=what)
    return image


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown image backend {backend!r}; allowed: {', '.join(BACKENDS)}")


def _in_backend(image, backend: str):
    return to_itk(image) if backend == "itk" else image


def read_image(path: PathLike, *, what: str = "image", dimension: Optional[int] = None,
               check_constant: bool = True, return_original: bool = False, backend: str = "itk"):
    """Read a scalar image as float32 and check that it can be registered.

    Args:
        path: any format ITK reads (NIfTI, NRRD, MetaImage, ...; DICOM series are not read here).
        what: how the image is named in error messages (``"--fixed"``).
        dimension: required spatial dimension, or ``None`` to accept 2 or 3.
        check_constant: refuse images whose voxels all have one value.
        return_original: also return the image in the file's own pixel type.
        backend: ``"itk"`` (``itk.Image``) or ``"simpleitk"`` (``SimpleITK.Image``).

    Returns:
        ``itk.Image[itk.F, d]`` (or a float32 ``SimpleITK.Image``) with the file's origin, spacing and
        direction; with ``return_original``, the pair ``(float image, image as stored)``.

    Raises:
        InputError: with a one-line reason naming the file and what was expected.
    """
    _check_backend(backend)
    checked, image = read_float32(path, what=what, dimension=dimension, check_constant=check_constant)
    if return_original:
        return _in_backend(checked, backend), _in_backend(image, backend)
    return _in_backend(checked, backend)


def read_float32(path: PathLike, *, what: str = "image", dimension: Optional[int] = None,
                 check_constant: bool = True):
    """:func:`read_image` inside the package: ``(float32 SimpleITK.Image, the image as stored)``."""
    image = read_simpleitk_image(path, what)
    return check_image(image, what=f"{what} '{path}'", dimension=dimension, check_constant=check_constant), image


def check_image(image, *, what: str = "image", dimension: Optional[int] = None,
                check_constant: bool = True):
    """Check an in-memory ``SimpleITK.Image`` as :func:`read_image` checks files; returns it as float32.
    (:func:`itk_gradicon.register` converts an ``itk.Image`` before it comes here.)

    ``what`` names the image in error messages.
    """
    import SimpleITK as sitk

    if not isinstance(image, sitk.Image):
        raise InputError(f"{what} must be an itk.Image or a SimpleITK.Image, not {type(image).__name__}")
    _check_scalar_and_dimension(image, what, dimension)
    _check_grid(image, what)
    array = image_array(image)
    if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise InputError(f"{what} has {bad} NaN or infinite voxels; registration needs finite intensities")
    if check_constant and array.size and float(array.min()) == float(array.max()):
        raise InputError(f"{what} is constant (every voxel is {float(array.min()):g}); "
                         "there is nothing to register")
    return image if image.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(image, sitk.sitkFloat32)


def read_label_image(path: PathLike, *, what: str = "label map", dimension: Optional[int] = None,
                     backend: str = "itk"):
    """Read a label map or mask, keeping its integer pixel type.

    Floating-point label files are accepted when every value is integral (files written by
    tools that store labels as float, cast to int16, or int32 where int16 cannot hold them);
    otherwise an :class:`InputError` names the first non-integer value. ``backend`` as in
    :func:`read_image`.
    """
    _check_backend(backend)
    return _in_backend(read_label_map(path, what=what, dimension=dimension), backend)


def read_label_map(path: PathLike, *, what: str = "label map", dimension: Optional[int] = None):
    """:func:`read_label_image` inside the package: a ``SimpleITK.Image``."""
    image = read_simpleitk_image(path, what)
    _check_scalar_and_dimension(image, f"{what} '{path}'", dimension)
    array = image_array(image)
    check_label_values(array, f"{what} '{path}'", nan_note="")
    if np.issubdtype(array.dtype, np.floating):
        lo, hi = float(array.min()), float(array.max())
        small = -32768 <= lo and hi <= 32767
        import SimpleITK as sitk

        image = sitk.Cast(image, sitk.sitkInt16 if small else sitk.sitkInt32)
    return image


def check_label_values(array: np.ndarray, what: str, *, nan_note: str = "; a label map holds integers") -> None:
    """Refuse a floating-point label array that holds NaN, infinities or values that are not whole numbers
    (integer arrays always pass); ``what`` names it in the message, ``nan_note`` ends the NaN one."""
    if not np.issubdtype(array.dtype, np.floating):
        return
    if not np.all(np.isfinite(array)):
        raise InputError(f"{what} has NaN or infinite values{nan_note}")
    frac = array[array != np.round(array)]
    if frac.size:
        raise InputError(f"{what} is not a label map: it holds non-integer values such as {float(frac.flat[0]):g}")


def _check_grid(image, what: str) -> None:
    """Refuse grids ITK can hold but no registration can use (zero spacing, singular direction)."""
    try:
        ImageGrid.from_image(image)
    except InputError as err:
        raise InputError(f"{what}: {err}") from None


def _check_scalar_and_dimension(image, what, dimension):
    components = pixel_components(image)
    if components != 1:
        raise InputError(f"{what} is a vector/multi-component image ({components} "
                         "components per voxel); a scalar image is required")
    dim = image_dimension(image)
    allowed = (dimension,) if dimension is not None else (2, 3)
    if dim not in allowed:
        raise InputError(f"{what} is a {dim}-D image of size {image_size(image)}; "
                         f"this needs a {' or '.join(f'{d}-D' for d in allowed)} image")


def same_grid(a, b, *, tolerance: float = 1e-4) -> bool:
    """Whether two images share size, origin, spacing and direction (see :meth:`ImageGrid.matches`)."""
    if image_dimension(a) != image_dimension(b):
        return False
    return ImageGrid.from_image(a).matches(ImageGrid.from_image(b), tolerance=tolerance)


def describe_grid(image) -> str:
    """A one-line description of an image grid for error messages."""
    size = image_size(image)
    spacing = tuple(round(float(s), 4) for s in image.GetSpacing())
    origin = tuple(round(float(s), 3) for s in image.GetOrigin())
    return f"size {size}, spacing {spacing}, origin {origin}"


def read_mask_on_grid(path: PathLike, reference, *, what: str = "mask"):
    """Read a mask and check that it lies on ``reference``'s grid (a ``SimpleITK.Image``); returns a
    uint8 0/1 ``SimpleITK.Image``."""
    mask = read_label_map(path, what=what, dimension=image_dimension(reference))
    if not same_grid(mask, reference):
        raise InputError(f"{what} '{path}' is not on its image's grid: mask has "
                         f"{describe_grid(mask)}, image has {describe_grid(reference)} "
                         "(resample it with 'gradicon apply-transform --interpolation nearest')")
    array = (image_array(mask) > 0).astype(np.uint8)
    if not array.any():
        raise InputError(f"{what} '{path}' is empty (no voxel > 0)")
    return image_like(array, reference)


def image_like(array: np.ndarray, reference):
    """A scalar ``SimpleITK.Image`` holding ``array`` (ARRAY order) on ``reference``'s grid."""
    import SimpleITK as sitk

    out = sitk.GetImageFromArray(np.ascontiguousarray(array))
    out.CopyInformation(reference)
    return out


def write_image(image, path: PathLike, *, compress: bool = True) -> None:
    """Write an image (``SimpleITK.Image`` or ``itk.Image``) atomically (see :class:`OutputTransaction`)."""
    import SimpleITK as sitk

    with atomic_output(path) as tmp:
        sitk.WriteImage(to_simpleitk(image), str(tmp), useCompression=compress)
