"""``gradicon register-batch``: a cohort from a CSV file, one model load, per-pair errors and outputs.

With the tiny random 3-D model: every good pair gets exactly what ``gradicon register`` writes for
it, a bad pair is reported on one line and leaves nothing, the others still run; batching several
pairs through the network (threads feeding one batch) gives the same transforms as pair by pair.
"""

from __future__ import annotations

import csv
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import blob_volume, make_image
from itk_gradicon.commands.batch import COLUMNS, BatchingPredictor, read_pairs, register_pairs
from itk_gradicon.cli import main
from itk_gradicon.errors import InputError

SHAPE = (20, 22, 24)


@pytest.fixture
def cohort(tmp_path, rng):
    """Three pairs of images in ``tmp_path/images`` and an empty ``tmp_path/out``."""
    import itk

    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "b", "c"):
        for role, scale in (("fixed", 200), ("moving", 150)):
            image = make_image(blob_volume(SHAPE, rng) * scale, spacing=(1.2, 1.0, 0.9), origin=(-5, 3, 2))
            itk.imwrite(image, str(images / f"{name}_{role}.nii.gz"))
    (tmp_path / "out").mkdir()
    return tmp_path


def write_csv(path: Path, rows, header=("fixed", "moving", "out_transform", "out_inverse_transform")):
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def standard_rows(names=("a", "b", "c")):
    return [(f"images/{n}_fixed.nii.gz", f"images/{n}_moving.nii.gz", f"out/{n}.h5", f"out/{n}_inv.nii.gz")
            for n in names]


def invoke(args):
    return CliRunner().invoke(main, ["register-batch", *args])


def read_field(path: Path) -> np.ndarray:
    import itk

    if str(path).endswith(".h5"):
        transform = itk.transformread(str(path))[0]
        field = itk.DisplacementFieldTransform[itk.D, 3].cast(transform).GetDisplacementField()
        return np.asarray(itk.array_from_image(field), dtype=np.float64)
    return np.asarray(itk.array_from_image(itk.imread(str(path))), dtype=np.float64)


# ---- the pairs file -----------------------------------------------------------------------------

def test_read_pairs_resolves_paths_next_to_the_csv(cohort):
    path = write_csv(cohort / "pairs.csv", standard_rows(("a", "b")),
                     header=("Fixed", "moving", "out-transform", "--out-inverse-transform"))
    pairs = read_pairs(path)
    assert [p.number for p in pairs] == [1, 2]
    assert pairs[0].origin == "pairs.csv line 2"
    assert pairs[0].fixed == cohort / "images" / "a_fixed.nii.gz"
    assert pairs[1].outputs.transform == cohort / "out" / "b.h5"
    assert pairs[1].outputs.inverse_transform == cohort / "out" / "b_inv.nii.gz"
    assert pairs[0].inputs == {c: None for c in ("fixed_mask", "moving_mask", "fixed_labels", "moving_labels",
                                                 "initial_transform")}
    inverse_warped = read_pairs(write_csv(cohort / "pairs2.csv", [("images/a_fixed.nii.gz", "images/a_moving.nii.gz",
                                                                   "out/a_on_moving.nii.gz")],
                                          header=("fixed", "moving", "out_inverse_warped")))
    assert inverse_warped[0].outputs.inverse_warped == cohort / "out" / "a_on_moving.nii.gz"
    assert inverse_warped[0].outputs.needs_inverse and inverse_warped[0].outputs.needs_originals


@pytest.mark.parametrize("header,rows,message", [
    (("fixed", "moving", "out_transfrom"), [("f", "m", "t.h5")], "unknown column 'out_transfrom' (did you mean 'out_transform'?)"),
    (("fixed", "out_transform"), [("f", "t.h5")], "needs the columns fixed, moving"),
    (("fixed", "moving"), [("f", "m")], "needs the columns fixed, moving and at least one of"),
    (("fixed", "moving", "out_transform"), [("f", "", "t.h5")], "pairs.csv line 2 has no moving image"),
    (("fixed", "moving", "out_transform", "out_warped"), [("f", "m", "", "")], "line 2 has no output"),
    (("fixed", "moving", "out_transform"), [("f", "m", "t.h5"), ("g", "n", "./t.h5")],
     "pairs.csv line 3 and pairs.csv line 2 would both write"),
    (("fixed", "moving", "out_transform"), [], "lists no pairs"),
    (("fixed", "moving", "out_transform"), [("f", "m", "t.h5", "extra")], "line 2 has 4 values for 3 columns"),
    (("fixed", "fixed", "moving", "out_transform"), [("f", "f", "m", "t.h5")], "has the column 'fixed' twice"),
])
def test_read_pairs_refuses_bad_files(tmp_path, header, rows, message):
    path = write_csv(tmp_path / "pairs.csv", rows, header=header)
    with pytest.raises(InputError) as err:
        read_pairs(path)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_columns_are_the_register_flags():
    from itk_gradicon.cli.register_cmd import register

    assert set(COLUMNS) <= {p.name for p in register.params}


