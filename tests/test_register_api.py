"""``itk_gradicon.register`` through the real pipeline: physical-space invariances, inverse
consistency, instance optimisation that never touches the loaded model, masks and labels in the
objective, 2-D, the reference's storage layout, and refusals before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import blob_volume, make_image, random_rotation
from itk_gradicon.errors import InputError, ResourceError
from itk_gradicon.io.itk_bridge import grid_of

SHAPE = (22, 24, 26)  # ARRAY order (k, j, i)
REFERENCE_LAYOUT_TOLERANCE_MM = 3e-5  # measured: 2.4e-6 mm (AMD EPYC, 2 cores)
STORAGE_TOLERANCE_MM = 1e-4  # measured: 0 (bitwise) on a 2-core AMD EPYC, ~1e-5 mm on an Intel Xeon


# ---- helpers ---------------------------------------------------------------------------------------

def _index_order(array, d):
    return np.transpose(array, tuple(range(d - 1, -1, -1)) + tuple(range(d, array.ndim)))


def restore_array(array, perm, flips):
    """An ARRAY-ordered array (optionally with trailing vector components) stored with index axis
    ``a`` = old index axis ``perm[a]``, reversed where ``flips[a]``."""
    d = len(perm)
    out = np.transpose(_index_order(array, d), tuple(perm) + tuple(range(d, array.ndim)))
    for a, flip in enumerate(flips):
        if flip:
            out = np.flip(out, a)
    return np.ascontiguousarray(_index_order(out, d))


def restored(image, perm, flips):
    """The same physical image, stored another way (axes permuted and reversed; origin and direction
    changed so that every voxel keeps its physical position)."""
    import itk

    d = len(perm)
    size = np.array(image.GetLargestPossibleRegion().GetSize())
    direction = itk.array_from_matrix(image.GetDirection())
    spacing = np.array(image.GetSpacing())
    start = np.zeros(d)
    for src, flip in zip(perm, flips):
        start[src] = size[src] - 1 if flip else 0
    origin = np.asarray(image.GetOrigin()) + direction @ (spacing * start)
    new_direction = np.stack([direction[:, src] * (-1.0 if flip else 1.0) for src, flip in zip(perm, flips)], 1)
    return make_image(restore_array(itk.array_from_image(image), perm, flips), spacing=spacing[list(perm)],
                      origin=origin, direction=new_direction)


def max_distance(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64), axis=-1).max())


@pytest.fixture(scope="module")
def model(tiny_model_file):
    from itk_gradicon.models import load_model

    return load_model(str(tiny_model_file))


@pytest.fixture(scope="module")
def identity_model(tmp_path_factory):
    """A tiny untrained network: it predicts the identity, so IO starts from no deformation."""
    from conftest import tiny_architecture
    from itk_gradicon.models import load_model, save_model_file
    from itk_gradicon.network import build_network

    arch = tiny_architecture(3)
    path = tmp_path_factory.mktemp("identity-api") / "identity3d.pt"
    torch.manual_seed(0)  # the hidden layers are random (only the last convolutions are zero)
    save_model_file(path, build_network(arch), arch, name="identity3d")
    return load_model(str(path))


@pytest.fixture(scope="module")
def pair():
    """Fixed and moving images on different oblique, flipped, anisotropic grids."""
    rng = np.random.default_rng(21)
    fixed = make_image(blob_volume(SHAPE, rng, blobs=8) * 100, spacing=(1.1, 0.9, 1.3), origin=(-12, 8, 4),
                       direction=random_rotation(rng, max_angle_deg=20) @ np.diag([-1.0, -1.0, 1.0]))
    moving = make_image(blob_volume((24, 20, 26), rng, blobs=8) * 80, spacing=(1.0, 1.2, 1.0), origin=(-10, 9, 2),
                        direction=random_rotation(rng, max_angle_deg=20) @ np.diag([1.0, -1.0, -1.0]))
    return fixed, moving


def run(fixed, moving, model, **kwargs):
    from itk_gradicon.registration import register

    kwargs.setdefault("fixed_modality", "mri")
    kwargs.setdefault("moving_modality", "mri")
    return register(fixed, moving, model=model, **kwargs)


# ---- storage of the files does not matter (moving); the fixed file sets the network's view ------------

STORAGES = [((1, 0, 2), (False, True, False)), ((2, 0, 1), (True, False, True)), ((0, 1, 2), (True, True, True))]


@pytest.mark.parametrize("perm,flips", STORAGES)
def test_moving_storage_does_not_change_the_transforms(pair, model, perm, flips):
    """A moving file storing the same physical image with permuted/reversed axes gives the same forward
    transform at every fixed voxel and the same inverse at every moving voxel (measured: ~1e-5 mm)."""
    fixed, moving = pair
    a = run(fixed, moving, model)
    b = run(fixed, restored(moving, perm, flips), model)
    assert max_distance(a.forward_field.array, b.forward_field.array) < STORAGE_TOLERANCE_MM
    inverse_a = restore_array(a.inverse_field.array, perm, flips)  # same voxels, in b's storage order
    assert max_distance(inverse_a, b.inverse_field.array) < STORAGE_TOLERANCE_MM
    assert max_distance(a.forward_field.array, 0) > 0.5  # the network does move things


def test_fixed_storage_sets_the_networks_view(pair, model):
    """The network sees voxel arrays: the FIXED file's storage order decides how the pair is turned
    before the network sees it (geometry.py; README "Orientation"). So re-storing the fixed file changes
    the result of a network that is not flip/permutation-equivariant (this random one: by millimetres),
    while re-storing the moving file as well, in any way, changes nothing more."""
    fixed, moving = pair
    perm, flips = (1, 0, 2), (True, False, False)
    original = run(fixed, moving, model)
    fixed_b = restored(fixed, perm, flips)
    turned = run(fixed_b, moving, model)
    in_b_order = restore_array(original.forward_field.array, perm, flips)
    difference = max_distance(in_b_order, turned.forward_field.array)
    assert difference > STORAGE_TOLERANCE_MM  # documented behaviour, not an invariance
    both = run(fixed_b, restored(moving, (2, 1, 0), (False, True, False)), model)
    assert max_distance(both.forward_field.array, turned.forward_field.array) < STORAGE_TOLERANCE_MM


@pytest.mark.parametrize("perm,flips", STORAGES)
def test_a_canonical_layout_model_does_not_depend_on_either_files_storage(pair, model, perm, flips):
    """A model trained with ``layout: canonical`` lays the fixed image out along the world axes too:
    re-storing the fixed file (and the moving one) leaves the transform at every fixed voxel unchanged."""
    from dataclasses import replace

    canonical = replace(model, preprocessing={**model.preprocessing, "layout": "canonical"})
    fixed, moving = pair
    original = run(fixed, moving, canonical)
    turned = run(restored(fixed, perm, flips), restored(moving, (2, 1, 0), (False, True, False)), canonical)
    in_turned_order = restore_array(original.forward_field.array, perm, flips)
    assert max_distance(in_turned_order, turned.forward_field.array) < STORAGE_TOLERANCE_MM
    assert max_distance(original.forward_field.array, 0) > 0.5


def test_2d_moving_storage_does_not_change_the_transform(tiny_model_file_2d):
    from itk_gradicon.models import load_model

    rng = np.random.default_rng(4)
    model_2d = load_model(str(tiny_model_file_2d))
    fixed = make_image(blob_volume((30, 26), rng) * 100, spacing=(0.8, 1.1), direction=random_rotation(rng, 2))
    moving = make_image(blob_volume((28, 32), rng) * 100, spacing=(1.0, 0.9), direction=random_rotation(rng, 2))
    a = run(fixed, moving, model_2d)
    b = run(fixed, restored(moving, (1, 0), (True, False)), model_2d)
    assert max_distance(a.forward_field.array, b.forward_field.array) < STORAGE_TOLERANCE_MM
    assert a.forward_field.array.shape == (30, 26, 2) and a.inverse_field.array.shape == (28, 32, 2)


@pytest.mark.slow
def test_moving_storage_invariance_with_the_published_architecture(pair, published_random_trch):
    """The same check at 175^3 with published-architecture random weights (forward only)."""
    from itk_gradicon.models import load_model

    published = load_model(str(published_random_trch))
    fixed, moving = pair
    a = run(fixed, moving, published, compute_inverse=False)
    b = run(fixed, restored(moving, (2, 0, 1), (True, False, True)), published, compute_inverse=False)
    assert max_distance(a.forward_field.array, b.forward_field.array) < STORAGE_TOLERANCE_MM


# ---- forward o inverse --------------------------------------------------------------------------------

class LinearPairNetwork(torch.nn.Module):
    """A stand-in network whose two predictions are exact inverses: phi_AB(x) = M x + b and
    phi_BA = phi_AB^-1 in CUBE coordinates. Linear displacement fields are reproduced exactly by
    linear interpolation, so the pair is inverse consistent to float precision inside the cube."""

    def __init__(self, shape, moving_tensor, matrix, offset):
        super().__init__()
        from itk_gradicon.spatial.frames import cube_identity

        self.moving = moving_tensor
        ident = cube_identity(shape, dtype=torch.float64)[0].reshape(len(shape), -1)
        inverse = np.linalg.inv(matrix)
        fields = []
        for m, b in ((matrix, offset), (inverse, -inverse @ offset)):
            target = torch.from_numpy(m) @ ident + torch.from_numpy(b)[:, None]
            fields.append((target - ident).reshape(1, len(shape), *shape).float())
        self.forward_field, self.backward_field = fields

    def forward(self, image_A, image_B):
        from itk_gradicon.network.operators import CubeMap

        fields = [self.forward_field if torch.equal(a[None], self.moving) else self.backward_field
                  for a in image_A]  # a batch may hold both directions
        return CubeMap((torch.cat(fields),))


def test_forward_after_inverse_is_the_identity_for_an_inverse_consistent_network(pair, model):
    """With a network whose phi_BA is exactly phi_AB^-1 (a shear-scale-rotation in CUBE space), the
    written transforms satisfy T_inv(T_fwd(x)) = x within 1e-3 mm at every fixed voxel whose image lies
    inside both network cubes, and T_fwd(T_inv(y)) = y on the moving grid: the physical mapping adds
    no inverse inconsistency of its own."""
    import itk

    from itk_gradicon.spatial.frames import ImageGrid, NetworkFrame, apply_affine
    from itk_gradicon.models import Model
    from itk_gradicon.pipeline.preprocess import IntensityNormalization

    fixed, moving = pair
    shape = model.architecture.input_shape
    fixed_grid, moving_grid = grid_of(fixed), grid_of(moving)
    fixed_frame = NetworkFrame.reference_layout(fixed_grid, shape)
    moving_frame = NetworkFrame.aligned_to(moving_grid, shape, fixed_frame.world_axes())
    moving_tensor = moving_frame.tensor(IntensityNormalization("mri")(itk.array_view_from_image(moving)))
    matrix = np.array([[0.95, 0.04, 0.0], [-0.03, 1.02, 0.05], [0.02, 0.0, 0.97]])
    offset = (np.eye(3) - matrix) @ np.full(3, 0.5) + np.array([0.01, -0.015, 0.02])
    network = LinearPairNetwork(shape, moving_tensor, matrix, offset)
    stand_in = Model("linear-pair", model.architecture, network, model.source, "0")
    result = run(fixed, moving, stand_in)
    assert max_distance(result.forward_field.array, 0) > 5.0

    def inside_cube(frame, world, margin=1.5 / max(shape)):
        cube = apply_affine(frame.world_to_cube(), world)
        return np.all((cube > margin) & (cube < 1 - margin), axis=1)

    def round_trip(first, second, grid, other_grid):
        # the stand-in maps are linear inside the network cube (beyond it the fields keep their border
        # values, as every network's do): compare where both ends and their neighbours lie inside
        frame, other_frame = (fixed_frame, moving_frame) if grid is fixed_grid else (moving_frame, fixed_frame)
        points = grid.world_points().reshape(-1, 3)
        moved = points + first.array.reshape(-1, 3)
        inside = inside_cube(frame, points) & inside_cube(other_frame, moved)
        transform = second.to_transform()
        back = np.array([transform.TransformPoint([float(v) for v in p]) for p in moved[inside]])
        return inside.mean(), max_distance(back, points[inside])

    share, error = round_trip(result.forward_field, result.inverse_field, fixed_grid, moving_grid)
    assert share > 0.4 and error < 1e-3, (share, error)
    share, error = round_trip(result.inverse_field, result.forward_field, moving_grid, fixed_grid)
    assert share > 0.4 and error < 1e-3, (share, error)


# ---- instance optimisation ------------------------------------------------------------------------------

def _state(model):
    return {k: v.detach().clone() for k, v in model.network.state_dict().items()}


def test_io_never_changes_the_loaded_model(pair, model):
    """After IO the model's tensors (BatchNorm statistics included) are bitwise equal, its flags are
    unchanged, and the next pair's prediction is the same as before."""
    rng = np.random.default_rng(9)
    other_fixed = make_image(blob_volume(SHAPE, rng) * 50)
    other_moving = make_image(blob_volume(SHAPE, rng) * 50)
    before_state = _state(model)
    flags = [p.requires_grad for p in model.network.parameters()]
    before = run(other_fixed, other_moving, model)
    fixed, moving = pair
    tuned = run(fixed, moving, model, io_method="network", io_iterations=4, io_lr=1e-2, generator=torch.Generator().manual_seed(1))
    assert len(tuned.io_history) == 4
    after_state = _state(model)
    assert before_state.keys() == after_state.keys()
    for key in before_state:
        assert torch.equal(before_state[key], after_state[key]), key
    assert [p.requires_grad for p in model.network.parameters()] == flags
    assert not model.network.training
    after = run(other_fixed, other_moving, model)
    np.testing.assert_array_equal(before.forward_field.array, after.forward_field.array)
    untuned = run(fixed, moving, model)
    assert max_distance(untuned.forward_field.array, tuned.forward_field.array) > 0.01  # IO did act


