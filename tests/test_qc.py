"""The QC picture: physical display orientation, panels that show what the transforms do, the
log-Jacobian colours, 2-D images, and atomic PNG writing."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import blob_volume, make_image
from itk_gradicon.io.itk_bridge import grid_of

SHAPE = (30, 34, 38)  # ARRAY order (k, j, i)
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


def restored(image, perm, flips):
    """The same physical image stored with index axis ``a`` of the result = index axis ``perm[a]``
    of ``image``, reversed where ``flips[a]``."""
    import itk

    array = np.transpose(itk.array_from_image(image), (2, 1, 0))  # index order [i, j, k]
    array = np.transpose(array, perm)
    for a, flip in enumerate(flips):
        if flip:
            array = np.flip(array, a)
    size = np.array(image.GetLargestPossibleRegion().GetSize())
    direction = itk.array_from_matrix(image.GetDirection())
    spacing = np.array(image.GetSpacing())
    start = np.zeros(3)
    for a, (src, flip) in enumerate(zip(perm, flips)):
        start[src] = size[src] - 1 if flip else 0
    origin = np.asarray(image.GetOrigin()) + direction @ (spacing * start)
    new_direction = np.stack([direction[:, src] * (-1.0 if flip else 1.0) for src, flip in zip(perm, flips)], 1)
    return make_image(np.ascontiguousarray(np.transpose(array, (2, 1, 0))), spacing=spacing[list(perm)],
                      origin=origin, direction=new_direction)


def marker_volume():
    """A box (the body) on a diag(-1, -1, 1) grid (NIfTI-like) with one bright marker per centre slice:
    index i small = world x large (patient's left), j large = y small (anterior), k large = superior."""
    array = np.zeros(SHAPE, np.float32)  # ARRAY order [k, j, i]; centre slices k=15, j=17, i=19
    array[5:25, 5:29, 5:33] = 10.0
    array[13:18, 24:29, 5:10] = 100.0  # axial slice k=15: anterior, left
    array[20:25, 15:20, 5:10] = 100.0  # coronal slice j=17: superior, left
    array[20:25, 24:29, 13:22] = 100.0  # sagittal slice i=15 (off the centre i=19): superior, anterior
    return make_image(array, spacing=(1.0, 1.5, 2.0), origin=(20.0, 30.0, -10.0), direction=LPS_FROM_RAS)


def quadrant_of_marker(panel):
    """(row half, column half) of the brightest pixels of a greyscale panel: 0 = top/left."""
    grey = panel[..., 0].astype(float)
    rows, cols = np.nonzero(grey >= grey.max() - 1)
    return int(rows.mean() > panel.shape[0] / 2), int(cols.mean() > panel.shape[1] / 2)


def fixed_panels(fixed):
    """The display planes of the FIXED column of the QC picture, one per row."""
    import dataclasses

    import itk

    import SimpleITK as sitk

    from itk_gradicon.spatial.frames import ImageGrid
    from itk_gradicon.io.images import to_simpleitk
    from itk_gradicon.evaluation.qc import _plane, _slab, slice_views

    out = []
    for view in slice_views(grid_of(fixed)):
        slab = _slab(to_simpleitk(fixed), view, view.index, view.index + 1)  # the picture's helpers take SimpleITK
        out.append(_plane(sitk.GetArrayFromImage(slab), dataclasses.replace(view, index=0), 3))
    return out


def test_display_orientation_is_physical():
    """Axial: anterior up, patient's left on the right; coronal: superior up, left on the right;
    sagittal: superior up, anterior on the left."""
    views = fixed_panels(marker_volume())
    axial, coronal, sagittal = views
    assert quadrant_of_marker(axial[..., None]) == (0, 1)      # anterior (top), left (right)
    assert quadrant_of_marker(coronal[..., None]) == (0, 1)    # superior (top), left (right)
    assert quadrant_of_marker(sagittal[..., None]) == (0, 0)   # superior (top), anterior (left)


@pytest.mark.parametrize("perm,flips", [((1, 0, 2), (False, True, False)), ((2, 0, 1), (True, False, True)),
                                        ((0, 1, 2), (True, True, True))])
def test_display_does_not_depend_on_storage(perm, flips):
    """The same physical image stored another way gives the same display planes."""
    image = marker_volume()
    other = restored(image, perm, flips)
    for a, b in zip(fixed_panels(image), fixed_panels(other)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("perm,flips", [((0, 1, 2), (False, False, False)), ((0, 1, 2), (True, False, False)),
                                        ((2, 0, 1), (True, False, True))])
def test_the_sagittal_slice_is_off_the_midline_towards_the_patient_s_left(perm, flips):
    from itk_gradicon.spatial.frames import ImageGrid
    from itk_gradicon.evaluation.qc import SAGITTAL_OFFSET, slice_views

    image = restored(marker_volume(), perm, flips)
    grid = grid_of(image)
    sagittal = slice_views(grid)[2]
    index = np.array([(n - 1) / 2 for n in image.GetLargestPossibleRegion().GetSize()])

    def world_x(at):
        return float((np.asarray(image.GetOrigin()) + grid.direction_matrix @ (np.asarray(image.GetSpacing()) * at))[0])

    centre_x = world_x(index)
    index[sagittal.axis] = sagittal.index
    x = world_x(index)
    # LPS: the patient's left is +x; 38 voxels of 1 mm along x, a tenth of them off the centre
    assert SAGITTAL_OFFSET * 38 - 1 <= x - centre_x <= SAGITTAL_OFFSET * 38 + 1


def test_text_bitmap():
    from itk_gradicon.evaluation.qc import _GLYPHS, text_bitmap

    assert all(len(rows) == 7 and all(len(r) == 5 for r in rows) for rows in _GLYPHS.values())
    bitmap = text_bitmap("LOG 1.5", scale=2)
    assert bitmap.shape == (14, (7 * 5 + 6) * 2)
    assert bitmap.any() and not text_bitmap("   ").any()


def test_log_jacobian_colours():
    from itk_gradicon.evaluation.qc import _log_jacobian_colors

    log_det = np.array([[-2.0, -0.5, 0.0, 0.5, 2.0, np.nan]])
    folded = np.array([[True, False, False, False, False, False]])
    rgb = _log_jacobian_colors(log_det, folded)
    np.testing.assert_array_equal(rgb[0, 0], [255, 230, 0])       # fold: yellow
    np.testing.assert_array_equal(rgb[0, 2], [255, 255, 255])     # volume kept: white
    assert rgb[0, 1, 2] == 255 and rgb[0, 1, 0] < 255             # contraction: blue side
    assert rgb[0, 3, 0] == 255 and rgb[0, 3, 2] < 255             # expansion: red side
    np.testing.assert_array_equal(rgb[0, 4], [255, 0, 0])
    np.testing.assert_array_equal(rgb[0, 5], [96, 96, 96])        # unknown: grey


@pytest.fixture(scope="module")
def identity_model(tmp_path_factory):
    from conftest import tiny_architecture
    from itk_gradicon.models import load_model, save_model_file
    from itk_gradicon.network import build_network

    arch = tiny_architecture(3)
    path = tmp_path_factory.mktemp("identity-qc") / "identity3d.pt"
    save_model_file(path, build_network(arch), arch, name="identity3d")
    return load_model(str(path))


def test_panels_show_the_transform(identity_model):
    """With an identity network and a 1.2x scaling as pre-alignment: 'after' differs from 'before',
    and the log-Jacobian panel shows log(1.2^3) = 0.547 (red side) everywhere."""
    from itk_gradicon.evaluation.qc import COLUMNS, PANEL_PIXELS, qc_picture
    from itk_gradicon.registration import register

    image = marker_volume()
    affine = np.diag([1.2, 1.2, 1.2, 1.0])
    result = register(image, image, model=identity_model, initial_transform=affine, fixed_modality="mri",
                      moving_modality="mri", compute_inverse=False)
    picture = qc_picture(image, image, result)
    assert picture.dtype == np.uint8 and picture.shape[2] == 3
    assert picture.shape[1] >= len(COLUMNS) * 50 and picture.shape[0] <= 4 * PANEL_PIXELS + 200
    expected = np.array([255, round((1 - np.log(1.2 ** 3)) * 255), round((1 - np.log(1.2 ** 3)) * 255)])
    matches = np.all(np.abs(picture.astype(int) - expected) <= 2, axis=-1)
    assert matches.sum() > 3 * 40 * 40  # three log-Jacobian panels of that colour

    identity = register(image, image, model=identity_model, fixed_modality="mri", moving_modality="mri",
                        compute_inverse=False)
    same = qc_picture(image, image, identity)
    white = np.all(same == 255, axis=-1)
    assert white.sum() > 3 * 40 * 40  # log-Jacobian 0 everywhere: white


def test_float64_fixed_image_gives_the_float32_picture(identity_model):
    """A float64 fixed image (as many NIfTI files store) draws the same picture as its float32 copy.

    Its planes were once numpy views of slab images that ITK reallocated when the slab served again as a
    reference image: the picture then showed freed memory (NaN, garbage) in some panels.
    """
    from itk_gradicon.evaluation.qc import _slab, qc_picture, slice_views
    from itk_gradicon.spatial.frames import ImageGrid
    from itk_gradicon.registration import register

    import itk

    as32 = marker_volume()
    as64 = make_image(itk.array_from_image(as32).astype(np.float64))
    as64.CopyInformation(as32)
    result = register(as32, as32, model=identity_model, fixed_modality="mri", moving_modality="mri",
                      compute_inverse=False, initial_transform=np.diag([1.1, 0.9, 1.0, 1.0]))
    with np.errstate(invalid="raise"):
        pictures = [qc_picture(image, as32, result) for image in (as64, as32, as64)]
    np.testing.assert_array_equal(pictures[0], pictures[1])
    np.testing.assert_array_equal(pictures[2], pictures[1])
    from itk_gradicon.io.images import to_simpleitk

    view = slice_views(grid_of(as64))[0]
    assert _slab(to_simpleitk(as64), view, view.index, view.index + 1).GetSize()[view.axis] == 1


def test_after_panel_is_the_warped_moving_image(tiny_model_file, rng):
    """The 'MOVING AFTER' plane (SimpleITK, the forward field as a SimpleITK transform) is the moving image
    resampled by ITK Python through the result's ITK forward transform."""
    import dataclasses

    import itk

    from itk_gradicon.spatial.frames import ImageGrid
    from itk_gradicon.io.images import to_simpleitk
    from itk_gradicon.evaluation.qc import _plane, _sample, _slab, slice_views
    from itk_gradicon.registration import register
    from itk_gradicon.io.transform_files import field_transform

    fixed = make_image(blob_volume(SHAPE, rng) * 100, spacing=(1.0, 1.5, 2.0), direction=LPS_FROM_RAS)
    moving = make_image(blob_volume(SHAPE, rng) * 100, spacing=(1.0, 1.5, 2.0), direction=LPS_FROM_RAS)
    result = register(fixed, moving, model=str(tiny_model_file), compute_inverse=False)
    warped = itk.resample_image_filter(moving, transform=result.forward_transform, use_reference_image=True,
                                       reference_image=fixed)
    for view in slice_views(grid_of(fixed)):
        slab = _slab(to_simpleitk(fixed), view, view.index, view.index + 1)
        on_slab = dataclasses.replace(view, index=0)
        ours = _plane(_sample(to_simpleitk(moving), slab, field_transform(result.forward_field)), on_slab, 3)
        theirs = _plane(itk.array_from_image(warped), view, 3)
        np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_2d_picture_and_atomic_writing(tmp_path, tiny_model_file_2d, rng):
    import itk

    from itk_gradicon.io.images import OutputTransaction
    from itk_gradicon.evaluation.qc import write_qc
    from itk_gradicon.registration import register

    fixed = make_image(blob_volume((40, 50), rng) * 100, spacing=(0.5, 0.8))
    moving = make_image(blob_volume((40, 50), rng) * 100, spacing=(0.5, 0.8))
    result = register(fixed, moving, model=str(tiny_model_file_2d), compute_inverse=False)
    path = tmp_path / "qc2d.png"
    with OutputTransaction() as out:
        write_qc(fixed, moving, result, path, transaction=out)
        assert not path.exists()  # staged until the transaction commits
    picture = itk.array_from_image(itk.imread(str(path)))
    assert picture.ndim == 3 and picture.shape[2] == 3 and picture.shape[0] > 40
    write_qc(fixed, moving, result, tmp_path / "direct.png")
    np.testing.assert_array_equal(itk.array_from_image(itk.imread(str(tmp_path / "direct.png"))), picture)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["direct.png", "qc2d.png"]


def test_picture_needs_the_registered_fixed_image(identity_model):
    from itk_gradicon.errors import InputError
    from itk_gradicon.evaluation.qc import qc_picture
    from itk_gradicon.registration import register

    image = marker_volume()
    result = register(image, image, model=identity_model, compute_inverse=False)
    other = make_image(np.ones((10, 10, 10), np.float32))
    with pytest.raises(InputError, match="fixed image the registration was computed on"):
        qc_picture(other, image, result)


@pytest.mark.slow
def test_qc_on_a_real_oblique_pair(tmp_path, shared_data, tiny_model_file):
    """chris_PD (oblique) to chris_t1: the picture is written; its 'before' overlay shows the PD stack
    tilted (the part of the fixed slice outside the PD's field of view stays magenta)."""
    import itk

    from itk_gradicon.evaluation.qc import write_qc
    from itk_gradicon.registration import register

    folder = shared_data / "niivue_demo_images"
    fixed = itk.imread(str(folder / "chris_t1.nii.gz"))
    moving = itk.imread(str(folder / "chris_PD.nii.gz"))
    result = register(itk.cast_image_filter(fixed, ttype=(type(fixed), itk.Image[itk.F, 3])),
                      itk.cast_image_filter(moving, ttype=(type(moving), itk.Image[itk.F, 3])),
                      model=str(tiny_model_file), compute_inverse=False)
    path = write_qc(fixed, moving, result, tmp_path / "chris.png")
    picture = itk.array_from_image(itk.imread(str(path)))
    assert picture.shape[0] > 400 and picture.shape[1] > 1000
    magenta = (picture[..., 0] > 120) & (picture[..., 2] > 120) & (picture[..., 1] < 40)
    assert magenta.sum() > 2000
