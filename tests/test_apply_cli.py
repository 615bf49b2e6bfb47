"""``gradicon apply-transform``, ``warp-labels``, ``jacobian`` and ``evaluate`` in-process: good calls
write their outputs; bad calls exit non-zero with one ``Error: ...`` line and leave no file."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import blob_volume, make_image, random_rotation
from itk_gradicon.cli import main
from itk_gradicon.spatial.frames import ImageGrid
from itk_gradicon.spatial.transforms import DisplacementField, write_affine_file, write_transform
from itk_gradicon.io.itk_bridge import grid_of


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def no_partial_files(folder: Path) -> bool:
    return not any(p.name.startswith(".gradicon-partial-") for p in folder.rglob("*"))


@pytest.fixture
def files(tmp_path):
    """A fixed grid (oblique, flipped), a moving int16 image and uint8 label map on another oblique grid,
    a smooth field (fixed -> moving) as .nii.gz and .h5, and an affine as ANTs' .mat."""
    import itk

    rng = np.random.default_rng(21)
    fixed = make_image(np.zeros((14, 16, 18), np.float32), spacing=(1.5, 1.2, 1.3), origin=(-10, 5, 3),
                       direction=random_rotation(rng) @ np.diag([-1.0, -1.0, 1.0]))
    grid = grid_of(fixed)
    centre = grid.world_points().reshape(-1, 3).mean(0)
    direction = random_rotation(rng)
    spacing = np.array([1.4, 1.3, 1.2])
    size = np.array([24, 26, 22])
    origin = centre - direction @ (spacing * (size - 1) / 2)
    volume = blob_volume(tuple(size[::-1]), rng, blobs=8)
    moving = make_image((volume * 1000 - 200).astype(np.int16), spacing=spacing, origin=origin, direction=direction)
    labels = make_image(np.digitize(volume, [0.2, 0.4, 0.6, 0.8]).astype(np.uint8) * 3, spacing=spacing,
                        origin=origin, direction=direction)
    points = grid.world_points()
    bump = np.exp(-((points - centre) ** 2).sum(-1) / (2 * 6.0 ** 2))[..., None]
    field = DisplacementField(grid, bump * np.array([1.5, -1.0, 0.8]))
    paths = {name: tmp_path / f"{name}.nii.gz" for name in ("fixed", "moving", "labels", "field")}
    itk.imwrite(fixed, str(paths["fixed"]))
    itk.imwrite(moving, str(paths["moving"]))
    itk.imwrite(labels, str(paths["labels"]))
    write_transform(field, paths["field"])
    paths["h5"] = tmp_path / "field.h5"
    write_transform(field, paths["h5"])
    affine = np.eye(4)
    affine[:3, 3] = [0.5, -0.3, 0.2]
    paths["affine"] = tmp_path / "s_0GenericAffine.mat"
    write_affine_file(affine, paths["affine"])
    paths["warp"] = tmp_path / "s_1Warp.nii.gz"
    write_transform(field, paths["warp"])
    paths["dir"] = tmp_path
    return paths


# ---- good calls ---------------------------------------------------------------------------------

@pytest.mark.parametrize("interpolation", ["linear", "nearest", "bspline", "label"])
def test_apply_transform_keeps_type_and_reference_grid(files, interpolation):
    import itk

    out = files["dir"] / f"warped_{interpolation}.nii.gz"
    result = run("apply-transform", "-i", files["moving"], "-r", files["fixed"], "-t", files["warp"],
                 "-t", files["affine"], "-o", out, "--interpolation", interpolation)
    assert result.exit_code == 0, result.output
    warped = itk.imread(str(out))
    assert itk.array_from_image(warped).dtype == np.int16
    assert grid_of(warped).matches(grid_of(itk.imread(str(files["fixed"]))), tolerance=1e-6)
    assert itk.array_from_image(warped).max() > 300  # it sampled the blobs
    if interpolation in ("nearest", "label"):
        moving_values = set(np.unique(itk.array_from_image(itk.imread(str(files["moving"])))).tolist())
        assert set(np.unique(itk.array_from_image(warped)).tolist()) <= moving_values | {0}


def test_apply_transform_default_value(files):
    import itk

    out = files["dir"] / "far.nii.gz"
    far = files["dir"] / "far.tfm"
    shift = np.eye(4)
    shift[:3, 3] = [500.0, 0.0, 0.0]  # every sample point leaves the moving image
    write_affine_file(shift, far)
    result = run("apply-transform", "-i", files["moving"], "-r", files["fixed"], "-t", far, "-o", out,
                 "--default-value", "-7")
    assert result.exit_code == 0, result.output
    assert set(np.unique(itk.array_from_image(itk.imread(str(out)))).tolist()) == {-7}