def test_io_lowers_the_objective_and_reports_progress(pair, model):
    fixed, moving = pair
    reports = []
    result = run(fixed, moving, model, io_method="network", io_iterations=8, io_lr=1e-3, progress=reports.append,
                 generator=torch.Generator().manual_seed(2))
    history = result.io_history
    assert [r.step for r in reports] == list(range(1, 9)) and reports[-1].total == 8
    assert history[-1]["total"] < history[0]["total"] * 0.9
    assert "instance_optimisation" in result.timings


def test_io_is_reproducible_with_a_generator(pair, model):
    fixed, moving = pair
    a = run(fixed, moving, model, io_method="network", io_iterations=2, io_lr=1e-3, generator=torch.Generator().manual_seed(5))
    b = run(fixed, moving, model, io_method="network", io_iterations=2, io_lr=1e-3, generator=torch.Generator().manual_seed(5))
    np.testing.assert_array_equal(a.forward_field.array, b.forward_field.array)


def _spy_objective(monkeypatch):
    import itk_gradicon.pipeline.losses as losses

    calls = []
    real = losses.gradicon_objective

    def spy(net, image_A, image_B, **kwargs):
        guidance = kwargs.get("guidance", losses.NO_GUIDANCE)
        calls.append({k: getattr(guidance, k) for k in ("mask_A", "mask_B", "seg_A", "seg_B", "dice_weight")})
        return real(net, image_A, image_B, **kwargs)

    monkeypatch.setattr(losses, "gradicon_objective", spy)
    return calls


