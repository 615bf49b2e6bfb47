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
from ..io.grid import ImageGrid
from ..io.images import to_simpleitk
from ..threads import available_threads  # noqa: F401  (re-exported)
from .options import AFFINE_CHOICES  # noqa: F401  (re-exported: its former home)
from .region import foreground_box, raw_foreground_threshold

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
    """A SimpleITK float image of ``image`` (``itk.Image`` or ``SimpleITK.Image``): the image itself where it is
    one already (nothing here writes into it; SimpleITK copies on write)."""
    import SimpleITK as sitk

    image = to_simpleitk(image)
    return image if image.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(image, sitk.sitkFloat32)


def normalized_mutual_information(fixed, moving, matrix: np.ndarray, *, bins: int = 32,
                                  spacing: float = 3.0) -> float:
    """``(H(F) + H(M)) / H(F, M)`` of the fixed image and the moving image seen through ``matrix``
    (fixed -> moving), on the fixed image's extent resampled to ``spacing`` mm; moving values outside
    its field of view count as 0 (background), so a start that pushes the anatomy out is penalised.
    Intensities are binned between their 1st and 99th percentiles. Used to choose between starts."""
    return _NMIScore(_sitk(fixed), _sitk(moving), spacing=spacing, bins=bins)(matrix)


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
        rotation: for ``start="rotated"``, the rotation of the start (``"90 degrees about S"``): the centres of
            mass aligned and the moving image turned about its own (:func:`rotation_search`).
    """

    matrix: np.ndarray
    transform: str
    start: str
    similarity: float
    rejected: Tuple[str, ...] = field(default_factory=tuple)
    roles_swapped: bool = False
    rotation: str = ""

    def describe(self) -> str:
        d = self.matrix.shape[0] - 1
        scales = "/".join(f"{v:.3f}" for v in np.linalg.svd(self.matrix[:d, :d], compute_uv=False))
        shift = ", ".join(f"{v:.1f}" for v in self.matrix[:d, d])
        swapped = (", sampling the moving image: it covers too little of the fixed one for elastix's samples"
                   if self.roles_swapped else "")
        start = f"a start rotated {self.rotation}" if self.start == "rotated" else f"the {self.start} start"
        return (f"{self.transform} pre-alignment (elastix, from {start}{swapped}): scales {scales}, "
                f"translation [{shift}] mm, NMI {self.similarity:.3f}")


#: The starts :func:`prealign` tries: elastix's initialisation for each.
STARTS = {"header": "none", "mass": "mass"}
#: elastix stops when fewer than this share of its fixed-image samples map inside the moving image (its
#: ``RequiredRatioOfValidSamples``, 0.25 by default): from the stored positions of two images whose headers
#: place them far apart (a subject in scanner coordinates and a template in MNI space), at its first iteration.
ELASTIX_VALID_SAMPLES = 0.25
#: The header start is not run where fewer than this share of the fixed image's voxels map inside the moving
#: image from the stored positions (:func:`start_overlap`): elastix would refuse it (in about half a second per
#: try, and once more with the roles swapped). Below elastix's own share, so that only starts it surely refuses
#: are passed over unrun; nearer ones run and are judged by elastix as before.
UNRUN_BELOW = 0.2


def start_overlap(fixed, moving, fixed_mask=None, moving_mask=None, *, samples: int = 32768) -> float:
    """The share of ``fixed``'s voxels (those inside ``fixed_mask`` where given) whose stored positions lie inside
    ``moving``'s grid (and inside ``moving_mask`` where given): what elastix checks of its samples at its first
    iteration from the header start. Counted on a regular subset of about ``samples`` voxels (SimpleITK images)."""
    import SimpleITK as sitk

    d = fixed.GetDimension()
    size = np.array(fixed.GetSize())
    step = max(1, int(np.ceil((np.prod(size, dtype=np.float64) / samples) ** (1.0 / d))))
    axes = [np.arange(0, n, step) for n in size]
    index = np.stack([a.ravel() for a in np.meshgrid(*axes, indexing="ij")], axis=1)  # ITK order (x first)
    if fixed_mask is not None:
        inside_fixed = sitk.GetArrayViewFromImage(fixed_mask)[tuple(index[:, ::-1].T)] > 0
        index = index[inside_fixed]
    if len(index) == 0:
        return 0.0

    def to_world(image) -> Tuple[np.ndarray, np.ndarray]:
        linear = np.asarray(image.GetDirection(), dtype=np.float64).reshape(d, d) * np.asarray(image.GetSpacing())
        return linear, np.asarray(image.GetOrigin(), dtype=np.float64)

    linear_f, origin_f = to_world(fixed)
    linear_m, origin_m = to_world(moving)
    points = index @ linear_f.T + origin_f
    continuous = np.linalg.solve(linear_m, (points - origin_m).T).T
    inside = np.all((continuous >= 0) & (continuous <= np.asarray(moving.GetSize()) - 1), axis=1)
    if moving_mask is not None and inside.any():
        nearest = np.rint(continuous[inside]).astype(np.int64)
        inside[inside] = sitk.GetArrayViewFromImage(moving_mask)[tuple(nearest[:, ::-1].T)] > 0
    return float(inside.mean())


def _refused_at_the_header_start(fixed, moving, fixed_mask, moving_mask) -> Optional[SamplesOutsideMoving]:
    """The failure elastix would report from the stored positions, where :func:`start_overlap` is below
    :data:`UNRUN_BELOW`; ``None`` where elastix is to run."""
    overlap = start_overlap(fixed, moving, fixed_mask, moving_mask)
    if overlap >= UNRUN_BELOW:
        return None
    return SamplesOutsideMoving(
        f"elastix could not compute the affine pre-alignment: from the images' stored positions only {overlap:.0%} "
        f"of the fixed image{' mask' if fixed_mask is not None else ''} lies inside the moving image"
        f"{' mask' if moving_mask is not None else ''} (elastix needs {ELASTIX_VALID_SAMPLES:.0%} of its samples "
        "there; not run) (check the masks, or register without an affine)")
#: Centres of mass closer than this (mm) make the two starts one: only the header start runs.
SAME_START_MM = 5.0


def _cut_to_foreground(image, mask=None):
    """elastix's copy of ``image`` (a SimpleITK float image) and of its mask: cut to the box of its foreground
    where that box is much smaller than the image (:func:`itk_gradicon.pipeline.region.foreground_box`: a
    skull-stripped brain in a 256^3 field of view). Physical positions are kept, so the affine found is the
    same kind of answer; elastix then neither filters nor samples the empty part (a quarter of the stage's time
    on such an image, ``benchmarks/ACCURACY.md`` run 22)."""
    import SimpleITK as sitk

    array = sitk.GetArrayViewFromImage(image)
    box = foreground_box([array], ImageGrid.from_image(image), threshold=raw_foreground_threshold(array))
    if box is None:
        return image, mask
    cut = lambda im: None if im is None else sitk.RegionOfInterest(im, list(box.size), list(box.start))  # noqa: E731
    return cut(image), cut(mask)


#: elastix registers copies of images with an axis finer than this (mm), that axis shrunk by the largest whole factor
#: that keeps it at most this fine (so only axes of at most half of it change): the resolution at which the
#: pre-alignment was measured against antspyx ``Affine`` (1-mm brains), where a finer last pyramid level only costs
#: time (``benchmarks/ACCURACY.md``, run 30).
ELASTIX_FINEST_MM = 1.0


def _at_most_finest(image, mask=None):
    """elastix's copy of ``image`` (and of its mask) with every axis finer than half of :data:`ELASTIX_FINEST_MM`
    shrunk by ``floor(ELASTIX_FINEST_MM / spacing)`` (blocks averaged, their centres kept, so physical positions
    are those of the image; a mask keeps a block that holds any of it); images not that fine are returned as
    they are."""
    import SimpleITK as sitk

    factors = [max(1, int(np.floor(ELASTIX_FINEST_MM / sp + 1e-6))) for sp in image.GetSpacing()]
    factors = [f if n // f >= 16 else 1 for f, n in zip(factors, image.GetSize())]  # never below 16 voxels
    if all(f == 1 for f in factors):
        return image, mask
    shrunk = sitk.BinShrink(image, factors)
    if mask is not None:
        mask = sitk.Cast(sitk.BinShrink(sitk.Cast(mask > 0, sitk.sitkFloat32), factors) > 0, sitk.sitkUInt8)
    return shrunk, mask


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
    fixed_mask, moving_mask = to_simpleitk(fixed_mask), to_simpleitk(moving_mask)
    fixed_e, fixed_mask_e = _at_most_finest(*_cut_to_foreground(fixed_s, fixed_mask))  # what elastix registers
    moving_e, moving_mask_e = _at_most_finest(*_cut_to_foreground(moving_s, moving_mask))
    elastix_inputs = ElastixInputs.of(fixed_e, moving_e, fixed_mask_e, moving_mask_e)  # checked and converted once
    levels = pyramid_levels(fixed_e, moving_e)
    starts = ["header"]
    centres = (_centre_of_mass(fixed_s), _centre_of_mass(moving_s)) if transform == "affine" else None
    if centres is not None and np.linalg.norm(centres[0] - centres[1]) > SAME_START_MM:
        starts.append("mass")

    swapped_inputs: Optional[ElastixInputs] = None  # the roles swapped, converted on first need
    moving_is_a_part = False  # set once a swapped run worked: the moving image covers a part of the fixed one

    def run(kind: str, start: str) -> Tuple[np.ndarray, bool]:
        """elastix's fixed -> moving matrix from ``start``, and whether it came with the roles swapped."""
        nonlocal swapped_inputs, moving_is_a_part
        settings = dict(transform=kind, initialization=STARTS[start], resolutions=levels, threads=threads)
        refused = _refused_at_the_header_start(fixed_e, moving_e, fixed_mask_e, moving_mask_e) \
            if start == "header" else None
        try:
            if refused is not None:
                raise refused
            return elastix_inputs.affine(**settings), False
        except SamplesOutsideMoving as err:
            if start == "header" and _refused_at_the_header_start(moving_e, fixed_e, moving_mask_e,
                                                                  fixed_mask_e) is not None:
                raise err from None  # swapped, the images lie as far apart
            if swapped_inputs is None:
                swapped_inputs = ElastixInputs.of(moving_e, fixed_e, moving_mask_e, fixed_mask_e)
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
    if transform == "affine":  # inter-subject: the images may be turned far apart (a start too far off can
        # also look like a moving image that covers a part: the search runs either way)
        result = _rotated_start(result, (fixed_s, fixed_e), (moving_s, moving_e), fixed_mask_e, moving_mask_e,
                                centres=centres, levels=levels, threads=threads, log=log)
    if log is not None:
        log(result.describe())
    return result


