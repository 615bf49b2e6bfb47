"""Composite data sets: sampling shares, pairings, loss randomisation, M2M cycles, sharding,
worker independence, the network layout shared with registration, the cache and augmentation."""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from test_training_support import base_config, make_subjects, one_torch_thread, write_csv  # noqa: F401 (autouse)
from itk_gradicon.io.itk_bridge import grid_of

EXAMPLE_DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    rows = make_subjects(folder, n=4, shape=(20, 22), modalities=("t1w", "flair"), seed=4, masks=True)
    write_csv(rows, folder / "multi.csv")
    write_csv([r for r in rows if r["modality"] == "t1w"], folder / "t1w.csv")
    write_csv([r for r in rows if r["modality"] == "t1w"], folder / "t1w_no_masks.csv",
              columns=("image", "subject", "modality", "group", "segmentation"))
    rows_ct = make_subjects(folder, n=3, shape=(20, 22), modalities=("ct",), seed=5, first=10)
    write_csv(rows_ct, folder / "ct.csv")
    rows_long = make_subjects(folder, n=3, shape=(20, 22), modalities=("t1w",), sessions=2, seed=6, first=20)
    write_csv(rows_long, folder / "longitudinal.csv")
    return folder


def composite(folder: Path, datasets, dimension: int = 2, **overrides):
    from itk_gradicon.training.config import config_from_mapping
    from itk_gradicon.training.data import CompositeSet, check_composite, scan_member

    raw = base_config(**overrides)
    raw["datasets"] = datasets
    cfg = config_from_mapping(raw, base_dir=folder)
    members = [scan_member(i, d, cfg, dimension=dimension, ct_window=(-1000.0, 1000.0), quantile_range=None)
               for i, d in enumerate(cfg.datasets)]
    comp = CompositeSet(members, cfg)
    check_composite(comp, cfg)
    return comp, cfg


def dataset(folder, datasets, **overrides):
    from itk_gradicon.training.data import PairDataset, VolumeLoader

    comp, cfg = composite(folder, datasets, **overrides)
    shape = tuple(cfg.architecture.input_shape)
    return PairDataset(comp, shape, cfg.augmentation, VolumeLoader(2, None, 16)), comp, cfg


