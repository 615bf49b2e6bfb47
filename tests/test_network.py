"""The network and the losses reproduce the reference implementation with the same weights.

The reference (``icon-registration==1.1.9`` / ``unigradicon==1.0.6``, test extras) is built with
random weights, including the zero-initialised last convolutions and the BatchNorm statistics; its
``regis_net.state_dict()`` is saved as a published-format ``.trch`` and loaded through our model store
(the path ``--model FILE`` takes). Maps are compared in CUBE ([0, 1]) coordinates.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import randomize
from itk_gradicon.pipeline import losses as L
from itk_gradicon.models import load_model
from itk_gradicon.network import PUBLISHED_3D, Architecture, build_network, count_parameters
from itk_gradicon.network.operators import identity_on

MAP_TOLERANCE = 1e-4
LOSS_TOLERANCE = 1e-5


def test_published_architecture_size():
    net = build_network(PUBLISHED_3D)
    assert count_parameters(net) == 70_680_916
    assert len(net.state_dict()) == 188


def test_untrained_network_is_identity():
    arch = Architecture(input_shape=(24, 24, 24), levels=2, refinement_steps=1,
                        down_channels=(4, 8, 8), up_channels=(4, 8, 8))
    net = build_network(arch).eval()
    a, b = torch.rand(1, 1, 24, 24, 24), torch.rand(1, 1, 24, 24, 24)
    with torch.no_grad():
        disp = net(a, b).displacement_on_grid((24, 24, 24))
    assert torch.count_nonzero(disp) == 0


def test_architecture_rejects_too_small_input():
    from itk_gradicon.errors import ModelError

    with pytest.raises(ModelError, match="at least 65"):
        Architecture(input_shape=(64, 64, 64))


def _reference():
    return pytest.importorskip("unigradicon", reason="reference implementation (test extras) not installed")


def _reference_network(shape, *, seed, last_std, loss_fn=None, include_last_step=True):
    unigradicon = _reference()
    torch.manual_seed(seed)
    kwargs = {} if loss_fn is None else {"loss_fn": loss_fn}
    ref = unigradicon.make_network([1, 1, *shape], include_last_step=include_last_step, **kwargs)
    randomize(ref.regis_net, seed=seed, last_std=last_std)
    return ref.eval()


@pytest.mark.reference
def test_state_dict_keys_match_reference():
    ref = _reference_network((80, 80, 80), seed=0, last_std=0.01)
    ours = build_network(Architecture(input_shape=(80, 80, 80)))
    assert list(ref.regis_net.state_dict()) == list(ours.state_dict())
    for (k, a), b in zip(ref.regis_net.state_dict().items(), ours.state_dict().values()):
        assert a.shape == b.shape, k


@pytest.mark.reference
@pytest.mark.parametrize("include_last_step", [True, False], ids=["stage2", "stage1"])
def test_maps_match_reference_small(tmp_path, include_last_step):
    """Stage 1 and Stage 2 at 80^3: both directions equal the reference's."""
    shape = (80, 80, 80)
    ref = _reference_network(shape, seed=1, last_std=0.02, include_last_step=include_last_step)
    path = tmp_path / "weights.trch"
    torch.save(ref.regis_net.state_dict(), path)
    model = load_model(str(path), input_shape=shape)
    assert model.architecture.refinement_steps == (1 if include_last_step else 0)
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(1, 1, *shape, generator=g), torch.rand(1, 1, *shape, generator=g)
    with torch.no_grad():
        ref(a, b)
        ours_ab = model.network(a, b).on_grid(shape)
        ours_ba = model.network(b, a).on_grid(shape)
    moved = (ref.phi_AB_vectorfield - ref.identity_map).abs().max().item() * (shape[0] - 1)
    assert moved > 1.0, f"random weights should move voxels by more than one voxel, got {moved:.3f}"
    assert (ours_ab - ref.phi_AB_vectorfield).abs().max().item() < MAP_TOLERANCE
    assert (ours_ba - ref.phi_BA_vectorfield).abs().max().item() < MAP_TOLERANCE


