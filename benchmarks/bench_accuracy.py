"""Registration accuracy: ours (with and without instance optimisation) vs identity, elastix affine, ANTs SyN.

Every method registers the same moving image to the same fixed image, given as files (or ITK images
read from them), and returns its fixed -> moving transform; the moving labels are warped onto the fixed grid
through it, the same way for every method (``--label-interpolation``: ``nearest``, nearest neighbour, by
default; ``label``, ANTs' GenericLabel, :func:`itk_gradicon.spatial.resample.resample_labels`; the JSON holds
both); then, per pair and method:

* **Dice** per label and **HD95** (mm) per label between the warped moving labels and the fixed labels
  (:func:`itk_gradicon.evaluation.metrics.label_overlap`; HD95 is the larger of the two directed 95th percentiles
  of the surface distances; ``n/a`` where a label vanished);
* **% of negative Jacobian determinants** of the fixed -> moving transform at the voxels of the fixed
  grid, in physical space (:func:`itk_gradicon.evaluation.metrics.folding`; 0 for identity and affine);
* **wall time** (s) of the registration alone: reading files, warping labels and the metrics are not
  counted; the model is loaded once before (its load time is in the JSON record).

Methods (rows):

* ``identity``: no registration (the images' own physical positions);
* ``elastix affine``: :func:`itk_gradicon.pipeline.affine.elastix_affine` (Mattes MI, 4 levels);
* ``ANTs SyN``: ``ants.registration(fixed, moving, type_of_transform="SyN")`` with antspyx's defaults; its
  transform is ``[1Warp, 0GenericAffine]`` composed as antsApplyTransforms does
  (:func:`itk_gradicon.spatial.transforms.compose_transforms`), which also gives the Jacobian on the fixed grid
  (ANTs' own ``create_jacobian_determinant_image`` clamps folds to 0). The record also holds the mean Dice of
  the labels warped by ``ants.apply_transforms(..., interpolator="genericLabel")`` itself
  (``mean_dice_ants_generic_label``), which the ``label`` figure should equal. Before 2026-12-06 the ANTs rows
  were scored that way (GenericLabel) and ours by nearest neighbour: ACCURACY.md run 31 gives both;
* ``ours``: :func:`itk_gradicon.register` with ``--model`` and its defaults (``affine="auto"``: a model
  trained on pre-aligned pairs runs elastix first, and that time is counted; the inverse is computed, as
  by default), no instance optimisation; its transform is ``result.forward_transform``;
* ``ours + IO``: the same with ``--io-iterations`` steps of instance optimisation (the model's loss).
* ``ours default``: :func:`itk_gradicon.register` with nothing but the pair's modalities, as ``gradicon
  register`` runs without flags: the model's pre-alignment and its recommended refinement (for the bundled
  model 50 steps of field IO, 40 of them at half resolution), the multimodal similarity where the pair's
  modalities differ;
* ``ours IO N`` for each N of ``--io-budgets`` (e.g. ``0,10,25,50,100``): the default with N steps, for
  Dice against time;
* ``ours pre-alignment``: :func:`itk_gradicon.pipeline.affine.prealign` alone (the default's first stage), labels
  resampled through its matrix;
* ``ANTs Affine``: ``ants.registration(type_of_transform="Affine")`` with antspyx's defaults.

Both images are treated as MRI (``fixed_modality="mri"``, ``moving_modality="mri"``) for ours.

Pairs (``--pairs``, groups):

* ``oasis``: ``../shared/data/lapirn_oasis`` B -> A and A -> B (moving -> fixed; 160x192x144, 1 mm,
  affinely pre-aligned, inter-subject T1); labels 1 and 2 (the labels of A are
  ``derived/image_A_160x192x144_seg_resampled_to_image_grid.nii.gz``, see that folder's README);
* ``sct``: ``../shared/data/sct_testing_data`` T2 -> T1w of one subject (intra-subject, multimodal,
  small fields of view of the spinal cord, different grids), with the manual cord masks
  (``t2/t2_seg-manual``, ``t1/t1w_seg-manual``): Dice and HD95 of the cord;
* ``unaligned``: two inter-subject T1 pairs from different sources, storage orientations and fields of
  view: lapirn_oasis A (a subject, OASIS pipeline crop, RAS) -> the ICBM 2009a template (nilearn, MNI
  space), labels 1/2 = grey/white matter (the template's probability maps > 127); and Colin27 (antspy's
  skull-stripped ch2, AAL labels of mricron on its grid) -> MNI152 (antspy, AAL labels), with Colin27
  moved in its header by a fixed rigid motion (14 degrees, 22 mm) so that the pair starts unaligned.
  Dice over the labels of both maps (AAL: mean over its 116 regions; AAL on MNI152 was made from AAL on
  Colin27, so that Dice is not an independent ground truth);
* ``crosscontrast``: BraTS 2013 (deepmedic's copy) FLAIR of patient 1 -> T1c of patient 5, two people and
  two contrasts (``flair`` and ``t1w`` for ours), brain masks (label 1);
* ``conformed``: lapirn_oasis B -> A with A (and its labels) resampled onto FreeSurfer's conformed grid
  (256^3, 1 mm, LIA storage, centred on the image): a brain in a field of view three times its volume,
  stored in another orientation, as many pipelines hand their images over;
* ``readme``: the README's first pair as shipped in ``examples/data/brain`` (Colin27 moved in its header ->
  MNI152, both resampled to 1.5 mm, AAL labels nearest-neighbour; the same caveat as Colin27 above);
* ``synthetic``: the held-out synthetic pairs of ``validate_training.synthetic_pairs()`` (8 pairs at
  96^3, from label maps training never saw), written to temporary NIfTI files with 1 mm voxels and a
  RAS storage order (direction diag(-1, -1, 1): the ``canonical`` layout then gives the network the
  tensors it was trained on); moving = ``image_A``, fixed = ``image_B``. Dice is averaged over the brain
  structures present in both the warped and the fixed label maps (``validate_training._dice``, the
  figure of the training curve); HD95 is averaged over the structures of both label maps before
  warping (a structure lost by the warp has no HD95 and is left out). The table gives means over pairs.

Threads: ``--threads N`` (default: every core this process may run on) sets ``torch.set_num_threads``,
``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` (ITK and ANTs; set before they are imported) and the threads of
the ``elastix affine`` row. ``register()``'s own elastix stage takes every core of the process's
affinity mask whatever ``--threads`` says (run under ``taskset`` to restrict it).

Usage::

    python benchmarks/bench_accuracy.py [--model gradicon-synthbrain-96] [--io-iterations 50]
        [--pairs oasis,sct,synthetic] [--synthetic-count 8] [--skip-ants] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402, RUF100
    LAPIRN,
    REPO,
    SHARED_DATA,
    busy_cores,
    loaded_warning,
    machine,
    save_json,
    table,
)

SCT = SHARED_DATA / "sct_testing_data"
GROUPS = ("oasis", "sct", "unaligned", "crosscontrast", "conformed", "readme", "synthetic")
METHODS = ("identity", "elastix affine", "ANTs Affine", "ANTs SyN", "ours pre-alignment", "ours", "ours + IO",
           "ours default")
DEFAULT_MODEL = "gradicon-synthbrain-96"


@dataclass
class Pair:
    """One registration problem: moving -> fixed, files on disk."""

    group: str
    name: str
    fixed: Path
    moving: Path
    fixed_labels: Path
    moving_labels: Path
    labels: Sequence[int] | None  # None: the structures present in both label maps (synthetic, AAL)
    label_names: dict[int, str] | None = None
    fixed_modality: str = "mri"
    moving_modality: str = "mri"


# ------------------------------------------------------------------------------------------------
# pairs
# ------------------------------------------------------------------------------------------------

def _require(paths: Sequence[Path]) -> None:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        sys.exit("bench_accuracy: missing data file(s): " + ", ".join(missing))


def oasis_pairs() -> list[Pair]:
    images = {k: LAPIRN / f"image_{k}_160x192x144.nii.gz" for k in "AB"}
    segs = {"A": LAPIRN / "derived" / "image_A_160x192x144_seg_resampled_to_image_grid.nii.gz",
            "B": LAPIRN / "image_B_160x192x144_seg.nii.gz"}
    _require([*images.values(), *segs.values()])
    return [Pair("oasis", f"{m}->{f}", images[f], images[m], segs[f], segs[m], (1, 2),
                 {1: "label 1", 2: "label 2"}) for m, f in (("B", "A"), ("A", "B"))]


def sct_pairs() -> list[Pair]:
    files = [SCT / "t1" / "t1w.nii.gz", SCT / "t2" / "t2.nii.gz", SCT / "t1" / "t1w_seg-manual.nii.gz",
             SCT / "t2" / "t2_seg-manual.nii.gz"]
    _require(files)
    return [Pair("sct", "T2->T1w", files[0], files[1], files[2], files[3], (1,), {1: "cord"})]


#: The rigid motion that unaligns Colin27 (header only): rotation about a tilted axis, translation (mm).
UNALIGN_DEGREES, UNALIGN_AXIS, UNALIGN_SHIFT = 14.0, (0.3, 1.0, 0.2), (12.0, -15.0, 11.0)


def _write(image, path: Path) -> Path:
    import SimpleITK as sitk

    sitk.WriteImage(image, str(path), True)
    return path


def unaligned_pairs(work: Path) -> list[Pair]:
    """Inter-subject T1 pairs from different sources (see the module docstring), labels written to ``work``."""
    import SimpleITK as sitk

    icbm = SHARED_DATA / "nilearn_mni152_2009a"
    icbm_t1 = icbm / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    gm, wm = (icbm / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("gm", "wm"))
    colin, colin_aal = SHARED_DATA / "antspy_legacy_data" / "ch2.nii.gz", SHARED_DATA / "mricron_data_debian" / "aal.nii.gz"
    mni, mni_aal = SHARED_DATA / "antspy_legacy_data" / "mni.nii.gz", SHARED_DATA / "antspy_legacy_data" / "mnia.nii.gz"
    oasis_a = LAPIRN / "image_A_160x192x144.nii.gz"
    oasis_a_seg = LAPIRN / "derived" / "image_A_160x192x144_seg_resampled_to_image_grid.nii.gz"
    _require([icbm_t1, gm, wm, colin, colin_aal, mni, mni_aal, oasis_a, oasis_a_seg])

    grey, white = (sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in (gm, wm))
    tissue = np.zeros(grey.shape, np.int16)
    tissue[grey > 127] = 1
    tissue[white > 127] = 2
    tissue_image = sitk.GetImageFromArray(tissue)
    tissue_image.CopyInformation(sitk.ReadImage(str(icbm_t1)))
    icbm_labels = _write(tissue_image, work / "icbm2009a_tissue.nii.gz")

    # Colin27 and its AAL map moved together, in their headers, by one rigid motion
    axis = np.asarray(UNALIGN_AXIS) / np.linalg.norm(UNALIGN_AXIS)
    angle = np.deg2rad(UNALIGN_DEGREES)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    moved = {}
    for name, path, pixel in (("colin27", colin, sitk.sitkFloat32), ("colin27_aal", colin_aal, sitk.sitkInt16)):
        image = sitk.Cast(sitk.ReadImage(str(path)), pixel)
        direction = rotation @ np.asarray(image.GetDirection()).reshape(3, 3)
        image.SetDirection(direction.ravel().tolist())
        image.SetOrigin((rotation @ np.asarray(image.GetOrigin()) + UNALIGN_SHIFT).tolist())
        moved[name] = _write(image, work / f"{name}_moved.nii.gz")
    mni_labels = _write(sitk.Cast(sitk.ReadImage(str(mni_aal)), sitk.sitkInt16), work / "mni152_aal.nii.gz")
    return [Pair("unaligned", "OASIS A->ICBM2009a", icbm_t1, oasis_a, icbm_labels, oasis_a_seg, (1, 2),
                 {1: "GM", 2: "WM"}),
            Pair("unaligned", "Colin27->MNI152", mni, moved["colin27"], mni_labels, moved["colin27_aal"], None)]


def readme_pairs() -> list[Pair]:
    """The README's first pair as shipped (``examples/data/brain``): Colin27 -> MNI152 at 1.5 mm, AAL labels."""
    brain = REPO / "examples" / "data" / "brain"
    files = [brain / "mni152.nii.gz", brain / "colin27.nii.gz", brain / "mni152_aal.nii.gz",
             brain / "colin27_aal.nii.gz"]
    _require(files)
    return [Pair("readme", "README Colin27->MNI152", *files, None)]


