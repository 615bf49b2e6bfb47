"""Composite training sets: listing, checking, pair sampling, preprocessing, caching, augmentation.

Vocabulary:

* an **entry** is one image file with its subject id, modality, optional mask and segmentation;
* a **view** is a group of co-registered images of one subject (one ``group`` of a CSV file, e.g. the
  FLAIR and T1c of one BraTS session); without groups every image is its own view;
* a **member** is one data set of the composite set; it pairs views ``inter``-subject (views of two
  different subjects) or ``intra``-subject (two views of one subject).

Pairs are a pure function of ``(seed, global pair index)``: the index picks the epoch and the
position in it, the epoch's list of members is drawn from ``(seed, epoch)``, the pair inside the member
from ``(seed, index)``, its augmentation from ``(seed, index)`` too. No random state lives in the
DataLoader workers, so any number of workers, and a run resumed at any step, see exactly the same
pairs. Distributed training shards the index stream (see :class:`StepBatchSampler`).

Every image reaches the network exactly as at registration: read and checked by
:func:`itk_gradicon.imageio.read_image`, normalised by
:class:`itk_gradicon.preprocess.IntensityNormalization` (masked by
:func:`itk_gradicon.preprocess.apply_input_mask` for input masking), and laid out by
:class:`itk_gradicon.geometry.NetworkFrame`: the pair's target image (``B``; ``T`` in an M2M cycle)
keeps the reference layout and every other image is laid out along its axes, as
:func:`itk_gradicon.register` lays the moving image out along the fixed image's axes.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from ..errors import ConfigError, InputError
from ..geometry import ImageGrid, NetworkFrame, canonical_axes
from ..imageio import atomic_output, read_image_header, short_error_message
from ..preprocess import IntensityNormalization, apply_input_mask
from .config import AugmentationConfig, DatasetConfig, SynthesisConfig, TrainConfig, did_you_mean
from .synthesis import LabelMapEntry, Synthesizer, check_label_map

CSV_COLUMNS = ("image", "subject", "modality", "group", "mask", "segmentation")
IMAGE_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".img.gz", ".img", ".hdr", ".tif",
                 ".tiff", ".png", ".vtk", ".gipl.gz", ".gipl")
CACHE_VERSION = 1
_PURPOSE_EPOCH, _PURPOSE_PAIR, _PURPOSE_AUGMENT, _PURPOSE_SYNTHESIS = 0, 1, 2, 6
_MAX_TRIES = 200


# ------------------------------------------------------------------------------------------------
# entries and members
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageEntry:
    """One image of a member, checked and described.

    Attributes:
        path: absolute path of the image.
        subject: subject id.
        modality: modality name (``ct``, ``t1w``, ...).
        normalization: the intensity normalisation of this image.
        group: co-registration group within the subject (the view key).
        mask, segmentation: absolute paths or ``None``.
        grid: the image grid, read from the file header.
        origin: where the entry came from, for messages (``list.csv line 3``).
    """

    path: Path
    subject: str
    modality: str
    normalization: IntensityNormalization
    group: str
    mask: Optional[Path]
    segmentation: Optional[Path]
    grid: ImageGrid
    origin: str


@dataclass
class Member:
    """One data set of the composite set, after listing and checking its files.

    Attributes:
        index: position in the configuration's ``datasets``.
        config: its configuration section.
        entries: its images.
        views: image indices of each view (co-registered images of one subject).
        view_subject: subject of each view.
        mask_mode: what its masks do (``input``, ``loss``, ``both``; ``None`` without masks).
    """

    index: int
    config: DatasetConfig
    entries: List[ImageEntry]
    views: List[Tuple[int, ...]]
    view_subject: List[str]
    mask_mode: Optional[str]
    _subject_views: Dict[str, List[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for v, subject in enumerate(self.view_subject):
            self._subject_views.setdefault(subject, []).append(v)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def subjects(self) -> List[str]:
        return sorted(self._subject_views)

    @property
    def modalities(self) -> Tuple[str, ...]:
        return tuple(sorted({e.modality for e in self.entries}))

    @property
    def has_segmentations(self) -> bool:
        return any(e.segmentation is not None for e in self.entries)

    @property
    def loss_masks(self) -> bool:
        return self.mask_mode in ("loss", "both")

    @property
    def input_masks(self) -> bool:
        return self.mask_mode in ("input", "both")

    def views_of(self, subject: str) -> List[int]:
        return self._subject_views[subject]

    def intra_subjects(self) -> List[str]:
        """Subjects with two or more views (the ones an intra-subject member can pair)."""
        return [s for s in self.subjects if len(self._subject_views[s]) >= 2]


@dataclass
class SyntheticMember(Member):
    """A ``kind: synthetic`` data set: label maps from which pairs are synthesised (:mod:`.synthesis`).

    Each label map is one subject and one view; ``entries`` is empty (there are no image files).
    """

    label_maps: List[LabelMapEntry] = field(default_factory=list)

    @property
    def modalities(self) -> Tuple[str, ...]:
        return ("synthetic",)

    @property
    def has_segmentations(self) -> bool:
        return True


def _where(member_index: int, cfg: DatasetConfig) -> str:
    return f"datasets[{member_index}] '{cfg.name}'"


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _stem(path: Path) -> str:
    name = path.name
    for ending in IMAGE_ENDINGS:
        if name.lower().endswith(ending):
            return name[: -len(ending)]
    return path.stem


def _listed_rows(cfg: DatasetConfig, train: TrainConfig, where: str) -> List[Dict[str, Any]]:
    """Rows ``{image, subject, modality, group, mask, segmentation, origin}`` with absolute paths."""
    spec = cfg.images
    root = train.resolve(cfg.root) if cfg.root else None
    if root is not None and not root.is_dir():
        raise ConfigError(f"{where}.root: folder '{root}' does not exist")
    rows: List[Dict[str, Any]] = []
    if _is_glob(spec):
        base = root if root is not None else train.base_dir
        pattern = spec if Path(spec).expanduser().is_absolute() else str(base / spec)
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True))
        matches = [p for p in matches if p.is_file()]
        derived = set()
        for p in matches:
            for template in (cfg.mask_template, cfg.segmentation_template):
                if template:
                    derived.add(_from_template(template, p).resolve())
        for p in matches:
            if p.resolve() not in derived:
                rows.append({"image": p, "origin": f"glob '{spec}'"})
        if not rows:
            raise ConfigError(f"{where}.images: the pattern '{pattern}' matches no file, so the data set is empty")
    else:
        list_path = train.resolve(spec)
        if not list_path.is_file():
            raise ConfigError(f"{where}.images: '{list_path}' does not exist (give a CSV file, a list file "
                              "or a glob pattern)")
        base = root if root is not None else list_path.parent
        if list_path.suffix.lower() in (".csv", ".tsv"):
            rows = _read_csv(list_path, base, where)
        else:
            rows = _read_list(list_path, base, where)
        if not rows:
            raise ConfigError(f"{where}.images: '{list_path}' lists no image, so the data set is empty")
    for row in rows:
        for key, template in (("mask", cfg.mask_template), ("segmentation", cfg.segmentation_template)):
            if template and not row.get(key):
                row[key] = _from_template(template, row["image"])
    return rows


def _from_template(template: str, image: Path) -> Path:
    return Path(template.format(dir=str(image.parent), stem=_stem(image), name=image.name)).expanduser()


def _absolute(value: str, base: Path) -> Path:
    p = Path(value.strip()).expanduser()
    return p if p.is_absolute() else base / p


def _read_list(path: Path, base: Path, where: str) -> List[Dict[str, Any]]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{where}.images: cannot read '{path}': {err}") from None
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        rows.append({"image": _absolute(text, base), "origin": f"{path.name} line {number}"})
    return rows


def _read_csv(path: Path, base: Path, where: str) -> List[Dict[str, Any]]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh, delimiter=delimiter)
            table = [r for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f"{where}.images: cannot read '{path}' as CSV: {err}") from None
    table = [r for r in table if any(c.strip() for c in r) and not r[0].lstrip().startswith("#")]
    if not table:
        return []
    header = [h.strip().lower() for h in table[0]]
    for h in header:
        if h not in CSV_COLUMNS:
            raise ConfigError(f"{where}.images: '{path.name}' has an unknown column {h!r}"
                              f"{did_you_mean(h, CSV_COLUMNS)}; allowed columns: {', '.join(CSV_COLUMNS)}")
    if "image" not in header:
        raise ConfigError(f"{where}.images: '{path.name}' needs a header row with an 'image' column "
                          f"(allowed columns: {', '.join(CSV_COLUMNS)})")
    rows = []
    for number, values in enumerate(table[1:], start=2):
        if len(values) > len(header):
            raise ConfigError(f"{where}.images: {path.name} line {number} has {len(values)} values for "
                              f"{len(header)} columns")
        raw = {h: (values[i].strip() if i < len(values) else "") for i, h in enumerate(header)}
        if not raw["image"]:
            raise ConfigError(f"{where}.images: {path.name} line {number} has no image path")
        row: Dict[str, Any] = {"origin": f"{path.name} line {number}"}
        for key in CSV_COLUMNS:
            value = raw.get(key) or None
            if value is not None and key in ("image", "mask", "segmentation"):
                value = _absolute(value, base)
            row[key] = value
        rows.append(row)
    return rows


def read_grid(path: Path, *, what: str = "image") -> Tuple[ImageGrid, int]:
    """The grid and the number of pixel components of an image file, from its header only.

    Raises:
        InputError: the file is not an image ITK can read, or its geometry is invalid.
    """
    header = read_image_header(path, what=what)
    return header.grid, header.components


def scan_member(index: int, cfg: DatasetConfig, train: TrainConfig, *, dimension: int,
                ct_window: Tuple[float, float], quantile_range: Optional[Tuple[float, float]]) -> Member:
    """List, check and describe the images of one data set (headers only; pixels are read later).

    Raises:
        ConfigError: naming the data set and the file: missing or unreadable files, wrong dimension,
            unknown modality, masks off their image's grid, groups whose images do not share a grid,
            a data set that cannot form a single pair.
    """
    where = _where(index, cfg)
    key = f"datasets[{index}]"
    rows = _listed_rows(cfg, train, key)
    if cfg.kind == "synthetic":
        return _scan_synthetic(index, cfg, rows, where, dimension)
    _check_listed_files_exist(rows, where)
    window = tuple(cfg.ct_window) if cfg.ct_window is not None else tuple(ct_window)
    quantiles = tuple(cfg.quantile_range) if cfg.quantile_range is not None else quantile_range
    pattern = re.compile(cfg.subject_pattern) if cfg.subject_pattern else None
    entries: List[ImageEntry] = []
    seen = set()
    for number, row in enumerate(rows):
        image = Path(row["image"]).resolve()
        if image in seen:
            raise ConfigError(f"{where}: image '{image}' is listed twice ({row['origin']})")
        seen.add(image)
        entries.append(_image_entry(number, row, image, cfg, train, key, where, pattern, window, quantiles,
                                    dimension))
    views = _views(entries, where)
    has_mask = [e.mask is not None for e in entries]
    if any(has_mask) and not all(has_mask):
        e = entries[has_mask.index(False)]
        raise ConfigError(f"{where}: masks are given for some images but not for '{e.path.name}' ({e.origin}); "
                          "give a mask for every image of the data set or for none")
    member = Member(index, cfg, entries, [tuple(v) for v in views.values()], [k[0] for k in views],
                    cfg.mask_mode if any(has_mask) else None)
    _check_pairing(member, cfg, where)
    return member


def _check_listed_files_exist(rows: List[Dict[str, Any]], where: str) -> None:
    missing = []
    for row in rows:
        for kind in ("image", "mask", "segmentation"):
            if row.get(kind) is not None and not Path(row[kind]).is_file():
                missing.append(f"{kind} '{row[kind]}' ({row['origin']})")
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ConfigError(f"{where}: {len(missing)} listed file(s) do not exist: "
                          f"{'; '.join(missing[:3])}{more}")


def _image_entry(number: int, row: Dict[str, Any], image: Path, cfg: DatasetConfig, train: TrainConfig, key: str,
                 where: str, pattern: Optional["re.Pattern[str]"], window, quantiles, dimension: int) -> ImageEntry:
    """One listed image with its modality, normalisation, subject, group and checked grids."""
    modality = row.get("modality") or cfg.modality
    if modality is None:
        raise ConfigError(f"{where}: image '{image}' ({row['origin']}) has no modality: add a 'modality' "
                          f"column or set {key}.modality")
    normalization = IntensityNormalization(
        train.normalization_of(modality, f"{where}: modality of '{image.name}' ({row['origin']})"),
        window, quantiles)
    if row.get("subject"):
        subject = str(row["subject"])
    elif pattern is not None:
        found = pattern.search(str(image))
        if not found or found.group(1) is None:
            raise ConfigError(f"{where}: subject_pattern {cfg.subject_pattern!r} does not match "
                              f"'{image}' ({row['origin']})")
        subject = found.group(1)
    else:
        subject = str(image)
    grid = _checked_grid(image, "image", where, row["origin"], dimension)
    for kind in ("mask", "segmentation"):
        if row.get(kind) is not None:
            other = _checked_grid(Path(row[kind]), kind, where, row["origin"], dimension)
            if not grid.matches(other):
                raise ConfigError(f"{where}: {kind} '{row[kind]}' ({row['origin']}) is not on its image's "
                                  f"grid (size {other.size} vs {grid.size}, or spacing/origin/direction differ)")
    group = str(row.get("group") or f"#{number}")
    return ImageEntry(image, subject, modality, normalization, group,
                      Path(row["mask"]).resolve() if row.get("mask") else None,
                      Path(row["segmentation"]).resolve() if row.get("segmentation") else None,
                      grid, row["origin"])


def _views(entries: List[ImageEntry], where: str) -> Dict[Tuple[str, str], List[int]]:
    """Indices of the entries of each (subject, group); a group's co-registered images share one grid."""
    views: Dict[Tuple[str, str], List[int]] = {}
    for i, e in enumerate(entries):
        views.setdefault((e.subject, e.group), []).append(i)
    for (subject, group), members in views.items():
        first = entries[members[0]]
        for i in members[1:]:
            if not first.grid.matches(entries[i].grid):
                raise ConfigError(f"{where}: group {group!r} of subject {subject!r} holds co-registered images "
                                  f"on different grids ('{first.path.name}' and '{entries[i].path.name}'); "
                                  "resample them onto one grid")
    return views


