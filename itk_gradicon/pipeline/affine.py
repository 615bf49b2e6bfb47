"""The pre-alignment ``gradicon register`` runs before the network: elastix from one or two starts, the
result checked for plausibility, a rigid fallback (:func:`prealign`); and the ``--affine`` choices.

The elastix runs themselves (parameter maps, the conversion of elastix's result to a homogeneous WORLD
matrix) are in :mod:`itk_gradicon.pipeline.elastix`; its names stay importable from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import numpy as np

from .elastix import (  # noqa: F401  (re-exported: the names users of this module know)
    DEFAULT_SEED, HISTOGRAM_BINS, INITIALIZATIONS, METRICS, TRANSFORMS, ElastixInputs, SamplesOutsideMoving,
    affine_from_elastix_parameters, affine_parameter_map, elastix_affine, euler_matrix, pyramid_levels)
from ..errors import InputError
from ..io.images import to_simpleitk
from ..threads import available_threads  # noqa: F401  (re-exported)
from .options import AFFINE_CHOICES  # noqa: F401  (re-exported: its former home)

Log = Callable[[str], None]

#: What an affine pre-alignment of one anatomy may do: every scale (singular value of its linear part)
#: within these bounds, the largest at most :data:`PLAUSIBLE_ANISOTROPY` times the smallest, and no
#: reflection. Heads of adults differ by about +-15 % along an axis (a child's head against an adult
#: template by somewhat more); a result outside these bounds is a failed registration, not a head.
PLAUSIBLE_SCALES = (0.75, 1.35)
PLAUSIBLE_ANISOTROPY = 1.3


def implausibility(matrix: np.ndarray) -> Optional[str]:
    """Why an affine pre-alignment (homogeneous, fixed -> moving) is implausible between two images of
    one anatomy, or ``None`` when it is plausible (see :data:`PLAUSIBLE_SCALES`)."""
    d = matrix.shape[0] - 1
    linear = np.asarray(matrix, dtype=np.float64)[:d, :d]
    scales = np.linalg.svd(linear, compute_uv=False)
    shown = "/".join(f"{v:.2f}" for v in scales)
    low, high = PLAUSIBLE_SCALES
    if np.linalg.det(linear) <= 0:
        return f"it mirrors the image (determinant {np.linalg.det(linear):.2f})"
    if scales.max() > high or scales.min() < low:
        return f"its scales {shown} leave {low:g}-{high:g}"
    if scales.max() / scales.min() > PLAUSIBLE_ANISOTROPY:
        return (f"its scales {shown} stretch one axis {scales.max() / scales.min():.2f} times more than "
                f"another (at most {PLAUSIBLE_ANISOTROPY:g})")
    return None


def _sitk(image):
    """A SimpleITK float image of ``image`` (``itk.Image`` or ``SimpleITK.Image``)."""
    import SimpleITK as sitk

    return sitk.Cast(to_simpleitk(image), sitk.sitkFloat32)


def normalized_mutual_information(fixed, moving, matrix: np.ndarray, *, bins: int = 32,
                                  spacing: float = 3.0) -> float:
    """``(H(F) + H(M)) / H(F, M)`` of the fixed image and the moving image seen through ``matrix``
    (fixed -> moving), on the fixed image's extent resampled to ``spacing`` mm; moving values outside
    its field of view count as 0 (background), so a start that pushes the anatomy out is penalised.
    Intensities are binned between their 1st and 99th percentiles. Used to choose between starts."""
    import SimpleITK as sitk

    fixed, moving = _sitk(fixed), _sitk(moving)
    d = fixed.GetDimension()
    size = [max(2, int(round(n * s / spacing))) for n, s in zip(fixed.GetSize(), fixed.GetSpacing())]
    new_spacing = [n * s / m for n, s, m in zip(fixed.GetSize(), fixed.GetSpacing(), size)]
    reference = sitk.Image(size, sitk.sitkFloat32)
    reference.SetDirection(fixed.GetDirection())
    reference.SetOrigin(fixed.TransformContinuousIndexToPhysicalPoint([-0.5 + 0.5 * m / n
                                                                       for n, m in zip(size, fixed.GetSize())]))
    reference.SetSpacing(new_spacing)
    transform = sitk.AffineTransform(d)
    transform.SetMatrix(np.asarray(matrix[:d, :d], dtype=float).ravel().tolist())
    transform.SetTranslation(np.asarray(matrix[:d, d], dtype=float).tolist())
    f = sitk.GetArrayFromImage(sitk.Resample(fixed, reference, sitk.Transform(), sitk.sitkLinear, 0.0)).ravel()
    m = sitk.GetArrayFromImage(sitk.Resample(moving, reference, transform, sitk.sitkLinear, 0.0)).ravel()

    def binned(values: np.ndarray) -> np.ndarray:
        low, high = np.percentile(values, [1, 99])
        scaled = (values - low) / max(high - low, 1e-12)
        return np.clip((scaled * (bins - 1)).round(), 0, bins - 1).astype(np.int64)

    joint = np.bincount(binned(f) * bins + binned(m), minlength=bins * bins).reshape(bins, bins).astype(float)
    joint /= joint.sum()

    def entropy(p: np.ndarray) -> float:
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    return (entropy(joint.sum(1)) + entropy(joint.sum(0))) / max(entropy(joint.ravel()), 1e-12)


@dataclass(frozen=True)
class Prealignment:
    """What :func:`prealign` found.

    Attributes:
        matrix: homogeneous WORLD matrix, fixed -> moving.
        transform: the kind written, ``"affine"`` or ``"rigid"``.
        start: where the winning run started: ``"header"`` (the images' physical positions as stored)
            or ``"mass"`` (intensity centres of mass aligned).
        similarity: its normalised mutual information (:func:`normalized_mutual_information`).
        rejected: why affine results were not used (empty when none was rejected).
        roles_swapped: elastix registered the fixed image to the moving one (sampling the moving image,
            which covers too little of the fixed one for elastix's samples) and ``matrix`` is the inverse
            of its result.
    """

    matrix: np.ndarray
    transform: str
    start: str
    similarity: float
    rejected: Tuple[str, ...] = field(default_factory=tuple)
    roles_swapped: bool = False

    def describe(self) -> str:
        d = self.matrix.shape[0] - 1
        scales = "/".join(f"{v:.3f}" for v in np.linalg.svd(self.matrix[:d, :d], compute_uv=False))
        shift = ", ".join(f"{v:.1f}" for v in self.matrix[:d, d])
        swapped = (", sampling the moving image: it covers too little of the fixed one for elastix's samples"
                   if self.roles_swapped else "")
        return (f"{self.transform} pre-alignment (elastix, from the {self.start} start{swapped}): scales {scales}, "
                f"translation [{shift}] mm, NMI {self.similarity:.3f}")


#: The starts :func:`prealign` tries: elastix's initialisation for each.
STARTS = {"header": "none", "mass": "mass"}
#: Centres of mass closer than this (mm) make the two starts one: only the header start runs.
SAME_START_MM = 5.0


def _centre_of_mass(image) -> np.ndarray:
    import SimpleITK as sitk

    image = _sitk(image)
    array = sitk.GetArrayViewFromImage(image)  # negative intensities weigh nothing; sums in float64
    if array.size and array.min() < 0:
        array = np.maximum(array, 0)
    total = array.sum(dtype=np.float64)
    if total <= 0:
        return np.asarray(image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()]))
    index = [float((array.sum(axis=tuple(a for a in range(array.ndim) if a != axis), dtype=np.float64)
                    * np.arange(array.shape[axis])).sum() / total) for axis in range(array.ndim)]
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint(index[::-1]))


def prealign(fixed, moving, fixed_mask=None, moving_mask=None, *, transform: str = "affine",
             threads: Optional[int] = None, log: Optional[Log] = None) -> Prealignment:
    """The pre-alignment ``gradicon register`` runs: elastix from one or two starts, the result checked.

    * Levels: elastix's 4-level pyramid, fewer for small images (:func:`pyramid_levels`).
    * Starts: ``transform="affine"`` tries the images' stored positions (``header``) and their aligned
      intensity centres of mass (``mass``, as antsRegistration's initial moving transform does) when
      the two differ by more than :data:`SAME_START_MM`, and keeps the result with the higher
      normalised mutual information. ``transform="rigid"`` (one subject, one scanner: the headers
      already place the images) starts from the headers only.
    * Check: an affine result whose scales are implausible for one anatomy (:func:`implausibility`)
      is never used; if no start gives a plausible affine, the best rigid result is used instead and
      ``log`` says why. A start on which elastix fails (e.g. images that barely overlap there) is
      passed over; only when every start fails is its error raised.
    * Roles: where too few of elastix's samples, drawn from the fixed image, fall inside the moving
      image (a slab or a small field of view registered to a whole head), that start runs again with
      the roles swapped (the moving image sampled) and the inverse of its result is used; the ``mass``
      start is then not tried (the centre of mass of a part is not the whole's).

    Returns:
        the :class:`Prealignment`.

    Raises:
        InputError: as :func:`elastix_affine`.
    """
    if transform not in TRANSFORMS:
        raise InputError(f"unknown pre-alignment transform {transform!r}; allowed: {', '.join(TRANSFORMS)}")
    fixed_s, moving_s = _sitk(fixed), _sitk(moving)
    elastix_inputs = ElastixInputs.of(fixed_s, moving_s, fixed_mask, moving_mask)  # checked and converted once
    levels = pyramid_levels(fixed_s, moving_s)
    starts = ["header"]
    if transform == "affine" and np.linalg.norm(_centre_of_mass(fixed_s) - _centre_of_mass(moving_s)) > SAME_START_MM:
        starts.append("mass")

    swapped_inputs: Optional[ElastixInputs] = None  # the roles swapped, converted on first need
    moving_is_a_part = False  # set once a swapped run worked: the moving image covers a part of the fixed one

    def run(kind: str, start: str) -> Tuple[np.ndarray, bool]:
        """elastix's fixed -> moving matrix from ``start``, and whether it came with the roles swapped."""
        nonlocal swapped_inputs, moving_is_a_part
        settings = dict(transform=kind, initialization=STARTS[start], resolutions=levels, threads=threads)
        try:
            return elastix_inputs.affine(**settings), False
        except SamplesOutsideMoving as err:
            if swapped_inputs is None:
                swapped_inputs = ElastixInputs.of(moving_s, fixed_s, moving_mask, fixed_mask)
            try:
                matrix = np.linalg.inv(swapped_inputs.affine(**settings))
            except InputError:
                raise err from None  # the first failure explains the pair
            moving_is_a_part = True
            return matrix, True

    def best_of(kind: str) -> Tuple[Optional[Prealignment], List[str]]:
        found, rejected = None, []
        tried, failures = 0, []
        for start in starts:
            if start == "mass" and moving_is_a_part:  # the centre of mass of a part is not the whole's
                continue
            tried += 1
            try:
                matrix, roles_swapped = run(kind, start)
            except InputError as err:  # e.g. a start where the images barely overlap: the other may work
                failures.append(err)
                rejected.append(f"from the {start} start, {err}")
                continue
            reason = implausibility(matrix) if kind == "affine" else None
            if reason is not None:
                rejected.append(f"from the {start} start, {reason}")
                continue
            candidate = Prealignment(matrix, kind, start, normalized_mutual_information(fixed_s, moving_s, matrix),
                                     roles_swapped=roles_swapped)
            if found is None or candidate.similarity > found.similarity:
                found = candidate
        if found is None and len(failures) == tried:
            raise failures[-1]
        return found, rejected

    result, rejected = best_of(transform)
    if result is not None and rejected and log is not None:
        log("pre-alignment: passed over " + "; ".join(rejected))
    if result is None:
        if log is not None:
            log("affine pre-alignment rejected (" + "; ".join(rejected) + f"; allowed scales {PLAUSIBLE_SCALES[0]:g}-"
                f"{PLAUSIBLE_SCALES[1]:g}, anisotropy at most {PLAUSIBLE_ANISOTROPY:g}): using a rigid one instead")
        result, _ = best_of("rigid")
        result = Prealignment(result.matrix, result.transform, result.start, result.similarity, tuple(rejected),
                              result.roles_swapped)
    if log is not None:
        log(result.describe())
    return result


PREALIGNMENT_TRANSFORMS = ("affine", "rigid")


def expects_prealignment(model) -> bool:
    """Whether ``model`` was trained on affinely pre-aligned pairs (its file says ``prealignment: affine``)."""
    return (model.preprocessing or {}).get("prealignment") == "affine"


def resolve_affine_choice(choice: str, model, has_initial_transform: bool) -> str:
    """``--affine auto`` becomes ``affine`` for a model that expects pre-aligned pairs (unless an
    initial transform is given), else ``none``; ``elastix`` becomes ``affine``; the others stay."""
    if choice == "elastix":
        return "affine"
    if choice != "auto":
        return choice
    return "affine" if expects_prealignment(model) and not has_initial_transform else "none"


__all__ = ["AFFINE_CHOICES", "PREALIGNMENT_TRANSFORMS", "expects_prealignment", "resolve_affine_choice",
           "INITIALIZATIONS", "METRICS", "affine_parameter_map", "affine_from_elastix_parameters",
           "elastix_affine", "available_threads", "implausibility", "prealign", "Prealignment",
           "pyramid_levels", "normalized_mutual_information", "euler_matrix"]