def crosscontrast_pairs() -> list[Pair]:
    """FLAIR of one BraTS patient -> T1c of another, brain masks."""
    root = SHARED_DATA / "deepmedic_brats2013"
    moving, fixed = root / "test" / "brats_2013_pat0001_1", root / "train" / "brats_2013_pat0005_1"
    files = [fixed / "T1c_subtrMeanDivStd.nii.gz", moving / "Flair_subtrMeanDivStd.nii.gz",
             fixed / "brainmask.nii.gz", moving / "brainmask.nii.gz"]
    _require(files)
    return [Pair("crosscontrast", "FLAIR->T1c", *files, (1,), {1: "brain"}, fixed_modality="t1w",
                 moving_modality="flair")]


#: FreeSurfer's conformed grid: 256^3, 1 mm, LIA (index axes to left, inferior, anterior; WORLD is LPS).
CONFORMED_SIZE, CONFORMED_DIRECTION = 256, np.column_stack([[1.0, 0, 0], [0, 0, -1.0], [0, -1.0, 0]])


def conformed_pairs(work: Path) -> list[Pair]:
    """lapirn_oasis B -> A, with A and its labels resampled onto a conformed grid centred on A."""
    import SimpleITK as sitk

    files = [LAPIRN / "image_A_160x192x144.nii.gz",
             LAPIRN / "derived" / "image_A_160x192x144_seg_resampled_to_image_grid.nii.gz",
             LAPIRN / "image_B_160x192x144.nii.gz", LAPIRN / "image_B_160x192x144_seg.nii.gz"]
    _require(files)
    image = sitk.ReadImage(str(files[0]), sitk.sitkFloat32)
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    grid = sitk.Image([CONFORMED_SIZE] * 3, sitk.sitkUInt8)
    grid.SetSpacing([1.0] * 3)
    grid.SetDirection(CONFORMED_DIRECTION.ravel().tolist())
    grid.SetOrigin((centre - CONFORMED_DIRECTION @ np.full(3, (CONFORMED_SIZE - 1) / 2)).tolist())
    conformed = {}
    for name, path, interpolator in (("A", files[0], sitk.sitkLinear), ("A_seg", files[1], sitk.sitkNearestNeighbor)):
        source = sitk.ReadImage(str(path))
        out = sitk.Resample(source, grid, sitk.Transform(), interpolator, 0.0, source.GetPixelID())
        conformed[name] = _write(out, work / f"oasis_{name}_conformed.nii.gz")
    return [Pair("conformed", "B->A conformed", conformed["A"], files[2], conformed["A_seg"], files[3], (1, 2),
                 {1: "label 1", 2: "label 2"})]


