"""What produced a registration: the record ``gradicon register --out-json`` writes.

One JSON object (:data:`SCHEMA_PATH` is its JSON Schema): the software and its versions, the model
(name, file, sha256, what it recommends), the inputs (paths and sha256), every option as resolved
(defaults included), the pre-alignment (its matrix and how it was found), the instance optimisation's
loss at its first and last step, the Jacobian summary of the forward transform (folding), the messages
printed, and the stage times. Everything but ``timings`` is the same for two runs of one command with
one ``--seed`` and one ``--threads`` on one machine; the transforms themselves are then byte-identical.
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import numpy as np

from ..spatial.jacobian import determinant_of_displacement, jacobian_summary

RECORD_FORMAT = "itk_gradicon.register-record"
RECORD_VERSION = 1
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "register-record.schema.json"
PACKAGES = ("itk_gradicon", "torch", "itk", "SimpleITK", "itk-elastix", "numpy")


def versions() -> Dict[str, Optional[str]]:
    """Installed versions of the packages a registration runs on (``None``: not installed)."""
    found: Dict[str, Optional[str]] = {}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def _plain(value: Any) -> Any:
    """``value`` as JSON data: paths as absolute strings, tuples as lists, numpy scalars as numbers."""
    if isinstance(value, Path):
        return str(value.expanduser().absolute())
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _levels(history, coarse_steps: int):
    """The loss at the first and last step of each level of instance optimisation (the coarse level's
    values are on another grid than the full level's: they are not comparable with each other)."""
    cut = min(max(int(coarse_steps), 0), len(history))
    parts = [("half resolution", history[:cut]), ("full resolution", history[cut:])]
    return [{"grid": name, "steps_run": len(part), "loss_start": part[0], "loss_end": part[-1]}
            for name, part in parts if part]


def register_record(*, result, model, inputs: Mapping[str, Optional[Path]], options: Mapping[str, Any],
                    prealignment: Optional[Mapping[str, Any]] = None,
                    timings: Optional[Mapping[str, float]] = None) -> Dict[str, Any]:
    """The provenance record of one registration.

    Args:
        result: the :class:`~itk_gradicon.registration.RegistrationResult`.
        model: the :class:`~itk_gradicon.models.Model` used.
        inputs: ``{role: path or None}`` of the input files (images, masks, labels, initial transform).
        options: every option as resolved.
        prealignment: how the pre-alignment was found (``None``: the result's matrix alone, if any).
        timings: seconds per stage.
    """
    from ..models import BUNDLED, sha256_of  # imports torch: only when a record is written

    history = list(result.io_history or [])
    field = result.forward_field
    jacobian = jacobian_summary(determinant_of_displacement(field.array, field.grid))
    pre: Optional[Dict[str, Any]] = None
    if result.affine is not None:
        pre = {"matrix": _plain(np.asarray(result.affine, dtype=np.float64)), **_plain(dict(prealignment or {}))}
    record = {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "software": versions(),
        "model": {
            "name": model.name, "file": str(model.source), "sha256": model.sha256,
            "description": BUNDLED[model.name].description if model.name in BUNDLED else None,
            "input_shape": list(model.architecture.input_shape), "similarity": model.similarity,
            "refinement": model.refinement.to_dict(), "domain": model.domain.to_dict(),
        },
        "inputs": {role: None if path is None else {"path": _plain(Path(path)), "sha256": sha256_of(Path(path))}
                   for role, path in inputs.items()},
        "options": _plain(dict(options)),
        "modalities": {"fixed": result.fixed_modality, "moving": result.moving_modality},
        "prealignment": pre,
        "instance_optimisation": {
            "steps_run": len(history),
            "loss_start": history[0] if history else None,
            "loss_end": history[-1] if history else None,
            "levels": _levels(history, options.get("io_coarse_steps", 0)),
        },
        "jacobian": {k: _plain(v) for k, v in jacobian.items()},
        "messages": list(result.messages),
        "timings": {k: round(float(v), 3) for k, v in (timings or {}).items()},
    }
    return record


def record_text(record: Mapping[str, Any]) -> str:
    """The record as written: sorted keys, two-space indents, a final newline."""
    return json.dumps(record, indent=2, sort_keys=True, allow_nan=False) + "\n"


def load_schema() -> Dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


__all__ = ["register_record", "record_text", "versions", "load_schema", "SCHEMA_PATH"]
