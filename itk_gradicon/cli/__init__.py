"""The ``gradicon`` command: registration with the GradICON family for ITK, ANTs and elastix users.

Subcommands are defined in one module per topic, each listing its commands in ``COMMANDS``; they
import torch and itk only when they run, so ``gradicon --help`` answers at once.
"""

from __future__ import annotations

import click

from .. import __version__
from ..allocator import keep_freed_memory
from .common import GradiconGroup


@click.group(cls=GradiconGroup, context_settings={"help_option_names": ["-h", "--help"],
                                                  "max_content_width": 100})
@click.version_option(__version__, prog_name="gradicon")
def main() -> None:
    """Deep registration (GradICON, uniGradICON, multiGradICON) with ITK files in and ITK
    transforms out.

    Every transform written maps FIXED physical points to MOVING physical points (the resampling
    convention of ITK, ANTs and elastix); inverse transforms map moving points to fixed points.

    Environment: ITK_GRADICON_SYSTEM_MALLOC=1 keeps glibc's default handling of large memory
    blocks (by default freed blocks are kept for reuse: faster, with a higher memory peak).
    """
    keep_freed_memory()


def _register_commands() -> None:
    from . import apply_cmd, batch_cmd, evaluate_cmd, jacobian_cmd, models_cmd, register_cmd, train_cmd

    main.add_command(register_cmd.register)
    for module in (batch_cmd, apply_cmd, jacobian_cmd, evaluate_cmd, models_cmd, train_cmd):
        for command in module.COMMANDS:
            main.add_command(command)


_register_commands()
