"""Jacobian determinants in physical space: exact for rotations and scalings on oblique and flipped
grids (where ITK's DisplacementFieldJacobianDeterminantFilter is wrong), close to ANTs'
CreateJacobianDeterminantImage on random smooth fields, and a hand-computed summary."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_image, random_rotation
from itk_gradicon.errors import InputError
from itk_gradicon.spatial.frames import ImageGrid
from itk_gradicon.spatial.jacobian import (LOG_FLOOR, determinant_of_displacement, jacobian_determinant,
                                   jacobian_image, jacobian_summary, log_jacobian)
from itk_gradicon.spatial.transforms import DisplacementField, affine_to_itk, write_field_image
from itk_gradicon.io.itk_bridge import grid_of

# Largest |ours - ANTs| allowed at voxels two or more voxels from the grid's faces. ANTs uses
# fourth-order central differences, we use second-order ones; on the smooth fields below the two
# differ by up to 2.6e-3 (mean 6e-4). With ANTs' stencil and our chain rule they agree to 4e-7.
ANTS_TOLERANCE = 5e-3


def rotation(axis, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    a = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


GRIDS = {
    "oblique": rotation([1, 2, 3], 35),
    "flipped": np.diag([-1.0, -1.0, 1.0]),
}


def grid_with(direction: np.ndarray, size=(12, 11, 10), spacing=(1.0, 1.5, 2.0)) -> ImageGrid:
    return grid_of(make_image(np.zeros(size[::-1], np.float32), spacing=spacing,
                                           origin=(4.0, -7.0, 12.0), direction=direction))


def affine_field(grid: ImageGrid, matrix: np.ndarray) -> DisplacementField:
    """The displacement of x -> matrix (x - c) + c about the grid's centre c."""
    points = grid.world_points()
    centre = points.reshape(-1, 3).mean(0)
    return DisplacementField(grid, (points - centre) @ matrix.T + centre - points)


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_rotation_has_determinant_one_where_itk_filter_is_wrong(name, tmp_path):
    import itk

    grid = grid_with(GRIDS[name])
    field = affine_field(grid, rotation([0, 0, 1], 30))
    det = jacobian_determinant(field.to_transform(), grid)
    np.testing.assert_allclose(det, 1.0, atol=1e-9)
    matrix = np.eye(4)
    matrix[:3, :3] = rotation([0, 0, 1], 30)
    np.testing.assert_allclose(jacobian_determinant(affine_to_itk(matrix), grid), 1.0, atol=1e-5)
    # ITK's filter differentiates along index axes and ignores the direction cosines
    write_field_image(field, tmp_path / "field.nii.gz")
    itk_filter = itk.DisplacementFieldJacobianDeterminantFilter.New(itk.imread(str(tmp_path / "field.nii.gz")))
    itk_filter.Update()
    itk_det = float(itk.array_from_image(itk_filter.GetOutput())[3:-3, 3:-3, 3:-3].mean())
    assert abs(itk_det - 1.0) > 0.05, itk_det  # measured 0.563 (oblique), 1.536 (flipped)


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_known_scaling_gives_known_determinant(name):
    """A scaling along axes that are not the grid's (oblique in world space) has det = product of scales."""
    grid = grid_with(GRIDS[name])
    q = rotation([1, -1, 2], 20)
    scaling = q @ np.diag([1.2, 0.9, 1.1]) @ q.T
    det = jacobian_determinant(affine_field(grid, scaling).to_transform(), grid)
    np.testing.assert_allclose(det, 1.2 * 0.9 * 1.1, atol=1e-9)
    mirror = affine_field(grid, np.diag([-1.0, 1.0, 1.0]))
    summary = jacobian_summary(jacobian_determinant(mirror.to_transform(), grid))
    assert summary["percent_negative"] == 100.0 and summary["min"] == pytest.approx(-1.0)
    assert summary["sdlogj"] == pytest.approx(0.0, abs=1e-12)


def test_two_dimensional_rotation():
    import itk

    image = itk.image_from_array(np.zeros((9, 8), np.float32))
    image.SetSpacing([1.0, 2.0])
    image.SetDirection(itk.matrix_from_array(np.array([[0.0, -1.0], [1.0, 0.0]])))
    grid = grid_of(image)
    a = np.deg2rad(25)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    points = grid.world_points()
    field = DisplacementField(grid, points @ rot.T - points)
    np.testing.assert_allclose(determinant_of_displacement(field.array, grid), 1.0, atol=1e-9)


