"""`gradicon train` configuration: the example recipes validate, bad configurations fail early.

Every bad configuration must fail before training starts (nothing is written), with a one-line
message that names the key or file, a non-zero exit code and no traceback.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from test_training_support import (base_config, make_subjects, one_torch_thread,  # noqa: F401 (autouse)
                                   write_config, write_csv, write_image)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXAMPLE_FILES = ("train_unigradicon.yaml", "train_multigradicon.yaml", "train_m2m_reg.yaml", "finetune.yaml")


# ------------------------------------------------------------------------------------------------
# the examples
# ------------------------------------------------------------------------------------------------

def _listed_paths(list_file: Path):
    """Image, mask and segmentation paths named in a list or CSV file (as written there)."""
    if list_file.suffix == ".csv":
        with open(list_file, newline="") as fh:
            for row in csv.DictReader(fh):
                for key in ("image", "mask", "segmentation"):
                    if row.get(key):
                        yield row[key]
    else:
        for line in list_file.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                yield line.strip()


def materialise_example(name: str, tmp_path: Path) -> Path:
    """Copy an example configuration and its lists, and write a small image at every path it names."""
    folder = tmp_path / "examples"
    folder.mkdir()
    shutil.copy(EXAMPLES / name, folder / name)
    shutil.copytree(EXAMPLES / "lists", folder / "lists")
    raw = yaml.safe_load((folder / name).read_text())
    rng = np.random.default_rng(0)
    volume = lambda: rng.random((8, 9, 10)).astype(np.float32) * 100 - 50  # noqa: E731
    for dataset in raw["datasets"]:
        spec = dataset["images"]
        if "*" in spec:
            for i in range(3):
                write_image(volume(), folder / spec.replace("*", f"case{i}"))
            continue
        base = folder / dataset["root"] if dataset.get("root") else (folder / spec).parent
        for listed in _listed_paths(folder / spec):
            target = base / listed
            if "lungs" in listed or "mask" in listed:
                write_image((volume() > 0).astype(np.uint8), target)
            else:
                write_image(volume(), target)
    return folder / name


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_example_configuration_parses_and_validates(name, tmp_path, tiny_model_file):
    from itk_gradicon.training import load_config, prepare_run

    path = materialise_example(name, tmp_path)
    model = str(tiny_model_file) if name == "finetune.yaml" else None  # no download in tests
    config = load_config(path, model=model)
    run = prepare_run(config, tmp_path / "out", device=torch.device("cpu"), check_output=False)
    shares = {m.name: float(s) for m, s in zip(run.composite.members, run.composite.shares)}
    if name == "train_unigradicon.yaml":
        assert [s.name for s in run.stages] == ["stage1", "stage2"]
        assert shares == pytest.approx({"copdgene": 0.25, "oai": 0.25, "hcp": 0.25, "l2r_abdomen": 0.25})
        assert run.composite.pairs_per_epoch == 4000
        assert run.stages[0].steps == 800 * 4000 // 4 and run.stages[1].steps == 200 * 4000 // 4
        lung = run.composite.members[0]
        assert lung.mask_mode == "input" and lung.config.pairing == "intra"
        assert {e.subject for e in run.composite.members[1].entries} == {"9001", "9002", "9003"}
    elif name == "train_multigradicon.yaml":
        # two brain data sets with different modality sets, abdomen MR/CT, lung CT: four combinations
        assert shares == pytest.approx({"brats": 0.25, "hcp": 0.25, "abdomen_mrct": 0.25, "copdgene": 0.25})
        assert config.objective.loss_randomisation == "R" and config.objective.similarity == "lncc2"
        brats = run.composite.members[0]
        assert len(brats.views) == 3 and all(len(v) == 4 for v in brats.views)
    elif name == "train_m2m_reg.yaml":
        assert config.objective.kind == "m2m" and config.objective.regularizer_weight == 0.5
        assert [s.name for s in run.stages] == ["stage1"]
        assert run.composite.members[0].modalities == ("pet", "t1w")
    else:
        assert [s.name for s in run.stages] == ["finetune"] and run.stages[0].steps == 2000
        assert run.parent is not None and run.architecture == run.parent.architecture
        assert len(run.composite.members[0].entries) == 3


def test_check_option_validates_without_training(tmp_path, tiny_model_file):
    from itk_gradicon.cli import main

    path = materialise_example("finetune.yaml", tmp_path)
    result = CliRunner().invoke(main, ["train", "--config", str(path), "--model", str(tiny_model_file), "--check"])
    assert result.exit_code == 0, result.output
    assert "my_scans: 3 images" in result.output and "finetune: 2000 steps" in result.output
    assert not (tmp_path / "examples" / "cache").exists()


# ------------------------------------------------------------------------------------------------
# bad configurations
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cfgdata")
    rows = make_subjects(folder, n=3, shape=(20, 20), modalities=("t1w", "t2w"), seed=2)
    write_csv(rows, folder / "images.csv")
    write_csv([r for r in rows if r["modality"] == "t1w"], folder / "t1w.csv")
    return folder


def _with(config, path, value):
    """``config`` with the value at a dotted path (``datasets.0.pairing``) replaced (``...`` deletes)."""
    keys = path.split(".")
    node = config
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is ...:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return config


def _sets(changes):
    """A mutation that applies every ``{dotted path: value}`` of ``changes``."""
    def mutate(config):
        for path, value in changes.items():
            _with(config, path, value)
    return mutate


def _prepare(data_folder, tmp_path, mutate, output=None):
    from itk_gradicon.training import load_config, prepare_run

    config = base_config("images.csv")
    mutate(config)
    path = write_config(data_folder / f"run_{tmp_path.name}.yaml", config)
    return prepare_run(load_config(path), output or tmp_path / "out", device=torch.device("cpu"))


BAD = [  # (label, mutation, expected part of the message)
    ("unknown top-level key", _sets({"batchsize": 2}), "batchsize: unknown key (did you mean 'batch_size'?)"),
    ("unknown nested key", _sets({"optimizer.betass": [0.9, 0.99]}),
     "optimizer.betass: unknown key (did you mean 'betas'?)"),
    ("unknown dataset key", _sets({"datasets.0.pairng": "intra"}),
     "datasets[0].pairng: unknown key (did you mean 'pairing'?)"),
    ("wrong type", _sets({"batch_size": "four"}), "batch_size: expected a whole number, got 'four'"),
    ("out of range", _sets({"optimizer.lr": -1}), "optimizer.lr: -1.0 must be > 0"),
    ("unknown choice", _sets({"objective.kind": "m2n"}), "objective.kind: unknown value 'm2n' (did you mean 'm2m'?)"),
    ("unknown pairing", _sets({"datasets.0.pairing": "paired"}), "allowed: inter, intra"),
    ("weight 0 everywhere", _sets({"datasets.0.weight": 0}), "every data set has weight 0"),
    ("no datasets", _sets({"datasets": []}), "datasets: give at least one data set"),
    ("model and architecture", _sets({"model": "unigradicon"}), "remove 'architecture' or 'model'"),
    ("neither model nor architecture", _sets({"architecture": ...}), "give 'model'"),
    ("missing stage2", _sets({"schedule.stage2": ...}), "schedule.stage2: architecture.refinement_steps is 1"),
    ("steps and epochs", _sets({"schedule.stage1": {"steps": 2, "epochs": 1}}), "schedule.stage1: give exactly one"),
    ("bad architecture", _sets({"architecture.input_shape": [8, 8]}), "architecture: invalid architecture"),
    ("missing list", _sets({"datasets.0.images": "nothing.csv"}), "datasets[0].images: '"),
    ("empty glob", _sets({"datasets.0.images": "nope/*.mha"}), "matches no file, so the data set is empty"),
    ("unknown modality", _sets({"datasets.0.images": "images.txt", "datasets.0.modality": "T1w"}),
     "unknown modality 'T1w' (did you mean 't1w'?)"),
    ("intra with one image per subject", _sets({"datasets.0.images": "t1w.csv", "datasets.0.pairing": "intra"}),
     "pairing 'intra' needs a subject with two or more images"),
    ("M2M with one modality", _sets({"datasets.0.images": "t1w.csv", "objective.kind": "m2m"}),
     "an M2M-Reg data set needs exactly two modalities"),
    ("Dice without segmentations",
     _sets({"datasets.0.images": "images.txt", "datasets.0.modality": "t1w", "objective.dice_weight": 1.0}),
     "objective.dice_weight: a Dice term needs segmentations"),
    ("randomisation with m2m", _sets({"objective": {"kind": "m2m", "loss_randomisation": "R"}}),
     "objective.loss_randomisation: 'R' is for kind: gradicon"),
    ("bad quantiles", _sets({"preprocessing": {"quantile_range": [0.5, 1.5]}}),
     "preprocessing.quantile_range: [0.5, 1.5] must be"),
    ("bad subject pattern", _sets({"datasets.0.subject_pattern": "sub-\\d+"}), "needs a group in parentheses"),
]


@pytest.fixture(scope="module")
def list_files(data_folder):
    (data_folder / "images.txt").write_text("# t1w images\n" + "\n".join(
        f"sub{s:02d}_ses0_t1w.mha" for s in range(3)) + "\n")
    (data_folder / "missing.txt").write_text("sub00_ses0_t1w.mha\nsub99_ses0_t1w.mha\n")
    (data_folder / "bad_columns.csv").write_text("image,subjet\nsub00_ses0_t1w.mha,a\n")
    write_image(np.zeros((5, 5, 5), np.float32) + np.arange(5), data_folder / "volume3d.mha")
    (data_folder / "mixed_dims.txt").write_text("sub00_ses0_t1w.mha\nvolume3d.mha\n")
    write_image(np.ones((7, 7), np.uint8), data_folder / "small_mask.mha")
    (data_folder / "bad_mask.csv").write_text(
        "image,mask\nsub00_ses0_t1w.mha,small_mask.mha\nsub01_ses0_t1w.mha,small_mask.mha\n")
    return data_folder


BAD_FILES = [
    ("missing image", "missing.txt", "1 listed file(s) do not exist: image '"),
    ("unknown CSV column", "bad_columns.csv", "unknown column 'subjet' (did you mean 'subject'?)"),
    ("wrong dimension", "mixed_dims.txt", "is 3-D but the network is 2-D"),
    ("mask off its image's grid", "bad_mask.csv", "is not on its image's grid"),
]


@pytest.mark.parametrize("label, mutate, expected", BAD, ids=[b[0] for b in BAD])
def test_bad_configuration_fails_before_training_naming_the_problem(label, mutate, expected, data_folder, list_files,
                                                                    tmp_path):
    from itk_gradicon.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        _prepare(data_folder, tmp_path, mutate)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("label, list_name, expected", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_image_lists_fail_naming_the_file(label, list_name, expected, list_files, tmp_path):
    from itk_gradicon.errors import ConfigError

    def mutate(c):
        _with(c, "datasets.0.images", list_name)
        _with(c, "datasets.0.modality", "t1w")

    with pytest.raises(ConfigError) as info:
        _prepare(list_files, tmp_path, mutate)
    assert expected in str(info.value)
    assert str(info.value).startswith("datasets[0]")


def test_yaml_errors_and_missing_config_are_reported(tmp_path):
    from itk_gradicon.errors import ConfigError
    from itk_gradicon.training import load_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets:\n  - name: a\n    images: [unclosed\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML at line \d+"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml")


def test_numbers_written_without_a_dot_are_accepted(tmp_path):
    """PyYAML reads ``5e-5`` as text; a learning rate written that way is still a number."""
    from itk_gradicon.training.config import config_from_mapping

    raw = base_config()
    raw["optimizer"] = {"lr": "5e-5"}
    cfg = config_from_mapping(yaml.safe_load(yaml.safe_dump(raw)), base_dir=tmp_path)
    assert cfg.optimizer.lr == 5e-5
    assert cfg.objective.regularizer_weight == 1.5
    raw["objective"] = {"kind": "m2m"}
    assert config_from_mapping(raw, base_dir=tmp_path).objective.regularizer_weight == 0.5


@pytest.mark.parametrize("args, mutate, expected", [
    ([], lambda c: _with(c, "datasets.0.pairng", "intra"), "did you mean 'pairing'?"),
    ([], _sets({"datasets.0.images": "missing.txt", "datasets.0.modality": "t1w"}), "do not exist"),
    ([], lambda c: _with(c, "datasets.0.weight", 0), "every data set has weight 0"),
    (["--resume"], lambda c: None, "holds no checkpoint"),
    (["--model", "no_such_model"], _sets({"architecture": ..., "schedule": {"finetune": {"steps": 1}}}),
     "unknown model 'no_such_model'"),
    (["--device", "cuda:7"], lambda c: None, "cannot use --device"),
], ids=["unknown key", "missing file", "zero weights", "resume nothing", "unknown model", "bad device"])
def test_cli_reports_bad_configurations_in_one_line_with_exit_code_2(args, mutate, expected, list_files, tmp_path):
    from itk_gradicon.cli import main

    config = base_config("images.csv")
    mutate(config)
    path = write_config(list_files / f"cli_{tmp_path.name}.yaml", config)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--config", str(path), "--output", str(out), *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and expected in errors[0], result.output
    assert not out.exists()


def test_output_folder_with_a_run_needs_resume(list_files, tmp_path):
    from itk_gradicon.errors import InputError

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step_000000002.pt").write_bytes(b"x")
    with pytest.raises(InputError, match="already holds a training run; pass --resume"):
        _prepare(list_files, tmp_path, lambda c: None, output=out)


def test_a_model_file_in_the_yaml_is_relative_to_the_yaml_folder(tmp_path, tiny_model_file, monkeypatch):
    from itk_gradicon.training import load_config, prepare_run

    path = materialise_example("finetune.yaml", tmp_path)
    shutil.copy(tiny_model_file, tmp_path / "parent.pt")
    raw = yaml.safe_load(path.read_text())
    raw["model"] = "../parent.pt"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path / "examples" / "lists")  # not the YAML file's folder
    run = prepare_run(load_config(path), tmp_path / "out", device=torch.device("cpu"), check_output=False)
    assert run.parent.source.samefile(tmp_path / "parent.pt")
    # --model on the command line is relative to the working folder
    monkeypatch.chdir(tmp_path)
    config = load_config(path, model="parent.pt")
    assert config.model == str(tmp_path / "parent.pt")