@pytest.mark.reference
def test_maps_match_reference_2d(tmp_path):
    shape = (96, 80)
    ref = _reference_network(shape, seed=3, last_std=0.05)
    path = tmp_path / "weights2d.trch"
    torch.save(ref.regis_net.state_dict(), path)
    model = load_model(str(path), input_shape=shape)
    assert model.architecture.dimension == 2
    g = torch.Generator().manual_seed(4)
    a, b = torch.rand(1, 1, *shape, generator=g), torch.rand(1, 1, *shape, generator=g)
    with torch.no_grad():
        ref(a, b)
        ours = model.network(a, b).on_grid(shape)
    assert (ours - ref.phi_AB_vectorfield).abs().max().item() < MAP_TOLERANCE


@pytest.mark.slow
@pytest.mark.reference
def test_published_size_maps_match_reference(published_random_trch):
    """The acceptance check: 175^3, published architecture, weights loaded through --model FILE."""
    unigradicon = _reference()
    ref = unigradicon.make_network([1, 1, 175, 175, 175], include_last_step=True)
    ref.regis_net.load_state_dict(torch.load(published_random_trch, weights_only=True))
    ref.eval()
    model = load_model(str(published_random_trch))
    assert model.architecture == PUBLISHED_3D
    g = torch.Generator().manual_seed(5)
    a = torch.rand(1, 1, 175, 175, 175, generator=g)
    b = torch.rand(1, 1, 175, 175, 175, generator=g)
    with torch.no_grad():
        ref(a, b)
        ours_ab = model.network(a, b).on_grid((175,) * 3)
    moved = ((ref.phi_AB_vectorfield - ref.identity_map).abs().max() * 174).item()
    assert moved > 1.0, f"displacements of a few voxels expected, got {moved:.3f}"
    diff = (ours_ab - ref.phi_AB_vectorfield).abs().max().item()
    print(f"175^3 max |ours - reference| = {diff:.2e} (cube units), max displacement {moved:.2f} voxels")
    assert diff < MAP_TOLERANCE
    ref_ba = ref.phi_BA_vectorfield
    del ref
    with torch.no_grad():
        ours_ba = model.network(b, a).on_grid((175,) * 3)
    assert (ours_ba - ref_ba).abs().max().item() < MAP_TOLERANCE


# ---- losses ----------------------------------------------------------------------------------

@pytest.fixture
def image_pair():
    g = torch.Generator().manual_seed(10)
    a = torch.rand(2, 1, 40, 36, 32, generator=g)
    b = 0.6 * torch.roll(a, 2, 2) + 0.4 * torch.rand(2, 1, 40, 36, 32, generator=g)
    mask = (torch.rand(2, 1, 40, 36, 32, generator=g) > 0.3).float()
    return a, b, mask


@pytest.mark.reference
def test_similarities_match_reference(image_pair):
    _reference()
    import icon_registration as icon

    a, b, mask = image_pair
    cases = [
        (icon.LNCC(sigma=5), L.lncc_loss),
        (icon.losses.SquaredLNCC(sigma=5), L.squared_lncc_loss),
        (icon.losses.MINDSSC(radius=2, dilation=2), L.mind_loss),
    ]
    for ref_loss, our_loss in cases:
        assert abs(ref_loss(a, b).item() - our_loss(a, b).item()) < LOSS_TOLERANCE
        assert abs(ref_loss(a, b, mask).item() - our_loss(a, b, mask).item()) < LOSS_TOLERANCE


