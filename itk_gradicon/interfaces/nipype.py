"""Nipype interfaces for ``gradicon``, named like nipype's ANTs interfaces where the meaning is the same.

A workflow that runs ``nipype.interfaces.ants.Registration`` and ``ApplyTransforms`` can run these instead:
:class:`Register` takes ``fixed_image``, ``moving_image`` and ``output_transform_prefix`` and gives
``forward_transforms`` / ``forward_invert_flags`` (``[PREFIX1Warp.nii.gz, PREFIX0GenericAffine.mat]``) and
``reverse_transforms`` / ``reverse_invert_flags`` (``[PREFIX0GenericAffine.mat, PREFIX1InverseWarp.nii.gz]``,
``[True, False]``), in the order :class:`ApplyTransform` (like ``ants.ApplyTransforms``) takes them, and
``warped_image``. :class:`WarpLabels`, :class:`Jacobian` and :class:`ApplyTransformToPoints` complete the set.

Each runs the ``gradicon`` command of the Python that imports this module (``python -m itk_gradicon``), so a
workflow uses the installation it was built with. Requires nipype (``pip install itk_gradicon[nipype]``).

Example::

    from nipype import Node, Workflow
    from itk_gradicon.interfaces.nipype import Register, WarpLabels

    register = Node(Register(fixed_image="fixed.nii.gz", moving_image="moving.nii.gz",
                             model="gradicon-synthbrain-96"), name="register")
    labels = Node(WarpLabels(input_image="moving_labels.nii.gz", reference_image="fixed.nii.gz"), name="labels")
    flow = Workflow(name="gradicon", base_dir="work")
    flow.connect(register, "forward_transforms", labels, "transforms")
    flow.connect(register, "forward_invert_flags", labels, "invert_transform_flags")
    flow.run()
"""

from __future__ import annotations

import os
import sys
from typing import Dict

from nipype.interfaces.base import (CommandLine, CommandLineInputSpec, File, InputMultiObject, OutputMultiObject,
                                    TraitedSpec, isdefined, traits)

_INTERPOLATIONS = ("linear", "nearest", "bspline", "label")


def _command(subcommand: str) -> str:
    """``python -m itk_gradicon SUBCOMMAND`` with this installation's Python."""
    return f"{sys.executable} -m itk_gradicon {subcommand}"


class _Gradicon(CommandLine):
    """A ``gradicon`` subcommand with ANTs' ``-t`` spelling of transforms and inverse flags; each output named
    in ``_output_files`` is the absolute path of the input (a file name) it is paired with."""

    _output_files: Dict[str, str] = {}

    def _list_outputs(self):
        outputs = self.output_spec().get()
        for output, given in self._output_files.items():
            outputs[output] = os.path.abspath(getattr(self.inputs, given))
        return outputs

    def _transform_args(self) -> str:
        transforms = self.inputs.transforms
        flags = self.inputs.invert_transform_flags if isdefined(self.inputs.invert_transform_flags) else []
        if flags and len(flags) != len(transforms):
            raise ValueError(f"invert_transform_flags has {len(flags)} entries for {len(transforms)} transforms")
        parts = []
        for index, transform in enumerate(transforms):
            inverted = bool(flags[index]) if flags else False
            parts.append(f"-t '[{transform},1]'" if inverted else f"-t {transform}")
        return " ".join(parts)

    def _format_arg(self, name, spec, value):
        if name == "transforms":
            return self._transform_args()
        if name == "invert_transform_flags":
            return ""
        return super()._format_arg(name, spec, value)


class _Threads(CommandLineInputSpec):
    num_threads = traits.Int(argstr="--threads %d", nohash=True, desc="threads of torch, ITK and elastix")