def synthetic_files(work: Path, count: int, maps: Path) -> list[Pair]:
    """The held-out synthetic pairs of ``validate_training``, as NIfTI files (1 mm, RAS storage)."""
    import itk
    from validate_training import synthetic_pairs

    pairs = []
    for i, pair in enumerate(synthetic_pairs(maps, count)):
        paths = {}
        for key in ("image_A", "image_B", "seg_A", "seg_B"):
            array = pair[key][0].numpy()
            array = array.astype(np.int16) if key.startswith("seg") else array.astype(np.float32)
            image = itk.image_from_array(np.ascontiguousarray(array))
            image.SetSpacing([1.0, 1.0, 1.0])
            image.SetOrigin([0.0, 0.0, 0.0])
            image.SetDirection(itk.matrix_from_array(np.diag([-1.0, -1.0, 1.0])))
            paths[key] = work / f"synthetic_{i}_{key}.nii.gz"
            itk.imwrite(image, str(paths[key]))
        pairs.append(Pair("synthetic", f"synthetic {i}", paths["image_B"], paths["image_A"], paths["seg_B"],
                          paths["seg_A"], None))
    return pairs


# ------------------------------------------------------------------------------------------------
# methods: each returns the warped moving labels on the fixed grid, % negative Jacobian, seconds
# ------------------------------------------------------------------------------------------------

