"""What a user gets without flags: the model's recommended refinement, a checked pre-alignment, and the
similarity chosen from the pair's modalities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from itk_gradicon.pipeline import affine as affine_module
from itk_gradicon.pipeline.affine import (Prealignment, euler_matrix, implausibility, prealign, pyramid_levels,
                                 affine_from_elastix_parameters)
from itk_gradicon.cli import main
from itk_gradicon.errors import InputError, ModelError
from itk_gradicon.models import BUNDLED, NO_REFINEMENT, Refinement, load_model, save_model_file
from itk_gradicon.pipeline.preprocess import modalities_differ
from itk_gradicon.registration import resolve_io

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "data"


# --- the rigid transform and the plausibility check ---------------------------------------------

@pytest.mark.parametrize("zyx", [False, True])
def test_euler_matrix_is_itks(zyx):
    import itk

    transform = itk.Euler3DTransform[itk.D].New()
    transform.SetComputeZYX(zyx)
    transform.SetRotation(0.3, -0.2, 0.7)
    assert np.allclose(itk.array_from_matrix(transform.GetMatrix()), euler_matrix([0.3, -0.2, 0.7], zyx=zyx),
                       atol=1e-12)
    transform_2d = itk.Euler2DTransform[itk.D].New()
    transform_2d.SetAngle(0.4)
    assert np.allclose(itk.array_from_matrix(transform_2d.GetMatrix()), euler_matrix([0.4]), atol=1e-12)


def test_elastix_euler_parameters_become_the_matrix_itk_applies():
    """An elastix EulerTransform record, read as a matrix, moves points as ITK's Euler3DTransform does."""
    import itk

    angles, shift, centre = [0.1, 0.2, -0.3], [4.0, -2.0, 7.5], [10.0, -20.0, 5.0]
    record = {"Transform": ("EulerTransform",), "FixedImageDimension": ("3",),
              "TransformParameters": tuple(str(v) for v in [*angles, *shift]),
              "CenterOfRotationPoint": tuple(str(v) for v in centre), "ComputeZYX": ("false",)}
    matrix = affine_from_elastix_parameters(record)
    reference = itk.Euler3DTransform[itk.D].New()
    reference.SetCenter(centre)
    reference.SetRotation(*angles)
    reference.SetTranslation(shift)
    for point in ([0.0, 0.0, 0.0], [30.0, -12.0, 44.0]):
        expected = np.array(reference.TransformPoint(point))
        assert np.allclose(matrix[:3, :3] @ point + matrix[:3, 3], expected, atol=1e-9)


def test_implausible_affines_are_named():
    stretched = np.diag([1.73, 1.22, 0.60, 1.0])
    assert "1.73/1.22/0.60" in implausibility(stretched)
    assert "mirrors" in implausibility(np.diag([-1.0, 1.0, 1.0, 1.0]))
    anisotropic = np.diag([1.3, 1.0, 0.95, 1.0])
    assert "1.37 times" in implausibility(anisotropic)
    rotation = np.eye(4)
    rotation[:3, :3] = euler_matrix([0.5, 0.1, -0.4])
    rotation[:3, :3] *= 1.12
    assert implausibility(rotation) is None


def test_pyramid_levels_shrink_for_small_images():
    import SimpleITK as sitk

    def of(size):
        return sitk.Image(size, sitk.sitkFloat32)

    assert pyramid_levels(of([160, 192, 144]), of([182, 218, 182])) == 4
    assert pyramid_levels(of([42, 76, 77]), of([60, 55, 52])) == 2
    assert pyramid_levels(of([20, 20, 20]), of([160, 160, 160])) == 1


def test_an_implausible_affine_falls_back_to_rigid_and_says_so(monkeypatch):
    from conftest import blob_volume, make_image

    rng = np.random.default_rng(0)
    fixed = make_image(blob_volume((24, 24, 24), rng) * 100)
    moving = make_image(blob_volume((24, 24, 24), rng) * 100)
    rigid = np.eye(4)
    rigid[:3, 3] = [1.0, -2.0, 0.5]
    runs = []

    def fake_elastix(inputs, *, transform, **kwargs):
        runs.append((transform, kwargs["initialization"]))
        return np.diag([1.73, 1.22, 0.60, 1.0]) if transform == "affine" else rigid

    monkeypatch.setattr(affine_module, "rotation_search", lambda *args: None)  # a fake elastix: no basins
    monkeypatch.setattr(affine_module.ElastixInputs, "affine", fake_elastix)
    lines = []
    found = prealign(fixed, moving, transform="affine", log=lines.append)
    assert found.transform == "rigid" and np.array_equal(found.matrix, rigid)
    assert found.rejected and "1.73/1.22/0.60" in found.rejected[0]
    assert "affine pre-alignment rejected" in lines[0] and "using a rigid one instead" in lines[0]
    assert lines[-1].startswith("rigid pre-alignment (elastix")
    assert [kind for kind, _ in runs].count("affine") == len([kind for kind, _ in runs if kind == "rigid"])


def test_the_start_with_the_better_similarity_wins(monkeypatch):
    """Two starts (header, centres of mass) give two results; the one that aligns the images is kept."""
    from conftest import blob_volume, make_image

    volume = blob_volume((32, 32, 32), np.random.default_rng(5)) * 100
    fixed = make_image(volume)
    moving = make_image(np.roll(volume, 6, axis=0), origin=(0.0, 0.0, 20.0))  # the mass start differs by 20 mm
    good = np.eye(4)
    good[2, 3] = 20.0 + 6.0  # moving z-index = fixed z-index + 6, origin 20 mm further
    bad = np.eye(4)
    bad[2, 3] = 10.0

    def fake_elastix(inputs, *, transform, initialization, **kwargs):
        return good if initialization == "mass" else bad

    monkeypatch.setattr(affine_module, "rotation_search", lambda *args: None)  # a fake elastix: no basins
    monkeypatch.setattr(affine_module.ElastixInputs, "affine", fake_elastix)
    found = prealign(fixed, moving, transform="affine")
    assert found.start == "mass" and np.array_equal(found.matrix, good)


