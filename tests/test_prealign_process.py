"""``gradicon register``'s pre-alignment in a second process (``itk_gradicon.commands.prealign_process``).

The command-line run is compared with the same run in one process (the environment switch) file by file; the
second process's replies (a result, a user error, a failure, no reply at all) are checked on a pipe in this
process, and so is what ``register`` does with each.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from conftest import blob_volume, make_image
from itk_gradicon.commands import prealign_process, register as register_command
from itk_gradicon.errors import InputError

SHAPE = (20, 22, 24)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@pytest.mark.skipif(not sys.platform.startswith("linux") or _cores() < 2,
                    reason="the second process is used on Linux with at least two cores")
def test_the_second_process_writes_what_one_process_writes(tmp_path, rng, tiny_model_file):
    """The default pre-alignment (elastix) computed in the second process gives the same matrix and field as
    in the command's own process, and the log says where it ran."""
    import itk
    import SimpleITK as sitk

    fixed = make_image(blob_volume(SHAPE, rng) * 200, spacing=(1.2, 1.0, 0.9), origin=(-5, 3, 2))
    moving = make_image(blob_volume(SHAPE, rng) * 150, spacing=(1.2, 1.0, 0.9), origin=(-4, 2, 3))
    itk.imwrite(fixed, str(tmp_path / "fixed.nii.gz"))
    itk.imwrite(moving, str(tmp_path / "moving.nii.gz"))
    logs, outs = {}, {}
    for switch in ("1", "0"):
        out = tmp_path / f"out{switch}"
        out.mkdir()
        args = ["register", "--fixed", str(tmp_path / "fixed.nii.gz"), "--moving", str(tmp_path / "moving.nii.gz"),
                "--model", str(tiny_model_file), "--affine", "elastix", "--io-iterations", "0",
                "--out-transform", str(out / "field.nii.gz"), "--out-ants-prefix", str(out / "a_")]
        # a line still in the (piped, so block-buffered) stdout at the fork is written once (multiprocessing
        # flushes the streams before it forks; the child would otherwise flush its copy too)
        code = "import sys\nprint('before the command')\nfrom itk_gradicon.cli import main\nmain(sys.argv[1:])"
        done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                              env={**os.environ, prealign_process.SWITCH: switch})
        assert done.returncode == 0, done.stderr[-2000:]
        logs[switch], outs[switch] = done.stdout + done.stderr, out
    assert "ran in a second process" in logs["1"], logs["1"]
    assert logs["1"].count("before the command") == 1, logs["1"]
    assert "second process" not in logs["0"], logs["0"]
    assert (outs["1"] / "a_0GenericAffine.mat").read_bytes() == (outs["0"] / "a_0GenericAffine.mat").read_bytes()
    fields = [sitk.GetArrayFromImage(sitk.ReadImage(str(outs[s] / "field.nii.gz"))) for s in ("1", "0")]
    assert np.array_equal(fields[0], fields[1])


def test_not_started_in_a_process_with_torch_or_when_switched_off(monkeypatch):
    """A process that has loaded torch (this one) or ITK may have threads: it is never forked."""
    assert "torch" in sys.modules
    assert not prealign_process.can_start()
    assert prealign_process.PrealignmentProcess.start() is None
    monkeypatch.setenv(prealign_process.SWITCH, "0")
    assert not prealign_process.can_start()


class _Job:
    def __init__(self, outcome):
        self.outcome = outcome

    def run(self, log, early=None):
        log("first message")
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


def _reply(outcome):
    """What ``_serve`` sends for a job ending in ``outcome`` (served on a thread of this process)."""
    ours, theirs = multiprocessing.Pipe()
    server = threading.Thread(target=prealign_process._serve, args=(theirs, lambda: None))
    server.start()
    ours.send(_Job(outcome))
    reply = ours.recv()
    server.join()
    return reply


def test_replies_of_the_second_process():
    status, value, messages, seconds = _reply({"matrix": [1, 2]})
    assert (status, value, messages) == ("done", {"matrix": [1, 2]}, ["first message"]) and seconds >= 0
    status, value, messages, _ = _reply(InputError("elastix could not register the pair: too few samples"))
    assert status == "error" and isinstance(value, InputError) and "too few samples" in str(value)
    assert messages == ["first message"]
    status, value, _, _ = _reply(RuntimeError("a bug"))
    assert status == "failed" and value == "RuntimeError: a bug"