@pytest.mark.reference
def test_mind_descriptors_match_reference(image_pair):
    _reference()
    import icon_registration as icon

    a, _, _ = image_pair
    ref = icon.losses.MINDSSC(radius=2, dilation=2).compute_mindssc(a)
    ours = L.mind_ssc(a)
    # the descriptor channels may come in another order; the loss does not depend on it. Our box means are
    # banded matrix products, the reference's avg_pool3d: float32 sums in another order, which the
    # normalisation by the (small) local variance magnifies to about 1e-5; in float64 the two boxes agree
    # to 1e-12 (test_box_mean_is_the_replicate_padded_average_pool)
    assert (ref.sort(1).values - ours.sort(1).values).abs().max().item() < 3e-5


@pytest.mark.parametrize("dimension", [2, 3])
def test_mind_backward_written_out_equals_autograds(dimension):
    """MIND-SSC's last step has its backward pass written out: the same values, and gradients equal to
    autograd's through the plain expression (and to finite differences)."""
    generator = torch.Generator().manual_seed(11)
    distances = torch.rand(2, 6, *([5] * dimension), dtype=torch.float64, generator=generator)
    distances[0, :, 0] = 0.5  # ties for the minimum, and a window with no variance (clamped)
    weights = torch.rand(distances.shape, dtype=torch.float64, generator=generator)

    def plain(values):
        mind = values - values.min(dim=1, keepdim=True).values
        variance = mind.mean(dim=1, keepdim=True)
        level = variance.mean().item()
        return torch.exp(-mind / variance.clamp(level * 0.001, level * 1000))

    ours, theirs = (distances.clone().requires_grad_(True) for _ in range(2))
    written = L._MINDFromDistances.apply(ours)
    assert torch.equal(written, plain(theirs))
    (written * weights).sum().backward()
    (plain(theirs) * weights).sum().backward()
    assert (ours.grad - theirs.grad).abs().max().item() < 1e-12
    assert torch.autograd.gradcheck(L._MINDFromDistances.apply, (torch.rand(1, 4, *([4] * dimension),
                                                                           dtype=torch.float64,
                                                                           requires_grad=True),))


