"""The transforms we write mean the same thing to ITK, ANTs, transformix and our own CLI.

On random geometry (oblique and flipped fixed grid, another oblique moving grid), a smooth random
displacement field on the fixed grid warps a moving image four ways: ITK's resampler with
``field.to_transform()``, ``ants.apply_transforms`` with the file ``write_transform`` wrote,
transformix (itk-elastix and the Debian CLI) with the folder ``write_elastix`` wrote, and
``gradicon apply-transform``. Values are compared at voxels whose sample point is at least one
voxel (three for B-splines) inside the moving image; the tolerance is 1e-3 of the intensity range
(images are in [0, 1]); the agreement measured is about 3e-7.

ANTs' order of several ``-t`` transforms is pinned with an affine and a field that do not commute.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import blob_volume, make_image, random_rotation
from itk_gradicon.cli import main
from itk_gradicon.errors import InputError
from itk_gradicon.spatial.frames import ImageGrid, apply_affine
from itk_gradicon.io.images import OutputTransaction
from itk_gradicon.spatial.transforms import (DisplacementField, TransformSpec, ants_file_names, compose_transforms,
                                     read_transform, sample_transform, write_affine_file, write_elastix,
                                     write_field_image, write_transform)
from itk_gradicon.io.itk_bridge import grid_of

TOLERANCE = 1e-5  # of the intensity range (1.0); measured: 3e-7
TRANSFORMIX = shutil.which("transformix")


def smooth_field(grid: ImageGrid, rng: np.random.Generator, *, amplitude: float = 2.0) -> DisplacementField:
    """A sum of three Gaussian bumps of random vectors (about ``amplitude`` mm), in WORLD space."""
    points = grid.world_points()
    centre = points.reshape(-1, 3).mean(0)
    extent = float(np.ptp(points.reshape(-1, 3), axis=0).max())
    u = np.zeros_like(points)
    for _ in range(3):
        c = centre + rng.uniform(-0.25, 0.25, 3) * extent
        width = rng.uniform(0.25, 0.4) * extent
        u += rng.normal(size=3) * amplitude * np.exp(-((points - c) ** 2).sum(-1) / (2 * width ** 2))[..., None]
    return DisplacementField(grid, u)


def random_pair(seed: int):
    """Fixed image (oblique and flipped, zeros) and moving image (oblique, blobs in [0, 1]) that covers it."""
    rng = np.random.default_rng(seed)
    size = tuple(int(v) for v in rng.integers(10, 26, 3))
    flip = np.diag([-1.0, -1.0, 1.0])
    fixed = make_image(np.zeros(size[::-1], np.float32), spacing=rng.uniform(1.0, 2.5, 3),
                       origin=rng.uniform(-40, 40, 3), direction=random_rotation(rng) @ flip)
    fixed_grid = grid_of(fixed)
    centre = fixed_grid.world_points().reshape(-1, 3).mean(0)
    extent = float(np.ptp(fixed_grid.world_points().reshape(-1, 3), axis=0).max())
    moving_size = np.array([int(v) for v in rng.integers(20, 40, 3)])
    spacing = (extent + 12.0) / (moving_size - 1)
    direction = random_rotation(rng)
    origin = centre - direction @ (spacing * (moving_size - 1) / 2)
    moving = make_image(blob_volume(tuple(moving_size[::-1]), rng, blobs=10), spacing=spacing, origin=origin,
                        direction=direction)
    return fixed, moving, smooth_field(fixed_grid, rng), rng


def inner_mask(field: DisplacementField, moving, margin: int, transform=None) -> np.ndarray:
    """Fixed voxels whose sample point lies at least ``margin`` voxels inside the moving image."""
    grid = grid_of(moving)
    displacement = field.array if transform is None else sample_transform(transform, field.grid).array
    index = apply_affine(grid.world_to_index(), field.grid.world_points() + displacement)
    return np.all((index >= margin) & (index <= np.asarray(grid.size) - 1 - margin), axis=-1)


def itk_warp(moving, fixed, transform, *, bspline: bool = False) -> np.ndarray:
    import itk

    image = itk.cast_image_filter(moving, ttype=(type(moving), itk.Image[itk.D, 3]))
    interpolator = (itk.BSplineInterpolateImageFunction.New(image, spline_order=3) if bspline
                    else itk.LinearInterpolateImageFunction.New(image))
    out = itk.resample_image_filter(image, transform=transform, interpolator=interpolator,
                                    use_reference_image=True, reference_image=fixed)
    return itk.array_from_image(out)


def ants_warp(fixed_path, moving_path, transforms, *, interpolator="linear", invert=None) -> np.ndarray:
    import ants

    # whichtoinvert always explicit: antspyx inverts the first of [*.mat, not-mat] on its own otherwise
    out = ants.apply_transforms(ants.image_read(str(fixed_path)), ants.image_read(str(moving_path)),
                                [str(t) for t in transforms], interpolator=interpolator,
                                whichtoinvert=invert or [False] * len(transforms))
    return out.numpy().T  # ANTs' numpy is index order (i, j, k); ITK's is (k, j, i)


def cli_warp(tmp_path: Path, moving_path, fixed_path, transforms, *, interpolation="linear", name="ours"):
    import itk

    out = tmp_path / f"{name}.nii.gz"
    args = ["apply-transform", "--input", str(moving_path), "--reference", str(fixed_path), "--output", str(out),
            "--interpolation", interpolation]
    for t in transforms:
        args += ["--transform", str(t)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return itk.array_from_image(itk.imread(str(out)))


def transformix_python(moving_path, parameter_file, *, linear: bool) -> np.ndarray:
    import itk

    parameters = itk.ParameterObject.New()
    parameters.ReadParameterFile(str(parameter_file))
    if linear:  # a first-order B-spline is linear interpolation (elastix 5.0 has no FinalLinearInterpolator)
        parameters.SetParameter(0, "FinalBSplineInterpolationOrder", "1")
    out = itk.transformix_filter(itk.imread(str(moving_path), itk.F), parameters)
    return itk.array_from_image(out)


def transformix_cli(tmp_path: Path, moving_path, parameter_file, *, linear: bool) -> np.ndarray:
    import itk

    text = Path(parameter_file).read_text()
    if linear:
        text = text.replace("(FinalBSplineInterpolationOrder 3)", "(FinalBSplineInterpolationOrder 1)")
    params = tmp_path / f"cli_params_{int(linear)}.txt"
    params.write_text(text)
    out_dir = tmp_path / f"transformix_{int(linear)}"
    out_dir.mkdir()
    run = subprocess.run([TRANSFORMIX, "-in", str(moving_path), "-out", str(out_dir), "-tp", str(params)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, (out_dir / "transformix.log").read_text()[-2000:]
    return itk.array_from_image(itk.imread(str(out_dir / "result.nii.gz")))


@pytest.fixture(params=[0, 1], ids=["seed0", "seed1"])
def case(request, tmp_path):
    """Files of one random case: fixed, moving, the field as .nii.gz / .h5 / transformix folder."""
    import itk

    fixed, moving, field, rng = random_pair(request.param)
    files = {"fixed": tmp_path / "fixed.nii.gz", "moving": tmp_path / "moving.nii.gz",
             "field": tmp_path / "moving_to_fixed.nii.gz", "h5": tmp_path / "moving_to_fixed.h5"}
    itk.imwrite(fixed, str(files["fixed"]))
    itk.imwrite(moving, str(files["moving"]))
    write_transform(field, files["field"])
    write_transform(field, files["h5"])
    with OutputTransaction() as out:
        files["elastix"] = write_elastix(field, tmp_path / "elastix", out)
    return {"fixed": fixed, "moving": moving, "field": field, "files": files, "rng": rng, "tmp": tmp_path}


def test_linear_warps_agree_itk_ants_transformix_ours(case):
    fixed, moving, field, files, tmp = case["fixed"], case["moving"], case["field"], case["files"], case["tmp"]
    mask = inner_mask(field, moving, margin=1)
    assert mask.mean() > 0.5
    reference = itk_warp(moving, fixed, field.to_transform())
    results = {
        "ants .nii.gz": ants_warp(files["fixed"], files["moving"], [files["field"]]),
        "ants .h5": ants_warp(files["fixed"], files["moving"], [files["h5"]]),
        "transformix (itk-elastix)": transformix_python(files["moving"], files["elastix"], linear=True),
        "ours .nii.gz": cli_warp(tmp, files["moving"], files["fixed"], [files["field"]], name="a"),
        "ours .h5": cli_warp(tmp, files["moving"], files["fixed"], [files["h5"]], name="b"),
        "ours elastix folder": cli_warp(tmp, files["moving"], files["fixed"], [files["elastix"].parent], name="c"),
    }
    for name, warped in results.items():
        error = float(np.abs(warped - reference)[mask].max())
        assert error < TOLERANCE, f"{name}: max difference {error:g} from ITK"


@pytest.mark.skipif(TRANSFORMIX is None, reason="the transformix command (Debian package 'elastix') is not installed")
def test_transformix_command_line_agrees(case):
    fixed, moving, field, files, tmp = case["fixed"], case["moving"], case["field"], case["files"], case["tmp"]
    mask = inner_mask(field, moving, margin=1)
    reference = itk_warp(moving, fixed, field.to_transform())
    warped = transformix_cli(tmp, files["moving"], files["elastix"], linear=True)
    assert float(np.abs(warped - reference)[mask].max()) < TOLERANCE
    mask3 = inner_mask(field, moving, margin=3)
    reference3 = itk_warp(moving, fixed, field.to_transform(), bspline=True)
    warped3 = transformix_cli(tmp, files["moving"], files["elastix"], linear=False)  # our file as written
    assert float(np.abs(warped3 - reference3)[mask3].max()) < TOLERANCE


@pytest.mark.skipif(TRANSFORMIX is None, reason="the transformix command (Debian package 'elastix') is not installed")
def test_transformix_deformation_field_reads_back(case):
    """transformix -def all turns our parameter file into its own field image; we read it as the same field."""
    field, files, tmp = case["field"], case["files"], case["tmp"]
    out_dir = tmp / "def"
    out_dir.mkdir()
    run = subprocess.run([TRANSFORMIX, "-def", "all", "-out", str(out_dir), "-tp", str(files["elastix"])],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:]
    produced = next(out_dir.glob("deformationField.*"))
    again = sample_transform(read_transform(produced), field.grid)
    assert np.abs(again.array - field.array).max() < 1e-4


def test_bspline_warps_agree_itk_ants_transformix_ours(case):
    fixed, moving, field, files, tmp = case["fixed"], case["moving"], case["field"], case["files"], case["tmp"]
    mask = inner_mask(field, moving, margin=3)
    reference = itk_warp(moving, fixed, field.to_transform(), bspline=True)
    results = {
        "ants": ants_warp(files["fixed"], files["moving"], [files["field"]], interpolator="bSpline"),
        "transformix (itk-elastix)": transformix_python(files["moving"], files["elastix"], linear=False),
        "ours": cli_warp(tmp, files["moving"], files["fixed"], [files["field"]], interpolation="bspline"),
    }
    for name, warped in results.items():
        error = float(np.abs(warped - reference)[mask].max())
        assert error < TOLERANCE, f"{name}: max difference {error:g} from ITK"


def random_affine(rng: np.random.Generator) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = random_rotation(rng, max_angle_deg=15) @ np.diag(rng.uniform(0.9, 1.1, 3))
    matrix[:3, 3] = rng.uniform(-3, 3, 3)
    return matrix


def test_ants_order_first_listed_acts_on_points_first(case):
    """antsApplyTransforms -t WARP -t AFFINE samples the moving image at AFFINE(WARP(x)); so does
    compose_transforms([WARP, AFFINE]) and our CLI; the other order is measurably different."""
    import itk

    from itk_gradicon.spatial.transforms import affine_to_itk

    fixed, moving, field, files, tmp = case["fixed"], case["moving"], case["field"], case["files"], case["tmp"]
    affine = random_affine(case["rng"])
    names = ants_file_names(str(tmp / "p_"))
    write_affine_file(affine, Path(names["affine"]))
    write_field_image(field, Path(names["warp"]))
    warp, aff = names["warp"], names["affine"]

    point = field.grid.world_points()[2, 3, 4]
    composed = compose_transforms([warp, aff])
    expected = affine_to_itk(affine).TransformPoint(field.to_transform().TransformPoint(point))
    np.testing.assert_allclose(list(composed.TransformPoint(point)), list(expected), atol=1e-4)

    def itk_chain(first_on_points, then):
        chain = itk.CompositeTransform[itk.D, 3].New()
        chain.AddTransform(then)
        chain.AddTransform(first_on_points)  # ITK: the transform added last acts first
        return chain

    affine_after_warp = itk_chain(field.to_transform(), affine_to_itk(affine))
    warp_after_affine = itk_chain(affine_to_itk(affine), field.to_transform())
    for order, itk_transform, other in (([warp, aff], affine_after_warp, warp_after_affine),
                                        ([aff, warp], warp_after_affine, affine_after_warp)):
        mask = inner_mask(field, moving, margin=1, transform=itk_transform)
        assert mask.mean() > 0.3
        reference = itk_warp(moving, fixed, itk_transform)
        ants_result = ants_warp(files["fixed"], files["moving"], order)
        ours = cli_warp(tmp, files["moving"], files["fixed"], order, name="order")
        assert float(np.abs(ants_result - reference)[mask].max()) < TOLERANCE, order
        assert float(np.abs(ours - reference)[mask].max()) < TOLERANCE, order
        assert float(np.abs(itk_warp(moving, fixed, other) - reference)[mask].max()) > 20 * TOLERANCE


def test_ants_inverse_syntax_for_affines(case):
    """'[FILE,1]' is ANTs' inverse: ours matches ants.apply_transforms(whichtoinvert=[True])."""
    files, tmp = case["files"], case["tmp"]
    affine = random_affine(case["rng"])
    aff = tmp / "a_0GenericAffine.mat"
    write_affine_file(affine, aff)
    inverse = read_transform(f"[{aff},1]")
    point = [1.0, -2.0, 3.0]
    np.testing.assert_allclose(apply_affine(affine, np.asarray(inverse.TransformPoint(point))), point, atol=1e-9)
    theirs = ants_warp(files["fixed"], files["moving"], [aff], invert=[True])
    ours = cli_warp(tmp, files["moving"], files["fixed"], [f"[{aff},1]"], name="inv")
    assert float(np.abs(ours - theirs).max()) < TOLERANCE


