"""Pre-training step of ``BlipPretrainer`` (forward + backward + AdamW): the reference computation vs the fast path.

One process, no DeepSpeed: the number isolates the model's step (ITC + ITM + LM, momentum update, queues) from the
launcher. bf16 runs the step under ``torch.autocast`` with fp32 master weights, as mixed-precision training does.

Paths (``--paths``, each optionally ``PATH:DTYPE``):

- ``reference``: today's computation, the oracle of the tests: every op on its reference backend
  (``BLIP_FAST_BACKEND=reference``), each image's cross-attention K/V projected for every pair that uses it, the LM
  logits materialised, eager layers.
- ``fast``: the default backends (fused ITC and ITM-negative kernels on CUDA, the fused LM head + CE), cross K/V
  projected once per image, and regionally compiled layers (``--compile``, default on CUDA; text padded to 30 tokens).

Each row reports samples/s, FLOPs per sample (``torch.utils.flop_counter``, one eager step), achieved TFLOP/s, MFU
(against the card's dense peak for the row's dtype, or ``--peak-tflops``), the speed-up over the first row, and the
backends ``blip_fast.ops`` resolved to (``backends``).

    python -m benchmarks.bench_pretrain --config base --image-size 224 --batch 64 --paths reference:fp32,fast:bf16
    python -m benchmarks.bench_pretrain --config base --image-size 224 --batch 4 --device cpu --repeats 2  # FLOPs
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import harness
from blip_fast.config import BlipConfig
from blip_fast.modeling.compile import compile_layers
from blip_fast.modeling.pretrain import BlipPretrainer

COLUMNS = ["case", "path", "dtype", "batch", "samples_per_s", "median_ms", "p20_ms", "p80_ms", "first_call_ms",
           "gflop_per_sample", "tflops", "mfu", "speedup", "peak_mem_mb", "backends", "error"]
TEXT_LENGTH = 30  # BLIP's max_text_length in pre-training; the compiled path pads to it
#: The ops a pre-training step calls (``backends`` names what each resolved to).
STEP_OPS = ("itc_loss", "sample_hard_negatives", "lm_head_loss", "attention")


@contextlib.contextmanager
def backend(name: str | None):
    """``BLIP_FAST_BACKEND`` set (or unset, None = auto) for the enclosed block."""
    previous = os.environ.pop("BLIP_FAST_BACKEND", None)
    if name is not None:
        os.environ["BLIP_FAST_BACKEND"] = name
    try:
        yield
    finally:
        os.environ.pop("BLIP_FAST_BACKEND", None)
        if previous is not None:
            os.environ["BLIP_FAST_BACKEND"] = previous


def make_step(model: BlipPretrainer, optimizer: torch.optim.Optimizer, batch: int, dtype: torch.dtype, device: str,
              update: bool = True):
    """One training step on fixed random inputs (``update=False``: forward + backward only, for FLOP counting)."""
    generator = torch.Generator().manual_seed(0)
    size, vocab = model.config.vision.image_size, model.config.text.vocab_size
    pixel_values = torch.randn(batch, 3, size, size, generator=generator).to(device)
    input_ids = torch.randint(1000 % vocab, vocab - 2, (batch, TEXT_LENGTH), generator=generator).to(device)
    attention_mask = torch.ones_like(input_ids)
    image_ids = torch.arange(batch, device=device)

    def step() -> None:
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(pixel_values, input_ids, attention_mask, alpha=0.4, image_ids=image_ids).loss
        loss.backward()
        if update:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def backends(device: str) -> str:
    """``op=backend`` for the ops of a step, as ``blip_fast.ops`` resolves them on ``device`` now."""
    from blip_fast import ops

    resolved = ops.resolved_backends(device)
    return ", ".join(f"{op}={resolved[op]}" for op in STEP_OPS if op in resolved)


def run_path(args: argparse.Namespace, config: BlipConfig, path: str, dtype_name: str, device: str) -> dict[str, Any]:
    fast = path == "fast"
    dtype = harness.DTYPES[dtype_name]
    row: dict[str, Any] = {"bench": "pretrain", "case": f"{args.config}-{config.vision.image_size}px", "path": path,
                           "dtype": dtype_name, "batch": args.batch, "config": args.config,
                           **harness.environment(device)}
    compiled = fast and (args.compile if args.compile is not None else device.startswith("cuda"))
    row["compiled"] = compiled
    try:
        with backend(None if fast else "reference"):
            row["backends"] = backends(device)
            torch.manual_seed(0)
            model = BlipPretrainer(config, queue_size=args.batch * args.queue_batches, share_cross_kv=fast)
            model = model.to(device).train()
            trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
            optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.05, fused=device.startswith("cuda"))
            # FLOPs of the algorithm: one eager forward + backward (compiled code is not visible to the counter).
            flops = harness.count_flops(make_step(model, optimizer, args.batch, dtype, device, update=False))
            if compiled:
                compile_layers(model)
            step = make_step(model, optimizer, args.batch, dtype, device)
            with harness.peak_memory(device) as memory:
                timing = harness.measure(step, device, warmup=args.warmup, repeats=args.repeats)
    except Exception as error:  # report, do not hide the row (e.g. out of memory at a large batch)
        row["error"] = f"{type(error).__name__}: {error}"
        return row
    seconds = timing.median_ms / 1e3
    row.update(**timing.as_dict(), **memory.as_dict())
    row["samples_per_s"] = args.batch / seconds
    row["gflop_per_sample"] = flops / args.batch / 1e9
    row["tflops"] = flops / seconds / 1e12
    peak = args.peak_tflops or harness.peak_tflops(row["device"], dtype_name)
    row["mfu"] = row["tflops"] / peak if peak else None
    return row


def run(args: argparse.Namespace, report: harness.Report) -> int:
    """Time each path, adding its row to ``report`` as it is measured; returns the failure count."""
    device = args.device or harness.default_device()
    default_dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    overrides = {} if args.image_size is None else {"image_size": args.image_size}
    config = BlipConfig.from_name(args.config, **overrides)
    specs = [spec.partition(":")[::2] for spec in args.paths.split(",")]
    for path, dtype_name in specs:
        if path not in ("reference", "fast") or (dtype_name and dtype_name not in harness.DTYPES):
            raise SystemExit(f"--paths: {path}:{dtype_name} is not reference|fast[:fp32|fp16|bf16]")
    failures, first = 0, None
    for path, dtype_name in specs:
        row = run_path(args, config, path, dtype_name or default_dtype, device)
        first = first or row.get("samples_per_s")
        if first and row.get("samples_per_s"):
            row["speedup"] = row["samples_per_s"] / first
        failures += "error" in row
        report.add(row)
    return failures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="base", choices=["base", "large", "tiny"])
    parser.add_argument("--image-size", type=int, default=None, help="default: the preset's (224 for base)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--queue-batches", type=int, default=900, help="queue = batch x this (BLIP: 57,600)")
    parser.add_argument("--paths", default="reference,fast", help="comma-separated PATH[:DTYPE], PATH reference|fast")
    parser.add_argument("--dtype", choices=sorted(harness.DTYPES), default=None, help="default: bf16 CUDA, fp32 CPU")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile the fast path's layers (default: on CUDA only; inductor on CPU takes minutes)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense peak for MFU (default: by card)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default="pretrain")
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = harness.Report(args.out, args.name, COLUMNS, lambda first: (
        f"{args.name}: BlipPretrainer step (ITC + ITM + LM, AdamW), {first['case']}, reference vs fast path"))
    failures = run(args, report)
    print(report.text())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
