"""Training checkpoints: the files, and the random states they hold so that a resumed run is exact.

A checkpoint (``OUTPUT/checkpoints/step_NNNNNNN.pt``) holds the network, the optimiser, the step, and the
Python, NumPy and torch random states; it is written atomically and read with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..errors import ConfigError, TrainingError
from ..io.images import atomic_output
from .config import RESUMABLE_CHANGES, differences

CHECKPOINT_FORMAT = "itk_gradicon.checkpoint"
CHECKPOINT_VERSION = 1


def list_checkpoints(output: Path) -> List[Path]:
    """Checkpoint files of a run, oldest first."""
    folder = Path(output) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("step_*.pt") if p.is_file())


def weights_sha256(network: torch.nn.Module) -> str:
    """sha256 of a network's weights: every tensor of its state dict in name order (name, dtype and shape,
    then its bytes). Equal for two files that hold the same weights beside different records."""
    digest = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        values = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{values.dtype}:{tuple(values.shape)};".encode())
        digest.update(values.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_resumable(state: Dict[str, Any], run) -> Optional[str]:
    """Raise :class:`ConfigError` where the checkpoint ``state`` cannot go on as ``run`` (a
    :class:`~itk_gradicon.training.planning.TrainingRun`): a configuration changed beyond
    :data:`~itk_gradicon.training.config.RESUMABLE_CHANGES`, another number of processes, another model to
    finetune, or stages that do not match. Returns a note to log where it goes on with a remark, else ``None``."""
    changed = [k for k in differences(state["config"], run.config.to_dict())
               if k.split(".")[0].split("[")[0] not in RESUMABLE_CHANGES]
    if changed:
        raise ConfigError(f"--resume: the configuration differs from the one the run in '{run.output}' was "
                          f"started with, at {', '.join(changed[:5])}; only "
                          f"{', '.join(sorted(RESUMABLE_CHANGES))} may change")
    if state["world_size"] != run.dist.world_size:
        raise ConfigError(f"--resume: the run used {state['world_size']} process(es), this one "
                          f"{run.dist.world_size}; resume with the same number (the pair stream depends on it)")
    note = check_parent(state, run.parent, run.config.model)
    stage = int(state["stage"])
    if stage >= len(run.stages) or run.stages[stage].architecture.to_dict() != state["architecture"]:
        raise ConfigError(f"--resume: the checkpoint's stage {state.get('stage_name')!r} does not match the "
                          "configured stages")
    return note


def check_parent(state: Dict[str, Any], parent, model: str) -> Optional[str]:
    """Whether a checkpoint's run may go on from ``parent`` (the model being finetuned, or ``None``).

    The same file: ``None``. A file with another sha256 but the weights the run started from (its record
    rewritten, e.g. by a newer itk_gradicon): a note saying so. Other weights, or a checkpoint that does not
    know the weights it started from: :class:`ConfigError`.
    """
    if parent is None or state["parent_sha256"] == parent.sha256:
        return None
    started = state.get("parent_weights_sha256")
    if started is not None and started == weights_sha256(parent.network):
        return (f"--resume: model {model!r} is not the file the run started from (sha256 differs) but holds the "
                "same weights (its record changed); resuming")
    raise ConfigError(f"--resume: model {model!r} is not the file the run started from (sha256 differs"
                      f"{'' if started is None else ', and so do its weights'})")


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
