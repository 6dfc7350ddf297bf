"""Start training processes on this machine: a free local port, and a group of ranks run as one job.

Light on purpose (no torch import): the demo launches every training stage through :func:`run_ranks`.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Sequence
from time import sleep
from typing import IO


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a rendezvous started right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_ranks(command: Sequence[str], ranks: int, environment: dict[str, str], output: IO[str],
              poll_seconds: float = 0.1) -> int:
    """Run ``ranks`` copies of ``command`` as one process group on this machine, as ``torchrun --standalone`` does
    without its launcher process (which costs a torch import, ~3 s, per stage): each copy gets ``RANK``,
    ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE`` and a fresh ``MASTER_PORT``; all write to ``output``.

    A rank that fails stops the others (SIGTERM, then SIGKILL after 10 s: they would wait for it in their next
    collective), and so does an exception here (Ctrl-C included). Returns the first non-zero exit status, else 0.
    """
    shared = {**environment, "WORLD_SIZE": str(ranks), "LOCAL_WORLD_SIZE": str(ranks),
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    processes = [subprocess.Popen(list(command), stdout=output, stderr=subprocess.STDOUT,
                                  env={**shared, "RANK": str(rank), "LOCAL_RANK": str(rank)})
                 for rank in range(ranks)]
    try:
        while True:
            codes = [process.poll() for process in processes]
            failed = [code for code in codes if code not in (None, 0)]
            if failed:
                return failed[0]
            if all(code == 0 for code in codes):
                return 0
            sleep(poll_seconds)
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
