"""Validation figures of a model during (or after) training: held-out synthetic pairs, and real pairs.

    python benchmarks/validate_training.py --model RUN/latest.pt [--log RUN/validation.jsonl] [--real]

* **Synthetic** (always): 8 pairs synthesised, with fixed seeds, from label maps that training never saw
  (by default SynthSeg maps 19 and 20, ``examples/lists/synthseg_validation.txt``), half skull-stripped,
  half whole-head, half of one contrast; mean Dice over the brain structures present in both label maps
  after warping on the network grid (nearest neighbour), before and after, and the % of negative
  Jacobian determinants of the network's map. A model whose network sees a coarser grid (a coarse-to-fine
  stage's ``latest.pt``) gets the pairs average-pooled to its grid, as ``Down`` pools them.
* **Real** (``--real``): lapirn_oasis B -> A and A -> B through :func:`itk_gradicon.register` with the
  model's default pre-alignment (one elastix affine per direction, computed once and cached in
  ``--cache``), Dice of the two tissue labels in physical space.

One JSON line per call goes to ``--log`` (with the model's training step), so the lines of a run
form its validation curve (``--plot curve.png`` draws it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LAPIRN, REPO  # noqa: E402

VALIDATION_MAPS = REPO / "examples" / "lists" / "synthseg_validation.txt"
SHAPE = (96, 96, 96)


def _maps(list_file: Path):
    from itk_gradicon.training.synthesis import LabelMapEntry, check_label_map

    entries = []
    for line in list_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = (list_file.parent / line).resolve()
        grid, labels = check_label_map(path, what="validation label map", dimension=3)
        entries.append(LabelMapEntry(path, grid, labels, str(list_file)))
    return entries


def synthetic_pairs(list_file: Path, count: int = 8) -> List[Dict[str, torch.Tensor]]:
    """The fixed validation pairs (the same for every model and every call)."""
    from dataclasses import replace

    from itk_gradicon.spatial.frames import canonical_axes
    from itk_gradicon.training.config import SynthesisConfig
    from itk_gradicon.training.synthesis import Synthesizer

    entries = _maps(list_file)
    pairs = []
    for i in range(count):
        settings = replace(SynthesisConfig(), skull_strip=float(i % 2), same_contrast=float((i // 2) % 2),
                           shapes=0.0)
        synth = Synthesizer(entries, settings, SHAPE, canonical_axes(3))
        rng = np.random.default_rng([7919, i])
        a, b = (0, 1) if i % 4 < 2 else (1, 0)
        pairs.append(synth.pair(rng, a % len(entries), b % len(entries)))
    return pairs


def _dice(warped: torch.Tensor, target: torch.Tensor) -> float:
    labels = sorted(set(torch.unique(warped).tolist()) & set(torch.unique(target).tolist()) - {0})
    scores = []
    for label in labels:
        a, b = warped == label, target == label
        denominator = int(a.sum() + b.sum())
        if denominator:
            scores.append(2.0 * int((a & b).sum()) / denominator)
    return float(np.mean(scores)) if scores else float("nan")


def _negative_jacobian(points: torch.Tensor) -> float:
    """% of grid cells whose forward-difference Jacobian determinant is <= 0 (CUBE map ``[1, 3, *s]``)."""
    p = points[0].double()
    d0 = p[:, 1:, :-1, :-1] - p[:, :-1, :-1, :-1]
    d1 = p[:, :-1, 1:, :-1] - p[:, :-1, :-1, :-1]
    d2 = p[:, :-1, :-1, 1:] - p[:, :-1, :-1, :-1]
    jac = torch.stack([d0, d1, d2], dim=1)  # [3 (component), 3 (direction), ...]
    det = torch.linalg.det(jac.permute(2, 3, 4, 0, 1))
    return float((det <= 0).double().mean() * 100.0)


def validate_synthetic(model, pairs) -> Dict[str, float]:
    net = model.network.eval()
    shape = tuple(model.architecture.input_shape)
    before, after, folds = [], [], []
    with torch.no_grad():
        for pair in pairs:
            image_A, image_B = pair["image_A"][None], pair["image_B"][None]
            while tuple(image_A.shape[2:]) != shape:
                image_A = F.avg_pool3d(image_A, 2, ceil_mode=True)
                image_B = F.avg_pool3d(image_B, 2, ceil_mode=True)
            phi = net(image_A, image_B)
            points = phi.on_grid(SHAPE)
            grid = (points * 2.0 - 1.0).flip(1).permute(0, 2, 3, 4, 1)
            seg_A, seg_B = pair["seg_A"][None], pair["seg_B"][None]
            warped = F.grid_sample(seg_A, grid, mode="nearest", padding_mode="zeros", align_corners=True)
            before.append(_dice(seg_A.long(), seg_B.long()))
            after.append(_dice(warped.long(), seg_B.long()))
            folds.append(_negative_jacobian(points))
    return {"synthetic_dice_before": float(np.mean(before)), "synthetic_dice": float(np.mean(after)),
            "synthetic_negative_jacobian_pct": float(np.mean(folds))}


def validate_real(model, cache: Path) -> Dict[str, float]:
    import itk

    from itk_gradicon import register
    from itk_gradicon.pipeline.affine import elastix_affine

    images = {k: itk.imread(str(LAPIRN / f"image_{k}_160x192x144.nii.gz"), itk.F) for k in "AB"}
    segs = {"A": itk.imread(str(LAPIRN / "derived" / "image_A_160x192x144_seg_resampled_to_image_grid.nii.gz")),
            "B": itk.imread(str(LAPIRN / "image_B_160x192x144_seg.nii.gz"))}
    out: Dict[str, float] = {}
    for moving, fixed in (("B", "A"), ("A", "B")):
        cache_file = cache / f"oasis_affine_{moving}_to_{fixed}.npy"
        if cache_file.is_file():
            affine = np.load(cache_file)
        else:
            affine = elastix_affine(images[fixed], images[moving])
            cache.mkdir(parents=True, exist_ok=True)
            np.save(cache_file, affine)
        result = register(images[fixed], images[moving], model=model, initial_transform=affine,
                          compute_inverse=False)
        warped = itk.resample_image_filter(
            segs[moving], transform=result.forward_transform, use_reference_image=True,
            reference_image=segs[fixed], interpolator=itk.NearestNeighborInterpolateImageFunction.New(segs[moving]))
        a, b = itk.array_from_image(warped), itk.array_from_image(segs[fixed])
        for label in (1, 2):
            x, y = a == label, b == label
            out[f"oasis_{moving}{fixed}_dice{label}"] = float(2 * (x & y).sum() / (x.sum() + y.sum()))
    out["oasis_mean_dice"] = float(np.mean([v for k, v in out.items() if "_dice" in k]))
    return out


def plot(log: Path, picture: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: r["step"])
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["synthetic_dice"] for r in rows], "o-", label="held-out synthetic pairs (mean over structures)")
    ax.axhline(rows[0]["synthetic_dice_before"], color="grey", ls=":", label="synthetic, identity")
    real = [r for r in rows if "oasis_mean_dice" in r]
    if real:
        ax.plot([r["step"] for r in real], [r["oasis_mean_dice"] for r in real], "s-",
                label="lapirn_oasis (2 labels, both directions)")
    ax.set_xlabel("training step")
    ax.set_ylabel("Dice")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(picture, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model file or name")
    parser.add_argument("--log", type=Path, help="append the figures to this JSONL file")
    parser.add_argument("--real", action="store_true", help="also register lapirn_oasis (both directions)")
    parser.add_argument("--maps", type=Path, default=VALIDATION_MAPS, help="list of held-out label maps")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/itk_gradicon_validation"))
    parser.add_argument("--plot", type=Path, help="draw the curve of --log into this picture")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        from itk_gradicon.models import load_model

        model = load_model(args.model)
        t = time.perf_counter()
        record = {"model": str(args.model), "name": model.name, "step": int(model.provenance.get("steps", 0)),
                  "stage": (model.provenance.get("stages") or [{}])[-1].get("name"),
                  "input_shape": list(model.architecture.input_shape)}
        record.update(validate_synthetic(model, synthetic_pairs(args.maps)))
        if args.real:
            record.update(validate_real(model, args.cache))
        record["seconds"] = round(time.perf_counter() - t, 1)
        print(json.dumps(record))
        if args.log:
            with open(args.log, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
    if args.plot:
        plot(args.log, args.plot)


if __name__ == "__main__":
    main()
