"""Exception types raised for problems the user can fix.

Every error a user can cause (a wrong path, an image the model cannot take, a corrupt weight file)
is raised as a subclass of :class:`GradiconError`. The command line turns these into a one-line
message and a non-zero exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib


class GradiconError(Exception):
    """Base class of errors caused by the input, the environment or the configuration."""

    exit_code = 2


class InputError(GradiconError, ValueError):
    """An image, mask, label map, transform or option value that cannot be used as given."""


class ModelError(GradiconError):
    """A model name, weight file or model file that cannot be resolved or loaded."""


class ModelNotAvailableError(ModelError):
    """A published model that is neither cached nor downloadable right now."""


class DeviceError(GradiconError):
    """A compute device that was asked for but is not available."""


class ResourceError(GradiconError):
    """Work that would not fit in the available memory or disk."""


class ConfigError(GradiconError, ValueError):
    """A training configuration that is invalid; the message names the key."""


class TrainingError(GradiconError):
    """Training cannot go on (the loss became non-finite, a checkpoint is unusable, ...)."""


class TrainingStopped(GradiconError):
    """Training was stopped on request (signal); a checkpoint was written."""

    exit_code = 130


def did_you_mean(word: str, candidates) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``candidates`` to ``word``, or ``""``."""
    match = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""
