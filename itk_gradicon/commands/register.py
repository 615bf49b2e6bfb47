"""File-level registration: read and check every input, register, write every output atomically.

This is what ``gradicon register`` (and ``gradicon register-batch`` for each pair) runs. Everything
that can be checked without the network is checked first: output folders, file name endings, the
device, the model, the images, masks and labels. Outputs go through one
:class:`~itk_gradicon.io.images.OutputTransaction`: all of them appear, or none.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from ..errors import GradiconError, InputError, ResourceError
from ..io.images import (VOLUME_SUFFIXES, OutputTransaction, check_header,
                         check_output_dir, check_output_path, describe_grid, image_dimension, read_label_map,
                         same_grid)
from ..pipeline.affine import (  # noqa: F401
    AFFINE_CHOICES, PREALIGNMENT_TRANSFORMS, expects_prealignment, resolve_affine_choice)
from ..pipeline.options import INPUT_KEYWORDS, RegistrationOptions, check_options
from ..spatial.transforms import TRANSFORM_OUTPUT_SUFFIXES
from .files import read_header, read_images_and_masks
from .prealign_process import INPUT_FLAGS, PrealignmentJob, PrealignmentProcess

Log = Callable[[str], None]


@dataclass
class RegisterOutputs:
    """Where ``gradicon register`` writes; every entry is optional but at least one is needed."""

    transform: Optional[Path] = None
    inverse_transform: Optional[Path] = None
    warped: Optional[Path] = None
    inverse_warped: Optional[Path] = None  # the fixed image on the moving grid (antsRegistration's InverseWarped)
    ants_prefix: Optional[str] = None
    elastix_dir: Optional[Path] = None
    qc: Optional[Path] = None
    record: Optional[Path] = None  # --out-json: the provenance record (itk_gradicon.evaluation.provenance)

    def validate(self) -> None:
        """Check every destination before any work starts.

        Raises:
            InputError: no output requested, a folder missing or not writable, a file name ending
                that cannot hold the output, or two outputs with the same file name.
        """
        if not any((self.transform, self.inverse_transform, self.warped, self.inverse_warped, self.ants_prefix,
                    self.elastix_dir, self.qc, self.record)):
            raise InputError("no output requested: give at least one of --out-transform, "
                             "--out-inverse-transform, --out-warped, --out-inverse-warped, --out-ants-prefix, "
                             "--out-elastix, --out-qc")
        # --out-json alone is allowed: a record of a registration whose transforms are not kept is still a record
        if self.transform:
            self.transform = check_output_path(self.transform, what="--out-transform",
                                               suffixes=TRANSFORM_OUTPUT_SUFFIXES)
        if self.inverse_transform:
            self.inverse_transform = check_output_path(self.inverse_transform, what="--out-inverse-transform",
                                                       suffixes=TRANSFORM_OUTPUT_SUFFIXES)
        if self.warped:
            self.warped = check_output_path(self.warped, what="--out-warped", suffixes=VOLUME_SUFFIXES)
        if self.inverse_warped:
            self.inverse_warped = check_output_path(self.inverse_warped, what="--out-inverse-warped",
                                                    suffixes=VOLUME_SUFFIXES)
        if self.ants_prefix:
            check_output_path(Path(str(self.ants_prefix) + "1Warp.nii.gz"), what="--out-ants-prefix")
        if self.elastix_dir:
            self.elastix_dir = check_output_dir(self.elastix_dir, what="--out-elastix")
        if self.qc:
            self.qc = check_output_path(self.qc, what="--out-qc", suffixes=(".png",))
        if self.record:
            self.record = check_output_path(self.record, what="--out-json", suffixes=(".json",))
        finals = [str(p) for p in self.final_paths()]
        duplicates = sorted({p for p in finals if finals.count(p) > 1})
        if duplicates:
            raise InputError(f"two outputs would be written to the same file: {duplicates[0]}")

    def final_paths(self, *, with_affine: bool = True) -> List[Path]:
        """Every file these outputs may create (absolute paths)."""
        from ..spatial.transforms import ELASTIX_FIELD_FILE, ELASTIX_PARAMETER_FILE, ants_file_names

        paths = [Path(p).expanduser().absolute()
                 for p in (self.transform, self.inverse_transform, self.warped, self.inverse_warped, self.qc,
                           self.record) if p]
        if self.ants_prefix:
            names = ants_file_names(str(self.ants_prefix))
            keys = ("affine", "warp", "inverse_warp") if with_affine else ("warp", "inverse_warp")
            paths += [Path(names[k]).expanduser().absolute() for k in keys]
        if self.elastix_dir:
            folder = Path(self.elastix_dir).expanduser().absolute()
            paths += [folder / ELASTIX_PARAMETER_FILE, folder / ELASTIX_FIELD_FILE]
        return paths

    @property
    def needs_inverse(self) -> bool:
        return bool(self.inverse_transform or self.inverse_warped or self.ants_prefix)

    @property
    def needs_originals(self) -> bool:
        """Whether the images are needed in their original pixel types (warped images, QC picture)."""
        return bool(self.warped or self.inverse_warped or self.qc)


def _read_labels_on(path: Path, image, what: str):
    labels = read_label_map(path, what=what, dimension=image_dimension(image))
    if not same_grid(labels, image):
        raise InputError(f"{what} '{path}' is not on its image's grid: {describe_grid(labels)} vs "
                         f"{describe_grid(image)}")
    return labels


@dataclass(frozen=True)
class RegisterFiles:
    """The input files of one ``gradicon register``: the two images, optional masks and label maps on their
    image's grid, and an optional affine transform file (fixed -> moving) to start from."""

    fixed: Path
    moving: Path
    fixed_mask: Optional[Path] = None
    moving_mask: Optional[Path] = None
    fixed_labels: Optional[Path] = None
    moving_labels: Optional[Path] = None
    initial_transform: Optional[Path] = None

    def by_flag(self) -> Dict[str, Optional[Path]]:
        """The image files under their command-line flags (``--fixed``, ..., ``--moving-labels``)."""
        return {flag_of(key): getattr(self, key) for key in ("fixed", "moving") + INPUT_KEYWORDS}


