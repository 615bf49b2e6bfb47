"""Composite training sets, listed and checked: entries (image files with subject, modality, mask and
segmentation), views, members (one data set each), read from globs, lists and CSV files.

See
:mod:`itk_gradicon.training.data` for the vocabulary.
"""

from __future__ import annotations

import csv
import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple


from ..errors import ConfigError, InputError, did_you_mean
from ..io.images import read_image_header, short_error_message
from ..io.tables import read_rows, row_values, table_path
from ..pipeline.preprocess import IntensityNormalization
from ..spatial.frames import ImageGrid
from .config import DatasetConfig, TrainConfig
from .synthesis import LabelMapEntry, check_label_map

CSV_COLUMNS = ("image", "subject", "modality", "group", "mask", "segmentation")
IMAGE_ENDINGS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".img.gz", ".img", ".hdr", ".tif",
                 ".tiff", ".png", ".vtk", ".gipl.gz", ".gipl")


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


def member_where(member_index: int, cfg: DatasetConfig) -> str:
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
        rows.append({"image": table_path(text, base), "origin": f"{path.name} line {number}"})
    return rows


def _read_csv(path: Path, base: Path, where: str) -> List[Dict[str, Any]]:
    try:
        table = read_rows(path)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f"{where}.images: cannot read '{path}' as CSV: {err}") from None
    if not table:
        return []
    header = [h.strip().lower() for h in table[0][1]]
    for h in header:
        if h not in CSV_COLUMNS:
            raise ConfigError(f"{where}.images: '{path.name}' has an unknown column {h!r}"
                              f"{did_you_mean(h, CSV_COLUMNS)}; allowed columns: {', '.join(CSV_COLUMNS)}")
    if "image" not in header:
        raise ConfigError(f"{where}.images: '{path.name}' needs a header row with an 'image' column "
                          f"(allowed columns: {', '.join(CSV_COLUMNS)})")
    rows = []
    for number, values in table[1:]:  # the file's own line numbers, comments and blank lines counted
        raw = row_values(header, values)
        if raw is None:
            raise ConfigError(f"{where}.images: {path.name} line {number} has {len(values)} values for "
                              f"{len(header)} columns")
        if not raw["image"]:
            raise ConfigError(f"{where}.images: {path.name} line {number} has no image path")
        row: Dict[str, Any] = {"origin": f"{path.name} line {number}"}
        for key in CSV_COLUMNS:
            value = raw.get(key) or None
            if value is not None and key in ("image", "mask", "segmentation"):
                value = table_path(value, base)
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
    where = member_where(index, cfg)
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