def test_a_moving_image_that_covers_too_little_is_sampled_instead(monkeypatch):
    """Where elastix's samples (drawn from the fixed image) fall outside the moving image, the start runs
    again with the roles swapped and its inverse is used; the centres-of-mass start is not tried then."""
    from conftest import blob_volume, make_image
    from itk_gradicon.pipeline.elastix import SamplesOutsideMoving

    rng = np.random.default_rng(2)
    fixed = make_image(blob_volume((32, 32, 32), rng) * 100)
    # a slab a quarter of whose height the fixed image shares (so elastix is asked), masses 8 mm apart
    moving = make_image(blob_volume((8, 32, 32), rng) * 100, origin=(0.0, 0.0, 20.0))
    moving_to_fixed = np.eye(4)
    moving_to_fixed[:3, 3] = [1.0, 2.0, -3.0]
    runs = []

    class FakeInputs:
        def __init__(self, swapped: bool) -> None:
            self.swapped = swapped

        def affine(self, *, transform, initialization, **kwargs):
            runs.append((self.swapped, initialization))
            if not self.swapped:
                raise SamplesOutsideMoving("elastix could not compute the affine pre-alignment: Too many samples "
                                           "map outside moving image buffer: 90 / 2048")
            return moving_to_fixed

    monkeypatch.setattr(affine_module, "rotation_search", lambda *args: None)  # a fake elastix: no basins
    monkeypatch.setattr(affine_module.ElastixInputs, "of",
                        classmethod(lambda cls, f, m, *masks: FakeInputs(swapped=f.GetSize()[2] == 8)))
    lines = []
    found = prealign(fixed, moving, transform="affine", log=lines.append)
    assert found.roles_swapped and found.start == "header"
    assert np.allclose(found.matrix, np.linalg.inv(moving_to_fixed))
    assert runs == [(False, "none"), (True, "none")]  # no mass start
    assert "sampling the moving image" in lines[-1]


def test_when_the_swapped_run_fails_too_the_other_start_still_counts(monkeypatch):
    """The header start fails both ways; the centres-of-mass start gives an implausible affine: the rigid
    fallback runs from the centres of mass (a run that fails never ends in a traceback)."""
    from conftest import blob_volume, make_image
    from itk_gradicon.pipeline.elastix import SamplesOutsideMoving

    rng = np.random.default_rng(4)
    fixed = make_image(blob_volume((32, 32, 32), rng) * 100)
    moving = make_image(blob_volume((8, 32, 32), rng) * 100, origin=(0.0, 0.0, 20.0))
    rigid = np.eye(4)
    rigid[:3, 3] = [0.0, 0.0, 12.0]

    class FakeInputs:
        def __init__(self, swapped: bool) -> None:
            self.swapped = swapped

        def affine(self, *, transform, initialization, **kwargs):
            if initialization == "none":
                raise (InputError("swapped: elastix could not compute it") if self.swapped else
                       SamplesOutsideMoving("Too many samples map outside moving image buffer: 9 / 2048"))
            return np.diag([1.9, 1.0, 1.0, 1.0]) if transform == "affine" else rigid

    monkeypatch.setattr(affine_module, "rotation_search", lambda *args: None)  # a fake elastix: no basins
    monkeypatch.setattr(affine_module.ElastixInputs, "of",
                        classmethod(lambda cls, f, m, *masks: FakeInputs(swapped=f.GetSize()[2] == 8)))
    found = prealign(fixed, moving, transform="affine")
    assert found.transform == "rigid" and found.start == "mass" and not found.roles_swapped
    assert np.array_equal(found.matrix, rigid)
    assert any("Too many samples" in reason for reason in found.rejected)


def test_start_overlap_is_the_share_of_fixed_voxels_inside_the_moving_image():
    from conftest import make_image

    volume = np.ones((20, 20, 20), dtype=np.float32)
    fixed = affine_module._sitk(make_image(volume))
    assert affine_module.start_overlap(fixed, fixed) == 1.0
    half = affine_module._sitk(make_image(volume, origin=(10.0, 0.0, 0.0)))  # x 10..29 of the fixed 0..19
    assert affine_module.start_overlap(fixed, half) == pytest.approx(0.5, abs=0.03)
    far = affine_module._sitk(make_image(volume, origin=(0.0, 300.0, 0.0)))
    assert affine_module.start_overlap(fixed, far) == 0.0
    mask = np.zeros((20, 20, 20), dtype=np.uint8)
    mask[:, :, 10:] = 1  # x >= 10: the half the shifted image covers
    fixed_mask = affine_module._sitk(make_image(mask))
    assert affine_module.start_overlap(fixed, half, fixed_mask) == 1.0
    moving_mask = np.zeros((20, 20, 20), dtype=np.uint8)
    moving_mask[:, :, :5] = 1  # the shifted image's x 10..14: a quarter of the fixed image's x range
    assert affine_module.start_overlap(fixed, half, None, affine_module._sitk(make_image(moving_mask))) == \
        pytest.approx(0.25, abs=0.03)


def _recording_inputs(runs, result):
    """A fake ``ElastixInputs.of`` whose runs are recorded as (roles swapped, initialization) and return ``result``
    (the swapped run: the fixed image is the one 8 voxels high)."""
    class FakeInputs:
        def __init__(self, swapped: bool) -> None:
            self.swapped = swapped

        def affine(self, *, transform, initialization, **kwargs):
            runs.append((self.swapped, initialization))
            return result

    return classmethod(lambda cls, f, m, *masks: FakeInputs(swapped=f.GetSize()[2] == 8))


def test_a_header_start_elastix_would_refuse_is_not_run(monkeypatch):
    """Images whose headers place them far apart (a subject in scanner coordinates, a template in MNI space): the
    header start, which elastix refuses at its first iteration both ways, is passed over unrun and says so; the
    centres-of-mass start registers the pair."""
    from conftest import blob_volume, make_image

    rng = np.random.default_rng(6)
    fixed = make_image(blob_volume((32, 32, 32), rng) * 100)
    moving = make_image(blob_volume((32, 32, 32), rng) * 100, origin=(-80.0, 110.0, 60.0))
    runs = []
    shift = np.eye(4)
    shift[:3, 3] = [-80.0, 110.0, 60.0]
    monkeypatch.setattr(affine_module, "rotation_search", lambda *args: None)
    monkeypatch.setattr(affine_module.ElastixInputs, "of", _recording_inputs(runs, shift))
    found = prealign(fixed, moving, transform="affine")
    assert runs == [(False, "mass")]
    assert found.start == "mass" and np.array_equal(found.matrix, shift)
    assert len(found.rejected) == 0  # passed over, not rejected: the pair registered from the other start
    lines = []
    prealign(fixed, moving, transform="affine", log=lines.append)
    assert any("from the header start" in line and "not run" in line and "0% of the fixed image" in line
               for line in lines), lines


def test_a_slab_elastix_cannot_sample_from_the_whole_volume_runs_swapped_at_once(monkeypatch):
    """A slab that covers a sixteenth of the fixed image: its forward run is not attempted; the swapped one runs."""
    from conftest import blob_volume, make_image

    rng = np.random.default_rng(2)
    fixed = make_image(blob_volume((32, 32, 32), rng) * 100)
    moving = make_image(blob_volume((8, 32, 32), rng) * 100, origin=(0.0, 0.0, 30.0))  # z 30..37 of the fixed 0..31
    runs = []
    monkeypatch.setattr(affine_module, "rotation_search", lambda *args: None)
    monkeypatch.setattr(affine_module.ElastixInputs, "of", _recording_inputs(runs, np.eye(4)))
    found = prealign(fixed, moving, transform="affine")
    assert runs == [(True, "none")] and found.roles_swapped and found.start == "header"