def run_register(files: RegisterFiles, outputs: RegisterOutputs, options: Optional[RegistrationOptions] = None, *,
                 model: str = "unigradicon", seed: Optional[int] = None, device: str = "auto",
                 log: Log = lambda message: None, progress=None, loaded_model=None, predictor=None):
    """Register the files ``moving`` -> ``fixed`` and write ``outputs``; returns the result.

    Everything that can be checked before the work is checked first, in this order: the
    destinations, the options, the device, every input file's header (exists, is an image, is
    scalar), the model, the images' dimension against the model's, and the memory the work needs;
    only then are the pixels read.

    Args:
        files: the input files.
        outputs: the destinations.
        options: the registration's options (default: every default); the inverse is computed when an
            output needs it, whatever ``options.compute_inverse`` says.
        model: ``--model NAME|FILE``.
        device: as :func:`~itk_gradicon.registration.register`.
        seed: seed of instance optimisation's random sample points.
        log: receives one-line messages.
        progress: called after every instance-optimisation step.
        loaded_model: a :class:`~itk_gradicon.models.Model` already loaded (for cohorts).
        predictor: network prediction hook of :func:`~itk_gradicon.registration.register` (cohorts
            batch several pairs through it).

    Returns:
        The :class:`~itk_gradicon.registration.RegistrationResult`.

    Raises:
        GradiconError: a problem the user can fix; nothing has been written then.
    """
    # before torch is imported: the pre-alignment's second process (``prealign_process``), where it applies
    may_prealign = files.initial_transform is None and (options is None or options.prealignment.affine != "none")
    background = None
    if may_prealign and loaded_model is None:
        by_flag = files.by_flag()
        background = PrealignmentProcess.start({flag: by_flag[flag] for flag in INPUT_FLAGS})
    try:
        return _run_register(files, outputs, options, model=model, seed=seed, device=device, log=log,
                             progress=progress, loaded_model=loaded_model, predictor=predictor, background=background)
    finally:
        if background is not None:
            background.close()


