"""Dense displacement fields as ITK transforms, and the files other tools read.

A :class:`DisplacementField` holds, for every voxel centre ``p`` of a grid, the WORLD (LPS mm)
vector ``T(p) - p`` of a transform ``T``. Registration produces two of them:

* forward, on the FIXED grid: ``T`` maps fixed points to moving points (what ITK's, ANTs' and
  elastix's resamplers need to warp the moving image onto the fixed grid);
* inverse, on the MOVING grid: moving points to fixed points (to carry landmarks or label points
  from the moving to the fixed image).

Between grid nodes ITK interpolates the vectors linearly. Beyond the grid (continuous index outside
``[-0.5, n - 0.5)``) ITK's ``DisplacementFieldTransform``, and so ANTs, applies no displacement at all:
the point is returned unchanged.

Files written here:

* ITK transform files ``.h5``/``.hdf5`` (``itk.transformread``, 3D Slicer, ANTs);
* displacement-field images (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``): ANTs' ``Warp`` format,
  vector components in LPS mm; NIfTI files get intent code 1007 (vector), never 1006, which recent
  ITK/ANTs read as RAS.

Files read here (:func:`read_transform`, :func:`compose_transforms`): everything above, ITK transform
files ``.tfm``/``.txt``/``.mat``/``.xfm`` (single or composite; ANTs' ``0GenericAffine.mat``),
ANTs' ``Warp``/``InverseWarp`` images, and transformix parameter files of a deformation field (ours).
A transform is named as in ANTs: ``FILE`` or ``[FILE,1]`` for its inverse, which exists for linear
transforms only.

Order of several transforms, as ``antsApplyTransforms -t T1 -t T2 ... -t Tn`` (checked against
antspyx in the tests): a fixed point ``x`` goes to ``Tn(...T2(T1(x)))``, the first transform listed
acting on the point first. So antsRegistration's ``-t 1Warp.nii.gz -t 0GenericAffine.mat`` is
``affine(warp(x))``. In the ITK :class:`CompositeTransform` built here the transforms are added in
the reverse order, because ITK applies the transform added last first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from ..errors import InputError
from ..io import transform_files
from ..io.grid import ImageGrid
from ..io.images import OutputTransaction, compound_suffix, image_array
from ..io.itk_bridge import (  # noqa: F401  (affine_*_itk, the type: re-exported, their former home)
    affine_from_itk, affine_to_itk, displacement_field_transform_type, itk_displacement_field_transform,
    to_itk_transform, to_simpleitk, to_simpleitk_transform, write_compressed_transform)
from ..io.outputs import TRANSFORM_WRITE_LOCK, PathLike  # noqa: F401  (the lock: re-exported, its former home)
from ..io.transform_files import field_transform, read_transform_file, sample_displacement, transform_parts
from ..io.transform_specs import (  # noqa: F401  (re-exported: the names users of this module know)
    ELASTIX_FIELD_FILE, ELASTIX_PARAMETER_FILE, FIELD_IMAGE_SUFFIXES, ITK_TRANSFORM_SUFFIXES, TRANSFORM_FILE_SUFFIXES,
    TRANSFORM_INPUT_SUFFIXES, TRANSFORM_OUTPUT_SUFFIXES, TransformSpec, ants_file_names, check_field_components,
    elastix_field_path, inverse_hint, read_elastix_parameters, transform_file_kind)




@dataclass
class DisplacementField:
    """Displacement vectors on an image grid.

    Attributes:
        grid: the grid the vectors are sampled on.
        array: ``grid.array_shape + (d,)`` (ARRAY order ``[k, j, i]``), WORLD components (x, y, z) in mm.
    """

    grid: ImageGrid
    array: np.ndarray

    def __post_init__(self) -> None:
        expected = self.grid.array_shape + (self.grid.dimension,)
        if tuple(self.array.shape) != expected:
            raise ValueError(f"field array has shape {self.array.shape}, expected {expected}")

    def to_simpleitk_image(self, dtype=np.float64):
        """The field as a ``SimpleITK`` vector image with the grid's geometry (``dtype`` components:
        ``float32`` or ``float64``).

        The vectors are copied once as stored and converted by SimpleITK (multi-threaded, in place of a
        second full-size copy in numpy); float32 -> float64 is exact.
        """
        import SimpleITK as sitk

        wanted = {np.dtype(np.float32): sitk.sitkVectorFloat32, np.dtype(np.float64): sitk.sitkVectorFloat64}
        if np.dtype(dtype) not in wanted:
            raise ValueError(f"field components must be float32 or float64, got {np.dtype(dtype)}")
        array = self.array if self.array.dtype in wanted else self.array.astype(dtype)
        image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=True)
        if image.GetPixelID() != wanted[np.dtype(dtype)]:
            image = sitk.Cast(image, wanted[np.dtype(dtype)])
        self.grid.apply_to(image)
        return image

    def to_transform(self):
        """An ``itk.DisplacementFieldTransform[itk.D, d]`` holding this field (for ITK Python users)."""
        grid = self.grid
        return itk_displacement_field_transform(self.array, grid.spacing, grid.origin, grid.direction_matrix)

    @classmethod
    def from_transform(cls, transform) -> "DisplacementField":
        """Read the field out of a ``DisplacementFieldTransform`` (ITK Python or SimpleITK)."""
        return cls.from_image(transform.GetDisplacementField())

    @classmethod
    def from_image(cls, image) -> "DisplacementField":
        """Wrap a vector image (``SimpleITK.Image`` or ``itk.Image``; e.g. an ANTs ``Warp.nii.gz``)."""
        image = to_simpleitk(image)
        array = np.array(image_array(image), dtype=np.float64)
        grid = ImageGrid.from_image(image)
        if array.shape != grid.array_shape + (grid.dimension,):
            raise InputError(f"a displacement field needs {grid.dimension} components per voxel, "
                             f"got an array of shape {array.shape}")
        return cls(grid, array)

    def max_norm(self) -> float:
        return float(np.sqrt((self.array ** 2).sum(-1)).max())


def write_field_image(field: DisplacementField, path: Path) -> None:
    """Write a field as a vector image at ``path`` (already a staged path; see OutputTransaction).

    float32 components, LPS mm; NIfTI as dims ``(X, Y, Z, 1, 3)`` with intent 1007 (ITK's writer,
    through SimpleITK: the same bytes as ``itk.imwrite``, without loading ITK Python).
    """
    import SimpleITK as sitk

    sitk.WriteImage(field.to_simpleitk_image(np.float32), str(path), useCompression=True)


def write_transform_file(field: DisplacementField, path: Path, *, compression: bool = False,
                         transform_of: Callable[[DisplacementField], object] = field_transform) -> None:
    """Write a field as an ITK ``DisplacementFieldTransform`` in an HDF5 transform file.

    Uncompressed by default, as ``itk.transformwrite`` and antsRegistration write ``.h5`` files:
    ``compression`` (HDF5 deflate) halves the file but costs seconds (``benchmarks/README.md``, "Design
    figures"). A ``.nii.gz`` field image is the compact alternative.

    Written through SimpleITK (ITK's own HDF5 transform writer, the same values as ``itk.transformwrite``;
    SimpleITK loads in a fraction of a second) unless ``compression`` is asked for, which only ITK
    Python's writer offers. ``transform_of`` builds the SimpleITK transform (a
    :class:`~itk_gradicon.io.transform_files.SharedFieldTransforms` shares it with other writers).
    """
    with TRANSFORM_WRITE_LOCK:
        _write_field_transform(field, path, compression, transform_of)


def _write_field_transform(field: DisplacementField, path: Path, compression: bool,
                           transform_of: Callable[[DisplacementField], object]) -> None:
    if not compression:
        import SimpleITK as sitk

        sitk.WriteTransform(transform_of(field), str(path))
        return
    write_compressed_transform(field.to_transform(), path)


def write_transform(field: DisplacementField, path: PathLike, transaction: Optional[OutputTransaction] = None, *,
                    transform_of: Callable[[DisplacementField], object] = field_transform) -> None:
    """Write ``field`` to ``path``: an ITK transform file (``.h5``) or a field image (``.nii.gz`` ...).

    Within ``transaction`` the file is only staged; otherwise it is written atomically at once.
    ``transform_of``: as :func:`write_transform_file`'s.
    """
    suffix = compound_suffix(path)
    if suffix not in TRANSFORM_OUTPUT_SUFFIXES:
        raise InputError(f"cannot write a transform to '{path}': allowed endings are "
                         f"{', '.join(TRANSFORM_OUTPUT_SUFFIXES)}")
    if transaction is None:
        with OutputTransaction() as out:
            write_transform(field, path, out, transform_of=transform_of)
        return
    staged = transaction.path(path)
    if suffix in TRANSFORM_FILE_SUFFIXES:
        write_transform_file(field, staged, transform_of=transform_of)
    else:
        write_field_image(field, staged)


def affine_to_simpleitk(matrix: np.ndarray):
    """A homogeneous WORLD matrix as a ``SimpleITK.AffineTransform`` (the same matrix and translation)."""
    import SimpleITK as sitk

    d = matrix.shape[0] - 1
    transform = sitk.AffineTransform(d)
    transform.SetMatrix([float(v) for v in np.asarray(matrix[:d, :d], dtype=np.float64).ravel()])
    transform.SetTranslation([float(v) for v in matrix[:d, d]])
    return transform


def compose_affines(matrices: Sequence[np.ndarray]) -> np.ndarray:
    """``matrices[0] o matrices[1] o ...``: the last one is applied to points first."""
    out = np.eye(matrices[0].shape[0])
    for m in matrices:
        out = out @ m
    return out


def write_affine_file(matrix: np.ndarray, path: Path) -> None:
    """Write an affine (homogeneous WORLD matrix) as an ITK transform file (.mat for ANTs, .tfm, .h5),
    through SimpleITK (ITK's transform writers; the file ``itk.transformwrite`` writes)."""
    import SimpleITK as sitk

    with TRANSFORM_WRITE_LOCK:  # see its note: HDF5 is not thread-safe
        sitk.WriteTransform(affine_to_simpleitk(matrix), str(path))


def read_affine_file(path: PathLike) -> np.ndarray:
    """Read an affine transform file (ITK .tfm/.txt/.h5, ANTs .mat) as a homogeneous WORLD matrix.

    A file holding several matrix-offset transforms is composed as ITK does (the last one listed
    is applied to points first). Read through SimpleITK (ITK's transform readers, without ITK Python's
    module loading); the matrix and offset are the file's values exactly.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"transform file '{path}' does not exist")
    matrices = [_affine_of(part, path) for part in transform_parts(read_transform_file(path))]
    if not matrices:
        raise InputError(f"'{path}' holds no transform")
    return compose_affines(matrices)


def _affine_of(part, path: Path) -> np.ndarray:
    """The homogeneous matrix of one linear SimpleITK transform (matrix-offset, translation, identity)."""
    if not part.IsLinear():
        raise InputError(f"'{path}' holds a {part.GetName()}, not an affine transform")
    d = int(part.GetDimension())
    m = np.eye(d + 1)
    m[:d, d] = part.TransformPoint((0.0,) * d)  # M @ 0 + offset: the offset, exactly
    if hasattr(part, "GetMatrix"):
        m[:d, :d] = np.asarray(part.GetMatrix(), dtype=np.float64).reshape(d, d)
    elif part.GetName() not in ("TranslationTransform", "IdentityTransform"):
        for axis in range(d):  # any other linear kind: its columns from the images of the unit vectors
            m[:d, axis] = np.asarray(part.TransformPoint(tuple(float(a == axis) for a in range(d)))) - m[:d, d]
    return m


def elastix_parameter_text(grid: ImageGrid, field_path: Path, *, pixel_type: str = "float") -> str:
    """A transformix ``TransformParameters`` file that applies a displacement-field image.

    ``Direction`` is written in column-major order, as elastix reads it; the field is interpolated
    linearly (``DeformationFieldInterpolationOrder 1``; elastix's default, 0, is nearest neighbour).
    """
    d = grid.dimension
    fmt = lambda values: " ".join(f"{float(v):.10g}" for v in values)  # noqa: E731
    direction_column_major = grid.direction_matrix.T.reshape(-1)
    lines = [
        '(Transform "DeformationFieldTransform")',
        "(NumberOfParameters 0)",
        '(InitialTransformParametersFileName "NoInitialTransform")',
        '(HowToCombineTransforms "Compose")',
        f"(FixedImageDimension {d})",
        f"(MovingImageDimension {d})",
        f'(FixedInternalImagePixelType "{pixel_type}")',
        f'(MovingInternalImagePixelType "{pixel_type}")',
        f"(Size {' '.join(str(int(s)) for s in grid.size)})",
        f"(Index {' '.join('0' for _ in range(d))})",
        f"(Spacing {fmt(grid.spacing)})",
        f"(Origin {fmt(grid.origin)})",
        f"(Direction {fmt(direction_column_major)})",
        '(UseDirectionCosines "true")',
        f'(DeformationFieldFileName "{field_path}")',
        "(DeformationFieldInterpolationOrder 1)",
        '(Resampler "DefaultResampler")',
        '(ResampleInterpolator "FinalBSplineInterpolator")',
        "(FinalBSplineInterpolationOrder 3)",
        "(DefaultPixelValue 0)",
        '(ResultImageFormat "nii.gz")',
        '(ResultImagePixelType "float")',
        '(CompressResultImage "true")',
    ]
    return "\n".join(lines) + "\n"


def write_elastix(field: DisplacementField, folder: PathLike, transaction: OutputTransaction) -> Path:
    """Stage ``folder/TransformParameters.0.txt`` and its field for transformix.

    The parameter file names the field by its absolute final path, so transformix runs it from
    any working folder. Returns the final path of the parameter file.
    """
    folder = Path(folder).expanduser().absolute()
    field_final = folder / ELASTIX_FIELD_FILE
    params_final = folder / ELASTIX_PARAMETER_FILE
    write_field_image(field, transaction.path(field_final))
    transaction.path(params_final).write_text(elastix_parameter_text(field.grid, field_final))
    return params_final



# --------------------------------------------------------------------------------------------
# Reading any transform a user may pass, and composing several as antsApplyTransforms does
# --------------------------------------------------------------------------------------------

def read_transform(spec: Union[str, Path, TransformSpec], *, dimension: Optional[int] = None):
    """Read one transform a user names, as an ITK transform (double precision).

    Accepted: ITK transform files (``.h5``, ``.hdf5``, ``.tfm``, ``.txt``, ``.mat``, ``.xfm``; a
    composite file gives a ``CompositeTransform``, and a file listing several transforms is composed as
    ITK does, the last one listed acting on points first), ANTs' ``0GenericAffine.mat``, dense
    displacement-field images as ANTs writes them (``1Warp.nii.gz``; ``.nii``, ``.nrrd``, ``.mha`` ...;
    vectors in LPS mm), this package's outputs, and a transformix parameter file of a
    ``DeformationFieldTransform`` (or the folder written by ``--out-elastix``).

    Args:
        spec: ``FILE`` or ``[FILE,1]`` (the inverse; linear transforms only), or a :class:`TransformSpec`.
        dimension: the dimension required (that of the images it will be used with).

    Returns:
        An ITK transform mapping points of its fixed space to its moving space.

    Raises:
        InputError: a missing or unreadable file, a file that is not a transform, a dimension other
            than ``dimension``, or an inverse asked of a displacement field (the message names the
            inverse-warp file to use instead).
    """
    return to_itk_transform(transform_files.read_transform(spec, dimension=dimension))


def is_linear(transform) -> bool:
    """Whether a transform (ITK Python or SimpleITK; composite ones included) is linear (affine, rigid, ...)."""
    return bool(transform.IsLinear())


def compose_transforms(specs: Sequence[Union[str, Path, TransformSpec]], *,
                       dimension: Optional[int] = None):
    """Read several transforms and compose them as ``antsApplyTransforms -t T1 -t T2 ...`` does.

    A point ``x`` of the output (fixed) space goes to ``Tn(...T2(T1(x)))``: the first transform listed
    acts on the point first, the last one ends in the input (moving) space. This is antsRegistration's
    convention: ``[prefix1Warp.nii.gz, prefix0GenericAffine.mat]`` is ``affine(warp(x))``, and its
    inverse is ``[[prefix0GenericAffine.mat,1], prefix1InverseWarp.nii.gz]``.

    Args:
        specs: ``FILE`` / ``[FILE,1]`` strings, paths or :class:`TransformSpec` objects, at least one.
        dimension: required dimension; ``None`` takes the first transform's.

    Returns:
        An ``itk.CompositeTransform[itk.D, d]`` (the transforms are added in reverse order, since ITK
        applies the transform added last first).

    Raises:
        InputError: see :func:`read_transform`; also for an empty list.

    Example:
        >>> t = compose_transforms(["out/s_1Warp.nii.gz", "out/s_0GenericAffine.mat"])  # doctest: +SKIP
        >>> t.TransformPoint([0.0, 0.0, 0.0])   # affine(warp(0))                          # doctest: +SKIP
    """
    return to_itk_transform(transform_files.compose_transforms(specs, dimension=dimension))


def sample_transform(transform, grid: ImageGrid) -> DisplacementField:
    """The displacement ``T(p) - p`` of any transform at every voxel centre ``p`` of ``grid``.

    A displacement field already on ``grid`` is returned exactly (double precision); anything else is
    evaluated by ITK's ``TransformToDisplacementFieldFilter`` (float32 vectors).

    Args:
        transform: an ITK Python or SimpleITK transform (affine, displacement field, composite ...).
        grid: where to sample it.

    Returns:
        A :class:`DisplacementField` on ``grid``.
    """
    transform = to_simpleitk_transform(transform)
    given = int(transform.GetDimension())
    if given != grid.dimension:
        raise InputError(f"a {given}-D transform cannot be sampled on a {grid.dimension}-D grid")
    return DisplacementField(grid, sample_displacement(transform, grid))
