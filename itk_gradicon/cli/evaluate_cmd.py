"""``gradicon evaluate``: Dice, HD95, landmark TRE and folding of a registration, as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import click

from .apply_cmd import transform_option
from .common import threads_option, info, quiet_option


@click.command("evaluate")
@transform_option(required=False)
@click.option("--fixed-labels", type=click.Path(path_type=Path),
              help="Label map on the fixed grid (the reference of the overlap).")
@click.option("--moving-labels", type=click.Path(path_type=Path),
              help="Label map of the moving image: warped onto the fixed grid through --transform "
                   "(see --label-interpolation), or, without --transform, already on the fixed grid.")
@click.option("--label-interpolation", type=click.Choice(["label", "nearest"]), default="label", show_default=True,
              help="How --moving-labels is warped: label (ANTs' GenericLabel: each label interpolated linearly "
                   "as a 0/1 map, the largest wins) or nearest (nearest neighbour, as many published "
                   "evaluations do; a lower Dice on small regions). Compare methods scored the same way.")
@click.option("--label", "label_values", type=int, multiple=True, metavar="N",
              help="Evaluate only this label (repeatable).  [default: every non-zero label in either map]")
@click.option("--hd95/--no-hd95", default=True, show_default=True,
              help="Also compute the 95th-percentile Hausdorff distance (mm) per label.")
@click.option("--fixed-landmarks", type=click.Path(path_type=Path),
              help="Landmarks in the fixed image: elastix point-set text ('point' = LPS mm, 'index' = "
                   "voxel indices of the fixed image) or CSV x,y,z in LPS mm.")
@click.option("--moving-landmarks", type=click.Path(path_type=Path),
              help="The corresponding moving landmarks, same order and format.")
@click.option("--reference", "-r", type=click.Path(path_type=Path),
              help="Fixed image: the grid of the Jacobian and of 'index' fixed landmarks.  "
                   "[default: the grid of --fixed-labels, else of the first displacement field]")
@click.option("--output-json", type=click.Path(path_type=Path),
              help="Also write the JSON printed on stdout to this file.")
@threads_option()
@quiet_option()
def evaluate(transforms: Sequence[str], fixed_labels: Optional[Path], moving_labels: Optional[Path],
             label_interpolation: str, label_values: Sequence[int], hd95: bool, fixed_landmarks: Optional[Path],
             moving_landmarks: Optional[Path], reference: Optional[Path], output_json: Optional[Path],
             quiet: bool) -> None:
    """Measure a registration: label overlap, landmark error and folding, printed as JSON.

    The transforms (fixed -> moving, composed as in apply-transform) are the forward ones written by
    'gradicon register' or antsRegistration. Each part of the report appears when its inputs are given:

    \b
      labels      Dice per label and mean; HD95 in mm (--fixed-labels, --moving-labels, --label-interpolation)
      landmarks   TRE = |T(f) - m| in mm for fixed landmark f and moving landmark m,
                  and the error before registration |f - m| (--fixed-landmarks, --moving-landmarks)
      jacobian    % negative determinant, SDlogJ, min/max/mean on the fixed grid (--transform)

    \b
    Example:
      gradicon evaluate -t moving_to_fixed.h5 --fixed-labels fixed_seg.nii.gz \\
          --moving-labels moving_seg.nii.gz --output-json eval.json
    """
    from ..commands.files import evaluate_files

    report = evaluate_files(list(transforms), fixed_labels=fixed_labels, moving_labels=moving_labels,
                            label_values=list(label_values) or None, hd95=hd95, fixed_landmarks=fixed_landmarks,
                            moving_landmarks=moving_landmarks, reference=reference, output_json=output_json,
                            label_interpolation=label_interpolation)
    for warning in report.get("warnings", ()):
        info(f"warning: {warning}", quiet=quiet)
    click.echo(json.dumps(report, indent=2))
    if output_json is not None:
        info(f"wrote {Path(output_json).expanduser().absolute()}", quiet=quiet)


COMMANDS = [evaluate]
