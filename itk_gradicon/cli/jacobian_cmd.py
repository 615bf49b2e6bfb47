"""``gradicon jacobian``: the Jacobian determinant of a transform, in physical space, and its summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import click

from .apply_cmd import transform_option
from .common import threads_option, info, quiet_option


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
@threads_option()
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
    from ..commands.files import jacobian_file

    summary = jacobian_file(list(transforms), reference=reference, output=output, summary_json=summary_json,
                            log=log_output)
    for warning in summary.get("warnings", ()):
        info(f"warning: {warning}", quiet=quiet)
    click.echo(json.dumps(summary, indent=2))
    for path in (output, summary_json):
        if path is not None:
            info(f"wrote {Path(path).expanduser().absolute()}", quiet=quiet)


COMMANDS = [jacobian]
