"""Writing every output all or nothing, and checking destinations before any work starts.

Every file this package writes goes through :class:`OutputTransaction`. Files are first written into a
hidden staging folder beside their destination and moved into place together by
:meth:`OutputTransaction.commit`; when anything fails before that, nothing is left behind. Formats that
write a header and a data file (``.mhd``/``.raw``, ``.nhdr``, ``.hdr``/``.img``) work too, because every
file produced in the staging folder is moved. A staging folder left by a writer that died (``kill -9``)
is removed by the next transaction writing into that folder (:func:`remove_stale_staging`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from ..errors import InputError

PathLike = Union[str, "os.PathLike[str]"]


#: ITK's transform writers go through the HDF5 library that ITK (and SimpleITK) bundle, built without
#: thread safety: two transform files written at once from two threads crashed the process (a
#: segmentation fault in ``WriteTransform``, seen when ``gradicon register`` wrote its outputs in
#: parallel). Every transform file is written under this lock; image files (NIfTI) need none.
TRANSFORM_WRITE_LOCK = threading.Lock()


#: File name endings that ITK's image IO factories recognise for writing.
IMAGE_SUFFIXES = (
    ".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".hdr", ".img", ".img.gz", ".vtk", ".tif",
    ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".gipl", ".gipl.gz",
)
#: Endings of formats that store 2-D and 3-D images of any scalar pixel type (float included): what
#: a warped image or a label map can be written as.
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")


def compound_suffix(path: PathLike) -> str:
    """The file name ending that decides the format: ``.nii.gz`` rather than ``.gz``."""
    name = Path(path).name.lower()
    for ending in (".nii.gz", ".img.gz", ".gipl.gz"):
        if name.endswith(ending):
            return ending
    return Path(name).suffix


def check_output_path(path: PathLike, *, what: str = "output",
                      suffixes: Optional[Sequence[str]] = None) -> Path:
    """Check, before any work starts, that ``path`` can be written.

    Args:
        path: destination file.
        what: how the path is named in error messages (e.g. ``"--out-transform"``).
        suffixes: allowed file name endings; ``None`` accepts any.

    Returns:
        The path as an absolute :class:`~pathlib.Path`.

    Raises:
        InputError: the folder does not exist or is not writable, the path is a folder, or the
            file name ending is not one of ``suffixes``.
    """
    path = Path(path).expanduser().absolute()
    if suffixes is not None and compound_suffix(path) not in suffixes:
        raise InputError(
            f"{what} '{path}' has the ending '{compound_suffix(path) or '(none)'}'; "
            f"allowed: {', '.join(suffixes)}")
    if path.is_dir():
        raise InputError(f"{what} '{path}' is a folder; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise InputError(f"{what}: folder '{parent}' does not exist")
    _check_writable(parent, what)
    return path


def _check_writable(folder: Path, what: str) -> None:
    """Refuse a folder where no file can be created.

    ``os.access`` answers for the permission bits only (and says yes to root everywhere), so a file
    is also created and removed: that catches read-only mounts and special file systems.
    """
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{what}: folder '{folder}' is not writable")
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".gradicon-probe-"):
            pass
    except OSError as err:
        raise InputError(f"{what}: folder '{folder}' is not writable ({err.strerror or err})") from None


def check_output_dir(path: PathLike, *, what: str = "output folder", create: bool = True) -> Path:
    """Check that a folder can receive outputs; create it (one level) when ``create`` is true."""
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} '{path}' exists and is not a folder")
    if not path.exists():
        if not create or not path.parent.is_dir():
            raise InputError(f"{what}: folder '{path.parent if create else path}' does not exist")
        _check_writable(path.parent, what)
        return path
    _check_writable(path, what)
    return path


#: Name of a staging folder: its owner's process id and host, then mkdtemp's random part.
STAGING_PREFIX = ".gradicon-partial-"
_STAGING_NAME = re.compile(re.escape(STAGING_PREFIX) + r"(\d+)@(.+)\.[^.]+$")


def _process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, it is not ours
        return True
    return True


def remove_stale_staging(folder: PathLike) -> list[Path]:
    """Remove the staging folders in ``folder`` left by writers that died (``kill -9``, a preempted job).

    A staging folder is named after the process that made it (``.gradicon-partial-PID@HOST.XXXXXXXX``).
    It is removed only when it was made on this host and no process with that id runs any more; folders
    of live processes, of other hosts (a shared file system) and of older releases (no owner in the
    name) are left alone.

    Returns:
        the folders removed.
    """
    removed = []
    host = socket.gethostname()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        found = _STAGING_NAME.match(entry.name)
        if found is None or found.group(2) != host or not entry.is_dir(follow_symlinks=False):
            continue
        pid = int(found.group(1))
        if pid != os.getpid() and not _process_alive(pid):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


class OutputTransaction:
    """All-or-nothing writing of one or several files.

    The first file staged in a folder also clears that folder's staging folders whose writer died
    (:func:`remove_stale_staging`).

    Example:
        >>> with OutputTransaction() as out:                      # doctest: +SKIP
        ...     itk.imwrite(image, str(out.path("warped.nii.gz")))
        ...     itk.transformwrite([t], str(out.path("t.h5")))
        ... # both files appear here, or neither does
    """

    def __init__(self) -> None:
        self._staging: dict[Path, Path] = {}
        self._created_dirs: list[Path] = []
        self._planned: list[Path] = []
        self._done = False
        self._lock = threading.Lock()  # outputs may be staged from several threads

    def _staging_dir(self, parent: Path) -> Path:
        if parent not in self._staging:
            if not parent.exists():
                parent.mkdir()
                self._created_dirs.append(parent)
            else:
                remove_stale_staging(parent)
            prefix = f"{STAGING_PREFIX}{os.getpid()}@{socket.gethostname()}."
            self._staging[parent] = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        return self._staging[parent]

    def path(self, final: PathLike) -> Path:
        """Where to write the file that will become ``final`` on :meth:`commit`."""
        final = Path(final).expanduser().absolute()
        with self._lock:
            self._planned.append(final)
            return self._staging_dir(final.parent) / final.name

    def commit(self) -> None:
        """Move every staged file into place, all or nothing, then remove the staging folders.

        Staged files are flushed to disk first (``fsync``). A file that a staged file replaces is
        first moved aside into the staging folder (a rename within one folder's file system); if any
        move fails, the files already moved are removed, the files they replaced are put back, the
        staging folders are removed and the error is raised: the destinations are as they were.
        """
        moves = [(staging / produced.name, parent / produced.name, staging)
                 for parent, staging in self._staging.items() for produced in sorted(staging.iterdir())]
        for produced, _, _ in moves:
            _fsync(produced)
        done: list[list] = []  # [final, file it replaced (moved aside) or None, whether final is the new file]
        try:
            for produced, final, staging in moves:
                backup = None
                if final.exists() or final.is_symlink():
                    aside = staging / ".replaced"
                    aside.mkdir(exist_ok=True)
                    backup = aside / final.name
                    os.replace(final, backup)
                done.append([final, backup, False])
                os.replace(produced, final)
                done[-1][2] = True
        except BaseException:
            for final, backup, placed in reversed(done):
                with contextlib.suppress(OSError):
                    if placed:
                        if final.is_dir() and not final.is_symlink():
                            shutil.rmtree(final)
                        else:
                            final.unlink()
                    if backup is not None:
                        os.replace(backup, final)
            self.rollback()
            raise
        for parent, staging in self._staging.items():
            shutil.rmtree(staging, ignore_errors=True)
            _fsync(parent)
        self._done = True

    def rollback(self) -> None:
        """Remove everything staged (and folders this transaction created)."""
        for staging in self._staging.values():
            shutil.rmtree(staging, ignore_errors=True)
        for created in reversed(self._created_dirs):
            with contextlib.suppress(OSError):
                created.rmdir()
        self._done = True

    def __enter__(self) -> "OutputTransaction":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._done:
            return
        if exc_type is None:
            self.commit()
        else:
            self.rollback()


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk; folders that cannot be opened are skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(final: PathLike) -> Iterator[Path]:
    """Context manager for a single output file: yields the temporary path to write."""
    with OutputTransaction() as out:
        yield out.path(final)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


__all__ = ["IMAGE_SUFFIXES", "STAGING_PREFIX", "VOLUME_SUFFIXES", "OutputTransaction", "atomic_output",
           "check_output_dir", "check_output_path", "compound_suffix", "remove_stale_staging"]
