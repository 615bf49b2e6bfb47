"""Synthetic training data for the training tests, and checks of the data itself.

Subjects are one template (ellipses with labels) warped by a random smooth deformation; each
subject can be written in several modalities (different intensity per label, CT in Hounsfield
units) that are co-registered (one deformation per subject and session). Everything is made with a
fixed seed in a temporary folder, in a second or two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pytest
import torch
import yaml

@pytest.fixture(autouse=True)
def one_torch_thread():
    """Training tests run on one thread: they compare runs bit for bit and must not depend on how
    many cores the machine has. Modules that import this fixture get it for every test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: Intensity of each label (0 = background) per modality.
CONTRASTS = {
    "t1w": (0.05, 0.9, 0.55, 0.3),
    "t2w": (0.05, 0.25, 0.6, 0.95),
    "flair": (0.1, 0.6, 0.3, 0.8),
    "ct": (-1000.0, 40.0, 700.0, -100.0),
    "pet": (0.0, 0.4, 1.0, 0.7),
}


def template_labels(shape: Sequence[int]) -> np.ndarray:
    """Three nested / neighbouring ellipsoids on ``shape`` (ARRAY order), labels 1..3."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    d = len(shape)
    labels = np.zeros(shape, dtype=np.int16)
    body = sum((g / r) ** 2 for g, r in zip(grids, [0.75] * d)) <= 1
    labels[body] = 1
    centre = [0.25] + [0.0] * (d - 1)
    inner = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, [0.3] + [0.35] * (d - 1))) <= 1
    labels[inner] = 2
    centre = [-0.3] + [0.2] * (d - 1)
    other = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, [0.22] * d)) <= 1
    labels[other] = 3
    return labels


def smooth_deformation(shape: Sequence[int], rng: np.random.Generator, amplitude: float) -> List[np.ndarray]:
    """A smooth random displacement (voxels) per axis: coarse noise upsampled linearly."""
    import torch
    import torch.nn.functional as F

    d = len(shape)
    noise = torch.from_numpy(rng.standard_normal((1, d) + (4,) * d))
    field = F.interpolate(noise, size=tuple(shape), mode="bilinear" if d == 2 else "trilinear",
                          align_corners=True)[0].numpy()
    return [amplitude * f / (np.abs(f).max() + 1e-9) for f in field]


def warp_array(array: np.ndarray, displacement: List[np.ndarray], *, order: int) -> np.ndarray:
    """``array`` sampled at ``x + displacement(x)`` (voxels); nearest (order 0) or linear, border values."""
    import torch
    import torch.nn.functional as F

    shape = array.shape
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    coords = [2 * (g + u) / (n - 1) - 1 for g, u, n in zip(grids, displacement, shape)]
    grid = torch.from_numpy(np.stack(coords[::-1], axis=-1)[None])
    out = F.grid_sample(torch.from_numpy(array.astype(np.float64))[None, None], grid,
                        mode="nearest" if order == 0 else "bilinear", padding_mode="border", align_corners=True)
    return out[0, 0].numpy()


def write_image(array: np.ndarray, path: Path, *, spacing: Optional[Sequence[float]] = None) -> Path:
    import itk

    image = itk.image_from_array(np.ascontiguousarray(array))
    if spacing is not None:
        image.SetSpacing([float(s) for s in spacing])
    path.parent.mkdir(parents=True, exist_ok=True)
    itk.imwrite(image, str(path))
    return path


def make_subjects(folder: Path, *, n: int, shape: Sequence[int], modalities: Sequence[str] = ("t1w",),
                  sessions: int = 1, seed: int = 0, amplitude: float = 3.0, noise: float = 0.02,
                  first: int = 0, labels: bool = True, masks: bool = False) -> List[Dict[str, str]]:
    """Write ``n`` subjects x ``sessions`` deformations x ``modalities`` images; returns CSV rows.

    Each row has ``image``, ``subject``, ``modality``, ``group`` (the session: its modalities are
    co-registered) and ``segmentation`` (and ``mask``) as paths relative to ``folder``.
    """
    rng = np.random.default_rng(seed)
    template = template_labels(shape)
    rows = []
    for s in range(first, first + n):
        for session in range(sessions):
            disp = smooth_deformation(shape, rng, amplitude)
            lab = warp_array(template.astype(np.float64), disp, order=0).astype(np.int16)
            for modality in modalities:
                contrast = np.asarray(CONTRASTS[modality], dtype=np.float64)
                smooth_intensity = warp_array(contrast[template].astype(np.float64), disp, order=1)
                scale = 30.0 if modality == "ct" else noise
                image = (smooth_intensity + scale * rng.standard_normal(shape)).astype(np.float32)
                name = f"sub{s:02d}_ses{session}_{modality}.mha"
                write_image(image, folder / name)
                row = {"image": name, "subject": f"sub{s:02d}", "modality": modality, "group": f"ses{session}"}
                if labels:
                    seg_name = f"sub{s:02d}_ses{session}_{modality}_seg.mha"
                    write_image(lab, folder / seg_name)
                    row["segmentation"] = seg_name
                if masks:
                    mask_name = f"sub{s:02d}_ses{session}_{modality}_mask.mha"
                    write_image((lab > 0).astype(np.uint8), folder / mask_name)
                    row["mask"] = mask_name
                rows.append(row)
    return rows


def write_csv(rows: List[Dict[str, str]], path: Path, columns: Optional[Sequence[str]] = None) -> Path:
    columns = list(columns or rows[0].keys())
    lines = [",".join(columns)] + [",".join(str(r.get(c, "")) for c in columns) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_config(path: Path, config: Dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def tiny_architecture_config(dimension: int = 2, size: int = 32, channels=(4, 8, 8), refinement: int = 1) -> Dict:
    return {"dimension": dimension, "input_shape": [size] * dimension, "levels": 2,
            "refinement_steps": refinement, "down_channels": list(channels), "up_channels": list(channels)}


def base_config(csv_name: str = "images.csv", *, dimension: int = 2, steps1: int = 4, steps2: int = 2,
                **overrides) -> Dict:
    """A tiny from-scratch configuration over one CSV data set (overrides replace top-level keys)."""
    config = {
        "name": "tiny",
        "architecture": tiny_architecture_config(dimension),
        "datasets": [{"name": "synthetic", "images": csv_name, "region": "brain", "pairing": "inter"}],
        "sampling": {"mode": "per_dataset", "pairs_per_dataset": 16},
        "augmentation": {"flips": False, "affine_std": 0.0},
        "objective": {"kind": "gradicon", "similarity": "lncc"},
        "schedule": {"stage1": {"steps": steps1}, "stage2": {"steps": steps2}},
        "optimizer": {"lr": 1.0e-3},
        "batch_size": 2,
        "seed": 3,
        "checkpoint": {"every": 2, "keep": 50},
        "loader": {"workers": 0},
        "log_every": 1,
    }
    config.update(overrides)
    return config


# ------------------------------------------------------------------------------------------------
# checks of the synthetic data
# ------------------------------------------------------------------------------------------------

def test_synthetic_subjects_are_reproducible_and_co_registered(tmp_path):
    import itk

    rows_a = make_subjects(tmp_path / "a", n=2, shape=(24, 24), modalities=("t1w", "t2w"), seed=5)
    rows_b = make_subjects(tmp_path / "b", n=2, shape=(24, 24), modalities=("t1w", "t2w"), seed=5)
    assert [r["image"] for r in rows_a] == [r["image"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        a = itk.array_from_image(itk.imread(str(tmp_path / "a" / ra["image"])))
        b = itk.array_from_image(itk.imread(str(tmp_path / "b" / rb["image"])))
        np.testing.assert_array_equal(a, b)
    # the two modalities of a session share one label map; two subjects differ
    seg = {r["image"]: itk.array_from_image(itk.imread(str(tmp_path / "a" / r["segmentation"]))) for r in rows_a}
    names = [r["image"] for r in rows_a]
    np.testing.assert_array_equal(seg[names[0]], seg[names[1]])
    assert (seg[names[0]] != seg[names[2]]).any()
    assert set(np.unique(seg[names[0]])) == {0, 1, 2, 3}


@pytest.mark.parametrize("dimension", [2, 3])
def test_template_has_three_labels(dimension):
    labels = template_labels((20,) * dimension)
    assert set(np.unique(labels)) == {0, 1, 2, 3}
