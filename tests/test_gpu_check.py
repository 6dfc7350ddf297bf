"""benchmarks/gpu_check.sh and what it relies on, on a CPU: the files that come back from the device machine (at most
8, names of letters, digits, ``.``, ``_``, ``-``, at most two folders deep), rows that survive a step killed at its
budget, budgets that fit the machine's time, the benchmark harness writing rows as measured, and the CUDA toolkit
search of the build (csrc/cuda_env.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from benchmarks import harness

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
RETURNED_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def _plan(*flags: str) -> dict[str, int]:
    result = subprocess.run(["bash", str(SCRIPT), "--plan", *flags], capture_output=True, text=True, timeout=60,
                            check=True)
    rows = [line.split()[:2] for line in result.stdout.splitlines()[1:] if not line.startswith("total")]
    return {name: int(budget) for name, budget in rows}


def _returned_files(out: Path) -> list[Path]:
    """What the device machine would send back from ``out``, after checking its limits."""
    files = [path for path in out.rglob("*") if path.is_file()]
    assert len(files) <= 8, files
    for path in files:
        relative = path.relative_to(out)
        assert len(relative.parts) <= 3, f"{relative}: deeper than two folders"
        assert all(RETURNED_NAME.match(part) for part in relative.parts), f"{relative}: a name that does not return"
        assert path.stat().st_size <= 16 * 2**20, f"{relative}: over 16 MiB"
    return files


def _archive(out: Path) -> dict[str, bytes]:
    with tarfile.open(out / "results.tar.gz") as tar:
        return {member.name: tar.extractfile(member).read() for member in tar.getmembers() if member.isfile()}


def _steps(out: Path) -> dict[str, dict[str, str]]:
    lines = (out / "steps.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    return {row[0]: dict(zip(header, row)) for row in (line.split("\t") for line in lines[1:])}


# ------------------------------------------------------------------------------------------------ the plan
def test_budgets_fit_the_device_time():
    """The full check's budgeted steps fit 480 s with the build, the tests and every headline row among them; the
    quick rerun fits 180 s (DESIGN.md §5: 15 minutes of device time for both runs and two machine starts)."""
    full, quick = _plan(), _plan("--quick")
    budgeted, total = [], 0
    for name, budget in full.items():
        total += budget
        if total <= 480:
            budgeted.append(name)
    assert {"environment", "build", "backends", "tests_core", "tests_kernels", "capfilt_cli", "generate", "itc",
            "vit", "decode_attention", "itm_negatives", "capfilt", "pretrain_bf16"} <= set(budgeted)
    assert list(full)[:3] == ["environment", "build", "backends"], "environment and build come first"
    assert sum(quick.values()) <= 180 and {"tests_core", "generate"} <= quick.keys()
    assert all(RETURNED_NAME.match(name) for name in full)


# ------------------------------------------------------------------------------------------------ timeouts
_KILLED_STEP = r"""
source "$1"
ROOT="$2" OUT="$3" WORK="$4/gpu_check" PY="$5" TOTAL=60 MODE=test QUICK=0 DRY=1 SCALE=1
checks() {
    step slow 12 12 "$PY" -c 'import time
from benchmarks.report import Report
report = Report("'"$WORK"'", "slow", ["case", "median_ms"], "slow")
report.add({"case": "first", "median_ms": 1.0})
report.add({"case": "second", "median_ms": 2.0})
time.sleep(600)'
    step after 20 20 "$PY" -c 'print("after ran")'
}
cd "$ROOT" && run_checks
"""


@pytest.mark.slow
def test_a_step_killed_at_its_budget_leaves_its_rows_in_the_archive(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", "-c", _KILLED_STEP, "killed", str(SCRIPT), str(ROOT), str(out), str(work),
                             sys.executable], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = _steps(out)
    assert steps["slow"]["status"] == "timeout" and steps["after"]["status"] == "ok", steps
    assert {path.name for path in _returned_files(out)} == {"results.tar.gz", "steps.tsv", "summary.md"}
    archive = _archive(out)
    rows = [json.loads(line) for line in archive["gpu_check/slow.jsonl"].decode().splitlines()]
    assert [row["case"] for row in rows] == ["first", "second"]
    assert "case=second" in archive["gpu_check/logs/slow.log"].decode(), "the log is unbuffered"
    assert "after ran" in archive["gpu_check/logs/after.log"].decode()
    summary = (out / "summary.md").read_text()
    assert "| slow | 12 | timeout |" in summary and "### slow" in summary, summary


# ------------------------------------------------------------------------------------------------ dry run
@pytest.mark.slow
def test_dry_run_returns_three_files_with_every_log_and_row(tmp_path):
    """The CPU rehearsal through a few real steps (the full list is measured by running the script itself). Budgets
    times 4: this checks what comes back, not this shared machine's speed."""
    out = tmp_path / "out"
    wheels = tmp_path / "wheels"  # a carried wheel (benchmarks/gpu_wheels.sh) goes first on the path
    _metadata_only_wheel(wheels, "liger_kernel", "0.0.0+carried")
    env = {**os.environ, "BLIP_FAST_GPU_CHECK_DRY": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "BLIP_FAST_GPU_CHECK_BUDGET_SCALE": "4", "BLIP_FAST_GPU_CHECK_WHEELS": str(wheels),
           "BLIP_FAST_GPU_CHECK_STEPS": "environment,build,backends,decode_attention", "TMPDIR": str(tmp_path)}
    result = subprocess.run(["bash", str(SCRIPT), "--quick", str(out)], capture_output=True, text=True, timeout=400,
                            env=env)
    steps = _steps(out)
    assert list(steps) == ["environment", "build", "backends", "decode_attention"]
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert {path.name for path in _returned_files(out)} == {"results.tar.gz", "steps.tsv", "summary.md"}
    archive = _archive(out)
    for name in ("environment", "build", "backends", "decode_attention"):
        assert f"gpu_check/logs/{name}.log" in archive
    rows = [json.loads(line) for line in archive["gpu_check/decode_attention.jsonl"].decode().splitlines()]
    assert {row["engine"] for row in rows} == {"eager_hf", "sdpa"} and all("median_ms" in row for row in rows)
    summary = (out / "summary.md").read_text()
    assert "blip_fast_C" in summary and "backends_on_cpu" in summary and "Decode-step cross-attention" in summary
    assert "**liger-kernel**: 0.0.0+carried" in summary, summary


