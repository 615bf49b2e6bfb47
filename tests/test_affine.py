"""Affine pre-alignment with elastix: the parameter conversion, recovery of known affines, agreement
with elastix's own transform and with transformix, and composition into ``register``'s outputs."""

from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import make_image, random_rotation
from itk_gradicon.errors import InputError
from itk_gradicon.io.itk_bridge import grid_of

RNG_SEED = 5


def textured_phantom(shape, rng):
    """An ellipsoid with inner spheres of several intensities and a smooth texture (ARRAY order)."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    z, y, x = grids
    body = (x / 0.7) ** 2 + (y / 0.6) ** 2 + (z / 0.65) ** 2 < 1
    out = body * 0.3
    for _ in range(8):
        c = rng.uniform(-0.4, 0.4, 3)
        r = rng.uniform(0.1, 0.25)
        out = out + ((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 < r * r) * rng.uniform(0.2, 0.7)
    texture = sum(np.sin(rng.uniform(2, 6) * g + rng.uniform(0, 6)) for g in grids) * 0.05
    return ((out + texture * body) * 100).astype(np.float32)


def known_affine(center, rng=None):
    """A fixed -> moving affine: a few degrees of rotation, +-5% scaling and shear, mm translation."""
    linear = np.array([[0.98, -0.10, 0.05], [0.10, 0.97, 0.02], [-0.04, 0.00, 1.03]])
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = np.asarray(center) + np.array([3.0, -2.0, 1.5]) - linear @ np.asarray(center)
    return matrix


def world_points(image):
    from itk_gradicon.spatial.frames import ImageGrid

    return grid_of(image).world_points().reshape(-1, 3)


def max_error_mm(a, b, points):
    diff = points @ (a - b)[:3, :3].T + (a - b)[:3, 3]
    return float(np.linalg.norm(diff, axis=1).max())


@pytest.fixture(scope="module")
def pair():
    """A fixed phantom on an oblique, anisotropic grid and the moving image ``fixed o A^-1`` (so that
    ``moving(A(x)) = fixed(x)``: elastix should find ``A``)."""
    import itk

    from itk_gradicon.spatial.frames import ImageGrid, apply_affine
    from itk_gradicon.spatial.transforms import affine_to_itk

    rng = np.random.default_rng(RNG_SEED)
    direction = random_rotation(rng, max_angle_deg=25) @ np.diag([-1.0, -1.0, 1.0])
    fixed = make_image(textured_phantom((40, 44, 48), rng), spacing=(1.0, 1.2, 1.5), origin=(-10, 5, 3),
                       direction=direction)
    grid = grid_of(fixed)
    center = apply_affine(grid.index_to_world(), (np.asarray(grid.size) - 1) / 2.0)
    affine = known_affine(center)
    moving = itk.resample_image_filter(fixed, transform=affine_to_itk(np.linalg.inv(affine)),
                                       use_reference_image=True, reference_image=fixed, default_pixel_value=0)
    return {"fixed": fixed, "moving": moving, "affine": affine}


# ---- the conversion, by hand ----------------------------------------------------------------------

def test_conversion_by_hand_3d():
    from itk_gradicon.pipeline.affine import affine_from_elastix_parameters

    m = np.array([[1.1, 0.2, 0.0], [-0.1, 0.9, 0.3], [0.05, 0.0, 1.2]])
    t = np.array([2.0, -3.0, 0.5])
    c = np.array([10.0, 20.0, -5.0])
    params = {"Transform": ("AffineTransform",), "FixedImageDimension": ("3",),
              "TransformParameters": tuple(str(v) for v in [*m.reshape(-1), *t]),
              "CenterOfRotationPoint": tuple(str(v) for v in c), "UseDirectionCosines": ("true",)}
    matrix = affine_from_elastix_parameters(params)
    x = np.array([1.0, -4.0, 7.0])
    expected = m @ (x - c) + c + t  # elastix's AffineTransform
    np.testing.assert_allclose(matrix[:3, :3] @ x + matrix[:3, 3], expected, atol=1e-12)
    np.testing.assert_allclose(matrix[3], [0, 0, 0, 1])


def test_conversion_by_hand_2d_and_translation():
    from itk_gradicon.pipeline.affine import affine_from_elastix_parameters

    params = {"Transform": ("AffineTransform",), "TransformParameters": ("2", "0", "0", "0.5", "1", "-1"),
              "CenterOfRotationPoint": ("4", "2")}
    # T(x) = M (x - c) + c + t: x = (0, 0) -> (2*-4 + 4 + 1, 0.5*-2 + 2 - 1) = (-3, 0)
    np.testing.assert_allclose(affine_from_elastix_parameters(params) @ [0, 0, 1], [-3, 0, 1])
    shift = affine_from_elastix_parameters({"Transform": ("TranslationTransform",),
                                            "TransformParameters": ("1.5", "-2", "3")})
    np.testing.assert_allclose(shift @ [1, 1, 1, 1], [2.5, -1, 4, 1])


@pytest.mark.parametrize("change,fragment", [
    ({"Transform": ("EulerTransform",)}, "EulerTransform"),
    ({"InitialTransformParametersFileName": ("init.txt",)}, "chains an initial transform"),
    ({"UseDirectionCosines": ("false",)}, "UseDirectionCosines"),
    ({"TransformParameters": ("1", "2", "3")}, "d*d + d parameters"),
    ({"TransformParameters": ("a",) * 12}, "not numeric"),
])
def test_conversion_refuses_what_it_cannot_convert(change, fragment):
    from itk_gradicon.pipeline.affine import affine_from_elastix_parameters

    params = {"Transform": ("AffineTransform",), "TransformParameters": tuple(["1", "0", "0", "0", "1", "0",
                                                                              "0", "0", "1", "0", "0", "0"]),
              "CenterOfRotationPoint": ("0", "0", "0")}
    params.update(change)
    with pytest.raises(InputError, match=re.escape(fragment)):
        affine_from_elastix_parameters(params)


@pytest.mark.parametrize("kwargs,fragment", [({"metric": "cc"}, "unknown affine metric"),
                                             ({"initialization": "moments"}, "unknown affine initialization"),
                                             ({"iterations": 0}, "iterations"),
                                             ({"threads": 0}, "threads")])
def test_options_are_checked(pair, kwargs, fragment):
    from itk_gradicon.pipeline.affine import elastix_affine

    with pytest.raises(InputError, match=fragment):
        elastix_affine(pair["fixed"], pair["moving"], **kwargs)


# ---- against elastix itself ----------------------------------------------------------------------

def test_conversion_agrees_with_elastix_and_transformix(pair):
    """Our matrix from the parameter map equals itk-elastix's own ITK transform, and resampling with
    it equals transformix's output image."""
    import itk

    from itk_gradicon.pipeline.affine import affine_from_elastix_parameters, affine_parameter_map
    from itk_gradicon.spatial.transforms import affine_from_itk, affine_to_itk

    fixed, moving = pair["fixed"], pair["moving"]
    parameter_object = itk.ParameterObject.New()
    parameter_object.AddParameterMap(affine_parameter_map(metric="ncc", iterations=64, resolutions=2))
    method = itk.ElastixRegistrationMethod[type(fixed), type(moving)].New(
        fixed_image=fixed, moving_image=moving, parameter_object=parameter_object, log_to_console=False)
    method.SetNumberOfThreads(2)
    method.Update()
    result = method.GetTransformParameterObject()
    ours = affine_from_elastix_parameters(result.GetParameterMap(0))
    theirs = affine_from_itk(itk.AffineTransform[itk.D, 3].cast(method.ConvertToItkTransform(method.GetNthTransform(0))))
    points = world_points(fixed)
    assert max_error_mm(ours, theirs, points) < 1e-6

    result.SetParameter(0, "FinalBSplineInterpolationOrder", "1")  # linear, as ITK's resampling below
    result.SetParameter(0, "ResultImagePixelType", "float")
    by_transformix = itk.transformix_filter(moving, transform_parameter_object=result, log_to_console=False)
    by_itk = itk.resample_image_filter(moving, transform=affine_to_itk(ours), use_reference_image=True,
                                       reference_image=fixed, default_pixel_value=0)
    a = itk.array_view_from_image(by_transformix)
    b = itk.array_view_from_image(by_itk)
    inner = (slice(3, -3),) * 3  # transformix and ITK differ only where samples leave the image
    assert float(np.abs(a[inner] - b[inner]).max()) < 1e-3 * float(np.abs(b).max())