def test_a_slab_registers_to_the_whole_volume_with_real_elastix():
    """A slab cut from a volume (its own header kept) against the whole volume: elastix cannot sample
    the slab from the whole volume's grid, the swapped run finds the stored alignment again."""
    from conftest import make_image
    from test_affine import textured_phantom

    volume = textured_phantom((48, 48, 48), np.random.default_rng(3))
    fixed = make_image(volume)
    moving = make_image(volume[20:26].copy(), origin=(0.0, 0.0, 20.0))  # z slices 20-25, where they were
    found = prealign(fixed, moving, transform="rigid", threads=2)
    assert found.roles_swapped
    corners = np.array([[x, y, z, 1.0] for x in (0, 47) for y in (0, 47) for z in (20, 25)])
    assert np.abs((corners @ (found.matrix - np.eye(4)).T)[:, :3]).max() < 1.0  # mm, the voxel size


def test_rigid_on_the_example_pair_is_not_worse_than_the_headers():
    """The README's same-subject example (spinal cord T2 -> T1w, different fields of view): --affine rigid
    keeps or improves the cord masks' overlap (elastix's default 4 levels moved it 12 mm off)."""
    import SimpleITK as sitk

    from itk_gradicon.io.images import read_image

    fixed = read_image(EXAMPLES / "t1w.nii.gz", what="fixed", backend="simpleitk")
    moving = read_image(EXAMPLES / "t2.nii.gz", what="moving", backend="simpleitk")
    fixed_cord = sitk.ReadImage(str(EXAMPLES / "t1w_seg-manual.nii.gz"))
    moving_cord = sitk.ReadImage(str(EXAMPLES / "t2_seg-manual.nii.gz"))

    def dice(matrix):
        transform = sitk.AffineTransform(3)
        transform.SetMatrix(matrix[:3, :3].ravel().tolist())
        transform.SetTranslation(matrix[:3, 3].tolist())
        warped = sitk.GetArrayFromImage(sitk.Resample(moving_cord, fixed_cord, transform, sitk.sitkNearestNeighbor))
        target = sitk.GetArrayFromImage(fixed_cord)
        return 2 * np.sum((warped > 0) & (target > 0)) / (np.sum(warped > 0) + np.sum(target > 0))

    found = prealign(fixed, moving, transform="rigid", threads=2)
    assert found.transform == "rigid" and found.start == "header"
    assert dice(found.matrix) >= dice(np.eye(4)) - 0.01


def test_elastix_registers_copies_of_fine_images_at_about_1mm(monkeypatch):
    """An axis finer than half a millimetre reaches elastix shrunk by the whole factor that keeps it at most 1 mm
    (blocks averaged, physical positions kept, a mask's block inside where any of it is); coarser images, and
    axes that would fall below 16 voxels, as they are. The affine found maps the original images."""
    import SimpleITK as sitk

    from conftest import blob_volume, make_image

    volume = blob_volume((40, 70, 80), np.random.default_rng(31), blobs=12) * 100  # ARRAY order: z, y, x
    fine = affine_module._sitk(make_image(volume, spacing=(0.4, 0.5, 1.0), origin=(3.0, -2.0, 7.0)))
    mask_array = np.zeros(volume.shape, np.uint8)
    mask_array[5, 7, 9] = 1  # one voxel: its block (x 8-9, y 6-7) is inside the copy's mask
    mask = sitk.GetImageFromArray(mask_array)
    mask.CopyInformation(fine)
    copy, copy_mask = affine_module._at_most_finest(fine, mask)
    assert copy.GetSize() == (40, 35, 40) and copy.GetSpacing() == pytest.approx((0.8, 1.0, 1.0))
    def centre(image):
        return image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])

    assert centre(copy) == pytest.approx(centre(fine))
    assert sitk.GetArrayViewFromImage(copy)[0, 0, 0] == pytest.approx(volume[0, :2, :2].mean(), rel=1e-5)
    assert np.argwhere(sitk.GetArrayViewFromImage(copy_mask)).tolist() == [[5, 3, 4]]
    assert affine_module._at_most_finest(affine_module._sitk(make_image(volume, spacing=(1.0, 0.6, 0.9))))[0] \
        .GetSize() == (80, 70, 40)  # nothing finer than 0.5 mm: as stored
    thin = affine_module._sitk(make_image(volume[:, :, :20], spacing=(0.4, 0.4, 0.4)))
    assert affine_module._at_most_finest(thin)[0].GetSize() == (20, 35, 20)  # 20 voxels stay: 10 would be too few

    seen = []
    original = affine_module.ElastixInputs.of

    def recording(fixed, moving, *masks):
        seen.append(tuple(fixed.GetSize()))
        return original(fixed, moving, *masks)

    monkeypatch.setattr(affine_module.ElastixInputs, "of", staticmethod(recording))
    shift = np.array([1.5, -1.0, 2.0])  # mm: the moving copy's header moves the phantom by this much
    found = prealign(fine, affine_module._sitk(make_image(volume, spacing=(0.4, 0.5, 1.0),
                                                          origin=tuple(np.array([3.0, -2.0, 7.0]) + shift))),
                     transform="rigid", threads=2)
    assert seen and all(size[0] <= 40 for size in seen)
    np.testing.assert_allclose(found.matrix[:3, 3], shift, atol=0.3)
    np.testing.assert_allclose(found.matrix[:3, :3], np.eye(3), atol=0.02)


# --- the model's recommended refinement ---------------------------------------------------------

def test_refinement_records_round_trip_and_bad_ones_are_refused(tmp_path, tiny_model_file):
    model = load_model(str(tiny_model_file))
    assert model.refinement == NO_REFINEMENT
    wanted = Refinement(iterations=3, method="field", similarity="lncc2", smoothness=0.2, note="test",
                        multimodal_smoothness=0.1, lncc_sigma=2.0)
    path = save_model_file(tmp_path / "m.pt", model.network, model.architecture, name="m", refinement=wanted)
    assert load_model(str(path)).refinement == wanted
    for bad, message in (({"iterations": -1}, "whole number >= 0"), ({"method": "magic"}, "allowed: field, network"),
                         ({"steps": 3}, "unknown 'refinement' keys"), ({"smoothness": "x"}, "number >= 0"),
                         ({"multimodal_smoothness": -1.0}, "multimodal_smoothness must be a number >= 0"),
                         ({"lncc_sigma": 0}, "lncc_sigma must be a number > 0")):
        content = torch.load(path, weights_only=True)
        content["refinement"] = bad
        torch.save(content, tmp_path / "bad.pt")
        with pytest.raises(ModelError, match=message):
            load_model(str(tmp_path / "bad.pt"))


