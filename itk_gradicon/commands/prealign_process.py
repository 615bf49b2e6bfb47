"""``gradicon register``'s pre-alignment in a second process, begun while the first one starts up.

A ``gradicon register`` process spends its first seconds importing torch, and its pre-alignment's first
seconds loading ITK Python's elastix modules (ITK's wrapping loads dozens of modules); both are work of one
interpreter on one core. Forked before torch is imported, a second process loads the elastix modules while
the first imports torch, loads the model and checks the inputs; it then reads the images and masks from
their files (the same readers, so the same pixels: at once where they are small, :data:`EARLY_READ_SHARE`,
else when the job comes) and runs :func:`~itk_gradicon.pipeline.affine.prealign` while the first process
reads them for the network. On a 2-core machine this takes about two seconds off
the default ``register`` (figures: ``benchmarks/ACCURACY.md``). The result is the one computed in the first
process: the same images, options, seed and thread count (the tests compare the affine files byte for byte
and the fields voxel for voxel). Both processes hold the images while the pre-alignment runs.

The second process is used only where it is safe and pays: a Linux process (``fork``) with at least two
cores, and at least two threads allowed (``--threads 1`` keeps one process), that has loaded neither torch
nor ITK Python yet and runs no other thread (a command-line run, not a library call or a cohort), and only
when a pre-alignment may be computed. Setting the environment variable
:data:`SWITCH` to ``0`` turns it off. An error of the pre-alignment (an elastix failure, an unreadable mask)
is raised in the first process where it would have been raised there; if the second process dies, the first
computes the pre-alignment itself and says so.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from ..errors import GradiconError
from ..threads import itk_threads

#: Environment variable: ``0`` (or ``false``, ``no``, ``off``) computes the pre-alignment in the process itself.
SWITCH = "ITK_GRADICON_PREALIGN_PROCESS"
_OFF = ("0", "false", "no", "off")
#: The second process reads the images and masks as soon as its modules are loaded, before its job comes (while
#: the first process still loads the model), only where they take at most this share of the memory available
#: (12 bytes per value: the float32 copy and the pixels as stored): larger inputs are read once the job comes,
#: after the first process's memory check.
EARLY_READ_SHARE = 0.1
#: The command-line flags of the files the pre-alignment reads.
INPUT_FLAGS = ("--fixed", "--moving", "--fixed-mask", "--moving-mask")


@dataclass(frozen=True)
class PrealignmentJob:
    """What the second process pre-aligns: the files as given (``None`` where a mask is absent), the model's
    image dimension and the transform (``"affine"`` or ``"rigid"``)."""

    fixed: Path
    moving: Path
    fixed_mask: Optional[Path]
    moving_mask: Optional[Path]
    dimension: int
    transform: str

    @property
    def files(self) -> Dict[str, Optional[Path]]:
        """The input files under their command-line flags."""
        return dict(zip(INPUT_FLAGS, (self.fixed, self.moving, self.fixed_mask, self.moving_mask)))

    def run(self, log: Callable[[str], None], early: Optional["EarlyInputs"] = None):
        """Read the inputs as ``gradicon register`` reads them (the same function; ``early``'s where it read these
        files already) and pre-align them."""
        from ..pipeline.affine import prealign
        from .files import read_images_and_masks

        inputs = early.for_job(self) if early is not None else None
        fixed, moving, _, _, masks = inputs if inputs is not None else read_images_and_masks(self.files, self.dimension)
        return prealign(fixed, moving, masks["fixed_mask"], masks["moving_mask"], transform=self.transform, log=log)


@dataclass(frozen=True)
class EarlyInputs:
    """The images and masks the second process read before its job came (``read_images_and_masks``'s result)."""

    files: Dict[str, Optional[Path]]
    inputs: tuple

    @classmethod
    def read(cls, files: Optional[Dict[str, Optional[Path]]]) -> Optional["EarlyInputs"]:
        """``files`` read where they take at most :data:`EARLY_READ_SHARE` of the available memory; ``None``
        otherwise, and on any error (the job then reads them itself and meets the error as the command would)."""
        if not files:
            return None
        from .files import read_images_and_masks

        try:
            if not _small_enough(files):
                return None
            return cls(dict(files), read_images_and_masks(files, None))
        except Exception:  # noqa: BLE001 - reported, if at all, by the job's own read
            return None

    def for_job(self, job: PrealignmentJob) -> Optional[tuple]:
        """The inputs, where they are ``job``'s files of ``job``'s dimension."""
        return self.inputs if self.files == job.files and self.inputs[0].GetDimension() == job.dimension else None


def _small_enough(files: Dict[str, Optional[Path]]) -> bool:
    from ..io.images import read_image_header
    from ..resources import available_host_memory

    available, _ = available_host_memory()
    if available is None:
        return False
    values = 0
    for path in files.values():
        if path is not None:
            header = read_image_header(path)
            values += header.num_voxels * header.components
    return 12 * values <= EARLY_READ_SHARE * available


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def can_start() -> bool:
    """Whether this process may fork the pre-alignment off (see the module documentation)."""
    import multiprocessing

    return (os.environ.get(SWITCH, "1").strip().lower() not in _OFF
            and sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()
            and "torch" not in sys.modules and "itk" not in sys.modules
            and threading.active_count() == 1 and _available_cores() >= 2 and itk_threads() >= 2)


class PrealignmentProcess:
    """The second process: :meth:`start` it early, :meth:`submit` a job once the transform is known, collect
    the :meth:`result`; :meth:`close` in every case."""

    def __init__(self, process, connection) -> None:
        self._process, self._connection = process, connection
        self._submitted = self._collected = False

    @classmethod
    def start(cls, files: Optional[Dict[str, Optional[Path]]] = None) -> Optional["PrealignmentProcess"]:
        """The process, loading the elastix modules (then reading ``files``, ``--fixed``, ``--moving``,
        ``--fixed-mask`` and ``--moving-mask``, where they are small: :class:`EarlyInputs`); ``None`` where
        :func:`can_start` says no or it cannot be started."""
        if not can_start():
            return None
        import multiprocessing

        context = multiprocessing.get_context("fork")
        try:
            ours, theirs = context.Pipe()
            process = context.Process(target=_serve, args=(theirs, None, files), name="itk_gradicon-prealignment",
                                      daemon=True)
            process.start()
        except OSError:
            return None
        theirs.close()
        return cls(process, ours)

    def submit(self, job: PrealignmentJob) -> bool:
        """Hand ``job`` over; ``False`` if the process is gone (the caller pre-aligns itself)."""
        try:
            self._connection.send(job)
        except (OSError, ValueError):
            return False
        self._submitted = True
        return True

    def result(self) -> Tuple[Optional[object], List[str], float, str]:
        """Wait for the submitted job: ``(prealignment, messages, seconds, failure)``.

        ``prealignment`` is the :class:`~itk_gradicon.pipeline.affine.Prealignment` and ``messages`` what
        :func:`~itk_gradicon.pipeline.affine.prealign` logged, in order; ``seconds`` the job's own time there.
        Where the process died or failed without a user error, ``prealignment`` is ``None`` and ``failure``
        says why (the caller then pre-aligns itself).

        Raises:
            GradiconError: the pre-alignment's own error (an elastix failure, an unreadable mask).
        """
        self._collected = True
        try:
            status, value, messages, seconds = self._connection.recv()
        except (EOFError, OSError) as err:
            code = self._process.exitcode
            return None, [], 0.0, f"it ended without a result ({'exit code ' + str(code) if code else err})"
        if status == "error":
            raise value
        if status == "failed":
            return None, messages, seconds, value
        return value, messages, seconds, ""

    def close(self) -> None:
        """End the process: told to stop where it has no job, stopped where its job was not collected (the
        command failed before it needed the pre-alignment)."""
        try:
            if not self._submitted:
                self._connection.send(None)
        except (OSError, ValueError):
            pass
        self._connection.close()
        self._process.join(timeout=0.0 if self._submitted and not self._collected else 1.0)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join()


def _serve(connection, prepare: Optional[Callable[[], None]] = None,
           files: Optional[Dict[str, Optional[Path]]] = None) -> None:
    """The second process: ``prepare`` (load the elastix modules) and read ``files`` where they are small
    (:class:`EarlyInputs`), then run one job (or none) and send its
    outcome: ``("done", prealignment, messages, seconds)``, ``("error", GradiconError, ...)`` or
    ``("failed", text, ...)``. Ctrl-C is the first process's to handle (it stops this one); a first process
    that is gone ends this one without a word."""
    if threading.current_thread() is threading.main_thread():  # the forked process (tests serve on a thread)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        (prepare or _load_elastix_modules)()
    except Exception:  # noqa: BLE001 - the job's own run meets and reports the same failure
        pass
    early = EarlyInputs.read(files)
    try:
        job = connection.recv()
    except (EOFError, OSError):
        return
    if job is None:
        return
    messages: List[str] = []
    started = time.perf_counter()
    try:
        reply = ("done", job.run(messages.append, early), messages, time.perf_counter() - started)
    except GradiconError as err:
        reply = ("error", err, messages, time.perf_counter() - started)
    except BaseException as err:  # noqa: BLE001 - a bug or an interrupt: the first process pre-aligns itself
        reply = ("failed", f"{type(err).__name__}: {err}", messages, time.perf_counter() - started)
    try:
        connection.send(reply)
    except (OSError, EOFError):  # the first process is gone (killed): nobody to tell
        pass
    except Exception as err:  # noqa: BLE001 - an error that does not pickle (raised before anything is sent)
        with contextlib.suppress(OSError, EOFError):
            connection.send(("failed", f"{type(err).__name__}: {err}", messages, time.perf_counter() - started))
    connection.close()


def _load_elastix_modules() -> None:
    """Load what :func:`~itk_gradicon.pipeline.affine.prealign` will use of ITK Python, without torch.

    ITK's array helpers import torch when it is installed (to accept tensors), which would put back in
    this process the import it runs beside; it never receives a tensor here, so the helpers are told that
    torch is absent (module flags of ITK's ``itk.support``: where an ITK lays them out otherwise, nothing is
    changed and only the time is lost).
    """
    try:
        from itk.support import helpers, types

        helpers._HAVE_TORCH = False
        types._HAVE_TORCH = False
    except ImportError:  # another layout of ITK's support modules: load as they are
        pass
    from ..pipeline.elastix import load_modules

    load_modules()
