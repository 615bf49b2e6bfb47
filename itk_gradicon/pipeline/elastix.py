"""elastix (the ``itk-elastix`` package) as an affine or rigid registration returning a homogeneous WORLD matrix.

:func:`elastix_affine` runs elastix's affine registration in memory and returns the homogeneous
``(d+1) x (d+1)`` matrix ``A`` that maps FIXED physical points (LPS mm) to MOVING physical points,
the convention of every transform in this package: ``moving(A(x))`` is the moving image resampled
onto the fixed grid. :func:`~itk_gradicon.registration.register` takes it as ``initial_transform``
and composes it into every transform it returns (``A o phi`` forward, ``phi^-1 o A^-1`` inverse).

How elastix's result becomes a matrix (:func:`affine_from_elastix_parameters`): an elastix
``AffineTransform`` stores ``d*d + d`` parameters, the matrix ``M`` row by row followed by the
translation ``t``, and a ``CenterOfRotationPoint`` ``c``; it maps a fixed point ``x`` to

    ``T(x) = M (x - c) + c + t``

in physical coordinates (``UseDirectionCosines "true"``, elastix's default since 4.8, which we set
explicitly). Hence ``A = [[M, t + c - M c], [0, 1]]``.

The registration is multi-resolution (images smoothed and shrunk by 2 per level; :func:`pyramid_levels`
chooses the levels), Mattes mutual information with :data:`HISTOGRAM_BINS` bins (so multimodal pairs work;
``metric="ncc"`` or ``"mse"`` for same-modality pairs), adaptive stochastic gradient descent
(:data:`ITERATIONS` per level) on 2,048 random samples per iteration, started by default from the alignment
of the two images' intensity centres of mass. Its random sampling is seeded, so a run is reproducible. The
number of threads is set explicitly (all the cores this process may use): itk-elastix otherwise picks its
own, and one of its 3-D runs once crashed here with a thread count it chose.

Example:
    >>> import itk
    >>> from itk_gradicon.pipeline.elastix import elastix_affine
    >>> from itk_gradicon import register
    >>> fixed, moving = itk.imread("t1.nii.gz", itk.F), itk.imread("t2.nii.gz", itk.F)  # doctest: +SKIP
    >>> A = elastix_affine(fixed, moving)                        # fixed -> moving      # doctest: +SKIP
    >>> result = register(fixed, moving, initial_transform=A)                           # doctest: +SKIP
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError
from ..io.images import check_image, image_dimension, same_grid
from ..io.itk_bridge import to_itk, to_simpleitk
from ..threads import itk_threads

#: ``initialization`` values and elastix's ``AutomaticTransformInitializationMethod`` for each.
INITIALIZATIONS: Dict[str, Optional[str]] = {
    "geometry": "GeometricalCenter",   # centres of the two image grids coincide
    "mass": "CenterOfGravity",         # intensity centres of mass coincide
    "none": None,                      # start from the identity (images already roughly aligned)
}
#: ``metric`` values and elastix's metric names.
METRICS: Dict[str, str] = {
    "mi": "AdvancedMattesMutualInformation",
    "ncc": "AdvancedNormalizedCorrelation",
    "mse": "AdvancedMeanSquares",
}
#: ``transform`` values and elastix's transform names.
TRANSFORMS: Dict[str, str] = {
    "affine": "AffineTransform",
    "rigid": "EulerTransform",
}
DEFAULT_SEED = 20240601
#: Joint-histogram bins of the mutual information (elastix's default: 32; the choice is measured in
#: ``benchmarks/ACCURACY.md``, run 6).
HISTOGRAM_BINS = 64
#: Optimiser iterations per pyramid level (elastix's default: 256; ``benchmarks/ACCURACY.md``, run 9).
ITERATIONS = 512
#: elastix's pyramids: each level smoothed *and* shrunk (``Recursive``), where elastix's default map only
#: smooths (``Smoothing``) and so filters and samples full-resolution images at every level, for the same
#: Dice (``benchmarks/ACCURACY.md``, run 9).
PYRAMIDS = ("FixedRecursiveImagePyramid", "MovingRecursiveImagePyramid")


# itk-elastix's classes, loaded by their own wrapping modules. Through ITK's lazy loader, the first use
# of ``itk.ParameterObject`` or ``itk.ElastixRegistrationMethod`` loads the Elastix module group and
# every group it depends on (smoothing, convolution, FFT, image intensity, ...): 19 s of a 2-core
# machine before elastix starts, for two classes whose own modules load in a second. The same classes
# are used either way; the public names are the fallback wherever an ITK lays its wrapping out differently.

def _parameter_object():
    """A new ``elastix::ParameterObject``."""
    try:
        from itk import elxParameterObjectPython as wrapping

        return wrapping.elastixParameterObject.New()
    except (ImportError, AttributeError):
        import itk

        return itk.ParameterObject.New()


def _registration_method(fixed_type, moving_type):
    """A new ``itk::ElastixRegistrationMethod`` for two ``itk.Image`` classes (``itkImageF3`` ...)."""
    def short(image_type) -> str:  # itkImageF3 -> IF3, the suffix of ITK's wrapped class names
        return "I" + image_type.__name__[len("itkImage"):]

    try:
        from itk import itkElastixRegistrationMethodPython as wrapping

        return getattr(wrapping, f"itkElastixRegistrationMethod{short(fixed_type)}{short(moving_type)}").New()
    except (ImportError, AttributeError):
        import itk

        return itk.ElastixRegistrationMethod[fixed_type, moving_type].New()


def load_modules(dimension: int = 3) -> None:
    """Load the ITK Python modules a first :func:`elastix_affine` of ``dimension``-D images loads (ITK's image
    types and array bridge, elastix's parameter object and registration method), ahead of it."""
    import SimpleITK as sitk
    import itk

    _parameter_object()
    image_type = itk.Image[itk.F, dimension]
    _registration_method(image_type, image_type)
    to_itk(sitk.Image([4] * dimension, sitk.sitkFloat32))


def affine_parameter_map(*, metric: str = "mi", initialization: str = "mass", iterations: int = ITERATIONS,
                         resolutions: int = 4, samples: int = 2048, seed: int = DEFAULT_SEED,
                         transform: str = "affine") -> Dict[str, Tuple[str, ...]]:
    """The elastix parameter map used by :func:`elastix_affine`.

    It starts from elastix's default ``affine`` map and sets what the conversion to a WORLD matrix
    relies on (``AffineTransform``, direction cosines used), the options below, :data:`HISTOGRAM_BINS`
    bins for mutual information, shrinking pyramids (:data:`PYRAMIDS`), masks used as given (not eroded at
    coarse resolutions), and writes no result image.

    Args:
        metric: ``"mi"`` (Mattes mutual information, any modalities), ``"ncc"`` (normalised
            correlation) or ``"mse"`` (mean squares; same modality and intensity scale).
        initialization: ``"mass"`` (align the intensity centres of mass, as antsRegistration's
            initial moving transform does; the default), ``"geometry"`` (align the grids' centres) or
            ``"none"`` (start from the identity); compared in ``benchmarks/bench_affine.py``.
        iterations: optimiser iterations per resolution.
        resolutions: number of resolution levels (Gaussian smoothing pyramid).
        samples: random spatial samples per iteration.
        seed: seed of elastix's random sampler.
        transform: ``"affine"`` (elastix's ``AffineTransform``) or ``"rigid"`` (``EulerTransform``:
            rotation and translation only, its rotation and translation steps balanced by elastix's
            automatic scales estimation).

    Returns:
        ``{parameter name: tuple of strings}``, as ``itk.ParameterObject`` holds it.

    Raises:
        InputError: an option outside the allowed values.
    """

    if metric not in METRICS:
        raise InputError(f"unknown affine metric {metric!r}; allowed: {', '.join(METRICS)}")
    if transform not in TRANSFORMS:
        raise InputError(f"unknown pre-alignment transform {transform!r}; allowed: {', '.join(TRANSFORMS)}")
    if initialization not in INITIALIZATIONS:
        raise InputError(f"unknown affine initialization {initialization!r}; allowed: "
                         f"{', '.join(INITIALIZATIONS)}")
    for name, value in (("iterations", iterations), ("resolutions", resolutions), ("samples", samples)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"affine {name} must be a whole number >= 1, not {value!r}")
    defaults = _parameter_object().GetDefaultParameterMap(transform)
    params: Dict[str, Tuple[str, ...]] = {key: tuple(value) for key, value in defaults.items()}
    params.update({
        "Transform": (TRANSFORMS[transform],),
        "UseDirectionCosines": ("true",),
        "Metric": (METRICS[metric],),
        "NumberOfHistogramBins": (str(HISTOGRAM_BINS),),
        "FixedImagePyramid": (PYRAMIDS[0],),
        "MovingImagePyramid": (PYRAMIDS[1],),
        "MaximumNumberOfIterations": (str(int(iterations)),),
        "NumberOfResolutions": (str(int(resolutions)),),
        "NumberOfSpatialSamples": (str(int(samples)),),
        "RandomSeed": (str(int(seed)),),
        "WriteResultImage": ("false",),
        "WriteIterationInfo": ("false",),
        # elastix erodes masks at coarse resolutions by default; a mask a few centimetres wide then
        # vanishes and the run fails ("No valid voxels found to estimate ... parameters")
        "ErodeMask": ("false",),
    })
    method = INITIALIZATIONS[initialization]
    if method is None:
        params["AutomaticTransformInitialization"] = ("false",)
    else:
        params["AutomaticTransformInitialization"] = ("true",)
        params["AutomaticTransformInitializationMethod"] = (method,)
    return params


def _floats(parameter_map: Mapping[str, Sequence[str]], key: str) -> np.ndarray:
    try:
        return np.array([float(v) for v in parameter_map[key]], dtype=np.float64)
    except KeyError:
        raise InputError(f"the elastix transform parameters lack '{key}'") from None
    except ValueError:
        raise InputError(f"the elastix parameter '{key}' is not numeric: {tuple(parameter_map[key])}") from None


def _word(parameter_map: Mapping[str, Sequence[str]], key: str, default: str) -> str:
    value = parameter_map.get(key)
    return str(value[0]) if value else default


def affine_from_elastix_parameters(parameter_map: Mapping[str, Sequence[str]]) -> np.ndarray:
    """The homogeneous WORLD matrix (fixed -> moving) of an elastix transform parameter map.

    Args:
        parameter_map: one map of an elastix ``TransformParameters`` result, as
            ``itk.ParameterObject.GetParameterMap`` returns it (``{name: tuple of strings}``).
            ``AffineTransform`` (``d*d`` matrix entries row by row, then ``d`` translations, about
            ``CenterOfRotationPoint``) and ``TranslationTransform`` are understood.

    Returns:
        ``(d+1) x (d+1)`` float64 matrix ``[[M, t + c - M c], [0, 1]]``.

    Raises:
        InputError: another transform type, an initial transform chained in, direction cosines
            not used, or parameters of the wrong length.
    """
    parameter_map = {str(key): tuple(values) for key, values in parameter_map.items()}
    kind = _word(parameter_map, "Transform", "")
    d = int(_floats(parameter_map, "FixedImageDimension")[0]) if "FixedImageDimension" in parameter_map else None
    initial = _word(parameter_map, "InitialTransformParametersFileName", "NoInitialTransform")
    if initial != "NoInitialTransform":
        raise InputError(f"the elastix transform chains an initial transform ('{initial}'); only a single "
                         "affine transform can be converted")
    if _word(parameter_map, "UseDirectionCosines", "true").lower() != "true":
        raise InputError('the elastix transform was computed with (UseDirectionCosines "false"): it is not '
                         "in physical coordinates")
    values = _floats(parameter_map, "TransformParameters")
    if kind == "TranslationTransform":
        d = d or values.size
        matrix = np.eye(d + 1)
        matrix[:d, d] = values[:d]
        return matrix
    if kind == "EulerTransform":
        d = d or {3: 2, 6: 3}.get(values.size)
        if d not in (2, 3) or values.size != {2: 3, 3: 6}[d]:
            raise InputError(f"an elastix EulerTransform needs 3 (2-D) or 6 (3-D) parameters, got {values.size}")
        zyx = _word(parameter_map, "ComputeZYX", "false").lower() == "true"
        m = euler_matrix(values[: d - 1 if d == 2 else 3], zyx=zyx)
        translation = values[1 if d == 2 else 3:]
    elif kind == "AffineTransform":
        if d is None:
            d = {6: 2, 12: 3}.get(values.size)
        if d is None or values.size != d * d + d:
            raise InputError(f"an elastix AffineTransform needs d*d + d parameters, got {values.size}")
        m = values[: d * d].reshape(d, d)
        translation = values[d * d:]
    else:
        raise InputError(f"cannot convert an elastix {kind or 'unnamed'} transform to an affine matrix; "
                         "allowed: AffineTransform, EulerTransform, TranslationTransform")
    center = _floats(parameter_map, "CenterOfRotationPoint") if "CenterOfRotationPoint" in parameter_map \
        else np.zeros(d)
    if center.size != d:
        raise InputError(f"CenterOfRotationPoint has {center.size} values for a {d}-D transform")
    matrix = np.eye(d + 1)
    matrix[:d, :d] = m
    matrix[:d, d] = translation + center - m @ center
    return matrix


def euler_matrix(angles: Sequence[float], *, zyx: bool = False) -> np.ndarray:
    """The rotation matrix of ITK's ``Euler2DTransform`` (one angle) or ``Euler3DTransform`` (angles about
    x, y and z, radians): ``Rz Rx Ry``, or ``Rz Ry Rx`` with ``ComputeZYX``, as ITK composes them."""
    angles = np.asarray(angles, dtype=np.float64).ravel()
    if angles.size == 1:
        c, s = np.cos(angles[0]), np.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx if zyx else rz @ rx @ ry


def _elastix_log_reason(log: Path) -> Optional[str]:
    """The ``Description:`` line of the last error in an elastix log, if any."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return None
    found = None
    for line in lines:
        text = line.strip()
        if text.lower().startswith("description:"):
            found = text.split(":", 1)[1].strip()
            found = found.split("ERROR:", 1)[-1].strip() if "ERROR:" in found else found
    return found or None


def _elastix_error(err: BaseException) -> str:
    """The informative line of an elastix/ITK exception message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        low = line.lower()
        if low.startswith("description:"):
            return line.split(":", 1)[1].strip()
    for line in lines:
        if "error" in line.lower() and "itk::ExceptionObject" not in line:
            return line
    return lines[-1] if lines else type(err).__name__


def elastix_affine(fixed, moving, fixed_mask=None, moving_mask=None, *, threads: Optional[int] = None,
                   parameter_map: Optional[Mapping[str, Sequence[str]]] = None,
                   log: Optional[Callable[[str], None]] = None, **settings) -> np.ndarray:
    """Affine registration of ``moving`` to ``fixed`` with elastix; returns the fixed -> moving matrix.

    Args:
        fixed, moving: scalar images of the same dimension (2 or 3), ``itk.Image`` (a
            ``SimpleITK.Image`` is converted), raw intensities (any pixel type; cast to float).
        fixed_mask, moving_mask: optional masks on their image's grid; only voxels > 0 are sampled.
        settings: the keywords of :func:`affine_parameter_map` (``metric``, ``initialization``,
            ``iterations``, ``resolutions``, ``samples``, ``seed``, ``transform``; its defaults where not given).
        threads: threads elastix may use (default: ``--threads`` or the environment, else every core this
            process may run on; :mod:`itk_gradicon.threads`).
        parameter_map: a complete elastix parameter map to use instead (must produce an
            ``AffineTransform``); ``settings`` are then ignored.
        log: called with one line saying what was found.

    Returns:
        ``(d+1) x (d+1)`` homogeneous WORLD matrix mapping fixed physical points (LPS mm) to moving
        physical points.

    Raises:
        InputError: images of different dimension, an option outside the allowed values, or
            elastix failing on these images (e.g. masks too small to sample).
    """
    inputs = ElastixInputs.of(fixed, moving, fixed_mask, moving_mask)
    return inputs.affine(threads=threads, parameter_map=parameter_map, log=log, **settings)


def _elastix_inputs(fixed, moving, fixed_mask, moving_mask):
    """``(fixed, moving, [fixed_mask, moving_mask])`` as elastix takes them: float ``itk.Image`` objects
    and ``unsigned char`` masks (or ``None``), after checking dimensions, grids and that masks are not
    empty. The checks run on SimpleITK images; elastix's ITK images are made at the end, by the bridge."""
    import SimpleITK as sitk

    fixed, moving, fixed_mask, moving_mask = (to_simpleitk(i) for i in (fixed, moving, fixed_mask, moving_mask))
    d = image_dimension(fixed)
    if image_dimension(moving) != d:
        raise InputError(f"the fixed image is {d}-D and the moving image "
                         f"{image_dimension(moving)}-D; an affine needs two images of one dimension")
    fixed_f = check_image(fixed, what="fixed image", dimension=d)
    moving_f = check_image(moving, what="moving image", dimension=d)
    masks = []
    for mask, image, what in ((fixed_mask, fixed_f, "fixed mask"), (moving_mask, moving_f, "moving mask")):
        if mask is None:
            masks.append(None)
            continue
        if not same_grid(mask, image):
            raise InputError(f"the {what} is not on its image's grid")
        array = (sitk.GetArrayViewFromImage(mask) > 0).astype(np.uint8)
        if not array.any():
            raise InputError(f"the {what} is empty (no voxel > 0)")
        as_uc = sitk.GetImageFromArray(array)
        as_uc.CopyInformation(image)
        masks.append(to_itk(as_uc))
    return to_itk(fixed_f), to_itk(moving_f), masks


@dataclass(frozen=True)
class ElastixInputs:
    """Two images (and their masks) as elastix takes them, checked and converted to ITK once: a
    pre-alignment that runs elastix from several starts prepares them once (:func:`ElastixInputs.of`)."""

    fixed: Any
    moving: Any
    masks: Tuple[Any, Any]

    @classmethod
    def of(cls, fixed, moving, fixed_mask=None, moving_mask=None) -> "ElastixInputs":
        """Check and convert (see :func:`elastix_affine` for what is accepted)."""
        fixed_f, moving_f, masks = _elastix_inputs(fixed, moving, fixed_mask, moving_mask)
        return cls(fixed_f, moving_f, (masks[0], masks[1]))

    def affine(self, *, threads: Optional[int] = None, parameter_map: Optional[Mapping[str, Sequence[str]]] = None,
               log: Optional[Callable[[str], None]] = None, **settings) -> np.ndarray:
        """:func:`elastix_affine` on these inputs."""
        fixed_f, moving_f, masks = self.fixed, self.moving, list(self.masks)
        d = int(fixed_f.GetImageDimension())
        if threads is None:
            threads = itk_threads()
        if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
            raise InputError(f"threads must be a whole number >= 1, not {threads!r}")
        params = dict(parameter_map) if parameter_map is not None else affine_parameter_map(**settings)
        result = _run_elastix(fixed_f, moving_f, masks, params, int(threads))
        if result.GetNumberOfParameterMaps() != 1:
            raise InputError(f"elastix returned {result.GetNumberOfParameterMaps()} transforms; expected one affine")
        matrix = affine_from_elastix_parameters(result.GetParameterMap(0))
        if matrix.shape != (d + 1, d + 1) or not np.all(np.isfinite(matrix)):
            raise InputError(f"elastix returned an unusable affine transform: {matrix.tolist()}")
        if log is not None:
            linear = matrix[:d, :d]
            kind = {name: key for key, name in TRANSFORMS.items()}.get(_word(params, "Transform", ""), "affine")
            scales = np.round(np.linalg.svd(linear, compute_uv=False), 3).tolist()
            translation = np.round(matrix[:d, d], 2).tolist()
            log(f"{kind} pre-alignment (elastix): scales {scales}, translation {translation} mm")
        return matrix


class SamplesOutsideMoving(InputError):
    """elastix gave up because too few of its fixed-image samples fell inside the moving image (a moving
    image that covers a small part of the fixed one, e.g. a slab): the same pair may register with the
    roles swapped, sampling the smaller image."""


#: How elastix words that failure (its metrics' "Too many samples map outside moving image buffer").
SAMPLES_OUTSIDE = "samples map outside moving image"


def _run_elastix(fixed, moving, masks, params: Mapping[str, Sequence[str]], threads: int):
    """Run elastix with one parameter map; returns its transform parameter object.

    elastix explains a failure only in its log: one is written to a temporary folder (removed
    afterwards) and its reason becomes the :class:`InputError`'s message.
    """
    parameter_object = _parameter_object()
    parameter_object.AddParameterMap({k: tuple(str(v) for v in vs) for k, vs in params.items()})
    method = _registration_method(type(fixed), type(moving))
    method.SetFixedImage(fixed)
    method.SetMovingImage(moving)
    if masks[0] is not None:
        method.SetFixedMask(masks[0])
    if masks[1] is not None:
        method.SetMovingMask(masks[1])
    method.SetParameterObject(parameter_object)
    method.SetNumberOfThreads(threads)
    method.SetLogToConsole(False)
    with tempfile.TemporaryDirectory(prefix="gradicon-elastix-") as work:
        method.SetOutputDirectory(work)
        method.SetLogFileName("elastix.log")
        method.SetLogToFile(True)
        try:
            method.Update()
        except RuntimeError as err:
            reason = _elastix_log_reason(Path(work) / "elastix.log") or _elastix_error(err)
            kind = SamplesOutsideMoving if SAMPLES_OUTSIDE in reason.lower() else InputError
            raise kind(f"elastix could not compute the affine pre-alignment: {reason} "
                       "(check the masks, or register without an affine)") from err
    return method.GetTransformParameterObject()


def pyramid_levels(*images) -> int:
    """Resolution levels for elastix's pyramid: 4 (elastix's default) for images of 128 voxels or more
    along every axis, fewer for small ones, so that the coarsest level (smoothed and shrunk by
    ``2^(levels-1)``) keeps at least 16 voxels along its shortest axis. (elastix's 4 levels on a
    42-voxel-wide spinal-cord image smooth the cord away: its rigid result moved a same-session pair
    12 mm off.)"""
    shortest = min(min(int(n) for n in image.GetSize()) for image in images)
    return int(min(4, max(1, 1 + np.floor(np.log2(max(shortest, 1) / 16.0)))))


__all__ = ["DEFAULT_SEED", "HISTOGRAM_BINS", "ITERATIONS", "PYRAMIDS", "INITIALIZATIONS", "METRICS", "TRANSFORMS",
           "load_modules", "ElastixInputs", "SamplesOutsideMoving", "affine_from_elastix_parameters", "affine_parameter_map",
           "elastix_affine", "euler_matrix", "pyramid_levels"]