def _check_pairing(member: Member, cfg: DatasetConfig, where: str) -> None:
    if cfg.pairing == "inter" and len(member.subjects) < 2:
        raise ConfigError(f"{where}: pairing 'inter' needs images of at least two subjects; all "
                          f"{len(member.entries)} image(s) belong to subject {member.subjects[0]!r} "
                          "(use pairing: intra, or check 'subject' / subject_pattern)")
    if cfg.pairing == "intra" and not member.intra_subjects():
        raise ConfigError(f"{where}: pairing 'intra' needs a subject with two or more images (views), but each "
                          f"of its {len(member.subjects)} subject(s) has only one; give the 'subject' of each "
                          "image (CSV column or subject_pattern), or use pairing: inter")


def _scan_synthetic(index: int, cfg: DatasetConfig, rows: List[Dict[str, Any]], where: str,
                    dimension: int) -> SyntheticMember:
    """Check every label map of a synthetic data set (pixels included: they must be label maps)."""
    missing = [f"label map '{row['image']}' ({row['origin']})" for row in rows if not Path(row["image"]).is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ConfigError(f"{where}: {len(missing)} listed file(s) do not exist: {'; '.join(missing[:3])}{more}")
    ignored = sorted({k for row in rows for k in ("mask", "segmentation", "modality") if row.get(k)})
    if ignored:
        raise ConfigError(f"{where}: a synthetic data set lists label maps only; remove the column(s) "
                          f"{', '.join(ignored)}")
    maps: List[LabelMapEntry] = []
    seen = set()
    for row in rows:
        path = Path(row["image"]).resolve()
        if path in seen:
            raise ConfigError(f"{where}: label map '{path}' is listed twice ({row['origin']})")
        seen.add(path)
        try:
            grid, labels = check_label_map(path, what=f"label map ({row['origin']})", dimension=dimension)
        except InputError as err:
            raise ConfigError(f"{where}: {err}") from None
        except Exception as err:  # anything else ITK's readers may raise for odd files
            raise ConfigError(f"{where}: label map '{path}' ({row['origin']}) cannot be used: "
                              f"{short_error_message(err)}") from None
        maps.append(LabelMapEntry(path, grid, labels, row["origin"]))
    if cfg.pairing == "inter" and len(maps) < 2:
        raise ConfigError(f"{where}: pairing 'inter' needs at least two label maps, found {len(maps)} "
                          "(use pairing: intra to deform one map twice)")
    settings = cfg.synthesis
    if settings is not None and settings.shapes < 1.0:
        low, high = settings.brain_labels
        for m in maps:
            if not any(low <= v <= high for v in m.labels):
                raise ConfigError(f"{where}: label map '{m.path}' ({m.origin}) has no label in "
                                  f"synthesis.brain_labels [{low}, {high}]; its labels: "
                                  f"{', '.join(map(str, m.labels[:12]))}{' ...' if len(m.labels) > 12 else ''}")
    return SyntheticMember(index, cfg, [], [(i,) for i in range(len(maps))], [str(m.path) for m in maps],
                           None, label_maps=maps)


def _checked_grid(path: Path, kind: str, where: str, origin: str, dimension: int) -> ImageGrid:
    try:
        grid, components = read_grid(path, what=kind)
    except InputError as err:
        raise ConfigError(f"{where}: {origin}: {err}") from None
    except Exception as err:  # anything else ITK's header readers may raise for odd files
        raise ConfigError(f"{where}: {kind} '{path}' ({origin}) cannot be used: {short_error_message(err)}") from None
    if components != 1:
        raise ConfigError(f"{where}: {kind} '{path}' ({origin}) has {components} components per voxel; "
                          "a scalar image is needed")
    if grid.dimension != dimension:
        raise ConfigError(f"{where}: {kind} '{path}' ({origin}) is {grid.dimension}-D but the network is "
                          f"{dimension}-D")
    return grid


# ------------------------------------------------------------------------------------------------
# the composite set and its pair plan
# ------------------------------------------------------------------------------------------------

def _rng(seed: int, purpose: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(purpose), *map(int, keys)]))


