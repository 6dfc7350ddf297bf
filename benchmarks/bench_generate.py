"""Caption generation throughput: HuggingFace ``BlipForConditionalGeneration.generate`` vs blip_fast, same weights.

Both engines decode exactly ``--new-tokens`` tokens (``min_new_tokens == max_new_tokens``), so random weights that
emit ``[SEP]`` early do not shorten the work. The HuggingFace model is built from the blip_fast preset's
``to_hf()`` config with random weights; blip_fast's model is made from it with ``from_hf_model`` (identical
state-dict keys). Reports img/s, median and 20/80-quantile latency, first-call time (compilation, CUDA-graph
capture) and peak memory (``torch.cuda.max_memory_allocated`` on CUDA) per engine, and blip_fast's speed-up over
HuggingFace. With the greedy_bs256 case it adds the decode-step rows: time per decoded token after the prompt,
``(T(new_tokens) - T(2)) / (new_tokens - 2)`` (the ViT and prefill cancel), for HuggingFace and for blip_fast with
CUDA graphs on and off, against the floor of reading each image's cross-attention K/V once per step at the
bandwidth of a large device-to-device copy measured in the same run.

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
from blip_fast import generation

ENGINES = ("hf", "ours")
#: The case whose per-step decode time is compared with the K/V-read floor and with CUDA graphs on/off.
DECODE_STEP_CASE = "greedy_bs256"
#: Tokens of the short run whose time is subtracted to leave only decode steps.
SHORT_NEW_TOKENS = 2


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


def make_generate(
    model: Any, pixel_values: torch.Tensor, case: Case, new_tokens: int, **engine_kwargs: Any
) -> Callable[[], Any]:
    """``engine_kwargs`` go to this engine only (blip_fast's ``cuda_graphs``)."""

    def generate() -> torch.Tensor:
        torch.manual_seed(0)  # same sampling stream every call and in both engines
        with torch.no_grad():
            return model.generate(
                pixel_values=pixel_values, min_new_tokens=new_tokens, max_new_tokens=new_tokens,
                **case.generate_kwargs, **engine_kwargs,
            )

    return generate


def token_agreement(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Fraction of rows whose token ids are identical (0.0 when the shapes differ)."""
    if reference.shape != candidate.shape:
        return 0.0
    return (reference == candidate).all(dim=1).float().mean().item()


def copy_bandwidth_gbps(device: str, megabytes: int, warmup: int, repeats: int) -> float:
    """Achievable memory bandwidth: bytes read + written per second by one large device-to-device copy."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device).random_()
    target = torch.empty_like(source)
    timing = harness.measure(lambda: target.copy_(source), device, warmup=warmup, repeats=repeats)
    return 2 * source.numel() / (timing.median_ms / 1e3) / 1e9


def cross_kv_bytes_per_step(config: Any, images: int, dtype: torch.dtype) -> int:
    """Bytes of cached cross-attention K/V one decode step must read: every layer's K and V, once per image."""
    per_image = config.text.num_hidden_layers * 2 * config.vision.num_positions * config.text.hidden_size
    return images * per_image * torch.empty((), dtype=dtype).element_size()


def decode_step_rows(
    models: dict[str, Any], pixel_values: torch.Tensor, config: Any, device: str, row: dict[str, Any],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Per-step decode time of greedy decoding vs the K/V-read floor: HF, and ours with CUDA graphs on and off.

    The graphs-on row carries ``graphs_speedup`` (its img/s over the graphs-off row's) and both carry peak memory.
    """
    case, batch = CASES[DECODE_STEP_CASE], row["batch"]
    floor_ms = cross_kv_bytes_per_step(config, batch, pixel_values.dtype) / (row["copy_gbps"] * 1e9) * 1e3
    variants = [("hf", {})] if "hf" in models else []
    variants += [("ours", {"cuda_graphs": True}), ("ours", {"cuda_graphs": False})] if "ours" in models else []
    rows = []
    for engine, engine_kwargs in variants:
        model = models[engine]
        result = {**row, "case": f"{DECODE_STEP_CASE}_step", "engine": engine, **engine_kwargs, "kv_floor_ms": floor_ms}
        medians = {}
        for new_tokens in (SHORT_NEW_TOKENS, args.new_tokens):
            call = make_generate(model, pixel_values, case, new_tokens, **engine_kwargs)
            with harness.peak_memory(device) as memory:
                medians[new_tokens] = harness.measure(call, device, args.warmup, args.repeats).median_ms
        step_ms = (medians[args.new_tokens] - medians[SHORT_NEW_TOKENS]) / (args.new_tokens - SHORT_NEW_TOKENS)
        result.update(median_ms=medians[args.new_tokens], img_per_s=batch / (medians[args.new_tokens] / 1e3),
                      step_ms=step_ms, step_vs_floor=step_ms / floor_ms, **memory.as_dict())
        rows.append(result)
        generation.clear_static_calls()
    graphs = {result.get("cuda_graphs"): result for result in rows if result["engine"] == "ours"}
    if {True, False} <= graphs.keys():
        graphs[True]["graphs_speedup"] = graphs[True]["img_per_s"] / graphs[False]["img_per_s"]
    return rows


def run(args: argparse.Namespace, report: harness.Report) -> int:
    """Measure every selected case, adding its rows to ``report`` as each finishes; returns the failure count."""
    device, dtype = harness.device_and_dtype(args)
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
    report.add(*harness.build_error_rows(errors, common))
    failures = len(errors)
    for case_name, case, batch, pixel_values in harness.model_cases(CASES, args, image_size, device, dtype):
        row = {**common, "case": case_name, "batch": batch, **case.generate_kwargs}
        case_rows, outputs, failed = harness.time_engines(
            models, functools.partial(make_generate, pixel_values=pixel_values, case=case, new_tokens=args.new_tokens),
            device, row, args.warmup, args.repeats,
        )
        failures += failed
        if args.check_tokens and case.deterministic and {"ours", "hf"} <= outputs.keys():
            case_rows["ours"]["tokens_match"] = token_agreement(outputs["hf"], outputs["ours"])
        report.add(*case_rows.values())
        del outputs  # free the generated ids before the next case allocates
        generation.clear_static_calls()  # each case's peak memory holds only its own static buffers
        if case_name == DECODE_STEP_CASE and args.new_tokens > SHORT_NEW_TOKENS:
            bandwidth = copy_bandwidth_gbps(device, args.copy_mb, args.warmup, args.repeats)
            try:
                report.add(*decode_step_rows(models, pixel_values, config, device, {**row, "copy_gbps": bandwidth},
                                             args))
            except Exception as error:  # recorded like an engine failure; the other rows stand
                print(f"[decode step] {type(error).__name__}: {error}", file=sys.stderr)
                report.add({**row, "case": f"{DECODE_STEP_CASE}_step", "error": f"{type(error).__name__}: {error}"})
                failures += 1
    return failures


COLUMNS = [
    *harness.TIMING_COLUMNS, "tokens_match", "cuda_graphs", "graphs_speedup", "step_ms", "kv_floor_ms",
    "step_vs_floor", "copy_gbps", "error",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_model_arguments(parser, name="generate", warmup=2, repeats=5)
    parser.add_argument("--cases", default="", help=f"comma-separated substrings of {', '.join(CASES)}")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--check-tokens", action="store_true", help="record token agreement on greedy/beam cases")
    parser.add_argument("--copy-mb", type=int, default=None,
                        help="size of the bandwidth-probe copy (default: 1024 on CUDA, 64 on CPU)")
    return harness.finish_model_arguments(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.copy_mb is None:
        args.copy_mb = 1024 if (args.device or harness.default_device()).startswith("cuda") else 64
    report = harness.Report(args.out, args.name, COLUMNS, lambda first: (
        f"{args.name}: {first['config']} {first['dtype']}, {first.get('new_tokens', '')} new tokens"))
    failures = run(args, report)
    print(report.text())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
