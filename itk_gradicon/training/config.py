"""The training configuration: a YAML file read into typed dataclasses and checked before any work.

``gradicon train --config run.yaml`` reads the file with ``yaml.safe_load`` and turns every section
into one of the dataclasses below. Everything that can be wrong with the file itself is reported here,
as a :class:`~itk_gradicon.errors.ConfigError` whose one-line message names the key (as a path such as
``datasets[1].pairing``), the value received and the values allowed:

* unknown keys (with the closest known key as a suggestion), missing required keys;
* wrong types (a list where a number is expected, ...), values out of range, unknown choices;
* combinations that cannot work (``model`` and ``architecture`` together, a schedule that does not
  match the architecture, Dice without a weight, ...).

Problems with the data the file points at (missing images, unknown modalities, empty or unpairable
data sets) are found by :mod:`.data` when the data sets are scanned, also before training starts.

Paths: a relative path in the YAML file is resolved against the folder of the YAML file; a relative
path inside a list or CSV file is resolved against the data set's ``root`` when given, else against
the folder of that list or CSV file (for a glob, against the YAML file's folder).

Example:
    >>> cfg = load_config("examples/finetune.yaml")            # doctest: +SKIP
    >>> cfg.objective.similarity, cfg.optimizer.lr
    ('lncc', 5e-05)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Tuple

from ..errors import ConfigError, ModelError, did_you_mean  # noqa: F401  (did_you_mean: re-exported)
from ..pipeline.preprocess import MASK_MODES
from .schema import (  # noqa: F401  (differences: re-exported)
    differences, option, option_factory, parse_section, to_plain)

#: Modality names known without declaration, and the intensity normalisation each one gets
#: (``ct``: Hounsfield window; ``mri``: quantiles, for every non-CT image; see :mod:`itk_gradicon.pipeline.preprocess`).
BUILTIN_MODALITIES: Dict[str, str] = {
    "ct": "ct",
    "mri": "mri", "t1w": "mri", "t1c": "mri", "t2w": "mri", "flair": "mri", "pd": "mri", "dwi": "mri",
    "adc": "mri", "fa": "mri", "md": "mri", "swi": "mri", "mra": "mri", "dixon_fat": "mri",
    "dixon_water": "mri", "pet": "mri", "spect": "mri", "us": "mri", "cbct": "mri", "xray": "mri",
}
INTENSITY_NORMALIZATIONS = ("ct", "mri")
PAIRINGS = ("inter", "intra")
SAMPLING_MODES = ("per_dataset", "weighted", "region")
OBJECTIVES = ("gradicon", "m2m")
SIMILARITIES = ("lncc", "lncc2", "mind")
DATASET_KINDS = ("images", "synthetic")
LAYOUTS = ("reference", "canonical")
RANDOMISATIONS = ("B", "F", "R")
DEFAULT_LAMBDA = {"gradicon": 1.5, "m2m": 0.5}


# ------------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ArchitectureConfig:
    """Network to train from scratch (see :class:`itk_gradicon.network.Architecture`).

    Attributes:
        dimension: 2 or 3.
        input_shape: network grid; every image is resized to it (published models: 175^3).
        levels: resolutions of Stage 1 (3 in the papers).
        refinement_steps: full-resolution steps added in Stage 2 (1 in the papers; 0: Stage 1 only).
        down_channels, up_channels: UNet widths per level, finest first.
        normalization: ``batch`` (BatchNorm, as published) or ``instance`` (each pair normalised by its
            own statistics in training and at inference; for training with one pair per step).
    """

    dimension: int = option(3, choices=(2, 3))
    input_shape: Tuple[int, ...] = option((175, 175, 175))
    levels: int = option(3, minimum=1)
    refinement_steps: int = option(1, minimum=0)
    down_channels: Tuple[int, ...] = option((16, 32, 64, 256, 512))
    up_channels: Tuple[int, ...] = option((16, 32, 64, 128, 256))
    normalization: str = option("batch", choices=("batch", "instance"))

    def check(self, where: str) -> None:
        """Raise :class:`ConfigError`, naming the key under ``where``, for values that cannot work together."""
        self.to_architecture(where)

    def to_architecture(self, where: str = "architecture"):
        """The :class:`~itk_gradicon.network.Architecture` described here."""
        from ..network import Architecture

        try:
            return Architecture(dimension=self.dimension, input_shape=tuple(self.input_shape),
                                levels=self.levels, refinement_steps=self.refinement_steps,
                                down_channels=tuple(self.down_channels), up_channels=tuple(self.up_channels),
                                normalization=self.normalization)
        except ModelError as err:
            raise ConfigError(f"{where}: {err}") from None


@dataclass(frozen=True)
class SynthesisConfig:
    """How a ``kind: synthetic`` data set makes image pairs from label maps (see :mod:`.synthesis`).

    Attributes:
        skull_strip: probability that a pair shows only the brain (``brain_labels``), cropped around it.
        brain_labels: ``[low, high]``: label values of the brain (FreeSurfer: 1-99); they crop
            skull-stripped images and are the labels of the Dice term.
        same_contrast: probability that both images of a pair get one intensity per label.
        shapes: probability that a pair is made of random shapes instead of a label map.
        margin: ``[low, high]``: random margin around the brain's box of a skull-stripped pair, as a
            fraction of the box's size on each side.
        head_margin: the same for whole-head pairs (the box stays centred on the brain).
        affine_std: standard deviation of the random affine change of each subject (pre-aligned pairs: small).
        warp_std: largest standard deviation of the smooth random displacement, in network voxels.
        warp_control: ``[low, high]``: control points per axis of the random displacement.
        texture_std: largest spread of the intensities inside one label.
        blur: ``[low, high]``: Gaussian blur sigma in network voxels.
        bias_std: largest strength of the smooth multiplicative bias field (log scale).
        noise_std: largest standard deviation of the added Gaussian noise.
        gamma_std: standard deviation of the log of the random gamma.
    """

    skull_strip: float = option(0.5, minimum=0.0, maximum=1.0)
    brain_labels: Tuple[int, int] = option((1, 99))
    same_contrast: float = option(0.5, minimum=0.0, maximum=1.0)
    shapes: float = option(0.0, minimum=0.0, maximum=1.0)
    margin: Tuple[float, float] = option((0.02, 0.12))
    head_margin: Tuple[float, float] = option((0.12, 0.25))
    affine_std: float = option(0.03, minimum=0.0, maximum=0.5)
    warp_std: float = option(3.0, minimum=0.0)
    warp_control: Tuple[int, int] = option((4, 8))
    texture_std: float = option(0.08, minimum=0.0)
    blur: Tuple[float, float] = option((0.3, 1.0))
    bias_std: float = option(0.3, minimum=0.0)
    noise_std: float = option(0.04, minimum=0.0)
    gamma_std: float = option(0.25, minimum=0.0)

    def check(self, where: str) -> None:
        """Raise :class:`ConfigError`, naming the key under ``where``, for values that cannot work together."""
        for key, minimum in (("brain_labels", None), ("margin", 0.0), ("head_margin", 0.0), ("warp_control", 2), ("blur", 0.0)):
            low, high = getattr(self, key)
            if not low <= high or (minimum is not None and low < minimum):
                bound = f" with low >= {minimum:g}" if minimum is not None else ""
                raise ConfigError(f"{where}.{key}: {list(getattr(self, key))} must be [low, high] with "
                                  f"low <= high{bound}")


@dataclass(frozen=True)
class DatasetConfig:
    """One member of the composite training set.

    Attributes:
        name: shown in logs and recorded in the model's provenance.
        kind: ``images`` (image files) or ``synthetic`` (``images`` lists label maps, and pairs are
            synthesised from them on the fly; see :mod:`.synthesis` and ``synthesis``).
        images: a CSV file (``.csv``/``.tsv``; columns ``image`` and optionally ``subject``,
            ``modality``, ``group``, ``mask``, ``segmentation``), a list file (one image path per line,
            ``#`` comments) or a glob pattern (``scans/*.nii.gz``).
        root: folder that relative image paths are resolved against (default: the list's folder).
        modality: modality of images whose row gives none.
        region: anatomical region (``lung``, ``brain``, ...), used by the weighted samplers.
        pairing: ``inter`` (any two subjects) or ``intra`` (two images of one subject).
        weight: sampling weight; 0 leaves the data set out.
        subject_pattern: regular expression whose first group extracts the subject id from an image
            path (lists and globs; default: each image is its own subject).
        mask_template, segmentation_template: file next to each image of a list or glob, e.g.
            ``{dir}/{stem}_mask.nii.gz`` (``{dir}``: the image's folder, ``{stem}``: its name without
            the image extension).
        mask_mode: what masks do: ``input`` (zero the image outside, as ``--mask-mode input``),
            ``loss`` (restrict the similarity), ``both``.
        ct_window, quantile_range: preprocessing of this data set, overriding ``preprocessing``.
        synthesis: how pairs are synthesised (``kind: synthetic`` only).
    """

    name: str = option(None, required=True)
    kind: str = option("images", choices=DATASET_KINDS)
    images: str = option(None, required=True)
    root: Optional[str] = option(None)
    modality: Optional[str] = option(None)
    region: str = option("unspecified")
    pairing: str = option("inter", choices=PAIRINGS)
    weight: float = option(1.0, minimum=0.0)
    subject_pattern: Optional[str] = option(None)
    mask_template: Optional[str] = option(None)
    segmentation_template: Optional[str] = option(None)
    mask_mode: str = option("input", choices=MASK_MODES)
    ct_window: Optional[Tuple[float, float]] = option(None)
    quantile_range: Optional[Tuple[float, float]] = option(None)
    synthesis: Optional[SynthesisConfig] = option(None)

    def check(self, where: str) -> None:
        """Raise :class:`ConfigError`, naming the key under ``where``, for values that cannot work together."""
        if self.kind == "synthetic":
            # A key written with its default value (as in the config.yaml a run writes) is not a request.
            given = getattr(self, "keys_given", frozenset())
            defaults = {f.name: f.default for f in fields(self)}
            unused = sorted(key for key in given & {"mask_template", "segmentation_template", "modality",
                                                   "ct_window", "quantile_range", "mask_mode"}
                            if getattr(self, key) != defaults[key])
            if unused:
                raise ConfigError(f"{where}.{unused[0]}: not used by a synthetic data set (its images are "
                                  "synthesised from label maps)")
        elif self.synthesis is not None:
            raise ConfigError(f"{where}.synthesis: only for kind: synthetic (kind is {self.kind!r})")
        if not self.name:
            raise ConfigError(f"{where}.name: every data set needs a non-empty name")
        if not self.images:
            raise ConfigError(f"{where}.images: give a CSV file, a list file or a glob pattern")
        if self.subject_pattern is not None:
            try:
                pattern = re.compile(self.subject_pattern)
            except re.error as err:
                raise ConfigError(f"{where}.subject_pattern: {self.subject_pattern!r} is not a regular "
                                  f"expression ({err})") from None
            if pattern.groups < 1:
                raise ConfigError(f"{where}.subject_pattern: {self.subject_pattern!r} needs a group in "
                                  "parentheses that captures the subject id, e.g. 'sub-(\\w+)_'")
        for key in ("mask_template", "segmentation_template"):
            template = getattr(self, key)
            if template is not None:
                try:
                    template.format(dir="d", stem="s", name="n")
                except (KeyError, IndexError, ValueError) as err:
                    raise ConfigError(f"{where}.{key}: {template!r} may use only {{dir}}, {{stem}} and "
                                      f"{{name}} ({err})") from None
        _check_window(self.ct_window, f"{where}.ct_window")
        _check_quantiles(self.quantile_range, f"{where}.quantile_range")


@dataclass(frozen=True)
class SamplingConfig:
    """How pairs are drawn each epoch.

    Attributes:
        mode: ``per_dataset`` (uniGradICON: ``pairs_per_dataset`` x weight pairs from every data set),
            ``weighted`` (multiGradICON: ``pairs_per_epoch`` pairs drawn so that every
            (modalities, region) combination is equally likely, times the weights) or ``region``
            (finetuning: every anatomical region equally likely, times the weights).
        pairs_per_dataset: pairs per data set and epoch in ``per_dataset`` mode.
        pairs_per_epoch: pairs per epoch in the weighted modes.
    """

    mode: str = option("per_dataset", choices=SAMPLING_MODES)
    pairs_per_dataset: int = option(1000, minimum=1)
    pairs_per_epoch: int = option(4000, minimum=1)


@dataclass(frozen=True)
class PreprocessingConfig:
    """Intensity normalisation, as at registration (:class:`itk_gradicon.pipeline.preprocess.IntensityNormalization`).

    Attributes:
        ct_window: HU window of CT images (default -1000, 1000, or the parent model's).
        quantile_range: quantiles of non-CT images (default minimum and 0.99, or the parent model's).
        layout: how images are laid out on the network grid: ``reference`` (the fixed image's array as
            stored, as the published models), ``canonical`` (network axes along the world axes closest to
            superior, anterior, right, whatever the storage; :data:`itk_gradicon.spatial.frames.CANONICAL_AXES`),
            or the parent model's. Recorded in the model file; ``gradicon register`` follows it.
        prealignment: the pre-alignment the model expects before the network (``none`` or ``affine``;
            default: the parent model's, else ``none``). ``affine`` makes ``gradicon register`` run its
            affine stage by default (``--affine none`` turns it off).
    """

    ct_window: Optional[Tuple[float, float]] = option(None)
    quantile_range: Optional[Tuple[float, float]] = option(None)
    layout: Optional[str] = option(None, choices=LAYOUTS)
    prealignment: Optional[str] = option(None, choices=("none", "affine"))

    def check(self, where: str) -> None:
        """Raise :class:`ConfigError`, naming the key under ``where``, for values that cannot work together."""
        _check_window(self.ct_window, f"{where}.ct_window")
        _check_quantiles(self.quantile_range, f"{where}.quantile_range")


@dataclass(frozen=True)
class AugmentationConfig:
    """Random changes of every training pair.

    Attributes:
        flips: flip each network axis with probability 1/2 (all images of a pair alike).
        permutations: permute network axes of equal size (all images of a pair alike).
        affine_std: standard deviation of the random affine warp added to the identity, independently
            for each image (0: none; the reference uses 0.05).
        invert_ct: probability of replacing a normalised CT image by ``1 - CT`` (multiGradICON).
    """

    flips: bool = option(True)
    permutations: bool = option(False)
    affine_std: float = option(0.05, minimum=0.0, maximum=0.5)
    invert_ct: float = option(0.0, minimum=0.0, maximum=1.0)


@dataclass(frozen=True)
class ObjectiveConfig:
    """The training loss.

    Attributes:
        kind: ``gradicon`` (uniGradICON / multiGradICON: ``sim(A o phi_AB, B) + sim(B o phi_BA, A) +
            lambda GradICON``) or ``m2m`` (M2M-Reg: mono-modal cycle similarity through a bridge pair,
            ``lambda`` GradICON on the source pair, ``lambda_gcc`` GradCyCon).
        similarity: ``lncc``, ``lncc2`` (squared LNCC, multiGradICON) or ``mind``.
        lmbda: YAML key ``lambda``; GradICON weight, default 1.5 (``gradicon``) or 0.5 (``m2m``).
        loss_randomisation: multiGradICON variant: ``B`` (similarity on the network's inputs), ``F``
            (on a random co-registered image of each, both of one modality), ``R`` (fully random).
        dice_weight: weight of a soft Dice term on segmentations (0: none).
        dice_grid: compute the Dice term on every k-th voxel, k the smallest stride leaving at most this
            many voxels per axis (0: every voxel; 48 on a 96^3 network costs 1/8).
        lambda_gcc: GradCyCon weight (``m2m``).
        prealigned_bridges: probability that the bridge pair of an ``m2m`` cycle is a pre-aligned pair
            (two co-registered images of one ``group``), whose map is then the identity.
    """

    kind: str = option("gradicon", choices=OBJECTIVES)
    similarity: str = option("lncc", choices=SIMILARITIES)
    lmbda: Optional[float] = option(None, key="lambda", minimum=0.0)
    loss_randomisation: str = option("B", choices=RANDOMISATIONS)
    dice_weight: float = option(0.0, minimum=0.0)
    dice_grid: int = option(0, minimum=0)
    lambda_gcc: float = option(0.1, minimum=0.0)
    prealigned_bridges: float = option(0.0, minimum=0.0, maximum=1.0)

    @property
    def regularizer_weight(self) -> float:
        """``lambda``, or the paper's default for the objective."""
        return DEFAULT_LAMBDA[self.kind] if self.lmbda is None else float(self.lmbda)

    def check(self, where: str) -> None:
        """Raise :class:`ConfigError`, naming the key under ``where``, for values that cannot work together."""
        if self.kind != "m2m":
            for key, default in (("lambda_gcc", 0.1), ("prealigned_bridges", 0.0)):
                if key in getattr(self, "keys_given", ()) and getattr(self, key) != default:
                    raise ConfigError(f"{where}.{key}: only used with kind: m2m (kind is {self.kind!r})")
        elif self.loss_randomisation != "B":
            raise ConfigError(f"{where}.loss_randomisation: {self.loss_randomisation!r} is for kind: gradicon; "
                              "M2M-Reg compares mono-modal images along its cycle (use B)")


@dataclass(frozen=True)
class StageLength:
    """Length of one training stage: ``steps`` (optimiser steps) or ``epochs`` (of the sampler)."""

    steps: Optional[int] = option(None, minimum=1)
    epochs: Optional[float] = option(None, above=0.0)

    def check(self, where: str) -> None:
        """Raise :class:`ConfigError`, naming the key under ``where``, for values that cannot work together."""
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError(f"{where}: give exactly one of 'steps' or 'epochs'")


@dataclass(frozen=True)
class ScheduleConfig:
    """Training stages.

    Attributes:
        coarse: from scratch, before Stage 1: coarse-to-fine stages as in LapIRN. Entry ``i`` trains
            the ``i + 1`` coarsest levels alone on images average-pooled to their resolution (1/8 and
            1/64 of the cost of a full-resolution step for a 3-level network); each stage starts from the
            previous one's weights. At most ``levels - 1`` entries.
        stage1: from scratch: train the ``levels`` UNets of Stage 1.
        stage2: from scratch: add the refinement UNet(s) and train everything jointly (GradICON's Stage 2).
        finetune: finetuning a model (``model``): train all of it.
    """

    coarse: Optional[List[StageLength]] = option(None)
    stage1: Optional[StageLength] = option(None)
    stage2: Optional[StageLength] = option(None)
    finetune: Optional[StageLength] = option(None)


@dataclass(frozen=True)
class OptimizerConfig:
    """Adam settings (the papers: lr 5e-5)."""

    lr: float = option(5e-5, above=0.0)
    betas: Tuple[float, float] = option((0.9, 0.999))
    weight_decay: float = option(0.0, minimum=0.0)

    def check(self, where: str) -> None:
        """Raise :class:`ConfigError`, naming the key under ``where``, for values that cannot work together."""
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{where}.betas: {list(self.betas)} must both be in [0, 1)")


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints: written every ``every`` steps (and at the end of each stage); ``keep`` most recent kept."""

    every: int = option(1000, minimum=1)
    keep: int = option(3, minimum=1)


@dataclass(frozen=True)
class LoaderConfig:
    """Data loading.

    Attributes:
        workers: DataLoader worker processes (0: load in the training process).
        cache_dir: folder for a disk cache of preprocessed volumes, keyed by file, preprocessing and
            network layout (relative to the YAML file's folder; none by default).
        memory_cache: preprocessed volumes each process keeps in memory.
        prefetch: batches each worker prepares ahead.
    """

    workers: int = option(2, minimum=0)
    cache_dir: Optional[str] = option(None)
    memory_cache: int = option(8, minimum=0)
    prefetch: int = option(2, minimum=1)


@dataclass(frozen=True)
class TrainConfig:
    """A whole ``gradicon train`` run (the YAML file's top level).

    Attributes:
        name: name of the trained model (default: the output folder's name).
        model: finetune this model (a published name or a model/weight file); omit to train from scratch.
        architecture: the network to train from scratch.
        modalities: extra modality names and their normalisation (``ct`` or ``mri``).
        datasets: the composite training set.
        batch_size: pairs per optimiser step and process.
        seed: seed of every random choice (pairs, augmentation, GradICON sample points).
        log_every: steps between progress lines (the JSONL log has every step).
        base_dir: folder relative paths are resolved against (the YAML file's folder; not a YAML key).
    """

    datasets: List[DatasetConfig] = option(None, required=True)
    name: Optional[str] = option(None)
    model: Optional[str] = option(None)
    architecture: Optional[ArchitectureConfig] = option(None)
    modalities: Dict[str, str] = option_factory(dict)
    sampling: SamplingConfig = option_factory(SamplingConfig)
    preprocessing: PreprocessingConfig = option_factory(PreprocessingConfig)
    augmentation: AugmentationConfig = option_factory(AugmentationConfig)
    objective: ObjectiveConfig = option_factory(ObjectiveConfig)
    schedule: ScheduleConfig = option_factory(ScheduleConfig)
    optimizer: OptimizerConfig = option_factory(OptimizerConfig)
    checkpoint: CheckpointConfig = option_factory(CheckpointConfig)
    loader: LoaderConfig = option_factory(LoaderConfig)
    batch_size: int = option(4, minimum=1)
    seed: int = option(0, minimum=0)
    log_every: int = option(10, minimum=1)
    base_dir: Path = option(Path("."), internal=True)

    def check(self, where: str = "") -> None:
        """Raise :class:`ConfigError`, naming the key under ``where``, for values that cannot work together."""
        prefix = f"{where}." if where else ""
        if not self.datasets:
            raise ConfigError(f"{prefix}datasets: give at least one data set")
        names = [d.name for d in self.datasets]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ConfigError(f"{prefix}datasets: data set names must be unique; repeated: {', '.join(duplicated)}")
        if all(d.weight == 0 for d in self.datasets):
            raise ConfigError(f"{prefix}datasets: every data set has weight 0, so no pair can be drawn; "
                              "give at least one data set a weight > 0")
        for name, normalization in self.modalities.items():
            if normalization not in INTENSITY_NORMALIZATIONS:
                raise ConfigError(f"{prefix}modalities.{name}: unknown normalisation {normalization!r}; "
                                  f"allowed: {', '.join(INTENSITY_NORMALIZATIONS)}")
            if name in ("ct", "mri"):
                raise ConfigError(f"{prefix}modalities.{name}: 'ct' and 'mri' cannot be redefined")
            if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
                raise ConfigError(f"{prefix}modalities: {name!r} is not a usable modality name "
                                  "(letters, digits, _ . + - only)")
        for i, d in enumerate(self.datasets):
            if d.modality is not None:
                self.normalization_of(d.modality, f"{prefix}datasets[{i}].modality")
        self._check_schedule(prefix)

    def _check_schedule(self, prefix: str) -> None:
        s = self.schedule
        if self.model is not None and self.architecture is not None:
            raise ConfigError(f"{prefix}architecture: a finetuned model keeps the architecture of 'model' "
                              f"({self.model!r}); remove 'architecture' or 'model'")
        if self.model is None and self.architecture is None:
            raise ConfigError(f"{prefix}model: give 'model' (NAME|FILE, or --model) to finetune, or "
                              "'architecture' to train from scratch")
        if self.model is not None:
            if s.finetune is None:
                raise ConfigError(f"{prefix}schedule.finetune: finetuning {self.model!r} needs "
                                  "'finetune: {steps: N}' (or epochs)")
            if s.stage1 is not None or s.stage2 is not None or s.coarse is not None:
                raise ConfigError(f"{prefix}schedule: coarse/stage1/stage2 are for training from scratch; "
                                  "a finetuning run has only 'finetune'")
            return
        refinement = self.architecture.refinement_steps
        if s.coarse is not None:
            levels = self.architecture.levels
            if len(s.coarse) > levels - 1:
                raise ConfigError(f"{prefix}schedule.coarse: {len(s.coarse)} coarse stage(s), but a network of "
                                  f"{levels} level(s) has at most {levels - 1} (each trains one more level)")
        if s.finetune is not None:
            raise ConfigError(f"{prefix}schedule.finetune: only for finetuning a 'model'; training from "
                              "scratch uses stage1 (and stage2)")
        if s.stage1 is None:
            raise ConfigError(f"{prefix}schedule.stage1: training from scratch needs 'stage1: {{steps: N}}'")
        if refinement > 0 and s.stage2 is None:
            raise ConfigError(f"{prefix}schedule.stage2: architecture.refinement_steps is {refinement}, so "
                              "Stage 2 (which trains the refinement step) needs 'stage2: {steps: N}'")
        if refinement == 0 and s.stage2 is not None:
            raise ConfigError(f"{prefix}schedule.stage2: architecture.refinement_steps is 0, so there is no "
                              "Stage 2; remove it or set refinement_steps: 1")

    @property
    def all_modalities(self) -> Dict[str, str]:
        """Every usable modality name and its normalisation."""
        return {**BUILTIN_MODALITIES, **self.modalities}

    def normalization_of(self, modality: str, where: str) -> str:
        """``ct`` or ``mri`` for a modality name; :class:`ConfigError` naming ``where`` otherwise."""
        known = self.all_modalities
        if modality not in known:
            hint = did_you_mean(modality, known)
            raise ConfigError(f"{where}: unknown modality {modality!r}{hint}; allowed: "
                              f"{', '.join(sorted(known))} (declare others under 'modalities')")
        return known[modality]

    def resolve(self, value: str) -> Path:
        """A path from the YAML file, resolved against :attr:`base_dir`."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.base_dir / path)

    def to_dict(self) -> Dict[str, Any]:
        """Plain data (YAML keys, lists, no paths): what the model's provenance and checkpoints record."""
        return to_plain(self)


# ------------------------------------------------------------------------------------------------
# parsing
# ------------------------------------------------------------------------------------------------

def _check_window(window, where: str) -> None:
    if window is not None and not window[0] < window[1]:
        raise ConfigError(f"{where}: {list(window)} must be [min, max] with min < max")


def _check_quantiles(quantiles, where: str) -> None:
    if quantiles is not None and not 0.0 <= quantiles[0] < quantiles[1] <= 1.0:
        raise ConfigError(f"{where}: {list(quantiles)} must be [lower, upper] with 0 <= lower < upper <= 1")


def load_config(path, *, model: Optional[str] = None) -> TrainConfig:
    """Read and check a training configuration file.

    Args:
        path: the YAML file.
        model: ``--model`` from the command line (a published name, or a file relative to the
            working folder); replaces the file's ``model``. A ``model`` file named in the YAML file
            is relative to the YAML file's folder.

    Returns:
        The checked :class:`TrainConfig` with ``base_dir`` set to the file's folder.

    Raises:
        ConfigError: the file cannot be read, is not YAML, or any key is wrong.
    """
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"configuration file '{path}' does not exist" if not path.exists()
                          else f"configuration '{path}' is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"configuration file '{path}' cannot be read: {err}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"configuration file '{path}' is not valid YAML{at}: {problem}") from None
    return config_from_mapping(raw, base_dir=path.resolve().parent, model=model)


def config_from_mapping(raw: Any, *, base_dir: Path, model: Optional[str] = None) -> TrainConfig:
    """Build a :class:`TrainConfig` from already-loaded YAML data (see :func:`load_config`)."""
    if raw is None:
        raise ConfigError("the configuration is empty; it needs at least 'datasets' and 'model' or "
                          "'architecture'")
    if isinstance(raw, Mapping) and model is not None:
        # --model names a published model or a file relative to the working folder
        model = str(model)
        if Path(model).expanduser().exists():
            model = str(Path(model).expanduser().absolute())
        raw = {**raw, "model": model}
    cfg = parse_section(TrainConfig, raw, "")
    object.__setattr__(cfg, "base_dir", Path(base_dir))
    return cfg


#: Sections that may change between a run and its ``--resume`` (they do not change what is learned
#: before the stopping point).
RESUMABLE_CHANGES: FrozenSet[str] = frozenset({"schedule", "checkpoint", "loader", "log_every", "name"})
