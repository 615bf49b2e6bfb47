"""The foreground-coverage check: a skull-stripped image registered to a whole head is said, a slab is not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from itk_gradicon.pipeline.coverage import Coverage, coverage_warning, foreground_coverage


def _head(shape=(32, 32, 32), *, skull: bool = True) -> np.ndarray:
    """A brain (a ball of radius 9 voxels, 0.8) inside a scalp (a shell 11-14 voxels out, 0.5) when ``skull``."""
    z, y, x = np.indices(shape) - (np.asarray(shape) - 1)[:, None, None, None] / 2
    radius = np.sqrt(z ** 2 + y ** 2 + x ** 2)
    volume = np.where(radius <= 9, 0.8, 0.0)
    if skull:
        volume = np.where((radius >= 11) & (radius <= 14), 0.5, volume)
    return volume.astype(np.float32)


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array)[None, None]


def test_a_stripped_moving_image_against_a_whole_head_is_said():
    brain, head = _tensor(_head(skull=False)), _tensor(_head())
    found = foreground_coverage(brain, head)
    assert found.fixed_covered < 0.4 and found.moving_covered == 1.0 and found.differs
    warning = coverage_warning(found)
    assert warning.startswith("warning: after the pre-alignment the moving image's foreground covers only ")
    assert "skull-stripped" in warning and "(--fixed-mask)" in warning


@pytest.mark.parametrize("moving_skull, fixed_skull", [(True, True), (False, False), (True, False)])
def test_pairs_prepared_alike_or_a_head_to_a_brain_are_not(moving_skull, fixed_skull):
    found = foreground_coverage(_tensor(_head(skull=moving_skull)), _tensor(_head(skull=fixed_skull)))
    assert not found.differs and coverage_warning(found) is None


def test_only_the_moving_images_field_of_view_counts():
    head = _head()
    slab = head.copy()
    slab[:12] = slab[20:] = 0.0  # a slab of the same head: zero outside its field of view after resampling
    inside = torch.zeros(32, 32, 32, dtype=torch.bool)
    inside[12:20] = True
    assert foreground_coverage(_tensor(slab), _tensor(head)).differs  # counted everywhere it would be said
    found = foreground_coverage(_tensor(slab), _tensor(head), inside[::2, ::2, ::2])
    assert found.fixed_covered == 1.0 and not found.differs


def test_too_little_foreground_tells_nothing():
    empty = torch.zeros(1, 1, 16, 16, 16)
    assert foreground_coverage(empty, _tensor(_head((16, 16, 16)))) is None
    assert coverage_warning(None) is None
    assert not Coverage(fixed_covered=0.69, moving_covered=0.89).differs  # both short: not this mismatch


def test_the_field_of_view_on_the_network_grid():
    from itk_gradicon.io.grid import ImageGrid
    from itk_gradicon.pipeline.coverage import inside_field_of_view
    from itk_gradicon.spatial.frames import NetworkFrame

    fixed = ImageGrid(size=(40, 40, 40), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                      direction=tuple(map(tuple, np.eye(3))))
    moving = ImageGrid(size=(40, 40, 20), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 10.0),
                       direction=tuple(map(tuple, np.eye(3))))  # z from 9.5 to 29.5 mm: the middle half
    frame = NetworkFrame.reference_layout(fixed, (32, 32, 32))
    inside = inside_field_of_view(frame, moving, np.eye(4), stride=1)
    assert inside.shape == (32, 32, 32)
    assert inside.float().mean().item() == pytest.approx(0.5, abs=0.05)
    assert bool(inside[16:, :, :].any()) and not bool(inside[0].any()) and not bool(inside[-1].any())
    shifted = np.eye(4)
    shifted[2, 3] = 100.0  # the pre-alignment maps every fixed point beyond the moving image
    assert not bool(inside_field_of_view(frame, moving, shifted).any())


def test_register_says_it_after_a_prealignment(tiny_model_file):
    from conftest import make_image
    from itk_gradicon.models import load_model
    from itk_gradicon.registration import register

    model = load_model(str(tiny_model_file))
    head = make_image(_head() * 100, spacing=(6.0, 6.0, 6.0))
    brain = make_image(_head(skull=False) * 100, spacing=(6.0, 6.0, 6.0))
    options = dict(model=model, io_iterations=0, initial_transform=np.eye(4))
    said = register(head, brain, **options)
    assert any(m.startswith("warning: after the pre-alignment the moving image's foreground covers only")
               for m in said.messages)
    for fixed, moving in ((head, head), (brain, head)):
        assert not any("foreground covers" in m for m in register(fixed, moving, **options).messages)
    unaligned = register(head, brain, model=model, io_iterations=0, affine="none")
    assert not any("foreground covers" in m for m in unaligned.messages)  # no common grid to compare on


def test_the_check_runs_in_2d():
    from itk_gradicon.io.grid import ImageGrid
    from itk_gradicon.pipeline.coverage import prealigned_coverage_warning
    from itk_gradicon.spatial.frames import NetworkFrame

    y, x = np.indices((64, 64)) - 31.5
    radius = np.hypot(y, x)
    brain = np.where(radius <= 18, 0.8, 0.0).astype(np.float32)
    head = np.where((radius >= 22) & (radius <= 30), 0.5, brain).astype(np.float32)
    grid = ImageGrid(size=(64, 64), spacing=(3.0, 3.0), origin=(0.0, 0.0), direction=((1.0, 0.0), (0.0, 1.0)))
    frame = NetworkFrame.reference_layout(grid, (64, 64))
    warning = prealigned_coverage_warning(_tensor(brain), _tensor(head), frame, grid, np.eye(3))
    assert warning is not None and "foreground covers only" in warning
    assert prealigned_coverage_warning(_tensor(head), _tensor(head), frame, grid, np.eye(3)) is None