def test_ants_prefix_outputs_compose_like_the_forward_field(case):
    """write_register_outputs with an affine writes PREFIX0GenericAffine.mat + PREFIX1Warp.nii.gz;
    ANTs applying '-t 1Warp -t 0GenericAffine' gives the same image as the forward field, and the
    inverse pair '-t [0GenericAffine,1] -t 1InverseWarp' undoes the forward pair at points."""
    import itk

    from itk_gradicon.registration import RegistrationResult
    from itk_gradicon.commands.register import RegisterOutputs, write_register_outputs
    from itk_gradicon.spatial.transforms import affine_to_itk

    fixed, moving, files, tmp = case["fixed"], case["moving"], case["files"], case["tmp"]
    grid = case["field"].grid
    shift = np.array([1.5, -0.5, 2.0])  # a constant field: its inverse is known exactly
    warp = DisplacementField(grid, np.broadcast_to(shift, grid.array_shape + (3,)).copy())
    inverse_warp = DisplacementField(grid, -warp.array)
    affine = random_affine(case["rng"])
    forward_transform = itk.CompositeTransform[itk.D, 3].New()
    forward_transform.AddTransform(affine_to_itk(affine))
    forward_transform.AddTransform(warp.to_transform())  # affine(warp(x)), the registration's forward map
    forward = sample_transform(forward_transform, grid)
    result = RegistrationResult(forward, None, affine, warp, inverse_warp, "mri", "mri")
    prefix = str(tmp / "out" / "subj_")
    (tmp / "out").mkdir()
    write_register_outputs(result, RegisterOutputs(ants_prefix=prefix))
    names = ants_file_names(prefix)
    assert all(Path(names[k]).is_file() for k in ("affine", "warp", "inverse_warp"))
    mask = inner_mask(forward, moving, margin=1)
    reference = itk_warp(moving, fixed, forward.to_transform())
    theirs = ants_warp(files["fixed"], files["moving"], [names["warp"], names["affine"]])
    assert float(np.abs(theirs - reference)[mask].max()) < TOLERANCE
    back = compose_transforms([f"[{names['affine']},1]", names["inverse_warp"]])
    there = compose_transforms([names["warp"], names["affine"]])
    # points whose images stay on the fields' grid: ITK (and so ANTs) gives a displacement field no
    # effect beyond its grid (continuous index outside [-0.5, n - 0.5)), it does not extend it
    for point in grid.world_points()[3:-3:3, 3:-3:3, 3:-3:3].reshape(-1, 3):
        np.testing.assert_allclose(list(back.TransformPoint(there.TransformPoint(point))), point, atol=1e-4)