# --------------------------------------------------------------------------------------------
# Starts turned far from the stored positions (antsAI's search, in brief)
# --------------------------------------------------------------------------------------------

#: Spacing (mm) of the grid on which :func:`rotation_search` scores the rotated starts.
SEARCH_SPACING_MM = 4.0
#: A turned start is run only when its score, before any registration, beats the registered result's by more
#: than this (normalised mutual information), and its registration is kept only when it beats the result by as
#: much: the right basin, registered, outscores every unregistered start. Measured (ACCURACY.md, run 19): brains
#: turned 45-180 degrees, 0.05-0.09 above; head CTs against an MRI template, whose mutual information is weak
#: everywhere, 0.001-0.006 (noise, where a turned start must not win).
SEARCH_MARGIN = 0.02
#: The best this-many turned starts are refined by turns of :data:`SEARCH_REFINE_DEGREES` about each axis (the
#: best of all then by half of it).
SEARCH_REFINE_BEST, SEARCH_REFINE_DEGREES = 3, 30.0


def _turn(dimension: int, axis: int, degrees: float) -> np.ndarray:
    """A rotation by ``degrees`` about WORLD axis ``axis`` (``dimension`` x ``dimension``; in 2-D the one axis)."""
    if dimension == 2:
        return euler_matrix([np.deg2rad(degrees)])
    angles = [0.0, 0.0, 0.0]
    angles[axis] = np.deg2rad(degrees)
    return euler_matrix(angles)