def _masks(fixed, moving):
    import itk

    out = []
    for image in (fixed, moving):
        array = itk.array_view_from_image(image)
        mask = itk.image_from_array((array > np.percentile(array, 40)).astype(np.uint8))
        mask.CopyInformation(image)
        out.append(mask)
    return out


def test_loss_masks_reach_the_objective(pair, model, monkeypatch):
    """mask_mode 'loss': the objective gets both masks on the network grid (0/1, nearest resizing of
    the masks laid out like the images); 'input': no loss masks, but the images are zeroed outside."""
    import itk

    from itk_gradicon.spatial.frames import ImageGrid, NetworkFrame

    fixed, moving = pair
    fixed_mask, moving_mask = _masks(fixed, moving)
    calls = _spy_objective(monkeypatch)
    masked = run(fixed, moving, model, io_method="network", io_iterations=2, io_lr=1e-3, fixed_mask=fixed_mask, moving_mask=moving_mask,
                 mask_mode="loss", generator=torch.Generator().manual_seed(3))
    shape = model.architecture.input_shape
    fixed_frame = NetworkFrame.reference_layout(grid_of(fixed), shape)
    moving_frame = NetworkFrame.aligned_to(grid_of(moving), shape, fixed_frame.world_axes())
    expected_B = fixed_frame.tensor(itk.array_view_from_image(fixed_mask), mode="nearest")
    expected_A = moving_frame.tensor(itk.array_view_from_image(moving_mask), mode="nearest")
    assert len(calls) == 2
    assert torch.equal(calls[0]["mask_B"], expected_B) and torch.equal(calls[0]["mask_A"], expected_A)
    assert set(torch.unique(calls[0]["mask_A"]).tolist()) == {0.0, 1.0}
    calls.clear()
    unmasked = run(fixed, moving, model, io_method="network", io_iterations=2, io_lr=1e-3, generator=torch.Generator().manual_seed(3))
    assert calls[0]["mask_A"] is None and calls[0]["mask_B"] is None
    assert masked.io_history[0]["similarity"] != pytest.approx(unmasked.io_history[0]["similarity"], abs=1e-4)
    calls.clear()
    run(fixed, moving, model, io_method="network", io_iterations=1, io_lr=1e-3, fixed_mask=fixed_mask, moving_mask=moving_mask,
        mask_mode="input")
    assert calls[0]["mask_A"] is None