class _FakeProcess:
    exitcode = -9

    def join(self, timeout=None):
        pass

    def is_alive(self):
        return False


def _background(reply=None):
    """A ``PrealignmentProcess`` whose other end sends ``reply`` (or dies without a word)."""
    ours, theirs = multiprocessing.Pipe()
    if reply is not None:
        theirs.send(reply)
    theirs.close()
    background = prealign_process.PrealignmentProcess(_FakeProcess(), ours)
    background._submitted = True
    return background


def test_result_raises_the_user_error_and_reports_a_death():
    with pytest.raises(InputError, match="bad mask"):
        _background(("error", InputError("bad mask"), [], 0.1)).result()
    found, messages, seconds, failure = _background().result()
    assert found is None and messages == [] and "exit code -9" in failure


class Found:
    """What ``register`` reads of a :class:`~itk_gradicon.pipeline.affine.Prealignment`."""

    matrix, transform, start, similarity, rejected, roles_swapped, rotation = np.eye(4), "affine", "header", \
        1.2, (), False, None


def test_register_pre_aligns_itself_when_the_second_process_fails(monkeypatch):
    """No result from the second process: the command computes the pre-alignment itself and says so."""
    from itk_gradicon.pipeline import affine

    calls = []
    monkeypatch.setattr(affine, "prealign", lambda *args, **kwargs: calls.append(kwargs) or Found())
    inputs = register_command._Inputs(fixed="F", moving="M", fixed_original=None, moving_original=None,
                                      masks={"fixed_mask": None, "moving_mask": None}, labels={})
    log = []
    matrix, info = register_command._prealignment(inputs, "affine", None, log.append, _background())
    assert calls and calls[0]["transform"] == "affine" and np.array_equal(matrix, np.eye(4))
    assert any("second process failed" in line and "pre-aligning here" in line for line in log), log
    assert info["source"] == "elastix"

    calls.clear()
    log.clear()
    matrix, _ = register_command._prealignment(inputs, "affine", None, log.append,
                                               _background(("done", Found(), ["found it"], 2.5)))
    assert not calls and log[1:] == ["found it", "(the pre-alignment ran in a second process begun at start-up: "
                                                  "2.5s there)"]


class _RunningProcess:
    exitcode = None

    def __init__(self):
        self.calls = []

    def join(self, timeout=None):
        self.calls.append(("join", timeout))

    def is_alive(self):
        return not any(call == ("terminate",) for call in self.calls)

    def terminate(self):
        self.calls.append(("terminate",))


def test_close_stops_a_job_the_command_no_longer_needs_at_once():
    """A command that fails after handing the job over (a mask off its grid) ends without waiting for elastix;
    an unused process is told to stop and given a second."""
    ours, theirs = multiprocessing.Pipe()
    running = _RunningProcess()
    background = prealign_process.PrealignmentProcess(running, ours)
    assert background.submit("job")
    assert theirs.recv() == "job"
    background.close()
    assert running.calls[0] == ("join", 0.0) and ("terminate",) in running.calls

    ours, theirs = multiprocessing.Pipe()
    idle = _RunningProcess()
    prealign_process.PrealignmentProcess(idle, ours).close()
    assert theirs.recv() is None and idle.calls[0] == ("join", 1.0)


@pytest.mark.skipif(not sys.platform.startswith("linux") or _cores() < 2,
                    reason="the second process is used on Linux with at least two cores")