def derived_seed(seed: int, purpose: int, *keys: int) -> int:
    """A 63-bit seed that depends only on its arguments (for torch generators)."""
    state = np.random.SeedSequence([int(seed), int(purpose), *map(int, keys)]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1] >> 1)


@dataclass(frozen=True)
class PairPlan:
    """What one training sample holds: which image plays which role, and which share a transform.

    Attributes:
        member: index of the member in the composite set.
        images: role -> image index in the member (``A``, ``A_loss``, ``B``, ``B_loss``; or ``S``,
            ``T``, ``Sp``, ``Tp`` in an M2M cycle).
        views: role -> view label; roles with one label are co-registered and get one augmentation.
        anchor: the role laid out in the reference layout (the others follow its axes).
        prealigned: M2M: whether ``Sp``, ``Tp`` is a pre-aligned bridge pair.
    """

    member: int
    images: Tuple[Tuple[str, int], ...]
    views: Tuple[Tuple[str, str], ...]
    anchor: str
    prealigned: bool = False

    def image(self, role: str) -> int:
        return dict(self.images)[role]


class CompositeSet:
    """The members, their sampling shares, and the deterministic pair plan.

    Args:
        members: checked members (weight 0 ones included; they are never drawn).
        train: the configuration (sampling, objective, seed).
    """

    def __init__(self, members: Sequence[Member], train: TrainConfig) -> None:
        self.members = list(members)
        self.sampling = train.sampling
        self.objective = train.objective
        self.seed = int(train.seed)
        weights = np.array([m.config.weight for m in self.members], dtype=np.float64)
        mode = self.sampling.mode
        if mode == "per_dataset":
            counts = np.array([int(round(self.sampling.pairs_per_dataset * w)) if w > 0 else 0 for w in weights])
            counts[(weights > 0) & (counts == 0)] = 1
            self.counts: Optional[np.ndarray] = counts
            self.pairs_per_epoch = int(counts.sum())
            self.shares = counts / counts.sum()
        else:
            if mode == "weighted":
                keys = [(m.modalities, m.config.region) for m in self.members]
            else:
                keys = [m.config.region for m in self.members]
            active = [k for k, w in zip(keys, weights) if w > 0]
            share = np.array([w / active.count(k) if w > 0 else 0.0 for k, w in zip(keys, weights)])
            self.counts = None
            self.pairs_per_epoch = int(self.sampling.pairs_per_epoch)
            self.shares = share / share.sum()
        self._epoch_cache: "OrderedDict[int, np.ndarray]" = OrderedDict()

    # ---- epochs -------------------------------------------------------------------------------
    def epoch_members(self, epoch: int) -> np.ndarray:
        """The member of every pair of ``epoch``, in order (a function of the seed and the epoch)."""
        cached = self._epoch_cache.get(epoch)
        if cached is not None:
            return cached
        rng = _rng(self.seed, _PURPOSE_EPOCH, epoch)
        if self.counts is not None:
            order = np.repeat(np.arange(len(self.members)), self.counts)
            rng.shuffle(order)
        else:
            order = rng.choice(len(self.members), size=self.pairs_per_epoch, p=self.shares)
        if len(self._epoch_cache) >= 4:
            self._epoch_cache.popitem(last=False)
        self._epoch_cache[epoch] = order
        return order

    def plan(self, index: int) -> PairPlan:
        """The sample of global pair index ``index``."""
        epoch, position = divmod(int(index), self.pairs_per_epoch)
        member_index = int(self.epoch_members(epoch)[position])
        rng = _rng(self.seed, _PURPOSE_PAIR, index)
        member = self.members[member_index]
        if isinstance(member, SyntheticMember):
            return draw_synthetic_pair(member, member_index, rng)
        if self.objective.kind == "m2m":
            prealigned = bool(rng.random() < self.objective.prealigned_bridges)
            return draw_cycle(member, member_index, rng, prealigned=prealigned)
        return draw_pair(member, member_index, rng, self.objective.loss_randomisation)

    def epochs_to_steps(self, epochs: float, global_batch: int) -> int:
        """Optimiser steps that draw ``epochs`` epochs of pairs with ``global_batch`` pairs per step."""
        return max(1, int(np.ceil(epochs * self.pairs_per_epoch / global_batch)))

    def describe(self) -> List[str]:
        """One line per member: images, subjects, views, modalities, region, pairing, share of pairs."""
        lines = []
        for m, share in zip(self.members, self.shares):
            if isinstance(m, SyntheticMember):
                lines.append(f"{m.name}: {len(m.label_maps)} label maps, synthetic images, "
                             f"{m.config.region}, {m.config.pairing}-subject, segmentations; "
                             f"{100 * share:.1f}% of pairs")
                continue
            masks = f", masks ({m.mask_mode})" if m.mask_mode else ""
            segs = ", segmentations" if m.has_segmentations else ""
            lines.append(f"{m.name}: {len(m.entries)} images, {len(m.subjects)} subjects, {len(m.views)} views, "
                         f"{'/'.join(m.modalities)}, {m.config.region}, {m.config.pairing}-subject{masks}{segs}; "
                         f"{100 * share:.1f}% of pairs")
        return lines

    def provenance(self) -> List[Dict[str, Any]]:
        """What the model file records about each data set."""
        return [{"name": m.name, "images": len(m.entries), "subjects": len(m.subjects), "views": len(m.views),
                 "modalities": list(m.modalities), "region": m.config.region, "pairing": m.config.pairing,
                 "weight": m.config.weight, "share": float(share), "source": m.config.images}
                for m, share in zip(self.members, self.shares)]


