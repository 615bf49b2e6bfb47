"""Shared pieces of the command line: error handling, common options, messages.

Commands stay thin: they validate their options, hand off to library functions and report. Heavy
modules (torch, itk) are imported inside the commands so that ``gradicon --help`` is fast.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Optional

import click

from ..errors import GradiconError


class GradiconGroup(click.Group):
    """A click group that turns user errors into a one-line message and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GradiconError as err:
            click.echo(f"Error: {err}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted; no output was written.", err=True)
            ctx.exit(130)


def info(message: str, *, quiet: bool = False) -> None:
    """A progress or status line on stderr (stdout stays free for machine-readable output)."""
    if not quiet:
        click.echo(message, err=True)


def model_option(default: Optional[str] = "unigradicon") -> Callable:
    return click.option(
        "--model", "model", default=default, show_default=True, metavar="NAME|FILE",
        help="Published model name (unigradicon, multigradicon; downloaded on first use) or a weight "
             "file: a published-format .trch state dict or a model file written by 'gradicon train'.")


def device_option() -> Callable:
    return click.option(
        "--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N",
        help="Compute device; auto uses a GPU when PyTorch sees one.")


def _apply_threads(ctx: click.Context, param: click.Parameter, value: Optional[int]) -> None:
    from ..threads import apply_threads, resolve_threads

    try:
        apply_threads(resolve_threads(value))
    except GradiconError as err:
        raise click.BadParameter(str(err)) from None


def threads_option() -> Callable:
    """``--threads N``: applied while the options are parsed, before the command's work starts."""
    return click.option(
        "--threads", type=click.IntRange(min=1), default=None, expose_value=False, callback=_apply_threads,
        help="Threads of torch, ITK, SimpleITK and elastix.  [default: $OMP_NUM_THREADS for torch and "
             "$ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS for ITK where set, else the cores this process may run on]")


def quiet_option() -> Callable:
    return click.option("--quiet", "-q", is_flag=True, help="Print nothing but errors.")


def existing_file(**kwargs) -> click.Path:
    return click.Path(exists=True, dir_okay=False, readable=True, **kwargs)


def format_number(value: float) -> str:
    """A number as a person writes it in a help text: ``-1000``, ``0.99``, ``2e-5``."""
    text = f"{value:g}"
    mantissa, e, exponent = text.partition("e")
    return f"{mantissa}e{int(exponent)}" if e else text


def format_seconds(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class ProgressLine:
    """A single updating status line on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()

    def update(self, text: str, *, final: bool = False) -> None:
        if self.quiet:
            return
        if self.tty:
            click.echo(f"\r\033[K{text}", err=True, nl=final)
        else:
            click.echo(text, err=True)
