"""--threads and the environment: what each library is told, and how many cores a run actually uses."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from itk_gradicon.cli import main
from itk_gradicon.errors import InputError
from itk_gradicon.threads import available_threads, resolve_threads


@pytest.fixture
def restore_threads(monkeypatch):
    """Every thread setting as it was before the test (the option writes the environment too)."""
    import SimpleITK as sitk

    before = torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    saved = {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")}
    for name in saved:
        os.environ.pop(name, None)
    yield
    torch.set_num_threads(before[0])
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before[1])
    if "itk" in sys.modules:
        sys.modules["itk"].MultiThreaderBase.SetGlobalDefaultNumberOfThreads(before[1])
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def test_the_environment_is_respected_where_set(restore_threads, monkeypatch):  # noqa: ARG001
    cores = available_threads()
    assert resolve_threads() == resolve_threads(None)
    assert (resolve_threads().torch, resolve_threads().itk) == (cores, cores)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert (resolve_threads().torch, resolve_threads().itk) == (3, cores)
    monkeypatch.setenv("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "5")
    threads = resolve_threads()
    assert (threads.torch, threads.itk) == (3, 5) and "$OMP_NUM_THREADS" in threads.source
    assert (resolve_threads(2).torch, resolve_threads(2).itk) == (2, 2)  # --threads wins
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    with pytest.raises(InputError, match=r"\$OMP_NUM_THREADS is 'many'; it must be a whole number >= 1"):
        resolve_threads()


def test_threads_option_sets_every_library(restore_threads, tmp_path, tiny_model_file):
    import SimpleITK as sitk

    from conftest import blob_volume, make_image

    import itk

    rng = np.random.default_rng(1)
    for name in ("f", "m"):
        itk.imwrite(make_image(blob_volume((24, 24, 24), rng) * 100), str(tmp_path / f"{name}.nii.gz"))
    result = CliRunner().invoke(main, ["register", "--model", str(tiny_model_file), "--fixed", str(tmp_path / "f.nii.gz"),
                                       "--moving", str(tmp_path / "m.nii.gz"), "--out-transform",
                                       str(tmp_path / "t.h5"), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 1 and sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 1
    assert os.environ["OMP_NUM_THREADS"] == "1" and os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] == "1"
    assert itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads() == 1
    bad = CliRunner().invoke(main, ["register", "--threads", "0", "--fixed", "f", "--moving", "m"])
    assert bad.exit_code == 2 and "--threads" in bad.output and "0" in bad.output


@pytest.mark.slow
def test_one_thread_runs_on_one_core(tmp_path, shared_data):
    """A whole gradicon register (bundled model, pre-alignment, IO) with --threads 1: CPU time / wall time of
    the process at most 1.15 (with two cores and --threads 2 it is about 1.5: measured, not asserted)."""
    pair = shared_data / "lapirn_oasis"
    command = [sys.executable, "-m", "itk_gradicon", "register", "--model", "gradicon-synthbrain-96", "--fixed",
               str(pair / "image_A_160x192x144.nii.gz"), "--moving", str(pair / "image_B_160x192x144.nii.gz"),
               "--out-transform", str(tmp_path / "t.nii.gz"), "--io-iterations", "10", "-q", "--threads", "1"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": ""})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f"--threads 1: {cpu:.1f} s CPU in {wall:.1f} s wall (ratio {cpu / wall:.2f})")
    assert cpu / wall < 1.15
