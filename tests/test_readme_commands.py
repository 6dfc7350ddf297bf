"""The README's training commands, run as written (issue 11, item 8): extracted from README.md, so this test follows
the README when it changes. Also: a resume on another world size and a config error under the launcher are one
clear line each, not DeepSpeed's "DP world size" traceback or ``[rank0]:``-prefixed tracebacks."""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Pre-training with DeepSpeed"
#: Ranks this machine can start (CPU ranks under the gloo backend); launches needing more are checked, not run.
MAX_RANKS = 2


def readme_training_commands() -> list[list[str]]:
    """The first bash block of the README's training section, one argv per command (continuations joined,
    comments dropped)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index(SECTION):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_readme_block_is_found():
    commands = readme_training_commands()
    launches = [argv for argv in commands if argv[0] == "deepspeed"]
    assert launches and any("--resume" in argv for argv in commands)
    for argv in commands:  # every config a command names exists
        for flag in ("--config", "--deepspeed_config"):
            if flag in argv:
                assert (ROOT / argv[argv.index(flag) + 1]).is_file(), argv


def _ranks(argv: list[str]) -> int:
    return int(argv[argv.index("--num_gpus") + 1]) if "--num_gpus" in argv else 1


def _run(argv: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    if argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    elif argv[0] == "deepspeed":
        argv = [shutil.which("deepspeed") or "deepspeed", *argv[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Its own session: on a timeout the launcher's rank processes are killed with it, never left behind.
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


@pytest.mark.slow
def test_readme_training_commands_run_as_written(tmp_path):
    """Train, resume with the same launcher, export: each command exits 0 from a folder holding the repo's configs."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    ran = []
    for argv in readme_training_commands():
        if argv[0] == "pip" or _ranks(argv) > MAX_RANKS:
            continue
        result = _run(argv, tmp_path)
        assert result.returncode == 0, f"{shlex.join(argv)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        ran.append(argv)
    assert [argv[0] for argv in ran] == ["deepspeed", "deepspeed", "python"]
    assert "--resume" in ran[1]
    assert sorted(path.name for path in (tmp_path / "exported").iterdir()) == ["captioning", "retrieval"]

    # The same checkpoint resumed by one process: refused up front, naming the launcher to use.
    first = ran[0]
    single = ["python", "-m", "blip_fast.train", *first[first.index("blip_fast.train") + 1:], "--resume"]
    result = _run(single, tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert lines[-1].startswith("blip_fast.train: error: ") and "ZeRO optimizer partitions of 2 ranks" in lines[-1]
    assert "deepspeed --num_gpus 2" in lines[-1]

    # A config error found after the ranks started: one line from rank 0, no [rankN]: tracebacks, before the
    # tokenizer and model are built.
    result = _run([*first, "--queue_size", "50", "--output_dir", "output/bad"], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output and "[rank0]:" not in output
    assert output.count("blip_fast.train: error: queue_size 50 is not a multiple of the global batch 16") == 1
    assert "trained a WordPiece vocab" not in output, "the batch geometry is checked before the tokenizer and model"
