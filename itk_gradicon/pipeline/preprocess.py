"""Intensity normalisation, shared by registration and training.

The published models were trained on images scaled to ``[0, 1]`` this way (uniGradICON paper, and
the reference implementation's ``preprocess``):

* CT: clip Hounsfield units to a window (default ``[-1000, 1000]``), scale to ``[0, 1]``;
* MRI and every other non-CT modality: clip to ``[min, 99th percentile]`` (or to two quantiles given
  by the user), scale to ``[0, 1]``.

Quantiles follow the reference exactly: the ``k``-th smallest voxel with ``k = clamp(int(q * n), 1, n)``.
Optional input masking multiplies the normalised image by a binary mask (voxels ``> 0``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from ..errors import InputError

#: What a mask does: ``input`` (zeroes the image outside it), ``loss`` (the similarity is measured inside it
#: only), ``both``.
MASK_MODES = ("input", "loss", "both")

MODALITIES = ("ct", "mri")
#: MRI contrasts a user may name: normalised as ``mri``; naming two different ones (or CT and an MRI)
#: tells the registration that the pair is multimodal.
MRI_CONTRASTS = ("t1w", "t2w", "flair", "pd", "t2star")
MODALITY_CHOICES = ("auto",) + MODALITIES + MRI_CONTRASTS
DEFAULT_CT_WINDOW = (-1000.0, 1000.0)
DEFAULT_MRI_UPPER_QUANTILE = 0.99


#: Images with more voxels than this find a quantile among the values near a sample's estimate first.
QUANTILE_SAMPLE_ABOVE = 1 << 20
#: Spacing of that sample (every this-many-th voxel) and the margin (in quantile) around its estimate.
QUANTILE_SAMPLE_STEP, QUANTILE_MARGIN = 64, 0.005


def quantile(array: np.ndarray, q: float) -> float:
    """The ``k``-th smallest value with ``k = clamp(int(q * n), 1, n)`` (the reference's definition).

    Exact. On large images the value is looked for among the voxels between two bounds taken from a
    regular sample (the sample's quantiles ``q -+`` :data:`QUANTILE_MARGIN`): one pass counts the
    voxels below the bounds and keeps those between them, and only these are partitioned (several
    times faster than partitioning a whole 1-mm head). Where the bounds miss the ``k``-th value, the
    whole array is partitioned.
    """
    flat = np.asarray(array).reshape(-1)
    n = flat.size
    k = max(1, min(int(q * n), n))
    if n > QUANTILE_SAMPLE_ABOVE:
        sample = np.sort(flat[::QUANTILE_SAMPLE_STEP])
        at = lambda p: sample[min(max(int(p * sample.size), 0), sample.size - 1)]  # noqa: E731
        low, high = at(q - QUANTILE_MARGIN), at(q + QUANTILE_MARGIN)
        below = int(np.count_nonzero(flat < low))
        between = flat[(flat >= low) & (flat <= high)]
        if below < k <= below + between.size:
            return float(np.partition(between, k - 1 - below)[k - 1 - below])
    return float(np.partition(flat, k - 1)[k - 1])


@dataclass(frozen=True)
class IntensityNormalization:
    """How one image is scaled to ``[0, 1]``.

    Attributes:
        modality: ``"ct"`` or ``"mri"``.
        ct_window: HU window for CT.
        quantile_range: ``(lower, upper)`` quantiles for MRI; ``None`` means ``(min, 0.99)``.
    """

    modality: str
    ct_window: Tuple[float, float] = DEFAULT_CT_WINDOW
    quantile_range: Optional[Tuple[float, float]] = None

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise InputError(f"unknown modality {self.modality!r}; allowed: {', '.join(MODALITIES)}")
        lo, hi = self.ct_window
        if not lo < hi:
            raise InputError(f"CT window must have min < max, got {tuple(self.ct_window)}")
        if self.quantile_range is not None:
            qlo, qhi = self.quantile_range
            if not 0.0 <= qlo < qhi <= 1.0:
                raise InputError(f"quantile range must satisfy 0 <= lower < upper <= 1, "
                                 f"got {tuple(self.quantile_range)}")

    def intensity_range(self, array: np.ndarray) -> Tuple[float, float]:
        """The input intensities that map to 0 and 1."""
        if self.modality == "ct":
            return float(self.ct_window[0]), float(self.ct_window[1])
        if self.quantile_range is None:
            return float(np.min(array)), quantile(array, DEFAULT_MRI_UPPER_QUANTILE)
        return quantile(array, self.quantile_range[0]), quantile(array, self.quantile_range[1])

    def __call__(self, array: np.ndarray, *, what: str = "image") -> np.ndarray:
        """Scale ``array`` to ``[0, 1]`` (float32)."""
        lo, hi = self.intensity_range(array)
        if not hi > lo:
            raise InputError(
                f"{what}: the {self.modality.upper()} intensity range [{lo:g}, {hi:g}] is empty, so the "
                "image cannot be normalised; " + (
                    "check --ct-window" if self.modality == "ct" else
                    "most voxels share one value: try --quantile-range 0 1 or --moving/--fixed-modality ct"))
        scaled = np.array(array, dtype=np.float64)  # one working copy, clipped and scaled in place
        np.maximum(scaled, lo, out=scaled)
        np.minimum(scaled, hi, out=scaled)
        scaled -= lo
        scaled /= hi - lo
        return scaled.astype(np.float32)

    def to_dict(self) -> dict:
        return {"modality": self.modality, "ct_window": list(self.ct_window),
                "quantile_range": None if self.quantile_range is None else list(self.quantile_range)}


def guess_modality(array: np.ndarray) -> Tuple[str, str]:
    """Guess ``"ct"`` or ``"mri"`` from intensities; returns ``(modality, reason)``.

    CT images in Hounsfield units contain air (about -1000 HU) outside and inside the body; MRI
    magnitudes are non-negative. An image is taken as CT when at least 1% of its voxels are at or
    below -500.
    """
    flat = np.asarray(array).reshape(-1)
    minimum = float(np.min(flat))
    if not minimum <= -500.0:  # no voxel at or below -500: MRI without sorting anything
        return "mri", f"no air-like values (minimum {minimum:g})"
    # the 1% quantile (see quantile) is at or below -500 exactly when that many voxels are
    if np.count_nonzero(flat <= -500.0) >= max(1, min(int(0.01 * flat.size), flat.size)):
        return "ct", f"1% of voxels are at or below {quantile(flat, 0.01):g} (air in Hounsfield units)"
    if minimum < -500.0:
        return "mri", (f"values reach {minimum:g} but fewer than 1% of voxels are below -500, "
                       "unlike CT air; pass the modality explicitly if this is CT")
    return "mri", f"no air-like values (minimum {minimum:g})"


def resolve_modality(choice: str, array: np.ndarray) -> Tuple[str, Optional[str]]:
    """``choice`` if explicit, else the guess; returns ``(modality, reason or None)``."""
    if choice not in MODALITY_CHOICES:
        raise InputError(f"unknown modality {choice!r}; allowed: {', '.join(MODALITY_CHOICES)}")
    if choice in MRI_CONTRASTS:
        return "mri", None
    if choice != "auto":
        return choice, None
    return guess_modality(array)


def modalities_differ(fixed: str, moving: str) -> bool:
    """Whether two modality choices (:data:`MODALITY_CHOICES`) name different kinds of image: CT against
    MRI, or two different MRI contrasts. ``auto`` and the generic ``mri`` name no contrast."""
    pair = (fixed, moving)
    if "auto" in pair:
        return False
    if "mri" in pair:
        return "ct" in pair
    return fixed != moving


def apply_input_mask(normalized: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Zero the voxels outside the mask (mask voxels ``> 0`` are kept)."""
    return (normalized * (np.asarray(mask) > 0)).astype(np.float32)
