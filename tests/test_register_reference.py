"""``gradicon register`` against the reference ``unigradicon-register`` with the same weights.

One real pair (lapirn_oasis B -> A, 160x192x144, identical direction matrices) and one random-weight
file in the published format (the ``published_random_trch`` fixture): prediction only on both sides,
both MRI. The reference writes a 3-part composite transform on its 175^3 network grid; ours is a
displacement field on the fixed grid. Both are sampled at every fixed voxel with ITK's
``TransformToDisplacementFieldFilter`` and must agree within 0.01 mm (3.6e-5 to 5.7e-5 mm measured).

Cost on 2 CPU cores: the reference predicts both directions and evaluates its loss (about 2 minutes),
ours predicts the forward direction only (about 30 s).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.reference]

TOLERANCE_MM = 7e-4  # measured: 5-7e-5 mm against unigradicon-register with the same weights


def _reference_command():
    executable = shutil.which("unigradicon-register")
    if executable is None:
        candidate = Path(sys.executable).with_name("unigradicon-register")
        executable = str(candidate) if candidate.exists() else None
    if executable is not None:
        return [executable]
    return [sys.executable, "-c", "import sys, unigradicon; sys.argv[0] = 'unigradicon-register'; unigradicon.main()"]


def _field_at_fixed_voxels(transform, fixed):
    """The transform's displacement at every voxel of ``fixed`` (float32 LPS mm, ITK's filter)."""
    import itk

    d = int(fixed.GetImageDimension())
    field_type = itk.Image[itk.Vector[itk.F, d], d]
    sampler = itk.TransformToDisplacementFieldFilter[field_type, itk.D].New(
        Transform=transform, ReferenceImage=fixed, UseReferenceImage=True)
    sampler.Update()
    return itk.array_from_image(sampler.GetOutput())


@pytest.fixture(scope="module")
def oasis_pair(shared_data, published_random_trch, tmp_path_factory):
    """Both registrations of lapirn_oasis B -> A, run once for the tests below."""
    pytest.importorskip("unigradicon")
    pytest.importorskip("icon_registration")
    from click.testing import CliRunner

    from itk_gradicon.cli import main

    folder = shared_data / "lapirn_oasis"
    fixed, moving = folder / "image_A_160x192x144.nii.gz", folder / "image_B_160x192x144.nii.gz"
    work = tmp_path_factory.mktemp("reference")
    reference = work / "reference_B_to_A.h5"
    completed = subprocess.run(
        _reference_command() + ["--fixed", str(fixed), "--moving", str(moving), "--fixed_modality", "mri",
                                "--moving_modality", "mri", "--transform_out", str(reference),
                                "--io_iterations", "None", "--network_weights", str(published_random_trch)],
        capture_output=True, text=True, cwd=work, timeout=900)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    ours = work / "ours_B_to_A.h5"
    out = CliRunner().invoke(main, ["register", "--fixed", str(fixed), "--moving", str(moving),
                                    "--model", str(published_random_trch), "--io-iterations", "0",
                                    "--fixed-modality", "mri", "--moving-modality", "mri",
                                    "--out-transform", str(ours)])
    assert out.exit_code == 0, out.output
    return {"fixed": fixed, "moving": moving, "reference": reference, "ours": ours, "work": work}


def test_same_transform_as_the_reference(oasis_pair):
    import itk

    fixed = itk.imread(str(oasis_pair["fixed"]), itk.F)
    reference = itk.transformread(str(oasis_pair["reference"]))[0]
    ours = itk.transformread(str(oasis_pair["ours"]))[0]
    theirs = _field_at_fixed_voxels(reference, fixed)
    mine = _field_at_fixed_voxels(ours, fixed)
    difference = np.linalg.norm(theirs.astype(np.float64) - mine, axis=-1)
    assert float(np.linalg.norm(mine, axis=-1).max()) > 1.0  # the random network does deform
    assert float(difference.max()) < TOLERANCE_MM, float(difference.max())


def test_outputs_are_read_by_itk_and_ants(oasis_pair):
    """Our .h5 gives the same warped image in ITK and in antspyx (antsApplyTransforms)."""
    ants = pytest.importorskip("ants")
    import itk

    fixed = itk.imread(str(oasis_pair["fixed"]), itk.F)
    moving = itk.imread(str(oasis_pair["moving"]), itk.F)
    transform = itk.transformread(str(oasis_pair["ours"]))[0]
    by_itk = itk.array_from_image(itk.resample_image_filter(moving, transform=transform, use_reference_image=True,
                                                            reference_image=fixed))
    by_ants = ants.apply_transforms(ants.image_read(str(oasis_pair["fixed"])), ants.image_read(str(oasis_pair["moving"])),
                                    transformlist=[str(oasis_pair["ours"])], interpolator="linear").numpy()
    by_ants = np.transpose(by_ants, (2, 1, 0))  # antspy arrays are (x, y, z)
    inner = (slice(2, -2),) * 3
    assert float(np.abs(by_ants - by_itk)[inner].max()) < 1e-3 * float(np.abs(by_itk).max())
