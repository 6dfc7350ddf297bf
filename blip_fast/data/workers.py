"""DataLoader worker processes: how many to start by default, and making them die with their parent.

torch's workers watch their parent only between batches, and a worker whose queue feeder thread is blocked on a
pipe its siblings keep open never gets there: after ``kill -9`` of the parent they stay alive (parent pid 1),
holding their memory, indefinitely. :func:`die_with_parent` (a ``worker_init_fn``) asks Linux to send the worker
SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``); elsewhere torch's own check is all there is.
"""

from __future__ import annotations

import os
import signal

from blip_fast.launch import request_parent_death_signal

#: What ``--workers`` / ``num_workers`` start by default, at most (fewer on machines with fewer usable CPUs).
MAX_DEFAULT_WORKERS = 4


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as torch's DataLoader counts them)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_workers() -> int:
    """Worker processes to start when the user does not say: up to 4, never more than the usable CPUs (torch
    warns above that)."""
    return min(MAX_DEFAULT_WORKERS, usable_cpus())


def die_with_parent(worker_id: int = 0) -> None:
    """``worker_init_fn``: SIGKILL this worker when the process that started it dies (Linux; no-op elsewhere)."""
    parent = os.getppid()
    if request_parent_death_signal(signal.SIGKILL) and os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)