def test_input_masks_zero_the_images(pair, model, monkeypatch):
    """mask_mode 'input' (and 'both'): the network sees the images zeroed outside their masks."""
    fixed, moving = pair
    fixed_mask, moving_mask = _masks(fixed, moving)
    seen = []
    real_forward = type(model.network).forward

    def spy(self, image_A, image_B):
        seen.append((image_A.detach().clone(), image_B.detach().clone()))
        return real_forward(self, image_A, image_B)

    monkeypatch.setattr(type(model.network), "forward", spy)
    plain = run(fixed, moving, model, compute_inverse=False)
    with_masks = run(fixed, moving, model, fixed_mask=fixed_mask, moving_mask=moving_mask, mask_mode="both",
                     compute_inverse=False)
    a_plain, b_plain = seen[0]
    a_masked, b_masked = seen[-1]
    assert float((b_masked == 0).float().mean()) > float((b_plain == 0).float().mean()) + 0.1
    assert float((a_masked == 0).float().mean()) > float((a_plain == 0).float().mean()) + 0.1
    assert max_distance(plain.forward_field.array, with_masks.forward_field.array) > 0.01


def test_dice_term_improves_label_overlap(identity_model, monkeypatch):
    """With label maps, IO adds a Dice term on the shared labels: the term falls during IO and the
    forward transform overlaps the labels much better than before IO (the untrained network's identity).

    Measured Dice of labels 1/2 through the forward transform: 0.84/0.99-1.00 with the term on Intel AVX-512
    and AMD AVX2 machines. IO without the term is not compared: 20 Adam steps from an untrained network
    land anywhere between 0.83/0.78 and 0.96/0.99 depending on float rounding alone (machine, kernels).

    (From an untrained network, the cheapest way down for the symmetric Dice term is a shift that
    serves phi_AB and costs phi_BA: the inverse's overlap drops. GradICON's penalty does not see
    constant shifts. A trained network tells the two directions apart.)"""
    import itk

    rng = np.random.default_rng(3)
    f = blob_volume((24, 26, 28), rng, blobs=8)
    m = np.roll(f, (2, -2, 1), axis=(0, 1, 2))
    fixed, moving = make_image(f * 100), make_image(m * 100)
    fixed_labels = make_image((f > 0.5).astype(np.int16) + (f > 0.8))
    moving_labels = make_image((m > 0.5).astype(np.int16) + (m > 0.8))
    calls = _spy_objective(monkeypatch)

    def overlap(result):
        as_float = itk.cast_image_filter(moving_labels, ttype=(type(moving_labels), itk.Image[itk.F, 3]))
        warped = itk.array_from_image(itk.resample_image_filter(
            as_float, transform=result.forward_transform, use_reference_image=True, reference_image=fixed,
            interpolator=itk.NearestNeighborInterpolateImageFunction.New(as_float)))
        target = itk.array_view_from_image(fixed_labels)
        return np.array([2 * ((warped == k) & (target == k)).sum() / ((warped == k).sum() + (target == k).sum())
                         for k in (1, 2)])

    common = dict(io_method="network", io_lr=1e-3, fixed_labels=fixed_labels, moving_labels=moving_labels,
                  compute_inverse=False)
    before = overlap(run(fixed, moving, identity_model, io_iterations=0, **common))
    with_dice = run(fixed, moving, identity_model, io_iterations=20, io_dice_weight=1.0,
                    generator=torch.Generator().manual_seed(0), **common)
    assert calls[-1]["seg_A"] is not None and calls[-1]["dice_weight"] == 1.0
    run(fixed, moving, identity_model, io_iterations=1, io_dice_weight=0.0, **common)
    assert calls[-1]["dice_weight"] == 0.0
    assert with_dice.io_history[-1]["dice"] < with_dice.io_history[0]["dice"] - 0.2
    gained = overlap(with_dice)
    print("Dice of labels 1/2 before IO", before, "after IO with the Dice term", gained)
    assert gained.mean() > before.mean() + 0.1 and gained[1] > 0.95, (gained, before)


