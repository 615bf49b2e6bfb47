"""Instance optimisation of the displacement fields (``io_method="field"``) and the choice of method."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import blob_volume, make_image

SHIFT = (2, -2, 1)  # ARRAY order (z, y, x), voxels of 1 mm
#: The moving image is the fixed one moved by -SHIFT: fixed -> moving maps index i to i - SHIFT,
#: a displacement of (-1, 2, -2) mm in ITK (x, y, z) order.
EXPECTED_MM = np.array([-SHIFT[2], -SHIFT[1], -SHIFT[0]], dtype=float)


@pytest.fixture(scope="module")
def identity_model(tmp_path_factory):
    """A tiny untrained network whose last convolutions are zero: it predicts the identity."""
    from conftest import tiny_architecture
    from itk_gradicon.models import load_model, save_model_file
    from itk_gradicon.network import build_network

    arch = tiny_architecture(3)
    path = tmp_path_factory.mktemp("identity-field-io") / "identity3d.pt"
    torch.manual_seed(0)
    save_model_file(path, build_network(arch), arch, name="identity3d")
    return load_model(str(path))


@pytest.fixture(scope="module")
def shifted_pair():
    big = blob_volume((32, 34, 36), np.random.default_rng(4), blobs=10)
    window = [slice(4, 28), slice(4, 30), slice(4, 32)]
    fixed = big[tuple(window)]
    moving = big[tuple(slice(w.start + s, w.stop + s) for w, s in zip(window, SHIFT))]
    labels = [(a > 0.35).astype(np.int16) + (a > 0.7) for a in (fixed, moving)]
    # piecewise-constant intensities: LNCC cannot see a shift of a locally linear (smooth) image
    return (make_image(labels[0] * 100.0), make_image(labels[1] * 100.0), make_image(labels[0]),
            make_image(labels[1]))


def run(fixed, moving, model, **kwargs):
    from itk_gradicon.registration import register

    kwargs.setdefault("fixed_modality", "mri")
    kwargs.setdefault("moving_modality", "mri")
    return register(fixed, moving, model=model, **kwargs)


def _interior(field: np.ndarray, margin: int = 6) -> np.ndarray:
    """Displacements [n, 3] of the voxels at least ``margin`` from the border (ARRAY-ordered field)."""
    inner = field[margin:-margin, margin:-margin, margin:-margin]
    return inner.reshape(-1, 3)


def test_field_io_recovers_a_known_shift(shifted_pair, identity_model):
    """From the identity prediction, field IO moves the interior by the shift that made the pair
    (measured: median error 0.11 mm after 80 steps; the prediction alone is off by 3 mm)."""
    fixed, moving, _, _ = shifted_pair
    before = run(fixed, moving, identity_model)
    after = run(fixed, moving, identity_model, io_method="field", io_iterations=80)
    assert np.abs(np.median(_interior(before.forward_field.array), axis=0) - EXPECTED_MM).max() > 1.5
    error = np.median(_interior(after.forward_field.array), axis=0) - EXPECTED_MM
    assert np.abs(error).max() < 0.3, error
    history = after.io_history
    assert len(history) == 80 and history[-1]["similarity"] < history[0]["similarity"] - 0.05
    assert {"total", "similarity", "regularizer", "inverse_consistency", "dice"} <= set(history[0])


def test_field_io_keeps_the_two_directions_inverse(shifted_pair, identity_model):
    """Inverse at forward's image returns to the start: |inverse(forward(p)) - p| is small against
    the 3 mm shift (both fields refined together with the inverse-consistency penalty)."""
    fixed, moving, _, _ = shifted_pair
    result = run(fixed, moving, identity_model, io_method="field", io_iterations=80)
    forward, inverse = result.forward_transform, result.inverse_transform
    rng = np.random.default_rng(0)
    errors = []
    for index in rng.integers(7, 17, size=(60, 3)):
        p = np.array(fixed.TransformIndexToPhysicalPoint([int(i) for i in index]))
        q = np.array(forward.TransformPoint([float(v) for v in p]))
        back = np.array(inverse.TransformPoint([float(v) for v in q]))
        assert np.linalg.norm(q - p) > 2.0  # the shift is there
        errors.append(np.linalg.norm(back - p))
    assert np.max(errors) < 0.3, np.max(errors)


def test_field_io_is_deterministic_and_leaves_the_model_alone(shifted_pair, identity_model):
    fixed, moving, _, _ = shifted_pair
    state = {k: v.clone() for k, v in identity_model.network.state_dict().items()}
    a = run(fixed, moving, identity_model, io_method="field", io_iterations=5)
    b = run(fixed, moving, identity_model, io_method="field", io_iterations=5)
    np.testing.assert_array_equal(a.forward_field.array, b.forward_field.array)
    np.testing.assert_array_equal(a.inverse_field.array, b.inverse_field.array)
    for key, value in identity_model.network.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_field_io_runs_the_network_once_and_never_its_objective(shifted_pair, identity_model, monkeypatch):
    import itk_gradicon.pipeline.losses as losses

    fixed, moving, _, _ = shifted_pair
    passes = []
    real_forward = type(identity_model.network).forward

    def count(self, image_A, image_B):
        passes.append(1)
        return real_forward(self, image_A, image_B)

    monkeypatch.setattr(type(identity_model.network), "forward", count)
    monkeypatch.setattr(losses, "gradicon_objective", lambda *a, **k: pytest.fail("network IO ran"))
    run(fixed, moving, identity_model)
    prediction_only = len(passes)
    passes.clear()
    run(fixed, moving, identity_model, io_method="field", io_iterations=3)
    assert prediction_only > 0 and len(passes) == prediction_only


def test_field_io_without_inverse_still_refines_both_directions(shifted_pair, identity_model):
    """Without an inverse output, field IO still refines both fields with the inverse-consistency term (what
    keeps the forward field regular) and returns the forward transform alone; it equals the forward
    transform of a run that also returns the inverse."""
    fixed, moving, _, _ = shifted_pair
    result = run(fixed, moving, identity_model, io_method="field", io_iterations=80, compute_inverse=False)
    assert result.inverse_field is None
    assert any(record["inverse_consistency"] > 0.0 for record in result.io_history)
    error = np.median(_interior(result.forward_field.array), axis=0) - EXPECTED_MM
    assert np.abs(error).max() < 0.4, error
    both = run(fixed, moving, identity_model, io_method="field", io_iterations=80, compute_inverse=True)
    assert np.array_equal(both.forward_field.array, result.forward_field.array)


def test_field_io_dice_term_improves_the_labels(shifted_pair, identity_model):
    """With label maps the soft Dice term joins the loss: after a few steps it is lower than the
    same steps reach without it, and it falls from its start."""
    fixed, moving, fixed_labels, moving_labels = shifted_pair
    common = dict(io_method="field", io_iterations=15, fixed_labels=fixed_labels, moving_labels=moving_labels)
    with_dice = run(fixed, moving, identity_model, io_dice_weight=1.0, **common)
    without = run(fixed, moving, identity_model, io_dice_weight=0.0, **common)
    assert with_dice.io_history[-1]["dice"] < with_dice.io_history[0]["dice"] - 0.05
    assert without.io_history[-1]["dice"] == 0.0
    assert max(np.abs(with_dice.forward_field.array - without.forward_field.array).max(), 0) > 1e-3


def test_auto_chooses_the_papers_method_for_published_models(identity_model):
    from itk_gradicon.registration import resolve_io_method

    assert resolve_io_method("auto", identity_model) == "field"
    assert resolve_io_method("auto", dataclasses.replace(identity_model, name="unigradicon")) == "network"
    assert resolve_io_method("auto", dataclasses.replace(identity_model, name="multigradicon")) == "network"
    assert resolve_io_method("network", identity_model) == "network"


@pytest.mark.parametrize("kwargs,message", [
    (dict(io_method="fields"), "unknown io_method 'fields'; allowed: auto, network, field"),
    (dict(io_smoothness=-1.0), "io_smoothness must be >= 0"),
    (dict(io_lr=0.0), "io_lr must be > 0"),
])
def test_bad_io_options_are_refused(shifted_pair, identity_model, kwargs, message):
    from itk_gradicon.errors import InputError

    fixed, moving, _, _ = shifted_pair
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        run(fixed, moving, identity_model, io_iterations=1, **kwargs)


def test_penalties_are_zero_for_the_identity_and_grow_with_roughness():
    from itk_gradicon.pipeline.instance import diffusion_penalty, inverse_consistency_penalty
    from itk_gradicon.network.sampling import cube_identity

    zero = torch.zeros(1, 3, 8, 9, 10)
    identity = cube_identity((8, 9, 10))
    assert float(diffusion_penalty(zero)) == 0.0
    assert float(inverse_consistency_penalty(zero, zero, identity)) == 0.0
    # a constant shift is smooth, and its negative is its inverse
    shift = torch.zeros(1, 3, 8, 9, 10)
    shift[:, 0] = 0.05
    assert float(diffusion_penalty(shift)) == 0.0
    assert float(inverse_consistency_penalty(shift, -shift, identity)) < 1e-10
    # a ramp of slope 1 voxel per voxel along the last axis: |grad u|^2 = 1 on that axis
    ramp = torch.zeros(1, 3, 8, 9, 10)
    ramp[:, 2] = torch.linspace(0, 1, 10) * 1.0
    assert float(diffusion_penalty(ramp)) == pytest.approx(1.0, rel=1e-5)
    # the same shift in both directions is not inverse-consistent: 2 * (2 * 0.05 * 7 voxels)^2
    assert float(inverse_consistency_penalty(shift, shift, identity)) == pytest.approx(2 * (0.1 * 7) ** 2, rel=1e-4)


@pytest.mark.parametrize("shape", [(5, 6, 4), (7, 5), (6, 1, 4)])
def test_diffusion_gradient_written_out_equals_autograds(shape):
    """The diffusion penalty's hand-written backward: autograd's gradient of the plain expression, and
    finite differences (2-D, 3-D, an axis of one voxel)."""
    from itk_gradicon.pipeline.instance import diffusion_penalty, voxel_scale

    generator = torch.Generator().manual_seed(2)
    u = torch.rand(2, len(shape), *shape, dtype=torch.float64, generator=generator)

    def plain(displacement):
        voxels = displacement * voxel_scale(displacement.shape[2:], displacement)
        return sum(torch.diff(voxels, dim=2 + axis).pow(2).sum(1).mean()
                   for axis in range(len(shape)) if shape[axis] > 1)

    ours, theirs = (u.clone().requires_grad_(True) for _ in range(2))
    value = diffusion_penalty(ours)
    assert float(value.detach()) == pytest.approx(float(plain(theirs).detach()), rel=1e-12)
    (3.0 * value).backward()
    (3.0 * plain(theirs)).backward()
    assert (ours.grad - theirs.grad).abs().max().item() < 1e-12
    assert torch.autograd.gradcheck(diffusion_penalty, (u[:1].clone().requires_grad_(True),))


@pytest.mark.parametrize("similarity", ["lncc", "lncc2", "mind"])
def test_field_io_in_2d_with_every_similarity_and_loss_masks(tiny_model_file_2d, similarity):
    """2-D images, each IO similarity, loss masks: the refinement runs and lowers its objective."""
    from itk_gradicon.models import load_model

    rng = np.random.default_rng(5)
    big = blob_volume((40, 44), rng, blobs=8)
    fixed_array = ((big[4:32, 4:36] > 0.4) * 100.0).astype(np.float32)
    moving_array = ((big[6:34, 3:35] > 0.4) * 100.0).astype(np.float32)
    fixed, moving = make_image(fixed_array), make_image(moving_array)
    masks = [make_image(np.ones_like(a, dtype=np.uint8)) for a in (fixed_array, moving_array)]
    model = load_model(str(tiny_model_file_2d))
    result = run(fixed, moving, model, io_method="field", io_iterations=10, io_similarity=similarity,
                 fixed_mask=masks[0], moving_mask=masks[1], mask_mode="loss")
    history = result.io_history
    assert len(history) == 10 and history[-1]["total"] < history[0]["total"]
    assert result.forward_field.array.shape == (28, 32, 2) and result.inverse_field is not None


@pytest.mark.parametrize("name", ["lncc", "lncc2", "mind"])
@pytest.mark.parametrize("sigma", [None, 2.0])
@pytest.mark.parametrize("masked", [False, True])
def test_a_similarity_against_a_fixed_target_is_the_similarity(name, sigma, masked):
    """``losses.against`` (the target's moments or descriptors computed once, as IO uses it) gives the
    similarity's values and gradients, bitwise, on the torch path (the compiled LNCC of one-channel pairs
    matches it to float rounding: tests/test_native_filtering.py)."""
    from itk_gradicon.network.performance import fast_paths
    from itk_gradicon.pipeline import losses

    generator = torch.Generator().manual_seed(3)
    warped = losses.gaussian_blur(torch.rand(1, 1, 20, 22, 24, generator=generator), 2.0)
    target = losses.gaussian_blur(torch.rand(1, 1, 20, 22, 24, generator=generator), 2.0)
    mask = (torch.rand(1, 1, 20, 22, 24, generator=generator) > 0.3).float() if masked else None
    similarity = losses.similarity_function(name, lncc_sigma=sigma)
    direct, fixed = warped.clone().requires_grad_(True), warped.clone().requires_grad_(True)
    with fast_paths(native_filtering=False):
        expected = similarity(direct, target, mask)
        got = losses.against(similarity, target, mask)(fixed)
        expected.backward()
        got.backward()
    assert torch.equal(got.detach(), expected.detach())
    assert torch.equal(fixed.grad, direct.grad)


def test_the_alternating_inverse_consistency_adds_up_to_the_penalty_over_two_steps():
    from itk_gradicon.pipeline.instance import alternating_inverse_consistency, inverse_consistency_penalty, voxel_scale
    from itk_gradicon.network.sampling import cube_identity, sample_cube_field

    generator = torch.Generator().manual_seed(3)
    identity = cube_identity((9, 10, 11))
    u_AB = 0.02 * torch.randn(1, 3, 9, 10, 11, generator=generator)
    u_BA = 0.03 * torch.randn(1, 3, 9, 10, 11, generator=generator)
    full = float(inverse_consistency_penalty(u_AB, u_BA, identity))
    odd, even = (float(alternating_inverse_consistency(u_AB, u_BA, identity, step)) for step in (1, 2))
    assert odd + even == pytest.approx(2 * full, rel=1e-6)
    assert odd != pytest.approx(even, rel=1e-3)  # one composition each, not the same term twice
    assert float(alternating_inverse_consistency(u_AB, u_BA, identity, 3)) == odd
    swapped = float(alternating_inverse_consistency(u_BA, u_AB, identity, 2))
    assert swapped == pytest.approx(odd, rel=1e-6)  # step 2 composes the other way round
    forward_first = u_AB + sample_cube_field(u_BA, identity + u_AB)  # phi_BA(phi_AB(x)) - x, on even steps
    assert even == pytest.approx(float(2 * (forward_first * voxel_scale((9, 10, 11), u_AB)).pow(2).sum(1).mean()),
                                 rel=1e-6)


@pytest.mark.parametrize("lr", [0.3, 1e-3])
def test_field_adam_leaves_the_bits_torch_adam_leaves(lr):
    from itk_gradicon.pipeline.instance import FieldAdam

    generator = torch.Generator().manual_seed(5)
    start = [torch.randn(1, 3, 6, 7, 8, generator=generator), torch.randn(2, 5, generator=generator)]
    ours = [t.clone().requires_grad_(True) for t in start]
    theirs = [t.clone().requires_grad_(True) for t in start]
    mine, reference = FieldAdam(ours, lr=lr), torch.optim.Adam(theirs, lr=lr)
    for step in range(12):
        grads = [torch.randn(t.shape, generator=generator) * 10 ** (step % 4 - 2) for t in start]
        mine.zero_grad()
        reference.zero_grad(set_to_none=True)
        for a, b, g in zip(ours, theirs, grads):
            a.grad, b.grad = g.clone(), g.clone()
        if step == 5:  # a tensor without a gradient is skipped by both, its step count too
            ours[1].grad = theirs[1].grad = None
        mine.step()
        reference.step()
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)
    assert all(t.grad is not None for t in ours)
    mine.zero_grad()
    assert all(t.grad is None for t in ours)
