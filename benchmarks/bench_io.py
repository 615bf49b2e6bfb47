"""(b) Instance optimisation: seconds per step and peak memory, ours vs the reference, at 175^3.

Both programs optimise the same published-architecture random weights on the same network inputs
(the OASIS pair of ``../shared/data/lapirn_oasis``, normalised and resized to 175^3 as both
pipelines do), with LNCC, Adam and lr 2e-5, each in a fresh process:

* ours: ``itk_gradicon.pipeline.instance.optimise_network`` (what ``gradicon register --io-iterations``
  runs: a copy of the network, BatchNorm in evaluation mode, the symmetric GradICON objective), in a
  process that keeps freed memory for reuse as the ``gradicon`` command does;
* reference: ``unigradicon.get_unigradicon`` and the loop of ``icon_registration.itk_wrapper.
  finetune_execute`` (``net(A, B)``, ``backward``, ``step``), timed step by step.

The first step includes one-time costs and is reported apart; the table gives the median of the
others. Runs alternate ours / reference. On a machine with a GPU, ``--device cuda`` measures there.

Usage::

    python benchmarks/bench_io.py [--steps 3] [--runs 1] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (LAPIRN, busy_cores, loaded_warning, machine, median, published_random_weights, run_child,  # noqa: E402
                    save_json, table)


def network_inputs(device: str):
    """The OASIS pair (moving B, fixed A) normalised (MRI: min and 99th percentile) and resized to 175^3."""
    import itk
    import numpy as np
    import torch
    import torch.nn.functional as F

    from itk_gradicon.pipeline.preprocess import IntensityNormalization

    tensors = []
    for name in ("image_B_160x192x144.nii.gz", "image_A_160x192x144.nii.gz"):
        array = IntensityNormalization("mri")(itk.array_view_from_image(itk.imread(str(LAPIRN / name))))
        t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
        tensors.append(F.interpolate(t, size=(175, 175, 175), mode="trilinear", align_corners=False).to(device))
    return tensors


def child_ours(weights: str, steps: int, device: str) -> dict:
    from itk_gradicon.allocator import keep_freed_memory

    keep_freed_memory()  # as the gradicon command does when it starts
    import torch

    from itk_gradicon.pipeline import losses
    from itk_gradicon.models import load_model
    from itk_gradicon.pipeline.instance import optimise_network

    image_A, image_B = network_inputs(device)
    net = load_model(weights).network.to(device).eval()
    stamps = [time.perf_counter()]

    def progress(_):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    history = []
    optimise_network(net, image_A, image_B, steps=steps, lr=2e-5, similarity=losses.lncc_loss,
                     progress=progress, history=history, generator=torch.Generator().manual_seed(0))
    return {"step_seconds": [b - a for a, b in zip(stamps, stamps[1:])], "losses": [h["total"] for h in history]}


def child_reference(weights: str, steps: int, device: str) -> dict:
    import torch
    import unigradicon

    image_A, image_B = network_inputs(device)
    net = unigradicon.get_unigradicon(weights_location=weights).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-5)
    times, values = [], []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = net(image_A, image_B)
        loss[0].backward()
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        values.append(float(loss[0]))
    return {"step_seconds": times, "losses": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="IO steps per run (the first is reported apart)")
    parser.add_argument("--runs", type=int, default=1, help="runs of each program (alternated)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", type=Path, default=Path(tempfile.gettempdir()) / "itk_gradicon_bench" /
                        "random_published.trch")
    parser.add_argument("--child", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.child:
        function = child_ours if args.child == "ours" else child_reference
        print("RESULT " + json.dumps(function(str(args.weights), args.steps, args.device)), flush=True)
        return

    published_random_weights(args.weights)
    info = machine()
    results = {"ours": [], "reference": []}
    busy = []
    for i in range(args.runs):
        for name in ("ours", "reference"):
            busy.append(busy_cores())
            run = run_child(name, [sys.executable, __file__, "--child", name, "--steps", str(args.steps),
                                   "--device", args.device, "--weights", str(args.weights)])
            lines = [line for line in run.output.splitlines() if line.startswith("RESULT ")]
            if run.status != 0 or not lines:
                sys.exit(f"{name} failed (exit {run.status}):\n{run.output}")
            payload = json.loads(lines[-1][len("RESULT "):])
            payload.update(peak_gib=run.peak_gib, wall_seconds=run.seconds)
            results[name].append(payload)
            steps = ", ".join(f"{s:.1f}" for s in payload["step_seconds"])
            print(f"run {i + 1} {name:9s} steps [{steps}] s, peak {run.peak_gib:.2f} GiB", flush=True)

    def summary(name):
        later = [s for r in results[name] for s in r["step_seconds"][1:]]
        first = [r["step_seconds"][0] for r in results[name]]
        return median(first), median(later), median([r["peak_gib"] for r in results[name]])

    ours, ref = summary("ours"), summary("reference")
    print()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, device {args.device}, "
          f"GPU: {info['gpu'] or 'none'}")
    print(f"cores kept busy by other programs before each run: {', '.join(f'{v:.2f}' for v in busy)}")
    warning = loaded_warning(busy)
    if warning:
        print(warning)
    print(f"instance optimisation at 175^3, {args.steps} steps x {args.runs} run(s) per program")
    print(table([["ours", ours[0], ours[1], ours[2]], ["reference", ref[0], ref[1], ref[2]],
                 ["reference/ours", ref[0] / ours[0], ref[1] / ours[1], ref[2] / ours[2]]],
                ["program", "first step s", "later steps s (median)", "peak GiB"]))
    save_json(args.json, {"machine": info, "busy_cores": busy, "results": results})


if __name__ == "__main__":
    main()
