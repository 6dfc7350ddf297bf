"""Extension builds waiting on a lock a killed build left behind: say so, instead of hanging without a word.

torch's JIT extension builds (DeepSpeed's ops: its CPU communication op at a run's first ``init_distributed``, about a
minute on two cores) take a ``lock`` file in their build folder and remove it when done, or when an exception unwinds
the build (``blip_fast.train`` turns SIGTERM into one there). A build killed by SIGKILL, or by a plain SIGTERM,
leaves it, and every later build waits on it forever, printing nothing.
:func:`watch_build_locks` warns, naming the file, when such a wait lasts and the lock is older than a build takes.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def build_root() -> Path:
    """Where torch builds extensions: ``TORCH_EXTENSIONS_DIR``, else its default root (one folder per Python and
    accelerator below it)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def stale_build_locks(older_than_s: float, root: Path | None = None) -> list[tuple[Path, float]]:
    """``(lock file, age in seconds)`` of every build lock under ``root`` older than ``older_than_s``."""
    root = build_root() if root is None else root
    found = []
    for path in sorted([*root.glob("*/lock"), *root.glob("*/*/lock")]):
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:  # the build finished meanwhile
            continue
        if age > older_than_s:
            found.append((path, age))
    return found


#: How long a wait lasts before :func:`watch_build_locks` looks for stale locks, and how old a lock must be to count
#: as one (a build takes about a minute).
WARN_AFTER_S = 120.0


def _print_warning(message: str) -> None:
    print(f"blip_fast: warning: {message}", file=sys.stderr, flush=True)


@contextmanager
def watch_build_locks(after_s: float | None = None, older_than_s: float | None = None,
                      warn: Callable[[str], None] = _print_warning) -> Iterator[None]:
    """Within: if the block still runs after ``after_s`` seconds, ``warn`` once about each build lock older than
    ``older_than_s`` (both default to :data:`WARN_AFTER_S`; a build takes about a minute: such a lock was most likely
    left by a killed one)."""
    after_s = WARN_AFTER_S if after_s is None else after_s
    older_than_s = WARN_AFTER_S if older_than_s is None else older_than_s
    done = threading.Event()

    def watch() -> None:
        if done.wait(after_s):
            return
        for path, age in stale_build_locks(older_than_s):
            warn(f"waiting on {path}, an extension build lock {age:.0f} s old; a build takes about a minute, so a "
                 "killed build most likely left it: if no other process is building, delete it")

    watcher = threading.Thread(target=watch, name="build-lock-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