def start_rotations(dimension: int) -> List[Tuple[str, np.ndarray]]:
    """The turns :func:`rotation_search` tries, with names for the log: the proper rotations of a cube about
    the WORLD axes (24 in 3-D, 4 in 2-D; the identity first) and 45 degrees either way about each axis.
    elastix's affine registration recovers turns of about 30 degrees from any of them."""
    axes = "LPS"[:dimension]
    found: List[Tuple[str, np.ndarray]] = []
    seen = set()

    def add(name: str, matrix: np.ndarray) -> None:
        # products of exact turns agree to far better than 1e-6; + 0.0 turns -0.0 into 0.0
        key = (np.round(matrix, 6) + 0.0).tobytes()
        if key not in seen:
            seen.add(key)
            found.append((name, matrix))

    def turn(axis: int, degrees: float) -> np.ndarray:
        return _turn(dimension, axis, degrees)

    add("0 degrees", np.eye(dimension))
    singles = [(f"{a} degrees about {axes[axis]}", turn(axis, a)) for axis in (range(3) if dimension == 3 else [0])
               for a in (90, 180, 270)]
    for name, matrix in singles:
        add(name, matrix)
    if dimension == 3:  # the cube's other rotations: one turn after another
        for first_name, first in singles:
            for second_name, second in singles:
                add(f"{first_name}, then {second_name}", second @ first)
    for axis in (range(3) if dimension == 3 else [0]):
        for a in (45, -45):
            add(f"{a} degrees about {axes[axis]}", turn(axis, a))
    return found