def test_ctrl_c_stops_both_processes_and_writes_nothing(tmp_path, rng, tiny_model_file):
    """Ctrl-C (SIGINT to the process group) while the command waits for its pre-alignment: exit status 130,
    the one-line message, no output file, no traceback, and no process left behind."""
    import signal
    import time

    import itk

    shape = (60, 64, 56)
    for name, scale in (("fixed", 200), ("moving", 150)):
        image = make_image(blob_volume(shape, rng) * scale, spacing=(1.0, 1.0, 1.0))
        itk.imwrite(image, str(tmp_path / f"{name}.nii.gz"))
    out = tmp_path / "out"
    out.mkdir()
    code = "import sys\nfrom itk_gradicon.cli import main\nmain(sys.argv[1:])"
    args = ["register", "--fixed", str(tmp_path / "fixed.nii.gz"), "--moving", str(tmp_path / "moving.nii.gz"),
            "--model", str(tiny_model_file), "--affine", "elastix", "--out-transform", str(out / "t.h5")]

    def as_a_terminal_would_start_it():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.setpgrp()

    process = subprocess.Popen([sys.executable, "-u", "-c", code, *args], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, preexec_fn=as_a_terminal_would_start_it)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "pre-alignment with elastix" in line:
            break
    os.killpg(process.pid, signal.SIGINT)
    rest, _ = process.communicate(timeout=120)
    output = "".join(lines) + rest
    assert process.returncode == 130, output
    assert "Interrupted" in output and "Traceback" not in output, output
    assert list(out.iterdir()) == []
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)  # nothing of the group is left


def _write_pair(tmp_path, rng):
    import itk

    paths = {}
    for name, scale in (("fixed", 200), ("moving", 150)):
        paths[f"--{name}"] = tmp_path / f"{name}.nii.gz"
        itk.imwrite(make_image(blob_volume(SHAPE, rng) * scale), str(paths[f"--{name}"]))
    return {**paths, "--fixed-mask": None, "--moving-mask": None}


def test_early_inputs_are_the_commands_read_and_serve_only_their_own_job(tmp_path, rng, monkeypatch):
    """The second process's early read gives what the command's read gives, and is used only for a job of the same
    files and dimension; a pre-alignment from it is the one from a read at the job's arrival."""
    from itk_gradicon.commands import files as files_module

    paths = _write_pair(tmp_path, rng)
    early = prealign_process.EarlyInputs.read(paths)
    assert early is not None
    job = prealign_process.PrealignmentJob(paths["--fixed"], paths["--moving"], None, None, 3, "rigid")
    assert early.for_job(job) is early.inputs
    again = files_module.read_images_and_masks(paths, 3)
    import SimpleITK as sitk
    for ours, theirs in zip(early.inputs[:2], again[:2]):
        assert np.array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(theirs))
        assert ours.GetOrigin() == theirs.GetOrigin() and ours.GetDirection() == theirs.GetDirection()
    other = prealign_process.PrealignmentJob(paths["--moving"], paths["--fixed"], None, None, 3, "rigid")
    assert early.for_job(other) is None
    assert early.for_job(prealign_process.PrealignmentJob(paths["--fixed"], paths["--moving"], None, None, 2,
                                                          "rigid")) is None
    direct = job.run(lambda message: None)
    def no_read(*args, **kwargs):
        raise AssertionError("read again")
    monkeypatch.setattr(files_module, "read_images_and_masks", no_read)
    from_early = job.run(lambda message: None, early)
    assert np.array_equal(direct.matrix, from_early.matrix)


def test_early_read_skipped_for_large_or_unreadable_inputs(tmp_path, rng, monkeypatch):
    """Inputs above the memory share are left for the job (read after the command's memory check); an unreadable
    file is left for the job too, whose read reports it as the command's would."""
    paths = _write_pair(tmp_path, rng)
    monkeypatch.setattr(prealign_process, "EARLY_READ_SHARE", 0.0)
    assert prealign_process.EarlyInputs.read(paths) is None
    monkeypatch.setattr(prealign_process, "EARLY_READ_SHARE", 0.1)
    (tmp_path / "broken.nii.gz").write_bytes(b"not an image")
    assert prealign_process.EarlyInputs.read({**paths, "--moving": tmp_path / "broken.nii.gz"}) is None
    assert prealign_process.EarlyInputs.read(None) is None
    job = prealign_process.PrealignmentJob(paths["--fixed"], tmp_path / "broken.nii.gz", None, None, 3, "rigid")
    with pytest.raises(InputError, match="broken"):
        job.run(lambda message: None, None)
