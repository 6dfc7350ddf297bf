"""blip_fast.launch: the demo's rank launcher (what ``torchrun --standalone`` sets up, without its process)."""

import json
import os
import sys
import time

import pytest

from blip_fast.launch import free_port, run_ranks

REPORT = "import json, os, sys; print(json.dumps({key: os.environ[key] for key in sys.argv[1:]}), flush=True)"


def test_each_rank_gets_its_place_in_one_group(tmp_path):
    keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MARK"]
    log = tmp_path / "log"
    with open(log, "w") as output:
        code = run_ranks([sys.executable, "-c", REPORT, *keys], 3, {"MARK": "kept"}, output)
    assert code == 0
    ranks = sorted((json.loads(line) for line in log.read_text().splitlines()), key=lambda env: env["RANK"])
    assert [(env["RANK"], env["LOCAL_RANK"]) for env in ranks] == [("0", "0"), ("1", "1"), ("2", "2")]
    assert {(env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"], env["MASTER_ADDR"], env["MASTER_PORT"], env["MARK"])
            for env in ranks} == {("3", "3", "127.0.0.1", ranks[0]["MASTER_PORT"], "kept")}
    assert 0 < int(ranks[0]["MASTER_PORT"]) < 65536


def test_a_failed_rank_stops_the_others(tmp_path):
    """Rank 1 fails at once; rank 0 (which would wait 60 s, as for a collective its peer never joins) is stopped,
    and the failure's exit status comes back."""
    script = ("import os, sys, time\n"
              "if os.environ['RANK'] == '1':\n"
              "    while not os.path.exists(sys.argv[1]): time.sleep(0.01)\n"
              "    sys.exit(3)\n"
              "open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid())); os.rename(sys.argv[1] + '.tmp', sys.argv[1])\n"
              "time.sleep(60)")
    pid_file = tmp_path / "rank0.pid"
    start = time.monotonic()
    with open(tmp_path / "log", "w") as output:
        code = run_ranks([sys.executable, "-c", script, str(pid_file)], 2, {}, output)
    assert code == 3 and time.monotonic() - start < 30
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_free_port_can_be_bound():
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", free_port()))


def test_an_interrupt_while_waiting_stops_every_rank(tmp_path, monkeypatch):
    """Ctrl-C in the launcher (a KeyboardInterrupt in its wait) leaves no rank running."""
    from blip_fast import launch

    script = ("import os, sys, time\n"
              "path = sys.argv[1] + os.environ['RANK']\n"
              "open(path + '.tmp', 'w').write(str(os.getpid())); os.rename(path + '.tmp', path)\n"
              "time.sleep(60)")
    pid_files, real_sleep = [tmp_path / f"rank{rank}" for rank in range(2)], time.sleep

    def interrupt_once_started(seconds):
        if all(path.exists() for path in pid_files):
            raise KeyboardInterrupt
        real_sleep(seconds)

    monkeypatch.setattr(launch, "sleep", interrupt_once_started)
    with open(tmp_path / "log", "w") as output, pytest.raises(KeyboardInterrupt):
        run_ranks([sys.executable, "-c", script, str(tmp_path / "rank")], 2, {}, output, poll_seconds=0.01)
    for path in pid_files:
        with pytest.raises(ProcessLookupError):
            os.kill(int(path.read_text()), 0)