def test_warp_labels_preserves_type_and_labels_and_matches_ants(files):
    import ants
    import itk

    out = files["dir"] / "labels_on_fixed.nii.gz"
    result = run("warp-labels", "-i", files["labels"], "-r", files["fixed"], "-t", files["h5"], "-o", out)
    assert result.exit_code == 0, result.output
    assert "labels: 5 in the input" in result.stderr
    warped = itk.array_from_image(itk.imread(str(out)))
    assert warped.dtype == np.uint8
    assert set(np.unique(warped).tolist()) <= {0, 3, 6, 9, 12}
    theirs = ants.apply_transforms(ants.image_read(str(files["fixed"])), ants.image_read(str(files["labels"])),
                                   [str(files["field"])], interpolator="genericLabel").numpy().T
    assert (warped == theirs).mean() > 0.999


def test_warp_labels_keeps_float_label_maps_as_float(files):
    import itk

    array = itk.array_from_image(itk.imread(str(files["labels"]))).astype(np.float32)
    float_labels = files["dir"] / "float_labels.nii.gz"
    image = itk.image_from_array(array)
    image.CopyInformation(itk.imread(str(files["labels"])))
    itk.imwrite(image, str(float_labels))
    out = files["dir"] / "float_out.nrrd"
    result = run("warp-labels", "-i", float_labels, "-r", files["fixed"], "-t", files["field"], "-o", out)
    assert result.exit_code == 0, result.output
    warped = itk.array_from_image(itk.imread(str(out)))
    assert warped.dtype == np.float32 and set(np.unique(warped).tolist()) <= {0.0, 3.0, 6.0, 9.0, 12.0}


def test_jacobian_command_writes_image_and_summary(files):
    import itk

    out, summary = files["dir"] / "jac.nii.gz", files["dir"] / "jac.json"
    result = run("jacobian", "-t", files["field"], "-r", files["fixed"], "-o", out, "--summary-json", summary)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == json.loads(summary.read_text())
    assert printed["voxels"] == 14 * 16 * 18 and printed["percent_negative"] == 0.0
    assert printed["min"] < 1.0 < printed["max"]
    det = itk.array_from_image(itk.imread(str(out)))
    assert det.min() == pytest.approx(printed["min"], abs=1e-5)
    log_out = files["dir"] / "logjac.nii.gz"
    assert run("jacobian", "-t", files["field"], "-o", log_out, "--log").exit_code == 0  # grid of the field
    np.testing.assert_allclose(itk.array_from_image(itk.imread(str(log_out))), np.log(det), atol=1e-5)


def test_evaluate_labels_landmarks_and_folding(files):
    import itk

    from itk_gradicon.spatial.transforms import read_transform

    fixed_labels = files["dir"] / "fixed_labels.nii.gz"
    assert run("warp-labels", "-i", files["labels"], "-r", files["fixed"], "-t", files["field"],
               "-o", fixed_labels).exit_code == 0
    transform = read_transform(files["field"])
    grid = grid_of(itk.imread(str(files["fixed"])))
    fixed_points = grid.world_points()[5:9:2, 6:10:2, 7:11:2].reshape(-1, 3)
    moving_points = np.array([list(transform.TransformPoint(p)) for p in fixed_points])
    moving_points[0] += [0.0, 3.0, 4.0]  # one landmark 5 mm off
    (files["dir"] / "fixed.csv").write_text("x,y,z\n" + "\n".join(",".join(map(str, p)) for p in fixed_points))
    (files["dir"] / "moving.txt").write_text(f"point\n{len(moving_points)}\n"
                                             + "\n".join(" ".join(map(str, p)) for p in moving_points))
    report_file = files["dir"] / "eval.json"
    result = run("evaluate", "-t", files["field"], "--fixed-labels", fixed_labels, "--moving-labels", files["labels"],
                 "--fixed-landmarks", files["dir"] / "fixed.csv", "--moving-landmarks", files["dir"] / "moving.txt",
                 "--output-json", report_file)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report == json.loads(report_file.read_text())
    assert report["labels"]["labels"] == [3, 6, 9, 12]
    assert report["labels"]["mean_dice"] == 1.0 and report["labels"]["mean_hd95_mm"] == 0.0
    tre = report["landmarks"]
    assert tre["count"] == 8 and tre["tre_mm"]["max"] == pytest.approx(5.0, abs=1e-6)
    assert tre["tre_mm"]["median"] == pytest.approx(0.0, abs=1e-6)
    assert report["jacobian"]["percent_negative"] == 0.0
    only = run("evaluate", "--fixed-labels", fixed_labels, "--moving-labels", fixed_labels, "--label", "6",
               "--no-hd95")
    assert only.exit_code == 0 and json.loads(only.stdout)["labels"]["dice"] == {"6": 1.0}


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.float32, np.float64])
@pytest.mark.parametrize("interpolation", ["linear", "nearest", "bspline", "label"])
def test_resample_image_keeps_every_pixel_type(dtype, interpolation):
    """Output pixel type = input pixel type; integers are the float result rounded and clamped to the
    type's range (a B-spline undershoot below 0 gives 0 in uint8, never a wrapped 255)."""
    import itk

    from itk_gradicon.spatial.resample import resample_image
    from itk_gradicon.spatial.transforms import affine_to_itk

    rng = np.random.default_rng(1)
    top = 250 if dtype == np.uint8 else 3000
    array = np.rint(blob_volume((9, 10, 11), rng) * top).astype(dtype)
    array[4:, 5:, :] = 0  # a sharp edge: cubic B-splines overshoot on both sides of it
    array[:4, :5, :] = top
    image = make_image(array, spacing=(1.0, 1.1, 0.9))
    shift = np.eye(4)
    shift[:3, 3] = [0.4, -0.3, 0.2]
    transform = affine_to_itk(shift)
    out = itk.array_from_image(resample_image(image, image, transform, interpolation=interpolation,
                                              default_value=5))
    assert out.dtype == np.dtype(dtype)
    if interpolation in ("nearest", "label"):
        assert set(np.unique(out).tolist()) <= set(np.unique(array).tolist()) | {5}
    elif np.issubdtype(dtype, np.integer):
        # the same computation in the type resample_image interpolates in (float32 up to 16-bit integers)
        working = np.float32 if np.dtype(dtype).itemsize <= 2 and interpolation == "linear" else np.float64
        as_float = make_image(array.astype(working), spacing=(1.0, 1.1, 0.9))
        exact = itk.array_from_image(resample_image(as_float, image, transform, interpolation=interpolation,
                                                    default_value=5))
        info = np.iinfo(dtype)
        np.testing.assert_array_equal(out, np.clip(np.rint(exact), info.min, info.max).astype(dtype))
        if interpolation == "bspline":
            assert exact.min() < -0.5 and exact.max() > top + 0.5  # the overshoot was there to clamp


