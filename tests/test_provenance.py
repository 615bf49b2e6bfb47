"""gradicon register --out-json: the record validates against the committed schema, says what ran, and two runs
with one --seed give the same outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from itk_gradicon.cli import main
from itk_gradicon.models import Refinement, load_model, save_model_file
from itk_gradicon.evaluation.provenance import SCHEMA_PATH, load_schema


@pytest.fixture
def recommending_model(tmp_path, tiny_model_file) -> Path:
    model = load_model(str(tiny_model_file))
    return save_model_file(tmp_path / "recommends.pt", model.network, model.architecture, name="recommends",
                           refinement=Refinement(iterations=4, method="field", coarse_fraction=0.5))


@pytest.fixture
def pair(tmp_path):
    import itk

    from conftest import blob_volume, make_image

    rng = np.random.default_rng(21)
    for name in ("f", "m"):
        itk.imwrite(make_image(blob_volume((24, 24, 24), rng) * 100), str(tmp_path / f"{name}.nii.gz"))
    return tmp_path / "f.nii.gz", tmp_path / "m.nii.gz"


def _register(model: Path, pair, out: Path, *extra: str):
    out.mkdir()
    from itk_gradicon.spatial.transforms import write_affine_file

    shift = np.eye(4)
    shift[:3, 3] = [0.5, -0.25, 0.0]
    write_affine_file(shift, out / "init.tfm")
    result = CliRunner().invoke(main, [
        "register", "--model", str(model), "--fixed", str(pair[0]), "--moving", str(pair[1]), "--seed", "7",
        "--initial-transform", str(out / "init.tfm"), "--out-transform", str(out / "fwd.h5"),
        "--out-inverse-transform", str(out / "inv.nii.gz"), "--out-warped", str(out / "warped.nii.gz"),
        "--out-ants-prefix", str(out / "a_"), "--out-elastix", str(out / "elastix"), "--out-json",
        str(out / "record.json"), "--threads", "2", *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "record.json").read_text())


def test_the_record_validates_and_says_what_ran(tmp_path, recommending_model, pair):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (test extras) validates the record")
    record = _register(recommending_model, pair, tmp_path / "a")
    jsonschema.validate(record, load_schema())
    assert SCHEMA_PATH.is_file() and record["format"] == "itk_gradicon.register-record"
    assert set(record["software"]) >= {"itk_gradicon", "torch", "itk", "SimpleITK", "itk-elastix"}
    assert record["model"]["sha256"] == load_model(str(recommending_model)).sha256
    options = record["options"]
    assert options["io_iterations"] == 4 and options["io_smoothness"] == 0.15  # defaults, as resolved
    assert options["io_coarse_steps"] == 2 and options["seed"] == 7 and options["threads"]["torch"] == 2
    assert record["prealignment"]["matrix"][0][3] == 0.5 and "init.tfm" in record["prealignment"]["source"]
    io = record["instance_optimisation"]
    assert io["steps_run"] == 4 and [level["steps_run"] for level in io["levels"]] == [2, 2]
    assert record["jacobian"]["percent_negative"] >= 0 and record["inputs"]["fixed"]["sha256"]
    assert {"read", "network", "instance optimisation"} <= set(record["timings"])
    elastix = {"matrix": record["prealignment"]["matrix"], "source": "elastix", "transform": "affine",
               "start": "header", "similarity": 1.2, "rejected": [], "roles_swapped": True}
    jsonschema.validate({**record, "prealignment": elastix}, load_schema())  # what an elastix run records
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**record, "prealignment": {**elastix, "roles_swapped": "yes"}}, load_schema())
    turned = {**elastix, "start": "rotated", "rotation": "180 degrees about S"}
    jsonschema.validate({**record, "prealignment": turned}, load_schema())  # a start found by the rotation search
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**record, "prealignment": {**turned, "start": "turned"}}, load_schema())


def test_two_runs_with_one_seed_give_the_same_outputs(tmp_path, recommending_model, pair):
    """Every output byte-identical, but for the .h5, where HDF5 stamps its objects with the time of writing:
    its transform is equal value for value. The records are equal but for the stage times."""
    import SimpleITK as sitk

    first = _register(recommending_model, pair, tmp_path / "one")
    second = _register(recommending_model, pair, tmp_path / "two")
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert len(files) >= 8
    for name in files:
        if name.suffix in (".h5", ".json"):
            continue
        one, two = ((tmp_path / run / name).read_bytes() for run in ("one", "two"))
        if name.suffix == ".txt":  # transformix's parameter file names its field file by absolute path
            two = two.replace(str(tmp_path / "two").encode(), str(tmp_path / "one").encode())
        assert one == two, name
    fields = []
    for run in ("one", "two"):
        transform = sitk.DisplacementFieldTransform(sitk.ReadTransform(str(tmp_path / run / "fwd.h5")))
        fields.append(sitk.GetArrayFromImage(transform.GetDisplacementField()))
    assert np.array_equal(*fields)
    first.pop("timings")
    second.pop("timings")
    for record, run in ((first, "one"), (second, "two")):  # the records name their own output folders
        assert all(str(tmp_path / run) in v["path"] for v in record["inputs"].values() if v and "init" in v["path"])
        record["inputs"].pop("initial_transform")
        record["prealignment"].pop("source")
    assert first == second


def test_out_json_needs_a_json_file(tmp_path, recommending_model, pair):
    result = CliRunner().invoke(main, ["register", "--model", str(recommending_model), "--fixed", str(pair[0]),
                                       "--moving", str(pair[1]), "--out-json", str(tmp_path / "record.txt")])
    assert result.exit_code == 2 and "--out-json" in result.output and ".json" in result.output


def test_register_batch_writes_a_record_per_pair(tmp_path, recommending_model, pair):
    (tmp_path / "pairs.csv").write_text(f"fixed,moving,out_transform,out_json\n{pair[0]},{pair[1]},t.nii.gz,r.json\n")
    result = CliRunner().invoke(main, ["register-batch", "--pairs", str(tmp_path / "pairs.csv"), "--model",
                                       str(recommending_model), "--seed", "1"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["inputs"]["moving"]["path"] == str(pair[1]) and record["instance_optimisation"]["steps_run"] == 4


def test_the_record_names_the_similarity_the_pair_chose(tmp_path, tiny_model_file):
    """Unnamed modalities whose intensities show two contrasts: the record gives the multimodal similarity
    that ran, not the one-contrast default."""
    import itk

    from conftest import blob_volume, make_image

    model = load_model(str(tiny_model_file))
    path = save_model_file(tmp_path / "m.pt", model.network, model.architecture, name="m",
                           refinement=Refinement(iterations=1, method="field", multimodal_similarity="lncc2"))
    volume = blob_volume((24, 24, 24), np.random.default_rng(10))
    itk.imwrite(make_image(volume * 100), str(tmp_path / "f.nii.gz"))
    itk.imwrite(make_image(np.where(volume > 0.2, 1.2 - volume, 0.0).astype(np.float32) * 100), str(tmp_path / "m.nii.gz"))
    result = CliRunner().invoke(main, ["register", "--model", str(path), "--fixed", str(tmp_path / "f.nii.gz"),
                                       "--moving", str(tmp_path / "m.nii.gz"), "--affine", "none",
                                       "--out-json", str(tmp_path / "r.json")])
    assert result.exit_code == 0 and "treated as two contrasts" in result.output, result.output
    assert json.loads((tmp_path / "r.json").read_text())["options"]["io_similarity"] == "lncc2"
