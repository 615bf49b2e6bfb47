"""``gradicon apply-transform`` and ``gradicon warp-labels``: resample an image with ITK/ANTs transforms.

Both read every transform a user may have (this package's outputs, ANTs' ``Warp``/``GenericAffine``
files, ITK ``.h5``/``.tfm``, a transformix deformation-field folder) and compose several as
``antsApplyTransforms -t`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import click

from .common import threads_option, info, quiet_option

TRANSFORM_HELP = (
    "Transform FILE, fixed -> moving points; [FILE,1] uses the inverse of a linear transform (ANTs' "
    "spelling; quote it in the shell). Repeat as antsApplyTransforms' -t: with '-t T1 -t T2' a "
    "reference point x samples the input at T2(T1(x)), the first one listed acting on the point first, "
    "so antsRegistration's outputs go as '-t PREFIX1Warp.nii.gz -t PREFIX0GenericAffine.mat'. Reads "
    ".h5/.hdf5/.tfm/.txt/.mat ITK files, displacement-field images (.nii.gz, .nrrd, .mha; LPS mm) and "
    "transformix deformation-field folders.")


def transform_option(required: bool = True):
    return click.option("--transform", "-t", "transforms", multiple=True, required=required,
                        metavar="FILE|[FILE,1]", help=TRANSFORM_HELP)


def _resample_files(input_path: Path, reference_path: Path, transforms: Sequence[str], output: Path,
                    *, interpolation: str, default_value: float, labels: bool, quiet: bool) -> None:
    """The shared body of both commands: :func:`itk_gradicon.commands.files.apply_transform_file`, then a report."""
    from ..commands.files import apply_transform_file

    done = apply_transform_file(input_path, reference_path, transforms, output, interpolation=interpolation,
                                default_value=default_value, labels=labels)
    for warning in done.warnings:
        info(f"warning: {warning}", quiet=quiet)
    info(f"wrote {done.output}", quiet=quiet)
    if done.labels_in is not None:
        lost = done.lost_labels
        info(f"labels: {len(done.labels_in)} in the input, {len(done.labels_out)} in the output"
             + (f"; lost (too small to survive resampling): {lost[:20]}{' ...' if len(lost) > 20 else ''}"
                if lost else ""), quiet=quiet)


@click.command("apply-transform")
@click.option("--input", "-i", "input_path", required=True, type=click.Path(path_type=Path),
              help="Image to resample (the moving image); its pixel type is kept. A 4-D image with a 3-D "
                   "--reference (fMRI, DWI, a stack of maps) is resampled volume by volume and keeps its "
                   "fourth axis, as antsApplyTransforms -e 3.")
@click.option("--reference", "-r", required=True, type=click.Path(path_type=Path),
              help="Image whose grid (size, origin, spacing, direction) the output gets (the fixed image).")
@transform_option()
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path),
              help="Output image (.nii.gz, .nrrd, .mha ...), written only when complete.")
@click.option("--interpolation", "-n", type=click.Choice(["linear", "nearest", "bspline", "label"]),
              default="linear", show_default=True,
              help="linear; nearest; bspline (cubic); label (ANTs' GenericLabel: only input labels, "
                   "smooth boundaries; the same as warp-labels).")
@click.option("--default-value", "-f", type=float, default=0.0, show_default=True,
              help="Value of output voxels whose sample point falls outside the input image.")
@threads_option()
@quiet_option()
def apply_transform(input_path: Path, reference: Path, transforms: Sequence[str], output: Path,
                    interpolation: str, default_value: float, quiet: bool) -> None:
    """Resample INPUT onto the REFERENCE grid through one or several transforms.

    Output voxel x (a reference point) takes INPUT(T(x)), where T maps reference (fixed) points to input
    (moving) points: pass the forward transform of 'gradicon register' to warp the moving image onto
    the fixed one. Several --transform options compose exactly as antsApplyTransforms' -t options.
    A 4-D INPUT (a time series) with a 3-D REFERENCE gives a 4-D output: every volume resampled as a 3-D
    input would be, the fourth axis's size, spacing and origin kept (antsApplyTransforms -e 3).

    \b
    Examples:
      gradicon apply-transform -i moving.nii.gz -r fixed.nii.gz -t moving_to_fixed.h5 -o warped.nii.gz
      gradicon apply-transform -i bold.nii.gz -r t1.nii.gz -t bold_to_t1.h5 -o bold_on_t1.nii.gz
      gradicon apply-transform -i moving.nii.gz -r fixed.nii.gz \\
          -t out/subj_1Warp.nii.gz -t out/subj_0GenericAffine.mat -o warped.nii.gz
      gradicon apply-transform -i fixed.nii.gz -r moving.nii.gz \\
          -t '[out/subj_0GenericAffine.mat,1]' -t out/subj_1InverseWarp.nii.gz -o fixed_on_moving.nii.gz
    """
    _resample_files(input_path, reference, transforms, output, interpolation=interpolation,
                    default_value=default_value, labels=False, quiet=quiet)


@click.command("warp-labels")
@click.option("--input", "-i", "input_path", required=True, type=click.Path(path_type=Path),
              help="Label map to warp (integer voxels, or floats holding integers); a 4-D stack of label maps "
                   "with a 3-D --reference is warped map by map.")
@click.option("--reference", "-r", required=True, type=click.Path(path_type=Path),
              help="Image whose grid the output gets (the fixed image).")
@transform_option()
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path),
              help="Output label map: the input's pixel type, only the input's labels (0 outside).")
@threads_option()
@quiet_option()
def warp_labels(input_path: Path, reference: Path, transforms: Sequence[str], output: Path,
                quiet: bool) -> None:
    """Warp a label map onto the REFERENCE grid without creating labels.

    Label-preserving interpolation as ANTs' GenericLabel: each label is interpolated linearly as a
    0/1 map and every voxel takes the label of largest weight; voxels whose sample point falls outside
    the input get 0. The pixel type is kept. Transforms as in apply-transform.

    \b
    Example:
      gradicon warp-labels -i atlas_labels.nii.gz -r subject.nii.gz -t atlas_to_subject.h5 \\
          -o labels_on_subject.nii.gz
    """
    _resample_files(input_path, reference, transforms, output, interpolation="label", default_value=0.0,
                    labels=True, quiet=quiet)


@click.command("compose-transforms")
@transform_option()
@click.option("--reference", "-r", required=True, type=click.Path(path_type=Path),
              help="Image whose grid the composed field is sampled on (the fixed image).")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path),
              help="The composed transform: an ITK transform file (.h5) or a displacement-field image "
                   "(.nii.gz, .nrrd, .mha; LPS mm, as antsRegistration's Warp.nii.gz), written only when complete.")
@threads_option()
@quiet_option()
def compose_transforms_command(transforms: Sequence[str], reference: Path, output: Path, quiet: bool) -> None:
    """Compose transforms into one displacement field on the REFERENCE grid.

    What antsApplyTransforms -o [field.nii.gz,1] (and ComposeMultiTransform, transformix -def all) do: the
    written field maps each reference point x to Tn(...T2(T1(x))), the transforms composed as in
    apply-transform, so that one file replaces the chain (an affine followed by a warp, the pre-alignment
    of one study followed by another's registration). Sampled in double precision; beyond the REFERENCE
    grid the field, like every displacement field, does nothing.

    \b
    Examples:
      gradicon compose-transforms -t out/subj_1Warp.nii.gz -t out/subj_0GenericAffine.mat \\
          -r fixed.nii.gz -o subj_composed.nii.gz
      gradicon compose-transforms -t t1_to_template.h5 -t bold_to_t1.h5 -r template.nii.gz -o bold_to_template.h5
    """
    from ..commands.files import compose_transform_file

    done = compose_transform_file(transforms, reference, output)
    for warning in done.warnings:
        info(f"warning: {warning}", quiet=quiet)
    info(f"wrote {done.output} (a displacement field of {' x '.join(map(str, done.size))} voxels, largest "
         f"displacement {done.max_displacement_mm:.1f} mm)", quiet=quiet)


@click.command("invert-transform")
@transform_option()
@click.option("--reference", "-r", required=True, type=click.Path(path_type=Path),
              help="Image whose grid the inverse is sampled on (the moving image).")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path),
              help="The inverse, moving -> fixed points: an ITK transform file (.h5) or a displacement-field "
                   "image (.nii.gz, .nrrd, .mha; LPS mm), written only when complete.")
@click.option("--fixed", "fixed_path", type=click.Path(path_type=Path),
              help="The fixed image: where the forward transform is sampled.  [default: the grid of the first "
                   "displacement field among the transforms, else the reference grid]")
@click.option("--iterations", type=click.IntRange(min=1), default=50, show_default=True,
              help="At most this many Newton steps (it stops once every point is within 0.1 micrometre).")
@threads_option()
@quiet_option()
def invert_transform_command(transforms: Sequence[str], reference: Path, output: Path, fixed_path, iterations: int,
                             quiet: bool) -> None:
    """Invert a transform chain (fixed -> moving) into one field on the REFERENCE (moving) grid.

    For transforms that came without their inverse (elastix's, a composed chain, any displacement field):
    each moving point y gets the fixed point x with T(x) = y, by Newton's method from the inverse of T's
    best affine fit, which converges wherever T does not fold. The output says how far it got and checks
    T(T^-1(y)) = y with ITK through the given files.

    \b
    Examples:
      gradicon invert-transform -t elastix_out/ -r moving.nii.gz --fixed fixed.nii.gz -o fixed_to_moving.h5
      gradicon invert-transform -t out/subj_1Warp.nii.gz -t out/subj_0GenericAffine.mat -r moving.nii.gz \\
          -o subj_inverse.nii.gz
    """
    from ..commands.files import invert_transform_file

    done = invert_transform_file(transforms, reference, output, fixed_path=fixed_path, iterations=iterations)
    for warning in done.warnings:
        info(f"warning: {warning}", quiet=quiet)
    info(f"inverted in {done.iterations} Newton steps (at most {done.last_step_mm:.2g} mm off on the sampled "
         f"transform); check |T(T^-1(y)) - y| by ITK: median {done.check_median_mm:.3g} mm, largest "
         f"{done.check_max_mm:.3g} mm", quiet=quiet)
    info(f"wrote {done.output}", quiet=quiet)


@click.command("apply-transform-to-points")
@click.option("--input", "-i", "input_path", required=True, type=click.Path(path_type=Path),
              help="Points: ANTs CSV (x,y,z,t in LPS mm; other columns kept), elastix/ITK point set (.txt/.pts: "
                   "'point' or 'index'), 3D Slicer markups (.mrk.json) or fiducials (.fcsv; RAS or LPS).")
@transform_option()
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path),
              help="Where the mapped points go, in the input's format (and coordinate system), written only "
                   "when complete.")
@click.option("--reference", "-r", type=click.Path(path_type=Path),
              help="The image whose voxel indices an elastix 'index' point set holds.")
@threads_option()
@quiet_option()
def apply_transform_to_points(input_path: Path, transforms: Sequence[str], output: Path, reference, quiet: bool) -> None:
    """Map points through one or several transforms (antsApplyTransformsToPoints, transformix -def).

    Which way: a transform that warps the moving image onto the fixed grid (the forward outputs of
    'gradicon register' and antsRegistration) maps FIXED points to MOVING points; to carry points of
    the moving image onto the fixed image, give the inverse outputs. Several --transform options compose
    as in apply-transform ('-t T1 -t T2' maps x to T2(T1(x))).

    \b
    Examples:
      gradicon apply-transform-to-points -i fixed_landmarks.csv -t moving_to_fixed.h5 -o on_moving.csv
      gradicon apply-transform-to-points -i moving_points.mrk.json -t fixed_to_moving.h5 -o on_fixed.mrk.json
      gradicon apply-transform-to-points -i moving_points.fcsv \\
          -t '[out/subj_0GenericAffine.mat,1]' -t out/subj_1InverseWarp.nii.gz -o on_fixed.fcsv
    """
    from ..commands.points import apply_transforms_to_points

    done = apply_transforms_to_points(input_path, transforms, output, reference=reference)
    info(f"wrote {output} ({len(done.points)} points, {done.kind}"
         + (f", {done.system}" if done.kind in ("slicer-json", "fcsv") else "") + ")", quiet=quiet)


COMMANDS = [apply_transform, warp_labels, compose_transforms_command, invert_transform_command,
            apply_transform_to_points]