# ---- bad calls ----------------------------------------------------------------------------------

def _bad_apply_calls(files):
    d = files["dir"]
    (d / "notes.txt").write_text("hello\n")
    (d / "image.txt").write_text("not an image\n")
    base = ["-r", files["fixed"], "-o", d / "out.nii.gz"]
    return {
        "missing input": (["apply-transform", "-i", d / "missing.nii.gz", "-t", files["field"], *base],
                          ["--input", "does not exist"]),
        "input not an image": (["apply-transform", "-i", d / "image.txt", "-t", files["field"], *base],
                               ["--input", "image.txt", "not an image"]),
        "missing reference": (["apply-transform", "-i", files["moving"], "-t", files["field"], "-r", d / "nope.nii.gz",
                               "-o", d / "out.nii.gz"], ["--reference", "does not exist"]),
        "unknown interpolation": (["apply-transform", "-i", files["moving"], "-t", files["field"], *base,
                                   "--interpolation", "cubic"], ["cubic", "linear"]),
        "not a transform": (["apply-transform", "-i", files["moving"], "-t", d / "notes.txt", *base],
                            ["notes.txt", "not a transform"]),
        "image as transform": (["apply-transform", "-i", files["moving"], "-t", files["fixed"], *base],
                               ["not a displacement field"]),
        "missing transform": (["apply-transform", "-i", files["moving"], "-t", d / "gone.h5", *base],
                              ["gone.h5", "does not exist"]),
        "inverse of a warp": (["apply-transform", "-i", files["moving"], "-t", f"[{files['warp']},1]", *base],
                              ["s_1InverseWarp.nii.gz"]),
        "output folder missing": (["apply-transform", "-i", files["moving"], "-t", files["field"], "-r", files["fixed"],
                                   "-o", d / "no" / "out.nii.gz"], ["--output", "does not exist"]),
        "output ending": (["apply-transform", "-i", files["moving"], "-t", files["field"], "-r", files["fixed"],
                           "-o", d / "out.png.txt"], ["--output", "allowed"]),
        "default value out of range": (["apply-transform", "-i", files["labels"], "-t", files["field"], *base,
                                        "--default-value", "-1"], ["-1", "uint8"]),
        "labels from intensities": (["warp-labels", "-i", files["field"], "-t", files["field"], *base],
                                    ["components per voxel"]),
    }


@pytest.mark.parametrize("case", ["missing input", "input not an image", "missing reference", "unknown interpolation",
                                  "not a transform", "image as transform", "missing transform", "inverse of a warp",
                                  "output folder missing", "output ending", "default value out of range",
                                  "labels from intensities"])
def test_bad_apply_calls_fail_cleanly(files, case):
    args, fragments = _bad_apply_calls(files)[case]
    result = run(*args)
    assert_one_line_error(result, *fragments)
    assert not (files["dir"] / "out.nii.gz").exists()
    assert no_partial_files(files["dir"])


def test_non_integer_label_map_is_refused(files):
    import itk

    values = make_image(np.full((4, 4, 4), 0.5, np.float32))
    itk.imwrite(values, str(files["dir"] / "probabilities.nii.gz"))
    result = run("warp-labels", "-i", files["dir"] / "probabilities.nii.gz", "-r", files["fixed"],
                 "-t", files["field"], "-o", files["dir"] / "out.nii.gz")
    assert_one_line_error(result, "not a label map", "0.5")
    assert not (files["dir"] / "out.nii.gz").exists()


