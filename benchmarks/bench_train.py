"""Training step cost on this machine: time, peak memory and FLOPs against the matmul peak.

One full GradICON training step (both directions, LNCC + 1.5 GradICON, backward, Adam, batch 1) for:

* ``before``: Stage 1 (3 levels) of the half-width network at 96^3 with BatchNorm, every step at full
  resolution (what training cost at HEAD 678c1dd: 4.5 s measured then);
* ``after``: the bundled model's network (``examples/train_synthbrain.yaml``: narrower deep levels,
  instance normalisation, Dice term on a 48^3 grid) in each of its coarse-to-fine stages (``coarse1`` at
  24^3, ``coarse2`` at 48^3, ``stage1`` at 96^3), and the mean step of its schedule's first
  ``--schedule-steps`` steps (the coarse stages' lengths from the YAML file, the rest at full resolution).

Each configuration runs in its own child process (``common.run_child``), so peak resident memory is that
configuration's alone. FLOPs are counted with ``torch.utils.flop_counter`` over one step (forward and
backward); the floor is FLOPs / the machine's float32 ``torch.mm`` peak.

Usage::

    python benchmarks/bench_train.py [--repeats 3] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, machine, median  # noqa: E402

HALF = dict(down_channels=(8, 16, 32, 128, 256), up_channels=(8, 16, 32, 64, 128))
OURS = dict(down_channels=(8, 16, 32, 64, 128), up_channels=(8, 16, 32, 32, 64), normalization="instance")
CASES = {
    "before: half widths, BatchNorm, 96^3": dict(arch=HALF, levels=3, shape=(96, 96, 96), dice=0),
    "after: coarse1 (1 level, 24^3)": dict(arch=OURS, levels=1, shape=(24, 24, 24), dice=48),
    "after: coarse2 (2 levels, 48^3)": dict(arch=OURS, levels=2, shape=(48, 48, 48), dice=48),
    "after: stage1 (3 levels, 96^3)": dict(arch=OURS, levels=3, shape=(96, 96, 96), dice=48),
    "after: stage1 without Dice": dict(arch=OURS, levels=3, shape=(96, 96, 96), dice=0),
}


def child(case: str, repeats: int, threads: int) -> dict:
    """Measure one case in this process (called in a child); returns seconds, FLOPs, peak bytes."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from itk_gradicon import allocator  # noqa: F401  (as the gradicon command: freed memory kept)
    from itk_gradicon.pipeline.losses import gradicon_sample_points
    from itk_gradicon.network import Architecture, build_network
    from itk_gradicon.training.objectives import build_objective

    torch.set_num_threads(threads)
    spec = CASES[case]
    arch = Architecture(input_shape=spec["shape"], levels=spec["levels"], refinement_steps=0, **spec["arch"])
    torch.manual_seed(0)
    net = build_network(arch).train()
    objective = build_objective("gradicon", net, similarity="lncc", lmbda=1.5, dice_weight=1.0 if spec["dice"] else 0.0,
                                dice_grid=spec["dice"])
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(1)
    shape = spec["shape"]
    image_A, image_B = torch.rand(1, 1, *shape, generator=generator), torch.rand(1, 1, *shape, generator=generator)
    seg = (torch.rand(1, 1, *shape, generator=generator) * 40).floor()  # 40 labels, as a brain label map
    batch = {"image_A": image_A, "image_B": image_B, "seg_A": seg, "seg_B": seg.flip(2),
             "has_seg": torch.tensor([True])}

    def step() -> None:
        points = gradicon_sample_points(shape, like=image_A, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        objective(batch, points)["total"].backward()
        optimizer.step()

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    with FlopCounterMode(display=False) as counter:
        step()
    return {"seconds": median(times), "flops": int(counter.get_total_flops()),
            "parameters": sum(p.numel() for p in net.parameters()),
            "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def matmul_peak(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    best = 0.0
    for n in (2048, 4096):
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        for _ in range(3):
            start = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - start))
    return best


def schedule_mean(results: dict, total: int) -> float:
    """Mean step of the first ``total`` steps of the bundled model's schedule."""
    import yaml

    config = yaml.safe_load((REPO / "examples" / "train_synthbrain.yaml").read_text())
    coarse = [int(s["steps"]) for s in config["schedule"]["coarse"]]
    cost = {0: results["after: coarse1 (1 level, 24^3)"]["seconds"],
            1: results["after: coarse2 (2 levels, 48^3)"]["seconds"]}
    seconds, done = 0.0, 0
    for i, n in enumerate(coarse):
        n = min(n, total - done)
        seconds += n * cost[i]
        done += n
    seconds += (total - done) * results["after: stage1 (3 levels, 96^3)"]["seconds"]
    return seconds / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--schedule-steps", type=int, default=8000)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.repeats, args.threads)))
        return
    import subprocess

    results = {}
    for case in CASES:
        out = subprocess.run([sys.executable, __file__, "--child", case, "--repeats", str(args.repeats),
                              "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        results[case] = json.loads(out.stdout.strip().splitlines()[-1])
    peak = matmul_peak(args.threads)
    print(f"machine: {json.dumps(machine())}")
    print(f"float32 matmul peak: {peak / 1e9:.1f} GFLOP/s on {args.threads} threads\n")
    print("| step | parameters | seconds | peak GiB | GFLOP | floor s | seconds / floor |")
    print("|---|---|---|---|---|---|---|")
    for case, r in results.items():
        floor = r["flops"] / peak
        print(f"| {case} | {r['parameters'] / 1e6:.2f} M | {r['seconds']:.3f} | {r['peak_bytes'] / 1024 ** 3:.2f} | "
              f"{r['flops'] / 1e9:.1f} | {floor:.3f} | {r['seconds'] / floor:.1f} |")
    before = results["before: half widths, BatchNorm, 96^3"]["seconds"]
    mean = schedule_mean(results, args.schedule_steps)
    print(f"\nmean step over the first {args.schedule_steps} steps of examples/train_synthbrain.yaml's schedule: "
          f"{mean:.3f} s ({before / mean:.2f}x cheaper than a full-resolution step of the half-width network)")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "peak_flops": peak, "results": results,
                                         "schedule_mean_s": mean}, indent=2))


if __name__ == "__main__":
    main()
