"""Points through transforms: formats, direction, agreement with antspyx, exact Slicer round trips, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from itk_gradicon.cli import main
from itk_gradicon.commands.points import read_points, write_points

FIXED_POINTS = np.array([[1.25, -3.5, 2.0], [-4.0, 2.75, -1.5], [0.5, 0.25, 3.75], [6.0, -6.0, 0.0]])


def _affine_file(tmp_path: Path) -> Path:
    from itk_gradicon.pipeline.affine import euler_matrix
    from itk_gradicon.spatial.transforms import write_affine_file

    matrix = np.eye(4)
    matrix[:3, :3] = euler_matrix([0.1, -0.05, 0.2]) * 1.05
    matrix[:3, 3] = [2.0, -1.0, 0.5]
    path = tmp_path / "affine.tfm"
    write_affine_file(matrix, path)
    return path


def _ants_csv(path: Path, points: np.ndarray) -> Path:
    lines = ["x,y,z,t,label"] + [",".join(repr(float(v)) for v in p) + f",0,L{i}" for i, p in enumerate(points)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(*args):
    return CliRunner().invoke(main, ["apply-transform-to-points", *map(str, args)])


@pytest.fixture(scope="module")
def registration(tmp_path_factory, tiny_model_file):
    """ANTs-style outputs (1Warp + 0GenericAffine) and the composed .h5 of one registration of a small pair."""
    import itk

    from conftest import blob_volume, make_image

    tmp = tmp_path_factory.mktemp("points_registration")
    rng = np.random.default_rng(12)
    fixed = make_image(blob_volume((24, 24, 24), rng) * 100, spacing=(1.0, 1.0, 1.0), origin=(-12.0, -12.0, -12.0))
    moving = make_image(blob_volume((24, 24, 24), rng) * 100, spacing=(1.0, 1.0, 1.0), origin=(-11.0, -12.5, -12.0))
    itk.imwrite(fixed, str(tmp / "f.nii.gz"))
    itk.imwrite(moving, str(tmp / "m.nii.gz"))
    result = CliRunner().invoke(main, [
        "register", "--model", str(tiny_model_file), "--fixed", str(tmp / "f.nii.gz"), "--moving",
        str(tmp / "m.nii.gz"), "--initial-transform", str(_affine_file(tmp)), "--io-iterations", "0",
        "--out-transform", str(tmp / "fwd.h5"), "--out-inverse-transform", str(tmp / "inv.h5"),
        "--out-ants-prefix", str(tmp / "a_"), "--out-elastix", str(tmp / "elastix")])
    assert result.exit_code == 0, result.output
    return tmp


def test_points_agree_with_antspyx_on_a_registrations_outputs(tmp_path, registration):
    ants = pytest.importorskip("ants", reason="antspyx (test extras) compares the point mapping")
    import pandas as pd

    source = _ants_csv(tmp_path / "fixed_points.csv", FIXED_POINTS)
    ants_list = [str(registration / "a_1Warp.nii.gz"), str(registration / "a_0GenericAffine.mat")]
    result = _run("-i", source, "-t", ants_list[0], "-t", ants_list[1], "-o", tmp_path / "ours.csv")
    assert result.exit_code == 0, result.output
    ours = pd.read_csv(tmp_path / "ours.csv")
    theirs = ants.apply_transforms_to_points(3, pd.read_csv(source)[["x", "y", "z", "t"]], ants_list)
    assert np.abs(ours[["x", "y", "z"]].to_numpy() - theirs[["x", "y", "z"]].to_numpy()).max() < 1e-4
    assert list(ours["label"]) == [f"L{i}" for i in range(len(FIXED_POINTS))]  # other columns carried through
    assert np.abs(ours[["x", "y", "z"]].to_numpy() - FIXED_POINTS).max() > 0.5  # the transform did move them
    # the package's own forward .h5 is the same map
    assert _run("-i", source, "-t", registration / "fwd.h5", "-o", tmp_path / "h5.csv").exit_code == 0
    h5 = pd.read_csv(tmp_path / "h5.csv")[["x", "y", "z"]].to_numpy()
    assert np.abs(h5 - ours[["x", "y", "z"]].to_numpy()).max() < 1e-4


def test_a_transform_then_its_inverse_brings_the_points_back(tmp_path):
    """'-t A' then '-t [A,1]': the points return (the ANTs spelling of an inverse works for points)."""
    affine = _affine_file(tmp_path)
    source = _ants_csv(tmp_path / "p.csv", FIXED_POINTS)
    assert _run("-i", source, "-t", affine, "-o", tmp_path / "moved.csv").exit_code == 0
    assert _run("-i", tmp_path / "moved.csv", "-t", f"[{affine},1]", "-o", tmp_path / "back.csv").exit_code == 0
    moved, back = read_points(tmp_path / "moved.csv").points, read_points(tmp_path / "back.csv").points
    assert np.abs(moved - FIXED_POINTS).max() > 1.0 and np.abs(back - FIXED_POINTS).max() < 1e-9


def test_elastix_point_sets_agree_with_transformix_on_our_elastix_output(tmp_path, registration):
    """transformix -def on the TransformParameters.0.txt that register --out-elastix wrote, and us on the
    same folder: the same moving points."""
    import shutil
    import subprocess

    transformix = shutil.which("transformix")
    if transformix is None:
        pytest.skip("Debian's transformix is not installed")
    points = tmp_path / "points.txt"
    points.write_text("point\n" + f"{len(FIXED_POINTS)}\n"
                      + "".join(" ".join(repr(float(v)) for v in p) + "\n" for p in FIXED_POINTS))
    parameters = registration / "elastix" / "TransformParameters.0.txt"
    subprocess.run([transformix, "-def", str(points), "-out", str(tmp_path), "-tp", str(parameters)],
                   check=True, capture_output=True)
    theirs = np.array([[float(v) for v in line.split("OutputPoint = [")[1].split("]")[0].split()]
                       for line in (tmp_path / "outputpoints.txt").read_text().splitlines() if "OutputPoint" in line])
    result = _run("-i", points, "-t", registration / "elastix", "-o", tmp_path / "ours.txt")
    assert result.exit_code == 0, result.output
    ours = read_points(tmp_path / "ours.txt").points
    assert np.abs(ours - theirs).max() < 1e-3  # transformix prints 6 significant digits
    assert np.abs(ours - FIXED_POINTS).max() > 0.5


@pytest.mark.parametrize("system", ["RAS", "LPS"])
def test_slicer_markups_round_trip_exactly(tmp_path, system):
    from itk_gradicon.spatial.transforms import write_affine_file

    write_affine_file(np.eye(4), tmp_path / "identity.tfm")
    document = {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#",
                "markups": [{"type": "Fiducial", "coordinateSystem": system, "coordinateUnits": "mm",
                             "controlPoints": [{"id": str(i + 1), "label": f"F-{i + 1}", "position": list(p),
                                                "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0]}
                                               for i, p in enumerate(FIXED_POINTS * [1.1, 0.3, 7.7])]}]}
    source = tmp_path / "points.mrk.json"
    source.write_text(json.dumps(document))
    result = _run("-i", source, "-t", tmp_path / "identity.tfm", "-o", tmp_path / "out.mrk.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out.mrk.json").read_text()) == document
    lps = read_points(source).points
    expected = FIXED_POINTS * [1.1, 0.3, 7.7] * ([-1, -1, 1] if system == "RAS" else [1, 1, 1])
    assert np.array_equal(lps, expected)

    fcsv = tmp_path / "points.fcsv"
    header = ["# Markups fiducial file version = 4.11", f"# CoordinateSystem = {system}",
              "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"]
    rows = [f"vtkMRMLMarkupsFiducialNode_{i}," + ",".join(repr(float(v)) for v in p) + f",0,0,0,1,1,1,0,F-{i},,"
            for i, p in enumerate(FIXED_POINTS)]
    fcsv.write_text("\n".join(header + rows) + "\n")
    assert _run("-i", fcsv, "-t", tmp_path / "identity.tfm", "-o", tmp_path / "out.fcsv").exit_code == 0
    assert (tmp_path / "out.fcsv").read_text() == fcsv.read_text()


def test_moving_a_slicer_file_keeps_its_coordinate_system(tmp_path):
    from itk_gradicon.spatial.transforms import write_affine_file

    shift = np.eye(4)
    shift[:3, 3] = [1.0, 2.0, 3.0]  # LPS millimetres
    write_affine_file(shift, tmp_path / "shift.tfm")
    source = tmp_path / "p.mrk.json"
    source.write_text(json.dumps({"markups": [{"coordinateSystem": "RAS", "controlPoints": [{"position": [0.0, 0.0, 0.0]}]}]}))
    assert _run("-i", source, "-t", tmp_path / "shift.tfm", "-o", tmp_path / "o.mrk.json").exit_code == 0
    out = json.loads((tmp_path / "o.mrk.json").read_text())["markups"][0]
    assert out["coordinateSystem"] == "RAS" and out["controlPoints"][0]["position"] == [-1.0, -2.0, 3.0]


def test_index_point_sets_need_their_image(tmp_path):
    import itk

    from conftest import make_image
    from itk_gradicon.spatial.transforms import write_affine_file

    write_affine_file(np.eye(4), tmp_path / "identity.tfm")
    image = make_image(np.zeros((8, 8, 8), np.float32), spacing=(2.0, 2.0, 2.0), origin=(10.0, 0.0, -5.0))
    itk.imwrite(image, str(tmp_path / "ref.nii.gz"))
    (tmp_path / "idx.txt").write_text("index\n1\n1 2 3\n")
    missing = _run("-i", tmp_path / "idx.txt", "-t", tmp_path / "identity.tfm", "-o", tmp_path / "o.txt")
    assert missing.exit_code == 2 and "give the image they belong to with --reference" in missing.output
    done = _run("-i", tmp_path / "idx.txt", "-t", tmp_path / "identity.tfm", "-o", tmp_path / "o.txt",
                "-r", tmp_path / "ref.nii.gz")
    assert done.exit_code == 0, done.output
    assert (tmp_path / "o.txt").read_text() == "point\n1\n12.0 4.0 1.0\n"


@pytest.mark.parametrize("name, text, message", [
    ("a.csv", "a,b,c\n1,2,3\n", "line 1: the header ['a', 'b', 'c'] lacks column x; expected x, y, z (LPS mm)"),
    ("a.csv", "x,y,z,t\n1,2,3,0\n4,five,6,0\n", "line 3: column y is 'five', not a number"),
    ("a.csv", "x,y,z,t\n1,nan,3,0\n", "line 2: column y is nan, not a finite number"),
    ("a.csv", "x,y,t\n1,2,0\n", "holds 2-D points; the transforms are 3-D"),
    ("a.csv", "x,y,z\n1,2\n", "line 2: 2 values, the header names 3 or more"),
    ("a.txt", "point\n3\n1 2 3\n4 5 6\n", "line 2: announces 3 points, the file lists 2"),
    ("a.txt", "points\n1\n1 2 3\n", "line 1: an elastix point set starts with 'point' or 'index'"),
    ("a.mrk.json", '{"markups": [{"coordinateSystem": "IJK", "controlPoints": [{"position": [1, 2, 3]}]}]}',
     "coordinate system 'IJK'; allowed: LPS, RAS"),
    ("a.fcsv", "# CoordinateSystem = 2\n# columns = id,x,y,z\n1,2,3,4\n", "line 1: coordinate system ' 2'"),
    ("a.vtk", "x", "unknown format; allowed endings: .mrk.json, .fcsv, .csv, .txt, .pts"),
])
def test_bad_point_files_are_one_line_errors_and_leave_nothing(tmp_path, name, text, message):
    from itk_gradicon.spatial.transforms import write_affine_file

    write_affine_file(np.eye(4), tmp_path / "identity.tfm")
    (tmp_path / name).write_text(text)
    out = tmp_path / "out" / ("o" + name[1:])
    out.parent.mkdir()
    result = _run("-i", tmp_path / name, "-t", tmp_path / "identity.tfm", "-o", out)
    assert result.exit_code == 2
    assert message in result.output and str(tmp_path / name) in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert list(out.parent.iterdir()) == []


def test_the_output_keeps_the_input_format(tmp_path):
    from itk_gradicon.spatial.transforms import write_affine_file

    write_affine_file(np.eye(4), tmp_path / "identity.tfm")
    source = _ants_csv(tmp_path / "p.csv", FIXED_POINTS)
    result = _run("-i", source, "-t", tmp_path / "identity.tfm", "-o", tmp_path / "p.fcsv")
    assert result.exit_code == 2 and "must be written in the input's format (csv: .csv)" in result.output


def test_write_points_is_all_or_nothing(tmp_path):
    source = _ants_csv(tmp_path / "p.csv", FIXED_POINTS)
    point_set = read_points(source)
    with pytest.raises(ValueError):
        write_points(point_set, FIXED_POINTS[:2], tmp_path / "q.csv")
    assert not (tmp_path / "q.csv").exists()