def _metadata_only_wheel(folder, name: str, version: str) -> None:
    """A wheel holding only its metadata: installed, it names ``name`` at ``version`` and imports nothing."""
    folder.mkdir()
    info = f"{name}-{version}.dist-info"
    files = {f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        for path, text in {**files, f"{info}/RECORD": record}.items():
            wheel.writestr(path, text)


# ------------------------------------------------------------------------------------------------ harness
def test_report_writes_each_row_as_it_is_added(tmp_path, capsys):
    report = harness.Report(tmp_path, "bench", ["case", "median_ms"], lambda first: f"title {first['case']}")
    report.add({"case": "a", "median_ms": 1.5, "device": "cpu", "torch": "x", "date": "now"})
    assert harness.read_rows(tmp_path / "bench.jsonl") == report.rows
    assert "| a | 1.50 |" in (tmp_path / "bench.md").read_text() and "title a" in report.text()
    report.add({"case": "b", "median_ms": 2.0, "device": "cpu", "torch": "x", "date": "now"})
    assert [row["case"] for row in harness.read_rows(tmp_path / "bench.jsonl")] == ["a", "b"]
    assert "| b | 2.00 |" in (tmp_path / "bench.md").read_text()
    assert "[bench] case=a, median_ms=1.50" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ CUDA toolkit search
@pytest.fixture(scope="module")
def cuda_env():
    spec = importlib.util.spec_from_file_location("cuda_env", ROOT / "csrc" / "cuda_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _toolkit(root: Path, version: str | None, lib: str = "lib64") -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / lib).mkdir()
    (root / "bin" / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 0.0'\n")
    (root / "bin" / "nvcc").chmod(0o755)
    (root / "include" / "cuda_runtime.h").write_text("")
    (root / lib / "libcudart.so.13").write_text("")
    if version:
        (root / "version.json").write_text(json.dumps({"cuda": {"version": version}}))
    return root


def test_a_wrapper_nvcc_does_not_fool_the_toolkit_search(cuda_env, tmp_path):
    """``nvcc`` on PATH is a wrapper script (as on the GPU machine and this one): torch's guess, its folder's
    parent, has no headers and is rejected; the real toolkit is found, from the environment or torch's guess."""
    real = _toolkit(tmp_path / "cuda-13.0", "13.0.48")
    wrapper_dir = tmp_path / "usr_local" / "bin"
    wrapper_dir.mkdir(parents=True)
    (wrapper_dir / "nvcc").write_text(f"#!/bin/sh\nexec {real}/bin/nvcc \"$@\"\n")
    (wrapper_dir / "nvcc").chmod(0o755)
    env = {"PATH": str(wrapper_dir)}
    home, notes = cuda_env.find_cuda_home(env, "13.0", torch_guess=str(tmp_path / "usr_local"), site_dirs=[])
    assert home != str(tmp_path / "usr_local")
    assert any("usr_local: no include/cuda_runtime.h" in note for note in notes), notes
    home, notes = cuda_env.find_cuda_home({**env, "CUDA_HOME": str(real)}, "13.0", None, site_dirs=[])
    assert home == str(real)


def test_toolkit_search_prefers_torchs_major_version_and_pip_layouts(cuda_env, tmp_path):
    old = _toolkit(tmp_path / "old", "12.4.1")
    pip = _toolkit(tmp_path / "site" / "nvidia" / "cu13", "13.0.2", lib="lib")
    home, notes = cuda_env.find_cuda_home({"CUDA_HOME": str(old), "PATH": ""}, "13.0", None,
                                          site_dirs=[str(tmp_path / "site")])
    assert home == str(pip), notes
    home, _ = cuda_env.find_cuda_home({"CUDA_HOME": str(old), "PATH": ""}, "12.4", None, site_dirs=[])
    assert home == str(old)
    (old / "include" / "cuda_runtime.h").unlink()
    assert cuda_env.toolkit_problem(old) == f"{old}: no include/cuda_runtime.h"


def test_arch_list_is_the_visible_gpus_capability(cuda_env):
    assert cuda_env.arch_list([(9, 0)]) == "9.0"
    assert cuda_env.arch_list([(9, 0), (8, 0), (9, 0)]) == "8.0;9.0"
    assert cuda_env.arch_list([]) is None


# ------------------------------------------------------------------------------------------------ timing and labels
def test_decode_attention_timing_rotates_inputs_past_l2_and_falls_back(monkeypatch):
    """On CUDA each engine is timed over many calls (a replayed CUDA graph; back-to-back launches when capture
    fails), and successive calls read different input copies spanning more than the L2 cache."""
    import triton.testing

    from benchmarks import bench_decode_attention as bench

    kv_bytes = 2 * 1 * 12 * 577 * 64 * 2  # one image's K/V in fp16: 1.7 MB, far below a 50-60 MB L2
    copies = bench.input_copies("cuda", kv_bytes)
    assert copies * kv_bytes >= bench.ROTATE_BYTES and bench.input_copies("cuda", 10 * bench.ROTATE_BYTES) == 1
    assert bench.input_copies("cpu", kv_bytes) == 1
    seen = []
    call = bench.rotating([lambda i=i: seen.append(i) for i in range(3)])
    for _ in range(7):
        call()
    assert seen == [0, 1, 2, 0, 1, 2, 0]

    def no_capture(fn, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", no_capture)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kwargs: [fn(), 2.0, 1.0, 3.0][1:])
    monkeypatch.setattr(bench.torch.cuda, "synchronize", lambda *args: None)
    timing = bench.time_call(lambda: None, "cuda", warmup=1, repeats=5)
    assert timing == {"median_ms": 2.0, "p20_ms": 1.0, "p80_ms": 3.0, "timing": "back_to_back"}
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda fn, **kwargs: [0.5, 0.4, 0.6])
    assert bench.time_call(lambda: None, "cuda", warmup=1, repeats=5)["timing"] == "cudagraph"


def test_pretrain_rows_name_the_backends_that_ran(monkeypatch):
    """bench_pretrain used to say "reference backend" while ITC and the negatives ran the Triton kernels on CUDA."""
    from benchmarks import bench_pretrain
    from blip_fast import ops

    assert bench_pretrain.backends("cpu") == ("itc_loss=reference, sample_hard_negatives=reference, "
                                              "lm_head_loss=torch, attention=reference")
    # As on a GPU: the Triton backends are available there, the CUDA extension is not built.
    for op in ("itc_loss", "sample_hard_negatives"):
        function, _ = ops._REGISTRY[op]["triton"]
        monkeypatch.setitem(ops._REGISTRY[op], "triton", (function, lambda device: True))
    assert bench_pretrain.backends("cpu").startswith("itc_loss=triton, sample_hard_negatives=triton, ")
    monkeypatch.setenv("BLIP_FAST_BACKEND", "cuda")
    assert ops.resolved_backends("cpu")["itc_loss"].startswith("unavailable (BLIP_FAST_BACKEND=cuda")


# ------------------------------------------------------------------------------------------------ capfilt_cli
@pytest.mark.slow
@pytest.mark.parametrize("repeats", [0, 2])
def test_capfilt_cli_times_its_repeats_apart_from_the_first_run(tmp_path, repeats):
    """The end-to-end CapFilt row: the cache-filling first run apart, the median and 20/80 quantiles of ``repeats``
    fresh runs (none with ``--repeats 0``, gpu_check's setting), and whether the seeded runs kept the same captions."""
    from benchmarks import capfilt_cli

    assert capfilt_cli.main(["--config", "tiny", "--device", "cpu", "--shards", "2", "--per-shard", "3",
                             "--batch-size", "4", "--source-size", "64", "--workers", "1",
                             "--repeats", str(repeats), "--out", str(tmp_path)]) == 0
    [row] = harness.read_rows(tmp_path / "capfilt_cli.jsonl")
    assert row.get("error") is None and row["images"] == 6 and row["repeats"] == repeats
    assert row["first_wall_s"] > 0 and row["img_per_s"] > 0 and row["same_kept"] is True
    if repeats:
        assert 0 < row["wall_p20_s"] <= row["wall_s"] <= row["wall_p80_s"]
    else:
        assert "wall_s" not in row


def test_capfilt_cli_tells_runs_that_kept_other_captions_apart(tmp_path):
    """``same_kept`` compares each run's decisions whatever order its workers wrote them in."""
    from benchmarks import capfilt_cli

    records = [{"key": "a", "source": "web", "kept": True}, {"key": "a", "source": "synthetic", "kept": False},
               {"key": "b", "source": "web", "kept": False}]
    runs = {"first": records, "reordered": records[::-1], "other": [*records[:2], {**records[2], "kept": True}]}
    for name, run in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "scored.jsonl").write_text("".join(json.dumps(record) + "\n" for record in run))
    decisions = {name: capfilt_cli.kept_decisions(tmp_path / name) for name in runs}
    assert decisions["first"] == decisions["reordered"] != decisions["other"]