def smooth_random_field(grid: ImageGrid, rng: np.random.Generator) -> DisplacementField:
    points = grid.world_points()
    centre = points.reshape(-1, 3).mean(0)
    extent = float(np.ptp(points.reshape(-1, 3), axis=0).max())
    u = np.zeros_like(points)
    for _ in range(4):
        c = centre + rng.uniform(-0.3, 0.3, 3) * extent
        width = rng.uniform(0.2, 0.4) * extent
        u += rng.normal(size=3) * 3.0 * np.exp(-((points - c) ** 2).sum(-1) / (2 * width ** 2))[..., None]
    return DisplacementField(grid, u)


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_agrees_with_ants_on_a_random_smooth_field(name, tmp_path):
    import ants
    import itk

    grid = grid_with(GRIDS[name], size=(30, 28, 26), spacing=(1.5, 2.0, 2.5))
    field = smooth_random_field(grid, np.random.default_rng(2))
    ours = jacobian_determinant(field.to_transform(), grid)
    assert ours.min() > 0.5 and ours.max() > 1.05  # a real deformation, no folds
    write_field_image(field, tmp_path / "warp.nii.gz")
    reference = make_image(np.zeros(grid.array_shape, np.float32), spacing=grid.spacing, origin=grid.origin,
                           direction=grid.direction_matrix)
    itk.imwrite(reference, str(tmp_path / "reference.nii.gz"))
    domain = ants.image_read(str(tmp_path / "reference.nii.gz"))
    theirs = ants.create_jacobian_determinant_image(domain, str(tmp_path / "warp.nii.gz")).numpy().T
    theirs_log = ants.create_jacobian_determinant_image(domain, str(tmp_path / "warp.nii.gz"), do_log=True).numpy().T
    inner = (slice(2, -2),) * 3
    difference = np.abs(ours - theirs)[inner]
    assert difference.max() < ANTS_TOLERANCE and difference.mean() < ANTS_TOLERANCE / 4
    assert np.abs(log_jacobian(ours) - theirs_log)[inner].max() < 2 * ANTS_TOLERANCE
    # the difference is the stencil only: ANTs' fourth-order differences through our physical chain
    # rule (d index / d world = diag(1/spacing) D^T) reproduce ANTs to float32 precision
    u = field.array
    fourth_order = []
    for axis in range(3):
        array_axis = 2 - axis
        fourth_order.append((-np.roll(u, -2, array_axis) + 8 * np.roll(u, -1, array_axis)
                             - 8 * np.roll(u, 1, array_axis) + np.roll(u, 2, array_axis)) / 12)
    du_dindex = np.stack(fourth_order, axis=-1)
    det4 = np.linalg.det(du_dindex @ grid.world_to_index()[:3, :3] + np.eye(3))
    assert np.abs(det4 - theirs)[inner].max() < 1e-5


def test_summary_by_hand():
    det = np.array([[-1.0, 0.5], [1.0, 2.0]])
    summary = jacobian_summary(det)
    assert summary["voxels"] == 4 and summary["negative_voxels"] == 1
    assert summary["percent_negative"] == 25.0
    assert (summary["min"], summary["max"], summary["mean"]) == (-1.0, 2.0, 0.625)
    logs = np.log([LOG_FLOOR, 0.5, 1.0, 2.0])  # the fold is floored at 0.001 as ANTs does
    assert summary["sdlogj"] == pytest.approx(float(np.std(logs)))
    masked = jacobian_summary(det, mask=np.array([[False, True], [True, True]]))
    assert masked["voxels"] == 3 and masked["percent_negative"] == 0.0
    with pytest.raises(InputError, match="no voxel"):
        jacobian_summary(det, mask=np.zeros((2, 2), bool))
    with pytest.raises(InputError, match="does not match"):
        jacobian_summary(det, mask=np.ones((3, 2), bool))


def test_chunked_equals_whole(monkeypatch):
    import itk_gradicon.spatial.jacobian as jacobian

    grid = grid_with(random_rotation(np.random.default_rng(5)), size=(9, 8, 13))
    field = smooth_random_field(grid, np.random.default_rng(6))
    whole = determinant_of_displacement(field.array, grid)
    monkeypatch.setattr(jacobian, "_CHUNK_VOXELS", 9 * 8 * 2)  # two rows of the slowest axis per chunk
    np.testing.assert_allclose(determinant_of_displacement(field.array, grid), whole, atol=1e-12)


def test_image_output_and_log():
    import itk

    grid = grid_with(GRIDS["oblique"])
    reference = make_image(np.zeros(grid.array_shape, np.int16), spacing=grid.spacing, origin=grid.origin,
                           direction=grid.direction_matrix)
    field = affine_field(grid, np.diag([2.0, 1.0, 1.0]))
    image, det = jacobian_image(field.to_transform(), reference)
    assert itk.template(image)[1][0] is itk.F
    np.testing.assert_allclose(itk.array_from_image(image), 2.0, atol=1e-6)
    log_image, _ = jacobian_image(field.to_transform(), reference, log=True)
    np.testing.assert_allclose(itk.array_from_image(log_image), np.log(2.0), atol=1e-6)
    assert grid_of(image) == grid
    with pytest.raises(InputError, match="at least 2 voxels"):
        determinant_of_displacement(np.zeros((1, 3, 3, 3)), ImageGrid((3, 3, 1), (1.0,) * 3, (0.0,) * 3,
                                                                      ((1.0, 0, 0), (0, 1.0, 0), (0, 0, 1.0))))
