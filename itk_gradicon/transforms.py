"""Dense displacement fields as ITK transforms, and the files other tools read.

A :class:`DisplacementField` holds, for every voxel centre ``p`` of a grid, the WORLD (LPS mm)
vector ``T(p) - p`` of a transform ``T``. Registration produces two of them:

* forward, on the FIXED grid: ``T`` maps fixed points to moving points (what ITK's, ANTs' and
  elastix's resamplers need to warp the moving image onto the fixed grid);
* inverse, on the MOVING grid: moving points to fixed points (to carry landmarks or label points
  from the moving to the fixed image).

Between grid nodes ITK interpolates the vectors linearly; beyond the grid it uses the nearest border
vector.

Files written here:

* ITK transform files ``.h5``/``.hdf5`` (``itk.transformread``, 3D Slicer, ANTs);
* displacement-field images (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``): ANTs' ``Warp`` format,
  vector components in LPS mm; NIfTI files get intent code 1007 (vector), never 1006, which recent
  ITK/ANTs read as RAS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .errors import InputError
from .geometry import ImageGrid
from .imageio import OutputTransaction, compound_suffix

PathLike = Union[str, Path]

FIELD_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
TRANSFORM_FILE_SUFFIXES = (".h5", ".hdf5")
TRANSFORM_OUTPUT_SUFFIXES = TRANSFORM_FILE_SUFFIXES + FIELD_IMAGE_SUFFIXES


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

    def to_itk_image(self, pixel=None):
        """The field as an ITK vector image with the grid's geometry (double components by default)."""
        import itk

        dtype = np.float32 if pixel is not None and pixel == itk.F else np.float64
        image = itk.image_from_array(np.ascontiguousarray(self.array, dtype=dtype), is_vector=True)
        self.grid.apply_to(image)
        return image

    def to_transform(self):
        """An ``itk.DisplacementFieldTransform[itk.D, d]`` holding this field."""
        import itk

        transform = itk.DisplacementFieldTransform[itk.D, self.grid.dimension].New()
        transform.SetDisplacementField(self.to_itk_image())
        return transform

    @classmethod
    def from_transform(cls, transform) -> "DisplacementField":
        """Read the field out of an ``itk.DisplacementFieldTransform``."""
        import itk

        field = transform.GetDisplacementField()
        return cls(ImageGrid.from_image(field), np.array(itk.array_view_from_image(field), dtype=np.float64))

    @classmethod
    def from_image(cls, image) -> "DisplacementField":
        """Wrap an ITK vector image (e.g. an ANTs ``Warp.nii.gz``)."""
        import itk

        array = np.array(itk.array_view_from_image(image), dtype=np.float64)
        grid = ImageGrid.from_image(image)
        if array.shape != grid.array_shape + (grid.dimension,):
            raise InputError(f"a displacement field needs {grid.dimension} components per voxel, "
                             f"got an array of shape {array.shape}")
        return cls(grid, array)

    def max_norm(self) -> float:
        return float(np.sqrt((self.array ** 2).sum(-1)).max())


def write_field_image(field: DisplacementField, path: Path) -> None:
    """Write a field as a vector image at ``path`` (already a staged path; see OutputTransaction).

    float32 components, LPS mm; NIfTI as dims ``(X, Y, Z, 1, 3)`` with intent 1007 (ITK's writer).
    """
    import itk

    image = field.to_itk_image(pixel=itk.F)
    itk.imwrite(image, str(path), compression=True)


def write_transform_file(field: DisplacementField, path: Path) -> None:
    """Write a field as an ITK ``DisplacementFieldTransform`` in an HDF5 transform file."""
    import itk

    itk.transformwrite([field.to_transform()], str(path), compression=True)