@pytest.mark.parametrize("dimension", [2, 3])
def test_box_mean_is_the_replicate_padded_average_pool(dimension):
    import torch.nn.functional as F

    x = torch.rand(1, 4, *([13] * dimension), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    pool = {2: F.avg_pool2d, 3: F.avg_pool3d}[dimension]
    expected = pool(F.pad(x, [2] * (2 * dimension), mode="replicate"), 5, stride=1)
    assert (L.box_mean(x, 2) - expected).abs().max().item() < 1e-12


@pytest.mark.reference
@pytest.mark.parametrize("sim", ["lncc", "lncc2", "mind"])
def test_objective_matches_reference(sim):
    """Full symmetric objective (similarity both ways + 1.5 GradICON) with the same sample points."""
    _reference()
    import icon_registration as icon

    ref_sims = {"lncc": icon.LNCC(sigma=5), "lncc2": icon.losses.SquaredLNCC(sigma=5),
                "mind": icon.losses.MINDSSC(radius=2, dilation=2)}
    shape = (80, 80, 80)
    ref = _reference_network(shape, seed=6, last_std=0.01, loss_fn=ref_sims[sim])
    net = build_network(Architecture(input_shape=shape))
    net.load_state_dict(ref.regis_net.state_dict())
    net.eval()
    g = torch.Generator().manual_seed(7)
    a, b = torch.rand(1, 1, *shape, generator=g), torch.rand(1, 1, *shape, generator=g)
    ident = identity_on(shape, a)
    torch.manual_seed(8)
    points = (ident + 2 * torch.randn(ident.shape) / shape[-1])[:, :, ::2, ::2, ::2]
    torch.manual_seed(8)  # the reference draws the same noise inside its forward
    with torch.no_grad():
        r = ref(a, b)
        o = L.gradicon_objective(net, a, b, similarity=L.similarity_function(sim), points=points)
    assert abs(r.inverse_consistency_loss.item() - o.regularizer.item()) < LOSS_TOLERANCE
    assert abs(r.similarity_loss.item() - o.similarity.item()) < LOSS_TOLERANCE
    assert abs(r.all_loss.item() - o.total.item()) < LOSS_TOLERANCE


@pytest.mark.reference
def test_masked_objective_and_dice_match_reference():
    unigradicon = _reference()
    import icon_registration as icon

    shape = (72, 72, 72)
    torch.manual_seed(9)
    ref = unigradicon.make_network([1, 1, *shape], include_last_step=True, loss_fn=icon.LNCC(sigma=5),
                                   dice_loss_weight=0.7, loss_function_masking=True)
    randomize(ref.regis_net, seed=9, last_std=0.01)
    ref.eval()
    net = build_network(Architecture(input_shape=shape))
    net.load_state_dict(ref.regis_net.state_dict())
    net.eval()
    g = torch.Generator().manual_seed(10)
    a, b = torch.rand(1, 1, *shape, generator=g), torch.rand(1, 1, *shape, generator=g)
    mask_a = (torch.rand(1, 1, *shape, generator=g) > 0.2).float()
    mask_b = (torch.rand(1, 1, *shape, generator=g) > 0.2).float()
    seg_a = torch.randint(0, 4, (1, 1, *shape), generator=g).float()
    seg_b = torch.randint(0, 3, (1, 1, *shape), generator=g).float()
    ident = identity_on(shape, a)
    torch.manual_seed(11)
    points = (ident + 2 * torch.randn(ident.shape) / shape[-1])[:, :, ::2, ::2, ::2]
    torch.manual_seed(11)
    with torch.no_grad():
        r = ref(a, b, mask_A=mask_a, mask_B=mask_b, segmentation_A=seg_a, segmentation_B=seg_b)
        o = L.gradicon_objective(net, a, b, guidance=L.Guidance(mask_A=mask_a, mask_B=mask_b, seg_A=seg_a,
                                                                 seg_B=seg_b, dice_weight=0.7), points=points)
    assert abs(r.similarity_loss.item() - o.similarity.item()) < LOSS_TOLERANCE
    assert abs(r.dice_loss.item() - o.dice.item()) < LOSS_TOLERANCE
    assert abs(r.all_loss.item() - o.total.item()) < LOSS_TOLERANCE


def test_lncc_of_image_with_itself_is_zero_loss(image_pair):
    a, _, _ = image_pair
    assert L.lncc_loss(a, a).item() == pytest.approx(0.0, abs=1e-3)
    # away from the zero-padded border (10 voxels for sigma 5), an inverted image correlates at -1
    interior = (slice(None), slice(None), slice(10, -10), slice(10, -10), slice(10, -10))
    assert L.lncc_map(a, 1 - a)[interior].mean().item() == pytest.approx(-1.0, abs=1e-3)
    assert (L.lncc_map(a, 1 - a) ** 2)[interior].mean().item() == pytest.approx(1.0, abs=1e-3)


def test_gradicon_is_zero_for_exact_inverses():
    """phi(x) = x + t and its inverse x - t: GradICON vanishes; a scaling pair that is not inverse does not."""
    shape = (16, 16, 16)
    points = identity_on(shape, torch.zeros(1))[:, :, ::2, ::2, ::2]
    shift = torch.tensor([0.1, -0.05, 0.02]).reshape(1, 3, 1, 1, 1)
    assert L.gradicon_regularizer(lambda x: x + shift, lambda x: x - shift, points).item() < 1e-8
    value = L.gradicon_regularizer(lambda x: 1.1 * x, lambda x: x, points).item()
    # the error e(x) = -0.1 x: along each axis one of the three components changes by 0.1 per unit,
    # so each axis contributes mean over components (0.01 + 0 + 0) / 3; three axes give 0.01
    assert value == pytest.approx(0.01, rel=1e-3)


@pytest.mark.parametrize("shape", [(7, 9, 11), (5, 6), (1, 8, 8)], ids=["3d", "2d", "flat"])
def test_warp_zero_outside_is_grid_sample_with_zeros(shape):
    """``warp(zero_outside=True)`` (border sampling of a zero-padded image) is grid_sample's zero padding,
    values and both gradients, for points inside, just outside and far outside the cube."""
    import torch.nn.functional as F

    d = len(shape)
    g = torch.Generator().manual_seed(3)
    image = torch.rand(2, 3, *shape, generator=g, dtype=torch.float64, requires_grad=True)
    points = (torch.rand(2, d, *[5] * d, generator=g, dtype=torch.float64) * 1.8 - 0.4).requires_grad_()
    grid = (points * 2 - 1).flip(1).permute(0, *range(2, d + 2), 1)
    expected = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    got = L.warp(image, points, zero_outside=True)
    assert (got - expected).abs().max().item() < 1e-14
    assert (expected == 0).any() and (expected != 0).any()
    upstream = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    for e, o in zip(torch.autograd.grad(expected, (image, points), upstream),
                    torch.autograd.grad(got, (image, points), upstream)):
        assert (e - o).abs().max().item() < 1e-12


def test_gradcycon_of_identity_cycle_is_zero():
    shape = (12, 12, 12)
    points = identity_on(shape, torch.zeros(1))[:, :, ::2, ::2, ::2]
    t = torch.tensor([0.05, 0.0, -0.03]).reshape(1, 3, 1, 1, 1)
    maps = (lambda x: x + t, lambda x: x - t, lambda x: 2 * x, lambda x: x / 2)
    assert L.cycle_gradient_penalty(maps, points).item() < 1e-8


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("shape, sigma, size, banded_max", [
    ((2, 3, 30, 41, 17), 5, None, 512),   # 3-D, several channels, axes shorter than the kernel
    ((1, 2, 50, 33), 1.25, None, 512),    # 2-D, even kernel (6 taps): conv's 'same' alignment
    ((1, 1, 40, 20, 9), 2, None, 25),     # the first axis through the depthwise-convolution fallback
    ((2, 1, 64), 3, 8, 512),              # 1-D, explicit even size
])
def test_gaussian_blur_equals_depthwise_convolution(shape, sigma, size, banded_max, monkeypatch):
    """The banded-matrix blur computes zero-padded 'same' convolutions, values and gradients."""
    monkeypatch.setattr(L, "BANDED_BLUR_MAX_LENGTH", banded_max)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(shape, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(shape, generator=g, dtype=torch.float64)
    d = len(shape) - 2
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[d]
    kernel = L.gaussian_kernel1d(sigma, size, dtype=torch.float64)
    expected = x
    for axis in range(d):
        taps = [1] * d
        taps[axis] = kernel.numel()
        expected = torch.cat([conv(expected[:, c:c + 1], kernel.reshape(1, 1, *taps), padding="same")
                              for c in range(shape[1])], dim=1)
    (grad_expected,) = torch.autograd.grad((expected * weights).sum(), x)
    ours = L.gaussian_blur(x, sigma, size)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), x)
    assert ours.shape == x.shape
    assert torch.allclose(ours, expected, rtol=0, atol=1e-12)
    assert torch.allclose(grad_ours, grad_expected, rtol=0, atol=1e-12)


def test_mind_loss_2d_is_modality_independent():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 1, 48, 48, generator=g)
    img = L.gaussian_blur(img, 1.5)
    inverted = 1.0 - img
    assert L.mind_loss(img, inverted).item() < 0.02 * L.mind_loss(img, torch.roll(img, 5, 2)).item() + 1e-6


def test_folding_fraction_of_identity_and_flip():
    shape = (10, 10, 10)
    ident = identity_on(shape, torch.zeros(1))
    assert L.fraction_folded(ident) == 0.0
    flipped = ident.clone()
    flipped[:, 0] = 1 - flipped[:, 0]
    assert L.fraction_folded(flipped) == 1.0
    assert np.isclose(L.jacobian_determinant_cube(ident).mean().item(), 1.0)
