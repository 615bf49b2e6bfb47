"""The nipype interfaces: a Workflow (register, then warp labels) run by nipype's engine."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("NIPYPE_NO_ET", "1")  # nipype's import asks the network for its latest version otherwise
nipype = pytest.importorskip("nipype", reason="nipype (test extras) runs the workflow")


@pytest.fixture
def quiet_nipype(tmp_path, monkeypatch):
    monkeypatch.setenv("NIPYPE_NO_ET", "1")  # no version check over the network
    from nipype import config

    config.set("execution", "crashdump_dir", str(tmp_path / "crash"))
    config.set("execution", "remove_unnecessary_outputs", "false")
    config.set("monitoring", "enabled", "false")
    monkeypatch.chdir(tmp_path)


def _pair(tmp_path):
    import itk

    from conftest import blob_volume, make_image

    rng = np.random.default_rng(31)
    fixed, moving = (blob_volume((24, 24, 24), rng) for _ in range(2))
    itk.imwrite(make_image(fixed * 100), str(tmp_path / "fixed.nii.gz"))
    itk.imwrite(make_image(moving * 100), str(tmp_path / "moving.nii.gz"))
    itk.imwrite(make_image((moving > 0.4).astype(np.int16) + (moving > 0.7)), str(tmp_path / "moving_labels.nii.gz"))
    return tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz", tmp_path / "moving_labels.nii.gz"


def test_a_workflow_registers_then_warps_labels(tmp_path, tiny_model_file, quiet_nipype):  # noqa: ARG001
    import SimpleITK as sitk
    from click.testing import CliRunner
    from nipype import Node, Workflow

    from itk_gradicon.cli import main
    from itk_gradicon.interfaces.nipype import Register, WarpLabels
    from itk_gradicon.spatial.transforms import write_affine_file

    fixed, moving, labels = _pair(tmp_path)
    shift = np.eye(4)
    shift[:3, 3] = [1.0, 0.0, -0.5]
    write_affine_file(shift, tmp_path / "init.tfm")  # an affine part, so the flags and order matter
    register = Node(Register(fixed_image=str(fixed), moving_image=str(moving), model=str(tiny_model_file),
                             io_iterations=0, num_threads=1, random_seed=1,
                             initial_moving_transform=str(tmp_path / "init.tfm")), name="register")
    warp = Node(WarpLabels(input_image=str(labels), reference_image=str(fixed)), name="warp_labels")
    flow = Workflow(name="gradicon_flow", base_dir=str(tmp_path / "work"))
    flow.connect(register, "forward_transforms", warp, "transforms")
    flow.connect(register, "forward_invert_flags", warp, "invert_transform_flags")
    graph = flow.run()
    nodes = {node.name: node for node in graph.nodes()}
    out = nodes["warp_labels"].result.outputs.output_image
    assert os.path.isfile(out)
    from nipype.utils.filemanip import ensure_list

    transforms = ensure_list(nodes["register"].result.outputs.forward_transforms)  # nipype unpacks one-item lists
    assert [os.path.basename(t) for t in transforms] == ["transform_1Warp.nii.gz", "transform_0GenericAffine.mat"]
    assert ensure_list(nodes["register"].result.outputs.reverse_invert_flags) == [True, False]
    # the same as the commands run by hand
    direct = CliRunner().invoke(main, ["warp-labels", "-i", str(labels), "-r", str(fixed), "-t", transforms[0],
                                       "-t", transforms[1], "-o", str(tmp_path / "direct.nii.gz")])
    assert direct.exit_code == 0, direct.output
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(out)),
                          sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "direct.nii.gz"))))


def test_command_lines_follow_ants_spelling(tmp_path, quiet_nipype):  # noqa: ARG001
    from itk_gradicon.interfaces.nipype import (ApplyTransform, ApplyTransformToPoints, ComposeTransforms,
                                                InvertTransform, Jacobian, Register)

    fixed, moving, labels = _pair(tmp_path)
    (tmp_path / "a.mat").write_text("x")
    (tmp_path / "w.nii.gz").write_text("x")
    apply = ApplyTransform(input_image=str(moving), reference_image=str(fixed),
                           transforms=[str(tmp_path / "w.nii.gz"), str(tmp_path / "a.mat")],
                           invert_transform_flags=[False, True], interpolation="linear")
    line = apply.cmdline
    assert "-m itk_gradicon apply-transform" in line
    assert f"-t {tmp_path / 'w.nii.gz'} -t '[{tmp_path / 'a.mat'},1]'" in line
    assert "--output warped.nii.gz" in line and "--interpolation linear" in line
    register = Register(fixed_image=str(fixed), moving_image=str(moving), num_threads=2, affine="rigid")
    assert "--out-ants-prefix transform_ --out-warped warped.nii.gz" in register.cmdline
    assert "--threads 2" in register.cmdline and "--affine rigid" in register.cmdline
    jacobian = Jacobian(reference_image=str(fixed), transforms=[str(tmp_path / "w.nii.gz")])
    assert "jacobian" in jacobian.cmdline and "--summary-json jacobian.json" in jacobian.cmdline
    points = ApplyTransformToPoints(input_file=str(labels), transforms=[str(tmp_path / "a.mat")],
                                    output_file="out.csv")
    assert "apply-transform-to-points" in points.cmdline
    composed = ComposeTransforms(reference_image=str(fixed), transforms=[str(tmp_path / "w.nii.gz"),
                                                                        str(tmp_path / "a.mat")])
    assert "compose-transforms" in composed.cmdline and "--output composed.nii.gz" in composed.cmdline
    assert f"-t {tmp_path / 'w.nii.gz'} -t {tmp_path / 'a.mat'}" in composed.cmdline
    inverted = InvertTransform(reference_image=str(moving), fixed_image=str(fixed),
                               transforms=[str(tmp_path / "w.nii.gz")])
    assert "invert-transform" in inverted.cmdline and f"-t {tmp_path / 'w.nii.gz'}" in inverted.cmdline
    assert "--output inverse.nii.gz" in inverted.cmdline and f"--fixed {fixed}" in inverted.cmdline
    inverse_warped = Register(fixed_image=str(fixed), moving_image=str(moving),
                              output_inverse_warped_image="fixed_on_moving.nii.gz")
    assert "--out-inverse-warped fixed_on_moving.nii.gz" in inverse_warped.cmdline