# ---- the command -------------------------------------------------------------------------------

def test_register_batch_matches_register_pair_by_pair(cohort, tiny_model_file):
    pairs = write_csv(cohort / "pairs.csv", standard_rows())
    result = invoke(["--pairs", str(pairs), "--model", str(tiny_model_file), "--device", "cpu",
                     "--report", str(cohort / "report.csv")])
    assert result.exit_code == 0, result.output
    assert "3 of 3 pair(s) registered" in result.output
    closing = [line for line in result.output.splitlines() if ": done in " in line]
    assert len(closing) == 3 and not any("interpreter and imports" in line for line in closing)  # not per pair
    single = cohort / "single"
    single.mkdir()
    for name in ("a", "b", "c"):
        one = CliRunner().invoke(main, ["register", "--fixed", str(cohort / f"images/{name}_fixed.nii.gz"),
                                        "--moving", str(cohort / f"images/{name}_moving.nii.gz"),
                                        "--model", str(tiny_model_file), "--device", "cpu",
                                        "--out-transform", str(single / f"{name}.h5"),
                                        "--out-inverse-transform", str(single / f"{name}_inv.nii.gz")])
        assert one.exit_code == 0, one.output
        for suffix in (".h5", "_inv.nii.gz"):
            batch_field = read_field(cohort / "out" / f"{name}{suffix}")
            assert np.abs(batch_field).max() > 0.01
            np.testing.assert_array_equal(batch_field, read_field(single / f"{name}{suffix}"))
    with open(cohort / "report.csv") as fh:
        report = list(csv.DictReader(fh))
    assert [r["status"] for r in report] == ["ok", "ok", "ok"]
    assert [r["origin"] for r in report] == ["pairs.csv line 2", "pairs.csv line 3", "pairs.csv line 4"]


