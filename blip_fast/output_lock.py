"""One run per output: a second run into a folder (or file) that a live run is writing is refused, not interleaved.

Two runs of a resumable job on one output (a command started twice, in two terminals or by a retrying scheduler)
would each redo the other's work and overwrite its checkpoints, or cut the other's half-appended line as torn.
:func:`lock_folder` takes an exclusive ``flock`` on ``<folder>/.blip_fast.lock`` (:func:`lock_output_file`: on
``.<name>.lock`` beside the file) and holds it while the run lives: the kernel releases it when the process ends,
however it ends (``kill -9`` included), so a crashed run never leaves a stale lock and its rerun resumes. The file
names the holder (pid, host, command) for the error the second run gives. CapFilt, whose ranks share one folder,
locks each unit of work instead (:func:`lock_file`; ``capfilt_io.claim_unit``). ``flock`` is POSIX; on network
filesystems it holds within one machine only. Elsewhere (Windows) there is no lock.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType

from blip_fast.errors import InvalidInputError, UserError

LOCK_NAME = ".blip_fast.lock"


class OutputInUseError(UserError):
    """Another live run holds the folder (or file)."""


class OutputLock:
    """A held lock on an output; :meth:`release` (or leaving the ``with`` block, or the process ending) lets go."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor of the open file releases its flock
            self._fd = None

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()


def lock_folder(folder: str | os.PathLike, command: str, ours: Iterable[str] = ()) -> OutputLock:
    """Create ``folder`` if needed and lock it for this process, recording ``command`` as the holder; raises
    :class:`OutputInUseError` naming the holder when a live run already has it. A folder that holds files besides
    the lock must also hold one of ``ours`` (what this kind of run writes first): the run would write among a folder
    of other files (a user's project, their home, another kind of run's output, whose lock is no sign of this
    kind's), so that is refused (:class:`InvalidInputError`)."""
    folder = Path(folder)
    names = [name for name in other_files(folder, set(ours).__contains__) if name != LOCK_NAME]
    if names:
        listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise InvalidInputError(f"{folder} holds other files ({listed}): this run would write among them; choose "
                                "a new or empty folder, or one this command made, to resume it")
    folder.mkdir(parents=True, exist_ok=True)
    return lock_file(folder / LOCK_NAME, folder, command)


def other_files(folder: Path, is_ours: Callable[[str], bool]) -> list[str]:
    """The sorted names in ``folder`` when it holds files and none that ``is_ours`` (what the command writes there):
    a folder of someone else's files, which a run must not write among. Empty for a new, empty or own folder."""
    names = sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []
    return [] if any(map(is_ours, names)) else names


def lock_output_file(path: str | os.PathLike, command: str) -> OutputLock:
    """:func:`lock_folder` for one output file (its folder must exist): the lock is ``.<name>.lock`` beside it."""
    path = Path(path)
    return lock_file(path.with_name(f".{path.name}.lock"), path, command)


def lock_file(lock_path: Path, output: str | os.PathLike, command: str) -> OutputLock:
    """Lock ``lock_path`` (created if needed; its folder must exist) for this process, recording ``command`` as the
    holder; raises :class:`OutputInUseError` naming ``output`` and the holder when a live run already has it."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return OutputLock(None)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 1000, 0).decode("utf-8", errors="replace").strip() or "a run that is starting"
        os.close(fd)
        raise OutputInUseError(f"{output} is in use by another run ({holder}): wait for it to end or stop it, or "
                               "choose another output") from None
    except BaseException:
        os.close(fd)
        raise
    holder = f"pid {os.getpid()} on {socket.gethostname()}: {command}".encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder, 0)
    return OutputLock(fd)


def command_line() -> str:
    """This process's command line, as the holder's description."""
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500]
