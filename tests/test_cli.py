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


def test_unknown_subcommand_is_a_usage_error():
    result = CliRunner().invoke(main, ["regster"])
    assert result.exit_code == 2 and "No such command" in result.output