#: How the moving labels are warped for scoring: the same for every method.
LABEL_INTERPOLATIONS = ("nearest", "label")


def warp_labels(labels, reference, transform, interpolation: str):
    """``labels`` on ``reference``'s grid through ``transform`` (fixed -> moving points) by the package's one
    resampler, :func:`itk_gradicon.spatial.resample.resample_image`: ``nearest`` (ITK's nearest-neighbour
    interpolator) or ``label`` (ANTs' GenericLabel)."""
    from itk_gradicon.spatial.resample import resample_image

    return resample_image(labels, reference, transform, interpolation=interpolation)


def _negative_jacobian_pct(transform, fixed) -> dict[str, float]:
    from itk_gradicon.io.itk_bridge import grid_of
    from itk_gradicon.evaluation.metrics import folding

    return folding(transform, grid_of(fixed))


def run_identity(data, ctx):
    import itk

    return itk.IdentityTransform[itk.D, 3].New(), {"percent_negative": 0.0}, 0.0, {}


def run_affine(data, ctx):
    from itk_gradicon.pipeline.affine import elastix_affine
    from itk_gradicon.spatial.transforms import affine_to_itk

    t = time.perf_counter()
    matrix = elastix_affine(data["fixed"], data["moving"], threads=ctx["threads"])
    seconds = time.perf_counter() - t
    folds = {"percent_negative": 0.0 if np.linalg.det(matrix[:3, :3]) > 0 else 100.0}
    return affine_to_itk(matrix), folds, seconds, {"matrix": matrix.tolist()}


def run_ants_affine(data, ctx):
    return run_ants(data, ctx, kind="Affine")


def run_prealignment(data, ctx):
    from itk_gradicon.pipeline.affine import prealign
    from itk_gradicon.spatial.transforms import affine_to_itk

    t = time.perf_counter()
    found = prealign(data["fixed"], data["moving"], transform="affine", threads=ctx["threads"])
    seconds = time.perf_counter() - t
    return affine_to_itk(found.matrix), {"percent_negative": 0.0}, seconds, {
        "matrix": found.matrix.tolist(), "kind": found.transform, "start": found.start,
        "rejected": list(found.rejected)}


