"""One run per output folder (blip_fast.output_lock): a second lock is refused naming the first; a lock dies with its
process, kill -9 included, so a crashed run's rerun is never locked out."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from blip_fast import errors
from blip_fast.output_lock import LOCK_NAME, OutputInUseError, lock_folder

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")


def test_a_second_lock_is_refused_naming_the_holder(tmp_path):
    folder = tmp_path / "new" / "out"  # created on the way
    with lock_folder(folder, "blip-fast demo --out-dir out"):
        with pytest.raises(OutputInUseError) as refused:
            lock_folder(folder, "blip-fast demo --out-dir out")
        message = str(refused.value)
        assert f"{folder} is in use by another run (pid {os.getpid()} on " in message
        assert "blip-fast demo --out-dir out" in message and isinstance(refused.value, errors.UserError)
    lock_folder(folder, "the next run").release()
    assert [path.name for path in folder.iterdir()] == [LOCK_NAME]


def test_the_holder_line_is_replaced_not_appended(tmp_path):
    lock_folder(tmp_path, "a much longer first command line " * 3).release()
    with lock_folder(tmp_path, "second"):
        assert (tmp_path / LOCK_NAME).read_text().endswith(": second")


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_a_lock_dies_with_its_process(tmp_path, signum):
    script = ("import sys, time\n"
              "from blip_fast.output_lock import lock_folder\n"
              "lock = lock_folder(sys.argv[1], 'holder')\n"
              "print('locked', flush=True)\n"
              "time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(OutputInUseError, match=f"pid {holder.pid} on .*: holder"):
            lock_folder(tmp_path, "second")
    finally:
        holder.send_signal(signum)
        holder.wait(10)
    start = time.monotonic()
    lock_folder(tmp_path, "after the crash").release()
    assert time.monotonic() - start < 1.0


@pytest.mark.parametrize("present, refused", [
    ([], False), (["demo_scale.json", "data"], False), ([LOCK_NAME], False),  # new; a demo's; one cut short at once
    (["results.json", "notes.md"], True), (["a", "b", "c", "d"], True),
    ([LOCK_NAME, "blip_config.json", "latest"], True),  # a training run's output: its lock is no demo's
])
def test_a_folder_of_other_files_is_refused(tmp_path, present, refused):
    """The run would write among a user's files (their project, their home, another kind of run's output): only a
    folder this kind of run made (one of ``ours``, or nothing but a lock) is taken."""
    for name in present:
        (tmp_path / name).write_text("mine")
    if not refused:
        lock_folder(tmp_path, "demo", ours=["demo_scale.json"]).release()
        return
    first = sorted(name for name in present if name != LOCK_NAME)[0]
    with pytest.raises(errors.InvalidInputError, match=re.escape(f"{tmp_path} holds other files ({first}, ")):
        lock_folder(tmp_path, "demo", ours=["demo_scale.json"])
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(present)  # no lock file left among them
