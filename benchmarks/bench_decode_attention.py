"""One decode step's cross-attention (one layer) at BLIP-base shapes: every engine against the K/V-read floor.

A caption decode step attends each image's ``rows`` beams/samples over its cached image K/V ``[C, H, N, Dh]``
(N = 577 at 384 px, 12 heads x 64). Reading that K/V is ~94% of the step's bytes (DESIGN.md §3), so the floor is
``K/V bytes / copy bandwidth``, with the bandwidth measured by a device-to-device copy in the same run. Engines:

- ``eager_hf``: HuggingFace/original BLIP: K/V stored repeated per beam (``[C * rows, H, N, Dh]``, built once, not
  timed), then matmul + softmax + matmul — it reads ``rows`` times the bytes;
- ``sdpa``: ``blip_fast.ops`` reference, torch SDPA over the shared K/V (query rows ``[C, H, rows, Dh]``);
- ``triton`` / ``cuda``: blip_fast's kernels (CUDA only; ``cuda`` needs the built ``blip_fast._C``);
- ``flash_attn`` (``flash_attn_with_kvcache``) and ``xformers`` (``memory_efficient_attention``) when importable,
  on ``[C, N, H, Dh]`` copies of the cache made once.

Rows report ms per call (median, 20/80 quantiles), ``kv_gb`` (bytes the engine must read), achieved GB/s and
``floor_ratio`` = floor / median (1.0 = at the copy bandwidth). No mask: BLIP's image tokens are all valid.

Timing on CUDA: one launch between two events would mostly time the launch (Triton's Python launcher against a
C++ op), which a decode step run as a CUDA graph never pays. So each engine's call is captured many times in a
CUDA graph and the replay is timed (``triton.testing.do_bench_cudagraph``; ``timing`` = ``cudagraph``), or, for an
engine that cannot be captured, many back-to-back calls (``do_bench``; ``timing`` = ``back_to_back``). The
successive calls rotate over enough copies of the inputs to exceed the L2 cache, so small cases read device
memory as a real step does, not the cache.

    python -m benchmarks.bench_decode_attention --out benchmarks/results/h100
    python -m benchmarks.bench_decode_attention --device cpu      # tiny smoke run: eager_hf and sdpa
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import harness

IMAGES = (256, 64, 1)
ROWS = (1, 3)
BASE = {"keys": 577, "heads": 12, "head_dim": 64}
TINY = {"keys": 33, "heads": 2, "head_dim": 16}  # CPU smoke shapes, with images 4/2/1
COLUMNS = ["case", "engine", "batch", "rows", "median_ms", "p20_ms", "p80_ms", "first_call_ms", "kv_gb", "gb_per_s",
           "floor_ms", "floor_ratio", "copy_gb_per_s", "timing", "input_copies", "max_abs_diff", "error"]
#: Inputs rotated over by back-to-back calls span at least this many bytes (H100/H200 L2: 50/60 MB).
ROTATE_BYTES = 256 * 2**20
ENGINES = ("eager_hf", "sdpa", "triton", "cuda", "flash_attn", "xformers")


# ---------------------------------------------------------------------------------------------- engines
def eager_hf(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """HF BLIP's eager cross-attention on per-beam K/V: query ``[C * rows, H, 1, Dh]``, key/value repeated."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * query.shape[-1] ** -0.5
    return torch.matmul(scores.softmax(dim=-1), value)


def _flash_attn() -> Callable | None:
    try:
        from flash_attn import flash_attn_with_kvcache
    except Exception:  # optional baseline: absent or built for another torch
        return None
    return flash_attn_with_kvcache


def _xformers() -> Callable | None:
    try:
        from xformers.ops import memory_efficient_attention
    except Exception:  # optional baseline
        return None
    return memory_efficient_attention