def test_the_published_models_recommend_field_io(tiny_model_file):
    from dataclasses import replace

    from itk_gradicon.models import PUBLISHED, PUBLISHED_REFINEMENT

    assert all(published.refinement == PUBLISHED_REFINEMENT for published in PUBLISHED.values())
    model = replace(load_model(str(tiny_model_file)), name="unigradicon", refinement=PUBLISHED_REFINEMENT)
    choice = resolve_io(model)
    assert (choice.iterations, choice.method, choice.similarity, choice.coarse_steps, choice.lncc_sigma,
            choice.smoothness, choice.recommended) == (30, "field", "lncc", 20, 3.5, 0.2, True)
    assert choice.multimodal_similarity == "mind"  # the pair's intensities decide, as for the bundled model
    assert resolve_io(model, io_iterations=0).iterations == 0  # the fast mode stays
    assert resolve_io(model, io_iterations=50, io_method="network").method == "network"  # the papers' IO, asked for
    # multiGradICON trained with squared LNCC; one contrast is refined with LNCC, two with MIND
    multi = replace(model, name="multigradicon", similarity="lncc2")
    assert resolve_io(multi).similarity == "lncc"
    two = resolve_io(multi, modalities=("t1w", "t2w"))
    assert (two.similarity, two.smoothness) == ("mind", 0.15)


def test_the_bundled_model_recommends_field_io():
    if not BUNDLED["gradicon-synthbrain-96"].path.is_file():
        pytest.skip("the bundled model file is not in this source tree")
    refinement = load_model("gradicon-synthbrain-96").refinement
    assert (refinement.iterations, refinement.method) == (30, "field") and refinement.multimodal_similarity
    # 20 steps at half resolution at twice the learning rate, then 10 on the full grid
    assert round(refinement.coarse_fraction * refinement.iterations) == 20 and refinement.coarse_lr_factor == 2.0
    assert "20 of the steps at half resolution (learning rate x2)" in resolve_io(load_model("gradicon-synthbrain-96")
                                                                                 ).describe()
    # what gradicon train writes into new model files and what register --help names is the bundled file's
    from itk_gradicon.model_records import FIELD_REFINEMENT

    assert (refinement.iterations, refinement.coarse_fraction, refinement.coarse_lr_factor, refinement.patience) == \
        (FIELD_REFINEMENT.iterations, FIELD_REFINEMENT.coarse_fraction, FIELD_REFINEMENT.coarse_lr_factor,
         FIELD_REFINEMENT.patience)
    help_text = " ".join(CliRunner().invoke(main, ["register", "--help"]).output.split())
    assert f"{refinement.iterations} steps of field IO for gradicon-synthbrain-96" in help_text
    # one contrast: a narrow LNCC window with a stiffer field; two contrasts: MIND with the softer one
    assert (refinement.lncc_sigma, refinement.smoothness, refinement.multimodal_smoothness) == (2.0, 0.2, 0.15)


def test_the_lncc_window_of_field_io_is_the_model_s_and_mind_has_none():
    from itk_gradicon.pipeline import losses

    a, b = torch.rand(1, 1, 12, 12, 12, generator=torch.Generator().manual_seed(0)), torch.rand(1, 1, 12, 12, 12)
    assert losses.similarity_function("lncc") is losses.lncc_loss
    narrow = losses.similarity_function("lncc", lncc_sigma=1.5)
    assert float(narrow(a, b)) == pytest.approx(float(losses.lncc_loss(a, b, sigma=1.5)))
    assert float(narrow(a, b)) != pytest.approx(float(losses.lncc_loss(a, b)))
    assert losses.similarity_function("mind", lncc_sigma=1.5) is losses.mind_loss


def test_io_options_resolve_against_the_recommendation(tiny_model_file):
    from dataclasses import replace

    model = replace(load_model(str(tiny_model_file)),
                    refinement=Refinement(iterations=4, method="field", smoothness=0.3, multimodal_similarity="mind"))
    io = resolve_io(model)
    assert (io.iterations, io.method, io.similarity, io.smoothness, io.recommended) == (4, "field", "lncc", 0.3, True)
    assert "the model's recommendation" in io.describe()
    assert resolve_io(model, io_iterations=0).iterations == 0
    assert resolve_io(model, io_iterations=7).recommended is False
    cross = resolve_io(model, modalities=("t1w", "t2w"))
    assert cross.similarity == "mind" and "t1w and t2w" in cross.describe()
    assert resolve_io(model, modalities=("t1w", "t2w"), io_similarity="lncc2").similarity == "lncc2"
    plain = load_model(str(tiny_model_file))
    assert resolve_io(plain).iterations == 0


def test_each_similarity_gets_the_smoothness_the_model_gives_it(tiny_model_file):
    from dataclasses import replace

    model = replace(load_model(str(tiny_model_file)),
                    refinement=Refinement(iterations=4, method="field", smoothness=0.2, multimodal_smoothness=0.1,
                                          lncc_sigma=2.0))
    one = resolve_io(model, modalities=("t1w", "t1w"))
    assert (one.similarity, one.smoothness, one.lncc_sigma, one.multimodal_smoothness) == ("lncc", 0.2, 2.0, None)
    assert "window sigma 2 network voxels" in one.describe()
    two = resolve_io(model, modalities=("t1w", "t2w"))
    assert (two.similarity, two.smoothness) == ("mind", 0.1) and "window" not in two.describe()
    unnamed = resolve_io(model)  # the pair's intensities decide later, with the smoothness that goes with it
    assert (unnamed.smoothness, unnamed.multimodal_similarity, unnamed.multimodal_smoothness) == (0.2, "mind", 0.1)
    mine = resolve_io(model, io_smoothness=0.5)
    assert (mine.smoothness, mine.multimodal_smoothness) == (0.5, None)
    assert resolve_io(model, modalities=("t1w", "t2w"), io_smoothness=0.5).smoothness == 0.5
    assert resolve_io(model, io_method="network").lncc_sigma is None  # network IO keeps the training loss


@pytest.mark.parametrize("fixed, moving, differ", [
    ("auto", "t2w", False), ("mri", "t1w", False), ("t1w", "t1w", False), ("t1w", "t2w", True),
    ("ct", "mri", True), ("ct", "flair", True), ("ct", "ct", False)])
def test_modalities_differ(fixed, moving, differ):
    assert modalities_differ(fixed, moving) is differ


def test_register_follows_the_model_and_says_so(tmp_path, tiny_model_file, pair_files_io):
    model = load_model(str(tiny_model_file))
    path = save_model_file(tmp_path / "recommends.pt", model.network, model.architecture, name="recommends",
                           refinement=Refinement(iterations=2, method="field"))
    fixed, moving = pair_files_io
    base = ["register", "--model", str(path), "--fixed", str(fixed), "--moving", str(moving),
            "--fixed-modality", "mri", "--moving-modality", "mri", "--seed", "1"]
    default = CliRunner().invoke(main, base + ["--out-transform", str(tmp_path / "a.nii.gz")])
    assert default.exit_code == 0, default.output
    assert "instance optimisation: field, 2 steps (the model's recommendation)" in default.output
    assert "--io-iterations 0 for prediction only" in default.output
    fast = CliRunner().invoke(main, base + ["--io-iterations", "0", "--out-transform", str(tmp_path / "b.nii.gz")])
    assert fast.exit_code == 0, fast.output
    assert "instance optimisation: none (prediction only; the model recommends 2 steps of field IO" in fast.output
    import SimpleITK as sitk

    refined = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a.nii.gz")))
    predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "b.nii.gz")))
    assert not np.array_equal(refined, predicted)