def _pick(rng: np.random.Generator, items: Sequence[int]) -> int:
    return int(items[int(rng.integers(len(items)))])


def _draw_views(member: Member, rng: np.random.Generator) -> Tuple[int, int]:
    """Two views: of two different subjects (inter) or of one subject (intra), in random order."""
    if member.config.pairing == "intra":
        subject = member.intra_subjects()[int(rng.integers(len(member.intra_subjects())))]
        choices = member.views_of(subject)
        first, second = rng.choice(len(choices), size=2, replace=False)
        return choices[int(first)], choices[int(second)]
    n = len(member.views)
    first = int(rng.integers(n))
    for _ in range(_MAX_TRIES):
        second = int(rng.integers(n))
        if member.view_subject[second] != member.view_subject[first]:
            return first, second
    others = [v for v in range(n) if member.view_subject[v] != member.view_subject[first]]
    return first, _pick(rng, others)


def draw_synthetic_pair(member: SyntheticMember, member_index: int, rng: np.random.Generator) -> PairPlan:
    """Two label maps (``inter``: different ones; ``intra``: one map, deformed twice)."""
    n = len(member.label_maps)
    first = int(rng.integers(n))
    second = first
    if member.config.pairing == "inter":
        second = (first + 1 + int(rng.integers(n - 1))) % n
    return PairPlan(member_index, (("A", first), ("B", second)), (("A", "a"), ("B", "b")), anchor="B")


