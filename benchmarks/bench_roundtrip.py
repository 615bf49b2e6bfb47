"""How far the written forward and inverse transforms are from inverting each other, in millimetres.

``gradicon register`` writes a fixed -> moving transform (on the fixed grid) and, with
``--out-inverse-transform``, a moving -> fixed one (on the moving grid). This benchmark registers one pair per
``--io-iterations`` setting (a child process each), then carries points of the fixed image's labelled region
(``--fixed-labels``, label > 0; a seeded random subset) fixed -> moving -> fixed with SimpleITK's reader of the
two ``.h5`` files and reports the distance from where each point started: mean, median, 95th percentile and
maximum, and how many points the forward transform sends outside the moving image's grid (where the inverse,
stored on that grid, is the identity).

Usage::

    python benchmarks/bench_roundtrip.py                       # lapirn_oasis B -> A, default and --io-iterations 0
    python benchmarks/bench_roundtrip.py --io-iterations default,0,50 --points 20000 --json out.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LAPIRN, executable, machine, run_child, save_json, table  # noqa: E402


def round_trip(fixed_path: Path, moving_path: Path, labels_path: Path, forward: Path, inverse: Path, *,
               points: int, seed: int) -> dict:
    """Distances (mm) of fixed -> moving -> fixed round trips of ``points`` voxel centres inside the labels."""
    import SimpleITK as sitk

    fixed, moving = sitk.ReadImage(str(fixed_path)), sitk.ReadImage(str(moving_path))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(labels_path)))  # a copy: a view would outlive its image
    to_moving, back = sitk.ReadTransform(str(forward)), sitk.ReadTransform(str(inverse))
    inside = np.argwhere(labels > 0)
    chosen = inside[np.random.default_rng(seed).choice(len(inside), min(points, len(inside)), replace=False)]
    size = np.array(moving.GetSize())
    distances, outside = [], 0
    for k, j, i in chosen:
        start = fixed.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))
        there = to_moving.TransformPoint(start)
        index = np.array(moving.TransformPhysicalPointToContinuousIndex(there))
        outside += int(np.any(index < -0.5) or np.any(index > size - 0.5))
        distances.append(float(np.linalg.norm(np.subtract(back.TransformPoint(there), start))))
    d = np.array(distances)
    return {"points": len(d), "mean_mm": float(d.mean()), "median_mm": float(np.median(d)),
            "p95_mm": float(np.percentile(d, 95)), "max_mm": float(d.max()), "outside_moving_grid": outside}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixed", type=Path, default=LAPIRN / "image_A_160x192x144.nii.gz")
    parser.add_argument("--moving", type=Path, default=LAPIRN / "image_B_160x192x144.nii.gz")
    parser.add_argument("--fixed-labels", type=Path, default=LAPIRN / "image_A_160x192x144_seg.nii.gz")
    parser.add_argument("--model", default="gradicon-synthbrain-96")
    parser.add_argument("--io-iterations", default="default,0",
                        help="comma-separated: 'default' (the model's recommendation) or a number of steps")
    parser.add_argument("--points", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for setting in [s.strip() for s in args.io_iterations.split(",") if s.strip()]:
            forward, inverse = Path(tmp) / f"forward_{setting}.h5", Path(tmp) / f"inverse_{setting}.h5"
            argv = [executable("gradicon"), "register", "--model", args.model, "--fixed", str(args.fixed),
                    "--moving", str(args.moving), "--out-transform", str(forward),
                    "--out-inverse-transform", str(inverse)]
            if setting != "default":
                argv += ["--io-iterations", setting]
            run = run_child(f"register ({setting})", argv)
            if run.status != 0:
                print(run.output, file=sys.stderr)
                return 1
            found = round_trip(args.fixed, args.moving, args.fixed_labels, forward, inverse, points=args.points,
                               seed=args.seed)
            results.append({"io_iterations": setting, "register_seconds": run.seconds, **found})
            rows.append([setting, found["points"], found["mean_mm"], found["median_mm"], found["p95_mm"],
                         found["max_mm"], found["outside_moving_grid"], run.seconds])
    print(f"{args.moving.name} -> {args.fixed.name}, model {args.model}")
    print(table(rows, ["--io-iterations", "points", "mean mm", "median mm", "95 % mm", "max mm",
                       "sent outside the moving grid", "register s"]))
    save_json(args.json, {"machine": machine(), "fixed": str(args.fixed), "moving": str(args.moving),
                          "model": args.model, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