# ------------------------------------------------------------------------------------------------
# headers
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["t1w.nii.gz", "t2.nii.gz", "t2_seg-manual.nii.gz"])
def test_header_grid_equals_the_grid_of_the_read_image(name):
    import itk

    from itk_gradicon.spatial.frames import ImageGrid
    from itk_gradicon.training.data import read_grid

    grid, components = read_grid(EXAMPLE_DATA / name)
    expected = grid_of(itk.imread(str(EXAMPLE_DATA / name)))
    assert components == 1 and grid.size == expected.size
    np.testing.assert_allclose(grid.spacing, expected.spacing)
    np.testing.assert_allclose(grid.origin, expected.origin)
    np.testing.assert_allclose(grid.direction_matrix, expected.direction_matrix, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------------

def test_pairs_are_a_function_of_the_seed_and_the_index(folder):
    ds = [{"name": "t1", "images": "t1w.csv", "region": "brain"}]
    first, _ = composite(folder, ds)
    again, _ = composite(folder, ds)
    other, _ = composite(folder, ds, seed=99)
    plans = [first.plan(i) for i in range(40)]
    assert plans == [again.plan(i) for i in range(40)]
    assert plans != [other.plan(i) for i in range(40)]
    assert [first.plan(i) for i in (39, 7, 23)] == [plans[39], plans[7], plans[23]]  # any order


def test_per_dataset_sampling_draws_fixed_counts_per_epoch(folder):
    comp, _ = composite(folder, [{"name": "t1", "images": "t1w.csv"},
                                 {"name": "ct", "images": "ct.csv", "weight": 0.5},
                                 {"name": "off", "images": "ct.csv", "weight": 0}],
                        sampling={"mode": "per_dataset", "pairs_per_dataset": 10})
    assert comp.pairs_per_epoch == 15
    for epoch in (0, 1):
        assert Counter(comp.epoch_members(epoch).tolist()) == {0: 10, 1: 5}
    assert comp.epoch_members(0).tolist() != comp.epoch_members(1).tolist()
    assert comp.shares.tolist() == pytest.approx([2 / 3, 1 / 3, 0.0])


@pytest.mark.parametrize("mode, expected", [
    ("weighted", [0.25, 0.25, 0.5, 0.0]),   # (t1w, brain) twice, (ct, lung) once; weight 0 excluded
    ("region", [0.25, 0.25, 0.5, 0.0]),
])
def test_weighted_modes_balance_combinations_and_regions(folder, mode, expected):
    datasets = [{"name": "a", "images": "t1w.csv", "region": "brain"},
                {"name": "b", "images": "longitudinal.csv", "region": "brain"},
                {"name": "c", "images": "ct.csv", "region": "lung"},
                {"name": "d", "images": "ct.csv", "region": "knee", "weight": 0}]
    comp, _ = composite(folder, datasets, sampling={"mode": mode, "pairs_per_epoch": 4000})
    assert comp.shares.tolist() == pytest.approx(expected)
    counts = Counter(comp.epoch_members(3).tolist())
    for k, share in enumerate(expected):
        assert counts.get(k, 0) / 4000 == pytest.approx(share, abs=0.03)


def test_weighted_mode_separates_modality_combinations_of_one_region(folder):
    datasets = [{"name": "t1", "images": "t1w.csv", "region": "brain"},
                {"name": "multi", "images": "multi.csv", "region": "brain"},
                {"name": "ct", "images": "ct.csv", "region": "lung"}]
    weighted, _ = composite(folder, datasets, sampling={"mode": "weighted"})
    region, _ = composite(folder, datasets, sampling={"mode": "region"})
    assert weighted.shares.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    assert region.shares.tolist() == pytest.approx([0.25, 0.25, 0.5])


def test_inter_pairs_join_two_subjects_and_intra_pairs_two_views_of_one(folder):
    inter, _ = composite(folder, [{"name": "x", "images": "longitudinal.csv", "pairing": "inter"}])
    intra, _ = composite(folder, [{"name": "x", "images": "longitudinal.csv", "pairing": "intra"}])
    for comp, same in ((inter, False), (intra, True)):
        member = comp.members[0]
        for i in range(200):
            plan = comp.plan(i)
            a, b = member.entries[plan.image("A")], member.entries[plan.image("B")]
            assert (a.subject == b.subject) is same
            if same:
                assert a.group != b.group


@pytest.mark.parametrize("variant", ["B", "F", "R"])
def test_loss_randomisation_frequencies(folder, variant):
    """Views hold a t1w and a flair image. B: the loss uses the inputs. R: each loss image is either
    image of its view with probability 1/2, independently. F: both loss images share one modality,
    each modality with probability 1/2, independently of the inputs."""
    comp, _ = composite(folder, [{"name": "m", "images": "multi.csv"}], objective={"loss_randomisation": variant})
    member = comp.members[0]
    n = 2000
    same_as_input, loss_modalities, joint = 0, Counter(), Counter()
    for i in range(n):
        plan = comp.plan(i)
        images = dict(plan.images)
        for side in ("A", "B"):
            assert member.entries[images[side]].subject == member.entries[images[f"{side}_loss"]].subject
            assert member.entries[images[side]].group == member.entries[images[f"{side}_loss"]].group
            same_as_input += images[side] == images[f"{side}_loss"]
        pair = (member.entries[images["A_loss"]].modality, member.entries[images["B_loss"]].modality)
        loss_modalities[pair] += 1
        joint[(member.entries[images["A"]].modality, pair[0])] += 1
    if variant == "B":
        assert same_as_input == 2 * n
    elif variant == "R":
        assert same_as_input / (2 * n) == pytest.approx(0.5, abs=0.03)
        for pair in (("t1w", "t1w"), ("t1w", "flair"), ("flair", "t1w"), ("flair", "flair")):
            assert loss_modalities[pair] / n == pytest.approx(0.25, abs=0.03)
    else:
        assert set(loss_modalities) == {("t1w", "t1w"), ("flair", "flair")}
        assert loss_modalities[("t1w", "t1w")] / n == pytest.approx(0.5, abs=0.03)
        for key in (("t1w", "t1w"), ("t1w", "flair"), ("flair", "t1w"), ("flair", "flair")):
            assert joint[key] / n == pytest.approx(0.25, abs=0.03)  # inputs independent of the loss modality


@pytest.mark.parametrize("prealigned", [0.0, 1.0, 0.5])
def test_m2m_cycles_join_different_subjects_and_bridges_are_co_registered(folder, prealigned):
    comp, _ = composite(folder, [{"name": "m", "images": "multi.csv"}],
                        objective={"kind": "m2m", "prealigned_bridges": prealigned})
    member = comp.members[0]
    kinds = Counter()
    for i in range(300):
        plan = comp.plan(i)
        e = {r: member.entries[plan.image(r)] for r in ("S", "T", "Sp", "Tp")}
        assert e["S"].modality == e["Sp"].modality == "flair" and e["T"].modality == e["Tp"].modality == "t1w"
        assert e["S"].path != e["Sp"].path and e["T"].path != e["Tp"].path
        assert e["S"].subject != e["T"].subject and e["T"].subject != e["Sp"].subject
        assert e["Tp"].subject != e["S"].subject
        if plan.prealigned:
            assert (e["Sp"].subject, e["Sp"].group) == (e["Tp"].subject, e["Tp"].group)
            assert dict(plan.views)["Sp"] == dict(plan.views)["Tp"]
        else:
            assert e["Sp"].subject != e["Tp"].subject
        kinds[plan.prealigned] += 1
    assert kinds[True] / 300 == pytest.approx(prealigned, abs=0.08)


def test_step_batch_sampler_shards_the_index_stream_between_processes():
    from itk_gradicon.training.data import StepBatchSampler

    ranks = [list(StepBatchSampler(5, 9, 3, rank=r, world_size=2)) for r in range(2)]
    assert all(len(r) == 4 for r in ranks)
    for step in range(4):
        together = sorted(ranks[0][step] + ranks[1][step])
        assert together == list(range((5 + step) * 6, (6 + step) * 6))
        assert not set(ranks[0][step]) & set(ranks[1][step])
    assert list(StepBatchSampler(7, 9, 3)) == [list(range(21, 24)), list(range(24, 27))]


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------

def test_samples_do_not_depend_on_the_number_of_workers(folder):
    from torch.utils.data import DataLoader

    from itk_gradicon.training.data import StepBatchSampler, seed_worker

    ds, _, _ = dataset(folder, [{"name": "m", "images": "multi.csv"}], objective={"loss_randomisation": "R"},
                       augmentation={"flips": True, "affine_std": 0.05, "permutations": True})
    batches = {}
    for workers in (0, 2):
        loader = DataLoader(ds, batch_sampler=StepBatchSampler(3, 7, 2), num_workers=workers,
                            worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(0))
        batches[workers] = list(loader)
    assert len(batches[0]) == 4
    for a, b in zip(batches[0], batches[2]):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), key