def draw_pair(member: Member, member_index: int, rng: np.random.Generator, randomisation: str) -> PairPlan:
    """A (uni/multi)GradICON pair with its loss images (multiGradICON's loss randomisation).

    ``B``: the similarity is computed on the network's inputs. ``R``: on an image of the same view
    as each input, drawn independently (possibly the input itself). ``F``: as ``R`` but both loss
    images of one modality, drawn among the modalities the two views share (the inputs are used when
    they share none).
    """
    view_A, view_B = _draw_views(member, rng)
    images_A, images_B = member.views[view_A], member.views[view_B]
    input_A, input_B = _pick(rng, images_A), _pick(rng, images_B)
    loss_A, loss_B = input_A, input_B
    if randomisation == "R":
        loss_A, loss_B = _pick(rng, images_A), _pick(rng, images_B)
    elif randomisation == "F":
        mods_A = {member.entries[i].modality for i in images_A}
        mods_B = {member.entries[i].modality for i in images_B}
        common = sorted(mods_A & mods_B)
        if common:
            modality = common[int(rng.integers(len(common)))]
            loss_A = _pick(rng, [i for i in images_A if member.entries[i].modality == modality])
            loss_B = _pick(rng, [i for i in images_B if member.entries[i].modality == modality])
    return PairPlan(member_index, (("A", input_A), ("A_loss", loss_A), ("B", input_B), ("B_loss", loss_B)),
                    (("A", "a"), ("A_loss", "a"), ("B", "b"), ("B_loss", "b")), anchor="B")


def m2m_roles(member: Member) -> Tuple[str, str]:
    """The (source, target) modalities of an M2M member: its two modalities in sorted order."""
    mods = member.modalities
    return mods[0], mods[1]


