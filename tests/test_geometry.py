"""geometry.py against ITK itself on random geometry, and against hand-computed fixtures.

Random grids have 10-40 voxels per axis, spacing 0.5-3 mm, an origin within +-50 mm and an oblique
direction matrix that may be flipped (determinant -1) and permuted.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import blob_volume, make_image, random_rotation
from itk_gradicon.spatial.frames import ImageGrid, NetworkFrame, apply_affine, displacement_on_grid
from itk_gradicon.io.itk_bridge import grid_of


def _continuous_index(values):
    import itk

    index = itk.ContinuousIndex[itk.D, len(values)]()
    for axis, value in enumerate(values):
        index.SetElement(axis, float(value))
    return index


def _random_image(rng: np.random.Generator):
    size = tuple(int(v) for v in rng.integers(10, 41, 3))  # ITK order
    direction = random_rotation(rng) @ np.diag(rng.choice([-1.0, 1.0], 3))
    direction = direction[:, rng.permutation(3)]
    return make_image(blob_volume(size[::-1], rng), spacing=rng.uniform(0.5, 3.0, 3),
                      origin=rng.uniform(-50, 50, 3), direction=direction)


def _random_frame(grid: ImageGrid, rng: np.random.Generator, shape=None) -> NetworkFrame:
    shape = shape or tuple(int(v) for v in rng.integers(6, 30, 3))
    return NetworkFrame.aligned_to(grid, shape, random_rotation(rng, max_angle_deg=180))


def _nodes(shape):
    return np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, len(shape))


@pytest.mark.parametrize("seed", range(4))
def test_image_grid_matches_itk(seed):
    import itk

    rng = np.random.default_rng(seed)
    image = _random_image(rng)
    grid = grid_of(image)
    index = rng.uniform(-2, 40, size=(20, 3))
    ours = apply_affine(grid.index_to_world(), index)
    theirs = np.array([list(image.TransformContinuousIndexToPhysicalPoint(_continuous_index(i))) for i in index])
    np.testing.assert_allclose(ours, theirs, atol=1e-9)
    voxel = grid.world_points()[3, 2, 1]  # ARRAY [k, j, i] = index (1, 2, 3)
    np.testing.assert_allclose(voxel, list(image.TransformIndexToPhysicalPoint(itk.Index[3]([1, 2, 3]))),
                               atol=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_cube_to_world_matches_itk_continuous_index(seed):
    """Network node m of axis c sits at cube m/(n-1), and at the image's continuous index
    (m + 0.5) * n_image / n_net - 0.5 along its index axis (reversed when flipped): the
    align_corners=False resizing. ITK then takes that index to the same WORLD point."""
    rng = np.random.default_rng(100 + seed)
    image = _random_image(rng)
    grid = grid_of(image)
    frame = _random_frame(grid, rng)
    nodes = _nodes(frame.shape)
    cube = nodes / (np.asarray(frame.shape) - 1)
    expected_index = np.zeros_like(cube)
    for c, (axis, flip) in enumerate(zip(frame.axes, frame.flips)):
        along = (nodes[:, c] + 0.5) * grid.size[axis] / frame.shape[c] - 0.5
        expected_index[:, axis] = grid.size[axis] - 1 - along if flip else along
    np.testing.assert_allclose(apply_affine(frame.cube_to_index(), cube), expected_index, atol=1e-9)
    pick = rng.choice(len(cube), size=50, replace=False)
    theirs = np.array([list(image.TransformContinuousIndexToPhysicalPoint(_continuous_index(expected_index[p])))
                       for p in pick])
    np.testing.assert_allclose(apply_affine(frame.cube_to_world(), cube[pick]), theirs, atol=1e-9)
    np.testing.assert_allclose(frame.world_to_cube() @ frame.cube_to_world(), np.eye(4), atol=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_tensor_samples_the_image_where_the_frame_says(seed):
    """With permutations, flips and resizing, tensor node m holds the image's linear interpolation at
    WORLD point cube_to_world(m / (n-1)) (nodes whose index is not beyond the outer voxel centres)."""
    import itk

    rng = np.random.default_rng(200 + seed)
    image = _random_image(rng)
    grid = grid_of(image)
    frame = _random_frame(grid, rng)
    tensor = frame.tensor(itk.array_from_image(image))[0, 0].numpy().reshape(-1)
    cube = _nodes(frame.shape) / (np.asarray(frame.shape) - 1)
    world = apply_affine(frame.cube_to_world(), cube)
    index = apply_affine(grid.world_to_index(), world)
    inside = np.all((index >= 0) & (index <= np.asarray(grid.size) - 1), axis=1)
    assert inside.mean() > 0.5
    interpolate = itk.LinearInterpolateImageFunction.New(image)
    picked = np.flatnonzero(inside)[:: max(1, inside.sum() // 300)]
    theirs = np.array([interpolate.Evaluate(itk.Point[itk.D, 3](list(map(float, world[p])))) for p in picked])
    np.testing.assert_allclose(tensor[picked], theirs, atol=1e-5)


def test_tensor_without_resizing_is_an_exact_reordering():
    """When the network shape equals the image size along the frame's axes, the tensor is the image's
    voxels reordered and flipped: node m holds the voxel at the (integer) index cube_to_index(m)."""
    import itk

    rng = np.random.default_rng(7)
    image = _random_image(rng)
    grid = grid_of(image)
    axes_frame = _random_frame(grid, rng)
    shape = tuple(grid.size[a] for a in axes_frame.axes)
    frame = NetworkFrame(grid, shape, axes_frame.axes, axes_frame.flips)
    array = itk.array_from_image(image)
    tensor = frame.tensor(array)[0, 0].numpy()
    nodes = _nodes(shape)
    index = apply_affine(frame.cube_to_index(), nodes / (np.asarray(shape) - 1))
    np.testing.assert_allclose(index, np.round(index), atol=1e-9)
    i, j, k = np.round(index).astype(int).T
    np.testing.assert_array_equal(tensor.reshape(-1), array[k, j, i])


def test_displacement_on_grid_hand_computed():
    """Fixed grid: size (4, 3, 2), spacing (2, 1, 3), origin (10, 20, 30), direction diag(-1, -1, 1).
    Moving grid: same size, 1 mm, origin 0, identity. Network shape (2, 3, 4) in the reference layout
    (network axis 0 = k, 1 = j, 2 = i), so fixed voxel (i, j, k) is cube (k, j/2, i/3) and cube y is
    moving WORLD (3 y_2, 2 y_1, y_0). Cube displacement u = (0.25, 0, c_2 / 2) (affine in c, so
    trilinear interpolation is exact). Then p = (10 - 2i, 20 - j, 30 + 3k), y = (k + 1/4, j/2, i/2),
    T(p) = (1.5 i, j, k + 1/4), and T(p) - p = (3.5 i - 10, 2 j - 20, -29.75 - 2 k)."""
    fixed = ImageGrid(size=(4, 3, 2), spacing=(2.0, 1.0, 3.0), origin=(10.0, 20.0, 30.0),
                      direction=((-1.0, 0, 0), (0, -1.0, 0), (0, 0, 1.0)))
    moving = ImageGrid(size=(4, 3, 2), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                       direction=((1.0, 0, 0), (0, 1.0, 0), (0, 0, 1.0)))
    shape = (2, 3, 4)
    fixed_frame = NetworkFrame.reference_layout(fixed, shape)
    moving_frame = NetworkFrame.reference_layout(moving, shape)
    u = torch.zeros(1, 3, *shape, dtype=torch.float32)
    u[0, 0] = 0.25
    u[0, 2] = 0.5 * torch.arange(4, dtype=torch.float32).div(3).view(1, 1, 4)
    out = displacement_on_grid(u, fixed, fixed_frame, moving_frame)
    assert out.shape == (2, 3, 4, 3)  # ARRAY order [k, j, i] + vector
    np.testing.assert_allclose(out[1, 2, 1], [-6.5, -16.0, -31.75], atol=1e-5)  # voxel (1, 2, 1) by hand
    k, j, i = np.meshgrid(np.arange(2), np.arange(3), np.arange(4), indexing="ij")
    expected = np.stack([3.5 * i - 10, 2.0 * j - 20, -29.75 - 2.0 * k], axis=-1)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    post = np.eye(4)
    post[:3, 3] = [1.0, -2.0, 0.5]
    shifted = displacement_on_grid(u, fixed, fixed_frame, moving_frame, postaffine=post)
    np.testing.assert_allclose(shifted, expected + [1.0, -2.0, 0.5], atol=1e-5)


def test_grid_validation_refuses_bad_geometry():
    from itk_gradicon.errors import InputError

    with pytest.raises(InputError, match="spacing must be strictly positive"):
        ImageGrid((2, 2), (0.0, 1.0), (0.0, 0.0), ((1.0, 0.0), (0.0, 1.0))).validate()
    with pytest.raises(InputError, match="not orthonormal"):
        ImageGrid((2, 2), (1.0, 1.0), (0.0, 0.0), ((1.0, 0.0), (1.0, 0.0))).validate()


@pytest.mark.parametrize("spacing, origin, direction, message", [
    ((1.0, 1.0), (0.0, 0.0), ((1.0, 0.5), (0.0, 1.0)), "not orthonormal"),          # shear, determinant 1
    ((1.0, 1.0), (0.0, 0.0), ((2.0, 0.0), (0.0, 0.5)), "not orthonormal"),          # scaled axes, determinant 1
    ((float("nan"), 1.0), (0.0, 0.0), ((1.0, 0.0), (0.0, 1.0)), "spacing must be strictly positive and finite"),
    ((float("inf"), 1.0), (0.0, 0.0), ((1.0, 0.0), (0.0, 1.0)), "spacing must be strictly positive and finite"),
    ((1.0, 1.0), (float("nan"), 0.0), ((1.0, 0.0), (0.0, 1.0)), "origin must be finite"),
    ((1.0, 1.0), (0.0, float("-inf")), ((1.0, 0.0), (0.0, 1.0)), "origin must be finite"),
    ((1.0, 1.0), (0.0, 0.0), ((float("nan"), 0.0), (0.0, 1.0)), "NaN or infinite"),
])
def test_grids_with_shear_or_non_finite_geometry_are_refused(spacing, origin, direction, message):
    from itk_gradicon.errors import InputError

    with pytest.raises(InputError, match=message):
        ImageGrid((2, 2), spacing, origin, direction).validate()


def test_oblique_and_flipped_grids_are_accepted():
    c, s = np.cos(0.3), np.sin(0.3)
    ImageGrid((2, 2), (0.5, 2.0), (-3.0, 7.0), ((c, -s), (s, c))).validate()
    ImageGrid((2, 2), (1.0, 1.0), (0.0, 0.0), ((-1.0, 0.0), (0.0, 1.0))).validate()


def test_the_reordering_message_names_only_a_moving_image_stored_otherwise():
    """With a model that lays images out along canonical axes, a pair stored alike is laid out alike
    (the fixed frame's flips are not news); a moving image stored along other axes is reported."""
    from types import SimpleNamespace

    from itk_gradicon.registration import _network_frames

    model = SimpleNamespace(architecture=SimpleNamespace(input_shape=(8, 8, 8)), preprocessing={"layout": "canonical"})
    stored = ImageGrid(size=(10, 12, 14), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                       direction=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)))
    messages = []
    fixed_frame, moving_frame = _network_frames(model, stored, stored, "fixed", messages)
    assert any(fixed_frame.flips) and moving_frame.flips == fixed_frame.flips
    assert messages == []
    other = ImageGrid(size=(14, 12, 10), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                      direction=((0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0)))
    _network_frames(model, stored, other, "fixed", messages)
    assert len(messages) == 1 and messages[0].startswith("moving image reordered to the fixed image's axes")
