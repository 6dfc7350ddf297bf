"""Shared benchmark harness: environment facts, a timer, peak memory, JSON-lines rows and markdown tables.

Benchmarks are data, not tests (STYLE.md §6): every row carries the device, the library versions and the date;
timings are medians with 20/80 quantiles over repeats, after warm-up; the first call (compilation, CUDA-graph
capture, allocator growth) is timed separately and reported, never mixed into the median.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

# Result rows and tables live in benchmarks/report.py (no torch import); re-exported for the benchmarks.
from benchmarks.report import Report as Report
from benchmarks.report import append_rows as append_rows
from benchmarks.report import environment_line as environment_line
from benchmarks.report import markdown_table as markdown_table
from benchmarks.report import read_rows as read_rows

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- environment
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module_name: str) -> str | None:
    try:
        module = __import__(module_name)
    except Exception:  # an optional baseline that fails to import is simply absent
        return None
    return getattr(module, "__version__", "unknown")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def environment(device: torch.device | str) -> dict[str, Any]:
    """Facts every result row carries: what ran, on what, with which versions, when."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        card = torch.cuda.get_device_name(index)
        capability = ".".join(map(str, torch.cuda.get_device_capability(index)))
    else:
        card, capability = f"CPU: {_cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)", None
    return {
        "device": card,
        "device_type": device.type,
        "compute_capability": capability,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "blip_fast_commit": _git_commit(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Milliseconds per call: median and 20/80 quantiles over ``repeats`` calls after warm-up."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    first_call_ms: float
    repeats: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default) of an already sorted sequence."""
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def measure(fn: Callable[[], Any], device: torch.device | str, warmup: int = 2, repeats: int = 10) -> Timing:
    """Time ``fn()``: the first call alone, then ``warmup`` more untimed calls, then ``repeats`` timed calls.

    On CUDA each call is bracketed by CUDA events and the device is synchronised, so asynchronous launches are
    fully counted; on CPU ``time.perf_counter`` is used.
    """
    device = torch.device(device)
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    first_call_ms = (time.perf_counter() - start) * 1e3
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples: list[float] = []
    for _ in range(max(1, repeats)):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end))
        else:
            begin_s = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin_s) * 1e3)
    return timing_of(samples, first_call_ms)


def timing_of(samples_ms: Sequence[float], first_call_ms: float) -> Timing:
    """The median and 20/80 quantiles of per-call times measured elsewhere (e.g. batches of a pipeline)."""
    ordered = sorted(samples_ms)
    return Timing(median_ms=_quantile(ordered, 0.5), p20_ms=_quantile(ordered, 0.2), p80_ms=_quantile(ordered, 0.8),
                  first_call_ms=first_call_ms, repeats=len(ordered))


# ---------------------------------------------------------------------------------------------- memory
def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class PeakMemory:
    """Filled in by :func:`peak_memory`. ``peak_mb`` is the high-water mark inside the block; ``extra_mb`` is that
    minus what was already held on entry (weights, inputs), the fair number to compare engines by."""

    kind: str = ""
    peak_mb: float = float("nan")
    extra_mb: float = float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {"mem_kind": self.kind, "peak_mem_mb": round(self.peak_mb, 1), "extra_mem_mb": round(self.extra_mb, 1)}


@contextmanager
def peak_memory(device: torch.device | str, sample_every_s: float = 0.002):
    """Measure peak memory of the enclosed block.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (tensors only, not the allocator's cache).
    CPU: the process's resident set sampled by a background thread from ``/proc/self/statm`` (tracemalloc does not
    see torch's allocations); without ``/proc`` it falls back to ``getrusage`` max RSS, which is monotone over the
    whole process and so only an upper bound.
    """
    device = torch.device(device)
    result = PeakMemory()
    mb = 1024.0**2
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        result.kind, result.peak_mb, result.extra_mb = "cuda_max_allocated", peak / mb, (peak - base) / mb
        return
    base = _rss_bytes()
    if base is None:
        yield result
        # ru_maxrss is in KiB on Linux.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result.kind, result.peak_mb = "cpu_maxrss_process", peak / mb
        return
    peak_box = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak_box[0] = max(peak_box[0], _rss_bytes() or 0)
            stop.wait(sample_every_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        peak = max(peak_box[0], _rss_bytes() or 0)
        result.kind, result.peak_mb, result.extra_mb = "cpu_rss_sampled", peak / mb, (peak - base) / mb


# ---------------------------------------------------------------------------------------------- results
def time_engines(
    models: dict[str, Any],
    make_call: Callable[[Any], Callable[[], Any]],
    device: torch.device | str,
    row: dict[str, Any],
    warmup: int,
    repeats: int,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any], int]:
    """Time ``make_call(model)()`` for each engine on one case of ``row["batch"]`` images.

    Returns the rows (img/s, latency quantiles, memory, or the error: one broken engine must not hide the
    others), each engine's output for cross-checks, and the number of failures. The "ours" row gets
    ``speedup_vs_hf`` when both engines ran.
    """
    rows: dict[str, dict[str, Any]] = {}
    outputs: dict[str, Any] = {}
    failures = 0
    for engine, model in models.items():
        rows[engine] = engine_row = {**row, "engine": engine}
        call = make_call(model)
        try:
            with peak_memory(device) as memory:
                timing = measure(call, device, warmup=warmup, repeats=repeats)
            outputs[engine] = call()
        except Exception as error:
            engine_row["error"] = f"{type(error).__name__}: {error}"
            print(f"[{engine}] {row.get('case')}: {engine_row['error']}", file=sys.stderr)
            failures += 1
        else:
            engine_row.update(**timing.as_dict(), **memory.as_dict())
            engine_row["img_per_s"] = row["batch"] / (timing.median_ms / 1e3)
    if "img_per_s" in rows.get("ours", {}) and "img_per_s" in rows.get("hf", {}):
        rows["ours"]["speedup_vs_hf"] = rows["ours"]["img_per_s"] / rows["hf"]["img_per_s"]
    return rows, outputs, failures


# ---------------------------------------------------------------------------------------------- FLOPs
def _raw_formula(formula: Callable) -> Callable:
    """A flop_counter formula that takes the op's arguments as they come (shapes are read inside)."""

    def counted(*args, out_val=None, **kwargs):
        return formula(*args, out_val=out_val, **kwargs)

    counted._get_raw = True
    return counted


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (matmuls, convolutions, attention; ``torch.utils.flop_counter``), device-independent:
    the CPU's fused SDPA kernels are counted like the CUDA ones (flop_counter knows only the latter)."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    cpu_attention = {
        aten._scaled_dot_product_flash_attention_for_cpu: _raw_formula(flop_counter.sdpa_flop),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _raw_formula(flop_counter.sdpa_backward_flop),
    }
    with flop_counter.FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        fn()
    return counter.get_total_flops()


#: Dense peak TFLOP/s per (card name fragment, dtype) for MFU: bf16/fp16 tensor cores; fp32 without TF32 (torch's
#: default matmul precision). SXM parts; a card not listed reports no MFU unless --peak-tflops is given.
PEAK_TFLOPS = {
    ("H200", "bf16"): 989.4, ("H200", "fp16"): 989.4, ("H200", "fp32"): 66.9,
    ("H100", "bf16"): 989.4, ("H100", "fp16"): 989.4, ("H100", "fp32"): 66.9,
    ("A100", "bf16"): 312.0, ("A100", "fp16"): 312.0, ("A100", "fp32"): 19.5,
}


def peak_tflops(device_name: str, dtype: str) -> float | None:
    return next((peak for (card, kind), peak in PEAK_TFLOPS.items() if card in device_name and kind == dtype), None)


# ---------------------------------------------------------------------------------------------- helpers
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_and_dtype(args: argparse.Namespace, low_precision: str = "fp16") -> tuple[str, torch.dtype]:
    """``--device``/``--dtype`` with their defaults: CUDA when present, ``low_precision`` there and fp32 on CPU."""
    device = args.device or default_device()
    return device, DTYPES[args.dtype or (low_precision if device.startswith("cuda") else "fp32")]


def build_error_rows(errors: dict[str, str], common: dict[str, Any]) -> list[dict[str, Any]]:
    """One result row per engine that could not be built (reported, not fatal: the others still run)."""
    for engine, message in errors.items():
        print(f"[{engine}] could not be built: {message}", file=sys.stderr)
    return [{**common, "case": "*", "engine": engine, "error": message} for engine, message in errors.items()]


def select_cases(cases: dict[str, Any], spec: str | None) -> list[str]:
    """Case names containing any comma-separated part of ``spec`` (all when empty)."""
    return [name for name in cases if not spec or any(part in name for part in spec.split(","))]


def model_cases(cases: dict[str, Any], args: argparse.Namespace, image_size: int, device: str, dtype: torch.dtype):
    """``(name, case, batch, pixel_values)`` for each case selected by ``--cases``, batch scaled by ``--batch-scale``
    (cases carry a ``batch`` field)."""
    for name in select_cases(cases, args.cases):
        batch = scaled_batch(cases[name].batch, args.batch_scale)
        yield name, cases[name], batch, random_pixels(batch, image_size, device, dtype)


def random_pixels(batch: int, image_size: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """Seeded random images: every engine and run times the same input."""
    generator = torch.Generator(device="cpu").manual_seed(1)
    return torch.randn(batch, 3, image_size, image_size, generator=generator).to(device, dtype)


def scaled_batch(batch: int, scale: float) -> int:
    """``batch * scale`` rounded, at least 1: lets the GPU case list run as a CPU smoke test."""
    return max(1, int(round(batch * scale)))


#: Columns every engine-comparison table starts with (timing, memory, speed-up).
TIMING_COLUMNS = [
    "case", "engine", "batch", "img_per_s", "median_ms", "p20_ms", "p80_ms", "first_call_ms", "peak_mem_mb",
    "extra_mem_mb", "speedup_vs_hf",
]


def add_model_arguments(parser: argparse.ArgumentParser, name: str, warmup: int, repeats: int) -> None:
    """The options shared by the HF-vs-blip_fast model benchmarks."""
    parser.add_argument("--config", default="base", choices=["base", "large", "tiny"])
    parser.add_argument("--image-size", type=int, default=None, help="default: 384 for base/large, preset for tiny")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--engines", default="hf,ours", help="comma-separated subset of hf,ours")
    parser.add_argument("--batch-scale", type=float, default=1.0, help="multiply every batch (min 1)")
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--name", default=name, help="file stem of the results in --out")
    parser.add_argument("--out", default=None, help="folder for <name>.jsonl (appended) and <name>.md")


def finish_model_arguments(args: argparse.Namespace) -> argparse.Namespace:
    if args.image_size is None and args.config != "tiny":
        args.image_size = 384  # BLIP's fine-tuned checkpoints run at 384px: 577 image tokens (DESIGN.md §3)
    return args