# ---- the reference's layout ----------------------------------------------------------------------------

def _reference_transform(fixed, moving, model):
    """The forward transform as the reference builds it (icon_registration.itk_wrapper), from our
    network's prediction on the arrays as stored, resized as the reference resizes them."""
    import itk
    import torch.nn.functional as F

    itk_wrapper = pytest.importorskip("icon_registration.itk_wrapper")
    from itk_gradicon.spatial.frames import cube_identity
    from itk_gradicon.pipeline.preprocess import IntensityNormalization

    shape = model.architecture.input_shape
    norm = IntensityNormalization("mri")
    tensors = []
    for image in (moving, fixed):
        array = torch.from_numpy(norm(itk.array_view_from_image(image)))[None, None]
        tensors.append(F.interpolate(array, size=shape, mode="trilinear", align_corners=False))
    identity = cube_identity(shape)
    with torch.no_grad():
        phi_AB = model.network(tensors[0], tensors[1]).on_grid(shape)
    return itk_wrapper.create_itk_transform(phi_AB, identity, moving, fixed)


def _transform_at_fixed_voxels(transform, fixed):
    from itk_gradicon.spatial.frames import ImageGrid

    points = grid_of(fixed).world_points().reshape(-1, 3)
    return np.array([transform.TransformPoint([float(v) for v in p]) for p in points])