def engine_calls(device: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 rows: int) -> dict[str, Callable[[], torch.Tensor]]:
    """Each available engine as a no-argument call returning ``[C, H, rows, Dh]``. Layout copies (per-beam K/V for
    eager, ``[C, N, H, Dh]`` for flash-attn/xformers) are made here, once, as those engines store their caches."""
    from blip_fast import ops

    images, heads, _, head_dim = query.shape
    hf_query = query.transpose(1, 2).reshape(images * rows, heads, 1, head_dim)  # one query row per beam
    hf_key, hf_value = (t.repeat_interleave(rows, dim=0) for t in (key, value))
    calls = {
        "eager_hf": lambda: eager_hf(hf_query, hf_key, hf_value).view(images, rows, heads, head_dim).transpose(1, 2),
        "sdpa": lambda: ops._decode_attention_reference(query, key, value, None),
    }
    if not device.startswith("cuda"):
        return calls
    from blip_fast.kernels.decode_attention import decode_attention as triton_decode_attention

    calls["triton"] = lambda: triton_decode_attention(query, key, value)
    if ops.cuda_extension_loaded():
        calls["cuda"] = lambda: torch.ops.blip_fast.decode_attention(query, key, value, None, head_dim**-0.5)
    bnhd_query = query.transpose(1, 2).contiguous()  # [C, rows, H, Dh]
    bnhd_key, bnhd_value = (t.transpose(1, 2).contiguous() for t in (key, value))  # [C, N, H, Dh]
    flash, xformers = _flash_attn(), _xformers()
    if flash is not None:
        calls["flash_attn"] = lambda: flash(bnhd_query, bnhd_key, bnhd_value).transpose(1, 2)
    if xformers is not None:
        calls["xformers"] = lambda: xformers(bnhd_query, bnhd_key, bnhd_value).transpose(1, 2)
    return calls


# ---------------------------------------------------------------------------------------------- measurement
def copy_bandwidth(device: str, nbytes: int, warmup: int, repeats: int) -> float:
    """Device copy bandwidth in bytes/s (read + write counted), the same run's yardstick for the K/V floor."""
    source = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    target = torch.empty_like(source)
    timing = harness.measure(lambda: target.copy_(source), device, warmup=warmup, repeats=repeats)
    return 2 * source.numel() * source.element_size() / (timing.median_ms * 1e-3)


def kv_bytes(engine: str, shared_kv_bytes: int, rows: int) -> int:
    """Bytes of K/V the engine has to read: eager HF reads its per-beam copies."""
    return shared_kv_bytes * (rows if engine == "eager_hf" else 1)


def time_call(call: Callable[[], torch.Tensor], device: str, warmup: int, repeats: int) -> dict[str, Any]:
    """ms per call over many calls (module docstring): a replayed CUDA graph, else back-to-back launches; the
    harness's timer on CPU."""
    if not device.startswith("cuda"):
        timing = harness.measure(call, device, warmup=warmup, repeats=repeats)
        return {"median_ms": timing.median_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms, "timing": "single"}
    import triton.testing

    quantiles = [0.5, 0.2, 0.8]
    try:
        median, p20, p80 = triton.testing.do_bench_cudagraph(call, rep=max(20, repeats), quantiles=quantiles)
        mode = "cudagraph"
    except Exception as error:  # an engine that cannot be captured (host sync, unsupported op) still gets a number
        print(f"note: CUDA-graph timing failed ({type(error).__name__}: {error}); timing back-to-back calls",
              file=sys.stderr)
        torch.cuda.synchronize()
        median, p20, p80 = triton.testing.do_bench(call, warmup=max(5, warmup), rep=max(20, repeats),
                                                   quantiles=quantiles)
        mode = "back_to_back"
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "timing": mode}


def rotating(calls: list[Callable[[], torch.Tensor]]) -> Callable[[], torch.Tensor]:
    """One call that runs the next of ``calls`` each time (captured into a graph, the replays rotate too)."""
    cycle = itertools.cycle(calls)
    return lambda: next(cycle)()