def test_known_affine_is_recovered(pair):
    """elastix_affine finds ``A`` on an oblique anisotropic grid within 0.15 mm at every voxel."""
    from itk_gradicon.pipeline.affine import elastix_affine

    found = elastix_affine(pair["fixed"], pair["moving"], metric="ncc")
    assert max_error_mm(found, pair["affine"], world_points(pair["fixed"])) < 0.15


def test_masks_and_failures(pair):
    """With a mask covering the phantom the result is as good (masks are not eroded: a 25-voxel mask
    survives the coarse levels). When elastix fails, its reason comes back as a one-line InputError."""
    import itk

    from itk_gradicon.pipeline.affine import elastix_affine

    fixed, moving = pair["fixed"], pair["moving"]
    mask = itk.image_from_array((itk.array_view_from_image(fixed) > 10).astype(np.uint8))
    mask.CopyInformation(fixed)
    found = elastix_affine(fixed, moving, fixed_mask=mask, metric="ncc")
    assert max_error_mm(found, pair["affine"], world_points(fixed)) < 0.5
    far = make_image(itk.array_from_image(moving), origin=(1000.0, 0.0, 0.0))
    with pytest.raises(InputError, match="elastix could not compute the affine") as err:
        elastix_affine(fixed, far, initialization="none")  # no overlap: no sample maps into the moving image
    assert "samples" in str(err.value).lower()
    assert "\n" not in str(err.value)


