"""Several machines: 2 "nodes" x 1 rank on this machine (two ``torchrun --nnodes 2`` agents, localhost rendezvous).

Each node has local rank 0 only, so anything that used the local rank where the global one is needed (data shards,
checkpoint files, who writes ``latest``) would show: the 2-node run must train exactly like 1 node x 2 ranks, also
after one node is killed with SIGKILL mid-run and the job is restarted with ``--resume``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from blip_fast.launch import free_port
from blip_fast.output_lock import LOCK_NAME, lock_folder
from blip_fast.training import checkpointing
from tests.test_train import (
    CONFIGS,
    LAUNCH_TIMEOUT,
    TINY,
    _consolidated,
    _env,
    _max_differences,
    _metrics,
    _remove_shm,
    _train,
)

STEPS, KILL_AFTER = 8, 4


def _node_command(node: int, port: int, output_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
            "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "blip_fast.train",
            "--config", str(TINY), "--output_dir", str(output_dir), "--no-progress_bar", *extra]


def _start_nodes(port: int, output_dir: Path, log_stem: str, *extra: str) -> list[subprocess.Popen]:
    nodes = []
    for node in range(2):
        log = open(output_dir.parent / f"{log_stem}-node{node}.log", "w")
        nodes.append(subprocess.Popen(_node_command(node, port, output_dir, *extra), stdout=log,
                                      stderr=subprocess.STDOUT, env=_env(), cwd=output_dir.parent,
                                      start_new_session=True))
    return nodes


def _log(output_dir: Path, stem: str, node: int) -> str:
    return (output_dir.parent / f"{stem}-node{node}.log").read_text()


def _kill_node(process: subprocess.Popen) -> None:
    """SIGKILL a node: its torchrun agent and every process under it (torchrun starts its workers in their own
    sessions, so the agent's process group alone would leave them running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    doomed, queue = [], [process.pid]
    while queue:
        pid = queue.pop()
        doomed.append(pid)
        queue.extend(children.get(pid, []))
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _stop(nodes: list[subprocess.Popen]) -> None:
    for process in nodes:
        if process.poll() is None:
            _kill_node(process)
        process.wait()


@pytest.mark.slow
def test_two_nodes_train_like_one_and_resume_after_a_node_is_killed(tmp_path):
    single, multi = tmp_path / "one_node", tmp_path / "two_nodes"
    common = ["--deepspeed_config", str(CONFIGS / "ds_zero2.json"), "--max_steps", str(STEPS), "--log_every_steps",
              "1", "--export_tasks"]
    _train("torchrun", single, *common, "--save_every_steps", str(STEPS))
    multi.mkdir()
    extra = [*common, "--tokenizer_dir", str(single / "tokenizer"), "--save_every_steps", str(KILL_AFTER)]

    port = free_port()
    nodes = _start_nodes(port, multi, "killed", *extra)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while checkpointing.latest_tag(multi) != checkpointing.tag_for(KILL_AFTER):
            assert all(node.poll() is None for node in nodes), _log(multi, "killed", 0)[-4000:]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.05)
        _kill_node(nodes[1])  # node 1 dies; node 0's collectives fail and it exits on its own
        try:
            assert nodes[0].wait(timeout=180) != 0
        except subprocess.TimeoutExpired:
            pytest.fail("node 0 kept running after node 1 was killed")
    finally:
        _stop(nodes)
        _remove_shm(port)
    assert checkpointing.latest_tag(multi) == checkpointing.tag_for(KILL_AFTER)

    port = free_port()
    nodes = _start_nodes(port, multi, "resumed", *extra, "--resume")
    try:
        codes = [node.wait(timeout=LAUNCH_TIMEOUT) for node in nodes]
    finally:
        _stop(nodes)
        _remove_shm(port)
    assert codes == [0, 0], _log(multi, "resumed", 0)[-4000:] + _log(multi, "resumed", 1)[-4000:]
    assert f"at step {KILL_AFTER}" in _log(multi, "resumed", 0)

    # Rank 0 (node 0) wrote the run files and `latest`; each global rank its own RNG file.
    assert sorted(path.name for path in (multi / checkpointing.tag_for(STEPS)).glob("rng_rank*.pt")) == [
        "rng_rank0.pt", "rng_rank1.pt"]
    differences = _max_differences(_consolidated(single, STEPS), _consolidated(multi, STEPS))
    worst = max(differences, key=differences.get)
    assert differences[worst] <= 1e-6, f"{worst} differs by {differences[worst]}"
    assert [record["step"] for record in _metrics(multi)] == list(range(1, STEPS + 1))
    assert [record["loss"] for record in _metrics(multi)] == pytest.approx(
        [record["loss"] for record in _metrics(single)], abs=1e-6)
    assert torch.equal(_consolidated(single, STEPS)["image_queue"], _consolidated(multi, STEPS)["image_queue"])


def test_output_dir_not_shared_by_every_rank_is_an_error(tmp_path, monkeypatch):
    """A rank that cannot see rank 0's files (no shared filesystem across nodes) stops the run with a clear error."""
    import torch.distributed as dist

    from blip_fast import train

    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "broadcast_object_list", lambda objects, src: None)
    monkeypatch.setattr(dist, "barrier", lambda: None)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor: tensor.fill_(1.0))  # one other rank saw nothing
    with pytest.raises(RuntimeError, match="filesystem every node shares"):
        train.claim_output_dir(tmp_path / "out")
    assert [path.name for path in (tmp_path / "out").iterdir()] == [LOCK_NAME]  # the marker is removed
    lock_folder(tmp_path / "out", "the next run").release()  # and the folder is free again


def test_every_rank_stops_when_rank_0_cannot_take_the_output_dir(tmp_path, monkeypatch):
    """What rank 0 met taking the folder (another run holds it, a folder of other files, no permission) reaches the
    other ranks too: they raise the same error instead of waiting for rank 0 at the next collective."""
    import torch.distributed as dist

    from blip_fast import train

    refused = PermissionError(13, "Permission denied", str(tmp_path / "out"))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "broadcast_object_list", lambda objects, src: objects.__setitem__(
        slice(None), ["token", refused]))
    monkeypatch.setattr(dist, "barrier", lambda: pytest.fail("rank 1 went on to the barrier"))
    with pytest.raises(PermissionError, match="Permission denied"):
        train.claim_output_dir(tmp_path / "out")
    assert not (tmp_path / "out").exists()
