"""Dice, HD95, TRE and landmark files against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_image, random_rotation
from itk_gradicon.errors import InputError
from itk_gradicon.spatial.frames import ImageGrid
from itk_gradicon.evaluation.metrics import (dice, folding, hausdorff95, label_overlap, read_landmarks, surface,
                                  surface_distances, target_registration_error)


def test_dice_by_hand():
    a = np.zeros((4, 4, 4), np.int16)
    b = np.zeros_like(a)
    a[0:2, 0:2, 0:2] = 1            # 8 voxels
    b[0:2, 0:2, 1:3] = 1            # 8 voxels, 4 shared: Dice 2 * 4 / 16
    a[3, 3, 3] = 2                  # only in a
    b[3, 0, 0] = 3                  # only in b
    assert dice(a, b, 1) == 0.5
    assert dice(a, b, 2) == 0.0 and dice(a, b, 3) == 0.0
    assert np.isnan(dice(a, b, 4))
    result = label_overlap(make_image(a), make_image(b), with_hd95=False)
    assert result["labels"] == [1, 2, 3]
    assert result["dice"] == {"1": 0.5, "2": 0.0, "3": 0.0}
    assert result["mean_dice"] == pytest.approx(0.5 / 3)
    assert label_overlap(make_image(a), make_image(b), label_values=[1], with_hd95=False)["mean_dice"] == 0.5


def test_surface_is_the_voxels_touching_the_outside():
    mask = np.zeros((5, 5, 5), bool)
    mask[1:4, 1:4, 1:4] = True
    shell = surface(mask)
    assert shell.sum() == 27 - 1 and not shell[2, 2, 2]
    full = np.ones((3, 3, 3), bool)  # the image edge counts as outside
    assert surface(full).sum() == 26


def test_hd95_single_voxels_and_anisotropic_spacing():
    """One voxel each, three voxels apart along i with 2 mm spacing: 6 mm both ways."""
    a = np.zeros((3, 3, 8), bool)
    b = np.zeros_like(a)
    a[1, 1, 1] = True
    b[1, 1, 4] = True
    spacing_array_order = (1.0, 1.0, 2.0)   # ITK spacing (2, 1, 1): x (i) is 2 mm
    assert hausdorff95(a, b, spacing_array_order) == pytest.approx(6.0)


def test_hd95_is_the_larger_directed_95th_percentile():
    """a = {p}, b = {p, q} with q 10 voxels of 1.5 mm away along j: distances a->b = [0], b->a = [0, 15];
    numpy's linear 95th percentile of [0, 15] is 14.25."""
    a = np.zeros((3, 14, 3), bool)
    b = np.zeros_like(a)
    a[1, 1, 1] = b[1, 1, 1] = True
    b[1, 11, 1] = True
    spacing = (1.0, 1.5, 1.0)
    a_to_b, b_to_a = surface_distances(a, b, spacing)
    np.testing.assert_allclose(a_to_b, [0.0])
    np.testing.assert_allclose(sorted(b_to_a), [0.0, 15.0])
    assert hausdorff95(a, b, spacing) == pytest.approx(14.25)
    assert hausdorff95(b, a, spacing) == pytest.approx(14.25)
    assert np.isnan(hausdorff95(a, np.zeros_like(a), spacing))


def test_hd95_of_shifted_cubes_in_mm_does_not_depend_on_direction():
    """Two 4-voxel cubes, one shifted two voxels along i (spacing 1.5 mm): every surface voxel of one is
    within 2 voxels (3 mm) of the other's surface and the faces that do not meet are 3 mm apart."""
    a = np.zeros((10, 10, 12), np.uint8)
    b = np.zeros_like(a)
    a[3:7, 3:7, 3:7] = 5
    b[3:7, 3:7, 5:9] = 5
    values = []
    for direction in (np.eye(3), random_rotation(np.random.default_rng(0)) @ np.diag([-1.0, -1.0, 1.0])):
        fixed = make_image(a, spacing=(1.5, 1.0, 1.0), direction=direction)
        moved = make_image(b, spacing=(1.5, 1.0, 1.0), direction=direction)
        values.append(label_overlap(fixed, moved)["hd95_mm"]["5"])
    assert values[0] == pytest.approx(3.0) and values[1] == pytest.approx(values[0])


def test_label_overlap_missing_label_and_grid_mismatch():
    a = np.zeros((5, 5, 5), np.int16)
    a[1:3, 1:3, 1:3] = 1
    a[4, 4, 4] = 2
    b = np.zeros_like(a)
    b[1:3, 1:3, 1:3] = 1
    result = label_overlap(make_image(a), make_image(b))
    assert result["dice"] == {"1": 1.0, "2": 0.0}
    assert result["hd95_mm"] == {"1": 0.0, "2": None}
    assert result["mean_hd95_mm"] == 0.0 and result["mean_dice"] == 0.5
    with pytest.raises(InputError, match="not on one grid"):
        label_overlap(make_image(a), make_image(b, spacing=(2.0, 1.0, 1.0)))
    with pytest.raises(InputError, match="no label"):
        label_overlap(make_image(np.zeros_like(a)), make_image(np.zeros_like(a)))


