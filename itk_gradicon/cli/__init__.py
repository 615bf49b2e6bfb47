"""The ``gradicon`` command: registration with the GradICON family for ITK, ANTs and elastix users.

Subcommands are defined in one module per topic, each listing its commands in ``COMMANDS``; they
import torch and itk only when they run, so ``gradicon --help`` answers at once.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import sys

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


def run() -> None:
    """The installed ``gradicon`` command: :func:`main`, then a prompt exit.

    A registration leaves torch and ITK Python loaded, and tearing the interpreter down after the
    work (freeing their modules, running ITK's C++ static destructors) takes most of a second
    (``benchmarks/README.md``, "Design figures"). Every output is written, closed and renamed into
    place before a command returns, so this entry point flushes the standard streams and the logging
    handlers and leaves with :func:`os._exit`, the command's exit status kept. It exits the normal way
    where something still depends on the interpreter's shutdown: a child process alive (data-loader
    workers), a profiler or a tracer (coverage) active. Python callers of :func:`main`, and click's
    test runner, are not affected.
    """
    try:
        main(prog_name="gradicon")
        status = 0
    except SystemExit as done:
        status = _exit_status(done)
    if not _teardown_needed():
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        _flush_c_streams()
        os._exit(status)
    sys.exit(status)


def _flush_c_streams() -> None:
    """Flush the C library's output buffers (what ITK, elastix or any C/C++ code printed with stdio or
    ``std::cout``), which :func:`os._exit` would otherwise drop when the output goes to a file or a pipe."""
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no process-wide C symbol table here (Windows)
        pass


def _exit_status(done: SystemExit) -> int:
    """The status that ``sys.exit(done.code)`` gives: 0 for ``None``, the number, or 1 after printing text."""
    if done.code is None:
        return 0
    if isinstance(done.code, int):
        return done.code
    print(done.code, file=sys.stderr)
    return 1


def _teardown_needed() -> bool:
    """Whether the interpreter's own shutdown still has work to do for someone: live child processes
    (joined by ``multiprocessing`` at exit), or a profiler or tracer that writes its results at exit."""
    if sys.getprofile() is not None or sys.gettrace() is not None:
        return True
    monitoring = getattr(sys, "monitoring", None)  # Python 3.12+: coverage may trace through it
    if monitoring is not None and any(monitoring.get_tool(tool) is not None for tool in range(6)):
        return True
    return bool(multiprocessing.active_children())


def _register_commands() -> None:
    from . import apply_cmd, batch_cmd, evaluate_cmd, jacobian_cmd, models_cmd, register_cmd, train_cmd

    main.add_command(register_cmd.register)
    for module in (batch_cmd, apply_cmd, jacobian_cmd, evaluate_cmd, models_cmd, train_cmd):
        for command in module.COMMANDS:
            main.add_command(command)


_register_commands()