# ---- reading every transform format ----------------------------------------------------------

@pytest.fixture
def small_field(tmp_path):
    rng = np.random.default_rng(3)
    grid = ImageGrid(size=(8, 7, 6), spacing=(1.5, 2.0, 1.0), origin=(5.0, -3.0, 2.0),
                     direction=tuple(map(tuple, random_rotation(rng) @ np.diag([-1.0, -1.0, 1.0]))))
    return smooth_field(grid, rng), rng


def _same_map(a, b, points, atol=1e-4):
    for p in points:
        np.testing.assert_allclose(list(a.TransformPoint(p)), list(b.TransformPoint(p)), atol=atol)


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".nrrd", ".mha", ".h5", ".hdf5"])
def test_field_files_read_back(small_field, tmp_path, ending):
    field, _ = small_field
    path = tmp_path / f"t{ending}"
    write_transform(field, path)
    points = field.grid.world_points().reshape(-1, 3)[::17]
    _same_map(read_transform(path), field.to_transform(), points)
    np.testing.assert_allclose(sample_transform(read_transform(path), field.grid).array, field.array, atol=1e-5)


def test_h5_writer_equals_itks_public_writer(small_field, tmp_path):
    """The direct wrapping-module path (fast imports) writes what ``itk.transformwrite`` writes."""
    import itk

    from itk_gradicon.spatial.transforms import displacement_field_transform_type, write_transform_file

    field, _ = small_field
    assert displacement_field_transform_type(3) is itk.DisplacementFieldTransform[itk.D, 3]
    ours, public = tmp_path / "ours.h5", tmp_path / "public.h5"
    write_transform_file(field, ours)
    itk.transformwrite([field.to_transform()], str(public))
    a, b = itk.transformread(str(ours))[0], itk.transformread(str(public))[0]
    assert a.GetNameOfClass() == b.GetNameOfClass() == "DisplacementFieldTransform"
    np.testing.assert_array_equal(np.asarray(a.GetFixedParameters()), np.asarray(b.GetFixedParameters()))
    np.testing.assert_array_equal(itk.array_from_image(a.GetDisplacementField()),
                                  itk.array_from_image(b.GetDisplacementField()))
    write_transform_file(field, tmp_path / "small.h5", compression=True)
    np.testing.assert_array_equal(
        itk.array_from_image(itk.transformread(str(tmp_path / "small.h5"))[0].GetDisplacementField()),
        itk.array_from_image(a.GetDisplacementField()))


