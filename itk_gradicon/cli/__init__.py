"""The ``gradicon`` command: registration with the GradICON family for ITK, ANTs and elastix users.

Subcommands are defined one per module and imported when the group is built; each imports torch
and itk only when it runs.
"""

from __future__ import annotations

import click

from .. import __version__
from .common import GradiconGroup


@click.group(cls=GradiconGroup, context_settings={"help_option_names": ["-h", "--help"],
                                                  "max_content_width": 100})
@click.version_option(__version__, prog_name="gradicon")
def main() -> None:
    """Deep registration (GradICON, uniGradICON, multiGradICON) with ITK files in and ITK
    transforms out.

    Every transform written maps FIXED physical points to MOVING physical points (the resampling
    convention of ITK, ANTs and elastix); inverse transforms map moving points to fixed points.
    """


def _register_commands() -> None:
    from . import models_cmd, register_cmd

    main.add_command(register_cmd.register)
    main.add_command(models_cmd.models)
    for name in ("apply_cmd", "jacobian_cmd", "evaluate_cmd", "train_cmd", "batch_cmd"):
        try:
            module = __import__(f"{__name__}.{name}", fromlist=["COMMANDS"])
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            continue
        for command in module.COMMANDS:
            main.add_command(command)


_register_commands()