def test_two_named_contrasts_choose_the_multimodal_similarity(tmp_path, tiny_model_file, pair_files_io):
    model = load_model(str(tiny_model_file))
    path = save_model_file(tmp_path / "recommends.pt", model.network, model.architecture, name="recommends",
                           refinement=Refinement(iterations=1, method="field", multimodal_similarity="lncc2"))
    fixed, moving = pair_files_io
    result = CliRunner().invoke(main, ["register", "--model", str(path), "--fixed", str(fixed), "--moving",
                                       str(moving), "--fixed-modality", "t1w", "--moving-modality", "t2w",
                                       "--out-transform", str(tmp_path / "t.h5")])
    assert result.exit_code == 0, result.output
    assert "similarity lncc2 (the model's choice for two modalities, t1w and t2w)" in result.output


@pytest.fixture
def pair_files_io(tmp_path):
    from conftest import blob_volume, make_image

    import itk

    rng = np.random.default_rng(3)
    fixed = make_image(blob_volume((24, 24, 24), rng) * 100)
    moving = make_image(blob_volume((24, 24, 24), rng) * 100)
    itk.imwrite(fixed, str(tmp_path / "f.nii.gz"))
    itk.imwrite(moving, str(tmp_path / "m.nii.gz"))
    return tmp_path / "f.nii.gz", tmp_path / "m.nii.gz"


def test_prealignment_describes_itself():
    found = Prealignment(np.diag([1.1, 1.0, 0.9, 1.0]), "affine", "mass", 1.2)
    assert found.describe().startswith("affine pre-alignment (elastix, from the mass start): scales 1.100/1.000/0.900")


# --- field IO: coarse to fine, early stop --------------------------------------------------------

def _shifted_blobs(shift: int = 2):
    from conftest import blob_volume

    volume = torch.from_numpy(blob_volume((24, 24, 24), np.random.default_rng(2)))[None, None]
    return torch.roll(volume, shift, dims=2), volume


def test_coarse_to_fine_field_io_lowers_the_loss_and_reports_every_step():
    from itk_gradicon.pipeline import losses
    from itk_gradicon.pipeline.instance import FieldSettings, refine_fields

    image_A, image_B = _shifted_blobs()
    zero = torch.zeros(1, 3, 24, 24, 24)
    history, seen = [], []
    disp_AB, disp_BA = refine_fields(zero, zero.clone(), image_A, image_B, steps=12, lr=0.3,
                                     similarity=losses.similarity_function("lncc"), settings=FieldSettings(coarse_steps=8),
                                     history=history, progress=lambda p: seen.append((p.step, p.level)))
    assert disp_AB.shape == zero.shape and disp_BA.shape == zero.shape
    # the progress names the grid: the losses of the two levels are measured on different grids
    assert seen == [(k, "half resolution") for k in range(1, 9)] + [(k, "full resolution") for k in range(9, 13)]
    assert len(history) == 12
    assert history[7]["similarity"] < history[0]["similarity"]  # the coarse level already improves
    assert history[-1]["similarity"] < history[8]["similarity"] + 1e-6 or history[-1]["total"] < history[8]["total"]
    # A(x) = B(x - 2 voxels) along network axis 0, so phi_AB(x) = x + 2 voxels there (CUBE: 2/23)
    assert float(disp_AB[0, 0, 8:16, 8:16, 8:16].mean()) * 23 > 1.0


def test_patience_ends_a_level_that_no_longer_improves():
    from itk_gradicon.pipeline import losses
    from itk_gradicon.pipeline.instance import FieldSettings, refine_fields

    image, _ = _shifted_blobs(0)
    zero = torch.zeros(1, 3, 24, 24, 24)
    history, seen = [], []
    refine_fields(zero, zero.clone(), image, image.clone(), steps=40, lr=0.3,
                  similarity=losses.similarity_function("lncc"), settings=FieldSettings(patience=3), history=history,
                  progress=lambda p: seen.append(p.step))
    assert len(history) < 40 and seen[-1] == 40  # identical images: nothing to improve, the progress jumps to the end


def test_refinement_coarse_fraction_and_patience_are_checked(tmp_path, tiny_model_file):
    model = load_model(str(tiny_model_file))
    path = save_model_file(tmp_path / "m.pt", model.network, model.architecture, name="m")
    for bad, message in (({"coarse_fraction": 1.0}, r"coarse_fraction must be a number in \[0, 1\)"),
                         ({"patience": -2}, "patience must be a whole number >= 0"),
                         ({"coarse_lr_factor": 0}, "coarse_lr_factor must be a number > 0"),
                         ({"coarse_lr_factor": True}, "coarse_lr_factor must be a number > 0")):
        content = torch.load(path, weights_only=True)
        content["refinement"] = bad
        torch.save(content, tmp_path / "bad.pt")
        with pytest.raises(ModelError, match=message):
            load_model(str(tmp_path / "bad.pt"))
    coarse = replace_refinement(model, Refinement(iterations=10, coarse_fraction=0.8))
    assert resolve_io(coarse).coarse_steps == 8 and resolve_io(coarse, io_iterations=5).coarse_steps == 4
    assert resolve_io(coarse, io_method="network").coarse_steps == 0
    assert resolve_io(coarse).coarse_lr_factor == 1.0  # files written before the factor existed: as before
    faster = replace_refinement(model, Refinement(iterations=10, coarse_fraction=0.8, coarse_lr_factor=2.0))
    assert resolve_io(faster).coarse_lr_factor == 2.0
    assert resolve_io(faster, io_method="network").coarse_lr_factor == 1.0


def test_the_coarse_learning_rate_factor_scales_the_half_resolution_steps_only():
    """``coarse_lr_factor`` f: the half-resolution level runs at f times ``lr`` (the same as asking that rate there),
    the full grid at ``lr``; without coarse steps it changes nothing."""
    from itk_gradicon.pipeline import losses
    from itk_gradicon.pipeline.instance import FieldSettings, refine_fields

    image_A, image_B = _shifted_blobs()
    zero = torch.zeros(1, 3, 24, 24, 24)
    lncc = losses.similarity_function("lncc")

    def run(lr, **settings):
        return refine_fields(zero, zero.clone(), image_A, image_B, steps=6, lr=lr, similarity=lncc,
                             settings=FieldSettings(**settings))[0]

    all_coarse_doubled = run(0.2, coarse_steps=5, coarse_lr_factor=2.0)
    assert not torch.equal(all_coarse_doubled, run(0.2, coarse_steps=5))
    # with every step on the full grid the factor is never used
    assert torch.equal(run(0.2, coarse_lr_factor=2.0), run(0.2))
    # the coarse level alone (6 of 6 steps would leave no full grid: 5 + 1) at 0.4 equals factor 2 at 0.2 there
    coarse_only = refine_fields(zero, zero.clone(), image_A, image_B, steps=5, lr=0.2, similarity=lncc,
                                settings=FieldSettings(coarse_steps=5, coarse_lr_factor=2.0))[0]
    assert torch.equal(coarse_only, refine_fields(zero, zero.clone(), image_A, image_B, steps=5, lr=0.4,
                                                  similarity=lncc, settings=FieldSettings(coarse_steps=5))[0])


