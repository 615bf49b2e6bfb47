"""``gradicon register`` on good and bad input, in-process with the tiny random 3-D model.

Every bad call must exit with status 2, print one line starting with "Error:" (click's own usage
errors add their usage lines) and no traceback, and leave nothing in the output folder: no file, no
hidden staging folder.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import blob_volume, make_image
from itk_gradicon.cli import main
from itk_gradicon.io.itk_bridge import grid_of

SHAPE = (20, 22, 24)  # ARRAY order (k, j, i)


@pytest.fixture
def files(tmp_path, rng):
    """Fixed and moving images, a fixed mask, and an empty output folder."""
    import itk

    fixed = make_image(blob_volume(SHAPE, rng) * 200, spacing=(1.2, 1.0, 0.9), origin=(-5, 3, 2))
    moving = make_image(blob_volume(SHAPE, rng) * 150, spacing=(1.2, 1.0, 0.9), origin=(-4, 2, 3))
    paths = {"fixed": tmp_path / "fixed.nii.gz", "moving": tmp_path / "moving.nii.gz",
             "mask": tmp_path / "fixed_mask.nii.gz", "out": tmp_path / "out"}
    itk.imwrite(fixed, str(paths["fixed"]))
    itk.imwrite(moving, str(paths["moving"]))
    mask = np.zeros(SHAPE, np.uint8)
    mask[4:16, 4:18, 4:20] = 1
    itk.imwrite(make_image(mask, spacing=(1.2, 1.0, 0.9), origin=(-5, 3, 2)), str(paths["mask"]))
    paths["out"].mkdir()
    return paths


def all_outputs(out: Path, *, elastix: bool = True):
    return ["--out-transform", str(out / "t.h5"), "--out-inverse-transform", str(out / "ti.nii.gz"),
            "--out-warped", str(out / "w.nii.gz"), "--out-inverse-warped", str(out / "iw.nii.gz"),
            "--out-ants-prefix", str(out / "ants_"), *(["--out-elastix", str(out / "elastix")] if elastix else []),
            "--out-qc", str(out / "qc.png")]


def invoke(args):
    return CliRunner().invoke(main, ["register", *args])


def base_args(files, model, *, outputs=True):
    args = ["--fixed", str(files["fixed"]), "--moving", str(files["moving"]), "--model", str(model)]
    return args + (all_outputs(files["out"]) if outputs else [])


def assert_refused(result, *fragments, out: Path = None):
    """Exit status 2, a one-line 'Error: ...' naming what went wrong, no traceback, no output."""
    assert result.exit_code == 2, (result.exit_code, result.output,
                                   "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else "")
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in error_lines[0], (fragment, error_lines[0])
    if out is not None:
        left = sorted(p.name for p in out.rglob("*"))
        assert left == [], f"outputs left behind: {left}"
    return error_lines[0]


# ---- the good call ---------------------------------------------------------------------------

def test_register_writes_every_output(files, tiny_model_file):
    import itk

    result = invoke(base_args(files, tiny_model_file))
    assert result.exit_code == 0, result.output
    out = files["out"]
    expected = {"t.h5", "ti.nii.gz", "w.nii.gz", "iw.nii.gz", "ants_1Warp.nii.gz", "ants_1InverseWarp.nii.gz",
                "elastix", "qc.png"}
    assert {p.name for p in out.iterdir()} == expected
    assert {p.name for p in (out / "elastix").iterdir()} == {"TransformParameters.0.txt", "deformation_field.nii.gz"}
    assert not [p for p in out.rglob(".gradicon-*")]
    fixed = itk.imread(str(files["fixed"]))
    warped = itk.imread(str(out / "w.nii.gz"))
    assert tuple(warped.GetLargestPossibleRegion().GetSize()) == tuple(fixed.GetLargestPossibleRegion().GetSize())
    np.testing.assert_allclose(np.asarray(warped.GetOrigin()), np.asarray(fixed.GetOrigin()))
    transform = itk.transformread(str(out / "t.h5"))[0]
    assert transform.GetNameOfClass() == "DisplacementFieldTransform"
    qc = itk.imread(str(out / "qc.png"))
    assert itk.array_view_from_image(qc).shape[-1] == 3
    # the inverse-warped image is the fixed image resampled onto the moving grid through the inverse transform
    again = files["out"].parent / "iw_again.nii.gz"
    applied = CliRunner().invoke(main, ["apply-transform", "-i", str(files["fixed"]), "-r", str(files["moving"]),
                                        "-t", str(out / "ti.nii.gz"), "-o", str(again)])
    assert applied.exit_code == 0, applied.output
    np.testing.assert_array_equal(itk.array_from_image(itk.imread(str(out / "iw.nii.gz"))),
                                  itk.array_from_image(itk.imread(str(again))))


def test_register_2d_end_to_end(tmp_path, rng, tiny_model_file_2d):
    """2-D images with the 2-D model: every output, and the warped image equals ITK's warp."""
    import itk

    fixed = make_image(blob_volume((30, 26), rng) * 100, spacing=(0.8, 1.1), origin=(3, -2))
    moving = make_image(blob_volume((28, 30), rng) * 100, spacing=(1.0, 0.9), origin=(2, -1),
                        direction=np.array([[0.0, 1.0], [-1.0, 0.0]]))
    for name, image in (("f2.nii.gz", fixed), ("m2.nii.gz", moving)):
        itk.imwrite(image, str(tmp_path / name))
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(main, ["register", "--fixed", str(tmp_path / "f2.nii.gz"),
                                       "--moving", str(tmp_path / "m2.nii.gz"),
                                       "--model", str(tiny_model_file_2d), *all_outputs(out)])
    assert result.exit_code == 0, result.output
    assert "reordered" in result.output  # the rotated moving image was laid out along the fixed axes
    transform = itk.transformread(str(out / "t.h5"))[0]
    reference = itk.resample_image_filter(itk.imread(str(tmp_path / "m2.nii.gz"), itk.F), transform=transform,
                                          use_reference_image=True, reference_image=itk.imread(str(tmp_path / "f2.nii.gz"), itk.F))
    warped = itk.imread(str(out / "w.nii.gz"), itk.F)
    np.testing.assert_allclose(itk.array_view_from_image(warped), itk.array_view_from_image(reference), atol=1e-3)
    inverse = itk.imread(str(out / "ti.nii.gz"))
    assert tuple(inverse.GetLargestPossibleRegion().GetSize()) == (30, 28)  # on the moving grid


