"""The network's region of the fixed grid: the box of the two images' foreground where the field of view is
much larger than the anatomy."""

from __future__ import annotations

import numpy as np
import pytest

from itk_gradicon.errors import InputError
from itk_gradicon.io.grid import ImageGrid, IndexBox
from itk_gradicon.pipeline.region import describe_box, foreground_box
from itk_gradicon.spatial.frames import NetworkFrame


def _grid(size=(40, 30, 20), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> ImageGrid:
    direction = np.eye(len(size)) if direction is None else direction
    return ImageGrid.from_geometry(size, spacing, origin, direction)


def _oblique() -> np.ndarray:
    a, b = np.deg2rad(20.0), np.deg2rad(-35.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx @ np.diag([1.0, -1.0, 1.0])  # a flipped axis too


def test_a_box_is_the_sub_grid_of_its_voxels_in_physical_space():
    grid = _grid(spacing=(0.8, 1.2, 2.5), origin=(10.0, -20.0, 5.0), direction=_oblique())
    box = IndexBox((3, 5, 2), (30, 25, 19))
    sub = box.grid_within(grid)
    assert sub.size == (27, 20, 17) and sub.spacing == grid.spacing and sub.direction == grid.direction
    for index in [(0, 0, 0), (26, 19, 16), (4, 7, 9)]:
        parent = np.asarray(index) + np.asarray(box.start)
        np.testing.assert_allclose(sub.index_to_world() @ [*index, 1.0], grid.index_to_world() @ [*parent, 1.0],
                                   atol=1e-9)
    array = np.arange(40 * 30 * 20).reshape(grid.array_shape)
    assert array[box.array_slices()].shape == sub.array_shape
    assert array[box.array_slices()][0, 0, 0] == array[2, 5, 3]  # ARRAY order is the reversed index


@pytest.mark.parametrize("start, stop", [((0, 0, 0), (41, 30, 20)), ((-1, 0, 0), (10, 10, 10)), ((5, 5, 5), (5, 9, 9))])
def test_a_box_outside_the_grid_is_refused(start, stop):
    with pytest.raises(InputError, match="does not lie within a grid of size"):
        IndexBox(start, stop).grid_within(_grid())


def test_a_cropped_frame_sees_the_box_as_a_frame_on_the_sub_grid_would():
    grid = _grid(size=(40, 30, 20), spacing=(1.0, 2.0, 1.5), direction=_oblique())
    box = IndexBox((4, 6, 1), (33, 28, 17))
    array = np.random.default_rng(0).random(grid.array_shape, dtype=np.float32)
    for layout in ("reference", "canonical"):
        whole = NetworkFrame.for_layout(layout, grid, (16, 12, 10))
        cropped = whole.cropped(box)
        on_sub = NetworkFrame.for_layout(layout, box.grid_within(grid), (16, 12, 10))
        assert (cropped.axes, cropped.flips) == (on_sub.axes, on_sub.flips) == (whole.axes, whole.flips)
        np.testing.assert_allclose(cropped.cube_to_world(), on_sub.cube_to_world(), atol=1e-9)
        assert np.array_equal(cropped.tensor(array).numpy(), on_sub.tensor(array[box.array_slices()]).numpy())
    with pytest.raises(ValueError, match="cropped already"):
        cropped.cropped(box)
    with pytest.raises(ValueError, match="array of shape"):
        cropped.tensor(array[box.array_slices()])  # a cropped frame takes the whole image's arrays


def _padded_head(pad: int = 20, inner=(30, 36, 28)) -> np.ndarray:
    """A head-like ellipsoid (0.7) filling an ``inner`` box, zero-padded by ``pad`` voxels on each side."""
    z, y, x = np.indices(inner) - (np.asarray(inner) - 1)[:, None, None, None] / 2
    r = np.sqrt((z / (inner[0] / 2)) ** 2 + (y / (inner[1] / 2)) ** 2 + (x / (inner[2] / 2)) ** 2)
    return np.pad(np.where(r <= 1.0, 0.7, 0.0).astype(np.float32), pad)


def test_the_box_holds_both_foregrounds_with_a_margin():
    fixed = _padded_head()  # ARRAY shape (70, 76, 68): index size (68, 76, 70)
    moving = np.roll(fixed, 6, axis=2)  # the moving one's foreground reaches further along index axis 0
    grid = _grid(size=fixed.shape[::-1], spacing=(2.0, 2.0, 2.0))
    box = foreground_box([fixed, moving], grid, margin=0.0, min_margin_mm=4.0)
    assert box is not None
    rows = [np.flatnonzero((fixed > 0.05).any(axis=tuple(a for a in range(3) if a != 2 - i)) |
                           (moving > 0.05).any(axis=tuple(a for a in range(3) if a != 2 - i))) for i in range(3)]
    for i in range(3):  # 4 mm = 2 voxels of margin around the union of the two foregrounds
        assert box.start[i] == rows[i][0] - 2 and box.stop[i] == rows[i][-1] + 1 + 2
    wider = foreground_box([fixed, moving], grid, margin=0.25, min_margin_mm=4.0)
    assert all(w0 <= b0 and w1 >= b1 for w0, b0, w1, b1 in zip(wider.start, box.start, wider.stop, box.stop))
    assert describe_box(box, grid).startswith(f"voxels {box.start[0]}..{box.stop[0]} x ")
    assert describe_box(box, grid).endswith("of 68 x 76 x 70")


def test_no_box_where_the_field_of_view_fits_the_anatomy_or_nothing_is_foreground():
    tight = _padded_head(pad=3)
    grid = _grid(size=tight.shape[::-1])
    assert foreground_box([tight], grid) is None  # it would save less than 30 % of the volume
    empty = np.zeros_like(tight)
    assert foreground_box([empty], grid) is None
    with pytest.raises(ValueError, match="array of shape"):
        foreground_box([tight[1:]], grid)


def test_a_few_bright_voxels_in_the_background_do_not_stretch_the_box():
    head = _padded_head(pad=30)
    grid = _grid(size=head.shape[::-1])
    clean = foreground_box([head], grid)
    noisy = head.copy()
    noisy[0, 0, 0] = noisy[-1, -1, -1] = 1.0  # two voxels of noise in far corners
    assert foreground_box([noisy], grid) == clean


def test_register_uses_the_box_and_continues_the_field_beyond_it(tiny_model_file):
    from conftest import make_image
    from itk_gradicon.models import load_model
    from itk_gradicon.registration import register

    model = load_model(str(tiny_model_file))
    head = _padded_head(pad=24)
    moved = np.roll(head, 2, axis=1)
    options = dict(model=model, io_iterations=0, initial_transform=np.eye(4))
    fixed, moving = make_image(head * 100, spacing=(3.0, 3.0, 3.0)), make_image(moved * 100, spacing=(3.0, 3.0, 3.0))
    result = register(fixed, moving, **options)
    said = [m for m in result.messages if m.startswith("network grid over the images' foreground")]
    assert len(said) == 1
    field = result.forward_field.array  # ARRAY order + (3,)
    box = foreground_box([head, moved], _grid(size=head.shape[::-1], spacing=(3.0, 3.0, 3.0)))
    (x0, y0, z0), (x1, y1, z1) = box.start, box.stop
    inner = field[z0:z1, y0:y1, x0:x1]
    assert np.abs(inner).max() > 0  # the random network moves things
    # beyond the box the displacement continues the box's border values: constant along each axis outward
    np.testing.assert_allclose(field[z0:z1, y0:y1, 0], field[z0:z1, y0:y1, x0 - 1], atol=1e-5)
    np.testing.assert_allclose(field[:1, y0:y1, x0:x1], field[z0 - 1:z0, y0:y1, x0:x1], atol=1e-5)

    # within the box, the same as registering the two images cut to the box
    cut = box.array_slices()
    origin = tuple(3.0 * s for s in box.start)
    alone = register(make_image(np.ascontiguousarray(head[cut] * 100), spacing=(3.0,) * 3, origin=origin),
                     make_image(np.ascontiguousarray(moved[cut] * 100), spacing=(3.0,) * 3, origin=origin), **options)
    assert not any(m.startswith("network grid over") for m in alone.messages)
    np.testing.assert_allclose(inner, alone.forward_field.array, atol=1e-4)

    whole = register(fixed, moving, network_region="image", **options)  # the whole grid, as before the box
    assert not any(m.startswith("network grid over") for m in whole.messages)
    assert np.abs(whole.forward_field.array[cut] - inner).max() > 1e-3
    with pytest.raises(InputError, match="unknown network_region 'box'; allowed: auto, image"):
        register(fixed, moving, network_region="box", **options)


def test_elastix_registers_the_foreground_box_of_a_padded_image_and_finds_the_same_affine(monkeypatch):
    """A phantom in a field of view four times its volume: elastix gets the box (its physical place kept), and
    the rigid motion between two copies is found as from the phantoms alone."""
    from conftest import make_image
    from test_affine import textured_phantom

    import itk_gradicon.pipeline.affine as affine_stage

    volume = textured_phantom((40, 40, 40), np.random.default_rng(5))
    padded = np.pad(volume, 20)  # 80^3, the phantom in the middle
    seen = []
    original = affine_stage.ElastixInputs.of

    def recording(fixed, moving, *masks):
        seen.append((tuple(fixed.GetSize()), tuple(moving.GetSize())))
        return original(fixed, moving, *masks)

    monkeypatch.setattr(affine_stage.ElastixInputs, "of", staticmethod(recording))
    shift = np.array([3.0, -2.0, 4.0])  # mm: the moving copy's header moves the phantom by this much
    found = affine_stage.prealign(make_image(padded, spacing=(2.0,) * 3),
                                  make_image(padded, spacing=(2.0,) * 3, origin=tuple(shift)),
                                  transform="rigid", threads=2)
    assert seen and all(max(f) < 70 and max(m) < 70 for f, m in seen)  # both cut (80 voxels before)
    np.testing.assert_allclose(found.matrix[:3, 3], shift, atol=0.5)
    np.testing.assert_allclose(found.matrix[:3, :3], np.eye(3), atol=0.02)
    noisy = padded + np.random.default_rng(6).uniform(10.0, 20.0, padded.shape).astype(np.float32)
    whole = affine_stage._cut_to_foreground(affine_stage._sitk(make_image(noisy, spacing=(2.0,) * 3)))[0]
    assert tuple(whole.GetSize()) == (80, 80, 80)  # noise in the air (a scan not stripped): given whole


def test_the_box_in_2d(tiny_model_file_2d):
    from conftest import make_image
    from itk_gradicon.models import load_model
    from itk_gradicon.registration import register

    y, x = np.indices((30, 36)) - np.array([14.5, 17.5])[:, None, None]
    disc = np.pad(np.where(np.hypot(y / 14, x / 17) <= 1.0, 70.0, 0.0).astype(np.float32), 20)  # 70 x 76
    result = register(make_image(disc, spacing=(2.0, 2.0)), make_image(np.roll(disc, 2, axis=0), spacing=(2.0, 2.0)),
                      model=load_model(str(tiny_model_file_2d)), io_iterations=3, initial_transform=np.eye(3))
    assert any(m.startswith("network grid over the images' foreground, voxels ") and m.count(" x ") == 2
               for m in result.messages)
    assert result.forward_field.array.shape == (70, 76, 2) and np.all(np.isfinite(result.forward_field.array))