def test_reproducible(pair):
    from itk_gradicon.pipeline.affine import elastix_affine

    a = elastix_affine(pair["fixed"], pair["moving"], iterations=40, resolutions=2)
    b = elastix_affine(pair["fixed"], pair["moving"], iterations=40, resolutions=2)
    np.testing.assert_array_equal(a, b)


# ---- composition into register's outputs -----------------------------------------------------------

@pytest.fixture(scope="module")
def identity_model_file(tmp_path_factory):
    """A tiny untrained network: its last convolutions are zero, so it predicts the identity."""
    from conftest import tiny_architecture
    from itk_gradicon.models import save_model_file
    from itk_gradicon.network import build_network

    arch = tiny_architecture(3)
    path = tmp_path_factory.mktemp("identity") / "identity3d.pt"
    save_model_file(path, build_network(arch), arch, name="identity3d")
    return path


def test_affine_with_an_identity_network_is_exactly_the_affine(pair, identity_model_file):
    """Forward = A, inverse = A^-1 (on the moving grid), forward o inverse = identity."""
    from itk_gradicon.spatial.frames import ImageGrid, apply_affine
    from itk_gradicon.registration import register

    fixed, moving, affine = pair["fixed"], pair["moving"], pair["affine"]
    result = register(fixed, moving, model=str(identity_model_file), initial_transform=affine,
                      fixed_modality="mri", moving_modality="mri")
    fixed_points = grid_of(fixed).world_points()
    np.testing.assert_allclose(fixed_points + result.forward_field.array, apply_affine(affine, fixed_points),
                               atol=1e-4)
    moving_points = grid_of(moving).world_points()
    np.testing.assert_allclose(moving_points + result.inverse_field.array,
                               apply_affine(np.linalg.inv(affine), moving_points), atol=1e-4)
    np.testing.assert_allclose(result.deformable_forward_field.array, 0.0, atol=1e-5)


