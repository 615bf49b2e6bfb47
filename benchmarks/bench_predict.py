"""(a) Prediction only, end to end: files in, transform file out, ours vs the reference CLI.

Runs, alternately, ``gradicon register --io-iterations 0 --out-transform T.h5`` and
``unigradicon-register --io_iterations None ... --transform_out T.h5`` on the OASIS pair of
``../shared/data/lapirn_oasis`` (moving B to fixed A, 160x192x144, network 175^3), with the same
published-architecture random weights, each run in a fresh process. Prints wall time and peak
memory (the child's ``ru_maxrss``) per run, the medians, the ratio reference/ours per pair of runs,
and how far apart the two transforms are (mm, at every voxel of the fixed image).

Usage::

    python benchmarks/bench_predict.py [--runs 3] [--weights W.trch] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (LAPIRN, busy_cores, executable, loaded_warning, machine, median,  # noqa: E402
                    published_random_weights, run_child, save_json, table)


def transform_difference_mm(ours: Path, reference: Path, fixed: Path) -> float:
    """Largest distance between the two transforms' images of the fixed image's voxel centres.

    Both transforms are sampled at every fixed voxel with ITK's ``TransformToDisplacementFieldFilter``
    (as ``tests/test_register_reference.py`` does); between voxels the two interpolate differently
    (ours on the fixed grid, the reference on its 175^3 network grid), so only voxels are compared.
    """
    import itk
    import numpy as np

    image = itk.imread(str(fixed), itk.F)
    d = image.GetImageDimension()
    field_type = itk.Image[itk.Vector[itk.F, d], d]
    fields = []
    for path in (ours, reference):
        sampler = itk.TransformToDisplacementFieldFilter[field_type, itk.D].New(
            Transform=itk.transformread(str(path))[0], ReferenceImage=image, UseReferenceImage=True)
        sampler.Update()
        fields.append(itk.array_from_image(sampler.GetOutput()).astype(np.float64))
    return float(np.linalg.norm(fields[0] - fields[1], axis=-1).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each program (alternated)")
    parser.add_argument("--weights", type=Path, default=Path(tempfile.gettempdir()) / "itk_gradicon_bench" /
                        "random_published.trch", help="published-format weights (made with the reference if absent)")
    parser.add_argument("--fixed", type=Path, default=LAPIRN / "image_A_160x192x144.nii.gz")
    parser.add_argument("--moving", type=Path, default=LAPIRN / "image_B_160x192x144.nii.gz")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    weights = published_random_weights(args.weights)
    info = machine()
    out = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    programs = {
        "ours": [executable("gradicon"), "register", "--fixed", str(args.fixed), "--moving", str(args.moving),
                 "--model", str(weights), "--fixed-modality", "mri", "--moving-modality", "mri",
                 "--io-iterations", "0", "--device", "cpu", "--quiet", "--out-transform", str(out / "ours.h5")],
        "reference": [executable("unigradicon-register"), "--fixed", str(args.fixed), "--moving", str(args.moving),
                      "--fixed_modality", "mri", "--moving_modality", "mri", "--network_weights", str(weights),
                      "--io_iterations", "None", "--transform_out", str(out / "reference.h5")],
    }
    runs = {name: [] for name in programs}
    busy = []
    print(f"outputs in {out}", flush=True)
    for i in range(args.runs):
        for name, argv in programs.items():
            busy.append(busy_cores())
            run = run_child(name, argv, env={"CUDA_VISIBLE_DEVICES": ""})
            if run.status != 0:
                sys.exit(f"{name} failed (exit {run.status}):\n{run.output}")
            runs[name].append(run)
            print(f"run {i + 1} {name:9s} {run.seconds:7.1f} s  peak {run.peak_gib:5.2f} GiB", flush=True)
    difference = transform_difference_mm(out / "ours.h5", out / "reference.h5", args.fixed)

    rows = []
    for i in range(args.runs):
        o, r = runs["ours"][i], runs["reference"][i]
        rows.append([i + 1, o.seconds, r.seconds, r.seconds / o.seconds, o.peak_gib, r.peak_gib])
    med = {k: median([r.seconds for r in v]) for k, v in runs.items()}
    peak = {k: median([r.peak_gib for r in v]) for k, v in runs.items()}
    rows.append(["median", med["ours"], med["reference"], median([row[3] for row in rows]), peak["ours"],
                 peak["reference"]])
    print()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, GPU: {info['gpu'] or 'none'}")
    print(f"cores kept busy by other programs before each run: {', '.join(f'{v:.2f}' for v in busy)}")
    warning = loaded_warning(busy)
    if warning:
        print(warning)
    print(f"prediction only, {args.fixed.name} <- {args.moving.name}, whole process from files to transform file")
    print(table(rows, ["run", "ours s", "reference s", "reference/ours", "ours peak GiB", "reference peak GiB"]))
    print(f"largest difference between the two transforms: {difference:.2e} mm")
    save_json(args.json, {"machine": info, "busy_cores": busy, "runs": runs, "difference_mm": difference,
                          "median_seconds": med, "median_peak_gib": peak})


if __name__ == "__main__":
    main()