def _run_register(files: RegisterFiles, outputs: RegisterOutputs, options: Optional[RegistrationOptions], *,
                  model: str, seed: Optional[int], device: str, log: Log, progress, loaded_model, predictor,
                  background: Optional[PrealignmentProcess]):
    import torch

    from ..models import load_model
    from ..network.sampling import compiled_kernels_on
    from ..registration import (RegistrationRequest, check_memory, estimate_memory, resolve_device, resolve_io,
                                run_request)

    started = time.perf_counter()
    stage = _Stages(started)
    outputs.validate()
    options = RegistrationOptions() if options is None else options
    check_options(options, {key: getattr(files, key) for key in INPUT_KEYWORDS + ("initial_transform",)},
                  name=flag_of)
    intensity, io_options = options.intensity, options.refinement
    initial_transform = files.initial_transform
    torch_device = resolve_device(device)
    by_flag = files.by_flag()
    headers = {flag: read_header(path, what=flag) for flag, path in by_flag.items() if path is not None}
    if initial_transform is not None and not Path(initial_transform).is_file():
        raise InputError(f"--initial-transform '{initial_transform}' does not exist")

    stage.done("checks")
    model_obj = loaded_model if loaded_model is not None else load_model(model)
    stage.done("model")
    affine = resolve_affine_choice(options.prealignment.affine, model_obj, initial_transform is not None)
    if affine == "affine" and expects_prealignment(model_obj):
        log(f"affine pre-alignment: elastix (model '{model_obj.name}' was trained on affinely pre-aligned "
            "pairs; --affine rigid for one subject's images, --affine none turns it off)")
    io = resolve_io(model_obj, io_iterations=io_options.iterations, io_method=io_options.method,
                    io_similarity=io_options.similarity, io_smoothness=io_options.smoothness, io_lr=io_options.lr,
                    modalities=options.modalities)
    if io.iterations == 0:
        log("instance optimisation: none (prediction only" + (f"; the model recommends {model_obj.refinement.iterations} "
            f"steps of {model_obj.refinement.method} IO" if model_obj.refinement.iterations else "")
            + "; --io-iterations N adds it)")
    else:
        log(io.describe() + ("; --io-iterations 0 for prediction only" if io.recommended else ""))
    d = model_obj.architecture.dimension
    for flag, header in headers.items():
        check_header(header, what=flag, dimension=d, needed_by=f"the model '{model_obj.name}'")
    check_memory(estimate_memory(headers["--fixed"].num_voxels, headers["--moving"].num_voxels, d,
                                 model_obj.architecture.input_shape, io=io.iterations > 0,
                                 inverse=outputs.needs_inverse or (io.iterations > 0 and io.method == "field"),
                                 affine=affine != "none" or initial_transform is not None,
                                 originals=outputs.needs_originals, io_method=io.method,
                                 compiled=compiled_kernels_on(torch_device)), torch_device)

    stage.done("checks")
    if background is not None and not (affine in PREALIGNMENT_TRANSFORMS and initial_transform is None
                                       and background.submit(_prealignment_job(by_flag, d, affine))):
        background = None
    inputs = _read_inputs(by_flag, d)
    stage.done("read")
    if inputs.labels["fixed_labels"] is not None and io.iterations == 0:
        log("note: --fixed-labels/--moving-labels only act during instance optimisation (--io-iterations > 0)")
    pre, pre_info = _prealignment(inputs, affine, initial_transform, log, background)
    stage.done("pre-alignment")

    # every input was checked as it was read: the registration trusts the request and scans nothing again
    messages: List[str] = []
    # the IO steps, method and rate as resolved and logged above (given unresolved, the request would log the
    # model's recommendation a second time)
    request = RegistrationRequest.from_options(
        inputs.fixed, inputs.moving, model_obj, options, initial_transform=pre, messages=messages,
        inputs={**inputs.masks, **inputs.labels}, io_iterations=io.iterations, io_lr=io.lr, io_method=io.method,
        compute_inverse=outputs.needs_inverse)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    result = run_request(request, device=torch_device, progress=progress, generator=generator, predictor=predictor,
                         messages=messages)
    for message in result.messages:
        log(message)
    stage.add(result.timings)
    record = None
    if outputs.record:
        from ..evaluation.provenance import register_record
        from ..threads import itk_threads

        used = {"model": model, "fixed_modality": intensity.fixed_modality,
                "moving_modality": intensity.moving_modality, "ct_window": intensity.ct_window,
                "quantile_range": intensity.quantile_range, "mask_mode": options.mask_mode,
                "affine": affine, "io_iterations": io.iterations, "io_method": io.method,
                "io_similarity": result.io_similarity or request.io_similarity,
                "io_smoothness": result.io_smoothness if result.io_smoothness is not None else io.smoothness,
                "io_lr": io.lr, "io_lncc_sigma": io.lncc_sigma,
                "io_coarse_steps": io.coarse_steps, "io_coarse_lr_factor": io.coarse_lr_factor,
                "io_patience": io.patience, "io_start": io_options.start,
                "io_dice_weight": io_options.dice_weight, "orientation": options.prealignment.orientation,
                "network_region": options.prealignment.network_region, "seed": seed, "device": str(torch_device),
                "threads": {"torch": torch.get_num_threads(), "itk": itk_threads()}}
        record = register_record(result=result, model=model_obj, options=used, prealignment=pre_info,
                                 inputs={k.lstrip("-").replace("-", "_"): v for k, v in by_flag.items()}
                                 | {"initial_transform": initial_transform},
                                 timings=stage.seconds)
    originals = outputs.needs_originals
    write_register_outputs(result, outputs, fixed_original=inputs.fixed_original if originals else None,
                           moving_original=inputs.moving_original if originals else None, log=log, record=record)
    stage.done("write")
    result.timings.update({f"stage_{name}": seconds for name, seconds in stage.seconds.items()})
    log(stage.summary(startup=loaded_model is None))  # a cohort's process start is not this pair's
    return result