class _NMIScore:
    """:func:`normalized_mutual_information` of many matrices against one pair, the fixed image's samples
    taken once."""

    def __init__(self, fixed, moving, *, spacing: float, bins: int = 32) -> None:
        import SimpleITK as sitk

        d = fixed.GetDimension()
        size = [max(2, int(round(n * s / spacing))) for n, s in zip(fixed.GetSize(), fixed.GetSpacing())]
        self.reference = sitk.Image(size, sitk.sitkFloat32)
        self.reference.SetDirection(fixed.GetDirection())
        self.reference.SetOrigin(fixed.TransformContinuousIndexToPhysicalPoint(
            [-0.5 + 0.5 * m / n for n, m in zip(size, fixed.GetSize())]))
        self.reference.SetSpacing([n * s / m for n, s, m in zip(fixed.GetSize(), fixed.GetSpacing(), size)])
        self.moving, self.bins, self.d = moving, bins, d
        values = sitk.GetArrayFromImage(sitk.Resample(fixed, self.reference, sitk.Transform(), sitk.sitkLinear, 0.0))
        self.fixed_bins = self._binned(values.ravel())

    def _binned(self, values: np.ndarray) -> np.ndarray:
        low, high = np.percentile(values, [1, 99])
        scaled = (values - low) / max(high - low, 1e-12)
        return np.clip((scaled * (self.bins - 1)).round(), 0, self.bins - 1).astype(np.int64)

    def __call__(self, matrix: np.ndarray) -> float:
        import SimpleITK as sitk

        d = self.d
        transform = sitk.AffineTransform(d)
        transform.SetMatrix(np.asarray(matrix[:d, :d], dtype=float).ravel().tolist())
        transform.SetTranslation(np.asarray(matrix[:d, d], dtype=float).tolist())
        values = sitk.GetArrayFromImage(sitk.Resample(self.moving, self.reference, transform, sitk.sitkLinear, 0.0))
        joint = np.bincount(self.fixed_bins * self.bins + self._binned(values.ravel()),
                            minlength=self.bins * self.bins).astype(float)
        joint /= joint.sum()
        joint = joint.reshape(self.bins, self.bins)

        def entropy(p: np.ndarray) -> float:
            p = p[p > 0]
            return float(-(p * np.log(p)).sum())

        return (entropy(joint.sum(1)) + entropy(joint.sum(0))) / max(entropy(joint.ravel()), 1e-12)


