"""File-level registration: read and check every input, register, write every output atomically.

This is what ``gradicon register`` (and ``gradicon register-batch`` for each pair) runs. Everything
that can be checked without the network is checked first: output folders, file name endings, the
device, the model, the images, masks and labels. Outputs go through one
:class:`~itk_gradicon.imageio.OutputTransaction`: all of them appear, or none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple


from .errors import InputError
from .imageio import (IMAGE_SUFFIXES, OutputTransaction, check_output_dir, check_output_path,
                      read_image, read_label_image, read_mask_on_grid, same_grid, describe_grid)
from .transforms import TRANSFORM_OUTPUT_SUFFIXES

Log = Callable[[str], None]


@dataclass
class RegisterOutputs:
    """Where ``gradicon register`` writes; every entry is optional but at least one is needed."""

    transform: Optional[Path] = None
    inverse_transform: Optional[Path] = None
    warped: Optional[Path] = None
    ants_prefix: Optional[str] = None
    elastix_dir: Optional[Path] = None
    qc: Optional[Path] = None

    def validate(self) -> None:
        """Check every destination before any work starts."""
        if not any((self.transform, self.inverse_transform, self.warped, self.ants_prefix,
                    self.elastix_dir, self.qc)):
            raise InputError("no output requested: give at least one of --out-transform, "
                             "--out-inverse-transform, --out-warped, --out-ants-prefix, --out-elastix, --out-qc")
        if self.transform:
            self.transform = check_output_path(self.transform, what="--out-transform",
                                               suffixes=TRANSFORM_OUTPUT_SUFFIXES)
        if self.inverse_transform:
            self.inverse_transform = check_output_path(self.inverse_transform, what="--out-inverse-transform",
                                                       suffixes=TRANSFORM_OUTPUT_SUFFIXES)
        if self.warped:
            self.warped = check_output_path(self.warped, what="--out-warped", suffixes=IMAGE_SUFFIXES)
        if self.ants_prefix:
            check_output_path(Path(str(self.ants_prefix) + "1Warp.nii.gz"), what="--out-ants-prefix")
        if self.elastix_dir:
            self.elastix_dir = check_output_dir(self.elastix_dir, what="--out-elastix")
        if self.qc:
            self.qc = check_output_path(self.qc, what="--out-qc", suffixes=(".png",))
        finals = [p for p in (self.transform, self.inverse_transform, self.warped, self.qc) if p]
        if len(set(map(str, finals))) != len(finals):
            raise InputError("two outputs have the same file name")

    @property
    def needs_inverse(self) -> bool:
        return bool(self.inverse_transform or self.ants_prefix)


def _read_labels_on(path: Path, image, what: str):
    labels = read_label_image(path, what=what, dimension=int(image.GetImageDimension()))
    if not same_grid(labels, image):
        raise InputError(f"{what} '{path}' is not on its image's grid: {describe_grid(labels)} vs "
                         f"{describe_grid(image)}")
    return labels


def run_register(*, fixed: Path, moving: Path, outputs: RegisterOutputs, model: str = "unigradicon",
                 fixed_modality: str = "auto", moving_modality: str = "auto",
                 ct_window: Optional[Tuple[float, float]] = None,
                 quantile_range: Optional[Tuple[float, float]] = None,
                 fixed_mask: Optional[Path] = None, moving_mask: Optional[Path] = None,
                 mask_mode: str = "input", io_iterations: int = 0, io_similarity: Optional[str] = None,
                 io_lr: float = 2e-5, fixed_labels: Optional[Path] = None,
                 moving_labels: Optional[Path] = None, io_dice_weight: float = 1.0,
                 affine: str = "none", initial_transform: Optional[Path] = None,
                 orientation: str = "fixed", seed: Optional[int] = None, device: str = "auto",
                 log: Log = lambda message: None, progress=None, loaded_model=None):
    """Register the files ``moving`` -> ``fixed`` and write ``outputs``; returns the result.

    ``loaded_model`` (a :class:`~itk_gradicon.models.Model`) skips loading ``model`` again, for
    cohorts.
    """
    import itk
    import torch

    from .models import load_model
    from .registration import register, resolve_device

    outputs.validate()
    if io_iterations < 0:
        raise InputError(f"--io-iterations must be >= 0, not {io_iterations}")
    if affine not in ("none", "elastix"):
        raise InputError(f"unknown --affine {affine!r}; allowed: none, elastix")
    if affine != "none" and initial_transform is not None:
        raise InputError("give either --affine elastix or --initial-transform, not both")
    if (fixed_labels is None) != (moving_labels is None):
        raise InputError("--fixed-labels and --moving-labels must be given together")
    if mask_mode in ("loss", "both") and (fixed_mask is None or moving_mask is None):
        raise InputError(f"--mask-mode {mask_mode} needs both --fixed-mask and --moving-mask")
    torch_device = resolve_device(device)

    model_obj = loaded_model if loaded_model is not None else load_model(model)
    d = model_obj.architecture.dimension
    fixed_image = read_image(fixed, what="--fixed", dimension=d)
    moving_image = read_image(moving, what="--moving", dimension=d)
    fixed_original = itk.imread(str(fixed)) if outputs.warped or outputs.qc else None
    moving_original = itk.imread(str(moving)) if outputs.warped or outputs.qc else None
    masks = {
        "fixed_mask": read_mask_on_grid(fixed_mask, fixed_image, what="--fixed-mask") if fixed_mask else None,
        "moving_mask": read_mask_on_grid(moving_mask, moving_image, what="--moving-mask") if moving_mask else None,
    }
    labels = {
        "fixed_labels": _read_labels_on(fixed_labels, fixed_image, "--fixed-labels") if fixed_labels else None,
        "moving_labels": _read_labels_on(moving_labels, moving_image, "--moving-labels") if moving_labels else None,
    }
    if labels["fixed_labels"] is not None and io_iterations == 0:
        log("note: --fixed-labels/--moving-labels only act during instance optimisation (--io-iterations > 0)")

    pre = None
    if initial_transform is not None:
        from .transforms import read_affine_file

        pre = read_affine_file(initial_transform)
    elif affine == "elastix":
        from .affine import elastix_affine

        log("affine pre-alignment with elastix ...")
        pre = elastix_affine(fixed_image, moving_image, fixed_mask=masks["fixed_mask"],
                             moving_mask=masks["moving_mask"])

    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    result = register(
        fixed_image, moving_image, model=model_obj, fixed_modality=fixed_modality,
        moving_modality=moving_modality, ct_window=ct_window, quantile_range=quantile_range,
        mask_mode=mask_mode, io_iterations=io_iterations, io_similarity=io_similarity, io_lr=io_lr,
        io_dice_weight=io_dice_weight, initial_transform=pre, orientation=orientation,
        compute_inverse=outputs.needs_inverse, device=torch_device, progress=progress,
        generator=generator, **masks, **labels)
    for message in result.messages:
        log(message)
    write_register_outputs(result, outputs, fixed_original=fixed_original,
                           moving_original=moving_original, log=log)
    log(f"done in {result.timings.get('total', 0.0):.1f}s (network {result.timings.get('network', 0.0):.1f}s"
        + (f", instance optimisation {result.timings['instance_optimisation']:.1f}s"
           if "instance_optimisation" in result.timings else "") + ")")
    return result


def write_register_outputs(result, outputs: RegisterOutputs, *, fixed_original=None, moving_original=None,
                           log: Log = lambda message: None) -> List[Path]:
    """Write every requested output of one registration in a single transaction."""
    from .resample import resample_image
    from .transforms import ants_file_names, write_affine_file, write_elastix, write_field_image, write_transform

    written: List[Path] = []
    with OutputTransaction() as out:
        if outputs.transform:
            write_transform(result.forward_field, outputs.transform, out)
            written.append(outputs.transform)
        if outputs.inverse_transform:
            write_transform(result.inverse_field, outputs.inverse_transform, out)
            written.append(outputs.inverse_transform)
        if outputs.ants_prefix:
            names = ants_file_names(str(outputs.ants_prefix))
            if result.affine is not None:
                write_affine_file(result.affine, out.path(names["affine"]))
                write_field_image(result.deformable_forward_field, out.path(names["warp"]))
                write_field_image(result.deformable_inverse_field, out.path(names["inverse_warp"]))
                written.append(Path(names["affine"]))
            else:
                write_field_image(result.forward_field, out.path(names["warp"]))
                write_field_image(result.inverse_field, out.path(names["inverse_warp"]))
            written += [Path(names["warp"]), Path(names["inverse_warp"])]
        if outputs.elastix_dir:
            written.append(write_elastix(result.forward_field, outputs.elastix_dir, out))
        if outputs.warped:
            import itk

            warped = resample_image(moving_original, fixed_original, result.forward_transform,
                                    interpolation="linear")
            itk.imwrite(warped, str(out.path(outputs.warped)), compression=True)
            written.append(outputs.warped)
        if outputs.qc:
            from .qc import write_qc

            write_qc(fixed_original, moving_original, result, out.path(outputs.qc))
            written.append(outputs.qc)
    for path in written:
        log(f"wrote {path}")
    return written


__all__ = ["RegisterOutputs", "run_register", "write_register_outputs"]