def write_transform(field: DisplacementField, path: PathLike,
                    transaction: Optional[OutputTransaction] = None) -> None:
    """Write ``field`` to ``path``: an ITK transform file (``.h5``) or a field image (``.nii.gz`` ...).

    Within ``transaction`` the file is only staged; otherwise it is written atomically at once.
    """
    suffix = compound_suffix(path)
    if suffix not in TRANSFORM_OUTPUT_SUFFIXES:
        raise InputError(f"cannot write a transform to '{path}': allowed endings are "
                         f"{', '.join(TRANSFORM_OUTPUT_SUFFIXES)}")
    if transaction is None:
        with OutputTransaction() as out:
            write_transform(field, path, out)
        return
    staged = transaction.path(path)
    if suffix in TRANSFORM_FILE_SUFFIXES:
        write_transform_file(field, staged)
    else:
        write_field_image(field, staged)


def affine_to_itk(matrix: np.ndarray):
    """A homogeneous WORLD matrix as an ``itk.AffineTransform[itk.D, d]``."""
    import itk

    d = matrix.shape[0] - 1
    transform = itk.AffineTransform[itk.D, d].New()
    transform.SetMatrix(itk.matrix_from_array(np.ascontiguousarray(matrix[:d, :d], dtype=np.float64)))
    transform.SetTranslation([float(v) for v in matrix[:d, d]])
    return transform


def affine_from_itk(transform) -> np.ndarray:
    """The homogeneous WORLD matrix of an ITK matrix-offset transform (affine, rigid, Euler, ...)."""
    import itk

    d = int(transform.GetInputSpaceDimension())
    m = np.eye(d + 1)
    m[:d, :d] = itk.array_from_matrix(transform.GetMatrix())
    m[:d, d] = np.asarray(transform.GetOffset(), dtype=np.float64)
    return m


def compose_affines(matrices: Sequence[np.ndarray]) -> np.ndarray:
    """``matrices[0] o matrices[1] o ...``: the last one is applied to points first."""
    out = np.eye(matrices[0].shape[0])
    for m in matrices:
        out = out @ m
    return out


def write_affine_file(matrix: np.ndarray, path: Path) -> None:
    """Write an affine (homogeneous WORLD matrix) as an ITK transform file (.mat for ANTs, .tfm, .h5)."""
    import itk

    itk.transformwrite([affine_to_itk(matrix)], str(path))


def read_affine_file(path: PathLike) -> np.ndarray:
    """Read an affine transform file (ITK .tfm/.txt/.h5, ANTs .mat) as a homogeneous WORLD matrix.

    A file holding several matrix-offset transforms is composed as ITK does (the last one listed
    is applied to points first).
    """
    import itk

    path = Path(path)
    if not path.is_file():
        raise InputError(f"transform file '{path}' does not exist")
    try:
        transforms = itk.transformread(str(path))
    except (RuntimeError, OSError) as err:
        raise InputError(f"'{path}' could not be read as an ITK/ANTs transform file") from err
    matrices = []
    for t in _flatten(transforms):
        try:
            matrices.append(affine_from_itk(t))
        except (AttributeError, TypeError):
            raise InputError(f"'{path}' holds a {t.GetNameOfClass()}, not an affine transform") from None
    if not matrices:
        raise InputError(f"'{path}' holds no transform")
    return compose_affines(matrices)


def _flatten(transforms):
    for t in transforms:
        if t.GetNameOfClass() == "CompositeTransform":
            yield from _flatten([t.GetNthTransform(i) for i in range(t.GetNumberOfTransforms())])
        else:
            yield t


ELASTIX_PARAMETER_FILE = "TransformParameters.0.txt"
ELASTIX_FIELD_FILE = "deformation_field.nii.gz"


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


def ants_file_names(prefix: str) -> dict:
    """antsRegistration's output names for ``prefix``."""
    return {"affine": f"{prefix}0GenericAffine.mat", "warp": f"{prefix}1Warp.nii.gz",
            "inverse_warp": f"{prefix}1InverseWarp.nii.gz"}