def run_ants(data, ctx, kind: str = "SyN"):
    import ants
    import itk

    from itk_gradicon.spatial.transforms import compose_transforms

    pair: Pair = data["pair"]
    fixed, moving = ants.image_read(str(pair.fixed)), ants.image_read(str(pair.moving))
    prefix = ctx["work"] / f"ants_{kind}_{pair.group}_{pair.name.replace(' ', '_').replace('>', '')}_"
    t = time.perf_counter()
    reg = ants.registration(fixed, moving, type_of_transform=kind, outprefix=str(prefix))
    seconds = time.perf_counter() - t
    transform = compose_transforms(list(reg["fwdtransforms"]), dimension=3)
    folds = _negative_jacobian_pct(transform, data["fixed"])
    # ANTs' own label warp, for the record: the "label" interpolation of the composed transform should equal it
    warped = ants.apply_transforms(fixed=fixed, moving=ants.image_read(str(pair.moving_labels)),
                                   transformlist=reg["fwdtransforms"], interpolator="genericLabel")
    # ANTsPy's numpy() is in index order (i, j, k); ITK's arrays are (k, j, i)
    image = itk.image_from_array(np.ascontiguousarray(np.rint(warped.numpy().T)).astype(np.int16))
    image.CopyInformation(data["fixed_labels"])
    from itk_gradicon.evaluation.metrics import label_overlap

    own = label_overlap(data["fixed_labels"], image, label_values=data["structures"], with_hd95=False)["mean_dice"]
    return transform, folds, seconds, {"fwdtransforms": [Path(p).name for p in reg["fwdtransforms"]],
                                       "mean_dice_ants_generic_label": own}


def _run_ours(data, ctx, io_iterations: int | None):
    """``io_iterations=None``: the model's recommendation (the default pipeline)."""
    from itk_gradicon import register

    pair: Pair = data["pair"]
    t = time.perf_counter()
    result = register(data["fixed"], data["moving"], model=ctx["model"], io_iterations=io_iterations,
                      fixed_modality=pair.fixed_modality, moving_modality=pair.moving_modality, device=ctx["device"],
                      compute_inverse=True)
    seconds = time.perf_counter() - t
    transform = result.forward_transform
    folds = _negative_jacobian_pct(transform, data["fixed"])
    extra = {"timings": {k: round(v, 3) for k, v in result.timings.items()}, "messages": list(result.messages)}
    if result.io_history:
        extra["io_last_losses"] = result.io_history[-1]
    return transform, folds, seconds, extra


def run_ours(data, ctx):
    return _run_ours(data, ctx, 0)


def run_ours_io(data, ctx):
    return _run_ours(data, ctx, ctx["io_iterations"])


def run_ours_default(data, ctx):
    return _run_ours(data, ctx, None)


def budget_runner(steps: int):
    """``ours IO N``: the default pipeline with ``N`` refinement steps."""
    return lambda data, ctx: _run_ours(data, ctx, steps)


def warm_up(ctx, methods: Sequence[str]) -> None:
    """Pay the one-off costs outside the timings: ITK loads its modules (elastix's included) on first use,
    torch sets itself up on the first forward pass. A small blob pair goes through each timed method."""
    import itk

    from itk_gradicon.pipeline.affine import elastix_affine

    grid = np.mgrid[:32, :32, :32].astype(np.float32)
    blobs = []
    for shift in (0.0, 2.0):
        array = np.exp(-((grid - 16.0 - shift * np.array([1.0, 0.5, 0.0])[:, None, None, None]) ** 2).sum(0) / 50.0)
        blobs.append(itk.image_from_array(np.ascontiguousarray(array, dtype=np.float32)))
    if "elastix affine" in methods or any(m.startswith("ours") for m in methods):
        # two resolutions: the pyramid's smoothing filters load on first use too (a first oasis
        # registration took 52 s instead of 4 s after a one-resolution warm-up)
        elastix_affine(blobs[0], blobs[1], iterations=4, resolutions=2, threads=ctx["threads"])
    if "ANTs SyN" in methods or "ANTs Affine" in methods:
        importlib.import_module("ants")  # the import alone takes seconds
    if any(m.startswith("ours") for m in methods):
        from itk_gradicon import register

        register(blobs[0], blobs[1], model=ctx["model"], io_iterations=1 if len(methods) > 1 else 0,
                 affine="none", fixed_modality="mri", moving_modality="mri", device=ctx["device"])


RUNNERS = {"identity": run_identity, "elastix affine": run_affine, "ANTs Affine": run_ants_affine,
           "ANTs SyN": run_ants, "ours pre-alignment": run_prealignment, "ours": run_ours, "ours + IO": run_ours_io,
           "ours default": run_ours_default}


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------