def test_bad_jacobian_and_evaluate_calls(files):
    d = files["dir"]
    calls = [
        (["jacobian", "-t", files["affine"]], ["--reference"]),
        (["jacobian", "-t", files["field"], "-o", d / "missing" / "j.nii.gz"], ["--output", "does not exist"]),
        (["jacobian", "-t", files["field"], "--summary-json", d / "s.txt"], ["--summary-json", ".json"]),
        (["evaluate"], ["nothing to evaluate"]),
        (["evaluate", "--fixed-labels", files["labels"]], ["must be given together"]),
        (["evaluate", "--fixed-landmarks", d / "a.csv"], ["must be given together"]),
        (["evaluate", "--fixed-labels", files["labels"], "--moving-labels", files["fixed"]], ["not on one grid"]),
        (["evaluate", "--fixed-landmarks", d / "a.csv", "--moving-landmarks", d / "b.csv"], ["does not exist"]),
    ]
    for args, fragments in calls:
        assert_one_line_error(run(*args), *fragments)
    assert not (d / "s.txt").exists() and no_partial_files(d)


def test_help_states_the_transform_order():
    text = " ".join(run("apply-transform", "--help").output.split())  # undo click's line wrapping
    for fragment in ("T2(T1(x))", "[FILE,1]", "PREFIX1Warp.nii.gz -t PREFIX0GenericAffine.mat", "fixed"):
        assert fragment in text, fragment


# ---- real data ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_warp_aal_labels_on_mni(shared_data, tmp_path):
    """AAL (116 labels, 182x218x182) through a smooth field: the label set and type survive, ANTs'
    GenericLabel agrees, and it takes seconds."""
    import ants
    import itk

    folder = shared_data / "antspy_legacy_data"
    mni = itk.imread(str(folder / "mni.nii.gz"))
    grid = grid_of(mni)
    coarse = ImageGrid(size=(24, 28, 24), spacing=tuple(s * 8 for s in grid.spacing), origin=grid.origin,
                       direction=grid.direction)  # a field on a coarse grid covering the image
    points = coarse.world_points()
    centre = grid.world_points()[::10, ::10, ::10].reshape(-1, 3).mean(0)
    bump = np.exp(-((points - centre) ** 2).sum(-1) / (2 * 30.0 ** 2))[..., None]
    write_transform(DisplacementField(coarse, bump * np.array([3.0, -2.0, 2.5])), tmp_path / "warp.nii.gz")
    out = tmp_path / "aal_warped.nii.gz"
    start = time.perf_counter()
    result = run("warp-labels", "-i", folder / "mnia.nii.gz", "-r", folder / "mni.nii.gz",
                 "-t", tmp_path / "warp.nii.gz", "-o", out)
    seconds = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    source = itk.array_from_image(itk.imread(str(folder / "mnia.nii.gz")))
    warped = itk.array_from_image(itk.imread(str(out)))
    assert warped.dtype == source.dtype
    assert set(np.unique(warped).tolist()) == set(np.unique(source).tolist())
    theirs = ants.apply_transforms(ants.image_read(str(folder / "mni.nii.gz")),
                                   ants.image_read(str(folder / "mnia.nii.gz")),
                                   [str(tmp_path / "warp.nii.gz")], interpolator="genericLabel").numpy().T
    assert (warped == theirs).mean() > 0.999
    assert seconds < 60, seconds


@pytest.mark.slow
def test_lung_ct_keeps_int16_with_bspline(shared_data, tmp_path):
    import itk

    ct = shared_data / "elastix_lung_ct_partial" / "3DCT_lung_baseline_small.mha"
    shift = np.eye(4)
    shift[:3, 3] = [2.0, -1.0, 3.0]
    write_affine_file(shift, tmp_path / "shift.mat")
    out = tmp_path / "ct_shifted.nii.gz"
    result = run("apply-transform", "-i", ct, "-r", ct, "-t", tmp_path / "shift.mat", "-o", out,
                 "--interpolation", "bspline", "--default-value", "-1024")
    assert result.exit_code == 0, result.output
    source = itk.array_from_image(itk.imread(str(ct)))
    warped = itk.array_from_image(itk.imread(str(out)))
    assert warped.dtype == source.dtype == np.int16
    assert warped.min() >= -1024 - 200 and warped.shape == source.shape


def _surface_points(mask: np.ndarray, spacing_array_order) -> np.ndarray:
    """World positions (mm, ARRAY axes) of the voxels of ``mask`` with a 6-neighbour outside it."""
    padded = np.pad(mask, 1)
    interior = mask.copy()
    for axis in range(mask.ndim):
        for step in (-1, 1):
            interior &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
    return np.argwhere(mask & ~interior) * np.asarray(spacing_array_order, dtype=float)


