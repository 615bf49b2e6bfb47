"""`gradicon train` end to end: every recipe, exact resumption (in process and after a real kill),
two processes with gloo, the model file with `gradicon register`, and learning on tiny data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from test_training_support import (base_config, make_subjects, one_torch_thread,  # noqa: F401 (autouse)
                                   tiny_architecture_config, write_config,
                                   write_csv)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("train_data")
    rows = make_subjects(folder, n=4, shape=(36, 36), modalities=("t1w", "flair"), seed=11, masks=True)
    write_csv(rows, folder / "multi.csv")
    write_csv([r for r in rows if r["modality"] == "t1w"], folder / "t1w.csv",
              columns=("image", "subject", "modality", "group", "segmentation"))
    write_csv(make_subjects(folder, n=3, shape=(36, 36), modalities=("ct",), seed=12, first=10), folder / "ct.csv")
    write_csv(make_subjects(folder, n=3, shape=(36, 36), modalities=("t1w",), sessions=2, seed=13, first=20),
              folder / "longitudinal.csv")
    return folder


def train(data: Path, out: Path, config: dict, *, model=None, resume=False, stop_after=None, progress=None,
          name="run.yaml"):
    """Train in this process (the library path the command takes)."""
    from itk_gradicon.training import Trainer, load_config, prepare_run

    path = write_config(data / f"{out.name}_{name}", config)
    run = prepare_run(load_config(path, model=model), out, device=torch.device("cpu"), resume=resume)
    trainer = Trainer(run, progress=progress)
    return trainer, trainer.train(stop_after=stop_after)


def read_log(out: Path):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def state_of(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = state_of(a), state_of(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ------------------------------------------------------------------------------------------------
# recipes
# ------------------------------------------------------------------------------------------------

RECIPES = {
    "unigradicon": dict(
        datasets=[{"name": "brains", "images": "t1w.csv", "region": "brain"},
                  {"name": "followup", "images": "longitudinal.csv", "region": "brain", "pairing": "intra"}],
        sampling={"mode": "per_dataset", "pairs_per_dataset": 8},
        augmentation={"flips": True, "affine_std": 0.05}),
    **{f"multigradicon_{v}": dict(
        datasets=[{"name": "mr", "images": "multi.csv", "region": "brain", "mask_mode": "loss"},
                  {"name": "ct", "images": "ct.csv", "region": "abdomen"}],
        sampling={"mode": "weighted", "pairs_per_epoch": 40},
        augmentation={"flips": True, "affine_std": 0.05, "invert_ct": 0.5, "permutations": True},
        objective={"kind": "gradicon", "similarity": "lncc2", "loss_randomisation": v, "dice_weight": 0.5})
       for v in "BFR"},
    "m2m": dict(
        datasets=[{"name": "pairs", "images": "multi.csv", "region": "brain"}],
        objective={"kind": "m2m", "similarity": "lncc"}),
    "m2m_prealigned": dict(
        datasets=[{"name": "pairs", "images": "multi.csv", "region": "brain"}],
        objective={"kind": "m2m", "similarity": "lncc", "prealigned_bridges": 0.5, "dice_weight": 0.2}),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_runs_end_to_end(recipe, data, tmp_path):
    from itk_gradicon.models import Domain, load_model

    config = base_config(steps1=3, steps2=2, **RECIPES[recipe])
    out = tmp_path / recipe
    _, result = train(data, out, config)
    model = load_model(str(result.final_model))
    assert model.architecture.refinement_steps == 1 and model.architecture.input_shape == (32, 32)
    regions = {"multigradicon": "abdomen, brain"}.get(recipe.split("_")[0], "brain")
    kinds = ("ct", "mri") if recipe.startswith("multigradicon") else ("mri",)
    assert model.domain == Domain(regions, kinds, (36.0, 36.0))
    assert model.similarity == config.get("objective", {}).get("similarity", "lncc")
    provenance = model.provenance
    assert provenance["steps"] == 5 and [s["name"] for s in provenance["stages"]] == ["stage1", "stage2"]
    assert [d["name"] for d in provenance["datasets"]] == [d["name"] for d in config["datasets"]]
    assert provenance["config"]["objective"]["kind"] == config.get("objective", {}).get("kind", "gradicon")
    assert (out / "stage1.pt").exists() and (out / "config.yaml").exists()
    log = read_log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    assert [r["stage"] for r in log] == ["stage1"] * 3 + ["stage2"] * 2
    expected_terms = {"total", "similarity", "gradicon", "dice"} | ({"gradcycon"} if "m2m" in recipe else set())
    for record in log:
        assert expected_terms <= set(record) and all(np.isfinite(record[k]) for k in expected_terms)
        assert record["pairs_per_s"] > 0
    if "multigradicon" in recipe or recipe == "m2m_prealigned":
        assert any(r["dice"] > 0 for r in log)


def test_finetuning_from_the_command_line_writes_a_registrable_model(data, tmp_path, tiny_model_file_2d):
    """The common request: finetune a model on a folder of images, then register with it."""
    from itk_gradicon.cli import main
    from itk_gradicon.models import Domain, load_model

    folder = data / "my_images"
    folder.mkdir(exist_ok=True)
    for row in make_subjects(folder, n=3, shape=(30, 28), seed=21, labels=False):
        pass
    config = {"name": "finetuned", "model": "unigradicon",
              "datasets": [{"name": "mine", "images": "my_images/*.mha", "modality": "t1w", "region": "brain"}],
              "sampling": {"mode": "region", "pairs_per_epoch": 10}, "schedule": {"finetune": {"steps": 4}},
              "batch_size": 1, "checkpoint": {"every": 2}, "loader": {"workers": 0, "cache_dir": "ft_cache"},
              "log_every": 1}
    path = write_config(data / "finetune.yaml", config)
    out = tmp_path / "ft"
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--config", str(path), "--output", str(out), "--model",
                                  str(tiny_model_file_2d), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "finetuning tiny2d" in result.output
    assert "finetune 4/4  step 4/4  total" in result.output and "pairs/s" in result.output and "ETA" in result.output
    model = load_model(str(out / "final.pt"))
    parent = load_model(str(tiny_model_file_2d))
    assert model.architecture == parent.architecture
    assert model.provenance["parent"]["sha256"] == parent.sha256 and model.name == "finetuned"
    # what it was trained on goes into the file, so that a registration outside it is warned about
    assert model.domain == Domain("brain", ("mri",), (28.0, 30.0))
    changed = [k for k, v in model.network.state_dict().items() if not torch.equal(v, parent.network.state_dict()[k])]
    assert changed, "finetuning left every weight unchanged"
    assert any((data / "ft_cache").rglob("*.npy"))

    images = sorted(folder.glob("*.mha"))
    transform = tmp_path / "t.h5"
    result = runner.invoke(main, ["register", "--model", str(out / "final.pt"), "--fixed", str(images[0]),
                                  "--moving", str(images[1]), "--out-transform", str(transform),
                                  "--out-warped", str(tmp_path / "w.mha"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert transform.exists() and (tmp_path / "w.mha").exists()


def test_a_from_scratch_3d_model_registers_from_the_command_line(tmp_path):
    from itk_gradicon.cli import main

    rows = make_subjects(tmp_path, n=3, shape=(20, 22, 18), seed=31)
    write_csv(rows, tmp_path / "images.csv")
    config = base_config(steps1=2, steps2=1)
    config["architecture"] = tiny_architecture_config(3, 16, (4, 8, 8))
    config["batch_size"] = 1
    out = tmp_path / "run3d"
    path = write_config(tmp_path / "run.yaml", config)
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--config", str(path), "--output", str(out), "--quiet"])
    assert result.exit_code == 0 and result.output == "", result.output
    result = runner.invoke(main, ["register", "--model", str(out / "final.pt"), "--fixed",
                                  str(tmp_path / rows[0]["image"]), "--moving", str(tmp_path / rows[1]["image"]),
                                  "--out-transform", str(tmp_path / "t.nii.gz"), "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "t.nii.gz").exists()


# ------------------------------------------------------------------------------------------------
# exact resumption
# ------------------------------------------------------------------------------------------------

def resume_config(**overrides):
    config = base_config(steps1=6, steps2=6, **RECIPES["multigradicon_R"])
    config["checkpoint"] = {"every": 4, "keep": 2}
    config.update(overrides)
    return config


def test_stop_and_resume_gives_bit_identical_weights(data, tmp_path):
    """10 steps, stop, 2 more (to the end of Stage 1), stop, 8 more (with a different number of
    DataLoader workers after the first stop) equals 20 steps without a stop."""
    config = resume_config()
    config["schedule"] = {"stage1": {"steps": 12}, "stage2": {"steps": 8}}
    straight = tmp_path / "straight"
    _, result = train(data, straight, config)
    assert result.steps == 20

    parts = tmp_path / "parts"
    _, first = train(data, parts, config, stop_after=10)
    assert first.stopped and first.final_model is None and first.steps == 10
    assert not (parts / "final.pt").exists()
    assert (parts / "checkpoints" / "step_000000010.pt").exists()
    config["loader"] = {"workers": 2}  # may change on resume: samples do not depend on it
    _, boundary = train(data, parts, config, resume=True, stop_after=2)  # stops exactly at the end of Stage 1
    assert boundary.stopped and boundary.steps == 12 and (parts / "stage1.pt").exists()
    _, second = train(data, parts, config, resume=True)
    assert second.steps == 20 and not second.stopped
    assert_same_weights(straight / "final.pt", parts / "final.pt")
    assert_same_weights(straight / "stage1.pt", parts / "stage1.pt")
    log_a, log_b = read_log(straight), read_log(parts)
    assert [r["step"] for r in log_b] == list(range(1, 21))
    for a, b in zip(log_a, log_b):
        assert {k: a[k] for k in ("total", "similarity", "gradicon", "dice")} == \
               {k: b[k] for k in ("total", "similarity", "gradicon", "dice")}
    assert len(list((parts / "checkpoints").glob("step_*.pt"))) == 2  # checkpoint.keep


def test_signal_stops_after_a_checkpoint_and_resume_continues_exactly(data, tmp_path):
    """SIGINT/SIGTERM set a flag; the step in progress finishes, a checkpoint is written, and the
    command exits 130. Here the flag is set from the progress callback after step 3 (a stage-1 step
    that is not a checkpoint step)."""
    from itk_gradicon.training.trainer import TrainingStopped

    config = resume_config()
    straight = tmp_path / "straight"
    train(data, straight, config)
    holder = {}

    def stop_at_3(report):
        if report.step == 3:
            holder["trainer"]._stop_requested = True

    from itk_gradicon.training import Trainer, load_config, prepare_run

    out = tmp_path / "stopped"
    path = write_config(data / "stopped.yaml", config)
    trainer = Trainer(prepare_run(load_config(path), out, device=torch.device("cpu")), progress=stop_at_3)
    holder["trainer"] = trainer
    with pytest.raises(TrainingStopped, match="stopped at step 3 of 12"):
        trainer.train()
    assert (out / "checkpoints" / "step_000000003.pt").exists() and len(read_log(out)) == 3
    # the log may hold lines beyond the checkpoint after a kill: resume drops them
    with open(out / "log.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 4, "total": 123.0}) + "\n" + '{"step": 5, "tot')
    train(data, out, config, resume=True)
    assert_same_weights(straight / "final.pt", out / "final.pt")
    assert [r["total"] for r in read_log(out)] == [r["total"] for r in read_log(straight)]


def test_resume_refuses_a_changed_configuration(data, tmp_path):
    from itk_gradicon.errors import ConfigError

    config = resume_config()
    out = tmp_path / "run"
    train(data, out, config, stop_after=2)
    changed = resume_config(seed=4)
    with pytest.raises(ConfigError, match="--resume: the configuration differs .* at seed"):
        train(data, out, changed, resume=True)
    longer = resume_config()
    longer["schedule"] = {"stage1": {"steps": 6}, "stage2": {"steps": 7}}  # the schedule may grow
    _, result = train(data, out, longer, resume=True)
    assert result.steps == 13


def _cli_script(tmp_path: Path) -> Path:
    script = tmp_path / "gradicon_cli.py"
    script.write_text("from itk_gradicon.cli import main\nmain()\n")
    return script


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.slow
def test_killed_process_resumes_bit_exactly(data, tmp_path):
    """A real ``kill -9`` right after the step-4 checkpoint; ``--resume`` continues from the newest
    checkpoint (whatever step the kill caught) and ends with the weights of an uninterrupted run."""
    config = resume_config()
    config["schedule"] = {"stage1": {"steps": 10}, "stage2": {"steps": 10}}
    config["checkpoint"] = {"every": 4, "keep": 2}
    path = write_config(data / "kill.yaml", config)
    script = _cli_script(tmp_path)
    command = [sys.executable, str(script), "train", "--config", str(path), "--device", "cpu", "--quiet"]
    train(data, tmp_path / "straight", config)  # in this process, also single-threaded

    out = tmp_path / "killed"
    process = subprocess.Popen(command + ["--output", str(out)], env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step_000000004.pt").exists():
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.time() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (out / "final.pt").exists()
    resumed = subprocess.run(command + ["--output", str(out), "--resume"], env=_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_weights(tmp_path / "straight" / "final.pt", out / "final.pt")
    assert [r["total"] for r in read_log(out)] == [r["total"] for r in read_log(tmp_path / "straight")]


@pytest.mark.slow
def test_two_processes_with_gloo_train_one_model(data, tmp_path):
    """``torchrun --nproc-per-node 2``: DistributedDataParallel on the CPU (gloo), each process on
    its own share of the pair stream; rank 0 writes one model."""
    config = resume_config()
    config["schedule"] = {"stage1": {"steps": 3}, "stage2": {"steps": 2}}
    path = write_config(data / "ddp.yaml", config)
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(_cli_script(tmp_path)), "train", "--config", str(path), "--output", str(out), "--device", "cpu"]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "2 processes" in result.stderr
    from itk_gradicon.models import load_model

    model = load_model(str(out / "final.pt"))
    assert model.provenance["world_size"] == 2 and model.provenance["pairs_per_step"] == 4
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4, 5]


# ------------------------------------------------------------------------------------------------
# learning
# ------------------------------------------------------------------------------------------------

def _mean_dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([2 * ((a == k) & (b == k)).sum() / ((a == k).sum() + (b == k).sum()) for k in (1, 2, 3)]))


def held_out_dice(model_path: Path, folder: Path, fixed_row: dict, moving_row: dict):
    """Mean Dice of the three labels before and after registering the held-out pair with the model."""
    import itk

    from itk_gradicon import register

    read = lambda name: itk.imread(str(folder / name))  # noqa: E731
    fixed_labels, moving_labels = read(fixed_row["segmentation"]), read(moving_row["segmentation"])
    result = register(itk.imread(str(folder / fixed_row["image"]), itk.F),
                      itk.imread(str(folder / moving_row["image"]), itk.F), model=str(model_path),
                      fixed_modality="mri", moving_modality="mri", compute_inverse=False, device="cpu")
    warped = itk.resample_image_filter(
        moving_labels, transform=result.forward_transform, use_reference_image=True, reference_image=fixed_labels,
        interpolator=itk.NearestNeighborInterpolateImageFunction.New(moving_labels))
    fixed = itk.array_from_image(fixed_labels)
    return _mean_dice(fixed, itk.array_from_image(moving_labels)), _mean_dice(fixed, itk.array_from_image(warped))


@pytest.mark.slow
@pytest.mark.parametrize("dimension, steps, size, channels, batch, lr", [
    (2, (160, 60), 32, (8, 16, 16), 2, 2e-3),
    (3, (110, 0), 24, (4, 8, 8), 1, 4e-3),
])
def test_loss_falls_and_the_model_registers_a_held_out_pair(tmp_path, dimension, steps, size, channels, batch, lr):
    amplitude = 4.0 if dimension == 2 else 3.0
    rows = make_subjects(tmp_path, n=10, shape=(size + 8,) * dimension, seed=1, amplitude=amplitude)
    write_csv(rows[:8], tmp_path / "train.csv")  # subjects 8 and 9 are held out
    config = base_config("train.csv", steps1=steps[0], steps2=steps[1])
    config["architecture"] = tiny_architecture_config(dimension, size, channels, refinement=1 if steps[1] else 0)
    if not steps[1]:
        del config["schedule"]["stage2"]
    config.update(batch_size=batch, checkpoint={"every": 1000}, optimizer={"lr": lr})
    out = tmp_path / "out"
    _, result = train(tmp_path, out, config)
    totals = [r["total"] for r in read_log(out)]
    before, after = float(np.mean(totals[:20])), float(np.mean(totals[-20:]))
    dice_identity, dice_model = held_out_dice(result.final_model, tmp_path, rows[8], rows[9])
    print(f"{dimension}-D: loss {before:.4f} -> {after:.4f}; held-out Dice identity {dice_identity:.3f} "
          f"-> model {dice_model:.3f}")
    assert after < 0.5 * before
    assert dice_model > dice_identity + 0.04


@pytest.mark.slow
def test_multi_sequence_real_images_train_with_loss_randomisation(shared_data, tmp_path):
    """BraTS FLAIR + T1c (co-registered sequences of one session): variant R draws the loss images
    among them. A few steps on 3-D real images, cached, then the model registers a held-out pair."""
    cases = sorted(p for p in (shared_data / "deepmedic_brats2013").glob("*/brats_*") if p.is_dir())
    assert len(cases) >= 4
    rows = []
    for case in cases[:4]:  # two subjects to train on, two held out
        for sequence, modality in (("Flair", "flair"), ("T1c", "t1c")):
            rows.append({"image": str(case / f"{sequence}_subtrMeanDivStd.nii.gz"), "subject": case.name,
                         "modality": modality, "group": "s", "mask": str(case / "brainmask.nii.gz")})
    write_csv(rows[:4], tmp_path / "brats.csv")
    config = base_config("brats.csv", steps1=4, steps2=0)
    config["architecture"] = tiny_architecture_config(3, 24, (4, 8, 8), refinement=0)
    del config["schedule"]["stage2"]
    config["objective"] = {"kind": "gradicon", "similarity": "lncc2", "loss_randomisation": "R"}
    config["datasets"][0].update(region="brain", mask_mode="input")
    config.update(batch_size=1, loader={"workers": 0, "cache_dir": "cache"})
    out = tmp_path / "out"
    _, result = train(tmp_path, out, config)
    log = read_log(out)
    assert len(log) == 4 and all(np.isfinite(r["total"]) for r in log)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) > 0
    import itk

    from itk_gradicon import register

    held = rows[-4:]
    result = register(itk.imread(held[0]["image"], itk.F), itk.imread(held[3]["image"], itk.F),
                      model=str(out / "final.pt"), fixed_modality="mri", moving_modality="mri", device="cpu")
    assert result.forward_field.array.shape[:3] == (155, 240, 240)


def test_resume_goes_on_from_a_model_file_whose_record_changed_but_not_its_weights():
    """A finetuning run resumes when the model file it started from was rewritten with the same weights (a
    newer itk_gradicon's record), and says so; other weights, or a checkpoint that does not know the
    weights it started from, are refused."""
    from types import SimpleNamespace

    from itk_gradicon.errors import ConfigError
    from itk_gradicon.training.checkpoints import check_parent, weights_sha256

    network = torch.nn.Conv3d(1, 2, 3)
    state = {"parent_sha256": "a" * 64, "parent_weights_sha256": weights_sha256(network)}
    assert check_parent(state, SimpleNamespace(sha256="a" * 64, network=network), "m") is None
    rewritten = SimpleNamespace(sha256="b" * 64, network=network)
    note = check_parent(state, rewritten, "m")
    assert "same weights" in note and "resuming" in note
    other = torch.nn.Conv3d(1, 2, 3)
    with pytest.raises(ConfigError, match=r"sha256 differs, and so do its weights"):
        check_parent(state, SimpleNamespace(sha256="b" * 64, network=other), "m")
    with pytest.raises(ConfigError, match=r"\(sha256 differs\)$"):  # a checkpoint written before the digest
        check_parent({"parent_sha256": "a" * 64}, rewritten, "m")
    assert check_parent(state, None, "m") is None