def _structures(pair: Pair, data) -> list[int]:
    import itk

    from itk_gradicon.evaluation.metrics import labels_present

    if pair.labels is not None:
        return list(pair.labels)
    fixed = set(labels_present(itk.array_view_from_image(data["fixed_labels"])))
    moving = set(labels_present(itk.array_view_from_image(data["moving_labels"])))
    return sorted(fixed & moving)


def evaluate(pair: Pair, method: str, data, ctx) -> dict[str, object]:
    import itk
    import torch

    from itk_gradicon.evaluation.metrics import label_overlap

    transform, folds, seconds, extra = RUNNERS[method](data, ctx)
    warps = {how: warp_labels(data["moving_labels"], data["fixed_labels"], transform, how)
             for how in LABEL_INTERPOLATIONS}
    primary = ctx["label_interpolation"]
    warped = warps[primary]
    overlap = label_overlap(data["fixed_labels"], warped, label_values=data["structures"])
    other = {how: label_overlap(data["fixed_labels"], w, label_values=data["structures"],
                                with_hd95=False)["mean_dice"] for how, w in warps.items()}
    record: dict[str, object] = {
        "seconds": seconds,
        "label_interpolation": primary,
        "dice": overlap["dice"], "mean_dice": overlap["mean_dice"],
        "mean_dice_by_interpolation": other,
        "hd95_mm": overlap["hd95_mm"], "mean_hd95_mm": overlap["mean_hd95_mm"],
        "percent_negative_jacobian": folds["percent_negative"],
        "jacobian": {k: v for k, v in folds.items() if k != "percent_negative"},
        **extra,
    }
    if pair.group == "synthetic":  # validate_training's figure (structures in both after warping)
        from validate_training import _dice

        a = torch.from_numpy(np.asarray(itk.array_view_from_image(warped)).astype(np.int64))
        b = torch.from_numpy(np.asarray(itk.array_view_from_image(data["fixed_labels"])).astype(np.int64))
        record["mean_dice"] = _dice(a, b)
        record["mean_dice_all_structures"] = overlap["mean_dice"]
    return record


def load_pair(pair: Pair):
    import itk

    data = {"pair": pair,
            "fixed": itk.imread(str(pair.fixed), itk.F), "moving": itk.imread(str(pair.moving), itk.F),
            "fixed_labels": itk.imread(str(pair.fixed_labels), itk.SS),
            "moving_labels": itk.imread(str(pair.moving_labels), itk.SS)}
    from itk_gradicon.io.itk_bridge import grid_of

    if not grid_of(data["fixed_labels"]).matches(grid_of(data["fixed"])):
        sys.exit(f"bench_accuracy: {pair.fixed_labels} is not on the grid of {pair.fixed}")
    data["structures"] = _structures(pair, data)
    return data


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------