def replace_refinement(model, refinement):
    from dataclasses import replace

    return replace(model, refinement=refinement)


def test_register_prints_its_stage_times(tmp_path, tiny_model_file, pair_files_io):
    fixed, moving = pair_files_io
    result = CliRunner().invoke(main, ["register", "--model", str(tiny_model_file), "--fixed", str(fixed), "--moving",
                                       str(moving), "--out-transform", str(tmp_path / "t.h5")])
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("done in ") and "interpreter and imports" in last


def test_the_seconds_before_a_run_count_from_python_not_from_a_shell_that_ran_first(monkeypatch):
    """``bash -c "pip install ... && gradicon register ..."`` execs gradicon in the shell's process, which began
    before the installation: the seconds before the run then count from this package's import."""
    import time

    import itk_gradicon
    from itk_gradicon.commands import register as register_module

    monkeypatch.setattr(itk_gradicon, "IMPORTED_AT", float("-inf"))  # as if imported before the process began
    age = register_module.process_seconds()  # the process's own age
    if age is None:
        pytest.skip("no /proc: process start times are not read here")
    gap = min(register_module.BEFORE_PYTHON_S, age / 4)
    monkeypatch.setattr(register_module, "BEFORE_PYTHON_S", gap)
    monkeypatch.setattr(itk_gradicon, "IMPORTED_AT", time.perf_counter() - age + gap / 2)  # as Python began
    assert register_module.process_seconds() == pytest.approx(age, abs=0.2)
    monkeypatch.setattr(itk_gradicon, "IMPORTED_AT", time.perf_counter() - age / 2)  # long after the start
    assert register_module.process_seconds() == pytest.approx(age / 2, abs=0.2)


# --- the model's domain ------------------------------------------------------------------------

def test_a_pair_outside_the_models_domain_is_registered_with_a_warning(tmp_path, tiny_model_file):
    from itk_gradicon.models import Domain

    import itk

    from conftest import blob_volume, make_image

    model = load_model(str(tiny_model_file))
    path = save_model_file(tmp_path / "brain.pt", model.network, model.architecture, name="brain",
                           domain=Domain("brain MRI", ("mri",), (140.0, 260.0)))
    assert load_model(str(path)).domain.extent_mm == (140.0, 260.0)
    rng = np.random.default_rng(8)
    small = make_image(blob_volume((24, 24, 24), rng) * 100, spacing=(2.0, 2.0, 2.0))  # 48 mm: a spinal cord's field
    brain = make_image(blob_volume((24, 24, 24), rng) * 100, spacing=(7.0, 7.0, 7.0))  # 168 mm
    for image, name in ((small, "small"), (brain, "brain")):
        itk.imwrite(image, str(tmp_path / f"{name}.nii.gz"))
    base = ["register", "--model", str(path), "--out-transform", str(tmp_path / "t.h5"), "--io-iterations", "0"]
    result = CliRunner().invoke(main, base + ["--fixed", str(tmp_path / "small.nii.gz"), "--moving",
                                              str(tmp_path / "brain.nii.gz"), "--moving-modality", "ct"])
    assert result.exit_code == 0, result.output
    assert ("warning: the fixed image spans 48 x 48 x 48 mm; the model 'brain' was trained on brain MRI spanning "
            "140-260 mm per axis") in result.output
    assert "warning: the moving image is ct; the model 'brain' was trained on brain MRI of modality mri only" in result.output
    inside = CliRunner().invoke(main, base + ["--fixed", str(tmp_path / "brain.nii.gz"), "--moving",
                                              str(tmp_path / "brain.nii.gz")])
    assert inside.exit_code == 0 and "warning" not in inside.output


@pytest.mark.parametrize("bad", [{"extent_mm": [200, 100]}, {"modalities": "mri"}, {"size": 3}, [1, 2]])
def test_bad_domain_records_are_refused(tmp_path, tiny_model_file, bad):
    model = load_model(str(tiny_model_file))
    path = save_model_file(tmp_path / "m.pt", model.network, model.architecture, name="m")
    content = torch.load(path, weights_only=True)
    content["domain"] = bad
    torch.save(content, tmp_path / "bad.pt")
    with pytest.raises(ModelError, match="domain"):
        load_model(str(tmp_path / "bad.pt"))


def test_io_starts_from_the_prealignment_outside_the_models_domain(tmp_path, tiny_model_file):
    from dataclasses import replace

    from conftest import blob_volume, make_image
    from itk_gradicon.models import Domain
    from itk_gradicon.network.inference import predict_displacements
    from itk_gradicon.registration import register

    model = replace(load_model(str(tiny_model_file)), domain=Domain("brain MRI", ("mri",), (140.0, 260.0)),
                    refinement=Refinement(iterations=2, method="field"))
    rng = np.random.default_rng(9)
    fixed = make_image(blob_volume((24, 24, 24), rng) * 100, spacing=(2.0, 2.0, 2.0))  # 48 mm: outside
    moving = make_image(blob_volume((24, 24, 24), rng) * 100, spacing=(2.0, 2.0, 2.0))
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return predict_displacements(*args, **kwargs)

    options = dict(model=model, fixed_modality="mri", moving_modality="mri", affine="none", predictor=counting)
    result = register(fixed, moving, **options)
    assert calls == [] and any("starts from the pre-alignment" in m for m in result.messages)
    register(fixed, moving, io_start="prediction", **options)
    assert calls == [1]
    register(fixed, moving, io_iterations=0, **options)  # nothing to refine: the network predicts
    assert calls == [1, 1]
    inside = make_image(blob_volume((24, 24, 24), rng) * 100, spacing=(7.0, 7.0, 7.0))
    register(inside, inside, **options)
    assert calls == [1, 1, 1]
    with pytest.raises(Exception, match="unknown io_start 'zero'; allowed: auto, prediction, prealignment"):
        register(fixed, moving, io_start="zero", **options)


