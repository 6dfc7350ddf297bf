"""A build waiting on a lock a killed extension build left: named in a warning, not a silent hang."""

from __future__ import annotations

import os
import time

import pytest

from blip_fast.build_locks import build_root, stale_build_locks, watch_build_locks


@pytest.fixture
def extensions(tmp_path, monkeypatch):
    """An extensions root with an old lock (a killed build), a fresh one (a build running now) and one a level down
    (torch's default layout: one folder per Python and accelerator)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    for relative, age in (("deepspeed_shm_comm/lock", 3600), ("running_op/lock", 5), ("py311_cpu/other_op/lock", 900)):
        path = tmp_path / relative
        path.parent.mkdir(parents=True)
        path.touch()
        os.utime(path, (time.time() - age, time.time() - age))
    (tmp_path / "built_op").mkdir()  # a finished build: no lock
    return tmp_path


def test_only_locks_older_than_a_build_count(extensions):
    assert build_root() == extensions
    found = stale_build_locks(120.0)
    assert [path.relative_to(extensions).as_posix() for path, _ in found] == [
        "deepspeed_shm_comm/lock", "py311_cpu/other_op/lock"]
    assert 3590 < found[0][1] < 3700


def test_a_long_wait_names_each_stale_lock_once(extensions):
    warnings = []
    with watch_build_locks(after_s=0.2, warn=warnings.append):
        time.sleep(0.6)
    assert len(warnings) == 2 and all("a killed build most likely left it" in line for line in warnings)
    assert str(extensions / "deepspeed_shm_comm" / "lock") in warnings[0]


def test_a_short_wait_says_nothing(extensions):
    warnings = []
    with watch_build_locks(after_s=0.5, warn=warnings.append):
        pass
    time.sleep(0.7)
    assert warnings == []


def test_a_demo_stage_waiting_on_a_stale_lock_says_so_where_the_user_looks(extensions, tmp_path, monkeypatch,
                                                                          capsys):
    """A training stage's own warning goes to its log file; the demo's seed process, whose output the user sees,
    warns too."""
    from blip_fast import build_locks, demo

    def stage_waiting_on_the_lock(command, ranks, environment, log):
        time.sleep(0.6)  # init_distributed, waiting
        log.write('{"summary": {"final_step": 0}}\n')
        return 0

    monkeypatch.setattr(build_locks, "WARN_AFTER_S", 0.2)
    monkeypatch.setattr(demo, "run_ranks", stage_waiting_on_the_lock)
    run = demo.SeedRun(tmp_path / "seed", tmp_path / "data", demo.SCALES["tiny"], seed=0, threads=1)
    run.run_dir.mkdir()
    assert demo._train(run, "pretrain_noisy", {}) == {"final_step": 0}
    assert f"waiting on {extensions / 'deepspeed_shm_comm' / 'lock'}, an extension build lock" in capsys.readouterr().err