@pytest.mark.reference
def test_storage_orientation_reproduces_the_reference_layout(model):
    """orientation='storage' with differently oriented files equals the reference's transform at every
    fixed voxel (0.01 mm); orientation='fixed' does not (it lays the moving image out physically)."""
    rng = np.random.default_rng(8)
    fixed = make_image(blob_volume(SHAPE, rng) * 100, spacing=(1.0, 1.2, 0.9), origin=(3, -4, 5))
    moving = make_image(blob_volume((26, 20, 24), rng) * 100, spacing=(1.1, 1.0, 1.0), origin=(30, -2, 1),
                        direction=np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]))
    reference = _transform_at_fixed_voxels(_reference_transform(fixed, moving, model), fixed)
    storage = run(fixed, moving, model, orientation="storage", compute_inverse=False)
    ours = _transform_at_fixed_voxels(storage.forward_transform, fixed)
    assert max_distance(ours, reference) < REFERENCE_LAYOUT_TOLERANCE_MM
    physical = run(fixed, moving, model, orientation="fixed", compute_inverse=False)
    assert max_distance(_transform_at_fixed_voxels(physical.forward_transform, fixed), reference) > 0.1


@pytest.mark.reference
def test_fixed_orientation_is_the_reference_for_shared_directions(model):
    rng = np.random.default_rng(12)
    direction = random_rotation(rng, max_angle_deg=15) @ np.diag([-1.0, -1.0, 1.0])
    fixed = make_image(blob_volume(SHAPE, rng) * 100, spacing=(1.0, 1.2, 0.9), origin=(3, -4, 5),
                       direction=direction)
    moving = make_image(blob_volume((26, 20, 24), rng) * 100, spacing=(1.1, 1.0, 1.0), origin=(4, -2, 1),
                        direction=direction)
    reference = _transform_at_fixed_voxels(_reference_transform(fixed, moving, model), fixed)
    ours = _transform_at_fixed_voxels(run(fixed, moving, model, compute_inverse=False).forward_transform, fixed)
    assert max_distance(ours, reference) < REFERENCE_LAYOUT_TOLERANCE_MM


