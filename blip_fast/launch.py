"""Start child processes on this machine, and make sure none outlives the job that started it.

Light on purpose (no torch import): the demo launches every training stage through :func:`run_ranks` and every seed
through :class:`ChildProcesses`. A job stopped by Ctrl-C or SIGTERM (:func:`sigterm_raises`) stops its children on
the way out; one killed outright (``kill -9``, the OOM killer) takes them along too: each child started here calls
:func:`stop_with_parent` first, so the kernel sends it SIGTERM when its parent dies (Linux).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from time import monotonic, sleep
from typing import IO, Any

from blip_fast import errors

#: Set in each child's environment to the pid of the process that started it (see :func:`stop_with_parent`).
PARENT_ENV = "BLIP_FAST_PARENT_PID"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a rendezvous started right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def request_parent_death_signal(signum: int) -> bool:
    """Ask Linux to send this process ``signum`` when its parent dies (``prctl(PR_SET_PDEATHSIG)``); False where
    that cannot be had (another OS, or a sandbox that refuses it)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0


def stop_with_parent() -> None:
    """In a process started by this module: have the kernel send it SIGTERM when its parent dies, and stop at once
    (:class:`~blip_fast.errors.Terminated`) if the parent is already gone. Does nothing in a process started
    otherwise (a launcher, a user's shell). The marker is taken out of the environment, so processes this one starts
    in other ways do not inherit it."""
    parent = os.environ.pop(PARENT_ENV, None)
    if parent is None:
        return
    request_parent_death_signal(signal.SIGTERM)
    if os.getppid() != int(parent):  # it died before the line above took effect: no signal will come
        raise errors.Terminated(f"parent process {parent} has exited")


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within: SIGTERM raises :class:`~blip_fast.errors.Terminated` in the main thread (as Ctrl-C raises
    KeyboardInterrupt), so the job's ``finally`` blocks stop its children. Elsewhere than the main thread, nothing
    changes (only it can handle signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum: int, frame: Any) -> None:
        raise errors.Terminated(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class ChildProcesses:
    """The processes one job starts, from any of its threads: :meth:`stop` ends them all, and every later
    :meth:`start` (a thread that had not started its child yet) raises :class:`~blip_fast.errors.Terminated`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._processes: list[subprocess.Popen] = []
        self._stopped = False

    def start(self, command: Sequence[str], env: dict[str, str], **popen: Any) -> subprocess.Popen:
        """``subprocess.Popen(command, env=env, **popen)``, with :data:`PARENT_ENV` set to this process."""
        with self._lock:
            if self._stopped:
                raise errors.Terminated("the job is stopping: no new process")
            process = subprocess.Popen(list(command), env={**env, PARENT_ENV: str(os.getpid())}, **popen)
            self._processes.append(process)
            return process

    def stop(self, grace_seconds: float = 10.0) -> None:
        """SIGTERM every child still running, wait up to ``grace_seconds`` for all of them, SIGKILL the rest."""
        with self._lock:
            self._stopped = True
            running = [process for process in self._processes if process.poll() is None]
        for process in running:
            process.terminate()
        deadline = monotonic() + grace_seconds
        for process in running:
            try:
                process.wait(timeout=max(deadline - monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def run_ranks(command: Sequence[str], ranks: int, environment: dict[str, str], output: IO[str],
              poll_seconds: float = 0.1) -> int:
    """Run ``ranks`` copies of ``command`` as one process group on this machine, as ``torchrun --standalone`` does
    without its launcher process (which costs a torch import, ~3 s, per stage): each copy gets ``RANK``,
    ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE`` and a fresh ``MASTER_PORT``; all write to ``output``.

    A rank that fails stops the others (SIGTERM, then SIGKILL after 10 s: they would wait for it in their next
    collective), and so does an exception here (Ctrl-C, or SIGTERM under :func:`sigterm_raises`). Returns the first
    non-zero exit status, else 0.
    """
    shared = {**environment, "WORLD_SIZE": str(ranks), "LOCAL_WORLD_SIZE": str(ranks),
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    children = ChildProcesses()
    try:
        processes = [children.start(command, {**shared, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                    stdout=output, stderr=subprocess.STDOUT)
                     for rank in range(ranks)]
        while True:
            codes = [process.poll() for process in processes]
            failed = [code for code in codes if code not in (None, 0)]
            if failed:
                return failed[0]
            if all(code == 0 for code in codes):
                return 0
            sleep(poll_seconds)
    finally:
        children.stop()
