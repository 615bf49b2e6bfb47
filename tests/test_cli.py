"""The command line: every subcommand documents itself; user mistakes never show a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from itk_gradicon.cli import main

EXPECTED = ["register", "apply-transform", "warp-labels", "jacobian", "evaluate", "models", "train"]


def test_help_lists_subcommands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in EXPECTED:
        assert name in result.output


@pytest.mark.parametrize("name", sorted(set(main.commands)))
def test_each_subcommand_has_help(name):
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_register_help_states_units_and_defaults():
    text = CliRunner().invoke(main, ["register", "--help"]).output
    for fragment in ("fixed -> moving", "default: the model's recommendation", "default: 2e-5 network; 0.3 field", "Hounsfield", "default: auto",
                     "LPS mm"):
        assert fragment in text, fragment


def test_shim_and_console_script_agree(tmp_path):
    shim = subprocess.run([sys.executable, "bin/gradicon", "--version"], capture_output=True, text=True)
    assert shim.returncode == 0 and "gradicon" in shim.stdout


def _command(*args: str) -> subprocess.CompletedProcess:
    """The command as users run it (``run``, the console script's entry), in a child process."""
    return subprocess.run([sys.executable, "-m", "itk_gradicon", *args], capture_output=True, text=True)


def test_prompt_exit_keeps_status_and_every_line_written_to_a_pipe():
    listed = _command("models", "list")
    assert listed.returncode == 0
    assert listed.stdout == CliRunner().invoke(main, ["models", "list"]).stdout  # nothing lost in the pipe
    refused = _command("register", "--fixed", "missing.nii.gz", "--moving", "missing.nii.gz",
                       "--out-transform", "t.h5")
    assert refused.returncode == 2 and refused.stderr.startswith("Error:") and "Traceback" not in refused.stderr
    assert _command("regster").returncode == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="C stdio through ctypes: Linux")
def test_prompt_exit_keeps_what_c_code_printed():
    """Text that C or C++ code left in stdio's buffer (a pipe is fully buffered) reaches the pipe."""
    import os

    code = ("import ctypes, sys; ctypes.CDLL(None).printf(b'printed by C\\n'); "
            "sys.argv = ['gradicon', '--version']; from itk_gradicon.cli import run; run()")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}  # which unbuffers C stdio
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "printed by C" in done.stdout and "gradicon" in done.stdout


def test_exit_status_follows_sys_exit():
    from itk_gradicon.cli import _exit_status

    assert _exit_status(SystemExit(None)) == 0 and _exit_status(SystemExit(3)) == 3
    assert _exit_status(SystemExit("stopped")) == 1


@pytest.mark.skipif(sys.gettrace() is not None or sys.getprofile() is not None, reason="traced run (coverage)")
def test_shutdown_kept_while_a_child_process_lives():
    import multiprocessing
    import time

    from itk_gradicon.cli import _teardown_needed

    assert not _teardown_needed()
    child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(60,))
    child.start()
    try:
        assert _teardown_needed()
    finally:
        child.terminate()
        child.join()
    assert not _teardown_needed()


def test_unknown_subcommand_is_a_usage_error():
    result = CliRunner().invoke(main, ["regster"])
    assert result.exit_code == 2 and "No such command" in result.output


def test_register_help_names_the_library_defaults():
    """The defaults that `register --help` names come from the constants the library uses (written once)."""
    from itk_gradicon.cli.common import format_number
    from itk_gradicon.pipeline import instance, options, preprocess

    assert [format_number(v) for v in (-1000.0, 0.99, 2e-5, 0.3, 0.15, 1e-12, 250)] == \
        ["-1000", "0.99", "2e-5", "0.3", "0.15", "1e-12", "250"]
    assert instance.DEFAULT_LR is options.DEFAULT_LR and instance.DEFAULT_SMOOTHNESS == options.DEFAULT_SMOOTHNESS
    text = " ".join(CliRunner().invoke(main, ["register", "--help"], terminal_width=400).output.split())
    window = " ".join(format_number(v) for v in preprocess.DEFAULT_CT_WINDOW)
    assert f"[default: {window}]" in text
    assert f"[default: minimum and {format_number(preprocess.DEFAULT_MRI_UPPER_QUANTILE)}]" in text
    assert (f"[default: {format_number(options.DEFAULT_LR['network'])} network; "
            f"{format_number(options.DEFAULT_LR['field'])} field, in network voxels]") in text
    assert f"else {format_number(options.DEFAULT_SMOOTHNESS)}]" in text