class RegisterInputSpec(_Threads):
    fixed_image = File(exists=True, mandatory=True, argstr="--fixed %s", desc="fixed (reference) image")
    moving_image = File(exists=True, mandatory=True, argstr="--moving %s", desc="moving image")
    output_transform_prefix = traits.Str("transform_", usedefault=True, argstr="--out-ants-prefix %s",
                                         desc="PREFIX of PREFIX1Warp.nii.gz, PREFIX1InverseWarp.nii.gz and "
                                              "PREFIX0GenericAffine.mat")
    output_warped_image = traits.Str("warped.nii.gz", usedefault=True, argstr="--out-warped %s",
                                     desc="the moving image on the fixed grid")
    output_inverse_warped_image = traits.Str(argstr="--out-inverse-warped %s",
                                             desc="the fixed image on the moving grid (ANTs' InverseWarped)")
    model = traits.Str(argstr="--model %s", desc="model name or file (default: gradicon's)")
    affine = traits.Enum("auto", "none", "affine", "rigid", argstr="--affine %s", desc="pre-alignment")
    io_iterations = traits.Int(argstr="--io-iterations %d", desc="instance optimisation steps "
                                                                 "(default: the model's recommendation)")
    fixed_modality = traits.Str(argstr="--fixed-modality %s", desc="ct, mri, t1w, t2w, flair, pd, t2star, auto")
    moving_modality = traits.Str(argstr="--moving-modality %s", desc="as fixed_modality")
    fixed_image_mask = File(exists=True, argstr="--fixed-mask %s", desc="mask on the fixed grid")
    moving_image_mask = File(exists=True, argstr="--moving-mask %s", desc="mask on the moving grid")
    initial_moving_transform = File(exists=True, argstr="--initial-transform %s",
                                    desc="an affine pre-alignment (fixed -> moving) instead of gradicon's")
    random_seed = traits.Int(argstr="--seed %d", desc="seed of instance optimisation")
    provenance_file = traits.Str(argstr="--out-json %s", desc="provenance record (.json)")


class RegisterOutputSpec(TraitedSpec):
    forward_transforms = OutputMultiObject(File(exists=True), desc="fixed -> moving, antsApplyTransforms order")
    forward_invert_flags = OutputMultiObject(traits.Bool(), desc="one False per forward transform")
    reverse_transforms = OutputMultiObject(File(exists=True), desc="moving -> fixed, antsApplyTransforms order")
    reverse_invert_flags = OutputMultiObject(traits.Bool(), desc="True for the affine")
    warped_image = File(exists=True, desc="the moving image on the fixed grid")
    inverse_warped_image = File(desc="the fixed image on the moving grid, if asked for")
    provenance_file = File(desc="the provenance record, if asked for")


class Register(_Gradicon):
    """``gradicon register`` with ANTs-style outputs (see the module docstring)."""

    _cmd = _command("register")
    input_spec = RegisterInputSpec
    output_spec = RegisterOutputSpec

    def _list_outputs(self):
        outputs = self.output_spec().get()
        prefix = os.path.abspath(self.inputs.output_transform_prefix)
        warp, inverse, affine = (prefix + "1Warp.nii.gz", prefix + "1InverseWarp.nii.gz",
                                 prefix + "0GenericAffine.mat")
        has_affine = os.path.exists(affine)
        outputs["forward_transforms"] = [warp] + ([affine] if has_affine else [])
        outputs["forward_invert_flags"] = [False] * len(outputs["forward_transforms"])
        outputs["reverse_transforms"] = ([affine] if has_affine else []) + [inverse]
        outputs["reverse_invert_flags"] = ([True] if has_affine else []) + [False]
        outputs["warped_image"] = os.path.abspath(self.inputs.output_warped_image)
        if isdefined(self.inputs.output_inverse_warped_image):
            outputs["inverse_warped_image"] = os.path.abspath(self.inputs.output_inverse_warped_image)
        if isdefined(self.inputs.provenance_file):
            outputs["provenance_file"] = os.path.abspath(self.inputs.provenance_file)
        return outputs


class _TransformsSpec(_Threads):
    transforms = InputMultiObject(File(exists=True), mandatory=True, argstr="%s",
                                  desc="transforms, antsApplyTransforms order (the first acts on a point first)")
    invert_transform_flags = InputMultiObject(traits.Bool(), desc="invert the linear transform at this place")


class ApplyTransformInputSpec(_TransformsSpec):
    input_image = File(exists=True, mandatory=True, argstr="--input %s", desc="image to resample")
    reference_image = File(exists=True, mandatory=True, argstr="--reference %s", desc="grid of the output")
    output_image = traits.Str("warped.nii.gz", usedefault=True, argstr="--output %s", desc="output image")
    interpolation = traits.Enum(*_INTERPOLATIONS, argstr="--interpolation %s", desc="interpolation")
    default_value = traits.Float(argstr="--default-value %g", desc="value outside the input")


class ApplyTransformOutputSpec(TraitedSpec):
    output_image = File(exists=True, desc="the resampled image")


class ApplyTransform(_Gradicon):
    """``gradicon apply-transform`` (as ``ants.ApplyTransforms``)."""

    _cmd = _command("apply-transform")
    input_spec = ApplyTransformInputSpec
    output_spec = ApplyTransformOutputSpec
    _output_files = {"output_image": "output_image"}


