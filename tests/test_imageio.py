"""Reading and checking images, headers only, truncated files; all-or-nothing writing."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import blob_volume, make_image
from itk_gradicon.errors import InputError
from itk_gradicon.io.images import (OutputTransaction, atomic_output, check_header, check_nifti_complete,
                                  check_output_dir, check_output_path, compound_suffix, read_image,
                                  image_array, read_image_header, read_label_image, read_mask_on_grid, same_grid)
from itk_gradicon.io.itk_bridge import grid_of, to_simpleitk

SHAPE = (6, 7, 8)


@pytest.fixture
def image_file(tmp_path, rng):
    import itk

    path = tmp_path / "image.nii.gz"
    itk.imwrite(make_image((blob_volume(SHAPE, rng) * 1000).astype(np.int16), spacing=(1.5, 1.0, 2.0)), str(path))
    return path


# ---- headers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_header_only(tmp_path, rng, ending):
    import itk

    path = tmp_path / f"x{ending}"
    itk.imwrite(make_image(blob_volume(SHAPE, rng)), str(path))
    header = read_image_header(path, what="--fixed")
    assert header.dimension == 3 and header.size == (8, 7, 6) and header.components == 1
    assert header.num_voxels == 336 and header.component_type == "float"
    check_header(header, what="--fixed", dimension=3)


def test_header_of_a_huge_image_is_read_without_its_pixels(tmp_path):
    (tmp_path / "huge.raw").write_bytes(b"")
    (tmp_path / "huge.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 4000 4000 4000\n"
                                       "ElementType = MET_SHORT\nElementDataFile = huge.raw\n")
    header = read_image_header(tmp_path / "huge.mhd")
    assert header.num_voxels == 64_000_000_000


def test_header_refusals(tmp_path, rng):
    import itk

    (tmp_path / "text.nii.gz").write_text("hello")
    with pytest.raises(InputError, match="not an image file ITK can read"):
        read_image_header(tmp_path / "text.nii.gz", what="--moving")
    with pytest.raises(InputError, match="does not exist"):
        read_image_header(tmp_path / "missing.nii.gz")
    with pytest.raises(InputError, match="is a folder"):
        read_image_header(tmp_path)
    vectors = tmp_path / "v.nii.gz"
    itk.imwrite(itk.image_from_array(rng.random(SHAPE + (3,)).astype(np.float32), is_vector=True), str(vectors))
    with pytest.raises(InputError, match="3 components per voxel"):
        check_header(read_image_header(vectors), what="--moving", dimension=3)
    flat = tmp_path / "flat.nii.gz"
    itk.imwrite(make_image(blob_volume((6, 7), rng)), str(flat))
    with pytest.raises(InputError, match=r"2-D image of size \(7, 6\); the model 'm' registers 3-D images$"):
        check_header(read_image_header(flat), what="--fixed", dimension=3, needed_by="the model 'm'")
    series = tmp_path / "series.nii.gz"
    itk.imwrite(make_image(rng.random((2,) + SHAPE).astype(np.float32)), str(series))
    with pytest.raises(InputError, match=r"4-D image of size .*; the model 'm' registers 3-D images \(a series of "
                                         r"volumes: register one volume.*apply-transform\)"):
        check_header(read_image_header(series), what="--fixed", dimension=3, needed_by="the model 'm'")


# ---- pixels ----------------------------------------------------------------------------------------

def test_read_image_as_float_keeping_the_original(image_file):
    import itk

    image, original = read_image(image_file, what="--fixed", dimension=3, return_original=True)
    assert itk.template(image)[1][0] is itk.F
    assert itk.array_view_from_image(original).dtype == np.int16
    np.testing.assert_array_equal(itk.array_view_from_image(image), itk.array_view_from_image(original))
    assert grid_of(image).matches(grid_of(original))


def test_read_image_refusals(tmp_path):
    import itk

    constant = tmp_path / "c.nrrd"
    itk.imwrite(make_image(np.full(SHAPE, 3.0, np.float32)), str(constant))
    with pytest.raises(InputError, match="constant"):
        read_image(constant, what="--fixed")
    assert read_image(constant, check_constant=False) is not None
    nan = tmp_path / "n.nrrd"
    array = np.ones(SHAPE, np.float32)
    array[1, 2, 3] = np.nan
    itk.imwrite(make_image(array), str(nan))
    with pytest.raises(InputError, match="1 NaN or infinite voxels"):
        read_image(nan, what="--fixed")
    (tmp_path / "z.raw").write_bytes(np.arange(np.prod(SHAPE), dtype=np.float32).tobytes())
    (tmp_path / "z.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 8 7 6\nElementSpacing = 1 0 1\n"
                                    "ElementType = MET_FLOAT\nElementDataFile = z.raw\n")
    with pytest.raises(InputError, match="spacing|could not be read"):  # ITK or we refuse it
        read_image(tmp_path / "z.mhd")


def _nifti_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def test_truncated_nifti_is_refused(tmp_path, image_file):
    """ITK reads a NIfTI file whose data is cut short and fills the rest with zeros; we refuse it."""
    import itk

    raw = _nifti_bytes(image_file)
    cut = tmp_path / "cut.nii"
    cut.write_bytes(raw[:-100])
    assert itk.imread(str(cut)) is not None  # ITK itself does not complain
    with pytest.raises(InputError, match="truncated: its header announces"):
        read_image(cut, what="--fixed")
    cut_gz = tmp_path / "cut.nii.gz"
    cut_gz.write_bytes(image_file.read_bytes()[:-40])
    with pytest.raises(InputError, match="damaged or truncated"):
        read_image(cut_gz, what="--fixed")
    with pytest.raises(InputError, match="truncated"):
        read_label_image(cut, what="--fixed-labels")
    plain = tmp_path / "plain.nii.gz"  # an uncompressed file with a .gz name: ITK reads it, so do we
    plain.write_bytes(raw)
    check_nifti_complete(plain)
    check_nifti_complete(image_file)


def test_nifti_check_reads_both_byte_orders(tmp_path):
    header = bytearray(352)
    for endian in ("<", ">"):
        struct.pack_into(endian + "i", header, 0, 348)
        struct.pack_into(endian + "8h", header, 40, 3, 4, 4, 4, 1, 1, 1, 1)
        struct.pack_into(endian + "h", header, 72, 32)  # bits per voxel
        struct.pack_into(endian + "f", header, 108, 352.0)
        path = tmp_path / f"h{'le' if endian == '<' else 'be'}.nii"
        path.write_bytes(bytes(header) + b"\0" * (64 * 2))  # half of 64 float32 voxels
        with pytest.raises(InputError, match="announces 608 bytes, the file holds 480"):
            check_nifti_complete(path)
        path.write_bytes(bytes(header) + b"\0" * (64 * 4))
        check_nifti_complete(path)


def test_labels_and_masks(tmp_path, rng):
    import itk

    grid_image = make_image(blob_volume(SHAPE, rng), spacing=(1.0, 2.0, 1.0))
    float_labels = tmp_path / "labels.nrrd"
    itk.imwrite(make_image(rng.integers(0, 4, SHAPE).astype(np.float32), spacing=(1.0, 2.0, 1.0)), str(float_labels))
    labels = read_label_image(float_labels, what="--fixed-labels")
    assert itk.array_view_from_image(labels).dtype == np.int16
    fractional = tmp_path / "fractional.nrrd"
    itk.imwrite(make_image(np.full(SHAPE, 1.5, np.float32)), str(fractional))
    with pytest.raises(InputError, match="non-integer values such as 1.5"):
        read_label_image(fractional, what="--fixed-labels")
    grid_image = to_simpleitk(grid_image)  # the package's image type inside (register() converts at its door)
    mask = read_mask_on_grid(float_labels, grid_image, what="--fixed-mask")
    np.testing.assert_array_equal(image_array(mask), itk.array_view_from_image(labels) > 0)
    shifted = make_image(np.ones(SHAPE, np.uint8), spacing=(1.0, 2.0, 1.0), origin=(0.5, 0, 0))
    itk.imwrite(shifted, str(tmp_path / "shifted.nrrd"))
    with pytest.raises(InputError, match="not on its image's grid"):
        read_mask_on_grid(tmp_path / "shifted.nrrd", grid_image, what="--fixed-mask")
    itk.imwrite(make_image(np.zeros(SHAPE, np.uint8), spacing=(1.0, 2.0, 1.0)), str(tmp_path / "empty.nrrd"))
    with pytest.raises(InputError, match="empty"):
        read_mask_on_grid(tmp_path / "empty.nrrd", grid_image, what="--fixed-mask")


def test_same_grid_tolerances():
    a = to_simpleitk(make_image(np.zeros(SHAPE, np.float32), spacing=(1.0, 1.0, 1.0)))
    b = to_simpleitk(make_image(np.zeros(SHAPE, np.float32), spacing=(1.0 + 1e-6, 1.0, 1.0), origin=(1e-5, 0, 0)))
    c = to_simpleitk(make_image(np.zeros(SHAPE, np.float32), spacing=(1.01, 1.0, 1.0)))
    assert same_grid(a, b) and not same_grid(a, c)
    assert not same_grid(a, to_simpleitk(make_image(np.zeros((6, 7, 9), np.float32))))


# ---- destinations -----------------------------------------------------------------------------------

def test_output_path_checks(tmp_path, monkeypatch):
    assert compound_suffix("a/b.NII.GZ") == ".nii.gz" and compound_suffix("t.h5") == ".h5"
    assert check_output_path(tmp_path / "t.h5", suffixes=(".h5",)) == (tmp_path / "t.h5").absolute()
    with pytest.raises(InputError, match=r"has the ending '\.txt'; allowed: \.h5"):
        check_output_path(tmp_path / "t.txt", what="--out-transform", suffixes=(".h5",))
    with pytest.raises(InputError, match="is a folder"):
        check_output_path(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        check_output_path(tmp_path / "no" / "t.h5")
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(InputError, match="not writable"):
        check_output_path(tmp_path / "t.h5")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_output_folder_probe_catches_what_permissions_do_not():
    with pytest.raises(InputError, match="not writable"):
        check_output_path("/proc/out.h5", what="--out-transform")


def test_output_dir_checks(tmp_path):
    assert check_output_dir(tmp_path / "new") == (tmp_path / "new").absolute()
    assert not (tmp_path / "new").exists()  # created only when something is written into it
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="exists and is not a folder"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(InputError, match="does not exist"):
        check_output_dir(tmp_path / "a" / "b")


def test_transaction_commits_every_file_together(tmp_path, rng):
    import itk

    image = make_image(blob_volume(SHAPE, rng))
    with OutputTransaction() as out:
        itk.imwrite(image, str(out.path(tmp_path / "a.mhd")))  # header + .raw data file
        itk.imwrite(image, str(out.path(tmp_path / "sub" / "b.nii.gz")))
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["sub"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.mhd", "a.raw", "b.nii.gz", "sub"]
    np.testing.assert_array_equal(itk.array_from_image(itk.imread(str(tmp_path / "a.mhd"))),
                                  itk.array_from_image(image))


def test_transaction_leaves_nothing_on_failure(tmp_path, rng):
    import itk

    image = make_image(blob_volume(SHAPE, rng))
    with pytest.raises(RuntimeError, match="late failure"):
        with OutputTransaction() as out:
            itk.imwrite(image, str(out.path(tmp_path / "a.nii.gz")))
            itk.imwrite(image, str(out.path(tmp_path / "new_folder" / "b.nii.gz")))
            raise RuntimeError("late failure")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(tmp_path / "c.nii.gz") as staged:
            staged.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_transaction_replaces_existing_files(tmp_path):
    (tmp_path / "t.txt").write_text("old")
    with atomic_output(tmp_path / "t.txt") as staged:
        staged.write_text("new")
        assert (tmp_path / "t.txt").read_text() == "old"
    assert (tmp_path / "t.txt").read_text() == "new"


@pytest.mark.parametrize("failing", [1, 2, 3])
def test_a_failed_commit_restores_every_destination(tmp_path, monkeypatch, failing):
    """If moving the n-th file into place fails, the files already moved are removed and the files
    they replaced come back: the destinations are exactly as before, and no staging folder is left."""
    from itk_gradicon.io import images as imageio

    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "c.txt").write_text("old c")
    real_replace = os.replace
    moves = []

    def replace(src, dst):
        if ".gradicon-partial-" in str(src) and ".replaced" not in str(src) and ".replaced" not in str(dst):
            moves.append(dst)
            if len(moves) == failing:
                raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(imageio.os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        with OutputTransaction() as out:
            for name in ("a.txt", "b.txt", "c.txt"):
                out.path(tmp_path / name).write_text(f"new {name[0]}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "c.txt"]
    assert (tmp_path / "a.txt").read_text() == "old a" and (tmp_path / "c.txt").read_text() == "old c"


def test_a_commit_replaces_every_destination_and_cleans_up(tmp_path):
    (tmp_path / "a.txt").write_text("old a")
    with OutputTransaction() as out:
        for name in ("a.txt", "b.txt"):
            out.path(tmp_path / name).write_text(f"new {name[0]}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]
    assert (tmp_path / "a.txt").read_text() == "new a"


_STAGE_AND_HANG = """
import sys, time
from itk_gradicon.io.images import OutputTransaction
out = OutputTransaction().__enter__()
out.path(sys.argv[1]).write_bytes(b"partial")
print("staged", flush=True)
time.sleep(600)
"""


def _staging_folders(folder):
    return sorted(p for p in folder.iterdir() if p.name.startswith(".gradicon-partial-"))


def _stage_in_child(folder):
    """A process that stages a file in ``folder`` and waits (a job writing its outputs)."""
    child = subprocess.Popen([sys.executable, "-c", _STAGE_AND_HANG, str(folder / "warped.nii.gz")],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "staged"
    return child


def test_a_killed_writer_s_staging_folder_is_cleared_by_the_next_writer(tmp_path):
    """kill -9 mid-write (a preempted cluster job) leaves a staging folder with a partial file; the next
    transaction writing into that folder removes it, but never a live process's, another host's, or one
    without an owner in its name."""
    killed, live = _stage_in_child(tmp_path), _stage_in_child(tmp_path)
    try:
        killed.kill()
        killed.wait()
        (stale, ) = [p for p in _staging_folders(tmp_path) if p.name.startswith(f".gradicon-partial-{killed.pid}@")]
        assert (stale / "warped.nii.gz").read_bytes() == b"partial"
        other_host = tmp_path / f".gradicon-partial-{killed.pid}@another-host.abcd1234"
        legacy = tmp_path / ".gradicon-partial-k2j4h5g6"
        for kept in (other_host, legacy):
            kept.mkdir()
        with OutputTransaction() as out:
            out.path(tmp_path / "result.txt").write_text("done")
        remaining = _staging_folders(tmp_path)
        assert stale not in remaining
        assert other_host in remaining and legacy in remaining
        assert any(p.name.startswith(f".gradicon-partial-{live.pid}@") for p in remaining)
        assert (tmp_path / "result.txt").read_text() == "done"
    finally:
        live.kill()
        live.wait()


def test_one_header_reader_names_components_as_itk_does(tmp_path):
    """imageio.read_image_header and files.read_header are one reader (SimpleITK's, without ITK Python), and
    name the stored component type as ITK's ImageIO does."""
    import SimpleITK as sitk

    from itk_gradicon.commands import files

    short = sitk.Image([5, 4, 3], sitk.sitkInt16)
    short.SetDirection([0, 1, 0, -1, 0, 0, 0, 0, 1])
    sitk.WriteImage(short, str(tmp_path / "short.nii.gz"))
    vectors = sitk.Image([5, 4, 3], sitk.sitkVectorFloat32, 3)
    sitk.WriteImage(vectors, str(tmp_path / "field.nii.gz"))
    header = read_image_header(tmp_path / "short.nii.gz")
    assert header.component_type == "short" and header.size == (5, 4, 3)
    assert header.direction == ((0.0, 1.0, 0.0), (-1.0, 0.0, 0.0), (0.0, 0.0, 1.0))
    assert files.read_header(tmp_path / "short.nii.gz") == header
    field = read_image_header(tmp_path / "field.nii.gz")
    assert (field.component_type, field.components) == ("float", 3)