def test_two_contrasts_are_told_from_the_intensities_when_not_named(tiny_model_file):
    from dataclasses import replace

    from conftest import blob_volume, make_image
    from itk_gradicon.registration import intensity_correlation, register

    volume = blob_volume((24, 24, 24), np.random.default_rng(10))
    inverted = np.where(volume > 0.2, 1.2 - volume, 0.0).astype(np.float32)  # another contrast, same anatomy
    as_tensor = lambda a: torch.from_numpy(a)[None, None]  # noqa: E731
    assert intensity_correlation(as_tensor(volume), as_tensor(volume)) == pytest.approx(1.0)
    assert intensity_correlation(as_tensor(volume), as_tensor(inverted)) < 0
    assert intensity_correlation(as_tensor(volume), torch.zeros(1, 1, 24, 24, 24)) == 1.0  # no overlap: no verdict

    model = replace(load_model(str(tiny_model_file)),
                    refinement=Refinement(iterations=1, method="field", multimodal_similarity="lncc2"))
    fixed, moving = make_image(volume * 100), make_image(inverted * 100)
    options = dict(model=model, affine="none", fixed_modality="mri", moving_modality="mri")
    told = register(fixed, moving, **options)
    assert any("treated as two contrasts, instance optimisation uses lncc2" in m for m in told.messages)
    assert (told.io_similarity, told.io_smoothness) == ("lncc2", 0.15)
    softer = replace(model, refinement=replace(model.refinement, smoothness=0.3, multimodal_smoothness=0.05))
    assert register(fixed, moving, **{**options, "model": softer}).io_smoothness == 0.05
    assert register(fixed, make_image(volume * 90), **{**options, "model": softer}).io_smoothness == 0.3
    same = register(fixed, make_image(volume * 90), **options)
    assert not any("two contrasts" in m for m in same.messages)
    named = register(fixed, moving, model=model, affine="none", fixed_modality="t1w", moving_modality="t1w")
    assert not any("two contrasts" in m for m in named.messages)  # the user said one contrast
    chosen = register(fixed, moving, io_similarity="lncc", **options)
    assert not any("two contrasts" in m for m in chosen.messages)


def test_two_contrasts_are_told_from_the_images_as_the_prediction_aligns_them(tiny_model_file):
    """Without a pre-alignment each image reaches the network in its own frame (a published model sizes each
    image's array to its grid), so two fields of view do not lie on one another until the network's prediction
    brings them together: field IO's contrast check compares the moving image warped by that prediction."""
    from dataclasses import replace

    from conftest import blob_volume, make_image
    from itk_gradicon.io.grid import ImageGrid
    from itk_gradicon.io.itk_bridge import to_simpleitk
    from itk_gradicon.network.sampling import cube_identity
    from itk_gradicon.registration import register
    from itk_gradicon.spatial.frames import NetworkFrame

    model = replace(load_model(str(tiny_model_file)),
                    refinement=Refinement(iterations=1, method="field", multimodal_similarity="lncc2"))
    volume = blob_volume((24, 24, 24), np.random.default_rng(12))
    fixed = make_image(volume * 100, spacing=(2.0, 2.0, 2.0))
    padded = np.pad(volume * 90, 12)  # the same anatomy in a field of view twice as wide, where it lies
    moving = make_image(padded, spacing=(2.0, 2.0, 2.0), origin=(-24.0, -24.0, -24.0))
    shape = model.architecture.input_shape
    frames = {name: NetworkFrame.reference_layout(ImageGrid.from_image(to_simpleitk(image)), shape)
              for name, image in (("fixed", fixed), ("moving", moving))}

    def cube_map(source: NetworkFrame, target: NetworkFrame) -> torch.Tensor:
        """The displacement (CUBE units, on ``source``'s grid) that takes each node to the same WORLD point
        in ``target``'s frame."""
        to_target = target.world_to_cube() @ source.cube_to_world()
        nodes = cube_identity(shape, dtype=torch.float64)[0].reshape(3, -1).numpy()
        mapped = to_target[:3, :3] @ nodes + to_target[:3, 3:]
        return torch.from_numpy(mapped - nodes).float().reshape(1, 3, *shape)

    def aligning(net, image_A, image_B, *, inverse):
        return cube_map(frames["fixed"], frames["moving"]), cube_map(frames["moving"], frames["fixed"])

    def unmoved(net, image_A, image_B, *, inverse):
        return torch.zeros(1, 3, *shape), torch.zeros(1, 3, *shape)

    options = dict(model=model, affine="none", fixed_modality="mri", moving_modality="mri")
    aligned = register(fixed, moving, predictor=aligning, **options)
    assert aligned.io_similarity == "lncc" and not any("two contrasts" in m for m in aligned.messages)
    apart = register(fixed, moving, predictor=unmoved, **options)  # the frames' identity: the anatomy apart
    assert apart.io_similarity == "lncc2"
    assert any("the network-aligned images' intensities correlate" in m for m in apart.messages)


@pytest.mark.slow
def test_a_real_slab_is_prealigned_with_the_roles_swapped(shared_data):
    """sct_testing_data's T2* slab (24 x 27 x 67 mm) against the same subject's T2 (60 x 55 x 52 mm): elastix
    cannot sample the slab from the T2's grid; the swapped run brings the manual cord masks together (Dice
    within the slab's field of view 0.53 as stored)."""
    import SimpleITK as sitk

    folder = shared_data / "sct_testing_data"
    fixed = sitk.ReadImage(str(folder / "t2" / "t2.nii.gz"), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(folder / "t2s" / "t2s.nii.gz"), sitk.sitkFloat32)
    found = prealign(fixed, moving, transform="affine", threads=2)
    assert found.roles_swapped and found.start == "header"

    fixed_cord = sitk.ReadImage(str(folder / "t2" / "t2_seg-manual.nii.gz"))
    moving_cord = sitk.ReadImage(str(folder / "t2s" / "t2s_seg.nii.gz"))
    covered = sitk.Image(moving_cord.GetSize(), sitk.sitkUInt8) + 1
    covered.CopyInformation(moving_cord)

    def dice(matrix):
        transform = sitk.AffineTransform(3)
        transform.SetMatrix(matrix[:3, :3].ravel().tolist())
        transform.SetTranslation(matrix[:3, 3].tolist())
        on_fixed = [sitk.GetArrayFromImage(sitk.Resample(image, fixed_cord, transform, sitk.sitkNearestNeighbor)) > 0
                    for image in (moving_cord, covered)]
        target = (sitk.GetArrayFromImage(fixed_cord) > 0) & on_fixed[1]
        return 2 * np.sum(on_fixed[0] & target) / (np.sum(on_fixed[0]) + np.sum(target))

    assert dice(found.matrix) > dice(np.eye(4)) + 0.1


def test_the_start_rotations_are_distinct_proper_rotations():
    from itk_gradicon.pipeline.affine import start_rotations

    for dimension, count in ((3, 30), (2, 6)):
        turns = start_rotations(dimension)
        assert len(turns) == count and turns[0][0] == "0 degrees" and np.allclose(turns[0][1], np.eye(dimension))
        for _, matrix in turns:
            assert np.allclose(matrix @ matrix.T, np.eye(dimension)) and np.linalg.det(matrix) == pytest.approx(1.0)
        assert len({tuple(np.round(m, 6).ravel()) for _, m in turns}) == count
    names = dict(start_rotations(3))
    assert np.allclose(names["90 degrees about S"] @ [1, 0, 0], [0, 1, 0])  # L turns to P about the S axis


