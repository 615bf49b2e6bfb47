"""Which instance optimisation a registration runs: the caller's ``io_*`` options resolved against the
model file's recommendation (:class:`~itk_gradicon.models.Refinement`), the modalities, and the pair's
intensities (two contrasts get the multimodal similarity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..errors import InputError
from ..models import PUBLISHED, Model
from .options import DEFAULT_LR, DEFAULT_SMOOTHNESS
from .options import IO_SIMILARITY_CHOICES as IO_SIMILARITIES
from .preprocess import MRI_CONTRASTS, modalities_differ


@dataclass(frozen=True)
class IOChoice:
    """The instance optimisation a registration runs, every default resolved.

    Attributes:
        iterations, method, similarity, smoothness, lr: as :func:`itk_gradicon.register`'s ``io_*`` options.
        lncc_sigma: the LNCC window of ``field`` IO (network voxels; ``None``: the training loss's).
        coarse_steps: steps of ``field`` IO on the half-resolution grid (the model's share of ``iterations``).
        coarse_lr_factor: their learning rate as a multiple of ``lr`` (the model's).
        patience: ``field`` IO's early stop (0: none).
        recommended: the step count came from the model file's recommendation (not from the caller).
        why_similarity: why this similarity (shown when it is not the caller's choice).
        multimodal_similarity: what to use instead when the pair's intensities show two contrasts
            (:func:`intensity_correlation` below :data:`TWO_CONTRASTS_BELOW`); ``None`` where the caller
            or the modalities chose.
        multimodal_smoothness: the smoothness that goes with ``multimodal_similarity`` (``None``: keep
            ``smoothness``; always ``None`` where the caller chose the smoothness).
    """

    iterations: int
    method: str
    similarity: str
    smoothness: float
    lr: float
    coarse_steps: int = 0
    patience: int = 0
    recommended: bool = False
    why_similarity: str = ""
    multimodal_similarity: Optional[str] = None
    lncc_sigma: Optional[float] = None
    multimodal_smoothness: Optional[float] = None
    coarse_lr_factor: float = 1.0

    def describe(self) -> str:
        """One line for the user: what runs, and where each default came from."""
        if self.iterations == 0:
            return "instance optimisation: none (prediction only)"
        origin = " (the model's recommendation)" if self.recommended else ""
        why = f" ({self.why_similarity})" if self.why_similarity else ""
        extra = f", smoothness {self.smoothness:g}" if self.method == "field" else ""
        if self.method == "field" and self.lncc_sigma is not None and self.similarity in ("lncc", "lncc2"):
            extra += f", window sigma {self.lncc_sigma:g} network voxels"
        if self.method == "field" and self.coarse_steps:
            extra += f", {self.coarse_steps} of the steps at half resolution"
            if self.coarse_lr_factor != 1.0:
                extra += f" (learning rate x{self.coarse_lr_factor:g})"
        return (f"instance optimisation: {self.method}, {self.iterations} steps{origin}, "
                f"similarity {self.similarity}{why}{extra}")


def resolve_io(model: Model, *, io_iterations: Optional[int] = None, io_method: str = "auto",
               io_similarity: Optional[str] = None, io_smoothness: Optional[float] = None,
               io_lr: Optional[float] = None, modalities: Tuple[str, str] = ("auto", "auto")) -> IOChoice:
    """Every ``None`` / ``"auto"`` IO option resolved against the model's recommendation
    (:class:`~itk_gradicon.models.Refinement`): steps, method and smoothness from it; the similarity
    from it for one contrast, its multimodal similarity when ``modalities`` name two different kinds
    of image (:func:`~itk_gradicon.pipeline.preprocess.modalities_differ`), else the model's training loss.

    Raises:
        InputError: an unknown similarity.
    """
    recommended = model.refinement
    iterations = recommended.iterations if io_iterations is None else int(io_iterations)
    if io_method == "auto":
        io_method = recommended.method if recommended.iterations > 0 else resolve_io_method("auto", model)
    why = ""
    from_pair = None
    two_contrasts = False
    if io_similarity is None:
        if modalities_differ(*modalities):
            two_contrasts = True
            io_similarity = recommended.multimodal_similarity
            why = f"the model's choice for two modalities, {modalities[0]} and {modalities[1]}"
        else:
            io_similarity = recommended.similarity or model.similarity
            if not (modalities[0] == modalities[1] and modalities[0] in MRI_CONTRASTS + ("ct",)):
                from_pair = recommended.multimodal_similarity  # the pair's intensities decide
    if io_similarity not in IO_SIMILARITIES:
        raise InputError(f"unknown IO similarity {io_similarity!r}; allowed: {', '.join(IO_SIMILARITIES)}")
    one_contrast = recommended.smoothness if recommended.smoothness is not None else DEFAULT_SMOOTHNESS
    two = recommended.multimodal_smoothness if recommended.multimodal_smoothness is not None else one_contrast
    smoothness = io_smoothness if io_smoothness is not None else (two if two_contrasts else one_contrast)
    field = io_method == "field"
    return IOChoice(iterations, io_method, io_similarity, float(smoothness),
                    DEFAULT_LR[io_method] if io_lr is None else float(io_lr),
                    coarse_steps=int(round(recommended.coarse_fraction * iterations)) if field else 0,
                    coarse_lr_factor=float(recommended.coarse_lr_factor) if field else 1.0,
                    patience=recommended.patience if field else 0,
                    recommended=io_iterations is None and iterations > 0, why_similarity=why,
                    multimodal_similarity=from_pair, lncc_sigma=recommended.lncc_sigma if field else None,
                    multimodal_smoothness=float(two) if from_pair is not None and io_smoothness is None else None)


def resolve_io_method(choice: str, model: Model) -> str:
    """``auto`` -> ``network`` for a published model (the papers' IO), ``field`` for any other model."""
    if choice != "auto":
        return choice
    return "network" if model.name in PUBLISHED else "field"


#: Below this correlation of the pre-aligned images' intensities (:func:`intensity_correlation`) a pair whose
#: modalities were not named is treated as two contrasts. Measured after the affine stage: same-contrast T1
#: pairs 0.64-0.66 (OASIS, Colin27 -> MNI152, OASIS -> ICBM 2009a); T2 -> T1w (spinal cord) 0.00, FLAIR -> T1c
#: 0.15, PD -> T1 0.23; but BraTS same-contrast pairs of tumour patients 0.21-0.34, which are then refined with
#: the multimodal similarity too.
TWO_CONTRASTS_BELOW = 0.4


def intensity_correlation(image_A: torch.Tensor, image_B: torch.Tensor, *, foreground: float = 0.1) -> float:
    """Pearson correlation of two network-grid images (normalised to [0, 1]) over the voxels where both are
    above ``foreground``; 1.0 where fewer than 100 such voxels exist (nothing to tell)."""
    a, b = image_A.detach().reshape(-1).double(), image_B.detach().reshape(-1).double()
    inside = (a > foreground) & (b > foreground)
    if int(inside.sum()) < 100:
        return 1.0
    a, b = a[inside] - a[inside].mean(), b[inside] - b[inside].mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else 1.0


__all__ = ["IOChoice", "IO_SIMILARITIES", "TWO_CONTRASTS_BELOW", "intensity_correlation", "resolve_io",
           "resolve_io_method"]