def rotation_search(fixed, moving, registered: np.ndarray, centres: Optional[Tuple[np.ndarray, np.ndarray]] = None
                    ) -> Optional[Tuple[str, np.ndarray, float, float]]:
    """The best start turned far from the stored positions, where it scores higher than ``registered``
    (the pre-alignment found, fixed -> moving) does.

    Every turn of :func:`start_rotations` is scored as a start: the intensity centres of mass aligned and the
    moving image turned about its own, scored by normalised mutual information on a
    :data:`SEARCH_SPACING_MM` grid before any registration. A registration that found the right basin scores
    higher than every unregistered start, so the search gives ``None`` for a pair whose stored orientations
    were near; only when a turned start beats the registered result by more than :data:`SEARCH_MARGIN` (a pair
    turned 45 degrees or more apart, where elastix from the headers or the centres ends in a wrong basin) it
    returns ``(name, start matrix fixed -> moving, its score, the registered result's score)``. ``centres``: the
    two images' intensity centres of mass where the caller has them (found here otherwise).
    """
    fixed, moving = _sitk(fixed), _sitk(moving)
    d = fixed.GetDimension()
    score = _NMIScore(fixed, moving, spacing=SEARCH_SPACING_MM)
    centre_f, centre_m = centres if centres is not None else (_centre_of_mass(fixed), _centre_of_mass(moving))

    def scored(name: str, rotation: np.ndarray) -> Tuple[float, str, np.ndarray]:
        start = np.eye(d + 1)
        start[:d, :d] = rotation
        start[:d, d] = centre_m - rotation @ centre_f
        return score(start), name, start

    turns = start_rotations(d)
    coarse = sorted((scored(name, rotation) for name, rotation in turns[1:]), key=lambda t: -t[0])
    # around the best few, finer turns (SEARCH_REFINE_DEGREES about each axis), then half of it around the
    # best of those: no start is then farther than about 15 degrees from the truth, well within elastix's reach
    def around(best: List[Tuple[float, str, np.ndarray]], degrees: float) -> List[Tuple[float, str, np.ndarray]]:
        return [scored(f"{name}, then {step:+g} degrees about {'LPS'[axis]}", _turn(d, axis, step) @ start[:d, :d])
                for _, name, start in best for axis in range(3 if d == 3 else 1) for step in (degrees, -degrees)]

    finer = sorted(coarse[:SEARCH_REFINE_BEST] + around(coarse[:SEARCH_REFINE_BEST], SEARCH_REFINE_DEGREES),
                   key=lambda t: -t[0])
    value, name, start = max([finer[0]] + around(finer[:1], SEARCH_REFINE_DEGREES / 2), key=lambda t: t[0])
    base = score(registered)
    return (name, start, value, base) if value > base + SEARCH_MARGIN else None


def _placed_through(image, start: np.ndarray):
    """A copy of a SimpleITK image whose voxels sit where ``start`` (a rigid WORLD map into ``image``'s space)
    takes them from: for a point ``x`` of the copy's space, ``start(x)`` is the same voxel in ``image``'s.
    Only the header changes (origin and direction), so nothing is resampled."""
    import SimpleITK as sitk

    if image is None:
        return None
    d = image.GetDimension()
    rotation, shift = start[:d, :d], start[:d, d]
    out = sitk.Image(image)
    out.SetDirection((rotation.T @ np.asarray(image.GetDirection(), dtype=float).reshape(d, d)).ravel().tolist())
    out.SetOrigin((rotation.T @ (np.asarray(image.GetOrigin(), dtype=float) - shift)).tolist())
    return out


def _rotated_start(result: Prealignment, fixed, moving, fixed_mask, moving_mask, *, centres, levels: int,
                   threads: Optional[int], log: Optional[Log]) -> Prealignment:
    """``result``, or the registration from a turned start where :func:`rotation_search` finds one that
    outscores it and elastix from there ends with a plausible affine of higher normalised mutual
    information (a rigid one where the affine is implausible). ``fixed`` and ``moving``: each image, and
    elastix's copy of it (with the masks, :func:`_cut_to_foreground`)."""
    (fixed, fixed_e), (moving, moving_e) = fixed, moving
    found = rotation_search(fixed, moving, result.matrix, centres)
    if found is None:
        return result
    name, start, value, base = found
    if log is not None:
        log(f"pre-alignment: a start rotated {name} scores higher before registration (NMI {value:.3f}) than the "
            f"result did after it ({base:.3f}): registering from there too")
    inputs = ElastixInputs.of(fixed_e, _placed_through(moving_e, start), fixed_mask,
                              _placed_through(moving_mask, start))
    candidate = None
    for kind in ("affine", "rigid"):
        try:
            matrix = start @ inputs.affine(transform=kind, initialization="none", resolutions=levels, threads=threads)
        except InputError as err:
            if log is not None:
                log(f"pre-alignment: the start rotated {name} failed ({err}); keeping the other")
            return result
        if kind == "rigid" or implausibility(matrix) is None:
            candidate = Prealignment(matrix, kind, "rotated", normalized_mutual_information(fixed, moving, matrix),
                                     result.rejected, rotation=name)
            break
    if candidate.similarity > result.similarity + SEARCH_MARGIN:
        return candidate
    if log is not None:
        log(f"pre-alignment: from the start rotated {name}, NMI {candidate.similarity:.3f}; keeping the "
            f"{result.start} start's {result.similarity:.3f}")
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
           "pyramid_levels", "normalized_mutual_information", "euler_matrix", "rotation_search",
           "start_rotations", "ELASTIX_FINEST_MM"]
