"""``gradicon jacobian``: the Jacobian determinant of a transform, in physical space, and its summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import click

from .apply_cmd import transform_option
from .common import info, quiet_option


@click.command("jacobian")
@transform_option()
@click.option("--reference", "-r", type=click.Path(path_type=Path),
              help="Image whose grid the determinant is sampled on (the fixed image).  "
                   "[default: the grid of the first displacement field given]")
@click.option("--output", "-o", type=click.Path(path_type=Path),
              help="Determinant image (float32), written only when complete.")
@click.option("--log", "log_output", is_flag=True,
              help="Write log(max(det, 0.001)) instead of det (ANTs' clamped log-Jacobian).")
@click.option("--summary-json", type=click.Path(path_type=Path),
              help="Also write the summary (printed on stdout) to this JSON file.")
@quiet_option()
def jacobian(transforms: Sequence[str], reference: Optional[Path], output: Optional[Path], log_output: bool,
             summary_json: Optional[Path], quiet: bool) -> None:
    """Jacobian determinant of a transform (fixed -> moving) on the fixed grid.

    Derivatives are taken with respect to physical (LPS mm) coordinates, so oblique and flipped
    images give the right values (ITK's DisplacementFieldJacobianDeterminantFilter does not).
    det > 1: expansion, < 1: contraction, < 0: folding; values keep their sign (ANTs clamps them
    to >= 0). The summary, printed as JSON on stdout, holds the voxel count, % negative, min, max,
    mean, std and SDlogJ (the std of log(max(det, 0.001))).

    \b
    Example:
      gradicon jacobian -t moving_to_fixed.h5 -r fixed.nii.gz -o jacobian.nii.gz --summary-json jac.json
    """
    import itk

    from ..errors import InputError
    from ..imageio import IMAGE_SUFFIXES, OutputTransaction, check_output_path, read_itk_image
    from ..jacobian import jacobian_image, jacobian_summary
    from ..transforms import compose_transforms

    if output is not None:
        output = check_output_path(output, what="--output", suffixes=IMAGE_SUFFIXES)
    if summary_json is not None:
        summary_json = check_output_path(summary_json, what="--summary-json", suffixes=(".json",))
    if output is not None and summary_json is not None and output == summary_json:
        raise InputError("--output and --summary-json name the same file")
    if reference is not None:
        reference_image = read_itk_image(reference, "--reference")
        transform = compose_transforms(list(transforms), dimension=int(reference_image.GetImageDimension()))
    else:
        transform = compose_transforms(list(transforms))
        reference_image = _first_field_image(transform)
        if reference_image is None:
            raise InputError("no displacement field among the transforms to take the grid from; give "
                             "--reference (the fixed image)")
    image, det = jacobian_image(transform, reference_image, log=log_output)
    summary = {"transforms": [str(t) for t in transforms], **jacobian_summary(det)}
    text = json.dumps(summary, indent=2)
    with OutputTransaction() as out:
        if output is not None:
            itk.imwrite(image, str(out.path(output)), compression=True)
        if summary_json is not None:
            out.path(summary_json).write_text(text + "\n")
    click.echo(text)
    for path in (output, summary_json):
        if path is not None:
            info(f"wrote {path}", quiet=quiet)


def _first_field_image(transform):
    """The displacement-field image of the first field in a composite (the one nearest the fixed
    space), or ``None``."""
    from ..transforms import transform_parts

    for part in reversed(transform_parts(transform)):
        if hasattr(part, "GetDisplacementField"):
            return part.GetDisplacementField()
    return None


COMMANDS = [jacobian]