def test_evaluate_matches_overlaps_computed_by_hand(tmp_path):
    """Two boxes on one grid: Dice by counting (0.75 for a 2-voxel shift of an 8-voxel box), HD95 by brute
    force over surface voxels, and Dice 1 once an ANTs affine undoes the shift: none of it from our code."""
    import itk

    from itk_gradicon.spatial.transforms import write_affine_file

    spacing = (1.5, 1.0, 2.0)  # ITK order: x (array axis 2), y, z
    fixed = np.zeros((20, 20, 20), np.uint8)
    fixed[6:14, 5:13, 4:12] = 1
    fixed[15:18, 15:18, 15:18] = 2
    moving = np.zeros_like(fixed)
    moving[6:14, 5:13, 6:14] = 1  # label 1 two voxels (3 mm) further along x
    moving[15:18, 15:18, 15:18] = 2
    for name, array in (("fixed", fixed), ("moving", moving)):
        image = itk.image_from_array(array)
        image.SetSpacing(spacing)
        itk.imwrite(image, str(tmp_path / f"{name}.nii.gz"))
    result = run("evaluate", "--fixed-labels", tmp_path / "fixed.nii.gz", "--moving-labels", tmp_path / "moving.nii.gz")
    assert result.exit_code == 0, result.output
    labels = json.loads(result.stdout)["labels"]
    assert labels["dice"] == {"1": 2 * 8 * 8 * 6 / (512 + 512), "2": 1.0}
    a = _surface_points(fixed == 1, spacing[::-1])
    b = _surface_points(moving == 1, spacing[::-1])
    distances = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    expected = max(np.percentile(distances.min(1), 95), np.percentile(distances.min(0), 95))
    assert labels["hd95_mm"]["1"] == pytest.approx(expected, abs=1e-5)
    assert labels["hd95_mm"]["2"] == 0.0
    shift = np.eye(4)
    shift[0, 3] = 3.0  # fixed point x -> moving point x + 3 mm
    write_affine_file(shift, tmp_path / "shift_0GenericAffine.mat")
    undone = run("evaluate", "-t", tmp_path / "shift_0GenericAffine.mat", "--fixed-labels", tmp_path / "fixed.nii.gz",
                 "--moving-labels", tmp_path / "moving.nii.gz", "--reference", tmp_path / "fixed.nii.gz")
    assert undone.exit_code == 0, undone.output
    report = json.loads(undone.stdout)
    assert report["labels"]["dice"]["1"] == 1.0 and report["labels"]["hd95_mm"]["1"] == 0.0
    assert report["jacobian"]["min"] == pytest.approx(1.0) and report["jacobian"]["max"] == pytest.approx(1.0)


@pytest.mark.parametrize("suffix,tolerance", [(".h5", 1e-9), (".nii.gz", 1e-4)])
def test_compose_transforms_writes_one_field_equal_to_the_chain(files, suffix, tolerance):
    """antsRegistration's warp and affine composed into one field on the fixed (oblique, flipped) grid: at every
    voxel centre p the field is affine(warp(p)) - p as ITK Python computes it from the two files (float64 in
    .h5; float32 in a field image); resampling with the one file gives the chain's image."""
    import itk

    composed = files["dir"] / f"composed{suffix}"
    result = run("compose-transforms", "-t", files["warp"], "-t", files["affine"], "-r", files["fixed"],
                 "-o", composed)
    assert result.exit_code == 0, result.output
    assert "largest displacement" in result.output
    import SimpleITK as sitk

    warp = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(files["warp"])), sitk.sitkVectorFloat64))
    affine = sitk.ReadTransform(str(files["affine"]))
    grid = grid_of(itk.imread(str(files["fixed"])))
    points = grid.world_points().reshape(-1, 3)
    expected = np.array([affine.TransformPoint(warp.TransformPoint([float(v) for v in p])) for p in points]) - points
    if suffix == ".h5":
        field = sitk.DisplacementFieldTransform(sitk.ReadTransform(str(composed))).GetDisplacementField()
    else:
        field = sitk.ReadImage(str(composed))
    written = sitk.GetArrayFromImage(field)
    np.testing.assert_allclose(written.reshape(-1, 3), expected, atol=tolerance)
    one, chain = files["dir"] / "one.nii.gz", files["dir"] / "chain.nii.gz"
    assert run("apply-transform", "-i", files["moving"], "-r", files["fixed"], "-t", composed, "-o", one).exit_code == 0
    assert run("apply-transform", "-i", files["moving"], "-r", files["fixed"], "-t", files["warp"], "-t",
               files["affine"], "-o", chain).exit_code == 0
    difference = np.abs(itk.array_from_image(itk.imread(str(one))).astype(float)
                        - itk.array_from_image(itk.imread(str(chain))).astype(float))
    assert difference.max() <= 1  # int16 output: at most a rounding step apart


