"""The file functions (SimpleITK) give what the ITK Python functions give, to the bit: every interpolation,
pixel type and transform kind of ``apply-transform``, ``warp-labels``, ``jacobian`` and ``evaluate``.

The ITK Python side (:mod:`itk_gradicon.spatial.resample`, :mod:`itk_gradicon.spatial.jacobian`,
:mod:`itk_gradicon.evaluation.metrics` on ``itk.Image``) is what these commands ran before they moved to
SimpleITK; equality here is the promise that the move changed no output.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from itk_gradicon.commands import files
from itk_gradicon.errors import InputError
from itk_gradicon.spatial.jacobian import jacobian_determinant, jacobian_summary
from itk_gradicon.evaluation.metrics import label_overlap
from itk_gradicon.spatial.resample import resample_image, resample_labels
from itk_gradicon.spatial.transforms import compose_transforms, write_elastix
from test_apply_cli import files as files_fixture  # noqa: F401  (the same fixture as the CLI tests)
from itk_gradicon.io.itk_bridge import grid_of, to_simpleitk

files_ = files_fixture


def _itk_array(image):
    import itk

    return np.array(itk.array_view_from_image(image))  # a copy: the image may be a temporary


def _sitk_array(image):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(image)


def _transform_lists(paths):
    return {
        "h5": [paths["h5"]],
        "warp": [paths["warp"]],
        "ants pair": [paths["warp"], paths["affine"]],
        "inverse affine": [f"[{paths['affine']},1]"],
        "affine then field": [paths["affine"], paths["field"]],
    }


def _itk_inputs(paths, pixel):
    import itk

    moving = itk.imread(str(paths["moving"]))
    array = np.asarray(itk.array_view_from_image(moving)).astype(pixel)
    image = itk.image_from_array(np.ascontiguousarray(array))
    image.CopyInformation(moving)
    return image, itk.imread(str(paths["fixed"]))


def _sitk_inputs(paths, pixel):
    import SimpleITK as sitk

    moving = sitk.ReadImage(str(paths["moving"]))
    image = sitk.GetImageFromArray(np.ascontiguousarray(sitk.GetArrayViewFromImage(moving).astype(pixel)))
    image.CopyInformation(moving)
    return image, sitk.ReadImage(str(paths["fixed"]))


@pytest.mark.parametrize("kind", ["h5", "warp", "ants pair", "inverse affine", "affine then field"])
@pytest.mark.parametrize("interpolation,pixel", [
    ("linear", np.float32), ("linear", np.int16), ("linear", np.float64), ("linear", np.int32),
    ("nearest", np.int16), ("nearest", np.int32), ("bspline", np.float32), ("bspline", np.uint8)])
def test_resample_equals_itk_python(files_, kind, interpolation, pixel):
    specs = _transform_lists(files_)[kind]
    image_itk, reference_itk = _itk_inputs(files_, pixel)
    image_sitk, reference_sitk = _sitk_inputs(files_, pixel)
    expected = _itk_array(resample_image(image_itk, reference_itk, compose_transforms(specs),
                                         interpolation=interpolation, default_value=7))
    got = _sitk_array(files.resample_image(image_sitk, reference_sitk, files.compose_transforms(specs),
                                           interpolation=interpolation, default_value=7))
    assert got.dtype == expected.dtype == np.dtype(pixel)
    assert np.array_equal(got, expected), np.abs(got.astype(float) - expected).max()
    assert np.any(got != 7)  # the transforms keep most of the image inside


@pytest.mark.parametrize("kind", ["h5", "ants pair", "inverse affine"])
@pytest.mark.parametrize("interpolation,pixel",
                         [("linear", np.float32), ("nearest", np.int16), ("bspline", np.float64)])
def test_resample_equals_itk_resample_image_filter(files_, kind, interpolation, pixel):
    """The one resampler (SimpleITK inside, ITK Python objects converted at the edge) against ITK Python's
    own ``resample_image_filter`` with its interpolator classes, on ITK Python objects throughout."""
    import itk

    image, reference = _itk_inputs(files_, pixel)
    transform = compose_transforms(_transform_lists(files_)[kind])
    interpolator = {"linear": itk.LinearInterpolateImageFunction.New(image),
                    "nearest": itk.NearestNeighborInterpolateImageFunction.New(image),
                    "bspline": itk.BSplineInterpolateImageFunction.New(image, spline_order=3)}[interpolation]
    expected = _itk_array(itk.resample_image_filter(image, transform=transform, interpolator=interpolator,
                                                    use_reference_image=True, reference_image=reference,
                                                    default_pixel_value=7))
    got_image = resample_image(image, reference, transform, interpolation=interpolation, default_value=7)
    assert type(got_image) is type(image)  # ITK Python in, ITK Python out
    got = _itk_array(got_image)
    assert got.dtype == expected.dtype == np.dtype(pixel)
    assert np.array_equal(got, expected), np.abs(got.astype(float) - expected).max()


@pytest.mark.parametrize("kind", ["h5", "ants pair", "inverse affine"])
def test_label_resampling_equals_itk_python(files_, kind):
    import itk
    import SimpleITK as sitk

    specs = _transform_lists(files_)[kind]
    expected = _itk_array(resample_labels(itk.imread(str(files_["labels"])), itk.imread(str(files_["fixed"])),
                                          compose_transforms(specs)))
    got = _sitk_array(files.resample_labels(sitk.ReadImage(str(files_["labels"])),
                                            sitk.ReadImage(str(files_["fixed"])), files.compose_transforms(specs)))
    assert np.array_equal(got, expected)
    assert len(np.unique(got)) > 2


def test_apply_transform_file_writes_what_itk_python_writes(files_, tmp_path):
    import itk

    out = tmp_path / "warped.nii.gz"
    summary = files.apply_transform_file(files_["moving"], files_["fixed"], [files_["h5"]], out)
    assert summary.output == out and summary.labels_in is None
    expected = resample_image(itk.imread(str(files_["moving"])), itk.imread(str(files_["fixed"])),
                              compose_transforms([files_["h5"]]))
    reference = tmp_path / "itk.nii.gz"
    itk.imwrite(expected, str(reference), compression=True)
    written = itk.imread(str(out))
    assert np.array_equal(_itk_array(written), _itk_array(expected))
    assert grid_of(written) == grid_of(itk.imread(str(reference)))
    assert out.read_bytes() == reference.read_bytes()  # the same ITK NIfTI writer, header and all


def test_warp_labels_file_reports_lost_labels(files_, tmp_path):
    summary = files.apply_transform_file(files_["labels"], files_["fixed"], [files_["h5"]], tmp_path / "l.nii.gz",
                                         labels=True)
    assert set(summary.labels_out) <= set(summary.labels_in) | {0}
    assert summary.lost_labels == sorted(set(summary.labels_in) - set(summary.labels_out))


@pytest.mark.parametrize("kind", ["h5", "ants pair"])
def test_jacobian_equals_itk_python(files_, tmp_path, kind):
    import itk

    specs = _transform_lists(files_)[kind]
    grid = grid_of(itk.imread(str(files_["fixed"])))
    expected = jacobian_determinant(compose_transforms(specs), grid)
    out = tmp_path / "jac.nii.gz"
    summary = files.jacobian_file(specs, reference=files_["fixed"], output=out, summary_json=tmp_path / "j.json")
    assert summary == {"transforms": [str(s) for s in specs], **jacobian_summary(expected)}
    assert json.loads((tmp_path / "j.json").read_text()) == summary
    assert np.array_equal(_itk_array(itk.imread(str(out))), expected.astype(np.float32))


def test_jacobian_grid_from_the_field(files_):
    from itk_gradicon.spatial.transforms import DisplacementField, read_transform

    field = DisplacementField.from_transform(read_transform(files_["h5"]))  # the grid of the field itself
    expected = jacobian_summary(jacobian_determinant(compose_transforms([files_["h5"]]), field.grid))
    assert files.jacobian_file([files_["h5"]]) == {"transforms": [str(files_["h5"])], **expected}
    with pytest.raises(InputError, match="no displacement field among the transforms"):
        files.jacobian_file([files_["affine"]])


def test_evaluate_equals_itk_python(files_):
    import itk

    fixed_labels = itk.imread(str(files_["labels"]))
    specs = [files_["warp"], files_["affine"]]
    report = files.evaluate_files(specs, fixed_labels=files_["labels"], moving_labels=files_["labels"])
    # the fixed labels here lie on the moving grid: warp the labels onto that grid, as evaluate does
    warped = resample_labels(fixed_labels, fixed_labels, compose_transforms(specs))
    assert report["labels"] == {**label_overlap(fixed_labels, warped), "interpolation": "label"}
    grid = grid_of(fixed_labels)
    assert report["jacobian"] == jacobian_summary(jacobian_determinant(compose_transforms(specs), grid))


def test_elastix_folder_reads_as_its_field(files_, tmp_path):
    from itk_gradicon.io.images import OutputTransaction
    from itk_gradicon.spatial.transforms import DisplacementField, read_transform

    field = DisplacementField.from_transform(read_transform(files_["h5"]))
    with OutputTransaction() as out:
        write_elastix(field, tmp_path / "elx", out)
    grid = field.grid
    from_folder = files.sample_displacement(files.compose_transforms([tmp_path / "elx"]), grid)
    from_h5 = files.sample_displacement(files.compose_transforms([files_["h5"]]), grid)
    assert np.abs(from_folder - from_h5).max() < 1e-5  # the folder stores float32 vectors


def test_user_mistakes_read_as_with_itk_python(files_, tmp_path):
    not_an_image = tmp_path / "notes.nii.gz"
    not_an_image.write_text("hello")
    with pytest.raises(InputError, match="could not be read as an image|is not an image file ITK can read"):
        files.read_header(not_an_image, what="--input")
    with pytest.raises(InputError, match="cannot invert .* displacement field"):
        files.compose_transforms([f"[{files_['h5']},1]"])
    with pytest.raises(InputError, match="is 3-D; the images here are 2-D"):
        files.compose_transforms([files_["h5"]], dimension=2)
    import itk

    itk.imwrite(itk.image_from_array(np.zeros((4, 5, 6, 3), np.float32), is_vector=True),
                str(tmp_path / "vector.nii.gz"))
    with pytest.raises(InputError, match="components per voxel"):
        files.apply_transform_file(tmp_path / "vector.nii.gz", files_["fixed"], [files_["h5"]], tmp_path / "o.nii.gz")
    assert not (tmp_path / "o.nii.gz").exists()


def test_register_warped_output_equals_itk_python(files_, tmp_path):
    """``gradicon register --out-warped`` goes through SimpleITK: the same voxels as ITK Python's resampler
    with the result's ``forward_transform``."""
    import itk

    from itk_gradicon.spatial.transforms import DisplacementField, read_transform

    field = DisplacementField.from_transform(read_transform(files_["h5"]))
    moving, fixed = itk.imread(str(files_["moving"])), itk.imread(str(files_["fixed"]))
    expected = resample_image(moving, fixed, field.to_transform(), interpolation="linear")
    files.write_warped(to_simpleitk(moving), to_simpleitk(fixed), field, tmp_path / "warped.nii.gz")  # as read
    written = itk.imread(str(tmp_path / "warped.nii.gz"))
    assert np.array_equal(_itk_array(written), _itk_array(expected))
    assert grid_of(written).matches(grid_of(fixed), tolerance=1e-6)