def test_a_bad_pair_is_reported_and_the_others_are_registered(cohort, tiny_model_file):
    rows = standard_rows()
    rows[1] = ("images/b_fixed.nii.gz", "images/missing.nii.gz", "out/b.h5", "out/b_inv.nii.gz")
    pairs = write_csv(cohort / "pairs.csv", rows)
    result = invoke(["--pairs", str(pairs), "--model", str(tiny_model_file), "--device", "cpu",
                     "--report", str(cohort / "report.csv")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "1 of 3 pair(s) failed" in errors[0] and "missing.nii.gz" in errors[0]
    assert any("pairs.csv line 3: failed:" in line for line in result.output.splitlines())
    assert sorted(p.name for p in (cohort / "out").iterdir()) == ["a.h5", "a_inv.nii.gz", "c.h5", "c_inv.nii.gz"]
    with open(cohort / "report.csv") as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["ok", "failed", "ok"]


def test_stop_on_error_stops_at_the_first_failure(cohort, tiny_model_file):
    rows = standard_rows()
    rows[0] = ("images/a_fixed.nii.gz", "images/missing.nii.gz", "out/a.h5", "out/a_inv.nii.gz")
    pairs = write_csv(cohort / "pairs.csv", rows)
    result = invoke(["--pairs", str(pairs), "--model", str(tiny_model_file), "--device", "cpu",
                     "--stop-on-error"])
    assert result.exit_code == 2, result.output
    assert "2 not started (--stop-on-error)" in result.output
    assert list((cohort / "out").iterdir()) == []


def test_a_bad_pairs_file_exits_2_before_any_work(cohort, tiny_model_file):
    pairs = write_csv(cohort / "pairs.csv", [("f", "m", "t.h5")], header=("fixed", "moving", "out_trasform"))
    result = invoke(["--pairs", str(pairs), "--model", str(tiny_model_file)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("Error: --pairs 'pairs.csv' has an unknown column")


def test_reduced_precision_needs_a_gpu(cohort, tiny_model_file):
    pairs = write_csv(cohort / "pairs.csv", standard_rows(("a",)))
    result = invoke(["--pairs", str(pairs), "--model", str(tiny_model_file), "--device", "cpu",
                     "--precision", "bfloat16"])
    assert result.exit_code == 2
    assert "Error: --precision bfloat16 is for CUDA devices" in result.output
    assert list((cohort / "out").iterdir()) == []


def test_register_batch_with_instance_optimisation(cohort, tiny_model_file):
    pairs = write_csv(cohort / "pairs.csv", standard_rows(("a", "b")))
    result = invoke(["--pairs", str(pairs), "--model", str(tiny_model_file), "--device", "cpu",
                     "--io-iterations", "2", "--seed", "3", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (cohort / "out").iterdir()) == ["a.h5", "a_inv.nii.gz", "b.h5", "b_inv.nii.gz"]
    assert "note: --batch-size 2 applies to prediction only" in result.output


# ---- batching several pairs through the network ------------------------------------------------

def test_batched_pairs_equal_pair_by_pair(cohort, tiny_model_file):
    """Two worker threads feed one network batch; transforms equal those of one pair at a time."""
    pairs = read_pairs(write_csv(cohort / "pairs.csv", standard_rows()))
    one_by_one = register_pairs(pairs, model=str(tiny_model_file), device="cpu", batch_size=1)
    fields = {n: read_field(cohort / "out" / f"{n}.h5") for n in ("a", "b", "c")}
    for path in (cohort / "out").iterdir():
        path.unlink()
    batched = register_pairs(pairs, model=str(tiny_model_file), device="cpu", batch_size=2)
    assert not one_by_one.failed and not batched.failed
    assert one_by_one.batches == [] and sorted(batched.batches) == [1, 2]
    for name, field in fields.items():
        np.testing.assert_allclose(read_field(cohort / "out" / f"{name}.h5"), field, atol=1e-4)


class _Doubler(torch.nn.Module):
    """A stand-in network whose map moves every point by ``A - B`` (per batch entry)."""

    def forward(self, image_A, image_B):
        from itk_gradicon.network.operators import CubeMap

        return CubeMap(((image_A - image_B).expand(-1, 3, -1, -1, -1).contiguous(),))


def test_batching_predictor_splits_results_and_directions():
    predictor = BatchingPredictor(batch_size=3, workers=3)
    net = _Doubler()
    inputs = [(torch.full((1, 1, 4, 4, 4), float(i)), torch.zeros(1, 1, 4, 4, 4), i % 2 == 0) for i in range(3)]
    results = [None] * 3

    def call(i):
        a, b, inverse = inputs[i]
        results[i] = predictor(net, a, b, inverse=inverse)
        predictor.worker_finished()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert predictor.batches == [3]
    for i, (ab, ba) in enumerate(results):
        assert torch.allclose(ab, torch.full((1, 3, 4, 4, 4), float(i)), atol=1e-6)
        assert (ba is not None) == (i % 2 == 0)
        if ba is not None:
            assert torch.allclose(ba, torch.full((1, 3, 4, 4, 4), -float(i)), atol=1e-6)


def test_batching_predictor_hands_errors_to_every_waiting_pair():
    class Broken(torch.nn.Module):
        def forward(self, image_A, image_B):
            raise RuntimeError("device lost")

    predictor = BatchingPredictor(batch_size=2, workers=2)
    broken = Broken()
    errors = []

    def call():
        try:
            predictor(broken, torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4), inverse=False)
        except RuntimeError as err:
            errors.append(str(err))
        finally:
            predictor.worker_finished()

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == ["device lost", "device lost"]


# ---- shards, resuming, reports ------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_shards_cover_the_pairs_exactly_once(cohort, n):
    from itk_gradicon.commands.batch import select_shard

    rows = [("images/a_fixed.nii.gz", "images/a_moving.nii.gz", f"out/{i}.h5", "") for i in range(10)]
    pairs = read_pairs(write_csv(cohort / "pairs.csv", rows, header=("fixed", "moving", "out_transform",
                                                                      "out_warped")))
    shards = [select_shard(pairs, k, n) for k in range(1, n + 1)]
    numbers = sorted(p.number for shard in shards for p in shard)
    assert numbers == list(range(1, 11))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert select_shard(pairs, 1, n) == select_shard(read_pairs(cohort / "pairs.csv"), 1, n)  # deterministic


@pytest.mark.parametrize("shard, message", [("0/3", "K must be between 1 and N"), ("4/3", "K must be between 1"),
                                            ("a/b", "expected K/N"), ("3", "expected K/N")])
def test_bad_shards_are_one_line_errors(cohort, tiny_model_file, shard, message):
    write_csv(cohort / "pairs.csv", standard_rows())
    result = invoke(["--pairs", str(cohort / "pairs.csv"), "--model", str(tiny_model_file), "--shard", shard])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert list((cohort / "out").iterdir()) == []


def test_shards_with_reports_merge_into_one(cohort, tiny_model_file):
    write_csv(cohort / "pairs.csv", standard_rows())
    for k in (1, 2):
        result = invoke(["--pairs", str(cohort / "pairs.csv"), "--model", str(tiny_model_file), "--shard", f"{k}/2",
                         "--report", str(cohort / f"report_{k}.csv"), "--moving-modality", "mri",
                         "--fixed-modality", "mri"])
        assert result.exit_code == 0, result.output
        assert f"(shard {k}/2 of 3 pairs)" in result.output
    assert sorted(p.name for p in (cohort / "out").iterdir()) == sorted(
        ["a.h5", "a_inv.nii.gz", "b.h5", "b_inv.nii.gz", "c.h5", "c_inv.nii.gz"])
    merged = CliRunner().invoke(main, ["merge-reports", "--out", str(cohort / "report.csv"),
                                       str(cohort / "report_2.csv"), str(cohort / "report_1.csv")])
    assert merged.exit_code == 0, merged.output
    with open(cohort / "report.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["pair"] for r in rows] == ["1", "2", "3"] and {r["status"] for r in rows} == {"ok"}
    twice = CliRunner().invoke(main, ["merge-reports", "--out", str(cohort / "again.csv"),
                                      str(cohort / "report_1.csv"), str(cohort / "report_1.csv")])
    assert twice.exit_code == 2 and "pair 1 is in both" in twice.output
    assert not (cohort / "again.csv").exists()


def test_a_killed_run_resumed_with_skip_existing_finishes_the_rest(cohort, tiny_model_file, monkeypatch):
    """A run killed during pair 2 leaves pair 1 complete and nothing of pair 2; --skip-existing then
    registers pairs 2 and 3 only, and leaves pair 1's files untouched."""
    import os

    from itk_gradicon.commands import register as registration_io

    write_csv(cohort / "pairs.csv", standard_rows())
    real = registration_io.write_register_outputs
    calls = []

    def killed_during_the_second(result, outputs, **kwargs):
        calls.append(outputs.transform)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the kill arrives while pair 2 writes
        return real(result, outputs, **kwargs)

    monkeypatch.setattr(registration_io, "write_register_outputs", killed_during_the_second)
    args = ["--pairs", str(cohort / "pairs.csv"), "--model", str(tiny_model_file), "--moving-modality", "mri",
            "--fixed-modality", "mri"]
    result = invoke(args)
    assert result.exit_code != 0
    assert sorted(p.name for p in (cohort / "out").iterdir()) == ["a.h5", "a_inv.nii.gz"]
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (cohort / "out").iterdir()}
    monkeypatch.setattr(registration_io, "write_register_outputs", real)
    resumed = invoke([*args, "--skip-existing", "--report", str(cohort / "report.csv")])
    assert resumed.exit_code == 0, resumed.output
    assert "skipped (outputs exist)" in resumed.output and "1 skipped" in resumed.output
    assert "ETA" in resumed.output
    assert sorted(p.name for p in (cohort / "out").iterdir()) == sorted(
        ["a.h5", "a_inv.nii.gz", "b.h5", "b_inv.nii.gz", "c.h5", "c_inv.nii.gz"])
    for name, (mtime, content) in before.items():
        path = cohort / "out" / name
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == content
    with open(cohort / "report.csv", newline="") as fh:
        assert [r["status"] for r in csv.DictReader(fh)] == ["skipped", "ok", "ok"]
    assert not any(name.startswith(".gradicon-partial") for name in os.listdir(cohort / "out"))