def test_written_forward_transform_is_affine_after_deformation(tmp_path, pair, tiny_model_file):
    """``register --affine elastix``: the forward .h5 equals A o phi at every fixed voxel (phi = the
    ANTs 1Warp), warping with it equals warping with ITK's composite [A, phi], and the inverse .h5
    undoes the forward transform as the network's phi_BA undoes phi_AB."""
    import itk
    from click.testing import CliRunner

    from itk_gradicon.cli import main
    from itk_gradicon.spatial.frames import ImageGrid, apply_affine
    from itk_gradicon.spatial.transforms import DisplacementField, affine_to_itk, read_affine_file

    fixed_path, moving_path = tmp_path / "f.nii.gz", tmp_path / "m.nii.gz"
    itk.imwrite(pair["fixed"], str(fixed_path))
    itk.imwrite(pair["moving"], str(moving_path))
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(main, [
        "register", "--fixed", str(fixed_path), "--moving", str(moving_path), "--model", str(tiny_model_file),
        "--affine", "elastix", "--out-transform", str(out / "fwd.h5"), "--out-inverse-transform",
        str(out / "inv.h5"), "--out-ants-prefix", str(out / "a_"), "--out-warped", str(out / "w.nii.gz")])
    assert result.exit_code == 0, result.output
    assert "affine pre-alignment (elastix, from the header start)" in result.output
    affine = read_affine_file(out / "a_0GenericAffine.mat")
    # default options (Mattes MI): on this piecewise-constant phantom MI is biased towards a slightly
    # smaller scale (about 2 mm at the corners); on real brains it is within 0.5 mm (test below)
    assert max_error_mm(affine, pair["affine"], world_points(pair["fixed"])) < 3.0

    grid = grid_of(pair["fixed"])
    points = grid.world_points()
    phi = itk.array_from_image(itk.imread(str(out / "a_1Warp.nii.gz")))
    forward = itk.transformread(str(out / "fwd.h5"))[0]
    forward_disp = itk.array_from_image(forward.GetDisplacementField())
    np.testing.assert_allclose(points + forward_disp, apply_affine(affine, points + phi), atol=1e-3)

    composite = itk.CompositeTransform[itk.D, 3].New()
    composite.AddTransform(affine_to_itk(affine))
    composite.AddTransform(DisplacementField.from_image(itk.imread(str(out / "a_1Warp.nii.gz"))).to_transform())  # the last added acts first: A(phi(x))
    moving_f = itk.imread(str(moving_path), itk.F)
    by_composite = itk.resample_image_filter(moving_f, transform=composite, use_reference_image=True,
                                             reference_image=pair["fixed"])
    warped = itk.imread(str(out / "w.nii.gz"), itk.F)
    np.testing.assert_allclose(itk.array_view_from_image(warped), itk.array_view_from_image(by_composite),
                               atol=1e-2)

    inverse = itk.transformread(str(out / "inv.h5"))[0]
    assert tuple(inverse.GetDisplacementField().GetLargestPossibleRegion().GetSize()) == \
        tuple(pair["moving"].GetLargestPossibleRegion().GetSize())


# ---- real images ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_mutual_information_recovers_a_known_affine_on_a_real_brain(shared_data):
    """The default options (Mattes MI) on an OASIS brain (2 mm) warped by a known affine: within
    0.5 mm at every voxel (0.35 mm measured)."""
    import itk

    from itk_gradicon.pipeline.affine import elastix_affine
    from itk_gradicon.spatial.frames import ImageGrid, apply_affine
    from itk_gradicon.spatial.transforms import affine_to_itk

    brain = itk.imread(str(shared_data / "lapirn_oasis" / "image_A_160x192x144.nii.gz"), itk.F)
    brain = itk.bin_shrink_image_filter(brain, shrink_factors=[2, 2, 2])
    grid = grid_of(brain)
    affine = known_affine(apply_affine(grid.index_to_world(), (np.asarray(grid.size) - 1) / 2.0))
    moving = itk.resample_image_filter(brain, transform=affine_to_itk(np.linalg.inv(affine)),
                                       use_reference_image=True, reference_image=brain)
    found = elastix_affine(brain, moving, threads=2)
    assert max_error_mm(found, affine, world_points(brain)) < 0.5


@pytest.mark.slow
def test_elastix_is_stable_on_an_oblique_real_pair(shared_data):
    """chris_PD (oblique stack, 2.4 mm slices) to chris_t1 with 2 threads: runs, twice the same
    result, a rigid-like answer (scales within 3% of 1)."""
    import itk

    from itk_gradicon.pipeline.affine import elastix_affine

    folder = shared_data / "niivue_demo_images"
    fixed = itk.imread(str(folder / "chris_t1.nii.gz"), itk.F)
    moving = itk.imread(str(folder / "chris_PD.nii.gz"), itk.F)
    first = elastix_affine(fixed, moving, threads=2)
    second = elastix_affine(fixed, moving, threads=2)
    np.testing.assert_array_equal(first, second)
    scales = np.linalg.svd(first[:3, :3], compute_uv=False)
    assert np.all(np.abs(scales - 1.0) < 0.03), scales


def test_the_parameter_map_shrinks_its_pyramids_and_runs_the_measured_iterations():
    from itk_gradicon.pipeline.elastix import HISTOGRAM_BINS, ITERATIONS, affine_parameter_map

    params = affine_parameter_map()
    assert params["FixedImagePyramid"] == ("FixedRecursiveImagePyramid",)
    assert params["MovingImagePyramid"] == ("MovingRecursiveImagePyramid",)
    assert params["MaximumNumberOfIterations"] == (str(ITERATIONS),) == ("512",)
    assert params["NumberOfHistogramBins"] == (str(HISTOGRAM_BINS),)
    assert affine_parameter_map(iterations=64)["MaximumNumberOfIterations"] == ("64",)
