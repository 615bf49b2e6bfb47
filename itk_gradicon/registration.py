"""Registration of one image pair: ITK images in, ITK displacement-field transforms out.

Data path: intensity normalisation (:mod:`itk_gradicon.pipeline.preprocess`) -> optional affine pre-alignment ->
layout on the network grid (:mod:`itk_gradicon.spatial.frames`; over the box of the images' foreground where the
fixed grid is much larger, :mod:`itk_gradicon.pipeline.region`) -> network prediction, optionally after instance
optimisation (IO) -> fields on the fixed grid (forward) and the moving grid (inverse) (:mod:`.spatial.transforms`).

Conventions:

* the forward transform maps FIXED physical points to MOVING physical points, on the fixed grid;
  resampling the moving image with it gives the moving image warped onto the fixed image;
* the inverse transform maps MOVING points to FIXED points, on the moving grid; it comes from the
  network's ``phi_BA`` (GradICON predicts both directions), not from a numerical inversion;
* with an affine pre-alignment ``A`` (fixed -> moving), the network registers the fixed image to the
  moving image resampled through ``A``, and the written transforms are ``A o phi`` and
  ``phi^-1 o A^-1``;
* instance optimisation (:mod:`itk_gradicon.pipeline.instance`) tunes a copy of the network (``network``) or refines the
  predicted fields (``field``): the loaded model is never changed.

Example:
    >>> import itk
    >>> from itk_gradicon import register
    >>> result = register(itk.imread("fixed.nii.gz"), itk.imread("moving.nii.gz"),
    ...                   model="unigradicon", io_iterations=50)            # doctest: +SKIP
    >>> warped = itk.resample_image_filter(moving, transform=result.forward_transform,
    ...     use_reference_image=True, reference_image=fixed)                 # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from .devices import available_memory_bytes, check_memory, estimate_memory, resolve_device  # noqa: F401
from .errors import InputError
from .io.images import check_image, describe_grid, image_array, image_like, same_grid
from .io.itk_bridge import affine_from_itk, is_itk_image, to_simpleitk
from .models import DEFAULT_MODEL, Model, load_model
from .network.inference import predict_displacements
from .network.sampling import compiled_kernels_on
from .pipeline import losses
from .pipeline import affine as affine_stage  # prealign called through the module (tests replace it there)
from .pipeline.coverage import prealigned_coverage_warning
from .pipeline.affine import resolve_affine_choice
from .pipeline.instance import FieldSettings, IOProgress, optimise_network, refine_fields, voxel_scale, warp_voxels
from .pipeline.options import (  # noqa: F401  (the choices and the check are re-exported: their former home)
    AFFINE_CHOICES, DEFAULT_LR, DEFAULT_SMOOTHNESS, INPUT_KEYWORDS, IO_METHOD_CHOICES, IO_METHODS, IO_STARTS,
    MASK_MODES, MODALITY_CHOICES, ORIENTATIONS, RegistrationOptions, check_options)
from .pipeline.preprocess import DEFAULT_CT_WINDOW, IntensityNormalization, apply_input_mask, resolve_modality
from .pipeline.refinement import TWO_CONTRASTS_BELOW, intensity_correlation, resolve_io, resolve_io_method  # noqa: F401
from .pipeline.region import describe_box, foreground_box
from .spatial.frames import ImageGrid, NetworkFrame, displacement_on_grid
from .spatial.transforms import DisplacementField, affine_to_simpleitk

DEFAULT_IO_LR = DEFAULT_LR["network"]


@dataclass
class RegistrationResult:
    """Fields and transforms of one registration.

    Attributes:
        forward_field: fixed -> moving, on the fixed grid (affine pre-alignment included).
        inverse_field: moving -> fixed, on the moving grid (``None`` when not computed); computed on first
            use (``has_inverse`` says whether there is one without computing it).
        affine: homogeneous WORLD matrix of the pre-alignment (fixed -> moving), or ``None``.
        deformable_forward_field, deformable_inverse_field: with an affine, the deformable part
            alone (both on the fixed grid), as ANTs writes ``1Warp``/``1InverseWarp`` next to
            ``0GenericAffine.mat``.
        fixed_modality, moving_modality: the modalities used.
        messages: what was decided on the user's behalf (modality guesses, reorientation).
        io_history: losses after each instance-optimisation step.
        timings: seconds spent per stage.
        io_similarity: the similarity instance optimisation used (``None`` without it).
        io_smoothness: the diffusion weight ``field`` IO used (``None`` without it).
    """

    forward_field: DisplacementField
    _inverse: Union[None, DisplacementField, Callable[[], DisplacementField]]
    affine: Optional[np.ndarray]
    _deformable_forward: Union[None, DisplacementField, Callable[[], DisplacementField]]
    _deformable_inverse: Union[None, DisplacementField, Callable[[], DisplacementField]]
    fixed_modality: str
    moving_modality: str
    messages: List[str] = field(default_factory=list)
    io_history: List[Dict[str, float]] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)
    io_similarity: Optional[str] = None
    io_smoothness: Optional[float] = None
    _cache: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def inverse_field(self) -> Optional[DisplacementField]:
        return self._computed("_inverse")

    @property
    def has_inverse(self) -> bool:
        """Whether the inverse was computed (or can be, on first use of :attr:`inverse_field`)."""
        return self._inverse is not None

    @property
    def deformable_forward_field(self) -> Optional[DisplacementField]:
        return self._computed("_deformable_forward")

    @property
    def deformable_inverse_field(self) -> Optional[DisplacementField]:
        return self._computed("_deformable_inverse")

    def _computed(self, name: str) -> Optional[DisplacementField]:
        """A field given as a function is computed on first use (the inverse only for an inverse output or
        landmarks, the deformable parts only for ANTs' ``1Warp`` / ``1InverseWarp``)."""
        value = getattr(self, name)
        if callable(value):
            value = value()
            setattr(self, name, value)
        return value

    @property
    def forward_transform(self):
        """``itk.DisplacementFieldTransform`` fixed -> moving on the fixed grid."""
        if "forward" not in self._cache:
            self._cache["forward"] = self.forward_field.to_transform()
        return self._cache["forward"]

    @property
    def inverse_transform(self):
        """``itk.DisplacementFieldTransform`` moving -> fixed on the moving grid."""
        if not self.has_inverse:
            raise ValueError("the inverse was not computed (compute_inverse=False)")
        if "inverse" not in self._cache:
            self._cache["inverse"] = self.inverse_field.to_transform()
        return self._cache["inverse"]


def _as_affine(initial_transform, dimension: int) -> Optional[np.ndarray]:
    if initial_transform is None:
        return None
    if isinstance(initial_transform, np.ndarray):
        matrix = np.asarray(initial_transform, dtype=np.float64)
        if matrix.shape != (dimension + 1, dimension + 1):
            raise InputError(f"an affine pre-alignment must be a {dimension + 1}x{dimension + 1} "
                             f"homogeneous matrix, not {matrix.shape}")
    else:
        try:
            matrix = affine_from_itk(initial_transform)
        except (AttributeError, TypeError) as err:
            raise InputError(f"the affine pre-alignment must be a matrix-offset ITK transform, not "
                             f"{type(initial_transform).__name__}") from err
        if matrix.shape != (dimension + 1, dimension + 1):
            raise InputError(f"the affine pre-alignment is {matrix.shape[0] - 1}-D; the model is {dimension}-D")
    last_row = np.eye(dimension + 1)[dimension]
    if not np.all(np.isfinite(matrix)) or not np.allclose(matrix[dimension], last_row):
        raise InputError(f"the affine pre-alignment is not a finite homogeneous matrix: {matrix.tolist()}")
    if abs(np.linalg.det(matrix[:dimension, :dimension])) < 1e-8:
        raise InputError(f"the affine pre-alignment is singular (not invertible): {matrix.tolist()}")
    return matrix


def _resample_on(image, reference, affine: np.ndarray, *, nearest: bool, default: float = 0.0):
    """``image`` sampled at ``affine(p)`` for every voxel ``p`` of ``reference``'s grid (ITK's
    resampler through SimpleITK, linear or nearest neighbour)."""
    import SimpleITK as sitk

    grid = ImageGrid.from_image(reference)
    return sitk.Resample(image, [int(n) for n in grid.size], affine_to_simpleitk(affine),
                         sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear,
                         [float(v) for v in grid.origin], [float(v) for v in grid.spacing],
                         [float(v) for row in grid.direction for v in row], float(default),
                         image.GetPixelID())


def register(fixed, moving, *, model: Union[str, Model] = DEFAULT_MODEL,
             options: Optional[RegistrationOptions] = None, initial_transform=None,
             device: Union[str, torch.device] = "auto", progress: Optional[Callable[[IOProgress], None]] = None,
             generator: Optional[torch.Generator] = None,
             predictor: Optional[Callable[..., Tuple[torch.Tensor, Optional[torch.Tensor]]]] = None,
             **keywords) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` with a GradICON-family network.

    Every option can be given as a keyword below or, typed and grouped, as ``options``
    (:class:`~itk_gradicon.pipeline.options.RegistrationOptions`; keywords given beside it replace its fields).

    Args:
        fixed, moving: scalar images of the model's dimension, ``itk.Image`` or ``SimpleITK.Image`` (as
            masks and label maps; ``itk.Image`` objects are converted once, on the way in).
        model: a published name, a weight/model file, or a loaded :class:`~itk_gradicon.models.Model`.
        options: the options as one object (default: every default).
        fixed_modality, moving_modality: ``"ct"``, ``"mri"``, an MRI contrast (``"t1w"``, ``"t2w"``,
            ``"flair"``, ``"pd"``, ``"t2star"``: normalised as ``"mri"``; two different ones choose a
            multimodal IO similarity) or ``"auto"`` (guessed from intensities; the guess is reported
            in ``result.messages``).
        ct_window: HU window for CT images (default ``(-1000, 1000)``).
        quantile_range: quantiles for non-CT images (default: minimum and 99th percentile).
        fixed_mask, moving_mask: binary masks on their image's grid (voxels ``> 0`` are inside).
        mask_mode: ``"input"`` (zero the image outside the mask before the network sees it),
            ``"loss"`` (restrict the IO similarity to the mask) or ``"both"``.
        io_iterations: instance-optimisation steps (0: prediction only; default: the model's
            recommendation, :class:`~itk_gradicon.models.Refinement`: 30 steps of ``field`` IO for the
            bundled and the published models).
        io_similarity: ``"lncc"``, ``"lncc2"`` or ``"mind"`` (default: the model's recommendation for
            one contrast, or for two when the modalities name different contrasts, e.g. ``"t1w"`` and
            ``"t2w"``).
        io_lr: Adam learning rate of the IO steps (default: 2e-5 for ``network``; 0.3, in network voxels,
            for ``field``).
        io_method: ``"network"`` (Adam on a copy of the network's weights, as the papers do),
            ``"field"`` (Adam on the predicted displacement fields, a few warps per step: see
            :mod:`itk_gradicon.pipeline.instance`) or ``"auto"`` (the model's recommendation, ``field`` for the
            bundled and the published models; for a model file that recommends none, ``field``).
        io_smoothness: weight of the diffusion penalty of ``field`` IO (default: the model's, else 0.15).
        fixed_labels, moving_labels: label maps on their image's grid; with IO they add a soft Dice
            term over the labels present in both, weighted by ``io_dice_weight``.
        initial_transform: affine pre-alignment fixed -> moving (ITK matrix-offset transform or a
            homogeneous matrix in WORLD coordinates), composed into the result.
        affine: without ``initial_transform``: ``"affine"`` (or its former name ``"elastix"``) and
            ``"rigid"`` compute the pre-alignment with :func:`itk_gradicon.pipeline.affine.prealign` (an affine
            with implausible scales falls back to rigid, and ``result.messages`` says so), ``"none"``
            does not, ``"auto"`` is ``"affine"`` for a model trained on affinely pre-aligned pairs (its
            file says ``prealignment: affine``).
        orientation: ``"fixed"`` (the moving image is laid out along the fixed image's axes; see
            :mod:`itk_gradicon.spatial.frames`) or ``"storage"`` (both as stored in their files, as the reference does).
        network_region: ``"auto"`` (after a pre-alignment, the box of both images' foreground where it is at least
            30 % smaller than the fixed grid: :mod:`itk_gradicon.pipeline.region`) or ``"image"`` (the whole grid).
        io_start: where ``field`` instance optimisation starts: ``"prediction"`` (the network's fields),
            ``"prealignment"`` (the pre-alignment alone: the network does not run) or ``"auto"``
            (``prediction``, but ``prealignment`` for a pair outside the model's domain, which
            ``result.messages`` then says; :class:`~itk_gradicon.models.Domain`).
        compute_inverse: also compute the inverse (moving -> fixed) transform.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        progress: called after each IO step with an :class:`IOProgress`.
        generator: random generator for the IO's GradICON sample points (reproducible runs).
        predictor: ``(net, image_A, image_B, *, inverse) -> (disp_AB, disp_BA)`` run on the network
            grid (default :func:`itk_gradicon.network.inference.predict_displacements`); a cohort
            passes one that batches several pairs (:mod:`itk_gradicon.commands.batch`).

    Returns:
        :class:`RegistrationResult`; ``result.forward_transform`` is the ITK transform.

    Raises:
        InputError, ModelError, DeviceError, ResourceError: problems the caller can fix.
    """
    started = time.perf_counter()
    timings: Dict[str, float] = {}
    messages: List[str] = []
    if isinstance(device, str):
        device = resolve_device(device)
    inputs = {key: keywords.pop(key, None) for key in INPUT_KEYWORDS}
    options = RegistrationOptions.from_keywords(options, **keywords)
    check_options(options, {**inputs, "initial_transform": initial_transform})
    if not isinstance(model, Model):
        model = load_model(model)
        timings["load_model"] = time.perf_counter() - started
    d = model.architecture.dimension
    fixed, moving, inputs = _inside(fixed), _inside(moving), {key: _inside(value) for key, value in inputs.items()}
    fixed, moving = _check_inputs(fixed, moving, d, **inputs)
    request = RegistrationRequest.from_options(fixed, moving, model, options, initial_transform=initial_transform,
                                               messages=messages, inputs=inputs)
    prealignment = resolve_affine_choice(options.prealignment.affine, model, initial_transform is not None)
    if prealignment != "none" and initial_transform is None:
        t = time.perf_counter()
        found = affine_stage.prealign(fixed, moving, inputs["fixed_mask"], inputs["moving_mask"],
                                      transform=prealignment, log=messages.append)
        request = dataclasses.replace(request, affine=found.matrix)
        timings["affine"] = time.perf_counter() - t
    check_memory(estimate_memory(ImageGrid.from_image(fixed).num_voxels, ImageGrid.from_image(moving).num_voxels,
                                 d, model.architecture.input_shape, io=request.io_iterations > 0,
                                 inverse=options.compute_inverse or (request.io_iterations > 0
                                                                     and request.io_method == "field"),
                                 affine=request.affine is not None, io_method=request.io_method,
                                 compiled=compiled_kernels_on(device)), device)
    return run_request(request, device=device, progress=progress, generator=generator, predictor=predictor,
                       timings=timings, messages=messages, started=started)


@dataclass(frozen=True)
class RegistrationRequest:
    """One registration whose inputs and options are checked: what :func:`run_request` computes.

    :func:`register` checks what it is given and builds one; ``gradicon register`` builds one from what
    its file readers have checked (:func:`itk_gradicon.commands.register.run_register`), so that no image
    is scanned twice. :meth:`of` resolves the model-dependent defaults; it does not look at pixels.

    Attributes:
        fixed, moving: float32 scalar images of the model's dimension, finite and not constant
            (``SimpleITK.Image``: :func:`register` converts ``itk.Image`` inputs on the way in).
        model: the loaded model.
        fixed_mask, moving_mask, fixed_labels, moving_labels: on their image's grid (masks not empty),
            or ``None``.
        affine: homogeneous WORLD matrix of the pre-alignment (fixed -> moving), or ``None``.
        io_similarity, io_method, io_lr: resolved (never ``None`` / ``"auto"``).
        The other attributes are :func:`register`'s options of the same names.
    """

    fixed: Any
    moving: Any
    model: Model
    fixed_mask: Any = None
    moving_mask: Any = None
    fixed_labels: Any = None
    moving_labels: Any = None
    fixed_modality: str = "auto"
    moving_modality: str = "auto"
    ct_window: Optional[Tuple[float, float]] = None
    quantile_range: Optional[Tuple[float, float]] = None
    mask_mode: str = "input"
    io_iterations: int = 0
    io_similarity: str = "lncc"
    io_lr: float = DEFAULT_IO_LR
    io_method: str = "network"
    io_smoothness: float = DEFAULT_SMOOTHNESS
    io_coarse_steps: int = 0
    io_coarse_lr_factor: float = 1.0
    io_patience: int = 0
    io_multimodal_similarity: Optional[str] = None
    io_multimodal_smoothness: Optional[float] = None
    io_lncc_sigma: Optional[float] = None
    io_dice_weight: float = 1.0
    affine: Optional[np.ndarray] = None
    orientation: str = "fixed"
    network_region: str = "auto"
    io_start: str = "auto"
    compute_inverse: bool = True

    @classmethod
    def of(cls, fixed, moving, model: Model, *, io_similarity: Optional[str] = None, io_lr: Optional[float] = None,
           io_method: str = "auto", initial_transform=None, io_iterations: Optional[int] = None,
           io_smoothness: Optional[float] = None, messages: Optional[List[str]] = None,
           **options) -> "RegistrationRequest":
        """A request for checked inputs: the IO options resolved against the model (:func:`resolve_io`),
        ``initial_transform`` as a matrix. Notes for the user are appended to ``messages``.

        Raises:
            InputError: an unknown IO similarity, or an initial transform that is not an affine.
        """
        d = model.architecture.dimension
        io = resolve_io(model, io_iterations=io_iterations, io_method=io_method, io_similarity=io_similarity,
                        io_smoothness=io_smoothness, io_lr=io_lr,
                        modalities=(options.get("fixed_modality", "auto"), options.get("moving_modality", "auto")))
        if messages is not None:
            if io.iterations and (io.recommended or io.why_similarity):
                messages.append(io.describe())
            if io.similarity == "mind" and d != 3 and io.iterations:
                messages.append("MIND-SSC in 2-D uses the 4 in-plane neighbour pairs")
        return cls(fixed, moving, model, io_iterations=io.iterations, io_similarity=io.similarity,
                   io_method=io.method, io_lr=io.lr, io_smoothness=io.smoothness, io_coarse_steps=io.coarse_steps,
                   io_coarse_lr_factor=io.coarse_lr_factor, io_patience=io.patience,
                   io_multimodal_similarity=io.multimodal_similarity, io_multimodal_smoothness=io.multimodal_smoothness,
                   io_lncc_sigma=io.lncc_sigma, affine=_as_affine(initial_transform, d), **options)

    @classmethod
    def from_options(cls, fixed, moving, model: Model, options: RegistrationOptions, *, initial_transform=None,
                     messages: Optional[List[str]] = None, inputs: Optional[Dict[str, Any]] = None,
                     **resolved) -> "RegistrationRequest":
        """:meth:`of` for a :class:`~itk_gradicon.pipeline.options.RegistrationOptions` (whose ``affine`` choice is not
        the request's matrix: ``initial_transform`` is). ``inputs``: the masks and label maps; ``resolved``:
        options the caller has already resolved (``io_iterations=...``), which replace the given ones."""
        flat = options.keywords()
        del flat["affine"]
        return cls.of(fixed, moving, model, initial_transform=initial_transform, messages=messages,
                      **(inputs or {}), **{**flat, **resolved})


def run_request(request: RegistrationRequest, *, device: torch.device,
                progress: Optional[Callable[[IOProgress], None]] = None,
                generator: Optional[torch.Generator] = None,
                predictor: Optional[Callable[..., Tuple[torch.Tensor, Optional[torch.Tensor]]]] = None,
                timings: Optional[Dict[str, float]] = None, messages: Optional[List[str]] = None,
                started: Optional[float] = None) -> RegistrationResult:
    """Compute a checked :class:`RegistrationRequest` (see :func:`register` for the other arguments).

    ``timings`` and ``messages`` (added to the result) may hold what the caller did before;
    ``started`` is when its work began (``timings["total"]`` counts from there).
    """
    started = time.perf_counter() if started is None else started
    timings = {} if timings is None else timings
    messages = [] if messages is None else messages
    r, model = request, request.model
    fixed_grid, moving_grid = ImageGrid.from_image(r.fixed), ImageGrid.from_image(r.moving)

    t = time.perf_counter()
    normalized, modalities = _normalize(model, r.fixed, r.moving, fixed_modality=r.fixed_modality,
                                        moving_modality=r.moving_modality, ct_window=r.ct_window,
                                        quantile_range=r.quantile_range, fixed_mask=r.fixed_mask,
                                        moving_mask=r.moving_mask, mask_mode=r.mask_mode, messages=messages)
    outside = model.domain.warnings(
        model.name, {role: [n * sp for n, sp in zip(grid.size, grid.spacing)]
                     for role, grid in (("fixed", fixed_grid), ("moving", moving_grid))}, modalities)
    messages.extend(outside)
    from_prealignment = r.io_iterations > 0 and r.io_method == "field" and (
        r.io_start == "prealignment" or (r.io_start == "auto" and bool(outside)))
    if from_prealignment and r.io_start == "auto":
        messages.append("instance optimisation starts from the pre-alignment, without the network's prediction, "
                        "because the pair is outside the model's domain (--io-start prediction uses it anyway)")
    moving_net = _MovingForNetwork(r.moving, normalized["moving"], r.moving_mask, r.moving_labels)
    if r.affine is not None:
        moving_net = moving_net.prealigned(r.fixed, r.affine)
    timings["preprocess"] = time.perf_counter() - t

    fixed_frame, moving_frame = _network_frames(model, fixed_grid, ImageGrid.from_image(moving_net.image),
                                                r.orientation, messages)
    box = (foreground_box((normalized["fixed"], moving_net.array), fixed_grid)  # both on the fixed grid
           if r.affine is not None and r.network_region == "auto" else None)
    if box is not None:
        fixed_frame, moving_frame = fixed_frame.cropped(box), moving_frame.cropped(box)
        messages.append(f"network grid over the images' foreground, {describe_box(box, fixed_grid)} (the "
                        "displacement continues beyond it; --network-region image for the whole grid)")
    image_B = fixed_frame.tensor(normalized["fixed"], device=device)
    image_A = moving_frame.tensor(moving_net.array, device=device)
    if r.affine is not None:  # both on the fixed grid: are their foregrounds alike?
        warning = prealigned_coverage_warning(image_A, image_B, fixed_frame, moving_grid, r.affine)
        if warning:
            messages.append(warning)
    similarity = r.io_similarity
    check = bool(r.io_iterations > 0 and r.io_multimodal_similarity and r.io_multimodal_similarity != similarity)
    # the images are compared where they lie on one another: pre-aligned on the fixed grid, or (each image in its
    # own frame, e.g. a published model's, which sizes each image's array to its grid) as the network's prediction
    # aligns them, which field IO starts from
    after_prediction = check and r.affine is None and r.io_method == "field" and not from_prealignment
    if check and not after_prediction:
        similarity, r = _contrast_check(image_A, image_B, r, aligned_by="pre-aligned", messages=messages)

    net = model.network.to(device)
    was_training = net.training
    net.eval()  # BatchNorm uses its running statistics and never updates them
    try:
        disp_AB, disp_BA, history, (similarity, r) = _predict(
            net, image_A, image_B, r, similarity=similarity, moving_net=moving_net,
            frames=(fixed_frame, moving_frame), progress=progress, generator=generator, device=device,
            timings=timings, predictor=_no_prediction if from_prealignment else predictor,
            contrast_check=functools.partial(_contrast_check, messages=messages) if after_prediction else None)
    finally:
        net.train(was_training)

    t = time.perf_counter()
    fields = _physical_fields(disp_AB, disp_BA if r.compute_inverse else None, fixed_grid, moving_grid,
                              fixed_frame, moving_frame, r.affine)
    timings["fields"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started
    field_io_ran = r.io_iterations > 0 and r.io_method == "field"
    return RegistrationResult(*fields, modalities["fixed"], modalities["moving"], messages, history, timings,
                              io_similarity=similarity if r.io_iterations > 0 else None,
                              io_smoothness=r.io_smoothness if field_io_ran else None)


def _inside(image):
    """An ``itk.Image`` as the ``SimpleITK.Image`` every step works on (:mod:`itk_gradicon.io.itk_bridge`);
    anything else as it is (its checks name what was given)."""
    return to_simpleitk(image) if is_itk_image(image) else image


def _check_inputs(fixed, moving, dimension: int, *, fixed_mask, moving_mask, fixed_labels, moving_labels):
    """Both images checked and as float32; masks and label maps on their image's grid, masks not empty."""
    fixed = check_image(fixed, what="fixed image", dimension=dimension)
    moving = check_image(moving, what="moving image", dimension=dimension)
    for item, what, image, role in ((fixed_mask, "fixed mask", fixed, "fixed"),
                                    (moving_mask, "moving mask", moving, "moving"),
                                    (fixed_labels, "fixed label map", fixed, "fixed"),
                                    (moving_labels, "moving label map", moving, "moving")):
        if item is not None and not same_grid(item, image):
            raise InputError(f"{what} is not on the grid of the {role} image: {describe_grid(item)} vs "
                             f"{describe_grid(image)}")
    for mask, what in ((fixed_mask, "fixed mask"), (moving_mask, "moving mask")):
        if mask is not None and not np.any(image_array(mask) > 0):
            raise InputError(f"the {what} is empty (no voxel > 0)")
    return fixed, moving


def _normalize(model: Model, fixed, moving, *, fixed_modality: str, moving_modality: str, ct_window,
               quantile_range, fixed_mask, moving_mask, mask_mode: str, messages: List[str]):
    """Both images' intensities mapped to [0, 1] (model defaults unless given), zeroed outside input
    masks; returns ``({"fixed": array, "moving": array}, {"fixed": modality, "moving": modality})``."""
    defaults = model.preprocessing or {}
    window = tuple(ct_window) if ct_window is not None else tuple(defaults.get("ct_window") or DEFAULT_CT_WINDOW)
    quantiles = quantile_range if quantile_range is not None else defaults.get("quantile_range")
    quantiles = tuple(quantiles) if quantiles is not None else None
    modalities, normalized = {}, {}
    for role, choice, image, mask in (("fixed", fixed_modality, fixed, fixed_mask),
                                      ("moving", moving_modality, moving, moving_mask)):
        array = image_array(image)
        modality, reason = resolve_modality(choice, array)
        if reason:
            messages.append(f"{role} modality: {modality} ({reason})")
        modalities[role] = modality
        normalized[role] = IntensityNormalization(modality, window, quantiles)(array, what=f"{role} image")
        if mask is not None and mask_mode in ("input", "both"):
            normalized[role] = apply_input_mask(normalized[role], image_array(mask))
    return normalized, modalities


@dataclass
class _MovingForNetwork:
    """What the network sees of the moving image: the image (its grid), its normalised voxels, and its
    mask and label map for IO; on the fixed grid after an affine pre-alignment."""

    image: Any
    array: np.ndarray
    mask: Any = None
    labels: Any = None

    def prealigned(self, fixed, affine: np.ndarray) -> "_MovingForNetwork":
        """Everything resampled onto ``fixed``'s grid through the fixed -> moving ``affine``."""
        resampled = _resample_on(image_like(self.array, self.image), fixed, affine, nearest=False)
        return _MovingForNetwork(
            resampled, np.asarray(image_array(resampled), dtype=np.float32),
            None if self.mask is None else _resample_on(self.mask, fixed, affine, nearest=True),
            None if self.labels is None else _resample_on(self.labels, fixed, affine, nearest=True))


def _network_frames(model: Model, fixed_grid: ImageGrid, moving_grid: ImageGrid, orientation: str,
                    messages: List[str]) -> Tuple[NetworkFrame, NetworkFrame]:
    """The fixed image in the model's layout; the moving one along the fixed axes or as stored."""
    shape = model.architecture.input_shape
    fixed_frame = NetworkFrame.for_layout((model.preprocessing or {}).get("layout", "reference"), fixed_grid, shape)
    if orientation == "storage":
        return fixed_frame, NetworkFrame.reference_layout(moving_grid, shape)
    moving_frame = fixed_frame.companion(moving_grid)
    if (moving_frame.axes, moving_frame.flips) != (fixed_frame.axes, fixed_frame.flips):  # stored otherwise
        messages.append(f"moving image reordered to the fixed image's axes (index axes "
                        f"{moving_frame.axes}, flips {moving_frame.flips})")
    return fixed_frame, moving_frame


def _physical_fields(disp_AB, disp_BA, fixed_grid: ImageGrid, moving_grid: ImageGrid, fixed_frame: NetworkFrame,
                     moving_frame: NetworkFrame, affine: Optional[np.ndarray]) -> tuple:
    """``(forward, inverse, affine, deformable forward, deformable inverse)`` as :class:`RegistrationResult`
    holds them: the forward field computed; the inverse ones ``None`` without ``disp_BA``, the deformable ones
    without an affine, and otherwise functions that compute them when first asked for."""
    forward = DisplacementField(fixed_grid, displacement_on_grid(
        disp_AB, fixed_grid, fixed_frame, moving_frame, postaffine=affine))
    inverse = deformable_forward = deformable_inverse = None
    if disp_BA is not None:
        inverse = functools.partial(_field_on, moving_grid, disp_BA, moving_frame, fixed_frame,
                                    None if affine is None else np.linalg.inv(affine))
    if affine is not None:  # computed when first asked for (RegistrationResult._computed)
        deformable_forward = functools.partial(_field_on, fixed_grid, disp_AB, fixed_frame, moving_frame)
        if disp_BA is not None:
            deformable_inverse = functools.partial(_field_on, fixed_grid, disp_BA, moving_frame, fixed_frame)
    return forward, inverse, affine, deformable_forward, deformable_inverse


def _field_on(grid: ImageGrid, displacement: torch.Tensor, source: NetworkFrame, target: NetworkFrame,
              preaffine: Optional[np.ndarray] = None) -> DisplacementField:
    """The network map ``displacement`` (``source`` -> ``target`` frame) as a WORLD field on ``grid``, after
    ``preaffine`` where given (the inverse: the pre-alignment's inverse first)."""
    return DisplacementField(grid, displacement_on_grid(displacement, grid, source, target, preaffine=preaffine))


def _no_prediction(net, image_A: torch.Tensor, image_B: torch.Tensor, *, inverse: bool):
    """The identity in place of the network's prediction (zero displacements): instance optimisation then
    starts from the pre-alignment."""
    zero = image_A.new_zeros((image_A.shape[0], image_A.dim() - 2, *image_A.shape[2:]))
    return zero, (zero.clone() if inverse else None)


def _on_network(frame: NetworkFrame, image, device) -> Optional[torch.Tensor]:
    """A mask or label map on the network grid (nearest-neighbour resizing), or ``None``."""
    return None if image is None else frame.tensor(image_array(image), mode="nearest", device=device)


def _contrast_check(image_A: torch.Tensor, image_B: torch.Tensor, r: "RegistrationRequest", *, aligned_by: str,
                    messages: List[str]) -> Tuple[str, "RegistrationRequest"]:
    """The IO similarity for two network-grid images that lie on one another: the request's multimodal one (and
    its smoothness) where their intensities correlate below :data:`TWO_CONTRASTS_BELOW`, the one-contrast one
    otherwise; returns it with the request (its ``io_smoothness`` replaced where that changed)."""
    correlation = intensity_correlation(image_A, image_B)
    if correlation >= TWO_CONTRASTS_BELOW:
        return r.io_similarity, r
    similarity = r.io_multimodal_similarity
    if r.io_multimodal_smoothness is not None:
        r = dataclasses.replace(r, io_smoothness=r.io_multimodal_smoothness)
    messages.append(f"the {aligned_by} images' intensities correlate at {correlation:.2f} (below "
                    f"{TWO_CONTRASTS_BELOW:g}): treated as two contrasts, instance optimisation uses "
                    f"{similarity} (name the modalities, e.g. t1w and t2w, or the similarity to choose)")
    return similarity, r


def _predict(net: torch.nn.Module, image_A: torch.Tensor, image_B: torch.Tensor, r: "RegistrationRequest", *,
             similarity: str, moving_net: _MovingForNetwork, frames: Tuple[NetworkFrame, NetworkFrame], progress,
             generator, device, timings: Dict[str, float], predictor=None, contrast_check=None):
    """Network displacements ``phi_AB`` (and ``phi_BA``) in CUBE units, with optional IO.

    ``A`` is the moving image, ``B`` the fixed one. Returns ``(disp_AB, disp_BA or None, io history,
    (similarity, request))``: the last the IO similarity used and the request with its smoothness.
    ``network`` IO tunes a copy of the network before the prediction; ``field`` IO refines the
    predicted displacements. ``contrast_check`` (``field`` IO only; :func:`_contrast_check` without its
    ``aligned_by``): called with the moving image warped by the prediction, it chooses the similarity.
    """
    history: List[Dict[str, float]] = []
    fixed_frame, moving_frame = frames
    io = {}
    if r.io_iterations > 0:
        loss_masks = r.mask_mode in ("loss", "both") and r.fixed_mask is not None and moving_net.mask is not None
        window = r.io_lncc_sigma if r.io_method == "field" else None  # network IO keeps the training loss
        masks = ((_on_network(moving_frame, moving_net.mask, device), _on_network(fixed_frame, r.fixed_mask, device))
                 if loss_masks else (None, None))
        guidance = losses.Guidance(*masks, _on_network(moving_frame, moving_net.labels, device),
                                   _on_network(fixed_frame, r.fixed_labels, device),
                                   r.io_dice_weight if r.fixed_labels is not None else 0.0)
        io = dict(steps=r.io_iterations, lr=r.io_lr, guidance=guidance, progress=progress, history=history,
                  similarity=losses.similarity_function(similarity, lncc_sigma=window))
    if io and r.io_method == "network":
        t = time.perf_counter()
        net = optimise_network(net, image_A, image_B, generator=generator, **io)
        timings["instance_optimisation"] = time.perf_counter() - t
    t = time.perf_counter()
    predict = predictor if predictor is not None else predict_displacements
    field_io = bool(io) and r.io_method == "field"
    # field IO refines both directions whatever is asked for: its inverse-consistency term keeps the field regular
    disp_AB, disp_BA = predict(net, image_A, image_B, inverse=r.compute_inverse or field_io)
    timings["network"] = time.perf_counter() - t
    if field_io:
        t = time.perf_counter()
        if contrast_check is not None:
            with torch.no_grad():
                aligned = warp_voxels(image_A, disp_AB * voxel_scale(tuple(image_A.shape[2:]), disp_AB))
            similarity, r = contrast_check(aligned, image_B, r, aligned_by="network-aligned")
            io["similarity"] = losses.similarity_function(similarity, lncc_sigma=window)
        settings = FieldSettings(r.io_smoothness, coarse_steps=r.io_coarse_steps, patience=r.io_patience,
                                 coarse_lr_factor=r.io_coarse_lr_factor)
        disp_AB, disp_BA = refine_fields(disp_AB, disp_BA, image_A, image_B, settings=settings, **io)
        timings["instance_optimisation"] = time.perf_counter() - t
    return disp_AB, disp_BA, history, (similarity, r)