def input_copies(device: str, kv_nbytes: int) -> int:
    """How many input sets successive calls rotate over so that they span more than the L2 cache (CUDA only)."""
    return max(1, -(-ROTATE_BYTES // kv_nbytes)) if device.startswith("cuda") else 1


def run_case(device: str, dtype: torch.dtype, images: int, rows: int, shape: dict[str, int], bandwidth: float,
             common: dict[str, Any], args: argparse.Namespace) -> tuple[list[dict[str, Any]], int]:
    """Time every engine on one (images, rows) case; add bytes, GB/s, the floor and the difference to SDPA."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    make = lambda n: torch.randn(images, shape["heads"], n, shape["head_dim"], generator=generator).to(device, dtype)
    shared_kv_bytes = 2 * images * shape["heads"] * shape["keys"] * shape["head_dim"] * dtype.itemsize
    sets = [engine_calls(device, make(rows), make(shape["keys"]), make(shape["keys"]), rows)
            for _ in range(input_copies(device, shared_kv_bytes))]
    row = {**common, "case": f"c{images}_r{rows}", "batch": images, "rows": rows, "input_copies": len(sets)}
    results, outputs, failures = [], {}, 0
    for engine in sets[0]:
        engine_row = {**row, "engine": engine}
        results.append(engine_row)
        try:
            harness.synchronize(device)
            start = time.perf_counter()
            outputs[engine] = sets[0][engine]()  # the first call: Triton compilation, cuBLAS handles
            harness.synchronize(device)
            engine_row["first_call_ms"] = (time.perf_counter() - start) * 1e3
            engine_row.update(time_call(rotating([calls[engine] for calls in sets]), device, args.warmup, args.repeats))
        except Exception as error:  # one broken engine must not hide the others
            engine_row["error"] = f"{type(error).__name__}: {error}"
            print(f"[{engine}] {row['case']}: {engine_row['error']}", file=sys.stderr)
            failures += 1
            continue
        nbytes = kv_bytes(engine, shared_kv_bytes, rows)
        engine_row["kv_gb"] = nbytes / 1e9
        engine_row["gb_per_s"] = nbytes / (engine_row["median_ms"] * 1e-3) / 1e9
        engine_row["floor_ms"] = shared_kv_bytes / bandwidth * 1e3
        engine_row["floor_ratio"] = engine_row["floor_ms"] / engine_row["median_ms"]
    reference = outputs.get("sdpa")
    for engine_row in results:
        if reference is not None and engine_row["engine"] in outputs:
            difference = outputs[engine_row["engine"]].float() - reference.float()
            engine_row["max_abs_diff"] = difference.abs().max().item()
    return results, failures


def run(args: argparse.Namespace, report: harness.Report) -> int:
    """Measure every case, adding its rows to ``report`` as each finishes; returns the failure count."""
    device = args.device or harness.default_device()
    on_cuda = device.startswith("cuda")
    dtype = harness.DTYPES[args.dtype or ("fp16" if on_cuda else "fp32")]
    shape = BASE if on_cuda and not args.tiny else TINY
    images_list = [int(c) for c in args.images.split(",")] if args.images else (IMAGES if shape is BASE else (4, 2, 1))
    if not on_cuda:
        print("note: Triton/CUDA/flash-attn/xformers need CUDA; timing eager_hf and sdpa at a smoke size",
              file=sys.stderr)
    bandwidth = copy_bandwidth(device, (1 << 30) if on_cuda else (1 << 22), args.warmup, args.repeats)
    common = {"bench": "decode_attention", "dtype": str(dtype).replace("torch.", ""), **shape,
              "copy_gb_per_s": bandwidth / 1e9, **harness.environment(device)}
    failures = 0
    for images in images_list:
        for rows in (int(r) for r in args.rows.split(",")):
            case_rows, case_failures = run_case(device, dtype, images, rows, shape, bandwidth, common, args)
            report.add(*case_rows)
            failures += case_failures
    return failures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=sorted(harness.DTYPES), default=None, help="default: fp16 on CUDA")
    parser.add_argument("--images", default=None, help=f"comma-separated; default {IMAGES} on CUDA, tiny on CPU")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="beams/samples per image, comma-separated")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CUDA too (CPU always uses them)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--name", default="decode_attention", help="file stem of the results in --out")
    parser.add_argument("--out", default=None, help="folder for <name>.jsonl (appended) and <name>.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = harness.Report(args.out, args.name, COLUMNS, lambda first: (
        f"Decode-step cross-attention (one layer), {first['dtype']}, {first['keys']} keys, {first['heads']} heads "
        f"x {first['head_dim']}; floor = K/V bytes at the measured copy bandwidth"))
    failures = run(args, report)
    print(report.text())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