def draw_cycle(member: Member, member_index: int, rng: np.random.Generator, *, prealigned: bool) -> PairPlan:
    """An M2M-Reg cycle ``S -> T -> S' -> T' -> S``.

    ``S``, ``S'`` have the source modality and ``T``, ``T'`` the target modality. Every registered
    pair ``(S, T)``, ``(T, S')``, ``(S', T')``, ``(T', S)`` joins two different subjects, and
    ``S' != S``, ``T' != T`` (the paper's protocol); a pre-aligned bridge ``(S', T')`` is instead two
    images of one view (one subject, co-registered).

    Raises:
        ConfigError: no such cycle can be drawn from the member's images.
    """
    source, target = m2m_roles(member)
    entries = member.entries
    of = {m: [i for i, e in enumerate(entries) if e.modality == m] for m in (source, target)}
    subj = lambda i: entries[i].subject  # noqa: E731
    bridges = []
    if prealigned:
        for view in member.views:
            s_list = [i for i in view if entries[i].modality == source]
            t_list = [i for i in view if entries[i].modality == target]
            if s_list and t_list:
                bridges.append((s_list, t_list))
        if not bridges:
            raise ConfigError(f"{_where(member.index, member.config)}: prealigned_bridges needs a group holding "
                              f"a {source} and a {target} image of one subject (CSV column 'group')")
    for _ in range(_MAX_TRIES):
        if prealigned:
            s_list, t_list = bridges[int(rng.integers(len(bridges)))]
            sp, tp = _pick(rng, s_list), _pick(rng, t_list)
            s_candidates = [i for i in of[source] if subj(i) != subj(sp)]
            if not s_candidates:
                continue
            s = _pick(rng, s_candidates)
            t_candidates = [i for i in of[target] if subj(i) not in (subj(s), subj(sp))]
            if not t_candidates:
                continue
            t = _pick(rng, t_candidates)
            views = (("S", "s"), ("T", "t"), ("Sp", "bridge"), ("Tp", "bridge"))
        else:
            s = _pick(rng, of[source])
            t_candidates = [i for i in of[target] if subj(i) != subj(s)]
            if not t_candidates:
                continue
            t = _pick(rng, t_candidates)
            sp_candidates = [i for i in of[source] if subj(i) != subj(t) and i != s]
            if not sp_candidates:
                continue
            sp = _pick(rng, sp_candidates)
            tp_candidates = [i for i in of[target] if subj(i) not in (subj(sp), subj(s)) and i != t]
            if not tp_candidates:
                continue
            tp = _pick(rng, tp_candidates)
            views = (("S", "s"), ("T", "t"), ("Sp", "sp"), ("Tp", "tp"))
        return PairPlan(member_index, (("S", s), ("T", t), ("Sp", sp), ("Tp", tp)), views, anchor="T",
                        prealigned=prealigned)
    raise ConfigError(f"{_where(member.index, member.config)}: no M2M cycle can be formed: it needs "
                      f"{source} and {target} images of at least three subjects, so that every registered "
                      "pair joins two different subjects")


def check_composite(composite: CompositeSet, train: TrainConfig) -> List[str]:
    """Checks that need the whole set; returns notes for the user, raises :class:`ConfigError`."""
    notes: List[str] = []
    objective = train.objective
    active = [m for m in composite.members if m.config.weight > 0]
    synthetic = [m for m in active if isinstance(m, SyntheticMember)]
    if synthetic and objective.kind == "m2m":
        raise ConfigError(f"{_where(synthetic[0].index, synthetic[0].config)}: synthetic data sets train "
                          "objective kind: gradicon; M2M-Reg needs real multi-modal subjects")
    if objective.kind == "m2m":
        for m in active:
            if len(m.modalities) != 2:
                raise ConfigError(f"{_where(m.index, m.config)}: an M2M-Reg data set needs exactly two "
                                  f"modalities (source and target), found {len(m.modalities)}: "
                                  f"{', '.join(m.modalities)}")
            rng = _rng(train.seed, 99, m.index)
            draw_cycle(m, m.index, rng, prealigned=False)
            if objective.prealigned_bridges > 0:
                draw_cycle(m, m.index, rng, prealigned=True)
    elif objective.loss_randomisation != "B" and not any(len(v) > 1 for m in active for v in m.views):
        notes.append(f"loss_randomisation {objective.loss_randomisation}: no data set has groups of "
                     "co-registered images, so the similarity always uses the network's inputs (as B)")
    if objective.dice_weight > 0 and not any(m.has_segmentations for m in active):
        raise ConfigError("objective.dice_weight: a Dice term needs segmentations, but no data set with "
                          "weight > 0 has any (CSV column 'segmentation' or segmentation_template)")
    if train.augmentation.invert_ct > 0 and not any(e.normalization.modality == "ct"
                                                    for m in active for e in m.entries):
        notes.append("augmentation.invert_ct: no CT image in the data sets, so nothing is inverted")
    return notes


# ------------------------------------------------------------------------------------------------
# reading, preprocessing and caching
# ------------------------------------------------------------------------------------------------

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
        import itk

        from ..imageio import read_image, read_label_image

        if kind == "image":
            image = read_image(entry.path, what=f"training image ({entry.origin})", dimension=self.dimension)
            array = itk.array_view_from_image(image)
            normalized = entry.normalization(array, what=f"training image '{entry.path}' ({entry.origin})")
            if input_mask and entry.mask is not None:
                mask = read_label_image(entry.mask, what="training mask", dimension=self.dimension)
                normalized = apply_input_mask(normalized, itk.array_view_from_image(mask))
            return frame.tensor(normalized)[0, 0].numpy()
        path = entry.mask if kind == "mask" else entry.segmentation
        labels = read_label_image(path, what=f"training {kind}", dimension=self.dimension)
        array = np.asarray(itk.array_view_from_image(labels))
        if kind == "mask":
            array = (array > 0).astype(np.float32)
        return frame.tensor(array.astype(np.float32), mode="nearest")[0, 0].numpy()


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