def test_compose_transforms_refuses_bad_calls(files):
    """An output ending that holds no transform, a missing transform file: one-line errors, nothing written."""
    png = run("compose-transforms", "-t", files["affine"], "-r", files["fixed"], "-o", files["dir"] / "c.png")
    assert_one_line_error(png, "--output", "c.png")
    missing = run("compose-transforms", "-t", files["dir"] / "nope.mat", "-r", files["fixed"], "-o",
                  files["dir"] / "c.h5")
    assert_one_line_error(missing, "nope.mat")
    for command in ("compose-transforms", "invert-transform"):
        wrong = run(command, "-t", files["affine"], "-r", files["dir"] / "nope.nii.gz", "-o", files["dir"] / "c.h5")
        assert_one_line_error(wrong, "--reference", "nope.nii.gz")
    inverted_png = run("invert-transform", "-t", files["affine"], "-r", files["moving"], "-o", files["dir"] / "i.png")
    assert_one_line_error(inverted_png, "--output", "i.png")
    assert not (files["dir"] / "c.h5").exists() and no_partial_files(files["dir"])


def test_invert_transform_inverts_a_stretching_field_after_a_large_affine(files, rng):
    """A field that stretches a region by up to 2.4x (where a plain fixed-point iteration diverges), followed by
    an affine turning 40 degrees, scaling 1.2 and shifting 20 mm: on the moving grid, ITK evaluating the two
    files at the inverse's points gives back the grid's points to 1e-3 mm wherever they come from the field's
    grid; a field image output holds the same to float32's precision."""
    import SimpleITK as sitk

    fixed = sitk.ReadImage(str(files["fixed"]))
    grid = grid_of(fixed)
    points = grid.world_points()
    centre = points.reshape(-1, 3).mean(0)
    offset = points - centre
    bump = np.exp(-(offset ** 2).sum(-1) / (2 * 4.0 ** 2))[..., None]
    field = DisplacementField(grid, 1.4 * bump * offset)  # d/dx (1.4 x e^(-x^2/32)) reaches 1.4: a 2.4x stretch
    write_transform(field, files["dir"] / "stretch.nii.gz")
    affine = np.eye(4)
    axis = np.array([0.3, 1.0, 0.2]) / np.linalg.norm([0.3, 1.0, 0.2])
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.deg2rad(40.0)
    affine[:3, :3] = 1.2 * (np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k)
    affine[:3, 3] = centre - affine[:3, :3] @ centre + np.array([20.0, -5.0, 3.0])
    write_affine_file(affine, files["dir"] / "big_0GenericAffine.mat")
    chain = [files["dir"] / "stretch.nii.gz", files["dir"] / "big_0GenericAffine.mat"]
    # the moving grid: where the chain sends the fixed grid
    moving = sitk.Image([16, 16, 16], sitk.sitkUInt8)
    moving.SetSpacing([1.2, 1.2, 1.2])
    moving.SetOrigin((affine[:3, :3] @ centre + affine[:3, 3] - 9.0).tolist())
    sitk.WriteImage(moving, str(files["dir"] / "moving_grid.nii.gz"))
    forward = sitk.CompositeTransform(3)
    forward.AddTransform(sitk.ReadTransform(str(chain[1])))
    forward.AddTransform(sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(chain[0])),
                                                                   sitk.sitkVectorFloat64)))
    for suffix, tolerance in ((".h5", 1e-3), (".nii.gz", 2e-3)):
        out = files["dir"] / f"inverse{suffix}"
        result = run("invert-transform", "-t", chain[0], "-t", chain[1], "-r", files["dir"] / "moving_grid.nii.gz",
                     "-o", out)
        assert result.exit_code == 0, result.output
        assert "check |T(T^-1(y)) - y| by ITK" in result.output and "stayed more than" not in result.output
        inverse = (sitk.DisplacementFieldTransform(sitk.ReadTransform(str(out))).GetDisplacementField()
                   if suffix == ".h5" else sitk.ReadImage(str(out)))
        v = sitk.GetArrayFromImage(inverse).reshape(-1, 3)
        ys = grid_of(moving).world_points().reshape(-1, 3)
        to_index = grid.world_to_index()
        errors = []
        for y, x in zip(ys, ys + v):
            index = to_index[:3, :3] @ x + to_index[:3, 3]
            if np.all(index >= 0) and np.all(index <= np.asarray(grid.size) - 1):
                errors.append(np.linalg.norm(np.asarray(forward.TransformPoint(x.tolist())) - y))
        assert len(errors) > 1000 and max(errors) < tolerance, (len(errors), max(errors))


