"""blip_fast.launch: the demo's rank launcher (what ``torchrun --standalone`` sets up, without its process), and no
child outliving the job that started it: SIGTERM unwinds like Ctrl-C, a killed starter takes its children along."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from blip_fast import errors
from blip_fast.launch import PARENT_ENV, ChildProcesses, free_port, run_ranks, sigterm_raises

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


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(condition, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG are Linux's")

# A starter: launches two ranks that each call stop_with_parent, write their pid and sleep; then waits on them.
_STARTER = """
import sys
from blip_fast.launch import run_ranks
rank = "from blip_fast.launch import stop_with_parent; stop_with_parent(); import os, sys, time; " \\
       "path = sys.argv[1] + os.environ['RANK']; open(path + '.tmp', 'w').write(str(os.getpid())); " \\
       "os.rename(path + '.tmp', path); time.sleep(60)"
run_ranks([sys.executable, "-c", rank, sys.argv[1]], 2, {"PYTHONPATH": sys.argv[2]}, sys.stdout)
"""


@linux_only
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_ranks_stop_when_their_starter_is_killed(tmp_path, signum):
    """kill -9 (or a plain SIGTERM, with no handler) of the process that ran run_ranks: the ranks get SIGTERM from
    the kernel and exit, instead of sleeping on with parent pid 1."""
    root = str(tmp_path / "rank")
    starter = subprocess.Popen([sys.executable, "-c", _STARTER, root, os.getcwd()])
    pid_files = [tmp_path / f"rank{rank}" for rank in range(2)]
    assert wait_until(lambda: all(path.exists() for path in pid_files)), "the ranks did not start"
    pids = [int(path.read_text()) for path in pid_files]
    starter.send_signal(signum)
    starter.wait(10)
    assert wait_until(lambda: not any(alive(pid) for pid in pids), 10), "a rank outlived its starter"


def test_stop_with_parent_stops_a_child_whose_starter_is_already_gone():
    """The starter died before the child asked for the signal (no signal would ever come): it stops at once."""
    script = ("import os, sys\n"
              "from blip_fast import errors, launch\n"
              "def main(argv):\n"
              "    launch.stop_with_parent()\n"
              "    print('ran on'); return 0\n"
              "sys.exit(errors.run_main(main, [], 'child'))")
    gone = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, PARENT_ENV: "999999999"})
    assert gone.returncode == errors.EXIT_TERMINATED and "child: terminated" in gone.stderr and not gone.stdout
    started = subprocess.run([sys.executable, "-c", script + "\n"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, PARENT_ENV: str(os.getpid())})
    assert started.returncode == 0 and started.stdout == "ran on\n", started.stderr


def test_the_parent_marker_is_not_inherited_further():
    script = (f"import os; from blip_fast import launch; launch.stop_with_parent(); "
              f"print(os.environ.get({PARENT_ENV!r}))")
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                           env={**os.environ, PARENT_ENV: str(os.getpid())})
    assert child.stdout == "None\n", child.stderr


def test_sigterm_raises_terminated_inside_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(errors.Terminated), sigterm_raises():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the next bytecode: never reached
    assert signal.getsignal(signal.SIGTERM) is before


def test_no_child_starts_once_the_job_is_stopping(tmp_path):
    children = ChildProcesses()
    sleeper = children.start([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ))
    start = time.monotonic()
    children.stop(grace_seconds=10)
    assert sleeper.returncode == -signal.SIGTERM and time.monotonic() - start < 10
    with pytest.raises(errors.Terminated):
        children.start([sys.executable, "-c", "pass"], dict(os.environ))
