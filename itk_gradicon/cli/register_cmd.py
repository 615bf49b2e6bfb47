"""``gradicon register``: register a moving image to a fixed image and write the transforms."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import click

from ..model_records import FIELD_REFINEMENT
from ..pipeline.options import (AFFINE_CHOICES, DEFAULT_CT_WINDOW, DEFAULT_LR, DEFAULT_MRI_UPPER_QUANTILE,
                                DEFAULT_SMOOTHNESS, IO_METHOD_CHOICES, IO_SIMILARITY_CHOICES, IO_STARTS, MASK_MODES,
                                MODALITY_CHOICES, NETWORK_REGIONS, ORIENTATIONS)
from .common import (threads_option, ProgressLine, device_option, format_number, format_seconds, info, model_option,
                     quiet_option)

_MODALITY = click.Choice(MODALITY_CHOICES)


@click.command("register")
@click.option("--fixed", required=True, type=click.Path(path_type=Path),
              help="Fixed (reference) image: its grid is the grid of the forward transform.")
@click.option("--moving", required=True, type=click.Path(path_type=Path),
              help="Moving image, to be warped onto the fixed image.")
@click.option("--out-transform", type=click.Path(path_type=Path),
              help="Forward transform, fixed -> moving physical points, on the fixed grid: an ITK "
                   "transform file (.h5) or a displacement-field image (.nii.gz, .nrrd, .mha; LPS mm, "
                   "readable by antsApplyTransforms).")
@click.option("--out-inverse-transform", type=click.Path(path_type=Path),
              help="Inverse transform, moving -> fixed points, on the moving grid (the network's "
                   "phi_BA); same formats as --out-transform.")
@click.option("--out-warped", type=click.Path(path_type=Path),
              help="The moving image warped onto the fixed grid (linear interpolation, moving pixel type; "
                   ".nii.gz, .nii, .mha, .mhd, .nrrd, .nhdr).")
@click.option("--out-inverse-warped", type=click.Path(path_type=Path),
              help="The fixed image warped onto the moving grid through the inverse transform "
                   "(antsRegistration's InverseWarped; linear, fixed pixel type; formats as --out-warped).")
@click.option("--out-ants-prefix", metavar="PREFIX",
              help="Write PREFIX1Warp.nii.gz and PREFIX1InverseWarp.nii.gz (and PREFIX0GenericAffine.mat "
                   "with --affine/--initial-transform) as antsRegistration names them; use "
                   "'-t PREFIX1Warp.nii.gz -t PREFIX0GenericAffine.mat' in antsApplyTransforms.")
@click.option("--out-elastix", type=click.Path(path_type=Path), metavar="DIR",
              help="Folder for TransformParameters.0.txt and its deformation field, runnable by "
                   "transformix as is (created if missing).")
@click.option("--out-qc", type=click.Path(path_type=Path), metavar="PNG",
              help="Quality-control picture (.png): on three orthogonal slices through the fixed image, "
                   "the moving image before and after registration, magenta/green overlays, and the "
                   "log-Jacobian of the forward transform.")
@click.option("--out-json", type=click.Path(path_type=Path), metavar="JSON",
              help="Provenance record (.json): package, torch, ITK, SimpleITK and itk-elastix versions; the model "
                   "(name, sha256, recommendation); the inputs' sha256; every option as resolved; the "
                   "pre-alignment; the instance optimisation's first and last loss; the forward transform's "
                   "Jacobian summary; the messages; the stage times. Schema: "
                   "itk_gradicon/schemas/register-record.schema.json.")
@model_option()
@click.option("--fixed-modality", type=_MODALITY, default="auto", show_default=True,
              help="ct: clip to --ct-window; mri (any non-CT image): clip to the quantile range; t1w, t2w, "
                   "flair, pd, t2star: an MRI of that contrast (normalised as mri; two different contrasts, "
                   "or CT and MRI, make instance optimisation use the model's multimodal similarity); auto: "
                   "guess CT or MRI from intensities and print the choice.")
@click.option("--moving-modality", type=_MODALITY, default="auto", show_default=True,
              help="As --fixed-modality, for the moving image.")
@click.option("--ct-window", nargs=2, type=float, metavar="MIN MAX",
              help=f"CT window in Hounsfield units.  [default: {' '.join(map(format_number, DEFAULT_CT_WINDOW))}]")
@click.option("--quantile-range", nargs=2, type=float, metavar="LOWER UPPER",
              help="Intensity quantiles (0-1) mapped to 0 and 1 for non-CT images.  "
                   f"[default: minimum and {format_number(DEFAULT_MRI_UPPER_QUANTILE)}]")
@click.option("--fixed-mask", type=click.Path(path_type=Path),
              help="Binary mask on the fixed image's grid (same size, origin, spacing and direction; "
                   "voxels > 0 are inside).")
@click.option("--moving-mask", type=click.Path(path_type=Path),
              help="Binary mask on the moving image's grid (voxels > 0 are inside).")
@click.option("--mask-mode", type=click.Choice(MASK_MODES), default="input",
              show_default=True,
              help="input: zero each image outside its mask before the network sees it; loss: restrict "
                   "the instance-optimisation similarity to the masks; both.")
@click.option("--io-iterations", type=click.IntRange(min=0), default=None,
              help="Instance-optimisation steps for this pair (see --io-method; the model file is never "
                   "changed); 0 = prediction only (the fast mode).  [default: the model's recommendation: "
                   f"{FIELD_REFINEMENT.iterations} steps of field IO for gradicon-synthbrain-96 and the "
                   "published models]")
@click.option("--io-similarity", type=click.Choice(IO_SIMILARITY_CHOICES), default=None,
              help="Similarity for instance optimisation: lncc, lncc2 (squared LNCC, multimodal), mind "
                   "(MIND-SSC, multimodal).  [default: the model's recommendation, its multimodal one when "
                   "--fixed-modality and --moving-modality name different contrasts]")
@click.option("--io-method", type=click.Choice(IO_METHOD_CHOICES), default="auto", show_default=True,
              help="Instance optimisation: network (Adam on a copy of the network's weights, as the papers "
                   "do; slow on a CPU), field (Adam on the two predicted displacement fields, kept smooth "
                   "and inverse-consistent; fast: no network pass, see benchmarks/ACCURACY.md); "
                   "auto: the model's recommendation (field for the bundled and the published models).")
@click.option("--io-lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help=f"Adam learning rate of instance optimisation.  [default: {format_number(DEFAULT_LR['network'])} "
                   f"network; {format_number(DEFAULT_LR['field'])} field, in network voxels]")
@click.option("--io-smoothness", type=click.FloatRange(min=0), default=None,
              help="Weight of the fields' diffusion penalty in --io-method field (larger: smoother, fewer "
                   "folds, less gain).  [default: the model's recommendation, else "
                   f"{format_number(DEFAULT_SMOOTHNESS)}]")
@click.option("--io-start", type=click.Choice(IO_STARTS), default="auto",
              show_default=True,
              help="Where field instance optimisation starts: prediction (the network's fields), prealignment "
                   "(the pre-alignment alone; the network does not run), auto: prediction, but prealignment for "
                   "a pair outside the model's domain (a field of view or modality it was not trained on; the "
                   "output says so).")
@click.option("--fixed-labels", type=click.Path(path_type=Path),
              help="Label map on the fixed grid; with --moving-labels adds a Dice term to instance "
                   "optimisation.")
@click.option("--moving-labels", type=click.Path(path_type=Path), help="Label map on the moving grid.")
@click.option("--io-dice-weight", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Weight of the Dice term (relative to the similarity) when labels are given.")
@click.option("--affine", type=click.Choice(AFFINE_CHOICES), default="auto",
              show_default=True,
              help="Pre-alignment with elastix (mutual information; restricted to the masks when given), "
                   "composed into every transform written; the network then registers the fixed image to "
                   "the pre-aligned moving image. affine: from the stored positions and from the aligned "
                   "centres of mass, the better kept; a result with implausible scales is replaced by a "
                   "rigid one, and the output says so. rigid: rotation and translation from the stored "
                   "positions (one subject's images). auto: affine for a model trained on pre-aligned "
                   "pairs (the bundled model), none for the published models. elastix: former name of affine.")
@click.option("--initial-transform", type=click.Path(path_type=Path), metavar="FILE",
              help="An existing affine pre-alignment, fixed -> moving (ITK .tfm/.txt/.h5, ANTs .mat), "
                   "composed into every transform written.")
@click.option("--orientation", type=click.Choice(ORIENTATIONS), default="fixed", show_default=True,
              help="fixed: lay the moving image out along the fixed image's axes before the network "
                   "sees it (physically consistent); storage: feed both as stored in their files "
                   "(the reference implementation's behaviour).")
@click.option("--network-region", type=click.Choice(NETWORK_REGIONS), default="auto", show_default=True,
              help="auto: after a pre-alignment, the network and instance optimisation see the box of the two "
                   "images' foreground where that box is at least 30 % smaller than the fixed image's grid (a "
                   "brain in a 256^3 field of view: finer network voxels), and the displacement continues "
                   "beyond it; image: always the whole fixed grid.")
@click.option("--seed", type=int, default=None,
              help="Seed of instance optimisation's random GradICON sample points (reproducible runs).  "
                   "[default: none, a new draw each run]")
@device_option()
@threads_option()
@quiet_option()
def register(fixed: Path, moving: Path, out_transform: Optional[Path], out_inverse_transform: Optional[Path],
             out_warped: Optional[Path], out_inverse_warped: Optional[Path], out_ants_prefix: Optional[str],
             out_elastix: Optional[Path],
             out_qc: Optional[Path], out_json: Optional[Path], model: str, fixed_modality: str, moving_modality: str,
             ct_window: Optional[Tuple[float, float]], quantile_range: Optional[Tuple[float, float]],
             fixed_mask: Optional[Path], moving_mask: Optional[Path], mask_mode: str, io_iterations: Optional[int],
             io_similarity: Optional[str], io_method: str, io_lr: Optional[float], io_smoothness: Optional[float],
             fixed_labels: Optional[Path],
             moving_labels: Optional[Path], io_dice_weight: float, affine: str,
             initial_transform: Optional[Path], orientation: str, network_region: str, io_start: str,
             seed: Optional[int], device: str, quiet: bool) -> None:
    """Register MOVING to FIXED with a GradICON-family network.

    The forward transform maps fixed physical points to moving physical points on the fixed
    image's grid: resampling the moving image with it (ITK, antsApplyTransforms, transformix)
    gives the moving image aligned to the fixed one. Every output is written only when all of them
    are ready, so a failed run leaves no partial files.

    Inputs are checked before the work starts (files, image dimension and type, masks on their
    image's grid, memory); a problem is reported as one line starting with "Error:" and the
    command exits with status 2.

    \b
    Example:
      gradicon register --fixed t1.nii.gz --moving t2.nii.gz --out-transform t2_to_t1.h5 \\
          --out-warped t2_on_t1.nii.gz --out-qc t2_to_t1.png --fixed-modality t1w --moving-modality t2w
    """
    from ..pipeline.options import RegistrationOptions
    from ..commands.register import RegisterFiles, RegisterOutputs, run_register

    line = ProgressLine(quiet)

    def progress(p) -> None:
        terms = "  ".join(f"{k} {v:.4f}" for k, v in p.losses.items()
                           if k not in ("dice", "inverse_consistency") or v)
        level = f" ({p.level})" if p.level else ""
        line.update(f"instance optimisation {p.step}/{p.total}{level}  {terms}  "
                    f"elapsed {format_seconds(p.elapsed_s)}  ETA {format_seconds(p.eta_s)}",
                    final=p.step == p.total)

    outputs = RegisterOutputs(transform=out_transform, inverse_transform=out_inverse_transform,
                              warped=out_warped, inverse_warped=out_inverse_warped, ants_prefix=out_ants_prefix,
                              elastix_dir=out_elastix,
                              qc=out_qc, record=out_json)
    options = RegistrationOptions.from_keywords(
        fixed_modality=fixed_modality, moving_modality=moving_modality, ct_window=ct_window,
        quantile_range=quantile_range, mask_mode=mask_mode, io_iterations=io_iterations, io_similarity=io_similarity,
        io_method=io_method, io_lr=io_lr, io_smoothness=io_smoothness, io_dice_weight=io_dice_weight, affine=affine,
        orientation=orientation, network_region=network_region, io_start=io_start)
    files = RegisterFiles(fixed, moving, fixed_mask=fixed_mask, moving_mask=moving_mask, fixed_labels=fixed_labels,
                          moving_labels=moving_labels, initial_transform=initial_transform)
    run_register(files, outputs, options, model=model, seed=seed, device=device, log=lambda m: info(m, quiet=quiet),
                 progress=progress)
