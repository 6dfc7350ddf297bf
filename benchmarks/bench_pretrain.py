"""Pre-training step throughput of ``BlipPretrainer`` (forward + backward + AdamW).

One process, no DeepSpeed: the number isolates the model's step (ITC + ITM + LM, momentum update, queues) from
the launcher. bf16 runs the step under ``torch.autocast`` with fp32 master weights, as mixed-precision training does.
The ops run on whatever ``blip_fast.ops`` resolves on the device (fused Triton ITC and hard negatives on CUDA, the
reference on CPU, or what ``BLIP_FAST_BACKEND`` forces); each row names them in ``backends``.

    python -m benchmarks.bench_pretrain --config base --image-size 224 --batch 64 --dtype bf16 --out results/h100
    python -m benchmarks.bench_pretrain --config tiny --batch 8 --device cpu           # CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import harness
from blip_fast.config import BlipConfig
from blip_fast.modeling.pretrain import BlipPretrainer

COLUMNS = ["case", "batch", "dtype", "samples_per_s", "median_ms", "p20_ms", "p80_ms", "first_call_ms", "peak_mem_mb",
           "backends", "error"]
#: The ops a pre-training step calls (``backends`` names what each resolved to).
STEP_OPS = ("itc_loss", "sample_hard_negatives", "lm_loss", "attention")


def make_step(model: BlipPretrainer, optimizer: torch.optim.Optimizer, batch: int, dtype: torch.dtype, device: str):
    generator = torch.Generator().manual_seed(0)
    size, vocab = model.config.vision.image_size, model.config.text.vocab_size
    pixel_values = torch.randn(batch, 3, size, size, generator=generator).to(device)
    input_ids = torch.randint(1000 % vocab, vocab - 2, (batch, 30), generator=generator).to(device)
    attention_mask = torch.ones_like(input_ids)
    image_ids = torch.arange(batch, device=device)

    def step() -> None:
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(pixel_values, input_ids, attention_mask, alpha=0.4, image_ids=image_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def backends(device: str) -> str:
    """``op=backend`` for the ops of a step, as ``blip_fast.ops`` resolves them on ``device`` now."""
    from blip_fast import ops

    resolved = ops.resolved_backends(device)
    return ", ".join(f"{op}={resolved[op]}" for op in STEP_OPS if op in resolved)


def run(args: argparse.Namespace, report: harness.Report) -> int:
    """Time the step, adding its row to ``report``; returns the failure count."""
    device = args.device or harness.default_device()
    dtype = harness.DTYPES[args.dtype or ("bf16" if device.startswith("cuda") else "fp32")]
    overrides = {} if args.image_size is None else {"image_size": args.image_size}
    config = BlipConfig.from_name(args.config, **overrides)
    row: dict[str, Any] = {
        "bench": "pretrain", "case": f"{args.config}-{config.vision.image_size}px", "batch": args.batch,
        "config": args.config, "dtype": str(dtype).removeprefix("torch."), "backends": backends(device),
        **harness.environment(device),
    }
    try:
        torch.manual_seed(0)
        model = BlipPretrainer(config, queue_size=args.batch * args.queue_batches).to(device).train()
        trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.05, fused=device.startswith("cuda"))
        step = make_step(model, optimizer, args.batch, dtype, device)
        with harness.peak_memory(device) as memory:
            timing = harness.measure(step, device, warmup=args.warmup, repeats=args.repeats)
    except Exception as error:  # report, do not hide the row (e.g. out of memory at a large batch)
        row["error"] = f"{type(error).__name__}: {error}"
        report.add(row)
        return 1
    row.update(**timing.as_dict(), **memory.as_dict())
    row["samples_per_s"] = args.batch / (timing.median_ms / 1e3)
    report.add(row)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="base", choices=["base", "large", "tiny"])
    parser.add_argument("--image-size", type=int, default=None, help="default: the preset's (224 for base)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--queue-batches", type=int, default=900, help="queue = batch x this (BLIP: 57,600)")
    parser.add_argument("--dtype", choices=sorted(harness.DTYPES), default=None, help="default: bf16 CUDA, fp32 CPU")
    parser.add_argument("--device", default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default="pretrain")
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = harness.Report(args.out, args.name, COLUMNS, lambda first: (
        f"{args.name}: BlipPretrainer step (forward + backward + AdamW), {first['case']}"))
    failures = run(args, report)
    print(report.text())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