# ------------------------------------------------------------------------------------------------
# augmentation
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Augmentation:
    """The random transform of one sample: shared axis flips/permutation, an affine per view.

    Attributes:
        flips: network axes to reverse.
        permutation: network axis ``c`` of the result is axis ``permutation[c]`` of the input.
        affines: view label -> ``d x (d+1)`` matrix for :func:`torch.nn.functional.affine_grid`.
        inverted: image roles whose CT image becomes ``1 - CT``.
    """

    flips: Tuple[int, ...]
    permutation: Tuple[int, ...]
    affines: Mapping[str, np.ndarray]
    inverted: Tuple[str, ...]


def draw_augmentation(cfg: AugmentationConfig, rng: np.random.Generator, shape: Sequence[int],
                      view_labels: Sequence[str], ct_roles: Sequence[str]) -> Augmentation:
    """Draw the flips, permutation, per-view affine matrices and CT inversions of one sample."""
    d = len(shape)
    flips = tuple(c for c in range(d) if rng.random() < 0.5) if cfg.flips else ()
    permutation = list(range(d))
    if cfg.permutations:
        for size in sorted(set(shape)):
            axes = [c for c in range(d) if shape[c] == size]
            shuffled = [axes[int(i)] for i in rng.permutation(len(axes))]
            for c, source in zip(axes, shuffled):
                permutation[c] = source
    affines = {}
    for label in sorted(set(view_labels)):
        noise = rng.standard_normal((d, d + 1))
        if cfg.affine_std > 0:
            theta = np.concatenate([np.eye(d), np.zeros((d, 1))], axis=1) + cfg.affine_std * noise
            affines[label] = theta
    inverted = tuple(r for r in ct_roles if rng.random() < cfg.invert_ct) if cfg.invert_ct > 0 else ()
    return Augmentation(flips, tuple(permutation), affines, inverted)


def apply_augmentation(tensor: torch.Tensor, aug: Augmentation, view: str, *, nearest: bool) -> torch.Tensor:
    """Apply the flips, permutation and the view's affine warp to a ``[C, *shape]`` tensor.

    Images are interpolated linearly with border values outside (as the reference's augmentation);
    masks and label maps (``nearest``) take the nearest value and 0 outside.
    """
    d = tensor.dim() - 1
    if aug.flips:
        tensor = torch.flip(tensor, [1 + c for c in aug.flips])
    if tuple(aug.permutation) != tuple(range(d)):
        tensor = tensor.permute(0, *[1 + p for p in aug.permutation])
    theta = aug.affines.get(view)
    if theta is not None:
        batch = tensor[None]
        grid = F.affine_grid(torch.as_tensor(theta, dtype=batch.dtype)[None], list(batch.shape), align_corners=True)
        batch = F.grid_sample(batch, grid, mode="nearest" if nearest else "bilinear",
                              padding_mode="zeros" if nearest else "border", align_corners=True)
        tensor = batch[0]
    return tensor.contiguous()


# ------------------------------------------------------------------------------------------------
# the torch Dataset and the sampler
# ------------------------------------------------------------------------------------------------

GRADICON_ROLES = ("A", "A_loss", "B", "B_loss")
M2M_ROLES = ("S", "T", "Sp", "Tp")


