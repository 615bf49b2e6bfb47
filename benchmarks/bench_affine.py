"""Affine pre-alignment against known answers: real brains moved by random affines.

For each real brain image and each random affine ``T`` (rotation up to ``--rotation`` degrees about a
random axis, translation up to ``--translation`` mm, scales within ``1 +- --scale``, small shears), the
moving image is the brain resampled through ``T`` (so the true fixed -> moving map is ``T``), and every
method estimates it. The error is the distance, in mm, between the true and the estimated moving
position of every voxel of the fixed brain (voxels above 10% of the maximum intensity): mean and 95th
percentile. Methods:

* ``elastix`` with :func:`itk_gradicon.pipeline.affine.elastix_affine`'s settings given by ``--elastix NAME=...``
  (several allowed; ``default`` is the function's current defaults);
* ``ants``: antspyx ``ants.registration(type_of_transform="Affine")`` (its defaults), if installed.

``--intersubject N`` adds the inter-subject case: lapirn_oasis B (with its 2 tissue labels) moved by
``N`` random affines is registered to A; the score is the Dice of the labels after resampling B's labels
through each estimated affine (nearest neighbour), as a user would judge a pre-alignment of two
different brains (there is no true affine between two subjects). Identity, before the random motion,
is the pair as shipped (already roughly aligned).

Usage::

    python benchmarks/bench_affine.py [--images oasis_A,mni] [--cases 3] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, machine  # noqa: E402

IMAGES = {
    "oasis_A": SHARED_DATA / "lapirn_oasis" / "image_A_160x192x144.nii.gz",
    "oasis_B": SHARED_DATA / "lapirn_oasis" / "image_B_160x192x144.nii.gz",
    "mni": SHARED_DATA / "antspy_legacy_data" / "mni.nii.gz",
    "chris_t1": SHARED_DATA / "niivue_demo_images" / "chris_t1.nii.gz",
}
SETTINGS = {
    "default": {},
    "mass": {"initialization": "mass"},
    "mass1000x8192": {"initialization": "mass", "iterations": 1000, "samples": 8192},
    "mass512x4096": {"initialization": "mass", "iterations": 512, "samples": 4096},
}


def random_affine(rng: np.random.Generator, centre: np.ndarray, rotation: float, translation: float,
                  scale: float) -> np.ndarray:
    """A homogeneous fixed -> moving matrix about ``centre`` (WORLD mm)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-rotation, rotation))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    linear = rot @ np.diag(rng.uniform(1 - scale, 1 + scale, 3)) @ (np.eye(3) + rng.uniform(-0.03, 0.03, (3, 3)))
    shift = rng.uniform(-translation, translation, 3)
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = centre + shift - linear @ centre
    return out


def resample(image, matrix: np.ndarray, *, reference=None, nearest: bool = False):
    """``image`` moved so that point x of ``reference``'s grid (default: ``image``'s own) shows what
    ``image`` had at ``matrix @ x``; linear, or nearest neighbour for label maps."""
    import itk

    transform = itk.AffineTransform[itk.D, 3].New()
    transform.SetMatrix(itk.matrix_from_array(matrix[:3, :3].copy()))
    transform.SetTranslation([float(v) for v in matrix[:3, 3]])
    extra = {"interpolator": itk.NearestNeighborInterpolateImageFunction.New(image)} if nearest else {}
    return itk.resample_image_filter(image, transform=transform, use_reference_image=True,
                                     reference_image=image if reference is None else reference,
                                     default_pixel_value=0, **extra)


def estimators(args, fixed, moving) -> dict:
    """``{method: function returning the fixed -> moving matrix}``: each elastix setting, then ANTs."""
    from itk_gradicon.pipeline.affine import elastix_affine

    methods = {s: (lambda s=s: elastix_affine(fixed, moving, threads=args.threads, **SETTINGS[s]))
               for s in args.settings.split(",")}
    if not args.skip_ants:
        methods["ants"] = lambda: ants_affine(fixed, moving)
    return methods


def timed(run):
    start = time.perf_counter()
    value = run()
    return value, time.perf_counter() - start


def print_table(rows: list, header: str, cells) -> None:
    """One markdown row per method (in order of appearance): ``cells(rows of that method)``."""
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for method in dict.fromkeys(r["method"] for r in rows):
        print(f"| {method} | " + " | ".join(cells([r for r in rows if r["method"] == method])) + " |")


