"""BLIP ITC loss, forward + backward: eager reference (``blip_fast.ops._itc_loss_reference``) vs the fused Triton
kernels (``blip_fast.kernels.itc``), time and peak memory, both directions, soft targets, queue of 57,600.

On CUDA each case is timed with ``triton.testing.do_bench`` (median, 20/80 quantiles, ms) and its peak memory is
``torch.cuda.max_memory_allocated`` above what the inputs already hold. The fused row also reports its matmul FLOP
count, the achieved TFLOP/s, and the fraction of the compute floor (FLOPs at ~800 TFLOP/s dense fp16/bf16 on
H100/H200, DESIGN.md §3: ~1.5 ms at B=4096 + 57,600). Eager is skipped (recorded as an error) when it runs out of
memory, as it may at B=32,768.

On CPU only the reference runs, at a tiny smoke size (the Triton path needs CUDA, or TRITON_INTERPRET=1, which is a
correctness tool and far too slow to time).

    python -m benchmarks.bench_itc --dtype bf16 --out benchmarks/results/h100
    python -m benchmarks.bench_itc --device cpu        # smoke run: reference only, tiny sizes
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from benchmarks import harness

BATCHES = (1024, 4096, 32768)
QUEUE = 57_600
DIM = 256
ASSUMED_PEAK_TFLOPS = 800.0  # achievable dense fp16/bf16 on H100 SXM (DESIGN.md §3); the floor is FLOPs / this
COLUMNS = ["case", "engine", "batch", "queue", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb", "extra_mem_mb",
           "gflop", "tflops", "floor_ms", "floor_fraction", "speedup_vs_eager", "loss", "error"]


def make_inputs(batch: int, queue: int, dim: int, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """BLIP's ITC inputs: online features [B, D] with grad, momentum features [B, D], queues [D, Q], temp [1]."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=generator), dim=-1).to(device, dtype)
    return {
        "image_feat": unit(batch, dim).requires_grad_(), "text_feat": unit(batch, dim).requires_grad_(),
        "image_feat_m": unit(batch, dim), "text_feat_m": unit(batch, dim),
        # BLIP's queues are [D, Q] buffers, normalised along D.
        "image_queue": unit(queue, dim).t(), "text_queue": unit(queue, dim).t(),
        "temp": torch.tensor([0.07], device=device, requires_grad=True),
    }


def make_step(loss_fn: Callable, inputs: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    names = ("image_feat", "text_feat", "image_feat_m", "text_feat_m", "image_queue", "text_queue", "temp")

    def step() -> torch.Tensor:
        for name in ("image_feat", "text_feat", "temp"):
            inputs[name].grad = None
        loss = loss_fn(*(inputs[name] for name in names), 0.4, None, None)
        loss.backward()
        return loss.detach()

    return step


def engines(device: str) -> dict[str, Callable]:
    from blip_fast import ops

    found = {"eager": ops._itc_loss_reference}
    if device.startswith("cuda"):
        from blip_fast.kernels import itc

        found["fused"] = itc.itc_loss
    return found


def time_step(step: Callable[[], Any], device: str, warmup: int, repeats: int) -> dict[str, float]:
    if device.startswith("cuda"):
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(step, warmup=warmup * 25, rep=repeats * 25,
                                                   quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": median, "p20_ms": p20, "p80_ms": p80}
    timing = harness.measure(step, device, warmup=warmup, repeats=repeats)
    return {"median_ms": timing.median_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms,
            "first_call_ms": timing.first_call_ms}


def run(args: argparse.Namespace, report: harness.Report) -> int:
    """Measure every batch, adding its rows to ``report`` as each finishes; returns the failure count."""
    device = args.device or harness.default_device()
    on_cuda = device.startswith("cuda")
    dtype = harness.DTYPES[args.dtype or ("fp16" if on_cuda else "fp32")]
    batches = [int(b) for b in args.batches.split(",")] if args.batches else (BATCHES if on_cuda else (8, 33))
    queue = args.queue if args.queue is not None else (QUEUE if on_cuda else 100)
    dim = args.dim if args.dim is not None else (DIM if on_cuda else 32)
    if not on_cuda:
        print("note: the fused Triton path needs CUDA (or TRITON_INTERPRET=1, too slow to time); "
              "timing the eager reference only at a smoke size", file=sys.stderr)
    from blip_fast.kernels.itc import flop_count

    env = harness.environment(device)
    common = {"bench": "itc", "dtype": str(dtype).replace("torch.", ""), "dim": dim, "queue": queue, **env}
    failures = 0
    for batch in batches:
        case_rows: dict[str, dict[str, Any]] = {}
        for engine, loss_fn in engines(device).items():
            row = case_rows[engine] = {**common, "case": f"fwd+bwd_b{batch}", "engine": engine, "batch": batch}
            inputs = None
            try:
                inputs = make_inputs(batch, queue, dim, device, dtype)
                step = make_step(loss_fn, inputs)
                with harness.peak_memory(device) as memory:
                    row["loss"] = float(step())  # first call: compilation and allocator growth, not timed
                row.update(memory.as_dict())
                row.update(time_step(step, device, args.warmup, args.repeats))
            except torch.cuda.OutOfMemoryError as error:  # eager at B=32,768 may not fit; fused still runs
                row["error"] = f"OOM: {str(error).splitlines()[0]}"
                print(f"[{engine}] b{batch}: {row['error']}", file=sys.stderr)
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {error}"
                print(f"[{engine}] b{batch}: {row['error']}", file=sys.stderr)
                failures += 1
            del inputs
            if on_cuda:
                torch.cuda.empty_cache()
            if "median_ms" in row:
                flops = flop_count(batch, batch + queue, dim)
                row["gflop"] = flops / 1e9
                row["tflops"] = flops / (row["median_ms"] * 1e-3) / 1e12
                row["floor_ms"] = flops / (ASSUMED_PEAK_TFLOPS * 1e12) * 1e3
                row["floor_fraction"] = row["floor_ms"] / row["median_ms"]
        fused, eager = case_rows.get("fused", {}), case_rows.get("eager", {})
        if "median_ms" in fused and "median_ms" in eager:
            fused["speedup_vs_eager"] = eager["median_ms"] / fused["median_ms"]
        report.add(*case_rows.values())
    return failures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=sorted(harness.DTYPES), default=None, help="default: fp16 on CUDA")
    parser.add_argument("--batches", default=None, help=f"comma-separated; default {BATCHES} on CUDA, tiny on CPU")
    parser.add_argument("--queue", type=int, default=None, help=f"default {QUEUE} on CUDA, 100 on CPU")
    parser.add_argument("--dim", type=int, default=None, help=f"default {DIM} on CUDA, 32 on CPU")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--name", default="itc", help="file stem of the results in --out")
    parser.add_argument("--out", default=None, help="folder for <name>.jsonl (appended) and <name>.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = harness.Report(args.out, args.name, COLUMNS, lambda first: (
        f"ITC loss fwd+bwd: eager vs fused, {first['dtype']}, D={first['dim']}, queue {first['queue']}"))
    failures = run(args, report)
    print(report.text())
    for row in report.rows:
        if row["engine"] == "fused" and "median_ms" in row:
            print(f"fused b{row['batch']}: {row['gflop']:.0f} GFLOP in {row['median_ms']:.3f} ms = "
                  f"{row['tflops']:.0f} TFLOP/s, {100 * row['floor_fraction']:.0f}% of the "
                  f"{row['floor_ms']:.2f} ms floor at {ASSUMED_PEAK_TFLOPS:.0f} TFLOP/s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
