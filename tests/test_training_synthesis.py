"""Synthetic training pairs from label maps, coarse-to-fine training, instance normalisation, layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from test_training_support import one_torch_thread, write_config  # noqa: F401 (autouse)

BRAIN, SKULL = (2, 3, 4, 41), 510


def head_labels(shape, rng: np.random.Generator, *, shift=(0, 0, 0)) -> np.ndarray:
    """A toy head: an ellipsoidal 'brain' of four labels (split into quadrants) inside a 'skull' shell."""
    d = len(shape)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    centre = [n / 2 + s + rng.normal(0, 0.5) for n, s in zip(shape, shift)]
    radii = [n * 0.3 * rng.uniform(0.9, 1.1) for n in shape]
    r = np.sqrt(sum(((g - c) / a) ** 2 for g, c, a in zip(grids, centre, radii)))
    labels = np.zeros(shape, np.int32)
    labels[r < 1.35] = SKULL
    brain = r < 1.0
    quadrant = (grids[0] > centre[0]).astype(int) * 2 + (grids[d - 1] > centre[d - 1]).astype(int)
    labels[brain] = np.array(BRAIN)[quadrant[brain]]
    return labels


def write_label_map(array: np.ndarray, path: Path, *, direction=None) -> Path:
    import itk

    image = itk.image_from_array(np.ascontiguousarray(array))
    if direction is not None:
        image.SetDirection(itk.matrix_from_array(np.asarray(direction, np.float64)))
    path.parent.mkdir(parents=True, exist_ok=True)
    itk.imwrite(image, str(path))
    return path


@pytest.fixture(scope="module")
def label_maps(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("label_maps")
    rng = np.random.default_rng(5)
    for i in range(3):
        write_label_map(head_labels((40, 44, 36), rng, shift=(i - 1, 0, 1 - i)), folder / f"head3d_{i}.nii.gz")
        write_label_map(head_labels((56, 48), rng, shift=(i - 1, 0)), folder / f"head2d_{i}.nii.gz")
    return folder


def synthetic_config(dimension: int, **synthesis) -> dict:
    size = 32 if dimension == 2 else 24
    return {
        "name": "synthetic-test",
        "architecture": {"dimension": dimension, "input_shape": [size] * dimension, "levels": 2,
                         "refinement_steps": 0, "down_channels": [4, 8, 8], "up_channels": [4, 8, 8],
                         "normalization": "instance"},
        "preprocessing": {"layout": "canonical", "prealignment": "affine"},
        "datasets": [{"name": "heads", "kind": "synthetic", "images": f"head{dimension}d_*.nii.gz",
                      "region": "brain", "pairing": "inter",
                      "synthesis": {"brain_labels": [1, 99], **synthesis}}],
        "sampling": {"mode": "per_dataset", "pairs_per_dataset": 16},
        "augmentation": {"flips": False, "affine_std": 0.0},
        "objective": {"kind": "gradicon", "similarity": "lncc", "dice_weight": 1.0},
        "schedule": {"coarse": [{"steps": 3}], "stage1": {"steps": 2}},
        "optimizer": {"lr": 1.0e-3},
        "batch_size": 1,
        "seed": 4,
        "checkpoint": {"every": 2, "keep": 10},
        "loader": {"workers": 0},
        "log_every": 1,
    }


def _dataset(label_maps: Path, dimension: int, shape=None, **synthesis):
    from itk_gradicon.training import load_config, prepare_run
    from itk_gradicon.training.data import PairDataset, VolumeLoader

    path = write_config(label_maps / f"synthetic_{dimension}.yaml", synthetic_config(dimension, **synthesis))
    run = prepare_run(load_config(path), label_maps / "unused", device=torch.device("cpu"), check_output=False)
    cfg = run.config
    shape = shape or run.architecture.input_shape
    return run, PairDataset(run.composite, shape, cfg.augmentation, VolumeLoader(dimension, None, 8),
                            layout=run.preprocessing["layout"])


# ------------------------------------------------------------------------------------------------
# label maps: checks
# ------------------------------------------------------------------------------------------------

def _train_check(folder: Path, config: dict):
    from itk_gradicon.cli import main

    path = write_config(folder / "check.yaml", config)
    return CliRunner().invoke(main, ["train", "--config", str(path), "--output", str(folder / "out"), "--check"])


@pytest.mark.parametrize("case, expected", [
    ("missing", "do not exist"),
    ("float", "not a label map: it holds non-integer values such as 2.5"),
    ("few", "holds 1 label(s) besides 0 (7); a synthetic data set needs label maps with at least 2"),
    ("negative", "holds negative values"),
    ("dimension", "2-D"),
    ("no_brain", "has no label in synthesis.brain_labels [1, 99]"),
])
def test_train_check_refuses_bad_label_maps_in_one_line(tmp_path, case, expected):
    rng = np.random.default_rng(0)
    good = head_labels((20, 22, 18), rng)
    write_label_map(good, tmp_path / "a.nii.gz")
    bad = tmp_path / "b.nii.gz"
    if case == "float":
        write_label_map(good.astype(np.float32) + 0.5 * (good == 2), bad)
    elif case == "few":
        write_label_map(7 * (good > 0).astype(np.int16), bad)
    elif case == "negative":
        write_label_map(good - 5, bad)
    elif case == "dimension":
        write_label_map(good[10], bad)
    elif case == "no_brain":
        write_label_map(np.where(good > 0, good + 200, 0).astype(np.int32), bad)
    config = synthetic_config(3)
    config["datasets"][0]["images"] = "list.txt"
    (tmp_path / "list.txt").write_text("a.nii.gz\nb.nii.gz\n")
    result = _train_check(tmp_path, config)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert expected in lines[0]
    assert "b.nii.gz" in lines[0]
    assert not (tmp_path / "out").exists()


def test_synthetic_data_sets_train_gradicon_only(label_maps, tmp_path):
    config = synthetic_config(3)
    config["objective"] = {"kind": "m2m"}
    result = _train_check(label_maps, config)
    assert result.exit_code == 2 and "synthetic data sets train objective kind: gradicon" in result.output


def test_synthetic_options_are_checked(tmp_path):
    config = synthetic_config(3, margin=[0.3, 0.1])
    result = _train_check(tmp_path, config)
    assert result.exit_code == 2 and "synthesis.margin: [0.3, 0.1] must be [low, high]" in result.output
    config = synthetic_config(3)
    config["datasets"][0]["modality"] = "t1w"
    result = _train_check(tmp_path, config)
    assert result.exit_code == 2 and "modality: not used by a synthetic data set" in result.output


def test_the_config_a_run_writes_loads_back(tmp_path):
    # `train --resume` reads the config.yaml the run wrote, every key spelled out with its value; a synthetic
    # data set's unused keys are there at their defaults (null, input) and are not a request.
    import yaml

    from itk_gradicon.training.config import config_from_mapping

    config = config_from_mapping(synthetic_config(3), base_dir=tmp_path)
    written = yaml.safe_load(yaml.safe_dump(config.to_dict(), sort_keys=False))
    assert written["datasets"][0]["ct_window"] is None and written["datasets"][0]["mask_mode"] == "input"
    assert config_from_mapping(written, base_dir=tmp_path).to_dict() == config.to_dict()


def test_null_preprocessing_keys_inherit_the_parent_models(tmp_path):
    # The written config.yaml spells the preprocessing keys out as null; resuming a finetune with it must
    # keep the parent model's quantiles and window, as the first start did.
    from types import SimpleNamespace

    from itk_gradicon.training.config import config_from_mapping
    from itk_gradicon.training.trainer import resolve_preprocessing

    parent = SimpleNamespace(preprocessing={"ct_window": (-200.0, 300.0), "quantile_range": (0.01, 0.99),
                                            "layout": "canonical", "prealignment": "affine"})
    raw = synthetic_config(3)
    absent = resolve_preprocessing(config_from_mapping(raw, base_dir=tmp_path), parent)
    raw["preprocessing"] = {"ct_window": None, "quantile_range": None, "layout": None, "prealignment": None}
    assert resolve_preprocessing(config_from_mapping(raw, base_dir=tmp_path), parent) == absent
    assert tuple(absent["quantile_range"]) == (0.01, 0.99) and tuple(absent["ct_window"]) == (-200.0, 300.0)
    raw["preprocessing"] = {"quantile_range": [0.0, 0.95]}
    assert tuple(resolve_preprocessing(config_from_mapping(raw, base_dir=tmp_path), parent)["quantile_range"]) \
        == (0.0, 0.95)


def test_check_describes_a_synthetic_data_set(label_maps):
    result = _train_check(label_maps, synthetic_config(3))
    assert result.exit_code == 0, result.output
    assert "heads: 3 label maps, synthetic images, brain, inter-subject, segmentations" in result.output
    assert "coarse1: 3 steps" in result.output and "stage1: 2 steps" in result.output


# ------------------------------------------------------------------------------------------------
# the pairs
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dimension", [2, 3])
def test_pairs_are_reproducible_normalised_and_carry_brain_labels(label_maps, dimension):
    run, dataset = _dataset(label_maps, dimension)
    shape = tuple(run.architecture.input_shape)
    first = dataset[5]
    again = _dataset(label_maps, dimension)[1][5]  # another process would build its own dataset
    for key in ("image_A", "image_B", "seg_A", "seg_B"):
        assert first[key].shape == (1, *shape) and first[key].dtype == torch.float32
        assert torch.equal(first[key], again[key]), key
    for role in "AB":
        image = first[f"image_{role}"]
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0 + 1e-6
        labels = set(torch.unique(first[f"seg_{role}"]).long().tolist())
        assert labels <= {0, *BRAIN} and len(labels - {0}) >= 2  # brain labels only: the Dice term's
        assert torch.equal(first[f"loss_{role}"], image)
    assert first["has_seg"] is True and first["has_mask"] is False
    other = dataset[6]
    assert not torch.equal(other["image_A"], first["image_A"])


def test_inter_pairs_use_two_label_maps_and_intra_pairs_one(label_maps):
    from itk_gradicon.training.data import draw_synthetic_pair

    run, _ = _dataset(label_maps, 3)
    member = run.composite.members[0]
    rng = np.random.default_rng(1)
    plans = [draw_synthetic_pair(member, 0, rng) for _ in range(30)]
    assert all(p.image("A") != p.image("B") for p in plans)
    assert {p.image("A") for p in plans} == {0, 1, 2}


def test_skull_stripped_subjects_keep_only_the_brain_and_whole_heads_keep_the_skull(label_maps):
    _, dataset = _dataset(label_maps, 3)
    synth = dataset.synthesizer(0)
    rng = np.random.default_rng(0)
    stripped = synth.subject(rng, 0, True, 0.05)
    head = synth.subject(rng, 0, False, 0.2)
    assert set(torch.unique(stripped.labels).tolist()) <= {0, *BRAIN}
    assert SKULL in set(torch.unique(head.labels).tolist())
    assert torch.equal(stripped.brain, stripped.labels > 0)
    # a wider margin shows the brain smaller in the field of view
    assert float(head.brain.float().mean()) < float(stripped.brain.float().mean())


def test_pairs_are_roughly_aligned_before_registration(label_maps):
    """Both subjects are framed on their brains (as after an affine pre-alignment)."""
    _, dataset = _dataset(label_maps, 3, warp_std=0.0, affine_std=0.0)
    for index in range(4):
        sample = dataset[index]
        a, b = sample["seg_A"] > 0, sample["seg_B"] > 0
        assert 2 * float((a & b).sum()) / float(a.sum() + b.sum()) > 0.85


def test_random_shapes_pairs_have_no_anatomy(label_maps):
    _, dataset = _dataset(label_maps, 2, shapes=1.0)
    sample = dataset[0]
    labels = sample["seg_A"].long()
    assert float((labels == 0).float().mean()) < 0.15  # shapes everywhere but where the affine leaves the map
    assert len(torch.unique(labels)) >= 4


def test_moment_box_of_an_ellipsoid_is_its_extent():
    from itk_gradicon.training.synthesis import _box

    grids = np.meshgrid(*[np.arange(101.0)] * 3, indexing="ij")
    ellipsoid = ((grids[0] - 50) / 40) ** 2 + ((grids[1] - 40) / 20) ** 2 + ((grids[2] - 60) / 30) ** 2 < 1
    box = _box(ellipsoid)
    expected = np.array([[10, 90], [20, 60], [30, 90]]) / 50.0 - 1.0
    assert np.allclose(box, expected, atol=0.03)


def test_label_map_layout_does_not_depend_on_storage(label_maps, tmp_path):
    """A label map stored LIA and the same one stored as RAS reach the synthesiser identically."""
    from itk_gradicon.spatial.frames import canonical_axes
    from itk_gradicon.training.synthesis import LabelMapEntry, check_label_map, prepare_label_map

    array = head_labels((20, 22, 18), np.random.default_rng(3))
    a = write_label_map(array, tmp_path / "lps.nii.gz")
    # the same anatomy, stored with its axes reversed and the first flipped: array [z, y, x] -> [x, y, z]
    flipped = np.ascontiguousarray(np.transpose(array, (2, 1, 0))[::-1])
    direction = np.array([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # columns: +z, +y, -x
    b = write_label_map(flipped, tmp_path / "other.nii.gz", direction=direction)
    prepared = []
    for path in (a, b):
        grid, labels = check_label_map(path, what="map", dimension=3)
        prepared.append(prepare_label_map(LabelMapEntry(path, grid, labels, "test"), canonical_axes(3), (1, 99),
                                          dimension=3))
    assert torch.equal(prepared[0].classes, prepared[1].classes)
    assert np.allclose(prepared[0].brain_box, prepared[1].brain_box)


# ------------------------------------------------------------------------------------------------
# coarse-to-fine training
# ------------------------------------------------------------------------------------------------

def test_coarse_architecture_is_the_innermost_part_of_the_network():
    from dataclasses import replace

    from itk_gradicon.network import Architecture, build_network
    from itk_gradicon.training.trainer import coarse_architecture, grow_network

    full = Architecture(input_shape=(40, 36, 33), levels=3, refinement_steps=1, down_channels=(4, 8, 8),
                        up_channels=(4, 8, 8), normalization="instance")
    one, two = coarse_architecture(full, 1), coarse_architecture(full, 2)
    assert one.input_shape == (10, 9, 9) and one.levels == 1 and one.refinement_steps == 0
    assert two.input_shape == (20, 18, 17) and two.levels == 2
    torch.manual_seed(0)
    coarse = build_network(one)
    for p in coarse.parameters():
        torch.nn.init.normal_(p, std=0.05)
    grown = grow_network(coarse, one, two, seed=1)
    # the new level's last layer is zero: the grown network's map is the coarse network's on pooled images
    A, B = torch.rand(1, 1, *two.input_shape), torch.rand(1, 1, *two.input_shape)
    pool = torch.nn.functional.avg_pool3d
    with torch.no_grad():
        expected = coarse(pool(A, 2, ceil_mode=True), pool(B, 2, ceil_mode=True)).on_grid((12, 12, 12))
        got = grown(A, B).on_grid((12, 12, 12))
    assert torch.allclose(expected, got, atol=1e-6)
    stage1 = replace(full, refinement_steps=0)
    final = grow_network(grow_network(grown, two, stage1, seed=1), stage1, full, seed=1)
    assert final.state_dict().keys() == build_network(full).state_dict().keys()


def test_data_shape_and_pooling():
    from itk_gradicon.training.trainer import data_shape, pool_batch

    assert data_shape((96, 96, 96), (24, 24, 24)) == (48, 48, 48)
    assert data_shape((96, 96, 96), (48, 48, 48)) == (96, 96, 96)
    assert data_shape((96, 96, 96), (96, 96, 96)) == (96, 96, 96)
    assert data_shape((175, 175, 175), (88, 88, 88)) == (175, 175, 175)
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    seg = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = pool_batch({"image_A": image, "seg_A": seg, "member": 0}, (2, 2))
    assert torch.equal(out["image_A"], torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    assert torch.equal(out["seg_A"], torch.tensor([[[[0.0, 2.0], [8.0, 10.0]]]]))
    assert out["member"] == 0


def test_dice_grid_stride():
    from itk_gradicon.training.objectives import dice_stride

    assert dice_stride((96, 96, 96), 48) == 2
    assert dice_stride((96, 96, 96), 0) == 1
    assert dice_stride((48, 48, 48), 48) == 1
    assert dice_stride((175, 175, 175), 48) == 4


@pytest.mark.parametrize("dimension", [2, 3])
def test_coarse_to_fine_training_on_synthetic_pairs_writes_every_stage(label_maps, tmp_path, dimension):
    from itk_gradicon.models import load_model
    from itk_gradicon.training import Trainer, load_config, prepare_run

    config = synthetic_config(dimension, shapes=0.3)
    path = write_config(label_maps / f"run_{dimension}.yaml", config)
    out = tmp_path / "run"
    run = prepare_run(load_config(path), out, device=torch.device("cpu"))
    assert [s.name for s in run.stages] == ["coarse1", "stage1"]
    result = Trainer(run).train()
    assert result.steps == 5
    coarse = load_model(str(out / "coarse1.pt"))
    final = load_model(str(out / "final.pt"))
    size = 32 if dimension == 2 else 24
    assert coarse.architecture.input_shape == (size // 2,) * dimension and coarse.architecture.levels == 1
    assert final.architecture.input_shape == (size,) * dimension and final.architecture.levels == 2
    assert final.architecture.normalization == "instance"
    assert final.preprocessing["layout"] == "canonical" and final.preprocessing["prealignment"] == "affine"
    latest = load_model(str(out / "latest.pt"))
    assert latest.provenance["steps"] == 5  # the checkpoint written when the last stage ends
    # the coarse stage's weights are inside the final network, where build_network nests them
    inner = {k[len("netPhi.net."):]: v for k, v in final.network.state_dict().items() if k.startswith("netPhi.net.")}
    assert inner.keys() == coarse.network.state_dict().keys()


def test_coarse_to_fine_resumes_bit_exactly(label_maps, tmp_path):
    from itk_gradicon.training import Trainer, load_config, prepare_run

    path = write_config(label_maps / "resume.yaml", synthetic_config(2))
    whole = tmp_path / "whole"
    Trainer(prepare_run(load_config(path), whole, device=torch.device("cpu"))).train()
    parts = tmp_path / "parts"
    Trainer(prepare_run(load_config(path), parts, device=torch.device("cpu"))).train(stop_after=2)
    Trainer(prepare_run(load_config(path), parts, device=torch.device("cpu"), resume=True)).train(stop_after=2)
    Trainer(prepare_run(load_config(path), parts, device=torch.device("cpu"), resume=True)).train()
    a = torch.load(whole / "final.pt", weights_only=True)["state_dict"]
    b = torch.load(parts / "final.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_coarse_schedule_is_checked(tmp_path):
    config = synthetic_config(3)
    config["schedule"]["coarse"] = [{"steps": 1}, {"steps": 1}]
    result = _train_check(tmp_path, config)
    assert result.exit_code == 2
    assert "schedule.coarse: 2 coarse stage(s), but a network of 2 level(s) has at most 1" in result.output


# ------------------------------------------------------------------------------------------------
# instance normalisation and the canonical layout
# ------------------------------------------------------------------------------------------------

def test_instance_normalisation_gives_the_same_map_in_training_and_evaluation_mode():
    from itk_gradicon.network import Architecture, build_network

    arch = Architecture(input_shape=(24, 24, 24), levels=1, refinement_steps=0, down_channels=(4, 8, 8),
                        up_channels=(4, 8, 8), normalization="instance")
    net = build_network(arch)
    torch.manual_seed(0)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    A, B = torch.rand(2, 1, 24, 24, 24), torch.rand(2, 1, 24, 24, 24)
    with torch.no_grad():
        trained = net.train()(A, B).fields[0]
        evaluated = net.eval()(A, B).fields[0]
        alone = net(A[1:], B[1:]).fields[0]
    assert torch.equal(trained, evaluated)
    assert torch.allclose(evaluated[1:], alone, atol=1e-6)  # every pair normalised by its own statistics
    assert not any("running" in k for k in net.state_dict())


def test_instance_normalisation_survives_a_model_file(tmp_path):
    from itk_gradicon.models import load_model, save_model_file
    from itk_gradicon.network import Architecture, build_network

    arch = Architecture(dimension=2, input_shape=(32, 32), levels=1, refinement_steps=0, down_channels=(4, 8),
                        up_channels=(4, 8), normalization="instance")
    path = save_model_file(tmp_path / "m.pt", build_network(arch), arch, name="m",
                           preprocessing={"layout": "canonical"})
    loaded = load_model(str(path))
    assert loaded.architecture == arch
    published_style = Architecture(dimension=2, input_shape=(32, 32), levels=1, refinement_steps=0,
                                   down_channels=(4, 8), up_channels=(4, 8))
    assert "normalization" not in published_style.to_dict()  # older readers keep reading such files


def test_canonical_layout_puts_differently_stored_images_alike_on_the_network():
    from itk_gradicon.spatial.frames import ImageGrid, NetworkFrame

    ras = ImageGrid(size=(8, 7, 6), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                    direction=((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, 1.0)))
    lia = ImageGrid(size=(8, 6, 7), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                    direction=((1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, -1.0, 0.0)))
    frame_ras = NetworkFrame.for_layout("canonical", ras, (6, 7, 8))
    assert frame_ras == NetworkFrame.reference_layout(ras, (6, 7, 8))  # RAS storage is the canonical layout
    frame_lia = NetworkFrame.for_layout("canonical", lia, (6, 7, 8))
    assert np.allclose(frame_lia.world_axes(), frame_ras.world_axes())