class _Stages:
    """Seconds per stage of one ``gradicon register`` run, in order, for the closing line."""

    #: ``run_request``'s timings and the names the closing line gives them.
    REQUEST = (("preprocess", "preprocessing"), ("network", "network"),
               ("instance_optimisation", "instance optimisation"), ("fields", "fields"))

    def __init__(self, started: float) -> None:
        self.started = self.last = started
        self.seconds: Dict[str, float] = {}

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.last
        self.last = now

    def add(self, timings: Dict[str, float]) -> None:
        """The registration's own stages (their sum replaces the time since the last stage)."""
        for key, name in self.REQUEST:
            if key in timings:
                self.seconds[name] = timings[key]
        self.last = time.perf_counter()

    def summary(self, *, startup: bool = True) -> str:
        """The closing line; with ``startup``, the process's seconds before the run (one registration per
        process: interpreter and imports)."""
        total = time.perf_counter() - self.started
        parts = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in self.seconds.items() if seconds >= 0.05)
        outside = process_seconds() if startup else None
        before = f"; {outside - total:.1f}s before it (interpreter and imports)" if outside is not None else ""
        return f"done in {total:.1f}s ({parts}){before}"


#: More seconds than this between the process's start and this package's first import are not Python's start:
#: the process ran something else first (``bash -c "pip install ... && gradicon register ..."`` execs the last
#: command in the shell's own process, whose start time then counts the installation).
BEFORE_PYTHON_S = 2.0