def test_network_inputs_are_laid_out_exactly_as_registration_lays_them_out(tmp_path, tiny_model_file):
    """The example images store one anatomy with different axis orders: training must feed the
    network what ``register`` feeds it (fixed image in reference layout, moving along its axes)."""
    import itk

    from itk_gradicon.models import load_model
    from itk_gradicon.registration import register

    for name in ("t1w.nii.gz", "t2.nii.gz"):
        shutil.copy(EXAMPLE_DATA / name, tmp_path / name)
    write_csv([{"image": "t1w.nii.gz", "subject": "one"}, {"image": "t2.nii.gz", "subject": "two"}],
              tmp_path / "pair.csv")
    from itk_gradicon.training.data import PairDataset, VolumeLoader

    comp, cfg = composite(tmp_path, [{"name": "p", "images": "pair.csv", "modality": "mri"}], dimension=3)
    model = load_model(str(tiny_model_file))
    ds = PairDataset(comp, model.architecture.input_shape, cfg.augmentation, VolumeLoader(3, None, 4))
    index = next(i for i in range(50) if comp.members[0].entries[comp.plan(i).image("B")].path.name == "t1w.nii.gz")
    sample = ds[index]

    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, A, B):
            seen.append((A.clone(), B.clone()))
            return self.net(A, B)

    recording = dataclasses.replace(model, network=Recorder(model.network))
    register(itk.imread(str(tmp_path / "t1w.nii.gz")), itk.imread(str(tmp_path / "t2.nii.gz")), model=recording,
             fixed_modality="mri", moving_modality="mri", compute_inverse=False, device="cpu")
    moving_input, fixed_input = seen[0]
    assert torch.equal(sample["image_A"][None], moving_input)
    assert torch.equal(sample["image_B"][None], fixed_input)


def test_disk_cache_is_reused_and_keyed_by_preprocessing(folder, tmp_path, monkeypatch):
    from itk_gradicon.training import caching
    from itk_gradicon.training.data import PairDataset, VolumeLoader

    comp, cfg = composite(folder, [{"name": "ct", "images": "ct.csv"}])
    shape = tuple(cfg.architecture.input_shape)
    cache = tmp_path / "cache"
    first = PairDataset(comp, shape, cfg.augmentation, VolumeLoader(2, cache, 0))[5]
    files = sorted(cache.rglob("*.npy"))
    assert len(files) == 4  # the two images of the pair and their segmentations
    for name in ("read_float32", "read_label_map"):
        monkeypatch.setattr(caching, name, lambda *a, **k: pytest.fail("read instead of cached"))
    again = PairDataset(comp, shape, cfg.augmentation, VolumeLoader(2, cache, 0))[5]
    for key in ("image_A", "image_B"):
        assert torch.equal(first[key], again[key])
    monkeypatch.undo()
    comp_window, cfg_window = composite(folder, [{"name": "ct", "images": "ct.csv", "ct_window": [-500, 500]}])
    other = PairDataset(comp_window, shape, cfg_window.augmentation, VolumeLoader(2, cache, 0))[5]
    assert len(sorted(cache.rglob("*.npy"))) == 6  # new entries for the two images only
    assert not torch.equal(first["image_A"], other["image_A"])