# ---- missing, unreadable, not images ----------------------------------------------------------

def test_missing_file(files, tiny_model_file):
    args = base_args(files, tiny_model_file)
    args[1] = str(files["fixed"].with_name("nope.nii.gz"))
    assert_refused(invoke(args), "--fixed", "nope.nii.gz", "does not exist", out=files["out"])


def test_folder_instead_of_image(files, tiny_model_file):
    args = base_args(files, tiny_model_file)
    args[3] = str(files["out"].parent)
    assert_refused(invoke(args), "--moving", "is a folder", out=files["out"])


def test_unreadable_file(files, tiny_model_file, monkeypatch):
    os.chmod(files["moving"], 0)
    if os.geteuid() == 0:  # root reads anything: make the permission check see what a user would
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == files["moving"]
                            else real_access(p, mode, **kw))
    try:
        assert_refused(invoke(base_args(files, tiny_model_file)), "--moving", "not readable", out=files["out"])
    finally:
        os.chmod(files["moving"], 0o644)


def test_text_file_named_like_an_image(files, tiny_model_file):
    files["fixed"].write_text("this is not an image\n")
    assert_refused(invoke(base_args(files, tiny_model_file)), "--fixed", "not an image file", out=files["out"])


def test_truncated_image(files, tiny_model_file):
    """A valid header whose voxel data is cut short (ITK itself reads the missing voxels as zeros)."""
    data = files["moving"].read_bytes()
    import gzip

    raw = gzip.decompress(data)
    truncated = files["moving"].with_name("short.nii")
    truncated.write_bytes(raw[: len(raw) // 2])
    args = base_args(files, tiny_model_file)
    args[3] = str(truncated)
    assert_refused(invoke(args), "--moving", "short.nii", "truncated", "42592 bytes", out=files["out"])
    cut_gz = files["moving"].with_name("short.nii.gz")
    cut_gz.write_bytes(data[: len(data) // 2])
    args[3] = str(cut_gz)
    assert_refused(invoke(args), "--moving", "short.nii.gz", "damaged or truncated", out=files["out"])


# ---- wrong kinds of image ---------------------------------------------------------------------

def test_2d_image_for_a_3d_model(files, tiny_model_file, rng):
    import itk

    itk.imwrite(make_image(blob_volume((22, 24), rng)), str(files["fixed"]))
    assert_refused(invoke(base_args(files, tiny_model_file)), "--fixed", "2-D image", "tiny3d",
                   "3-D images", out=files["out"])


def test_4d_image_for_a_3d_model(files, tiny_model_file, rng):
    import itk

    itk.imwrite(itk.image_from_array(np.random.default_rng(0).random((3,) + SHAPE).astype(np.float32)),
                str(files["moving"]))
    assert_refused(invoke(base_args(files, tiny_model_file)), "--moving", "4-D image", out=files["out"])


def test_3d_images_for_a_2d_model(files, tiny_model_file_2d):
    assert_refused(invoke(base_args(files, tiny_model_file_2d)), "--fixed", "3-D image", "2-D images",
                   out=files["out"])


def test_vector_image(files, tiny_model_file):
    import itk

    vectors = itk.image_from_array(np.random.default_rng(0).random(SHAPE + (3,)).astype(np.float32),
                                   is_vector=True)
    itk.imwrite(vectors, str(files["moving"]))
    assert_refused(invoke(base_args(files, tiny_model_file)), "--moving", "vector", "3 components",
                   out=files["out"])


def test_constant_image(files, tiny_model_file):
    import itk

    itk.imwrite(make_image(np.full(SHAPE, 7.0, np.float32)), str(files["fixed"]))
    assert_refused(invoke(base_args(files, tiny_model_file)), "--fixed", "constant", "7", out=files["out"])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels(files, tiny_model_file, bad):
    """NRRD keeps NaN and Inf (ITK's NIfTI reader turns NaN into 0 before we see it)."""
    import itk

    array = itk.array_from_image(itk.imread(str(files["moving"]), itk.F))
    array[3, 4, 5] = bad
    array[7, 8, 9] = bad
    path = files["moving"].with_name("moving.nrrd")
    itk.imwrite(make_image(array), str(path))
    args = base_args(files, tiny_model_file)
    args[3] = str(path)
    assert_refused(invoke(args), "--moving", "2 NaN or infinite", out=files["out"])


# ---- masks and labels -------------------------------------------------------------------------

def test_mask_not_on_its_image_grid(files, tiny_model_file):
    import itk

    mask = itk.imread(str(files["mask"]))
    mask.SetOrigin([0.0, 0.0, 0.0])
    itk.imwrite(mask, str(files["mask"]))
    args = base_args(files, tiny_model_file) + ["--fixed-mask", str(files["mask"])]
    assert_refused(invoke(args), "--fixed-mask", "not on its image's grid", out=files["out"])


def test_mask_of_the_other_image(files, tiny_model_file):
    """The fixed mask given as the moving mask: the grids differ (origin), so it is refused."""
    args = base_args(files, tiny_model_file) + ["--moving-mask", str(files["mask"])]
    assert_refused(invoke(args), "--moving-mask", "not on its image's grid", out=files["out"])


def test_empty_mask(files, tiny_model_file):
    import itk

    itk.imwrite(make_image(np.zeros(SHAPE, np.uint8), spacing=(1.2, 1.0, 0.9), origin=(-5, 3, 2)),
                str(files["mask"]))
    args = base_args(files, tiny_model_file) + ["--fixed-mask", str(files["mask"])]
    assert_refused(invoke(args), "--fixed-mask", "empty", out=files["out"])


def test_loss_masking_needs_both_masks(files, tiny_model_file):
    args = base_args(files, tiny_model_file) + ["--fixed-mask", str(files["mask"]), "--mask-mode", "loss"]
    assert_refused(invoke(args), "--mask-mode loss", "--moving-mask", out=files["out"])


def test_labels_must_come_in_pairs(files, tiny_model_file):
    args = base_args(files, tiny_model_file) + ["--fixed-labels", str(files["mask"])]
    assert_refused(invoke(args), "--fixed-labels and --moving-labels", out=files["out"])


# ---- options ------------------------------------------------------------------------------------

def test_unknown_modality(files, tiny_model_file):
    result = invoke(base_args(files, tiny_model_file) + ["--moving-modality", "pet"])
    assert_refused(result, "--moving-modality", "pet", out=files["out"])


def test_unknown_model_name(files):
    assert_refused(invoke(base_args(files, "unigradikon")), "unknown model", "unigradikon",
                   "unigradicon, multigradicon", out=files["out"])


def test_truncated_weight_file(files, tiny_model_file, tmp_path):
    truncated = tmp_path / "cut.trch"
    truncated.write_bytes(tiny_model_file.read_bytes()[:5000])
    assert_refused(invoke(base_args(files, truncated)), "cut.trch", "truncated or corrupted",
                   out=files["out"])


def test_weights_of_another_layout(files, tmp_path):
    """A bare state dict whose tensors do not form a GradICON network."""
    import torch

    from conftest import tiny_architecture
    from itk_gradicon.network import build_network

    state = build_network(tiny_architecture(3)).state_dict()
    state.pop(next(k for k in state if k.endswith("lastConv.weight")))
    path = tmp_path / "odd.trch"
    torch.save(state, path)
    assert_refused(invoke(base_args(files, path)), "do not form a GradICON network", out=files["out"])


def test_negative_io_iterations(files, tiny_model_file):
    result = invoke(base_args(files, tiny_model_file) + ["--io-iterations", "-1"])
    assert_refused(result, "--io-iterations", "-1", out=files["out"])


def test_cuda_without_a_gpu(files, tiny_model_file, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = invoke(base_args(files, tiny_model_file) + ["--device", "cuda"])
    assert_refused(result, "--device 'cuda'", "torch.cuda.is_available() is False", out=files["out"])


def test_affine_and_initial_transform_together(files, tiny_model_file, tmp_path):
    from itk_gradicon.spatial.transforms import write_affine_file

    write_affine_file(np.eye(4), tmp_path / "a.mat")
    args = base_args(files, tiny_model_file) + ["--affine", "elastix", "--initial-transform", str(tmp_path / "a.mat")]
    assert_refused(invoke(args), "either --affine elastix or --initial-transform", out=files["out"])


def test_initial_transform_that_is_not_affine(files, tiny_model_file, tmp_path):
    import itk

    from itk_gradicon.spatial.frames import ImageGrid
    from itk_gradicon.spatial.transforms import DisplacementField

    grid = grid_of(itk.imread(str(files["fixed"])))
    field = DisplacementField(grid, np.zeros(grid.array_shape + (3,)))
    itk.transformwrite([field.to_transform()], str(tmp_path / "field.h5"))
    args = base_args(files, tiny_model_file) + ["--initial-transform", str(tmp_path / "field.h5")]
    assert_refused(invoke(args), "not an affine transform", out=files["out"])


# ---- outputs ---------------------------------------------------------------------------------------

def test_no_output_requested(files, tiny_model_file):
    assert_refused(invoke(base_args(files, tiny_model_file, outputs=False)), "no output requested",
                   out=files["out"])


def test_output_folder_missing(files, tiny_model_file):
    args = base_args(files, tiny_model_file) + ["--out-transform", str(files["out"] / "missing" / "t.h5")]
    args = [a for a in args]  # the later --out-transform wins
    assert_refused(invoke(args), "--out-transform", "does not exist", out=files["out"])


def test_output_folder_not_writable(files, tiny_model_file, monkeypatch):
    locked = files["out"] / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the permission check see what a user would
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked
                            else real_access(p, mode, **kw))
    try:
        args = base_args(files, tiny_model_file) + ["--out-warped", str(locked / "w.nii.gz")]
        assert_refused(invoke(args), "--out-warped", "not writable")
        assert sorted(p.name for p in files["out"].rglob("*")) == ["locked"]
        assert list(locked.iterdir()) == []
    finally:
        os.chmod(locked, 0o755)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_output_folder_where_no_file_can_be_created(files, tiny_model_file):
    """/proc passes a permission check for root, but nothing can be created there."""
    args = base_args(files, tiny_model_file) + ["--out-qc", "/proc/qc.png"]
    assert_refused(invoke(args), "--out-qc", "not writable", out=files["out"])


@pytest.mark.parametrize("flag,name,allowed", [("--out-transform", "t.txt", ".h5"),
                                               ("--out-warped", "w.png", ".nii.gz"),
                                               ("--out-qc", "qc.jpg", ".png")])
def test_output_file_endings(files, tiny_model_file, flag, name, allowed):
    args = base_args(files, tiny_model_file) + [flag, str(files["out"] / name)]
    assert_refused(invoke(args), flag, allowed, out=files["out"])


def test_two_outputs_with_one_name(files, tiny_model_file):
    args = base_args(files, tiny_model_file) + ["--out-transform", str(files["out"] / "ants_1Warp.nii.gz")]
    assert_refused(invoke(args), "same file", "ants_1Warp.nii.gz", out=files["out"])


# ---- resources ---------------------------------------------------------------------------------

def test_image_too_large_is_refused_before_reading(files, tiny_model_file, tmp_path, monkeypatch):
    """A header-only 3000^3 MetaImage (its data file is empty): refused from the header alone."""
    import itk_gradicon.commands.files as command_files  # where register reads the images and masks

    (tmp_path / "huge.raw").write_bytes(b"")
    huge = tmp_path / "huge.mhd"
    huge.write_text("ObjectType = Image\nNDims = 3\nDimSize = 3000 3000 3000\nElementType = MET_FLOAT\n"
                    "ElementSpacing = 1 1 1\nElementDataFile = huge.raw\n")

    def no_pixels(*args, **kwargs):
        raise AssertionError("pixels were read before the memory check")

    monkeypatch.setattr(command_files, "read_float32", no_pixels)
    args = base_args(files, tiny_model_file)
    args[3] = str(huge)
    line = assert_refused(invoke(args), "too large for the available memory", "GiB", out=files["out"])
    assert "needs about" in line


def test_memory_check_with_little_memory(files, tiny_model_file, monkeypatch):
    import itk_gradicon.devices as devices

    monkeypatch.setattr(devices, "available_memory_bytes", lambda device: (50 * 1024 ** 2, "RAM (test)"))
    assert_refused(invoke(base_args(files, tiny_model_file)), "too large", "RAM (test) reports 0.0 GiB",
                   out=files["out"])


# ---- failures while writing ----------------------------------------------------------------------

def test_failure_of_the_last_writer_leaves_nothing(files, tiny_model_file, monkeypatch):
    """The QC picture is written last; when it fails, the files staged before it are removed."""
    import itk_gradicon.evaluation.qc as qc
    import itk_gradicon.resources as resources

    # one writer thread, so that the outputs are written in their order and QC really is the last
    # (with several, what was staged before QC fails depends on the threads' timing)
    monkeypatch.setattr(resources, "usable_cores", lambda: 1)

    staged = []

    def failing_qc(fixed, moving, result, path, *, transaction=None, transform_of=None):
        staged.extend(p for p in files["out"].rglob("*") if p.is_file())
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(qc, "write_qc", failing_qc)
    line = assert_refused(invoke(base_args(files, tiny_model_file)), "qc.png", "No space left on device",
                          "no output was kept", out=files["out"])
    assert len(staged) >= 6, staged  # transforms, fields, warped image and elastix files had been staged
    assert line.startswith("Error: writing")


def test_interrupt_while_writing_leaves_nothing(files, tiny_model_file, monkeypatch):
    import itk_gradicon.evaluation.qc as qc

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(qc, "write_qc", interrupted)
    result = invoke(base_args(files, tiny_model_file))
    assert result.exit_code == 130, result.output
    assert "no output was written" in result.output
    assert list(files["out"].rglob("*")) == []


def test_failure_in_a_new_elastix_folder_removes_it(files, tiny_model_file, monkeypatch):
    import itk_gradicon.evaluation.qc as qc

    monkeypatch.setattr(qc, "write_qc", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("ITK: cannot write")))
    args = base_args(files, tiny_model_file)
    result = invoke(args)
    assert_refused(result, "cannot write", out=files["out"])
    assert not (files["out"] / "elastix").exists()


# ---- real images (shared data), the tiny model ------------------------------------------------------

REAL_PAIRS = {
    # spinal cord, one subject, T2 -> T1w, different fields of view; cord masks as labels, 2 IO steps
    "sct_t2_to_t1w": dict(fixed="sct_testing_data/t1/t1w.nii.gz", moving="sct_testing_data/t2/t2.nii.gz",
                          extra=["--fixed-labels", "sct_testing_data/t1/t1w_seg-manual.nii.gz",
                                 "--moving-labels", "sct_testing_data/t2/t2_seg-manual.nii.gz",
                                 "--io-iterations", "2", "--io-lr", "1e-4", "--seed", "1"]),
    # one person's PD (oblique 2.4 mm stack) -> T1, with the elastix affine pre-alignment
    "chris_pd_to_t1": dict(fixed="niivue_demo_images/chris_t1.nii.gz", moving="niivue_demo_images/chris_PD.nii.gz",
                           extra=["--affine", "elastix"]),
    # two OASIS brains, B -> A, loss masks from the tissue labels
    "oasis_b_to_a": dict(fixed="lapirn_oasis/image_A_160x192x144.nii.gz",
                         moving="lapirn_oasis/image_B_160x192x144.nii.gz",
                         extra=["--fixed-mask", "lapirn_oasis/derived/image_A_160x192x144_seg_resampled_to_image_grid.nii.gz",
                                "--moving-mask", "lapirn_oasis/image_B_160x192x144_seg.nii.gz",
                                "--mask-mode", "both", "--io-iterations", "1", "--io-lr", "1e-4", "--seed", "2"]),
}


def _lands_on_the_edge(transform, fixed, moving, tolerance: float = 1e-4) -> np.ndarray:
    """Fixed voxels (array order) that ``transform`` maps within ``tolerance`` voxels of the moving
    image's buffer edge (continuous index -0.5 or size - 0.5 along some axis)."""
    import itk

    field = itk.array_from_image(transform.GetDisplacementField()).astype(np.float64)  # [z, y, x, 3]
    size = np.array(fixed.GetLargestPossibleRegion().GetSize())
    index = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), axis=-1)  # [x, y, z, 3]
    index = np.transpose(index, (2, 1, 0, 3))
    to_physical = itk.array_from_matrix(fixed.GetDirection()) @ np.diag(fixed.GetSpacing())
    points = index @ to_physical.T + np.array(fixed.GetOrigin()) + field
    to_index = np.linalg.inv(itk.array_from_matrix(moving.GetDirection()) @ np.diag(moving.GetSpacing()))
    continuous = (points - np.array(moving.GetOrigin())) @ to_index.T
    bounds = np.array(moving.GetLargestPossibleRegion().GetSize()) - 0.5
    return ((np.abs(continuous + 0.5) < tolerance) | (np.abs(continuous - bounds) < tolerance)).any(axis=-1)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL_PAIRS))
