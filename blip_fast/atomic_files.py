"""Crash-safe file writes: a reader (or a resumed run) sees the old file or the whole new one, never a part.

Every file a long job leaves behind -- weights, results, manifests, resume markers -- goes through here: written to a
temporary file in the target's directory, flushed to disk, renamed over the target, and the rename itself flushed
(the directory entry), so neither ``kill -9`` nor a power cut leaves a truncated file under the final name.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable


def _new_file_mode() -> int:
    """The mode ``open()`` would give a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_directory(directory: str) -> None:
    """Flush a rename inside ``directory`` to disk (POSIX; Windows cannot open a directory, and needs no flush)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and FUSE mounts) refuse fsync on a directory: the rename still happened
        pass
    finally:
        os.close(fd)


def atomic_write(target: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``target`` and rename it over ``target``; on any error
    (or Ctrl-C) the temporary file is removed and ``target`` is left as it was."""
    target = os.fspath(target)
    directory = os.path.dirname(target) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(target)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _new_file_mode())  # mkstemp makes it owner-only; a plain open() would honour the umask
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write` of ``text`` as UTF-8."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(target, write)