def _turned(image, degrees: float, axis: int = 2):
    """``image`` (SimpleITK) with its content turned about its centre: only the header changes. Returns the
    copy and the map from the copy's space to ``image``'s (the header change)."""
    from itk_gradicon.pipeline.affine import _placed_through, _turn

    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    turn = np.eye(4)
    turn[:3, :3] = _turn(3, axis, degrees)
    turn[:3, 3] = centre - turn[:3, :3] @ centre
    return _placed_through(image, turn), turn


def test_a_copy_placed_through_a_start_changes_its_header_only():
    import SimpleITK as sitk

    from test_affine import textured_phantom

    image = sitk.GetImageFromArray(textured_phantom((20, 22, 24), np.random.default_rng(1)))
    image.SetSpacing((1.5, 1.0, 2.0))
    image.SetOrigin((3.0, -4.0, 5.0))
    placed, start = _turned(image, 90.0)
    assert np.array_equal(sitk.GetArrayViewFromImage(placed), sitk.GetArrayViewFromImage(image))
    for index in ((0, 0, 0), (19, 3, 7), (5, 21, 23)):
        here = np.append(placed.TransformIndexToPhysicalPoint(index), 1.0)
        assert np.allclose((start @ here)[:3], image.TransformIndexToPhysicalPoint(index))


def test_the_search_finds_a_phantom_turned_far_and_leaves_an_aligned_one(monkeypatch):
    import SimpleITK as sitk

    from itk_gradicon.pipeline.affine import rotation_search
    from test_affine import textured_phantom

    fixed = sitk.GetImageFromArray(textured_phantom((40, 44, 48), np.random.default_rng(4)))
    fixed.SetSpacing((3.0, 3.0, 3.0))
    assert rotation_search(fixed, fixed, np.eye(4)) is None  # registered already: nothing turned beats it
    for degrees in (90.0, 180.0):
        moving, turn = _turned(fixed, degrees)
        truth = np.linalg.inv(turn)  # fixed -> moving: a point of the fixed image to the same voxel of the copy
        found = rotation_search(fixed, moving, np.eye(4))  # the stored positions, far from the truth
        assert found is not None and found[2] > found[3]
        rotation = found[1][:3, :3] @ truth[:3, :3].T
        assert np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1))) < 35  # within elastix's reach


def test_no_turned_start_wins_where_nothing_is_shared():
    """Two unrelated noise volumes (as a CT angiogram against an MRI template: mutual information weak at every
    turn): the small differences between turns stay under the margin."""
    import SimpleITK as sitk

    from itk_gradicon.pipeline.affine import rotation_search

    rng = np.random.default_rng(7)
    fixed, moving = (sitk.GetImageFromArray(rng.random((40, 44, 48)).astype(np.float32)) for _ in range(2))
    for image in (fixed, moving):
        image.SetSpacing((3.0, 3.0, 3.0))
    assert rotation_search(fixed, moving, np.eye(4)) is None


def test_prealign_registers_from_the_turned_start_with_real_elastix():
    import SimpleITK as sitk

    from test_affine import textured_phantom

    fixed = sitk.GetImageFromArray(textured_phantom((40, 44, 48), np.random.default_rng(4)))
    fixed.SetSpacing((3.0, 3.0, 3.0))
    moving, turn = _turned(fixed, 135.0)
    truth = np.linalg.inv(turn)
    lines = []
    found = prealign(fixed, moving, transform="affine", threads=2, log=lines.append)
    assert found.start == "rotated" and found.rotation and "rotated" in lines[-1]
    assert any("scores higher before registration" in line for line in lines)
    corners = np.array([[x, y, z, 1.0] for x in (0, 141) for y in (0, 129) for z in (0, 117)])
    assert np.abs((corners @ (found.matrix - truth).T)[:, :3]).max() < 3.0  # mm, a voxel
    masks = [sitk.Cast(image > 5, sitk.sitkUInt8) for image in (fixed, moving)]  # the moving mask turns with it
    masked = prealign(fixed, moving, *masks, transform="affine", threads=2)
    assert masked.start == "rotated" and np.abs((corners @ (masked.matrix - truth).T)[:, :3]).max() < 3.0


@pytest.mark.slow
def test_a_real_brain_turned_135_degrees_is_found_again(shared_data):
    """lapirn_oasis B turned 135 degrees about S (its header): elastix from the stored positions or the centres
    ends in a wrong basin (Dice 0.51); the turned start finds the pair's alignment (0.65, as unturned)."""
    import SimpleITK as sitk

    from itk_gradicon.evaluation.metrics import label_overlap

    oasis = shared_data / "lapirn_oasis"
    fixed = sitk.ReadImage(str(oasis / "image_A_160x192x144.nii.gz"), sitk.sitkFloat32)
    moving, turn = _turned(sitk.ReadImage(str(oasis / "image_B_160x192x144.nii.gz"), sitk.sitkFloat32), 135.0)
    labels, _ = _turned(sitk.ReadImage(str(oasis / "image_B_160x192x144_seg.nii.gz")), 135.0)
    fixed_labels = sitk.ReadImage(str(oasis / "derived" / "image_A_160x192x144_seg_resampled_to_image_grid.nii.gz"))
    found = prealign(fixed, moving, transform="affine", threads=2)
    assert found.start == "rotated" and found.transform == "affine"
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(found.matrix[:3, :3].ravel().tolist())
    transform.SetTranslation(found.matrix[:3, 3].tolist())
    warped = sitk.Resample(labels, fixed_labels, transform, sitk.sitkNearestNeighbor, 0)
    assert label_overlap(fixed_labels, warped, label_values=[1, 2])["mean_dice"] > 0.64


def test_a_turned_2d_phantom_is_found_again():
    import SimpleITK as sitk

    from itk_gradicon.pipeline.affine import _placed_through, _turn
    from test_affine import textured_phantom

    fixed = sitk.GetImageFromArray(textured_phantom((3, 64, 72), np.random.default_rng(6))[1])
    fixed.SetSpacing((2.0, 2.0))
    centre = np.asarray(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()]))
    turn = np.eye(3)
    turn[:2, :2] = _turn(2, 0, 120.0)
    turn[:2, 2] = centre - turn[:2, :2] @ centre
    moving = _placed_through(fixed, turn)
    found = prealign(fixed, moving, transform="affine", threads=2)
    assert found.start == "rotated"
    corners = np.array([[x, y, 1.0] for x in (0, 142) for y in (0, 126)])
    assert np.abs((corners @ (found.matrix - np.linalg.inv(turn)).T)[:, :2]).max() < 2.0  # mm, a voxel