def test_invert_transform_says_where_a_folding_field_has_no_inverse(files):
    """A field that folds (its derivative reaches -2.4 at the centre): the inverse is still written, and the
    output says what share of points could not be solved and why."""
    import SimpleITK as sitk

    grid = grid_of(sitk.ReadImage(str(files["fixed"])))
    points = grid.world_points()
    offset = points - points.reshape(-1, 3).mean(0)
    bump = np.exp(-(offset ** 2).sum(-1) / (2 * 4.0 ** 2))[..., None]
    write_transform(DisplacementField(grid, -2.4 * bump * offset), files["dir"] / "fold.nii.gz")
    out = files["dir"] / "fold_inverse.nii.gz"
    result = run("invert-transform", "-t", files["dir"] / "fold.nii.gz", "-r", files["fixed"], "-o", out)
    assert result.exit_code == 0, result.output
    assert "stayed more than 0.01 mm off" in result.output and "folds there" in result.output
    assert out.exists()


def test_invert_transform_of_an_affine_is_its_inverse(files):
    """A linear chain inverts exactly: the field equals [affine,1] applied to the grid's points."""
    import SimpleITK as sitk

    out = files["dir"] / "inverse_affine.h5"
    result = run("invert-transform", "-t", files["affine"], "-r", files["moving"], "-o", out)
    assert result.exit_code == 0, result.output
    v = sitk.GetArrayFromImage(sitk.DisplacementFieldTransform(sitk.ReadTransform(str(out))).GetDisplacementField())
    ys = grid_of(sitk.ReadImage(str(files["moving"]))).world_points()
    inverse = sitk.ReadTransform(str(files["affine"])).GetInverse()
    expected = np.array([inverse.TransformPoint(y.tolist()) for y in ys.reshape(-1, 3)]).reshape(ys.shape) - ys
    np.testing.assert_allclose(v, expected, atol=1e-9)


@pytest.mark.parametrize("interpolation", ["linear", "label"])
def test_a_series_of_volumes_is_resampled_volume_by_volume(files, interpolation):
    """A 4-D input with a 3-D reference (antsApplyTransforms -e 3): a 4-D output on the reference's grid whose
    every volume is, to the bit, what the 3-D input of that volume gives; the fourth axis's size, spacing and
    origin kept; the pixel type kept."""
    import SimpleITK as sitk

    moving = sitk.ReadImage(str(files["labels" if interpolation == "label" else "moving"]))
    volumes = [moving, moving * 2, moving + 3] if interpolation == "label" else [moving, moving * 2, moving - 5]
    series = sitk.JoinSeries(volumes, 7.0, 2.5)
    series_path = files["dir"] / "series.mha"
    sitk.WriteImage(series, str(series_path))
    command = "warp-labels" if interpolation == "label" else "apply-transform"
    result = run(command, "-i", series_path, "-r", files["fixed"], "-t", files["warp"], "-t", files["affine"],
                 "-o", files["dir"] / "series_on_fixed.mha")
    assert result.exit_code == 0, result.output
    out = sitk.ReadImage(str(files["dir"] / "series_on_fixed.mha"))
    reference = sitk.ReadImage(str(files["fixed"]))
    assert out.GetSize() == reference.GetSize() + (3,)
    assert out.GetSpacing()[3] == 2.5 and out.GetOrigin()[3] == 7.0
    assert np.allclose(out.GetSpacing()[:3], reference.GetSpacing()) and np.allclose(out.GetOrigin()[:3],
                                                                                      reference.GetOrigin())
    direction = np.asarray(out.GetDirection()).reshape(4, 4)
    assert np.allclose(direction[:3, :3], np.asarray(reference.GetDirection()).reshape(3, 3))
    assert out.GetPixelID() == moving.GetPixelID()
    for index, volume in enumerate(volumes):
        sitk.WriteImage(volume, str(files["dir"] / f"volume{index}.mha"))
        single = run(command, "-i", files["dir"] / f"volume{index}.mha", "-r", files["fixed"], "-t", files["warp"],
                     "-t", files["affine"], "-o", files["dir"] / f"volume{index}_on_fixed.mha")
        assert single.exit_code == 0, single.output
        expected = sitk.GetArrayFromImage(sitk.ReadImage(str(files["dir"] / f"volume{index}_on_fixed.mha")))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(out)[index], expected)


def test_series_that_cannot_be_resampled_are_refused(files):
    """A 3-D input with a 4-D reference, and a 4-D input whose fourth axis is mixed with space: one-line
    errors, nothing written."""
    import SimpleITK as sitk

    moving = sitk.ReadImage(str(files["moving"]))
    series = sitk.JoinSeries([moving, moving])
    sitk.WriteImage(series, str(files["dir"] / "series.mha"))
    flipped = sitk.Image(series)
    mixed = np.eye(4)
    mixed[[2, 3]] = mixed[[3, 2]]  # the fourth index axis along z, the third along "time"
    flipped.SetDirection(mixed.ravel().tolist())
    sitk.WriteImage(flipped, str(files["dir"] / "mixed.mha"))
    out = files["dir"] / "out.nii.gz"
    wrong_way = run("apply-transform", "-i", files["moving"], "-r", files["dir"] / "series.mha", "-t",
                    files["affine"], "-o", out)
    assert_one_line_error(wrong_way, "is 3-D", "is 4-D", "a 4-D series of volumes with a 3-D reference")
    mixing = run("apply-transform", "-i", files["dir"] / "mixed.mha", "-r", files["fixed"], "-t", files["affine"],
                 "-o", out)
    assert_one_line_error(mixing, "mixes its fourth axis with space")
    assert not out.exists() and no_partial_files(files["dir"])


