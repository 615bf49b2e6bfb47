"""``gradicon evaluate``: Dice, HD95, landmark TRE and folding of a registration, as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import click

from .apply_cmd import transform_option
from .common import info, quiet_option


@click.command("evaluate")
@transform_option(required=False)
@click.option("--fixed-labels", type=click.Path(path_type=Path),
              help="Label map on the fixed grid (the reference of the overlap).")
@click.option("--moving-labels", type=click.Path(path_type=Path),
              help="Label map of the moving image: warped onto the fixed grid through --transform "
                   "(GenericLabel interpolation), or, without --transform, already on the fixed grid.")
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
@quiet_option()
def evaluate(transforms: Sequence[str], fixed_labels: Optional[Path], moving_labels: Optional[Path],
             label_values: Sequence[int], hd95: bool, fixed_landmarks: Optional[Path],
             moving_landmarks: Optional[Path], reference: Optional[Path], output_json: Optional[Path],
             quiet: bool) -> None:
    """Measure a registration: label overlap, landmark error and folding, printed as JSON.

    The transforms (fixed -> moving, composed as in apply-transform) are the forward ones written by
    'gradicon register' or antsRegistration. Each part of the report appears when its inputs are given:

    \b
      labels      Dice per label and mean; HD95 in mm (--fixed-labels, --moving-labels)
      landmarks   TRE = |T(f) - m| in mm for fixed landmark f and moving landmark m,
                  and the error before registration |f - m| (--fixed-landmarks, --moving-landmarks)
      jacobian    % negative determinant, SDlogJ, min/max/mean on the fixed grid (--transform)

    \b
    Example:
      gradicon evaluate -t moving_to_fixed.h5 --fixed-labels fixed_seg.nii.gz \\
          --moving-labels moving_seg.nii.gz --output-json eval.json
    """
    from ..errors import InputError
    from ..imageio import OutputTransaction, check_output_path, read_itk_image
    from ..geometry import ImageGrid
    from ..metrics import label_overlap, read_landmarks, target_registration_error
    from ..jacobian import jacobian_determinant, jacobian_summary
    from ..resample import resample_labels
    from ..transforms import compose_transforms
    from .jacobian_cmd import _first_field_image

    if (fixed_labels is None) != (moving_labels is None):
        raise InputError("--fixed-labels and --moving-labels must be given together")
    if (fixed_landmarks is None) != (moving_landmarks is None):
        raise InputError("--fixed-landmarks and --moving-landmarks must be given together")
    if fixed_labels is None and fixed_landmarks is None and not transforms:
        raise InputError("nothing to evaluate: give --fixed-labels/--moving-labels, "
                         "--fixed-landmarks/--moving-landmarks, or --transform (folding)")
    if label_values and fixed_labels is None:
        raise InputError("--label needs --fixed-labels and --moving-labels")
    if output_json is not None:
        output_json = check_output_path(output_json, what="--output-json", suffixes=(".json",))

    fixed_lab = read_itk_image(fixed_labels, "--fixed-labels") if fixed_labels is not None else None
    moving_lab = read_itk_image(moving_labels, "--moving-labels") if moving_labels is not None else None
    reference_image = read_itk_image(reference, "--reference") if reference is not None else fixed_lab
    dimension = None
    for image in (reference_image, fixed_lab, moving_lab):
        if image is not None:
            d = int(image.GetImageDimension())
            if dimension is not None and d != dimension:
                raise InputError("the images given are not all of one dimension")
            dimension = d
    transform = compose_transforms(list(transforms), dimension=dimension) if transforms else None
    if reference_image is None and transform is not None:
        reference_image = _first_field_image(transform)

    report = {"transforms": [str(t) for t in transforms]}
    if fixed_lab is not None:
        compared = moving_lab
        if transform is not None:
            compared = resample_labels(moving_lab, fixed_lab, transform)
        report["labels"] = label_overlap(fixed_lab, compared, label_values=list(label_values) or None,
                                         with_hd95=hd95)
    if fixed_landmarks is not None:
        fixed_grid = ImageGrid.from_image(reference_image) if reference_image is not None else None
        moving_grid = ImageGrid.from_image(moving_lab) if moving_lab is not None else None
        report["landmarks"] = target_registration_error(
            read_landmarks(fixed_landmarks, grid=fixed_grid), read_landmarks(moving_landmarks, grid=moving_grid),
            transform)
    if transform is not None:
        if reference_image is None:
            raise InputError("the Jacobian needs a grid: give --reference (the fixed image) or "
                             "--fixed-labels, or a displacement field among the transforms")
        det = jacobian_determinant(transform, ImageGrid.from_image(reference_image))
        report["jacobian"] = jacobian_summary(det)
    text = json.dumps(report, indent=2)
    if output_json is not None:
        with OutputTransaction() as out:
            out.path(output_json).write_text(text + "\n")
    click.echo(text)
    if output_json is not None:
        info(f"wrote {output_json}", quiet=quiet)


COMMANDS = [evaluate]