# ---- the ITK-style method --------------------------------------------------------------------------------

def test_itk_style_method_matches_register(pair, model):
    from itk_gradicon.registration_method import GradICONRegistrationMethod

    fixed, moving = pair
    method = GradICONRegistrationMethod(model=model, fixed_modality="mri", moving_modality="mri")
    method.SetFixedImage(fixed)
    method.SetMovingImage(moving)
    method.SetNumberOfIterations(0)
    forward = method.GetTransform()
    expected = run(fixed, moving, model)
    np.testing.assert_array_equal(method.GetResult().forward_field.array, expected.forward_field.array)
    assert forward.GetNameOfClass() == "DisplacementFieldTransform"
    assert method.GetInverseTransform().GetNameOfClass() == "DisplacementFieldTransform"


# ---- refusals ----------------------------------------------------------------------------------------------

def test_api_refusals(pair, model):
    import itk

    fixed, moving = pair
    fixed_mask, moving_mask = _masks(fixed, moving)
    empty = itk.image_from_array(np.zeros(itk.array_view_from_image(fixed).shape, np.uint8))
    empty.CopyInformation(fixed)
    vectors = itk.image_from_array(np.zeros(SHAPE + (3,), np.float32), is_vector=True)
    cases = [
        (dict(fixed_modality="pet"), "unknown fixed_modality 'pet'"),
        (dict(mask_mode="outside"), "unknown mask_mode"),
        (dict(orientation="ras"), "unknown orientation"),
        (dict(io_iterations=-1), "io_iterations must be a whole number"),
        (dict(io_iterations=True), "io_iterations must be a whole number"),
        (dict(io_lr=0.0), "io_lr must be > 0"),
        (dict(io_similarity="mse"), "unknown IO similarity"),
        (dict(fixed_labels=fixed_mask), "fixed_labels and moving_labels must be given together"),
        (dict(fixed_mask=moving_mask), "fixed mask is not on the grid"),
        (dict(fixed_mask=empty), "fixed mask is empty"),
        (dict(initial_transform=np.zeros((4, 4))), "not a finite homogeneous matrix"),
        (dict(initial_transform=np.diag([1.0, 0.0, 1.0, 1.0])), "singular"),
        (dict(initial_transform=np.eye(3)), "4x4 homogeneous matrix"),
        (dict(affine="elastix", initial_transform=np.eye(4)), "give either affine elastix or initial_transform"),
    ]
    for kwargs, fragment in cases:
        with pytest.raises(InputError, match=fragment.replace("(", r"\(")) as err:
            run(fixed, moving, model, **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="vector"):
        run(vectors, moving, model)
    with pytest.raises(InputError, match="2-D"):
        run(make_image(blob_volume((20, 20), np.random.default_rng(0))), moving, model)


def test_memory_is_checked_before_the_network_runs(pair, model, monkeypatch):
    import itk_gradicon.devices as devices
    import itk_gradicon.registration as registration

    fixed, moving = pair

    def never(*args, **kwargs):
        raise AssertionError("the network ran")

    monkeypatch.setattr(devices, "available_memory_bytes", lambda device: (10 * 1024 ** 2, "RAM (test)"))
    monkeypatch.setattr(registration, "_predict", never)
    with pytest.raises(ResourceError, match="too large for the available memory"):
        run(fixed, moving, model)