def test_real_pairs_end_to_end(name, shared_data, tiny_model_file, tmp_path):
    """Every output on real images; ITK reads them, and antspyx warps the moving image with our .h5
    and with the ANTs files (PREFIX1Warp [+ PREFIX0GenericAffine]) exactly as our warped image."""
    import itk

    ants = pytest.importorskip("ants")
    case = REAL_PAIRS[name]
    extra = [str(shared_data / a) if a.endswith(".nii.gz") else a for a in case["extra"]]
    fixed, moving = shared_data / case["fixed"], shared_data / case["moving"]
    out = tmp_path / "out"
    out.mkdir()
    result = invoke(["--fixed", str(fixed), "--moving", str(moving), "--model", str(tiny_model_file),
                     *all_outputs(out, elastix=False), *extra])  # (the elastix writer is tested elsewhere)
    assert result.exit_code == 0, result.output
    affine = "--affine" in extra
    assert (out / "ants_0GenericAffine.mat").exists() == affine

    fixed_image = itk.imread(str(fixed), itk.F)
    warped = itk.array_from_image(itk.imread(str(out / "w.nii.gz"), itk.F))
    forward = itk.transformread(str(out / "t.h5"))[0]
    by_itk = itk.array_from_image(itk.resample_image_filter(itk.imread(str(moving), itk.F), transform=forward,
                                                            use_reference_image=True, reference_image=fixed_image))
    scale = float(np.abs(by_itk).max())
    rounding = 0.5 if np.issubdtype(itk.array_view_from_image(itk.imread(str(moving))).dtype, np.integer) else 0.0
    np.testing.assert_allclose(warped, by_itk, atol=1e-3 * scale + rounding)  # the moving pixel type is kept
    inverse = itk.imread(str(out / "ti.nii.gz"))
    assert tuple(inverse.GetLargestPossibleRegion().GetSize()) == \
        tuple(itk.imread(str(moving)).GetLargestPossibleRegion().GetSize())

    fixed_ants, moving_ants = ants.image_read(str(fixed)), ants.image_read(str(moving))
    ants_files = [str(out / "ants_1Warp.nii.gz")] + ([str(out / "ants_0GenericAffine.mat")] if affine else [])
    # a fixed voxel that lands on the moving image's edge is inside for one program and outside for the
    # other when float rounding (1e-7 voxel: the ANTs warp file is float32) puts it on either side
    on_edge = _lands_on_the_edge(forward, fixed_image, itk.imread(str(moving), itk.F))
    assert on_edge.mean() < 1e-3
    compared = ~on_edge
    compared[:2] = compared[-2:] = compared[:, :2] = compared[:, -2:] = compared[:, :, :2] = compared[:, :, -2:] = False
    for transforms in ([str(out / "t.h5")], ants_files):
        by_ants = np.transpose(ants.apply_transforms(fixed_ants, moving_ants, transformlist=transforms,
                                                     interpolator="linear").numpy(), (2, 1, 0))
        assert float(np.abs(by_ants - by_itk)[compared].max()) < 2e-3 * scale, transforms
    qc = itk.array_from_image(itk.imread(str(out / "qc.png")))
    assert qc.shape[2] == 3 and qc.shape[0] > 200


