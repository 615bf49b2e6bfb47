"""(c) Cohort throughput: ``gradicon register-batch`` vs the reference CLI once per pair.

The cohort is ``--pairs`` pairs of the OASIS images of ``../shared/data/lapirn_oasis`` (B to A and
A to B, alternately; prediction only, forward transform to ``.h5``), with the same published-
architecture random weights. Ours is one process for the whole cohort (the model is loaded once);
the reference is one ``unigradicon-register`` process per pair, run one after the other. Prints
pairs per minute, the ratio, and each side's peak memory.

Usage::

    python benchmarks/bench_batch.py [--pairs 4] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (LAPIRN, busy_cores, executable, loaded_warning, machine, published_random_weights, run_child,  # noqa: E402
                    save_json, table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="passed to register-batch")
    parser.add_argument("--weights", type=Path, default=Path(tempfile.gettempdir()) / "itk_gradicon_bench" /
                        "random_published.trch")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    weights = published_random_weights(args.weights)
    info = machine()
    out = Path(tempfile.mkdtemp(prefix="bench_batch_"))
    images = [LAPIRN / "image_A_160x192x144.nii.gz", LAPIRN / "image_B_160x192x144.nii.gz"]
    cohort = [(images[i % 2], images[1 - i % 2]) for i in range(args.pairs)]  # (fixed, moving)
    pairs_csv = out / "pairs.csv"
    with open(pairs_csv, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["fixed", "moving", "out_transform"])
        for i, (fixed, moving) in enumerate(cohort):
            writer.writerow([fixed, moving, out / f"ours_{i}.h5"])
    env = {} if args.device.startswith("cuda") else {"CUDA_VISIBLE_DEVICES": ""}

    ours_argv = [executable("gradicon"), "register-batch", "--pairs", str(pairs_csv), "--model", str(weights),
                 "--fixed-modality", "mri", "--moving-modality", "mri", "--device", args.device, "--quiet"]
    if args.batch_size:
        ours_argv += ["--batch-size", str(args.batch_size)]
    busy = {"ours": busy_cores()}
    ours = run_child("ours", ours_argv, env=env)
    if ours.status != 0:
        sys.exit(f"register-batch failed:\n{ours.output}")
    print(f"ours: {args.pairs} pairs in {ours.seconds:.1f} s, peak {ours.peak_gib:.2f} GiB", flush=True)

    busy["reference"] = busy_cores()
    reference_runs = []
    for i, (fixed, moving) in enumerate(cohort):
        run = run_child("reference", [
            executable("unigradicon-register"), "--fixed", str(fixed), "--moving", str(moving),
            "--fixed_modality", "mri", "--moving_modality", "mri", "--network_weights", str(weights),
            "--io_iterations", "None", "--transform_out", str(out / f"reference_{i}.h5")], env=env)
        if run.status != 0:
            sys.exit(f"unigradicon-register failed:\n{run.output}")
        reference_runs.append(run)
        print(f"reference pair {i + 1}: {run.seconds:.1f} s, peak {run.peak_gib:.2f} GiB", flush=True)
    ref_seconds = sum(r.seconds for r in reference_runs)
    ref_peak = max(r.peak_gib for r in reference_runs)

    print()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, device {args.device}, "
          f"GPU: {info['gpu'] or 'none'}")
    print(f"cores kept busy by other programs before: ours {busy['ours']:.2f}, reference {busy['reference']:.2f}")
    warning = loaded_warning(busy.values())
    if warning:
        print(warning)
    rows = [["ours (register-batch, one process)", ours.seconds, args.pairs / ours.seconds * 60, ours.peak_gib],
            ["reference (one process per pair)", ref_seconds, args.pairs / ref_seconds * 60, ref_peak]]
    print(f"cohort of {args.pairs} pairs, prediction only, 160x192x144 images, network 175^3")
    print(table(rows, ["program", "total s", "pairs/min", "peak GiB"]))
    print(f"throughput ratio ours/reference: {ref_seconds / ours.seconds:.2f}")
    save_json(args.json, {"machine": info, "busy_cores": busy, "ours": ours, "reference": reference_runs})


if __name__ == "__main__":
    main()