def _f(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else None


def labelled_table(pairs: list[Pair], results, methods: Sequence[str]) -> str:
    """One row per (pair, method): Dice and HD95 of each label, folds, seconds."""
    names = pairs[0].label_names or {}
    labels = list(pairs[0].labels)
    header = (["pair"] if len(pairs) > 1 else []) + ["method"]
    header += [f"Dice {names.get(v, v)}" for v in labels] + [f"HD95 {names.get(v, v)} mm" for v in labels]
    header += ["neg. Jacobian %", "time s"]
    rows = []
    for pair in pairs:
        for method in methods:
            r = results[pair.name].get(method)
            row = [pair.name] if len(pairs) > 1 else []
            if r is None or "error" in r:
                rows.append(row + [method] + ["failed"] * (len(header) - len(row) - 1))
                continue
            row += [method] + [_f(r["dice"][str(v)], 3) for v in labels]
            row += [_f(r["hd95_mm"][str(v)], 2) for v in labels]
            row += [_f(r["percent_negative_jacobian"], 3), _f(r["seconds"], 1)]
            rows.append(row)
    return table(rows, header)


def summary_table(pairs: list[Pair], results, methods: Sequence[str]) -> str:
    """One row per (pair, method): mean Dice and HD95 over the pair's structures, folds, seconds, ranked
    within each pair by time (Dice against time)."""
    header = ["pair", "method", "mean Dice", "mean HD95 mm", "neg. Jacobian %", "time s"]
    rows = []
    for pair in pairs:
        done = [(m, results[pair.name].get(m)) for m in methods]
        for method, r in sorted(done, key=lambda mr: (mr[1] is None or "error" in mr[1], (mr[1] or {}).get("seconds", 0))):
            if r is None or "error" in r:
                rows.append([pair.name, method] + ["failed"] * 4)
                continue
            rows.append([pair.name, method, _f(r["mean_dice"], 3), _f(r["mean_hd95_mm"], 2),
                         _f(r["percent_negative_jacobian"], 3), _f(r["seconds"], 1)])
    return table(rows, header)


def synthetic_table(pairs: list[Pair], results, methods: Sequence[str]) -> str:
    """One row per method: means over the pairs."""
    header = ["method", "pairs", "mean Dice", "min Dice", "mean HD95 mm", "neg. Jacobian %", "time s"]
    rows = []
    for method in methods:
        done = [results[p.name][method] for p in pairs if "error" not in results[p.name].get(method, {"error": 1})]
        if not done:
            rows.append([method, 0] + ["failed"] * 5)
            continue
        dice = [r["mean_dice"] for r in done]
        rows.append([method, len(done), _f(_mean(dice), 3), _f(min(dice), 3),
                     _f(_mean([r["mean_hd95_mm"] for r in done]), 2),
                     _f(_mean([r["percent_negative_jacobian"] for r in done]), 3),
                     _f(_mean([r["seconds"] for r in done]), 1)])
    return table(rows, header)


# ------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model name or file for the 'ours' rows")
    parser.add_argument("--io-iterations", type=int, default=50, help="instance-optimisation steps of 'ours + IO'")
    parser.add_argument("--pairs", default=",".join(GROUPS), help=f"pair groups, comma-separated ({', '.join(GROUPS)})")
    parser.add_argument("--synthetic-count", type=int, default=8, help="synthetic pairs (the first N of the 8)")
    parser.add_argument("--maps", type=Path, default=None, help="held-out label maps of the synthetic pairs "
                        "(default: validate_training's, examples/lists/synthseg_validation.txt)")
    parser.add_argument("--methods", default=",".join(METHODS), help="methods, comma-separated")
    parser.add_argument("--label-interpolation", choices=LABEL_INTERPOLATIONS, default="nearest",
                        help="how every method's moving labels are warped for the tables (the JSON holds the mean "
                             "Dice of both): nearest neighbour, or ANTs' GenericLabel (label)")
    parser.add_argument("--io-budgets", default="", help="also run 'ours IO N' for each N of this comma-separated "
                        "list (e.g. 0,10,25,50,100): the default pipeline with N refinement steps")
    parser.add_argument("--skip-ants", action="store_true", help="leave out ANTs SyN (the slowest row)")
    parser.add_argument("--threads", type=int, default=None, help="threads of torch, ITK, ANTs and elastix "
                        "(default: every core this process may run on)")
    parser.add_argument("--device", default="cpu", help="device of 'ours' (cpu, cuda, auto)")
    parser.add_argument("--json", help="also write every number here")
    args = parser.parse_args()

    groups = [g.strip() for g in args.pairs.split(",") if g.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [g for g in groups if g not in GROUPS] + [m for m in methods if m not in METHODS]
    if unknown or not groups or not methods:
        parser.error(f"unknown or no pair group / method: {unknown}; groups: {', '.join(GROUPS)}; "
                     f"methods: {', '.join(METHODS)}")
    budgets = [int(b) for b in args.io_budgets.split(",") if b.strip()]
    for steps in budgets:
        RUNNERS[f"ours IO {steps}"] = budget_runner(steps)
        methods.append(f"ours IO {steps}")
    if args.skip_ants:
        methods = [m for m in methods if not m.startswith("ANTs")]
    if args.io_iterations < 1:
        methods = [m for m in methods if m != "ours + IO"]
    if not SHARED_DATA.is_dir():
        sys.exit(f"bench_accuracy: the shared data folder {SHARED_DATA} does not exist; this benchmark needs "
                 "the real images beside the project (../shared/data) or $ITK_GRADICON_SHARED_DATA")

    threads = args.threads or len(os.sched_getaffinity(0))
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)  # before ITK and ANTs are imported
    import itk
    import torch

    torch.set_num_threads(threads)
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)

    from itk_gradicon.errors import GradiconError
    from itk_gradicon.models import load_model

    model = None
    if any(m.startswith("ours") for m in methods):
        t = time.perf_counter()
        try:
            model = load_model(args.model)
        except GradiconError as err:
            sys.exit(f"bench_accuracy: cannot load the model {args.model!r}: {err}\n"
                     "give a model file with --model FILE")
        model_seconds = time.perf_counter() - t
    busy = busy_cores()
    info = machine()

    with tempfile.TemporaryDirectory(prefix="bench_accuracy_") as tmp:
        work = Path(tmp)
        ctx = {"threads": threads, "model": model, "io_iterations": args.io_iterations, "device": args.device,
               "work": work, "label_interpolation": args.label_interpolation}
        pairs: dict[str, list[Pair]] = {}
        if "oasis" in groups:
            pairs["oasis"] = oasis_pairs()
        if "sct" in groups:
            pairs["sct"] = sct_pairs()
        if "unaligned" in groups:
            pairs["unaligned"] = unaligned_pairs(work)
        if "crosscontrast" in groups:
            pairs["crosscontrast"] = crosscontrast_pairs()
        if "conformed" in groups:
            pairs["conformed"] = conformed_pairs(work)
        if "readme" in groups:
            pairs["readme"] = readme_pairs()
        if "synthetic" in groups:
            from validate_training import VALIDATION_MAPS

            t = time.perf_counter()
            pairs["synthetic"] = synthetic_files(work, args.synthetic_count, args.maps or VALIDATION_MAPS)
            print(f"synthesised {len(pairs['synthetic'])} pairs in {time.perf_counter() - t:.1f} s", flush=True)

        t = time.perf_counter()
        warm_up(ctx, methods)
        print(f"warm-up (module loading, first passes) {time.perf_counter() - t:.1f} s", flush=True)

        results: dict[str, dict[str, dict[str, object]]] = {}
        for group, members in pairs.items():
            for pair in members:
                data = load_pair(pair)
                results[pair.name] = {}
                for method in methods:
                    try:
                        record = evaluate(pair, method, data, ctx)
                    except Exception as err:  # noqa: BLE001 (one failing method must not lose the others' numbers)
                        traceback.print_exc()
                        record = {"error": f"{type(err).__name__}: {err}"}
                        print(f"{pair.name:12s} {method:15s} FAILED: {record['error']}", flush=True)
                    else:
                        print(f"{pair.name:12s} {method:15s} Dice {record['mean_dice']:.3f}  HD95 "
                              f"{_f(record['mean_hd95_mm'], 2)} mm  neg. Jacobian "
                              f"{record['percent_negative_jacobian']:.3f} %  {record['seconds']:.1f} s", flush=True)
                    results[pair.name][method] = record

    print()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, GPU: {info['gpu'] or 'none'}; "
          f"{threads} threads")
    print(f"cores kept busy by other programs before the run: {busy:.2f}")
    print(f"labels warped for every method by {args.label_interpolation} interpolation "
          "(the JSON holds the mean Dice of both, mean_dice_by_interpolation)")
    warning = loaded_warning([busy])
    if warning:
        print(warning)
    if model is not None:
        print(f"model: {model.name} ({model.source}, {tuple(model.architecture.input_shape)}, "
              f"{int(model.provenance.get('steps', 0))} training steps)"
              + (f"; IO: {args.io_iterations} steps" if "ours + IO" in methods else ""))
    titles = {"oasis": "lapirn_oasis (moving->fixed), labels 1 and 2",
              "sct": "sct_testing_data T2 -> T1w (multimodal, intra-subject), manual cord masks",
              "unaligned": "unaligned inter-subject T1 pairs from different sources (means over each pair's "
                           "structures; by time)",
              "crosscontrast": "BraTS FLAIR (patient 1) -> T1c (patient 5), brain masks (by time)",
              "conformed": "lapirn_oasis B -> A, A on FreeSurfer's conformed grid (256^3, LIA), labels 1 and 2",
              "readme": "the README's first pair (examples/data/brain: Colin27 -> MNI152, 1.5 mm, AAL; by time)",
              "synthetic": "held-out synthetic pairs (96^3, 1 mm), means over pairs; Dice over the structures "
                           "in both maps"}
    for group, members in pairs.items():
        print()
        print(f"### {titles[group]}")
        print()
        if group == "synthetic":
            print(synthetic_table(members, results, methods))
        elif group in ("unaligned", "crosscontrast", "readme"):
            print(summary_table(members, results, methods))
        else:
            print(labelled_table(members, results, methods))
            print()
            print(summary_table(members, results, methods))

    record = {"machine": info, "busy_cores": busy, "threads": threads, "methods": methods,
              "label_interpolation": args.label_interpolation,
              "io_iterations": args.io_iterations,
              "pairs": {p.name: {"group": p.group, "fixed": str(p.fixed), "moving": str(p.moving),
                                 "structures": list(p.labels) if p.labels else None}
                        for members in pairs.values() for p in members},
              "results": results}
    if model is not None:
        record["model"] = {"spec": args.model, "name": model.name, "source": str(model.source),
                           "sha256": model.sha256, "input_shape": list(model.architecture.input_shape),
                           "steps": int(model.provenance.get("steps", 0)), "load_seconds": model_seconds}
    for package in ("antspyx", "itk", "itk-elastix"):
        try:
            record.setdefault("versions", {})[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            record.setdefault("versions", {})[package] = None
    save_json(args.json, record)


if __name__ == "__main__":
    main()
