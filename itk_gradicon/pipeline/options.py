"""The options of one registration: typed, grouped, every default written once.

:class:`RegistrationOptions` is what :func:`~itk_gradicon.registration.register`, ``gradicon register``,
``gradicon register-batch`` and :func:`~itk_gradicon.commands.register.run_register` share. Its frozen groups:

* :class:`IntensityOptions`: the modalities and how the intensities are normalised;
* :class:`RefinementOptions`: the instance optimisation (IO) after the network's prediction;
* :class:`PrealignmentOptions`: the affine stage and the layout the moving image is given to the network in;

beside the mask mode and whether the inverse transform is computed. ``None`` and ``"auto"`` mean "decided
later": against the model file's recommendation (:class:`~itk_gradicon.models.Refinement`), its
preprocessing, or the images.

:func:`~itk_gradicon.registration.register` also takes every option as a flat keyword (``io_iterations=50``,
``fixed_modality="t1w"``), the command line as a flag (``--io-iterations 50``): :data:`KEYWORDS` names the
group and field of each, :meth:`RegistrationOptions.from_keywords` and :meth:`RegistrationOptions.keywords`
convert, and :func:`check_options` checks a set of options before any image is read.

Example:
    >>> from itk_gradicon.pipeline.options import RefinementOptions, RegistrationOptions
    >>> options = RegistrationOptions(refinement=RefinementOptions(iterations=0))   # prediction only
    >>> options == RegistrationOptions.from_keywords(io_iterations=0)
    True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np

from ..errors import InputError, did_you_mean
from .preprocess import DEFAULT_CT_WINDOW, DEFAULT_MRI_UPPER_QUANTILE, MASK_MODES, MODALITY_CHOICES  # noqa: F401

# The choices, written once: the library checks against them and the command line's click.Choice lists them
# (this module loads no torch, ITK or SimpleITK, so that ``gradicon --help`` stays fast).

#: ``affine``: ``affine`` and ``rigid`` run :func:`itk_gradicon.pipeline.affine.prealign`; ``elastix`` is the former
#: spelling of ``affine``; ``auto`` is ``affine`` for a model trained on pre-aligned pairs, else ``none``.
AFFINE_CHOICES = ("auto", "none", "affine", "rigid", "elastix")
#: ``orientation``: the moving image laid out along the fixed image's axes, or both as stored.
ORIENTATIONS = ("fixed", "storage")
#: ``network_region``: after a pre-alignment, the box of the two images' foreground where it is much smaller
#: than the fixed grid (:mod:`itk_gradicon.pipeline.region`), or always the whole fixed grid.
NETWORK_REGIONS = ("auto", "image")
#: The instance-optimisation methods (:mod:`itk_gradicon.pipeline.instance`).
IO_METHODS = ("network", "field")
#: ``io_method``: ``auto`` resolves against the model (:func:`~itk_gradicon.pipeline.refinement.resolve_io_method`).
IO_METHOD_CHOICES = ("auto",) + IO_METHODS
#: ``io_similarity`` (the names of :data:`itk_gradicon.pipeline.losses.SIMILARITIES`).
IO_SIMILARITY_CHOICES = ("lncc", "lncc2", "mind")
#: ``io_start``: where field IO starts (the network's prediction, the pre-alignment, or as the domain says).
IO_STARTS = ("auto", "prediction", "prealignment")

# The defaults that the command line's help names, written once (the library uses the same constants).

#: Adam learning rate per method: the papers' value for the network's weights; for the fields,
#: network voxels per step (the same for every network size).
DEFAULT_LR = {"network": 2e-5, "field": 0.3}
#: Weight of the diffusion penalty of ``field`` IO where the model file recommends none (models record
#: their own, per similarity: :class:`~itk_gradicon.models.Refinement`; the choices are measured in
#: ``benchmarks/ACCURACY.md``).
DEFAULT_SMOOTHNESS = 0.15


@dataclass(frozen=True)
class IntensityOptions:
    """The two images' modalities and the normalisation of their intensities.

    Attributes:
        fixed_modality, moving_modality: ``"ct"``, ``"mri"``, an MRI contrast (``"t1w"``, ``"t2w"``, ``"flair"``,
            ``"pd"``, ``"t2star"``) or ``"auto"`` (guessed from the intensities).
        ct_window: HU window of CT images (``None``: the model's, else ``(-1000, 1000)``).
        quantile_range: quantiles of other images (``None``: the model's, else minimum and 99th percentile).
    """

    fixed_modality: str = "auto"
    moving_modality: str = "auto"
    ct_window: Optional[Tuple[float, float]] = None
    quantile_range: Optional[Tuple[float, float]] = None


@dataclass(frozen=True)
class RefinementOptions:
    """Instance optimisation after the network's prediction (:mod:`itk_gradicon.pipeline.instance`).

    Attributes:
        iterations: steps (0: prediction only; ``None``: the model's recommendation).
        method: ``"network"``, ``"field"`` or ``"auto"`` (the model's recommendation).
        similarity: ``"lncc"``, ``"lncc2"``, ``"mind"`` or ``None`` (the model's, for one contrast or two).
        smoothness: diffusion weight of ``field`` IO (``None``: the model's).
        lr: Adam learning rate (``None``: the method's default).
        dice_weight: weight of the soft Dice term when label maps are given.
        start: ``"prediction"``, ``"prealignment"`` or ``"auto"`` (the pre-alignment for a pair outside the
            model's domain).
    """

    iterations: Optional[int] = None
    method: str = "auto"
    similarity: Optional[str] = None
    smoothness: Optional[float] = None
    lr: Optional[float] = None
    dice_weight: float = 1.0
    start: str = "auto"


@dataclass(frozen=True)
class PrealignmentOptions:
    """The affine stage and the two images' layout on the network.

    Attributes:
        affine: ``"auto"`` (``"affine"`` for a model trained on pre-aligned pairs, else ``"none"``),
            ``"affine"`` (or its former name ``"elastix"``), ``"rigid"`` or ``"none"``.
        orientation: ``"fixed"`` (the moving image along the fixed image's axes) or ``"storage"``.
        network_region: the part of the fixed grid the network sees, one of :data:`NETWORK_REGIONS`.
    """

    affine: str = "auto"
    orientation: str = "fixed"
    network_region: str = "auto"


@dataclass(frozen=True)
class RegistrationOptions:
    """Every option of one registration (see the module docstring).

    Attributes:
        intensity, refinement, prealignment: the groups.
        mask_mode: ``"input"`` (zero each image outside its mask), ``"loss"`` (restrict the IO similarity to
            the masks) or ``"both"``.
        compute_inverse: also compute the inverse transform (:func:`~itk_gradicon.registration.register`;
            files-level runs compute it when an output needs it).
    """

    intensity: IntensityOptions = field(default_factory=IntensityOptions)
    refinement: RefinementOptions = field(default_factory=RefinementOptions)
    prealignment: PrealignmentOptions = field(default_factory=PrealignmentOptions)
    mask_mode: str = "input"
    compute_inverse: bool = True

    @classmethod
    def from_keywords(cls, base: Optional["RegistrationOptions"] = None, **keywords: Any) -> "RegistrationOptions":
        """``base`` (default: every default) with the flat keywords of :data:`KEYWORDS` set.

        Raises:
            TypeError: a keyword that is no option, with the nearest option's name.
        """
        options = cls() if base is None else base
        groups: Dict[Optional[str], Dict[str, Any]] = {}
        for keyword, value in keywords.items():
            if keyword not in KEYWORDS:
                hint = did_you_mean(keyword, KEYWORDS)
                raise TypeError(f"unknown registration option {keyword!r}{hint}; allowed: {', '.join(KEYWORDS)}")
            group, name = KEYWORDS[keyword]
            groups.setdefault(group, {})[name] = value
        top = groups.pop(None, {})
        for group, values in groups.items():
            top[group] = dataclasses.replace(getattr(options, group), **values)
        return dataclasses.replace(options, **top)

    def keywords(self) -> Dict[str, Any]:
        """Every option under its flat keyword (:data:`KEYWORDS`)."""
        return {keyword: getattr(self if group is None else getattr(self, group), name)
                for keyword, (group, name) in KEYWORDS.items()}

    @property
    def modalities(self) -> Tuple[str, str]:
        return self.intensity.fixed_modality, self.intensity.moving_modality


#: Flat keyword -> (group, field); ``None``: a field of :class:`RegistrationOptions` itself.
KEYWORDS: Dict[str, Tuple[Optional[str], str]] = {
    "fixed_modality": ("intensity", "fixed_modality"),
    "moving_modality": ("intensity", "moving_modality"),
    "ct_window": ("intensity", "ct_window"),
    "quantile_range": ("intensity", "quantile_range"),
    "mask_mode": (None, "mask_mode"),
    "io_iterations": ("refinement", "iterations"),
    "io_similarity": ("refinement", "similarity"),
    "io_lr": ("refinement", "lr"),
    "io_method": ("refinement", "method"),
    "io_smoothness": ("refinement", "smoothness"),
    "io_dice_weight": ("refinement", "dice_weight"),
    "io_start": ("refinement", "start"),
    "affine": ("prealignment", "affine"),
    "orientation": ("prealignment", "orientation"),
    "network_region": ("prealignment", "network_region"),
    "compute_inverse": (None, "compute_inverse"),
}
#: The inputs besides the two images that travel with the options (files or images, on their image's grid).
INPUT_KEYWORDS = ("fixed_mask", "moving_mask", "fixed_labels", "moving_labels")


def check_options(options: RegistrationOptions, inputs: Mapping[str, Any] = {},
                  name: Callable[[str], str] = lambda keyword: keyword) -> None:
    """Every option that needs neither an image nor a model, checked in one place, with the inputs given
    (``inputs``: any of :data:`INPUT_KEYWORDS` and ``initial_transform``, ``None`` where not given).

    ``name`` turns a keyword into what the caller typed: :func:`~itk_gradicon.registration.register` keeps the
    keyword, the command line passes the flag (``"io_iterations"`` -> ``"--io-iterations"``), so that each
    message names what the user wrote.

    Raises:
        InputError: the first option outside what is allowed, with what was received.
    """
    def allowed(keyword: str, value, choices) -> None:
        if value not in choices:
            raise InputError(f"unknown {name(keyword)} {value!r}; allowed: {', '.join(choices)}")

    io, given = options.refinement, {key: inputs.get(key) for key in INPUT_KEYWORDS + ("initial_transform",)}
    allowed("mask_mode", options.mask_mode, MASK_MODES)
    allowed("orientation", options.prealignment.orientation, ORIENTATIONS)
    allowed("network_region", options.prealignment.network_region, NETWORK_REGIONS)
    whole = isinstance(io.iterations, (int, np.integer)) and not isinstance(io.iterations, bool)
    if io.iterations is not None and (not whole or io.iterations < 0):
        raise InputError(f"{name('io_iterations')} must be a whole number >= 0, not {io.iterations!r}")
    allowed("io_method", io.method, IO_METHOD_CHOICES)
    allowed("io_start", io.start, IO_STARTS)
    if io.lr is not None and not io.lr > 0:
        raise InputError(f"{name('io_lr')} must be > 0, not {io.lr!r}")
    if io.smoothness is not None and not io.smoothness >= 0:
        raise InputError(f"{name('io_smoothness')} must be >= 0, not {io.smoothness!r}")
    affine = options.prealignment.affine
    allowed("affine", affine, AFFINE_CHOICES)
    if affine not in ("auto", "none") and given["initial_transform"] is not None:
        raise InputError(f"give either {name('affine')} {affine} or {name('initial_transform')}, not both")
    if (given["fixed_labels"] is None) != (given["moving_labels"] is None):
        raise InputError(f"{name('fixed_labels')} and {name('moving_labels')} must be given together")
    if options.mask_mode in ("loss", "both") and (given["fixed_mask"] is None or given["moving_mask"] is None):
        raise InputError(f"{name('mask_mode')} {options.mask_mode} needs both {name('fixed_mask')} and "
                         f"{name('moving_mask')}")
    for keyword, choice in zip(("fixed_modality", "moving_modality"), options.modalities):
        allowed(keyword, choice, MODALITY_CHOICES)


__all__ = ["AFFINE_CHOICES", "INPUT_KEYWORDS", "IO_METHODS", "IO_METHOD_CHOICES", "IO_SIMILARITY_CHOICES", "MASK_MODES",
           "MODALITY_CHOICES", "IO_STARTS", "KEYWORDS", "NETWORK_REGIONS", "ORIENTATIONS", "IntensityOptions",
           "PrealignmentOptions", "RefinementOptions", "RegistrationOptions", "check_options"]
