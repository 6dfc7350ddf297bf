"""Crash-safe writes (blip_fast.atomic_files): the whole new file or the old one, never a part, never a stray temp."""

from __future__ import annotations

import os

import pytest

from blip_fast.atomic_files import atomic_write, atomic_write_text


def _listing(directory) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


@pytest.mark.parametrize("text", ["", "résumé\n", "x" * 3_000_000])
def test_writes_the_whole_text_and_replaces_the_old_file(tmp_path, text):
    target = tmp_path / "results.json"
    target.write_text("old", encoding="utf-8")
    atomic_write_text(target, text)
    assert target.read_text(encoding="utf-8") == text
    assert _listing(tmp_path) == ["results.json"]


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_a_writer_that_fails_halfway_leaves_the_old_file_and_no_temp(tmp_path, failure):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old weights")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(b"half of the new")
        raise failure

    with pytest.raises(type(failure)):
        atomic_write(target, write)
    assert target.read_bytes() == b"old weights"
    assert _listing(tmp_path) == ["model.safetensors"]


def test_a_writer_that_removes_its_temp_still_reports_its_own_error(tmp_path):
    def write(tmp: str) -> None:
        os.unlink(tmp)
        raise ValueError("the writer's own error")

    with pytest.raises(ValueError, match="the writer's own error"):
        atomic_write(tmp_path / "out.txt", write)
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_the_new_file_gets_the_mode_open_would_give_it(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "report.md", "x")
        with open(tmp_path / "plain.md", "w", encoding="utf-8") as handle:
            handle.write("x")
    finally:
        os.umask(previous)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == mode == (tmp_path / "plain.md").stat().st_mode & 0o777


def test_a_relative_target_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    atomic_write_text("latest", "global_step100")
    assert (tmp_path / "latest").read_text(encoding="utf-8") == "global_step100"
