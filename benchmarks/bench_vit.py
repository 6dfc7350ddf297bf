"""ViT image-encoder forward throughput: HuggingFace ``BlipVisionModel`` vs ``blip_fast.modeling.vit``, same weights.

The HuggingFace encoder is built from the blip_fast preset's ``to_hf()`` vision config with random weights and its
state dict (the ``vision_model.*`` sub-dict of a full BLIP checkpoint, prefix removed) is loaded strictly into
ours. Reports img/s, latency quantiles, first-call time and peak memory per engine, the speed-up, and the largest
absolute difference of ``last_hidden_state`` between the engines.

    python -m benchmarks.bench_vit --config base --dtype fp16 --out benchmarks/results/h100
    python -m benchmarks.bench_vit --config tiny --device cpu --batch-scale 0.05   # CPU smoke run
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import harness

ENGINES = ("hf", "ours")
BATCHES = (1, 64, 256)


def build_models(
    config_name: str, device: str, dtype: torch.dtype, image_size: int | None = None, engines=ENGINES
) -> tuple[Any, dict[str, Any], dict[str, str]]:
    """(blip_fast VisionConfig, {engine: model}, {engine: error}) with the same random weights in every engine."""
    import transformers

    from blip_fast.config import BlipConfig

    overrides = {"image_size": image_size} if image_size else {}
    config = BlipConfig.from_name(config_name, **overrides)
    hf_vision_config = transformers.BlipConfig.from_dict(config.to_hf()).vision_config
    torch.manual_seed(0)
    with torch.device(device):
        hf_model = transformers.BlipVisionModel(hf_vision_config)
    hf_model = hf_model.to(device=device, dtype=dtype).eval()
    models: dict[str, Any] = {"hf": hf_model}
    errors: dict[str, str] = {}
    if "ours" in engines:
        try:
            from blip_fast.modeling.vit import BlipVisionModel

            with torch.device(device):
                ours = BlipVisionModel(config.vision)
            ours.load_state_dict(hf_model.state_dict(), strict=True)
            models["ours"] = ours.to(device=device, dtype=dtype).eval()
        except Exception as error:  # recorded in the results; the HF baseline still runs
            errors["ours"] = f"{type(error).__name__}: {error}"
    return config.vision, {name: model for name, model in models.items() if name in engines}, errors


def make_forward(model: Any, pixel_values: torch.Tensor) -> Callable[[], torch.Tensor]:
    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(pixel_values).last_hidden_state

    return forward


def run(args: argparse.Namespace, report: harness.Report) -> int:
    """Measure every batch size, adding its rows to ``report`` as each finishes; returns the failure count."""
    device, dtype = harness.device_and_dtype(args)
    engines = tuple(name for name in args.engines.split(",") if name)
    env = harness.environment(device)
    vision, models, errors = build_models(args.config, device, dtype, args.image_size, engines)
    common = {
        "bench": "vit",
        "config": args.config,
        "dtype": str(dtype).replace("torch.", ""),
        "image_size": vision.image_size,
        "tokens": vision.num_positions,
        **env,
    }
    report.add(*harness.build_error_rows(errors, common))
    failures = len(errors)
    batches = sorted({harness.scaled_batch(int(b), args.batch_scale) for b in args.batches.split(",") if b})
    for batch in batches:
        pixel_values = harness.random_pixels(batch, vision.image_size, device, dtype)
        row = {**common, "case": f"forward_bs{batch}", "batch": batch}
        case_rows, outputs, failed = harness.time_engines(
            models, functools.partial(make_forward, pixel_values=pixel_values), device, row, args.warmup, args.repeats
        )
        failures += failed
        if {"ours", "hf"} <= outputs.keys():
            case_rows["ours"]["max_abs_diff"] = (outputs["ours"].float() - outputs["hf"].float()).abs().max().item()
        report.add(*case_rows.values())
        del outputs  # free the outputs before the next batch size allocates
    return failures


COLUMNS = [*harness.TIMING_COLUMNS, "max_abs_diff", "error"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_model_arguments(parser, name="vit", warmup=3, repeats=10)
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    return harness.finish_model_arguments(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = harness.Report(args.out, args.name, COLUMNS, lambda first: (
        f"{args.name}: {first['config']} {first['dtype']}, {first['image_size']}px ({first['tokens']} tokens)"))
    failures = run(args, report)
    print(report.text())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