class PairDataset(Dataset):
    """Training samples by global pair index: tensors ready for the objective.

    A ``gradicon`` sample holds ``image_A``, ``image_B`` (network inputs), ``loss_A``, ``loss_B``
    (similarity images), ``mask_A``, ``mask_B`` (loss masks, ones without masks), ``seg_A``,
    ``seg_B`` (label maps, zeros without), ``has_mask``, ``has_seg`` and ``member``. An ``m2m`` sample
    holds ``image_S``, ``image_T``, ``image_Sp``, ``image_Tp`` with their ``mask_*`` and ``seg_*``,
    ``prealigned``, ``has_mask``, ``has_seg`` and ``member``. Images are ``[1, *shape]`` float32.

    Args:
        composite: the composite set and pair plan.
        shape: the network input shape.
        augmentation: the augmentation settings.
        loader: the volume loader (disk / memory cache).
    """

    def __init__(self, composite: CompositeSet, shape: Sequence[int], augmentation: AugmentationConfig,
                 loader: VolumeLoader, *, layout: str = "reference") -> None:
        self.composite = composite
        self.shape = tuple(int(s) for s in shape)
        self.augmentation = augmentation
        self.loader = loader
        self.layout = layout
        self.m2m = composite.objective.kind == "m2m"
        self._synthesizers: Dict[int, Synthesizer] = {}

    def synthesizer(self, member_index: int) -> Synthesizer:
        """The synthesiser of a synthetic member (made once per process)."""
        found = self._synthesizers.get(member_index)
        if found is None:
            member = self.composite.members[member_index]
            settings = member.config.synthesis or SynthesisConfig()
            # label maps have no common storage order: they follow the canonical axes in either layout
            # (with the reference layout, flips and permutations vary what the network sees)
            found = Synthesizer(member.label_maps, settings, self.shape, canonical_axes(len(self.shape)),
                                memory_items=max(self.loader.memory_items, len(member.label_maps)))
            self._synthesizers[member_index] = found
        return found

    def _synthetic_sample(self, index: int, plan: PairPlan) -> Dict[str, Any]:
        pair = self.synthesizer(plan.member).pair(_rng(self.composite.seed, _PURPOSE_SYNTHESIS, index),
                                                  plan.image("A"), plan.image("B"))
        rng = _rng(self.composite.seed, _PURPOSE_AUGMENT, index)
        aug = draw_augmentation(self.augmentation, rng, self.shape, ["a", "b"], [])
        ones = torch.ones((1, *self.shape), dtype=torch.float32)
        sample: Dict[str, Any] = {"member": plan.member, "has_mask": False, "has_seg": True}
        for role, view in (("A", "a"), ("B", "b")):
            image = apply_augmentation(pair[f"image_{role}"], aug, view, nearest=False)
            sample[f"image_{role}"] = image
            sample[f"loss_{role}"] = image
            sample[f"mask_{role}"] = ones
            sample[f"seg_{role}"] = apply_augmentation(pair[f"seg_{role}"], aug, view, nearest=True)
        return sample

    def __len__(self) -> int:  # the index stream is unbounded; the sampler decides what is drawn
        return 1 << 62

    def __getitem__(self, index: int) -> Dict[str, Any]:
        plan = self.composite.plan(index)
        member = self.composite.members[plan.member]
        if isinstance(member, SyntheticMember):
            return self._synthetic_sample(index, plan)
        images = dict(plan.images)
        views = dict(plan.views)
        anchor = member.entries[images[plan.anchor]]
        anchor_frame = NetworkFrame.for_layout(self.layout, anchor.grid, self.shape)
        frames = {}
        for role, i in images.items():
            if views[role] == views[plan.anchor]:
                frames[role] = anchor_frame
            else:
                frames[role] = anchor_frame.companion(member.entries[i].grid)
        ct_roles = [r for r, i in images.items() if member.entries[i].normalization.modality == "ct"]
        # one inversion decision per image, so an input and its identical loss image stay identical
        ct_roles = sorted({r for r in ct_roles if r == _first_role(images, images[r])})
        rng = _rng(self.composite.seed, _PURPOSE_AUGMENT, index)
        aug = draw_augmentation(self.augmentation, rng, self.shape, list(views.values()), ct_roles)
        roles = M2M_ROLES if self.m2m else GRADICON_ROLES
        tensors: Dict[str, torch.Tensor] = {}
        for role in roles:
            first = _first_role(images, images[role])
            if first != role:
                tensors[role] = tensors[first]
                continue
            entry = member.entries[images[role]]
            image = self.loader.load("image", entry, frames[role], input_mask=member.input_masks)
            if role in aug.inverted:
                image = 1.0 - image
                if member.input_masks:
                    image = image * self.loader.load("mask", entry, frames[role])
            tensors[role] = apply_augmentation(image, aug, views[role], nearest=False)
        sample: Dict[str, Any] = {"member": plan.member, "has_mask": member.loss_masks,
                                  "has_seg": member.has_segmentations}
        label_roles = ("A", "B") if not self.m2m else M2M_ROLES
        zeros = torch.zeros((1, *self.shape), dtype=torch.float32)
        for role in label_roles:
            entry = member.entries[images[role]]
            if member.loss_masks:
                mask = apply_augmentation(self.loader.load("mask", entry, frames[role]), aug, views[role], nearest=True)
            else:
                mask = torch.ones_like(zeros)
            if entry.segmentation is not None:
                seg = apply_augmentation(self.loader.load("segmentation", entry, frames[role]), aug, views[role],
                                         nearest=True)
            else:
                seg = zeros
            sample[f"mask_{role}"] = mask
            sample[f"seg_{role}"] = seg
        if self.m2m:
            sample["has_seg"] = all(member.entries[images[r]].segmentation is not None for r in ("S", "T"))
            sample["prealigned"] = plan.prealigned
            for role in M2M_ROLES:
                sample[f"image_{role}"] = tensors[role]
        else:
            sample["has_seg"] = all(member.entries[images[r]].segmentation is not None for r in ("A", "B"))
            sample["image_A"], sample["image_B"] = tensors["A"], tensors["B"]
            sample["loss_A"], sample["loss_B"] = tensors["A_loss"], tensors["B_loss"]
        return sample


def _first_role(images: Mapping[str, int], image_index: int) -> str:
    """The first role (in plan order) that holds ``image_index``."""
    return next(r for r, i in images.items() if i == image_index)


class StepBatchSampler(Sampler):
    """Batches of global pair indices for one process, step by step.

    Step ``s`` of rank ``r`` (of ``world_size``) draws indices ``(s * world_size + r) * batch_size + j``,
    ``j < batch_size``: the ranks of one step share out consecutive indices, as
    :class:`torch.utils.data.DistributedSampler` shares out a data set, and a run resumed at step
    ``s`` continues the stream exactly.

    Args:
        start_step, end_step: global steps to draw (``end_step`` excluded).
        batch_size: pairs per step and process.
        rank, world_size: this process and the number of processes.
    """

    def __init__(self, start_step: int, end_step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        self.start_step, self.end_step = int(start_step), int(end_step)
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)

    def indices(self, step: int) -> List[int]:
        first = (step * self.world_size + self.rank) * self.batch_size
        return list(range(first, first + self.batch_size))

    def __iter__(self) -> Iterator[List[int]]:
        for step in range(self.start_step, self.end_step):
            yield self.indices(step)

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed Python's and NumPy's global generators from the worker's
    torch seed (itself derived from the loader's seeded generator). The samples do not depend on
    them (each sample draws from its own generator), but library code that uses them stays
    reproducible. Workers ignore SIGINT and SIGTERM: the training process decides when to stop
    (after a checkpoint), and its workers end with it."""
    import random
    import signal

    seed = torch.initial_seed() % (2 ** 32)
    random.seed(seed)
    np.random.seed(seed)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