class WarpLabelsInputSpec(_TransformsSpec):
    input_image = File(exists=True, mandatory=True, argstr="--input %s", desc="label map to warp")
    reference_image = File(exists=True, mandatory=True, argstr="--reference %s", desc="grid of the output")
    output_image = traits.Str("warped_labels.nii.gz", usedefault=True, argstr="--output %s", desc="output labels")


class WarpLabels(ApplyTransform):
    """``gradicon warp-labels``: labels through transforms (ANTs' GenericLabel interpolation)."""

    _cmd = _command("warp-labels")
    input_spec = WarpLabelsInputSpec


class JacobianInputSpec(_TransformsSpec):
    reference_image = File(exists=True, mandatory=True, argstr="--reference %s", desc="grid of the determinant")
    output_image = traits.Str("jacobian.nii.gz", usedefault=True, argstr="--output %s", desc="determinant image")
    summary_file = traits.Str("jacobian.json", usedefault=True, argstr="--summary-json %s", desc="summary (JSON)")


class JacobianOutputSpec(TraitedSpec):
    jacobian_image = File(exists=True, desc="Jacobian determinant on the reference grid")
    summary_file = File(exists=True, desc="folding summary")


class Jacobian(_Gradicon):
    """``gradicon jacobian``."""

    _cmd = _command("jacobian")
    input_spec = JacobianInputSpec
    output_spec = JacobianOutputSpec
    _output_files = {"jacobian_image": "output_image", "summary_file": "summary_file"}


class ComposeTransformsInputSpec(_TransformsSpec):
    reference_image = File(exists=True, mandatory=True, argstr="--reference %s", desc="grid of the composed field")
    output_transform = traits.Str("composed.nii.gz", usedefault=True, argstr="--output %s",
                                  desc="the composed field: .h5 or a field image (.nii.gz ...)")


class ComposeTransformsOutputSpec(TraitedSpec):
    output_transform = File(exists=True, desc="one displacement field doing what the transforms do")


class ComposeTransforms(_Gradicon):
    """``gradicon compose-transforms`` (as ``ants.ComposeMultiTransform``): the transforms, in
    antsApplyTransforms order, as one displacement field on the reference grid."""

    _cmd = _command("compose-transforms")
    input_spec = ComposeTransformsInputSpec
    output_spec = ComposeTransformsOutputSpec
    _output_files = {"output_transform": "output_transform"}


class InvertTransformInputSpec(_TransformsSpec):
    reference_image = File(exists=True, mandatory=True, argstr="--reference %s",
                           desc="grid of the inverse (the moving image)")
    fixed_image = File(exists=True, argstr="--fixed %s", desc="where the forward transform is sampled")
    output_transform = traits.Str("inverse.nii.gz", usedefault=True, argstr="--output %s",
                                  desc="the inverse: .h5 or a field image (.nii.gz ...)")


class InvertTransformOutputSpec(TraitedSpec):
    output_transform = File(exists=True, desc="moving -> fixed points, on the reference grid")


class InvertTransform(_Gradicon):
    """``gradicon invert-transform``: the inverse of a forward chain (fixed -> moving) on the moving grid."""

    _cmd = _command("invert-transform")
    input_spec = InvertTransformInputSpec
    output_spec = InvertTransformOutputSpec
    _output_files = {"output_transform": "output_transform"}


class ApplyTransformToPointsInputSpec(_TransformsSpec):
    input_file = File(exists=True, mandatory=True, argstr="--input %s",
                      desc="points: .csv (x,y,z,t LPS), .txt/.pts (elastix), .mrk.json or .fcsv (Slicer)")
    output_file = traits.Str(mandatory=True, argstr="--output %s", desc="mapped points, same format")


class ApplyTransformToPointsOutputSpec(TraitedSpec):
    output_file = File(exists=True, desc="the mapped points")


class ApplyTransformToPoints(_Gradicon):
    """``gradicon apply-transform-to-points`` (as ``ants.ApplyTransformsToPoints``): forward transforms map
    fixed points to moving points."""

    _cmd = _command("apply-transform-to-points")
    input_spec = ApplyTransformToPointsInputSpec
    output_spec = ApplyTransformToPointsOutputSpec
    _output_files = {"output_file": "output_file"}


__all__ = ["Register", "ApplyTransform", "WarpLabels", "Jacobian", "ComposeTransforms", "InvertTransform",
           "ApplyTransformToPoints"]