@pytest.mark.parametrize("ending", [".tfm", ".txt", ".mat", ".h5"])
def test_affine_files_read_back_and_invert(tmp_path, ending):
    rng = np.random.default_rng(4)
    affine = random_affine(rng)
    path = tmp_path / f"affine{ending}"
    write_affine_file(affine, path)
    point = np.array([3.0, -1.0, 7.0])
    np.testing.assert_allclose(list(read_transform(path).TransformPoint(point)), apply_affine(affine, point), atol=1e-9)
    np.testing.assert_allclose(list(read_transform(f"[ {path} , 1 ]").TransformPoint(apply_affine(affine, point))),
                               point, atol=1e-9)
    np.testing.assert_allclose(list(read_transform(f"[{path},0]").TransformPoint(point)),
                               apply_affine(affine, point), atol=1e-9)


def test_composite_file_and_transform_list_file(small_field, tmp_path):
    """An ITK composite .h5 (ANTs' Composite.h5 layout: affine + field) reads as one composite; a file
    listing two affines composes them as ITK does (the last listed acts on points first)."""
    import itk

    from itk_gradicon.spatial.transforms import affine_to_itk, read_affine_file

    field, rng = small_field
    affine = random_affine(rng)
    composite = itk.CompositeTransform[itk.D, 3].New()
    composite.AddTransform(affine_to_itk(affine))
    composite.AddTransform(field.to_transform())
    itk.transformwrite([composite], str(tmp_path / "Composite.h5"))
    points = field.grid.world_points().reshape(-1, 3)[::23]
    loaded = read_transform(tmp_path / "Composite.h5")
    _same_map(loaded, composite, points)
    _same_map(compose_transforms([tmp_path / "Composite.h5"]), composite, points)
    with pytest.raises(InputError, match="InverseComposite.h5"):
        read_transform(f"[{tmp_path / 'Composite.h5'},1]")

    second = random_affine(rng)
    itk.transformwrite([affine_to_itk(affine), affine_to_itk(second)], str(tmp_path / "two.tfm"))
    np.testing.assert_allclose(read_affine_file(tmp_path / "two.tfm"), affine @ second, atol=1e-9)
    p = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(list(read_transform(tmp_path / "two.tfm").TransformPoint(p)),
                               apply_affine(affine @ second, p), atol=1e-9)
    only_affines = itk.CompositeTransform[itk.D, 3].New()
    only_affines.AddTransform(affine_to_itk(affine))
    only_affines.AddTransform(affine_to_itk(second))
    itk.transformwrite([only_affines], str(tmp_path / "affines.h5"))
    np.testing.assert_allclose(read_affine_file(tmp_path / "affines.h5"), affine @ second, atol=1e-9)


