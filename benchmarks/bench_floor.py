"""(d) The floor: FLOPs of one forward pass against the machine's measured peak.

* FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the plain path (the
  published architecture, operation by operation): one UNet at 175^3 and one full direction
  (four UNets, 175^3 input). The fast path's own count is printed too: composing the finest up
  level with the last convolution removes FLOPs, so its time can go below the plain path's floor.
* Our process keeps freed memory for reuse, as the ``gradicon`` command does
  (:mod:`itk_gradicon.allocator`).
* The peak is a large float32 matrix product (``torch.mm``, best of several) on the same device.
* ``floor = FLOPs / peak``; the table gives our measured time for one direction (prediction,
  ``inference_mode``, median of ``--repeats``) and ``time / floor``.

Usage::

    python benchmarks/bench_floor.py [--repeats 3] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import loaded_warning, machine, median, published_random_weights, save_json, table  # noqa: E402


def count_flops(function) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        function()
    return int(counter.get_total_flops())


def matmul_peak(device, sizes=(4096, 6144), repeats: int = 5) -> float:
    """Best float32 ``torch.mm`` throughput in FLOP/s over a few large square products."""
    import torch

    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        out = torch.empty(n, n, device=device)
        torch.mm(a, b, out=out)
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * n ** 3 / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", type=Path, default=Path(tempfile.gettempdir()) / "itk_gradicon_bench" /
                        "random_published.trch")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    import torch

    from itk_gradicon.allocator import keep_freed_memory
    from itk_gradicon.models import load_model
    from itk_gradicon.network.performance import fast_paths

    keep_freed_memory()  # as the gradicon command does when it starts

    info, warning = machine(), loaded_warning()
    device = torch.device(args.device)
    net = load_model(published_random_weights(args.weights)).network.to(device).eval()
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 1, 175, 175, 175, generator=g).to(device)
    b = torch.rand(1, 1, 175, 175, 175, generator=g).to(device)
    unet = net.netPsi.net  # the refinement step's UNet (175^3)
    shape = (175, 175, 175)

    with torch.inference_mode():
        with fast_paths(enabled=False):
            flops_unet = count_flops(lambda: unet(a, b))
            flops_direction = count_flops(lambda: net(a, b).displacement_on_grid(shape))
        flops_unet_fast = count_flops(lambda: unet(a, b))
        flops_direction_fast = count_flops(lambda: net(a, b).displacement_on_grid(shape))
        peak = matmul_peak(device)

        def timed(function) -> float:
            function()
            times = []
            for _ in range(args.repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                function()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            return median(times)

        t_unet = timed(lambda: unet(a, b))
        t_direction = timed(lambda: net(a, b).displacement_on_grid(shape))
        with fast_paths(enabled=False):
            t_unet_plain = timed(lambda: unet(a, b))
            t_direction_plain = timed(lambda: net(a, b).displacement_on_grid(shape))

    rows = []
    for what, flops, fast_flops, t_fast, t_plain in (
            ("one UNet at 175^3", flops_unet, flops_unet_fast, t_unet, t_unet_plain),
            ("one direction (4 UNets, warps, map on 175^3)", flops_direction, flops_direction_fast, t_direction,
             t_direction_plain)):
        floor = flops / peak
        rows.append([what, flops / 1e9, fast_flops / 1e9, floor, t_plain, t_fast, t_fast / floor])
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, device {device}, "
          f"GPU: {info['gpu'] or 'none'}, load average {info['load_average'][0]:.2f}")
    if warning:
        print(warning)
    print(f"measured peak (float32 torch.mm): {peak / 1e9:.1f} GFLOP/s")
    print(table(rows, ["work", "GFLOP (published)", "GFLOP (fast path)", "floor s", "plain path s", "fast path s",
                       "fast / floor"]))
    save_json(args.json, {"machine": info, "peak_flops": peak, "rows": rows})


if __name__ == "__main__":
    main()