def test_register_reads_and_writes_without_loading_itk_python(files, tiny_model_file):
    """Issue 13: the command without an elastix stage or QC picture reads, resamples and writes through
    SimpleITK; ITK Python's module loading (seconds) never starts. Checked in a fresh interpreter."""
    import subprocess
    import sys

    from itk_gradicon.spatial.transforms import write_affine_file

    out = files["out"]
    shift = np.eye(4)
    shift[:3, 3] = (1.0, -0.5, 0.25)
    write_affine_file(shift, files["out"].parent / "pre.tfm")  # the pre-aligned path resamples too
    args = ["register", "--fixed", str(files["fixed"]), "--moving", str(files["moving"]), "--mask-mode", "input",
            "--fixed-mask", str(files["mask"]), "--model", str(tiny_model_file), "--affine", "none",
            "--initial-transform", str(files["out"].parent / "pre.tfm"),
            "--out-transform", str(out / "t.h5"), "--out-inverse-transform", str(out / "i.nii.gz"),
            "--out-warped", str(out / "w.nii.gz"), "--out-ants-prefix", str(out / "a_"),
            "--out-elastix", str(out / "elastix"), "--quiet"]
    code = ("import sys\nfrom itk_gradicon.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('itk loaded:', any(m == 'itk' or m.startswith('itk.') for m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "itk loaded: False" in done.stdout, done.stdout
    assert "not writable" not in done.stderr, done.stderr  # SimpleITK's read-only views are copied for torch
    assert sorted(p.name for p in out.iterdir()) == ["a_0GenericAffine.mat", "a_1InverseWarp.nii.gz",
                                                      "a_1Warp.nii.gz", "elastix", "i.nii.gz", "t.h5", "w.nii.gz"]