def test_elastix_parameter_file_and_folder(small_field, tmp_path):
    field, _ = small_field
    with OutputTransaction() as out:
        params = write_elastix(field, tmp_path / "el", out)
    points = field.grid.world_points().reshape(-1, 3)[::19]
    _same_map(read_transform(params), field.to_transform(), points)
    _same_map(read_transform(params.parent), field.to_transform(), points)
    other = tmp_path / "bspline.txt"
    other.write_text('(Transform "BSplineTransform")\n(NumberOfParameters 3)\n')
    with pytest.raises(InputError, match="transformix -def all"):
        read_transform(other)
    nearest = tmp_path / "nearest.txt"
    nearest.write_text(params.read_text().replace("(DeformationFieldInterpolationOrder 1)",
                                                  "(DeformationFieldInterpolationOrder 0)"))
    with pytest.raises(InputError, match="InterpolationOrder 0"):
        read_transform(nearest)


def test_field_inverse_is_refused_with_the_inverse_warp_name(small_field, tmp_path):
    field, _ = small_field
    warp = tmp_path / "subj_1Warp.nii.gz"
    write_field_image(field, warp)
    with pytest.raises(InputError, match=r"subj_1InverseWarp\.nii\.gz"):
        read_transform(f"[{warp},1]")
    with pytest.raises(InputError, match=r"subj_1InverseWarp\.nii\.gz"):
        compose_transforms([f"[{warp},1]"])


