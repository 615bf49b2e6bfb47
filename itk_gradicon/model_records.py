"""What a model file records besides its weights: the refinement it recommends (:class:`Refinement`) and
the images it was trained on (:class:`Domain`), with the records of the published and bundled models.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import ModelError


REFINEMENT_METHODS = ("field", "network")


@dataclass(frozen=True)
class Refinement:
    """The instance optimisation (IO) a model recommends after its prediction: what ``gradicon
    register`` and :func:`~itk_gradicon.registration.register` run when the caller does not choose.

    Attributes:
        iterations: IO steps (0: prediction only).
        method: ``"field"`` or ``"network"`` (see :mod:`itk_gradicon.pipeline.instance`).
        similarity: IO similarity for two images of one contrast (``None``: the model's training loss).
        multimodal_similarity: IO similarity when the two images' modalities differ
            (``--fixed-modality t1w --moving-modality t2w``, CT against MRI).
        smoothness: diffusion weight of ``field`` IO with the one-contrast similarity (``None``: the
            package's default).
        multimodal_smoothness: diffusion weight of ``field`` IO with the multimodal similarity (``None``:
            ``smoothness``).
        lncc_sigma: Gaussian window (sigma, network voxels) of the LNCC similarities in ``field`` IO
            (``None``: the training loss's window, :data:`~itk_gradicon.pipeline.losses.LNCC_SIGMA`).
        coarse_fraction: share of the steps of ``field`` IO run on the network grid halved along every
            axis before the rest run on the full grid (0: all on the full grid).
        patience: ``field`` IO ends a level once its loss has not improved in this many steps (0: never).
        note: where the recommendation comes from (one line, shown to users).
        coarse_lr_factor: the learning rate of the half-resolution steps, as a multiple of the full grid's.
    """

    iterations: int = 0
    method: str = "field"
    similarity: Optional[str] = None
    multimodal_similarity: str = "mind"
    smoothness: Optional[float] = None
    coarse_fraction: float = 0.0
    patience: int = 0
    note: str = ""
    multimodal_smoothness: Optional[float] = None
    lncc_sigma: Optional[float] = None
    coarse_lr_factor: float = 1.0

    def to_dict(self) -> Dict[str, Any]:
        return {"iterations": self.iterations, "method": self.method, "similarity": self.similarity,
                "multimodal_similarity": self.multimodal_similarity, "smoothness": self.smoothness,
                "coarse_fraction": self.coarse_fraction, "patience": self.patience, "note": self.note,
                "multimodal_smoothness": self.multimodal_smoothness, "lncc_sigma": self.lncc_sigma,
                "coarse_lr_factor": self.coarse_lr_factor}

    @classmethod
    def from_dict(cls, entry: Any, source: str) -> "Refinement":
        """The record of a model file, checked.

        Raises:
            ModelError: a record that is not a mapping, an unknown key, or a value outside what is allowed.
        """
        if not isinstance(entry, Mapping):
            raise ModelError(f"{source}: 'refinement' must be a mapping, not {type(entry).__name__}")
        unknown = sorted(set(entry) - set(cls().to_dict()))
        if unknown:
            raise ModelError(f"{source}: unknown 'refinement' keys {unknown}; allowed: {', '.join(cls().to_dict())}")
        try:
            made = cls(**dict(entry))
        except TypeError as err:
            raise ModelError(f"{source}: unreadable 'refinement' record ({err})") from None
        iterations = made.iterations
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ModelError(f"{source}: refinement iterations must be a whole number >= 0, not {iterations!r}")
        if made.method not in REFINEMENT_METHODS:
            raise ModelError(f"{source}: refinement method {made.method!r}; allowed: {', '.join(REFINEMENT_METHODS)}")
        for key in ("smoothness", "multimodal_smoothness"):
            value = getattr(made, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0):
                raise ModelError(f"{source}: refinement {key} must be a number >= 0, not {value!r}")
        sigma = made.lncc_sigma
        if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0):
            raise ModelError(f"{source}: refinement lncc_sigma must be a number > 0 (network voxels), not {sigma!r}")
        factor = made.coarse_lr_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise ModelError(f"{source}: refinement coarse_lr_factor must be a number > 0, not {factor!r}")
        if not (isinstance(made.coarse_fraction, (int, float)) and 0 <= made.coarse_fraction < 1):
            raise ModelError(f"{source}: refinement coarse_fraction must be a number in [0, 1), not "
                             f"{made.coarse_fraction!r}")
        if isinstance(made.patience, bool) or not isinstance(made.patience, int) or made.patience < 0:
            raise ModelError(f"{source}: refinement patience must be a whole number >= 0, not {made.patience!r}")
        return made


@dataclass(frozen=True)
class Domain:
    """What a model was trained on, as far as a registration can check it from the images.

    Attributes:
        region: the anatomy (``"brain"``, ...), for the messages.
        modalities: the modalities it saw (``"mri"``, ``"ct"``); empty: any.
        extent_mm: the physical size of the images it saw, smallest and largest, per axis (mm).
    """

    region: str = ""
    modalities: Tuple[str, ...] = ()
    extent_mm: Optional[Tuple[float, float]] = None

    def to_dict(self) -> Dict[str, Any]:
        return {"region": self.region, "modalities": list(self.modalities),
                "extent_mm": None if self.extent_mm is None else list(self.extent_mm)}

    @classmethod
    def from_dict(cls, entry: Any, source: str) -> "Domain":
        """The record of a model file, checked.

        Raises:
            ModelError: not a mapping, an unknown key, or values of the wrong kind.
        """
        if not isinstance(entry, Mapping) or set(entry) - {"region", "modalities", "extent_mm"}:
            raise ModelError(f"{source}: 'domain' must be a mapping of region, modalities and extent_mm, "
                             f"not {entry!r}")
        extent = entry.get("extent_mm")
        if extent is not None and not (isinstance(extent, (list, tuple)) and len(extent) == 2
                                       and all(isinstance(v, (int, float)) and v > 0 for v in extent)
                                       and extent[0] <= extent[1]):
            raise ModelError(f"{source}: domain extent_mm must be [smallest, largest] in mm, not {extent!r}")
        modalities = entry.get("modalities") or []
        if not isinstance(modalities, (list, tuple)) or not all(isinstance(m, str) for m in modalities):
            raise ModelError(f"{source}: domain modalities must be a list of names, not {modalities!r}")
        return cls(str(entry.get("region") or ""), tuple(modalities),
                   None if extent is None else (float(extent[0]), float(extent[1])))

    def warnings(self, model: str, extents: Mapping[str, Sequence[float]],
                 modalities: Mapping[str, str]) -> List[str]:
        """One line per way a pair leaves this domain (``extents``: mm per axis of each role's image;
        ``modalities``: the modality used for each role)."""
        lines = []
        what = f"the model '{model}' was trained on {self.region or 'images'}"
        low, high = self.extent_mm or (0.0, math.inf)
        for role, extent in extents.items():
            if min(extent) < 0.6 * low or max(extent) > 1.6 * high:
                shown = " x ".join(f"{v:.0f}" for v in extent)
                lines.append(f"warning: the {role} image spans {shown} mm; {what} spanning {low:.0f}-{high:.0f} mm "
                             "per axis: this pair is outside its domain, check the result (the QC picture, "
                             "--out-qc) or use a model trained for it")
        for role, modality in modalities.items():
            if self.modalities and modality not in self.modalities:
                lines.append(f"warning: the {role} image is {modality}; {what} of modality "
                             f"{', '.join(self.modalities)} only")
        return lines


#: No instance optimisation: the record of a model file that recommends none.
NO_REFINEMENT = Refinement(note="prediction only unless --io-iterations is given")
#: What itk_gradicon recommends for the compact models it trains (measured on the bundled model,
#: ``benchmarks/ACCURACY.md``): 30 steps of field IO, 20 of them on the half-resolution grid at twice the
#: learning rate (run 27: run 8's 40 + 10 steps' Dice within 0.0012 on lapirn_oasis, higher on the unaligned
#: and two-contrast pairs, in 20 fewer steps); LNCC with a window of sigma 2 network voxels and smoothness 0.2
#: for one contrast (run 8), MIND with 0.15 for two.
FIELD_REFINEMENT = Refinement(iterations=30, method="field", coarse_fraction=2 / 3, coarse_lr_factor=2.0,
                              patience=5, smoothness=0.2, multimodal_smoothness=0.15, lncc_sigma=2.0,
                              note="field IO measured with this package's compact models (benchmarks/ACCURACY.md)")
#: What itk_gradicon recommends for the published models (175^3): :data:`FIELD_REFINEMENT`'s schedule (30 steps, 20
#: at half resolution), LNCC for one contrast whatever the training loss (multiGradICON's squared LNCC folded 0.15 %
#: of lapirn_oasis's voxels, LNCC 0.03 %), its window widened to sigma 3.5 network voxels, about the physical width of
#: sigma 2 on a 96^3 grid. Their papers' IO tunes the network's weights (``--io-method network``), minutes per step on
#: a CPU at 175^3; field IO takes 25 s (LNCC) to 50 s (MIND) there. Measured from the pre-alignment on the 175^3 grid
#: (``benchmarks/ACCURACY.md``, run 29): lapirn_oasis 0.64 -> 0.798 / 0.799 (ANTs SyN 0.73-0.74).
PUBLISHED_REFINEMENT = dataclasses.replace(
    FIELD_REFINEMENT, similarity="lncc", lncc_sigma=3.5,
    note="field IO on the 175^3 grid, measured from the pre-alignment (benchmarks/ACCURACY.md, run 29)")


__all__ = ["Domain", "FIELD_REFINEMENT", "NO_REFINEMENT", "PUBLISHED_REFINEMENT", "REFINEMENT_METHODS",
           "Refinement"]