def _translation(offset):
    import itk

    transform = itk.TranslationTransform[itk.D, 3].New()
    transform.SetOffset([float(v) for v in offset])
    return transform


def test_tre_maps_fixed_points_through_the_forward_transform():
    """T(x) = x + t is fixed -> moving; moving landmarks are the fixed ones + t, the last one 3 mm off.
    Using the inverse by mistake would give 2|t| = 6 mm errors."""
    t = np.array([1.0, 2.0, 2.0])
    fixed = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 5.0, 5.0]])
    moving = fixed + t
    moving[2, 2] += 3.0
    result = target_registration_error(fixed, moving, _translation(t))
    np.testing.assert_allclose(result["per_point_mm"], [0.0, 0.0, 3.0], atol=1e-12)
    assert result["count"] == 3
    assert result["tre_mm"]["mean"] == pytest.approx(1.0) and result["tre_mm"]["max"] == pytest.approx(3.0)
    assert result["tre_mm"]["median"] == pytest.approx(0.0)
    assert result["before_mm"]["max"] == pytest.approx(np.sqrt(1 + 4 + 25))
    wrong_way = target_registration_error(fixed, moving, _translation(-t))
    assert wrong_way["tre_mm"]["median"] == pytest.approx(6.0)
    with pytest.raises(InputError, match="do not correspond"):
        target_registration_error(fixed, moving[:2], _translation(t))


def test_elastix_point_set_files(tmp_path):
    (tmp_path / "points.txt").write_text("point\n2\n1.5 -2 3\n4 5 -6.25\n")
    np.testing.assert_allclose(read_landmarks(tmp_path / "points.txt"), [[1.5, -2, 3], [4, 5, -6.25]])
    (tmp_path / "index.txt").write_text("index\n1\n1 2 3\n")
    grid = ImageGrid((4, 4, 4), (2.0, 1.0, 0.5), (10.0, 20.0, 30.0), ((-1.0, 0, 0), (0, -1.0, 0), (0, 0, 1.0)))
    np.testing.assert_allclose(read_landmarks(tmp_path / "index.txt", grid=grid), [[8.0, 18.0, 31.5]])
    with pytest.raises(InputError, match="voxel indices"):
        read_landmarks(tmp_path / "index.txt")
    (tmp_path / "short.txt").write_text("point\n3\n1 2 3\n")
    with pytest.raises(InputError, match="announces 3 points but lists 1"):
        read_landmarks(tmp_path / "short.txt")
    (tmp_path / "other.txt").write_text("1 2 3\n")
    with pytest.raises(InputError, match="not an elastix point set"):
        read_landmarks(tmp_path / "other.txt")
    with pytest.raises(InputError, match="does not exist"):
        read_landmarks(tmp_path / "missing.txt")


def test_csv_landmark_files(tmp_path):
    (tmp_path / "plain.csv").write_text("1,2,3\n4.5,5,6\n")
    np.testing.assert_allclose(read_landmarks(tmp_path / "plain.csv"), [[1, 2, 3], [4.5, 5, 6]])
    (tmp_path / "ants.csv").write_text("x,y,z,t\n1,2,3,0\n# a comment\n-4,5,6,0\n")
    np.testing.assert_allclose(read_landmarks(tmp_path / "ants.csv"), [[1, 2, 3], [-4, 5, 6]])
    (tmp_path / "label_first.csv").write_text("name,z,y,x\na,3,2,1\n")
    np.testing.assert_allclose(read_landmarks(tmp_path / "label_first.csv"), [[1, 2, 3]])
    (tmp_path / "bad.csv").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(InputError, match="must name columns"):
        read_landmarks(tmp_path / "bad.csv")
    (tmp_path / "ragged.csv").write_text("1,2,3\n1,2\n")
    with pytest.raises(InputError, match="2 or 3 coordinates"):
        read_landmarks(tmp_path / "ragged.csv")


def test_folding_of_a_mirror_is_total():
    from itk_gradicon.spatial.transforms import affine_to_itk

    grid = ImageGrid((5, 5, 5), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), ((1.0, 0, 0), (0, 1.0, 0), (0, 0, 1.0)))
    mirror = np.diag([-1.0, 1.0, 1.0, 1.0])
    result = folding(affine_to_itk(mirror), grid)
    assert result["percent_negative"] == 100.0 and result["voxels"] == 125


@pytest.mark.slow
def test_elastix_lung_point_sets(shared_data):
    """The ITKElastix lung CT point sets: 100 fixed and 100 moving world points."""
    folder = shared_data / "elastix_lung_ct_partial"
    fixed = read_landmarks(folder / "ITKElastix_CT_3D_lung_fixed_point_set.txt")
    moving = read_landmarks(folder / "ITKElastix_CT_3D_lung_moving_point_set.txt")
    assert fixed.shape == moving.shape == (100, 3)
    np.testing.assert_allclose(fixed[0], [-36.351, -36.974, -1204.5])
    result = target_registration_error(fixed, moving)
    assert result["tre_mm"] == result["before_mm"] and result["before_mm"]["mean"] > 5.0