def test_bad_transforms_are_input_errors(tmp_path, small_field):
    import itk

    field, _ = small_field
    (tmp_path / "notes.txt").write_text("not a transform\n")
    (tmp_path / "junk.h5").write_bytes(b"\x89HDF garbage")
    scalar = make_image(np.zeros((4, 5, 6), np.float32))
    itk.imwrite(scalar, str(tmp_path / "scalar.nii.gz"))
    two_d = DisplacementField(ImageGrid((5, 6), (1.0, 1.0), (0.0, 0.0), ((1.0, 0.0), (0.0, 1.0))),
                              np.zeros((6, 5, 2)))
    write_transform(two_d, tmp_path / "field2d.nii.gz")
    cases = {
        tmp_path / "missing.h5": "does not exist",
        tmp_path / "notes.txt": "could not be read as an ITK/ANTs transform",
        tmp_path / "junk.h5": "could not be read as an ITK/ANTs transform",
        tmp_path / "scalar.nii.gz": "not a displacement field",
        tmp_path / "notes.py": "allowed:",
        tmp_path: "folder without TransformParameters.0.txt",
    }
    (tmp_path / "notes.py").write_text("")
    for path, message in cases.items():
        with pytest.raises(InputError, match=message):
            read_transform(path)
    with pytest.raises(InputError, match="2-D; the images here are 3-D"):
        read_transform(tmp_path / "field2d.nii.gz", dimension=3)
    for text in ("[a.mat]", "[a.mat,2]", "a.mat]", ""):
        with pytest.raises(InputError):
            TransformSpec.parse(text)
    with pytest.raises(InputError, match="no transform given"):
        compose_transforms([])