def test_evaluate_label_interpolation_nearest_or_generic_label(tmp_path):
    """A one-voxel line moved by 0.4 voxel along x and y: nearest neighbour keeps every voxel (Dice 1), while
    GenericLabel weighs the line's corner at 0.6 * 0.6 = 0.36 against 0.64 of background and loses it (Dice 0).
    The report names the interpolation; an unknown one is refused."""
    import itk

    line = np.zeros((12, 20, 20), np.uint8)
    line[:, 10, 10] = 1  # along z, at x = y = 10
    itk.imwrite(itk.image_from_array(line), str(tmp_path / "line.nii.gz"))
    shift = np.eye(4)
    shift[:2, 3] = 0.4  # fixed point -> moving point + 0.4 voxel (1 mm spacing) along x and y
    write_affine_file(shift, tmp_path / "shift_0GenericAffine.mat")
    common = ("evaluate", "-t", tmp_path / "shift_0GenericAffine.mat", "--fixed-labels", tmp_path / "line.nii.gz",
              "--moving-labels", tmp_path / "line.nii.gz", "--no-hd95")
    default, nearest = run(*common), run(*common, "--label-interpolation", "nearest")
    assert default.exit_code == 0 and nearest.exit_code == 0, default.output + nearest.output
    by_default, by_nearest = json.loads(default.stdout)["labels"], json.loads(nearest.stdout)["labels"]
    assert by_default["interpolation"] == "label" and by_default["dice"] == {"1": 0.0}
    assert by_nearest["interpolation"] == "nearest" and by_nearest["dice"] == {"1": 1.0}
    refused = run(*common, "--label-interpolation", "cubic")
    assert refused.exit_code == 2 and "'cubic' is not one of 'label', 'nearest'" in refused.output


def test_a_field_that_misses_the_reference_is_said(files):
    """A displacement field is zero outside its domain (ITK, ANTs): a transform given with a reference it
    does not cover moves nothing there, silently in antsApplyTransforms. The file commands say so, and
    still write (it may be meant); a transform that covers its reference says nothing."""
    import itk

    fixed = itk.imread(str(files["fixed"]))
    far = itk.image_duplicator(fixed)
    far.SetOrigin([float(v) + 500.0 for v in fixed.GetOrigin()])  # the same grid, 50 cm away
    itk.imwrite(far, str(files["dir"] / "far.nii.gz"))
    chain = ("-t", files["warp"], "-t", files["affine"])
    for reference, expected in ((files["fixed"], None), (files["dir"] / "far.nii.gz", "covers 0 %")):
        out = files["dir"] / f"out_{reference.name}"
        result = run("apply-transform", "-i", files["moving"], "-r", reference, *chain, "-o", out)
        assert result.exit_code == 0 and out.exists(), result.output
        warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
        if expected is None:
            assert warnings == [], result.stderr
        else:
            assert len(warnings) == 1 and expected in warnings[0] and "a displacement field among" in warnings[0]
            assert "origin (" in warnings[0] and "a forward transform covers its fixed image's grid" in warnings[0]
    result = run("jacobian", "-t", files["h5"], "-r", files["dir"] / "far.nii.gz")
    assert result.exit_code == 0, result.output
    assert "the displacement field of" in json.loads(result.stdout)["warnings"][0]
    assert "warnings" not in json.loads(run("jacobian", "-t", files["h5"], "-r", files["fixed"]).stdout)


def test_field_coverage_follows_the_parts_applied_before_the_field(files):
    import SimpleITK as sitk

    from itk_gradicon.io.transform_files import compose_transforms, field_coverage, read_transform

    grid = grid_of(sitk.ReadImage(str(files["fixed"])))
    ((share, field_grid),) = field_coverage(read_transform(str(files["h5"])), grid)
    assert share == 1.0 and field_grid.matches(grid, tolerance=1e-5)
    extent = np.asarray(grid.size) * np.asarray(grid.spacing)
    half = sitk.TranslationTransform(3, [float(v) for v in grid.direction_matrix @ (extent * [0.5, 0, 0])])
    sitk.WriteTransform(half, str(files["dir"] / "half.tfm"))
    # '-t shift -t field': x goes to field(shift(x)): the shift carries half of the points out of the domain
    ((share, _),) = field_coverage(compose_transforms([files["dir"] / "half.tfm", files["h5"]]), grid)
    assert 0.35 < share < 0.65
    ((share, _),) = field_coverage(compose_transforms([files["h5"], files["dir"] / "half.tfm"]), grid)
    assert share == 1.0  # the field first, on its own grid