def test_a_text_file_listing_several_transforms_is_read_whole(tmp_path):
    """SimpleITK's ReadTransform keeps only the first transform of a .tfm listing several; ours reads
    them all and composes them as ITK Python's reader and ITK's composite do (the last listed acts first),
    for apply-transform (files.read_transform) and for --initial-transform (read_affine_file)."""
    import itk

    from itk_gradicon.commands.files import read_transform
    from itk_gradicon.spatial.transforms import affine_from_itk, affine_to_itk, compose_affines, read_affine_file

    rng = np.random.default_rng(8)
    matrices = []
    for _ in range(3):
        m = np.eye(4)
        m[:3, :3] = np.eye(3) + rng.normal(size=(3, 3)) * 0.1
        m[:3, 3] = rng.normal(size=3) * 5
        matrices.append(m)
    path = tmp_path / "three.tfm"
    itk.transformwrite([affine_to_itk(m) for m in matrices], str(path))
    expected = compose_affines([affine_from_itk(itk.down_cast(t)) for t in itk.transformread(str(path))])
    np.testing.assert_array_equal(read_affine_file(path), expected)
    np.testing.assert_allclose(expected, matrices[0] @ matrices[1] @ matrices[2], atol=1e-12)
    transform = read_transform(path)
    for point in rng.normal(size=(5, 3)) * 20:
        np.testing.assert_allclose(transform.TransformPoint(point), expected[:3, :3] @ point + expected[:3, 3],
                                   atol=1e-9)


def test_transform_files_are_written_one_at_a_time(tmp_path, monkeypatch):
    """ITK's bundled HDF5 is not thread-safe (two .h5 outputs written at once crashed gradicon register):
    every transform file is written while TRANSFORM_WRITE_LOCK is held."""
    import SimpleITK as sitk

    from itk_gradicon.spatial import transforms
    from itk_gradicon.io.grid import ImageGrid

    held = []
    real = sitk.WriteTransform

    def spy(transform, path):
        held.append(transforms.TRANSFORM_WRITE_LOCK.locked())
        return real(transform, path)

    monkeypatch.setattr(sitk, "WriteTransform", spy)
    grid = ImageGrid(size=(4, 5, 6), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                     direction=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)))
    field = transforms.DisplacementField(grid, np.zeros((6, 5, 4, 3)))
    transforms.write_transform_file(field, tmp_path / "field.h5")
    transforms.write_affine_file(np.eye(4), tmp_path / "affine.mat")
    assert held == [True, True]
    assert not transforms.TRANSFORM_WRITE_LOCK.locked()
