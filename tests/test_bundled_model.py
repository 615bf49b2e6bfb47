"""The bundled model: shipped in the package, listed, described by its card, and its pre-alignment applied.

Tests that need the real bundled file skip with a reason where the package lacks it (a source tree
before the first model was committed); the store's behaviour is tested with a stand-in file.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from itk_gradicon.cli import main
from itk_gradicon.models import BUNDLED, BundledModel, list_models, load_model, save_model_file

NAME = "gradicon-synthbrain-96"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def stand_in(tmp_path, monkeypatch, tiny_model_file):
    """A bundled-model entry whose file is a tiny model in a temporary 'weights' folder."""
    import shutil

    folder = tmp_path / "weights"
    folder.mkdir()
    shutil.copyfile(tiny_model_file, folder / "standin.pt")
    (folder / "standin.json").write_text(json.dumps({"figures": {"oasis_mean_dice": 0.5}}))
    entry = BundledModel("standin", "a stand-in")
    monkeypatch.setattr(BundledModel, "path", property(lambda self: folder / f"{self.name}.pt"))
    monkeypatch.setitem(BUNDLED, "standin", entry)
    return entry


def test_bundled_models_load_by_name_and_are_listed(stand_in):
    model = load_model("standin")
    assert model.name == "standin" and model.source == stand_in.path
    rows = {row["name"]: row for row in list_models()}
    assert rows["standin"]["kind"] == "bundled" and rows["standin"]["present"]
    assert rows["standin"]["url"] is None and rows["standin"]["size"] == stand_in.path.stat().st_size
    assert rows["unigradicon"]["kind"] == "published"
    listing = CliRunner().invoke(main, ["models", "list"])
    assert listing.exit_code == 0
    line = next(line for line in listing.output.splitlines() if line.startswith("standin"))
    assert "bundled" in line and "sha256" in line


def test_models_info_prints_the_card(stand_in):
    result = CliRunner().invoke(main, ["models", "info", "standin"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["card"] == {"figures": {"oasis_mean_dice": 0.5}}
    assert record["prealignment"] == "none" and record["architecture"]["input_shape"] == [24, 24, 24]


def test_a_missing_bundled_file_is_a_clear_error(stand_in, pair_files):
    stand_in.path.unlink()
    fixed, moving = pair_files
    result = CliRunner().invoke(main, ["register", "--model", "standin", "--fixed", str(fixed), "--moving",
                                       str(moving), "--out-transform", str(fixed.parent / "t.h5")])
    assert result.exit_code != 0
    assert "bundled model 'standin' is missing from this installation" in result.output
    assert "Traceback" not in result.output


def test_the_package_declares_its_weights_as_package_data():
    """pip install . copies itk_gradicon/weights/*.pt and *.json (setup.cfg's package_data)."""
    import configparser

    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    data = config["options.package_data"]["itk_gradicon"]
    assert "weights/*.pt" in data and "weights/*.json" in data


@pytest.mark.skipif(not BUNDLED[NAME].path.is_file(), reason=f"{NAME} is not in this source tree yet")
def test_the_bundled_model_file_is_small_safe_and_described():
    entry = BUNDLED[NAME]
    assert entry.path.stat().st_size <= 30 * 1024 * 1024
    model = load_model(NAME)  # weights_only loading, strict
    assert model.preprocessing["layout"] == "canonical" and model.preprocessing["prealignment"] == "affine"
    assert model.architecture.normalization == "instance"
    card = entry.card()
    for key in ("architecture", "data", "held_out", "steps", "preprocessing", "prealignment", "figures"):
        assert key in card, key


# ---- the pre-alignment a model asks for ------------------------------------------------------------

@pytest.fixture
def pair_files(tmp_path):
    from conftest import blob_volume, make_image

    import itk

    rng = np.random.default_rng(3)
    fixed = make_image(blob_volume((24, 24, 24), rng, blobs=6) * 100, spacing=(1.0, 1.0, 1.0))
    moving = make_image(blob_volume((24, 24, 24), rng, blobs=6) * 100, spacing=(1.0, 1.0, 1.0))
    itk.imwrite(fixed, str(tmp_path / "f.nii.gz"))
    itk.imwrite(moving, str(tmp_path / "m.nii.gz"))
    return tmp_path / "f.nii.gz", tmp_path / "m.nii.gz"


def _prealigned_model_file(tmp_path, tiny_model_file, prealignment):
    from itk_gradicon.models import load_model as load

    model = load(str(tiny_model_file))
    return save_model_file(tmp_path / f"model_{prealignment}.pt", model.network, model.architecture,
                           name=f"model_{prealignment}", preprocessing={"prealignment": prealignment})


@pytest.mark.parametrize("prealignment, choice, expected_calls", [
    ("affine", "auto", 1), ("affine", "none", 0), ("none", "auto", 0), ("none", "elastix", 1)])
def test_affine_auto_follows_the_model(tmp_path, tiny_model_file, pair_files, monkeypatch, prealignment, choice,
                                       expected_calls):
    from itk_gradicon.pipeline import affine as affine_module

    calls = []

    def fake_prealign(fixed, moving, *masks, **kwargs):
        calls.append(kwargs)
        return affine_module.Prealignment(np.eye(4), kwargs["transform"], "header", 1.0)

    monkeypatch.setattr(affine_module, "prealign", fake_prealign)
    model = _prealigned_model_file(tmp_path, tiny_model_file, prealignment)
    fixed, moving = pair_files
    result = CliRunner().invoke(main, ["register", "--model", str(model), "--fixed", str(fixed), "--moving",
                                       str(moving), "--out-transform", str(tmp_path / "t.h5"), "--affine", choice,
                                       "--fixed-modality", "mri", "--moving-modality", "mri"])
    assert result.exit_code == 0, result.output
    assert len(calls) == expected_calls
    if prealignment == "affine" and choice == "auto":
        assert "affine pre-alignment: elastix" in result.output and "--affine none turns it off" in result.output


def test_an_initial_transform_replaces_the_models_prealignment(tmp_path, tiny_model_file, pair_files, monkeypatch):
    from itk_gradicon.pipeline import affine as affine_module
    from itk_gradicon.spatial.transforms import write_affine_file

    monkeypatch.setattr(affine_module, "prealign", lambda *a, **k: pytest.fail("elastix must not run"))
    model = _prealigned_model_file(tmp_path, tiny_model_file, "affine")
    fixed, moving = pair_files
    initial = tmp_path / "init.tfm"
    write_affine_file(np.eye(4), initial)
    result = CliRunner().invoke(main, ["register", "--model", str(model), "--fixed", str(fixed), "--moving",
                                       str(moving), "--out-transform", str(tmp_path / "t.h5"),
                                       "--initial-transform", str(initial)])
    assert result.exit_code == 0, result.output


def test_register_in_python_follows_the_model_too(tiny_model_file, monkeypatch):
    import itk

    from conftest import blob_volume, make_image
    from itk_gradicon.pipeline import affine as affine_module
    from itk_gradicon.registration import register

    calls = []

    def fake_prealign(fixed, moving, *masks, log, **kwargs):
        calls.append(1)
        found = affine_module.Prealignment(np.eye(4), kwargs["transform"], "header", 1.0)
        log(found.describe())
        return found

    monkeypatch.setattr(affine_module, "prealign", fake_prealign)
    model = load_model(str(tiny_model_file))
    expecting = replace(model, preprocessing={"prealignment": "affine"})
    rng = np.random.default_rng(4)
    fixed = make_image(blob_volume((20, 20, 20), rng) * 100)
    moving = make_image(blob_volume((20, 20, 20), rng) * 100)
    result = register(fixed, moving, model=expecting, fixed_modality="mri", moving_modality="mri",
                      compute_inverse=False)
    assert calls == [1] and any(m.startswith("affine pre-alignment (elastix") for m in result.messages)
    assert isinstance(result.forward_transform, itk.DisplacementFieldTransform[itk.D, 3])
    register(fixed, moving, model=expecting, affine="none", fixed_modality="mri", moving_modality="mri",
             compute_inverse=False)
    register(fixed, moving, model=model, fixed_modality="mri", moving_modality="mri", compute_inverse=False)
    assert calls == [1]
    with pytest.raises(Exception, match="unknown affine 'similarity'; allowed: auto, none, affine, rigid, elastix"):
        register(fixed, moving, model=model, affine="similarity")
