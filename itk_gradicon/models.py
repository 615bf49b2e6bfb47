"""The model store: published model names, the download cache, and safe loading of weight files.

``--model NAME|FILE`` accepts:

* a bundled model's name (:data:`BUNDLED`, e.g. ``gradicon-synthbrain-96``): a model file shipped inside
  the package, available offline;
* ``unigradicon`` / ``multigradicon``: the published weights, downloaded on first use into the cache
  folder (``$ITK_GRADICON_CACHE``, else ``$XDG_CACHE_HOME/itk_gradicon``, else
  ``~/.cache/itk_gradicon``), written atomically and loaded strictly;
* a published-format state dict (``.trch``): its architecture is recognised from its tensors;
* a model file written by this package (``gradicon train``): it carries its architecture, input
  size, preprocessing and provenance.

Weight files are read with ``torch.load(..., weights_only=True)``: a file that holds anything other
than tensors and plain containers is refused and never executed.

Offline machines: ``gradicon models import NAME FILE`` copies a file fetched elsewhere into the
cache after checking that it loads; ``$ITK_GRADICON_MIRROR`` points downloads at an internal mirror
(``<mirror>/<name>.trch``, ``http(s)://`` or ``file://``).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import time
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch

from .errors import ModelError, ModelNotAvailableError
from .io.images import atomic_output
from .model_records import (  # noqa: F401  (re-exported: the names users of this module know)
    FIELD_REFINEMENT, NO_REFINEMENT, PUBLISHED_REFINEMENT, REFINEMENT_METHODS, Domain, Refinement)
from .network.builders import PUBLISHED_3D, Architecture, build_network

MODEL_FILE_FORMAT = "itk_gradicon.model"
MODEL_FILE_VERSION = 1
CACHE_ENV = "ITK_GRADICON_CACHE"
MIRROR_ENV = "ITK_GRADICON_MIRROR"
TIMEOUT_ENV = "ITK_GRADICON_DOWNLOAD_TIMEOUT"
DEFAULT_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class PublishedModel:
    """A model that can be fetched by name."""

    name: str
    url: str
    description: str
    architecture: Architecture = PUBLISHED_3D
    similarity: str = "lncc"
    refinement: Refinement = PUBLISHED_REFINEMENT
    domain: Domain = Domain()

    @property
    def file_name(self) -> str:
        return f"{self.name}.trch"


PUBLISHED: Dict[str, PublishedModel] = {
    m.name: m for m in (
        PublishedModel(
            "unigradicon",
            "https://github.com/uncbiag/uniGradICON/releases/download/unigradicon_weights/Step_2_final.trch",
            "uniGradICON 1.0 (Tian et al., MICCAI 2024): CT and MRI, lung/knee/brain/abdomen, trained with LNCC",
        ),
        PublishedModel(
            "multigradicon",
            "https://github.com/uncbiag/uniGradICON/releases/download/multigradicon_weights/Step_2_final.trch",
            "multiGradICON 1.0 (Demir et al., WBIR 2024): multimodal, trained with squared LNCC and loss randomisation",
            similarity="lncc2",
        ),
    )
}
DEFAULT_MODEL = "unigradicon"


@dataclass(frozen=True)
class BundledModel:
    """A model file shipped inside the package (``itk_gradicon/weights/``), with its card.

    The card (``<name>.json`` beside the file) records what the model is for and what was measured
    with it; ``gradicon models info NAME`` prints it.
    """

    name: str
    description: str

    @property
    def path(self) -> Path:
        return Path(__file__).resolve().parent / "weights" / f"{self.name}.pt"

    @property
    def card_path(self) -> Path:
        return self.path.with_suffix(".json")

    def card(self) -> Dict[str, Any]:
        """The model card (plain data), or an empty mapping when the package lacks it."""
        import json

        try:
            return json.loads(self.card_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}


BUNDLED: Dict[str, BundledModel] = {
    m.name: m for m in (
        BundledModel(
            "gradicon-synthbrain-96",
            "compact GradICON (3.8 M parameters, 96^3) for affinely pre-aligned brain MRI, trained on a CPU from "
            "synthetic pairs (SynthSeg label maps) and real brains; offline, seconds on a CPU",
        ),
    )
}


@dataclass
class Model:
    """A loaded registration network and what is known about it.

    Attributes:
        name: published name, or the file's stem.
        architecture: how the network is built (input size included).
        network: the network in eval mode, on the CPU.
        source: file the weights came from.
        sha256: hex digest of that file.
        preprocessing: intensity preprocessing defaults the model was trained with.
        provenance: free-form record (training data, steps, parent model, ...).
        similarity: the similarity it was trained with.
        refinement: the instance optimisation it recommends (:class:`Refinement`).
        domain: what it was trained on (:class:`Domain`; empty: unknown, nothing is checked).
    """

    name: str
    architecture: Architecture
    network: torch.nn.Module
    source: Path
    sha256: str
    preprocessing: Dict[str, Any] = field(default_factory=dict)
    provenance: Dict[str, Any] = field(default_factory=dict)
    similarity: str = "lncc"
    refinement: Refinement = NO_REFINEMENT
    domain: Domain = Domain()


# ---------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """The folder where published weights are kept (created on demand)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "itk_gradicon"