def process_seconds() -> Optional[float]:
    """Seconds since this process started (Linux: ``/proc``), or ``None`` where that cannot be read; since this
    package's first import where the process began more than :data:`BEFORE_PYTHON_S` before it."""
    from .. import IMPORTED_AT

    since_import = time.perf_counter() - IMPORTED_AT
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        start = float(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    age = max(0.0, uptime - start)
    return since_import if age - since_import > BEFORE_PYTHON_S else age


def flag_of(option: str) -> str:
    """The command-line flag of a :func:`~itk_gradicon.registration.register` keyword."""
    return "--" + option.replace("_", "-")


@dataclass
class _Inputs:
    """The pixels of one registration, read once: float32 images, the images as stored (for the warped
    image and the QC picture), masks and label maps on their image's grid (``None`` where not given)."""

    fixed: object
    moving: object
    fixed_original: object
    moving_original: object
    masks: Dict[str, object]
    labels: Dict[str, object]


def _read_inputs(files: Dict[str, Optional[Path]], dimension: int) -> _Inputs:
    """Read every input file through SimpleITK (ITK's readers without ITK Python's seconds of
    module loading), checking each against its image's grid."""
    fixed, moving, fixed_original, moving_original, masks = read_images_and_masks(files, dimension)
    labels = {f"{role}_labels": _read_labels_on(files[f"--{role}-labels"], image, f"--{role}-labels")
              if files[f"--{role}-labels"] else None for role, image in (("fixed", fixed), ("moving", moving))}
    return _Inputs(fixed, moving, fixed_original, moving_original, masks, labels)


def _prealignment_job(files: Dict[str, Optional[Path]], dimension: int, affine: str) -> PrealignmentJob:
    return PrealignmentJob(files["--fixed"], files["--moving"], files["--fixed-mask"], files["--moving-mask"],
                           dimension, affine)


def _prealignment(inputs: _Inputs, affine: str, initial_transform: Optional[Path], log: Log,
                  background: Optional[PrealignmentProcess] = None):
    """The pre-alignment (homogeneous WORLD matrix, fixed -> moving, or ``None``) and how it was found;
    collected from ``background`` where the job was handed to it."""
    if initial_transform is not None:
        from ..spatial.transforms import read_affine_file

        return read_affine_file(initial_transform), {"source": f"--initial-transform {initial_transform}"}
    if affine in PREALIGNMENT_TRANSFORMS:
        from ..pipeline.affine import prealign

        log(f"{affine} pre-alignment with elastix ...")
        found = None
        if background is not None:
            found, messages, seconds, failure = background.result()
            for message in messages:
                log(message)
            if found is not None:
                log(f"(the pre-alignment ran in a second process begun at start-up: {seconds:.1f}s there)")
            else:
                log(f"note: the pre-alignment's second process failed ({failure}); pre-aligning here")
        if found is None:
            found = prealign(inputs.fixed, inputs.moving, inputs.masks["fixed_mask"], inputs.masks["moving_mask"],
                             transform=affine, log=log)
        info = {"source": "elastix", "transform": found.transform, "start": found.start,
                "similarity": found.similarity, "rejected": list(found.rejected), "roles_swapped": found.roles_swapped}
        return found.matrix, ({**info, "rotation": found.rotation} if found.rotation else info)
    return None, None


def write_register_outputs(result, outputs: RegisterOutputs, *, fixed_original=None, moving_original=None,
                           log: Log = lambda message: None, record: Optional[dict] = None) -> List[Path]:
    """Write every requested output of one registration in a single transaction.

    Args:
        result: the :class:`~itk_gradicon.registration.RegistrationResult`.
        outputs: the destinations (already validated).
        fixed_original, moving_original: the images as read (needed for ``warped`` and ``qc``).
        log: receives a line per file written.

    Returns:
        The final paths written.

    Raises:
        ResourceError: a file could not be written (disk full, permissions changed, ...); then no
            output at all is left behind.
    """
    from ..io.images import short_error_message

    if outputs.needs_originals and (fixed_original is None or moving_original is None):
        raise InputError("--out-warped, --out-inverse-warped and --out-qc need the fixed and moving images")
    inverse_missing = not result.has_inverse
    if outputs.ants_prefix and result.affine is not None:
        ants_inverse_missing = result.deformable_inverse_field is None
    else:
        ants_inverse_missing = inverse_missing
    if ((outputs.inverse_transform or outputs.inverse_warped) and inverse_missing) or \
            (outputs.ants_prefix and ants_inverse_missing):
        raise InputError("the inverse transform was not computed (compute_inverse=False)")
    if outputs.record and record is None:
        raise InputError("--out-json needs the registration's record")
    jobs = _output_jobs(result, outputs, fixed_original, moving_original, record)
    current = "the outputs"
    try:
        with OutputTransaction() as out:
            written = _run_output_jobs(jobs, out)
            current = "the outputs into place"
    except _OutputJobError as failed:
        err = failed.__cause__
        if isinstance(err, GradiconError):
            raise err from None
        raise ResourceError(f"writing {failed.target} failed ({short_error_message(err)}); "
                            "no output was kept") from err
    except GradiconError:
        raise
    except (OSError, RuntimeError) as err:
        raise ResourceError(f"writing {current} failed ({short_error_message(err)}); no output was kept") from err
    for path in written:
        log(f"wrote {path}")
    return written


class _OutputJobError(Exception):
    """An output job failed; ``target`` names what it was writing, ``__cause__`` is the error."""

    def __init__(self, target: str) -> None:
        super().__init__(target)
        self.target = target


#: One output: what it writes (for messages), the final paths it creates, and the function that
#: writes them into the transaction.
_Job = Tuple[str, List[Path], Callable[[OutputTransaction], None]]


def _output_jobs(result, outputs: RegisterOutputs, fixed_original, moving_original,
                 record: Optional[dict] = None) -> List[_Job]:
    from ..io.transform_files import SharedFieldTransforms
    from ..spatial.transforms import (ants_file_names, write_affine_file, write_elastix, write_field_image,
                                      write_transform)

    shared = SharedFieldTransforms()  # the .h5, the warped image and the QC picture: one float64 copy of the field
    jobs: List[_Job] = []
    if outputs.transform:
        jobs.append((str(outputs.transform), [Path(outputs.transform)],
                     lambda out: write_transform(result.forward_field, outputs.transform, out, transform_of=shared)))
    if outputs.inverse_transform:
        jobs.append((str(outputs.inverse_transform), [Path(outputs.inverse_transform)],
                     lambda out: write_transform(result.inverse_field, outputs.inverse_transform, out,
                                                 transform_of=shared)))
    if outputs.ants_prefix:
        names = {key: Path(name).expanduser().absolute()
                 for key, name in ants_file_names(str(outputs.ants_prefix)).items()}
        if result.affine is not None:
            jobs.append((str(names["affine"]), [names["affine"]],
                         lambda out: write_affine_file(result.affine, out.path(names["affine"]))))
            forward, inverse = result.deformable_forward_field, result.deformable_inverse_field
        else:
            forward, inverse = result.forward_field, result.inverse_field
        jobs.append((str(names["warp"]), [names["warp"]],
                     lambda out: write_field_image(forward, out.path(names["warp"]))))
        jobs.append((str(names["inverse_warp"]), [names["inverse_warp"]],
                     lambda out: write_field_image(inverse, out.path(names["inverse_warp"]))))
    if outputs.elastix_dir:
        folder = Path(outputs.elastix_dir)
        jobs.append((str(folder), [],  # write_elastix returns its parameter file
                     lambda out: write_elastix(result.forward_field, folder, out)))
    if outputs.warped or outputs.inverse_warped:
        from .files import write_warped  # SimpleITK: ITK's resampler without loading ITK Python's
    if outputs.warped:
        jobs.append((str(outputs.warped), [Path(outputs.warped)],
                     lambda out: write_warped(moving_original, fixed_original, result.forward_field,
                                              out.path(outputs.warped), transform_of=shared)))
    if outputs.inverse_warped:
        jobs.append((str(outputs.inverse_warped), [Path(outputs.inverse_warped)],
                     lambda out: write_warped(fixed_original, moving_original, result.inverse_field,
                                              out.path(outputs.inverse_warped), transform_of=shared)))
    if outputs.qc:
        from ..evaluation.qc import write_qc

        jobs.append((str(outputs.qc), [Path(outputs.qc)],
                     lambda out: write_qc(fixed_original, moving_original, result, outputs.qc, transaction=out,
                                          transform_of=shared)))
    if outputs.record:
        from ..evaluation.provenance import record_text

        jobs.append((str(outputs.record), [Path(outputs.record)],
                     lambda out: out.path(outputs.record).write_text(record_text(record), encoding="utf-8")))
    return jobs


def _run_output_jobs(jobs: List[_Job], out: OutputTransaction) -> List[Path]:
    """Run the jobs, several at a time on a machine with several cores (each output is compressed
    and written by ITK's writers, which release the GIL); returns the paths written, in job order.
    The jobs stage their files through ``out.path``, which is safe from several threads; transform
    files are written one at a time (:data:`~itk_gradicon.spatial.transforms.TRANSFORM_WRITE_LOCK`).
    """
    from concurrent.futures import ThreadPoolExecutor

    from ..resources import usable_cores

    def run(job: _Job):
        target, _, write = job
        try:
            return write(out)
        except Exception as err:  # re-raised in the caller's thread, with the output named
            raise _OutputJobError(target) from err

    workers = max(1, min(len(jobs), usable_cores()))
    if workers == 1:
        returned = [run(job) for job in jobs]
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="itk_gradicon-write") as pool:
            futures = [pool.submit(run, job) for job in jobs]
            returned = [future.result() for future in futures]
    written: List[Path] = []
    for (target, paths, _), value in zip(jobs, returned):
        written += paths if paths else [Path(value)]
    return written


__all__ = ["RegisterOutputs", "run_register", "write_register_outputs"]