def brain_points(image) -> np.ndarray:
    import itk

    array = itk.array_from_image(image)
    index = np.argwhere(array > 0.1 * array.max())[:, ::-1].astype(np.float64)  # (i, j, k)
    index = index[:: max(1, len(index) // 20000)]
    direction = itk.array_from_matrix(image.GetDirection())
    spacing, origin = np.asarray(image.GetSpacing()), np.asarray(image.GetOrigin())
    return origin + (index * spacing) @ direction.T


def error_mm(points: np.ndarray, truth: np.ndarray, estimate: np.ndarray) -> tuple:
    moved_true = points @ truth[:3, :3].T + truth[:3, 3]
    moved_est = points @ estimate[:3, :3].T + estimate[:3, 3]
    distance = np.linalg.norm(moved_true - moved_est, axis=1)
    return float(distance.mean()), float(np.percentile(distance, 95))


def ants_affine(fixed, moving) -> np.ndarray:
    """antspyx Affine (defaults); its forward transform maps fixed points to moving points (LPS)."""
    import ants
    import itk

    with tempfile.TemporaryDirectory() as folder:
        f, m = Path(folder) / "f.nii.gz", Path(folder) / "m.nii.gz"
        itk.imwrite(fixed, str(f))
        itk.imwrite(moving, str(m))
        result = ants.registration(ants.image_read(str(f)), ants.image_read(str(m)), type_of_transform="Affine")
        transform = ants.read_transform(result["fwdtransforms"][0])
        params = np.asarray(transform.parameters, np.float64)
        centre = np.asarray(transform.fixed_parameters, np.float64)
    linear = params[:9].reshape(3, 3)
    translation = params[9:12]
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = translation + centre - linear @ centre
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default="oasis_A,mni")
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--rotation", type=float, default=15.0)
    parser.add_argument("--translation", type=float, default=15.0)
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--skip-ants", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--intersubject", type=int, default=0,
                        help="random affine motions of the lapirn_oasis B -> A inter-subject case (0: none)")
    args = parser.parse_args()
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    import itk

    rows = []
    for name in [n for n in args.images.split(",") if n]:
        fixed = itk.imread(str(IMAGES[name]), itk.F)
        points = brain_points(fixed)
        centre = points.mean(axis=0)
        rng = np.random.default_rng(sum(map(ord, name)))  # the same cases in every run
        for case in range(args.cases):
            # the moving image shows at x what the fixed image has at T(x), so the fixed -> moving map
            # that a registration must find (moving(A(x)) = fixed(x)) is A = T^-1
            motion = random_affine(rng, centre, args.rotation, args.translation, args.scale)
            moving = resample(fixed, motion)
            truth = np.linalg.inv(motion)
            for method, run in estimators(args, fixed, moving).items():
                estimate, seconds = timed(run)
                mean, p95 = error_mm(points, truth, estimate)
                rows.append({"image": name, "case": case, "method": method, "mean_mm": mean, "p95_mm": p95,
                             "seconds": seconds})
                print(json.dumps(rows[-1]), flush=True)
    if args.intersubject:
        rows += intersubject(args)
    print(f"\nmachine: {json.dumps(machine())}\n")
    print_table([r for r in rows if "mean_mm" in r],
                "| method | mean error (mm) | worst case mean (mm) | 95th percentile (mm) | seconds |",
                lambda mine: [f"{np.mean([r['mean_mm'] for r in mine]):.2f}", f"{max(r['mean_mm'] for r in mine):.2f}",
                              f"{np.mean([r['p95_mm'] for r in mine]):.2f}", f"{np.mean([r['seconds'] for r in mine]):.1f}"])
    paired = [r for r in rows if "dice" in r]
    if paired:
        print("\nlapirn_oasis B moved by random affines -> A: Dice of labels 1 / 2 after the affine (mean over motions)\n")
        print_table(paired, "| method | Dice label 1 | Dice label 2 | worst mean Dice | seconds |",
                    lambda mine: [f"{np.mean([r['dice'][0] for r in mine]):.3f}",
                                  f"{np.mean([r['dice'][1] for r in mine]):.3f}",
                                  f"{min(np.mean(r['dice']) for r in mine):.3f}",
                                  f"{np.mean([r['seconds'] for r in mine]):.1f}"])
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))


def _dice(a, b) -> list:
    import itk

    x, y = itk.array_view_from_image(a), itk.array_view_from_image(b)
    return [float(2 * np.sum((x == k) & (y == k)) / max(np.sum(x == k) + np.sum(y == k), 1)) for k in (1, 2)]


def intersubject(args) -> list:
    """lapirn_oasis B (moved by random affines) -> A, scored by the Dice of the tissue labels."""
    import itk

    folder = SHARED_DATA / "lapirn_oasis"
    fixed = itk.imread(str(folder / "image_A_160x192x144.nii.gz"), itk.F)
    fixed_labels = itk.imread(str(folder / "derived" / "image_A_160x192x144_seg_resampled_to_image_grid.nii.gz"),
                              itk.SS)
    moving0 = itk.imread(str(folder / "image_B_160x192x144.nii.gz"), itk.F)
    moving_labels0 = itk.imread(str(folder / "image_B_160x192x144_seg.nii.gz"), itk.SS)
    centre = brain_points(moving0).mean(axis=0)
    rng = np.random.default_rng(7)
    rows = [{"image": "oasis B->A", "case": -1, "method": "identity (as shipped)",
             "dice": _dice(moving_labels0, fixed_labels), "seconds": 0.0}]
    print(json.dumps(rows[-1]), flush=True)
    for case in range(args.intersubject):
        motion = random_affine(rng, centre, args.rotation, args.translation, args.scale)
        moving = resample(moving0, motion)
        moving_labels = resample(moving_labels0, motion, nearest=True)
        methods = {**estimators(args, fixed, moving), "identity": lambda: np.eye(4)}
        for method, run in methods.items():
            estimate, seconds = timed(run)
            warped = resample(moving_labels, estimate, reference=fixed_labels, nearest=True)
            rows.append({"image": "oasis B->A", "case": case, "method": method,
                         "dice": _dice(warped, fixed_labels), "seconds": seconds})
            print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
