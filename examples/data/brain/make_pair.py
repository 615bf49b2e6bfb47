"""Make the README's demo pair from the project's shared data (see README.md beside this file).

Usage::

    python examples/data/brain/make_pair.py [--shared ../shared/data] [--output examples/data/brain]

MNI152 (fixed) and Colin27 (moving) brains with their AAL label maps, resampled from 1 mm to 1.5 mm
(images linearly, labels by nearest neighbour) on grids of the same physical extent; Colin27 and its labels
are then moved, in their headers only, by one rigid motion so that the pair starts unaligned.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("ITK_GRADICON_SHARED_DATA", HERE.parents[3] / "shared" / "data"))
SPACING_MM = 1.5
#: The rigid motion written into Colin27's header: degrees about a tilted axis, then a shift in mm.
DEGREES, AXIS, SHIFT_MM = 14.0, (0.3, 1.0, 0.2), (12.0, -15.0, 11.0)


def regrid(image: sitk.Image, spacing: float) -> sitk.Image:
    """An empty image of ``image``'s direction and physical extent with cubic voxels of ``spacing`` mm."""
    size = [int(round(n * s / spacing)) for n, s in zip(image.GetSize(), image.GetSpacing())]
    reference = sitk.Image(size, image.GetPixelID())
    reference.SetSpacing([spacing] * 3)
    reference.SetDirection(image.GetDirection())
    # the first voxel's centre moves by half the change of voxel size, so the extent stays the same
    reference.SetOrigin(image.TransformContinuousIndexToPhysicalPoint(
        [-0.5 + 0.5 * spacing / s for s in image.GetSpacing()]))
    return reference


def resample(image: sitk.Image, reference: sitk.Image, *, nearest: bool) -> sitk.Image:
    return sitk.Resample(image, reference, sitk.Transform(),
                         sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear, 0)


def as_int16(image: sitk.Image, scale: float = 1.0) -> sitk.Image:
    """``image`` times ``scale``, rounded into int16 (0 .. 32767), on the same grid."""
    array = np.clip(np.rint(sitk.GetArrayFromImage(image) * scale), 0, 32767).astype(np.int16)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


def rotation(degrees: float, axis) -> np.ndarray:
    """Rodrigues' rotation matrix about ``axis``."""
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    angle = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def move_header(image: sitk.Image, matrix: np.ndarray, shift) -> None:
    """Move ``image`` rigidly in physical space by changing its direction and origin (no resampling)."""
    image.SetDirection((matrix @ np.asarray(image.GetDirection()).reshape(3, 3)).ravel().tolist())
    image.SetOrigin((matrix @ np.asarray(image.GetOrigin()) + np.asarray(shift)).tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=SHARED, help="the shared data folder")
    parser.add_argument("--output", type=Path, default=HERE, help="where the four files go")
    args = parser.parse_args()
    read = lambda *parts: sitk.ReadImage(str(args.shared.joinpath(*parts)))  # noqa: E731

    mni, mni_aal = read("antspy_legacy_data", "mni.nii.gz"), read("antspy_legacy_data", "mnia.nii.gz")
    colin, colin_aal = read("antspy_legacy_data", "ch2.nii.gz"), read("mricron_data_debian", "aal.nii.gz")

    grid = regrid(mni, SPACING_MM)
    sitk.WriteImage(as_int16(resample(mni, grid, nearest=False)), str(args.output / "mni152.nii.gz"), True)
    sitk.WriteImage(sitk.Cast(resample(mni_aal, grid, nearest=True), sitk.sitkUInt8),
                    str(args.output / "mni152_aal.nii.gz"), True)

    grid = regrid(colin, SPACING_MM)
    image = resample(colin, grid, nearest=False)
    array = sitk.GetArrayFromImage(image)
    image = as_int16(image, 1000.0 / np.percentile(array[array > 0], 99))  # intensities to about 0-1000
    labels = resample(sitk.Cast(colin_aal, sitk.sitkUInt8), grid, nearest=True)
    matrix = rotation(DEGREES, AXIS)
    for moved, name in ((image, "colin27.nii.gz"), (labels, "colin27_aal.nii.gz")):
        move_header(moved, matrix, SHIFT_MM)
        sitk.WriteImage(moved, str(args.output / name), True)


if __name__ == "__main__":
    main()