def test_co_registered_images_get_one_augmentation_and_ct_inversion(tmp_path):
    """Two files with equal content in one group (a 't1w' and a 'flair'): whatever is drawn, the
    input and loss images of a view stay identical after augmentation; in an M2M cycle the
    pre-aligned bridge images too. CT inverted with probability 1 becomes 1 - CT."""
    rows = make_subjects(tmp_path, n=4, shape=(20, 22), modalities=("t1w",), seed=8)
    for row in list(rows):
        copy = dict(row, modality="flair", image=row["image"].replace("t1w", "flair"))
        shutil.copy(tmp_path / row["image"], tmp_path / copy["image"])
        rows.append(copy)
    write_csv(rows, tmp_path / "twins.csv")
    aug = {"flips": True, "permutations": False, "affine_std": 0.1}
    ds, comp, _ = dataset(tmp_path, [{"name": "t", "images": "twins.csv"}], augmentation=aug,
                          objective={"loss_randomisation": "R"})
    different_files = 0
    for i in range(12):
        s = ds[i]
        plan = comp.plan(i)
        different_files += plan.image("A") != plan.image("A_loss")
        assert torch.equal(s["image_A"], s["loss_A"]) and torch.equal(s["image_B"], s["loss_B"])
        assert not torch.equal(s["image_A"], s["image_B"])
    assert different_files > 0
    ds, comp, _ = dataset(tmp_path, [{"name": "t", "images": "twins.csv"}], augmentation=aug,
                          objective={"kind": "m2m", "prealigned_bridges": 1.0})
    for i in range(6):
        s = ds[i]
        assert torch.equal(s["image_Sp"], s["image_Tp"]) and not torch.equal(s["image_S"], s["image_T"])

    ct_rows = make_subjects(tmp_path / "ct", n=3, shape=(20, 22), modalities=("ct",), seed=9)
    write_csv(ct_rows, tmp_path / "ct" / "ct.csv")
    plain, _, _ = dataset(tmp_path / "ct", [{"name": "c", "images": "ct.csv"}])
    inverted, _, _ = dataset(tmp_path / "ct", [{"name": "c", "images": "ct.csv"}],
                             augmentation={"flips": False, "affine_std": 0.0, "invert_ct": 1.0})
    for i in range(3):
        assert torch.allclose(inverted[i]["image_A"], 1 - plain[i]["image_A"])


@pytest.mark.parametrize("mask_mode", ["input", "loss", "both"])
def test_masks_zero_inputs_or_restrict_the_loss(folder, mask_mode):
    ds, comp, _ = dataset(folder, [{"name": "m", "images": "t1w.csv", "mask_mode": mask_mode}])
    plain, _, _ = dataset(folder, [{"name": "m", "images": "t1w_no_masks.csv"}])
    sample = ds[0]
    image, mask = sample["image_A"], sample["mask_A"]
    unmasked = plain[0]["image_A"]
    if mask_mode in ("input", "both"):
        assert comp.members[0].input_masks
        assert (image == 0).sum() > 0.1 * image.numel() and not torch.equal(image, unmasked)
    else:
        assert torch.equal(image, unmasked)
    if mask_mode in ("loss", "both"):
        assert sample["has_mask"] and set(torch.unique(mask).tolist()) == {0.0, 1.0}
        if mask_mode == "both":  # masked before the linear resizing, as at registration: edges blur
            assert image[mask == 0].abs().mean() < 0.5 * unmasked[mask == 0].abs().mean()
    else:
        assert not sample["has_mask"] and torch.all(mask == 1)


def test_image_list_errors_name_the_file_s_own_line(tmp_path):
    """Comment and blank lines count: the line a message names is the line the user opens."""
    from itk_gradicon.errors import ConfigError
    from itk_gradicon.training.listing import _read_csv

    listing = tmp_path / "images.csv"
    listing.write_text("# images of the cohort\nimage,mask\n\na.nii.gz,m.nii.gz\nb.nii.gz,m.nii.gz,extra\n")
    with pytest.raises(ConfigError, match="images.csv line 5 has 3 values for 2 columns"):
        _read_csv(listing, tmp_path, "datasets[0]")
    listing.write_text("image\n# a comment\na.nii.gz\n")
    rows = _read_csv(listing, tmp_path, "datasets[0]")
    assert [r["origin"] for r in rows] == ["images.csv line 3"]
