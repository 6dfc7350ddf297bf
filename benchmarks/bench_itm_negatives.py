"""ITM hard-negative mining at BLIP pre-training sizes: the original per-row loop, the vectorised reference
(``blip_fast.ops._sample_hard_negatives_reference``) and the fused Triton sampler (``blip_fast.kernels.itm_negatives``),
time and peak memory. Every engine starts from the same L2-normalised features and computes its own similarities.

The original BLIP code (``models/blip_pretrain.py``) builds both ``[B, B]`` weight matrices and then calls
``torch.multinomial(weights[b], 1).item()`` once per row and direction: 2 * B host syncs (615 ms at 4096 rows on an
H200, DESIGN.md §2). It is written out below as the baseline.

On CUDA each engine is timed with ``triton.testing.do_bench`` (median, 20/80 quantiles, ms; the loop, at hundreds of
ms per call, with the harness's CUDA-event timer and fewer repeats); peak memory is ``torch.cuda.max_memory_allocated``
above the inputs. On CPU only the loop and the reference run, at a smoke size: the Triton path needs CUDA
(TRITON_INTERPRET=1 is a correctness tool and far too slow to time).

    python -m benchmarks.bench_itm_negatives --out benchmarks/results/h100
    python -m benchmarks.bench_itm_negatives --device cpu        # smoke run: loop + reference, 64 rows
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from benchmarks import harness

ROWS = (4096,)
CPU_ROWS = (64,)
DIM = 256
SMOOTHING = 1e-4  # BLIP pre-training
COLUMNS = ["case", "engine", "batch", "dtype", "median_ms", "p20_ms", "p80_ms", "first_call_ms", "peak_mem_mb",
           "extra_mem_mb", "speedup_vs_loop", "valid", "error"]


def original_blip_loop(image_feat, text_feat, temp, image_ids, smoothing, generator, image_columns, text_columns,
                       column_ids):
    """BLIP's released sampler (diagonal exclusion, the pre-training case): one multinomial and one ``.item()`` host
    sync per row and direction. Same signature as the ops backends."""
    with torch.no_grad():
        sim_i2t = image_feat @ text_columns.t() / temp
        sim_t2i = text_feat @ image_columns.t() / temp
        weights_t2i = F.softmax(sim_t2i.float(), dim=1) + smoothing
        weights_t2i.fill_diagonal_(0)
        weights_i2t = F.softmax(sim_i2t.float(), dim=1) + smoothing
        weights_i2t.fill_diagonal_(0)
    negative_images = []
    for b in range(image_feat.shape[0]):
        negative_images.append(torch.multinomial(weights_t2i[b], 1).item())
    negative_texts = []
    for b in range(image_feat.shape[0]):
        negative_texts.append(torch.multinomial(weights_i2t[b], 1).item())
    return torch.tensor(negative_texts), torch.tensor(negative_images)


def engines(device: str) -> dict[str, Callable]:
    from blip_fast import ops

    found: dict[str, Callable] = {"loop": original_blip_loop, "reference": ops._sample_hard_negatives_reference}
    if device.startswith("cuda"):
        from blip_fast.kernels import itm_negatives

        found["fused"] = itm_negatives.sample_hard_negatives
    return found


def make_inputs(rows: int, dim: int, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator(device="cpu").manual_seed(0)
    unit = lambda: F.normalize(torch.randn(rows, dim, generator=generator), dim=-1).to(device, dtype)
    return unit(), unit(), torch.tensor(0.07, device=device)


def time_call(call: Callable[[], Any], device: str, engine: str, warmup: int, repeats: int) -> dict[str, float]:
    if device.startswith("cuda") and engine != "loop":
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(call, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": median, "p20_ms": p20, "p80_ms": p80}
    timing = harness.measure(call, device, warmup=warmup, repeats=repeats)
    return {"median_ms": timing.median_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms}


def _valid(negatives: tuple[torch.Tensor, torch.Tensor], rows: int) -> bool:
    diagonal = torch.arange(rows)
    return all(bool(((n >= 0) & (n < rows) & (n != diagonal)).all()) for n in (t.cpu() for t in negatives))


def run(args: argparse.Namespace, report: harness.Report) -> int:
    """Measure every engine and size, adding each row to ``report`` as it finishes; returns the failure count."""
    device = args.device or harness.default_device()
    dtype = harness.DTYPES[args.dtype]
    if not device.startswith("cuda"):
        print("note: the fused Triton sampler needs CUDA; on CPU only the loop and the reference run", file=sys.stderr)
    env = harness.environment(device)
    found = engines(device)
    selected = [name for name in args.engines.split(",") if name in found]
    rows_list = [int(r) for r in args.rows.split(",")] if args.rows else (ROWS if device.startswith("cuda")
                                                                          else CPU_ROWS)
    failures = 0
    for rows in rows_list:
        image_feat, text_feat, temp = make_inputs(rows, args.dim, device, dtype)
        loop_ms = None
        for engine in selected:
            row = {"bench": "itm_negatives", "case": f"rows{rows}_d{args.dim}", "engine": engine, "batch": rows,
                   "dim": args.dim, "dtype": args.dtype, **env}
            # Columns = the rows themselves, diagonal excluded: BLIP pre-training on one rank.
            call = functools.partial(found[engine], image_feat, text_feat, temp, None, SMOOTHING, None, image_feat,
                                     text_feat, None)
            try:
                # Peak memory and the first call (Triton compilation) from one untimed call; do_bench's own
                # cache-flush buffer must not count as the engine's memory.
                with harness.peak_memory(device) as memory:
                    start = time.perf_counter()
                    negatives = call()
                    harness.synchronize(device)
                row["first_call_ms"] = (time.perf_counter() - start) * 1e3
                row.update(memory.as_dict())
                row["valid"] = _valid(negatives, rows)
                loop = engine == "loop"
                row.update(time_call(call, device, engine, min(args.warmup, 1) if loop else args.warmup,
                                     args.loop_repeats if loop else args.repeats))
            except Exception as error:  # one broken engine must not hide the others
                row["error"] = f"{type(error).__name__}: {error}"
                print(f"[{engine}] rows {rows}: {row['error']}", file=sys.stderr)
                failures += 1
            if engine == "loop" and "median_ms" in row:
                loop_ms = row["median_ms"]
            if loop_ms and "median_ms" in row:
                row["speedup_vs_loop"] = loop_ms / row["median_ms"]
            report.add(row)
    return failures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=sorted(harness.DTYPES), default="fp32", help="feature dtype")
    parser.add_argument("--rows", default=None, help="comma-separated batch sizes (default 4096 on CUDA, 64 on CPU)")
    parser.add_argument("--dim", type=int, default=DIM)
    parser.add_argument("--engines", default="loop,reference,fused", help="comma-separated subset")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="CPU timer repeats (do_bench picks its own on CUDA)")
    parser.add_argument("--loop-repeats", type=int, default=3, help="repeats of the slow original loop")
    parser.add_argument("--name", default="itm_negatives", help="file stem of the results in --out")
    parser.add_argument("--out", default=None, help="folder for <name>.jsonl (appended) and <name>.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = harness.Report(args.out, args.name, COLUMNS,
                            f"ITM hard negatives: {args.dtype}, D={args.dim}, smoothing {SMOOTHING}, both directions")
    failures = run(args, report)
    print(report.text())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