def cached_path(name: str) -> Path:
    return cache_dir() / PUBLISHED[name].file_name


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def download_url(name: str) -> str:
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        return mirror.rstrip("/") + "/" + PUBLISHED[name].file_name
    return PUBLISHED[name].url


def download(url: str, destination: Path, *, timeout: Optional[float] = None,
             progress: Optional[Callable[[int, Optional[int]], None]] = None) -> str:
    """Download ``url`` to ``destination`` atomically; returns the file's sha256.

    The file is streamed into a temporary file in the destination folder and renamed only when
    complete, so an interrupted download leaves nothing that looks like a weight file.

    Raises:
        ModelNotAvailableError: the URL cannot be reached or the transfer fails.
    """
    timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)) if timeout is None else timeout
    destination.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    try:
        with atomic_output(destination) as tmp, open(tmp, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": "itk_gradicon"})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                total = response.headers.get("Content-Length")
                total = int(total) if total and total.isdigit() else None
                done = 0
                while True:
                    block = response.read(1 << 20)
                    if not block:
                        break
                    out.write(block)
                    digest.update(block)
                    done += len(block)
                    if progress is not None:
                        progress(done, total)
            if total is not None and done != total:
                raise ModelNotAvailableError(f"download of {url} stopped after {done} of {total} bytes")
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise ModelNotAvailableError(f"could not download {url}: {reason}") from err
    return digest.hexdigest()


def ensure_published(name: str, *, progress=None) -> Path:
    """Path of a published model's weights, downloading them when they are not cached."""
    path = cached_path(name)
    if path.exists():
        return path
    url = download_url(name)
    try:
        download(url, path, progress=progress)
    except ModelNotAvailableError as err:
        raise ModelNotAvailableError(
            f"model '{name}' is not in the cache and {err}. On a machine with internet access, fetch "
            f"{PUBLISHED[name].url} and either place it at {path} or run "
            f"'gradicon models import {name} FILE'; offline, the bundled brain MRI model works at once: "
            f"--model {' or '.join(BUNDLED)}") from err
    try:
        load_weight_file(path, name=name)
    except ModelError as err:
        path.unlink(missing_ok=True)
        raise ModelError(f"the file downloaded from {url} is not valid {name} weights: {err}") from err
    return path


def import_model(name: str, file: Path) -> Path:
    """Check that ``file`` holds weights for published model ``name`` and copy it into the cache."""
    if name not in PUBLISHED:
        raise ModelError(f"unknown model name {name!r}; known: {', '.join(PUBLISHED)}")
    load_weight_file(Path(file), name=name)
    destination = cached_path(name)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(destination) as tmp:
        shutil.copyfile(file, tmp)
    return destination


def list_models() -> List[Dict[str, Any]]:
    """One record per known model: name, kind (``bundled`` or ``published``), present, path, size in
    bytes, sha256, url (``None`` for bundled models), description."""
    rows = []
    for name, bundled in BUNDLED.items():
        present = bundled.path.is_file()
        rows.append({
            "name": name, "kind": "bundled", "present": present, "path": str(bundled.path),
            "size": bundled.path.stat().st_size if present else None,
            "sha256": sha256_of(bundled.path) if present else None, "url": None,
            "description": bundled.description,
        })
    for name, published in PUBLISHED.items():
        path = cached_path(name)
        present = path.is_file()
        rows.append({
            "name": name, "kind": "published", "present": present, "path": str(path),
            "size": path.stat().st_size if present else None,
            "sha256": sha256_of(path) if present else None,
            "url": download_url(name), "description": published.description,
        })
    return rows


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------

def _torch_load(path: Path) -> Any:
    if not path.exists():
        raise ModelError(f"model file '{path}' does not exist")
    if not path.is_file():
        raise ModelError(f"model file '{path}' is not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols are not for our users
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Unsupported global" in text or "GLOBAL" in text:
            raise ModelError(f"model file '{path}' contains Python objects other than tensors; it was "
                             "refused without running any of its code (weights_only loading)") from err
        detail = next((line.strip() for line in reversed(text.splitlines())
                       if line.strip() and not line.startswith("Check the documentation")), "")
        raise ModelError(f"model file '{path}' is not a PyTorch weight file or is corrupted "
                         f"({detail[:120]})") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError,
            AttributeError, TypeError, IndexError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"model file '{path}' is not a readable PyTorch weight file (truncated or "
                         f"corrupted?): {message}") from err


def _infer_architecture(state: Mapping[str, torch.Tensor], input_shape=None) -> Architecture:
    """Find the architecture whose parameter names and shapes are exactly those of ``state``."""
    first = state.get(next((k for k in state if k.endswith("downConvs.0.weight")), ""), None)
    if first is None or not isinstance(first, torch.Tensor):
        raise ModelError("the state dict holds no GradICON UNet weights (no '...downConvs.0.weight')")
    dimension = first.dim() - 2
    if dimension not in (2, 3):
        raise ModelError(f"unexpected convolution weight of shape {tuple(first.shape)}")
    input_channels = first.shape[1] // 2
    prefix = next(k for k in state if k.endswith("downConvs.0.weight"))[: -len("downConvs.0.weight")]
    down = []
    up = []
    k = 0
    while f"{prefix}downConvs.{k}.weight" in state:
        down.append(int(state[f"{prefix}downConvs.{k}.weight"].shape[0]))
        up.append(int(state[f"{prefix}upConvs.{k}.weight"].shape[1]) if f"{prefix}upConvs.{k}.weight" in state else 0)
        k += 1
    if input_shape is None:
        input_shape = PUBLISHED_3D.input_shape if dimension == 3 else (PUBLISHED_3D.input_shape[0],) * 2
    keys = set(state)
    for levels in range(1, 6):
        for refinement in range(0, 4):
            try:
                arch = Architecture(dimension=dimension, input_shape=tuple(input_shape), levels=levels,
                                    refinement_steps=refinement, input_channels=input_channels,
                                    down_channels=tuple(down), up_channels=tuple(up))
            except ModelError:
                continue
            with torch.device("meta"):  # parameter names only: no memory, no initialisation cost
                names = set(build_network(arch).state_dict())
            if names == keys:
                return arch
    raise ModelError(f"the {len(state)} tensors of this state dict do not form a GradICON network "
                     "(unknown layout of steps)")


def _check_strict(network: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
             if k in state and tuple(getattr(state[k], "shape", ())) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        if wrong:
            k, got, want = wrong[0]
            parts.append(f"{len(wrong)} tensors of the wrong shape (e.g. {k}: {got}, expected {want})")
        raise ModelError(f"{source} does not match the architecture: " + "; ".join(parts))


def load_weight_file(path: Path, *, name: Optional[str] = None, input_shape=None) -> Model:
    """Load a published-format state dict or one of our model files, strictly.

    Args:
        path: the file.
        name: the model's name (default: the file's stem).
        input_shape: network input size for a bare state dict (default 175 per axis, as published).

    Raises:
        ModelError: the file cannot be read, holds code, or does not match any architecture.
    """
    path = Path(path).expanduser()
    content = _torch_load(path)
    if not isinstance(content, Mapping):
        raise ModelError(f"model file '{path}' holds a {type(content).__name__}, not a state dict")
    preprocessing: Dict[str, Any] = {}
    provenance: Dict[str, Any] = {}
    similarity = "lncc"
    refinement = NO_REFINEMENT
    domain = Domain()
    if content.get("format") == MODEL_FILE_FORMAT:
        version = content.get("format_version")
        if version != MODEL_FILE_VERSION:
            raise ModelError(f"model file '{path}' has format version {version!r}; this version of "
                             f"itk_gradicon reads version {MODEL_FILE_VERSION}")
        try:
            arch = Architecture.from_dict(content["architecture"])
            state = content["state_dict"]
        except (KeyError, TypeError) as err:
            raise ModelError(f"model file '{path}' lacks {err}") from err
        preprocessing = dict(content.get("preprocessing") or {})
        provenance = dict(content.get("provenance") or {})
        similarity = str(content.get("similarity", "lncc"))
        if content.get("refinement") is not None:
            refinement = Refinement.from_dict(content["refinement"], f"model file '{path}'")
        if content.get("domain") is not None:
            domain = Domain.from_dict(content["domain"], f"model file '{path}'")
        name = name or str(content.get("name") or path.stem)
    else:
        state = content
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ModelError(f"model file '{path}' is neither a state dict of tensors nor an "
                             "itk_gradicon model file")
        if name in PUBLISHED:
            arch = PUBLISHED[name].architecture
            similarity = PUBLISHED[name].similarity
            refinement = PUBLISHED[name].refinement
        else:
            arch = _infer_architecture(state, input_shape)
    with torch.device("meta"):  # no memory and no random initialisation: every tensor comes from the file
        network = build_network(arch)
    _check_strict(network, state, f"model file '{path}'")
    expected = network.state_dict()  # dtypes as built (float32), whatever precision the file stores
    network.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True, assign=True)
    network.eval()
    for p in network.parameters():
        p.requires_grad_(False)
    return Model(name=name or path.stem, architecture=arch, network=network, source=path,
                 sha256=sha256_of(path), preprocessing=preprocessing, provenance=provenance,
                 similarity=similarity, refinement=refinement, domain=domain)


def load_model(spec: str = DEFAULT_MODEL, *, input_shape=None, progress=None) -> Model:
    """Resolve ``--model NAME|FILE`` and load it (see the module docstring).

    Example:
        >>> model = load_model("unigradicon")          # doctest: +SKIP
        >>> model.architecture.input_shape
        (175, 175, 175)
    """
    if spec in PUBLISHED:
        return load_weight_file(ensure_published(spec, progress=progress), name=spec)
    if spec in BUNDLED:
        bundled = BUNDLED[spec]
        if not bundled.path.is_file():
            raise ModelNotAvailableError(f"bundled model {spec!r} is missing from this installation "
                                         f"({bundled.path}); reinstall itk_gradicon")
        return load_weight_file(bundled.path, name=spec)
    path = Path(spec).expanduser()
    if path.exists():
        return load_weight_file(path, input_shape=input_shape)
    looks_like_file = os.sep in spec or path.suffix != ""
    if looks_like_file:
        raise ModelError(f"model file '{spec}' does not exist")
    raise ModelError(f"unknown model {spec!r}: not a known name ({', '.join([*BUNDLED, *PUBLISHED])}) and "
                     "no such file")


def save_model_file(path: Path, network: torch.nn.Module, architecture: Architecture, *,
                    name: str, preprocessing: Optional[Mapping[str, Any]] = None,
                    provenance: Optional[Mapping[str, Any]] = None, similarity: str = "lncc",
                    refinement: Refinement = NO_REFINEMENT, domain: Optional[Domain] = None) -> Path:
    """Write a self-describing model file atomically (loadable with ``weights_only=True``); it records
    the instance optimisation the model recommends (``refinement``; ``gradicon train`` writes
    :data:`FIELD_REFINEMENT`)."""
    path = Path(path)
    content = {
        "format": MODEL_FILE_FORMAT,
        "format_version": MODEL_FILE_VERSION,
        "name": name,
        "architecture": architecture.to_dict(),
        "preprocessing": dict(preprocessing or {}),
        "provenance": {"written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **dict(provenance or {})},
        "similarity": similarity,
        "refinement": refinement.to_dict(),
        **({"domain": domain.to_dict()} if domain is not None else {}),
        "state_dict": {k: v.detach().cpu().clone() for k, v in network.state_dict().items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        torch.save(content, tmp)
    return path
