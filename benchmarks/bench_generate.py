"""Caption generation throughput: HuggingFace ``BlipForConditionalGeneration.generate`` vs blip_fast, same weights.

Both engines decode exactly ``--new-tokens`` tokens (``min_new_tokens == max_new_tokens``), so random weights that
emit ``[SEP]`` early do not shorten the work. The HuggingFace model is built from the blip_fast preset's
``to_hf()`` config with random weights; blip_fast's model is made from it with ``from_hf_model`` (identical
state-dict keys). Reports img/s, median and 20/80-quantile latency, first-call time (compilation, CUDA-graph
capture) and peak memory per engine, and blip_fast's speed-up over HuggingFace.

    python -m benchmarks.bench_generate --config base --dtype fp16 --out benchmarks/results/h100
    python -m benchmarks.bench_generate --config tiny --device cpu --batch-scale 0.02   # CPU smoke run
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import harness

ENGINES = ("hf", "ours")


@dataclass(frozen=True)
class Case:
    batch: int
    generate_kwargs: dict[str, Any] = field(default_factory=dict)
    #: Deterministic decoding: both engines must produce the same token ids (checked with --check-tokens).
    deterministic: bool = True


CASES: dict[str, Case] = {
    "greedy_bs1": Case(1),
    "greedy_bs64": Case(64),
    "greedy_bs256": Case(256),
    "beam3_bs64": Case(64, {"num_beams": 3}),
    # CapFilt's captioner setting (nucleus, top_p 0.9), with HuggingFace's default top_k passed explicitly.
    "nucleus_bs256": Case(256, {"do_sample": True, "top_p": 0.9, "top_k": 50}, deterministic=False),
}


def build_models(
    config_name: str, device: str, dtype: torch.dtype, image_size: int | None = None, engines=ENGINES
) -> tuple[Any, dict[str, Any], dict[str, str]]:
    """(blip_fast BlipConfig, {engine: model}, {engine: error}) with the same random weights in every engine."""
    import transformers

    from blip_fast.config import BlipConfig

    overrides = {"image_size": image_size} if image_size else {}
    config = BlipConfig.from_name(config_name, **overrides)
    hf_config = transformers.BlipConfig.from_dict(config.to_hf("BlipForConditionalGeneration"))
    torch.manual_seed(0)
    with torch.device(device):  # initialise in place: a base model built on the CPU takes seconds
        hf_model = transformers.BlipForConditionalGeneration(hf_config)
    hf_model = hf_model.to(device=device, dtype=dtype).eval()
    models: dict[str, Any] = {"hf": hf_model}
    errors: dict[str, str] = {}
    if "ours" in engines:
        try:
            models["ours"] = load_ours(hf_model, device, dtype)
        except Exception as error:  # recorded in the results; the HF baseline still runs
            errors["ours"] = f"{type(error).__name__}: {error}"
    return config, {name: model for name, model in models.items() if name in engines}, errors


def load_ours(hf_model: Any, device: str, dtype: torch.dtype) -> Any:
    import blip_fast

    return blip_fast.BlipForConditionalGeneration.from_hf_model(hf_model).to(device=device, dtype=dtype).eval()


def make_generate(model: Any, pixel_values: torch.Tensor, case: Case, new_tokens: int) -> Callable[[], Any]:
    def generate() -> torch.Tensor:
        torch.manual_seed(0)  # same sampling stream every call and in both engines
        with torch.no_grad():
            return model.generate(
                pixel_values=pixel_values, min_new_tokens=new_tokens, max_new_tokens=new_tokens, **case.generate_kwargs
            )

    return generate


def token_agreement(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Fraction of rows whose token ids are identical (0.0 when the shapes differ)."""
    if reference.shape != candidate.shape:
        return 0.0
    return (reference == candidate).all(dim=1).float().mean().item()


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], int]:
    device = args.device or harness.default_device()
    dtype = harness.DTYPES[args.dtype or ("fp16" if device.startswith("cuda") else "fp32")]
    engines = tuple(name for name in args.engines.split(",") if name)
    env = harness.environment(device)
    config, models, errors = build_models(args.config, device, dtype, args.image_size, engines)
    image_size = config.vision.image_size
    common = {
        "bench": "generate",
        "config": args.config,
        "dtype": str(dtype).replace("torch.", ""),
        "image_size": image_size,
        "new_tokens": args.new_tokens,
        **env,
    }
    rows: list[dict[str, Any]] = []
    failures = 0
    for engine, message in errors.items():
        print(f"[{engine}] could not be built: {message}", file=sys.stderr)
        rows.append({**common, "case": "*", "engine": engine, "error": message})
        failures += 1
    selected = [name for name in CASES if not args.cases or any(part in name for part in args.cases.split(","))]
    for case_name in selected:
        case = CASES[case_name]
        batch = harness.scaled_batch(case.batch, args.batch_scale)
        generator = torch.Generator(device="cpu").manual_seed(1)
        pixel_values = torch.randn(batch, 3, image_size, image_size, generator=generator).to(device, dtype)
        row = {**common, "case": case_name, "batch": batch, **case.generate_kwargs}
        case_rows, outputs, failed = harness.time_engines(
            models, functools.partial(make_generate, pixel_values=pixel_values, case=case, new_tokens=args.new_tokens),
            device, row, args.warmup, args.repeats,
        )
        failures += failed
        if args.check_tokens and case.deterministic and {"ours", "hf"} <= outputs.keys():
            case_rows["ours"]["tokens_match"] = token_agreement(outputs["hf"], outputs["ours"])
        rows.extend(case_rows.values())
        del outputs  # free the generated ids before the next case allocates
    return rows, failures


COLUMNS = [*harness.TIMING_COLUMNS, "tokens_match", "error"]


def report(rows: list[dict[str, Any]], out_dir: str | None, name: str) -> str:
    first = rows[0]
    title = f"{name}: {first['config']} {first['dtype']}, {first.get('new_tokens', '')} new tokens"
    return harness.write_report(rows, COLUMNS, title, out_dir, name)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_model_arguments(parser, name="generate", warmup=2, repeats=5)
    parser.add_argument("--cases", default="", help=f"comma-separated substrings of {', '.join(CASES)}")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--check-tokens", action="store_true", help="record token agreement on greedy/beam cases")
    return harness.finish_model_arguments(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows, failures = run(args)
    print(report(rows, args.out, args.name))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
