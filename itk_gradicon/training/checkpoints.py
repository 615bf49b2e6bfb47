"""Training checkpoints: the files, and the random states they hold so that a resumed run is exact.

A checkpoint (``OUTPUT/checkpoints/step_NNNNNNN.pt``) holds the network, the optimiser, the step, and the
Python, NumPy and torch random states; it is written atomically and read with ``weights_only=True``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

from ..errors import TrainingError
from ..io.images import atomic_output

CHECKPOINT_FORMAT = "itk_gradicon.checkpoint"
CHECKPOINT_VERSION = 1


def list_checkpoints(output: Path) -> List[Path]:
    """Checkpoint files of a run, oldest first."""
    folder = Path(output) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step_*.pt") if p.is_file())


def capture_rng_state() -> Dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) global random states, as tensors and plain data."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: Dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(content: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        torch.save(content, tmp)


def load_checkpoint(path: Path) -> Dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; :class:`TrainingError` if it is unusable."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrainingError(f"checkpoint '{path}' cannot be read: {first}") from None
    if not isinstance(content, dict) or content.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"'{path}' is not a gradicon training checkpoint")
    if content.get("version") != CHECKPOINT_VERSION:
        raise TrainingError(f"checkpoint '{path}' has version {content.get('version')!r}; this version of "
                            f"itk_gradicon reads version {CHECKPOINT_VERSION}")
    return content


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "atomic_torch_save", "atomic_write_text", "capture_rng_state",
           "list_checkpoints", "load_checkpoint", "restore_rng_state"]