def test_inputs_are_checked_once(pair, model, tmp_path, monkeypatch):
    """Each image is scanned (NaN, constant) once and the memory checked once, by register() and by
    gradicon register's path (files checked as they are read, then a trusted request); both give the
    same transform."""
    import itk

    import itk_gradicon.io.images as imageio
    import itk_gradicon.registration as registration
    from itk_gradicon.pipeline.options import RegistrationOptions
    from itk_gradicon.commands.register import RegisterFiles, RegisterOutputs, run_register

    counts = {"scan": 0, "memory": 0}
    real_check, real_memory = imageio.check_image, registration.check_memory

    def counting_check(*args, **kwargs):
        counts["scan"] += 1
        return real_check(*args, **kwargs)

    def counting_memory(*args, **kwargs):
        counts["memory"] += 1
        return real_memory(*args, **kwargs)

    monkeypatch.setattr(imageio, "check_image", counting_check)
    monkeypatch.setattr(registration, "check_image", counting_check)
    monkeypatch.setattr(registration, "check_memory", counting_memory)
    fixed, moving = pair
    in_memory = run(fixed, moving, model, compute_inverse=False)
    assert counts == {"scan": 2, "memory": 1}

    paths = {role: tmp_path / f"{role}.nii.gz" for role in ("fixed", "moving")}
    itk.imwrite(fixed, str(paths["fixed"]))
    itk.imwrite(moving, str(paths["moving"]))
    counts.update(scan=0, memory=0)
    from_files = run_register(RegisterFiles(paths["fixed"], paths["moving"]), RegisterOutputs(transform=tmp_path / "t.h5"),
                              RegistrationOptions.from_keywords(fixed_modality="mri", moving_modality="mri",
                                                                affine="none"),
                              model=model.name, loaded_model=model)
    assert counts == {"scan": 2, "memory": 1}
    assert max_distance(in_memory.forward_field.array, from_files.forward_field.array) < 1e-4


def test_memory_estimates_match_the_measured_peaks():
    """Published network at 175^3 on a CPU: about 1.8 GiB to predict, 9-10 GiB per network-IO step, 6.4 GiB
    for field IO with MIND on the compiled kernels, 9.3 GiB through PyTorch alone (measured); a 256^3 pair adds
    a few GiB of images and fields."""
    from itk_gradicon.registration import estimate_memory

    gib = 1024 ** 3
    predict = estimate_memory(160 * 192 * 144, 160 * 192 * 144, 3, (175, 175, 175), io=False, inverse=True)
    io = estimate_memory(160 * 192 * 144, 160 * 192 * 144, 3, (175, 175, 175), io=True, inverse=True)
    assert 1.5 * gib < predict["network"] < 2.5 * gib
    assert 8 * gib < io["network"] < 11 * gib
    field = estimate_memory(160 * 192 * 144, 160 * 192 * 144, 3, (175, 175, 175), io=True, inverse=True,
                            io_method="field")  # 3.3 GiB whole process with LNCC, 6.7 with MIND: the larger
    assert 6.0 * gib < field["network"] + field["host"] < 7.5 * gib
    torch_only = estimate_memory(160 * 192 * 144, 160 * 192 * 144, 3, (175, 175, 175), io=True, inverse=True,
                                 io_method="field", compiled=False)  # 9.3 GiB measured with MIND, through PyTorch
    assert 9.3 * gib < torch_only["network"] + torch_only["host"] < 10.5 * gib
    from itk_gradicon.network.sampling import NATIVE, compiled_kernels_on

    assert compiled_kernels_on(torch.device("cpu")) == (NATIVE is not None)
    assert not compiled_kernels_on(torch.device("cuda"))
    big = estimate_memory(256 ** 3, 256 ** 3, 3, (175, 175, 175), io=False, inverse=True, affine=True,
                          originals=True)
    assert 3 * gib < big["host"] < 8 * gib


def test_the_inverse_field_is_computed_when_first_asked_for(pair, model):
    """The inverse (moving grid) costs a resampling of the network's map that a forward-only output does not
    need: it is computed on first use, once, and ``has_inverse`` answers without computing it."""
    from itk_gradicon import register
    from itk_gradicon.io.grid import ImageGrid

    fixed, moving = pair
    result = register(fixed, moving, model=model, affine="none", io_iterations=0)
    assert result.has_inverse and callable(result._inverse)
    first = result.inverse_field
    assert first.grid == grid_of(moving) and result.inverse_field is first
    assert result.inverse_transform.GetDisplacementField() is not None
    forward_only = register(fixed, moving, model=model, affine="none", io_iterations=0, compute_inverse=False)
    assert not forward_only.has_inverse and forward_only.inverse_field is None
    with pytest.raises(ValueError, match="compute_inverse=False"):
        forward_only.inverse_transform
