"""Reading, preprocessing and caching the training images: each image reaches the network as at
registration, and is kept in memory and on disk between steps.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..io.images import atomic_output, image_array, read_float32, read_label_map
from ..pipeline.preprocess import apply_input_mask
from ..spatial.frames import NetworkFrame
from .listing import ImageEntry

CACHE_VERSION = 1


def _stamp(path: Optional[Path]) -> Optional[List[Any]]:
    if path is None:
        return None
    st = os.stat(path)
    return [str(path), int(st.st_size), int(st.st_mtime_ns)]


class VolumeLoader:
    """Preprocessed volumes on the network grid, with a disk cache and a small memory cache.

    Args:
        dimension: 2 or 3.
        cache_dir: folder of the disk cache (``None``: none). Entries are ``.npy`` files named by the
            sha256 of the file's path, size and modification time, the preprocessing, input mask and
            the network layout (shape, axes, flips); they are written atomically, so several workers
            and processes can share the folder.
        memory_items: volumes kept in memory by each process.
    """

    def __init__(self, dimension: int, cache_dir: Optional[Path], memory_items: int) -> None:
        self.dimension = dimension
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.memory_items = int(memory_items)
        self._memory: "OrderedDict[str, torch.Tensor]" = OrderedDict()

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_memory"] = OrderedDict()
        return state

    def _key(self, kind: str, entry: ImageEntry, frame: NetworkFrame, input_mask: bool) -> str:
        record = {"version": CACHE_VERSION, "kind": kind,
                  "file": _stamp(entry.path if kind == "image" else getattr(entry, kind)),
                  "normalization": entry.normalization.to_dict() if kind == "image" else None,
                  "input_mask": _stamp(entry.mask) if (kind == "image" and input_mask) else None,
                  "shape": list(frame.shape), "axes": list(frame.axes), "flips": list(frame.flips)}
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()

    def load(self, kind: str, entry: ImageEntry, frame: NetworkFrame, *, input_mask: bool = False) -> torch.Tensor:
        """``[1, *shape]`` float32: ``kind`` is ``image`` (normalised, optionally input-masked),
        ``mask`` (0/1) or ``segmentation`` (label values, nearest-neighbour resizing)."""
        key = self._key(kind, entry, frame, input_mask)
        hit = self._memory.get(key)
        if hit is not None:
            self._memory.move_to_end(key)
            return hit
        array = None
        cache_file = None
        if self.cache_dir is not None:
            cache_file = self.cache_dir / key[:2] / f"{key}.npy"
            if cache_file.is_file():
                try:
                    array = np.load(cache_file, allow_pickle=False)
                except (OSError, ValueError):
                    array = None
        if array is None:
            array = self._compute(kind, entry, frame, input_mask)
            if cache_file is not None:
                _atomic_save_npy(cache_file, array)
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
        if self.memory_items > 0:
            self._memory[key] = tensor
            while len(self._memory) > self.memory_items:
                self._memory.popitem(last=False)
        return tensor

    def _compute(self, kind: str, entry: ImageEntry, frame: NetworkFrame, input_mask: bool) -> np.ndarray:
        if kind == "image":
            image, _ = read_float32(entry.path, what=f"training image ({entry.origin})", dimension=self.dimension)
            array = image_array(image)
            normalized = entry.normalization(array, what=f"training image '{entry.path}' ({entry.origin})")
            if input_mask and entry.mask is not None:
                mask = read_label_map(entry.mask, what="training mask", dimension=self.dimension)
                normalized = apply_input_mask(normalized, image_array(mask))
            return frame.tensor(normalized)[0, 0].numpy()
        path = entry.mask if kind == "mask" else entry.segmentation
        labels = read_label_map(path, what=f"training {kind}", dimension=self.dimension)
        array = np.asarray(image_array(labels))
        if kind == "mask":
            array = (array > 0).astype(np.float32)
        return frame.tensor(array.astype(np.float32), mode="nearest")[0, 0].numpy()


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