def test_sample_transform_matches_transform_point(small_field):
    import itk

    from itk_gradicon.spatial.transforms import affine_to_itk

    field, rng = small_field
    composite = itk.CompositeTransform[itk.D, 3].New()
    composite.AddTransform(affine_to_itk(random_affine(rng)))
    composite.AddTransform(field.to_transform())
    sampled = sample_transform(composite, field.grid)
    points = field.grid.world_points()
    for index in [(0, 0, 0), (5, 6, 7), (2, 3, 4)]:
        p = points[index]
        np.testing.assert_allclose(p + sampled.array[index], list(composite.TransformPoint(p)), atol=1e-4)
    exact = sample_transform(field.to_transform(), field.grid)
    np.testing.assert_array_equal(exact.array, field.array)


def test_itk_field_has_no_effect_beyond_its_grid():
    """Pinned fact: ITK's DisplacementFieldTransform (and so ANTs) returns points outside its grid
    (continuous index outside [-0.5, n - 0.5)) unchanged; it does not extend the border vectors."""
    grid = ImageGrid((4, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), ((1.0, 0, 0), (0, 1.0, 0), (0, 0, 1.0)))
    transform = DisplacementField(grid, np.broadcast_to([1.5, -0.5, 2.0], (4, 4, 4, 3)).copy()).to_transform()
    for point, moved in (([3.4, 1.0, 1.0], [1.5, -0.5, 2.0]), ([3.6, 1.0, 1.0], [0, 0, 0]),
                         ([-0.6, 1.0, 1.0], [0, 0, 0])):
        np.testing.assert_allclose(np.asarray(transform.TransformPoint(point)) - point, moved, atol=1e-12)


def test_shared_field_transforms_build_each_field_once(monkeypatch):
    """The writers of one registration's outputs, in parallel threads, share one float64 transform per field; it
    maps points as the transform each built for itself."""
    from concurrent.futures import ThreadPoolExecutor

    from itk_gradicon.io import transform_files

    rng = np.random.default_rng(21)
    grid = grid_of(make_image(np.zeros((12, 14, 10), np.float32), spacing=(1.5, 1.0, 2.0)))
    first, second = smooth_field(grid, rng), smooth_field(grid, rng)
    build, built = transform_files.field_transform, []
    monkeypatch.setattr(transform_files, "field_transform", lambda field: built.append(field) or build(field))
    shared = transform_files.SharedFieldTransforms()
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(shared, [first, first, second, first, second, second]))
    assert len(built) == 2 and {id(f) for f in built} == {id(first), id(second)}
    assert got[0] is got[1] is got[3] and got[2] is got[4] is got[5] and got[0] is not got[2]
    alone = build(first)
    for point in ([3.0, 4.5, 6.0], [10.2, 1.0, 12.5]):
        assert got[0].TransformPoint(point) == alone.TransformPoint(point)
