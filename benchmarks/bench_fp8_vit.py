"""FP8 ViT (``BLIP_FAST_VIT_FP8``, :mod:`blip_fast.modeling.fp8`): its accuracy effect, and on a GPU its speed.

Accuracy: the ViT's states in each precision against fp32 (TF32 off) on the same random weights and images: max
and mean absolute error, relative Frobenius error, one minus the lowest cosine similarity of a class token. ``fp8`` runs the
encoder's Linear layers in FP8 (``torch._scaled_mm``, compute capability 8.9+) with activations in ``--dtype``;
``fp8_emulated`` rounds through float8 e4m3 the same way and multiplies in fp32, on any device (the CPU rows);
``bf16``/``fp16`` are the whole ViT in that dtype, for scale. Then the tasks on tiny random models, fp32 against
FP8: ITC retrieval top-1 agreement (image->text and text->image, 32 x 32), ITM decision agreement, and greedy
captions identical token for token. Random weights lack the activation outliers of trained ViTs, which per-tensor
FP8 scaling handles worst: on a trained checkpoint expect larger errors (measure with ``--model DIR``).

Speed (CUDA only): ViT forward img/s through the inference path (compiled), ``--dtype`` against FP8.

    python -m benchmarks.bench_fp8_vit --device cpu --out benchmarks/results/fp8-vit-cpu       # emulation
    python -m benchmarks.bench_fp8_vit --device cuda --dtype fp16 --out OUT                     # H100: FP8 GEMMs
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import harness

COLUMNS = ["case", "config", "precision", "image_size", "batch", "max_abs_err", "mean_abs_err", "rel_err",
           "cls_cosine_gap", "agreement", "img_per_s", "speedup", "median_ms", "first_call_ms", "error"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _with_fp8(model: torch.nn.Module, vision: torch.nn.Module | None = None, emulate: bool = False):
    """A copy of ``model`` whose ViT (``vision``'s counterpart, or the model itself) runs its GEMMs in FP8."""
    from blip_fast.modeling.fp8 import enable_vit_fp8

    copied = copy.deepcopy(model)
    enable_vit_fp8(copied.vision_model if vision is not None else copied, emulate=emulate)
    return copied


def _errors(states: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    difference = (states.float() - reference).abs()
    cosine = torch.nn.functional.cosine_similarity(states[:, 0].float(), reference[:, 0], dim=-1)
    return {"max_abs_err": difference.max().item(), "mean_abs_err": difference.mean().item(),
            "rel_err": (difference.norm() / reference.norm()).item(), "cls_cosine_gap": 1 - cosine.min().item()}


def state_rows(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """The ViT's states per precision against fp32, one row each, at every ``--image-sizes``."""
    return [row for size in args.image_sizes.split(",") for row in _state_rows(args, int(size), device, dtype)]


def _state_rows(args: argparse.Namespace, image_size: int, device: torch.device,
                dtype: torch.dtype) -> list[dict[str, Any]]:
    from blip_fast.config import BlipConfig
    from blip_fast.modeling.vit import BlipVisionModel

    torch.manual_seed(0)
    config = BlipConfig.from_name(args.config, image_size=image_size).vision
    model = BlipVisionModel(config).to(device).eval()
    if args.model:
        from blip_fast.modeling.blip import BlipForImageTextRetrieval

        model = BlipForImageTextRetrieval.from_pretrained(args.model, device=str(device)).vision_model.eval()
        config = model.config
    pixels = harness.random_pixels(args.batch, config.image_size, str(device), torch.float32)
    common = {"case": "vit_states", "config": args.model or args.config, "image_size": config.image_size,
              "batch": args.batch, **harness.environment(device)}
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        reference = model(pixels).last_hidden_state.float()
        precisions: dict[str, Any] = {"bf16": (model, torch.bfloat16)}
        if device.type == "cuda":
            precisions = {"fp16": (model, torch.float16), **precisions,
                          "fp8": (_with_fp8(model.to(dtype)), dtype)}
        precisions["fp8_emulated"] = (_with_fp8(model.float(), emulate=True), torch.float32)
        rows = []
        for name, (variant, variant_dtype) in precisions.items():
            row = {**common, "precision": name if name.startswith("fp8") else f"{name} (whole ViT)"}
            try:
                states = copy.deepcopy(variant).to(variant_dtype)(pixels.to(variant_dtype)).last_hidden_state
                row.update(_errors(states, reference))
            except Exception as error:  # e.g. FP8 refused on this GPU: report it, keep the other rows
                row["error"] = f"{type(error).__name__}: {error}"
            rows.append(row)
    return rows


def task_rows(device: torch.device) -> list[dict[str, Any]]:
    """fp32 against FP8 (emulated on a CPU) on tiny random models: retrieval, matching, greedy captions."""
    from blip_fast.config import BlipConfig
    from blip_fast.modeling.blip import BlipForConditionalGeneration, BlipForImageTextRetrieval

    emulate = device.type != "cuda"
    precision = "fp8_emulated" if emulate else "fp8"
    config = BlipConfig.tiny()
    images, vocab = 32, config.text.vocab_size
    pixels = harness.random_pixels(images, config.vision.image_size, str(device), torch.float32)
    generator = torch.Generator().manual_seed(3)
    text_ids = torch.randint(5, vocab - 2, (images, 12), generator=generator).to(device)
    text_ids[:, 0], text_ids[:, -1] = min(101, vocab - 3), config.text.sep_token_id  # BERT's [CLS] first
    common = {"config": "tiny", "precision": precision, "image_size": config.vision.image_size, "batch": images,
              **harness.environment(device)}
    torch.manual_seed(0)
    retrieval = BlipForImageTextRetrieval(config).to(device).eval()
    fp8_retrieval = _with_fp8(retrieval, retrieval.vision_model, emulate)
    torch.manual_seed(1)
    captioner = BlipForConditionalGeneration(config).to(device).eval()
    fp8_captioner = _with_fp8(captioner, captioner.vision_model, emulate)
    with torch.no_grad():
        results = {}
        for name, model in (("fp32", retrieval), ("fp8", fp8_retrieval)):
            image_embeds = model.vision_model(pixels).last_hidden_state
            text_embeds = model.text_encoder(text_ids, None).last_hidden_state
            similarity = model.image_features(image_embeds) @ model.text_features(text_embeds).t()
            results[name] = (similarity, model.itm_logits(image_embeds, text_ids, None).argmax(-1))
        (sim, itm), (sim8, itm8) = results["fp32"], results["fp8"]
        captions = [model.generate(pixels, max_new_tokens=12, min_new_tokens=12)
                    for model in (captioner, fp8_captioner)]
    agree = lambda a, b: (a == b).float().mean().item()
    return [
        {**common, "case": "itc_top1_i2t", "agreement": agree(sim.argmax(1), sim8.argmax(1)),
         "max_abs_err": (sim - sim8).abs().max().item()},
        {**common, "case": "itc_top1_t2i", "agreement": agree(sim.argmax(0), sim8.argmax(0))},
        {**common, "case": "itm_decision", "agreement": agree(itm, itm8)},
        {**common, "case": "caption_identical",
         "agreement": (captions[0] == captions[1]).all(1).float().mean().item()},
        {**common, "case": "caption_tokens", "agreement": agree(captions[0], captions[1])},
    ]


def speed_rows(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """img/s of the inference ViT (``vision_states``: compiled on CUDA) in ``dtype`` and with FP8 GEMMs."""
    from blip_fast.config import BlipConfig
    from blip_fast.modeling.vit import BlipVisionModel, vision_states

    config = BlipConfig.from_name(args.config, image_size=args.speed_image_size).vision
    torch.manual_seed(0)
    model = BlipVisionModel(config).to(device, dtype).eval()
    models = {"dtype": model, "fp8": _with_fp8(model)}
    pixels = harness.random_pixels(args.speed_batch, config.image_size, str(device), dtype)
    row = {"case": "vit_forward", "config": args.config, "image_size": config.image_size, "batch": args.speed_batch,
           **harness.environment(device)}

    def make_call(vision_model):
        def call():
            with torch.no_grad():
                return vision_states(vision_model, pixels)
        return call

    rows, _, _ = harness.time_engines(models, make_call, device, row, args.warmup, args.repeats)
    rows["dtype"]["precision"], rows["fp8"]["precision"] = str(dtype).removeprefix("torch."), "fp8"
    if "img_per_s" in rows["fp8"] and "img_per_s" in rows["dtype"]:
        rows["fp8"]["speedup"] = rows["fp8"]["img_per_s"] / rows["dtype"]["img_per_s"]
    return list(rows.values())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16", help="activations on a GPU")
    parser.add_argument("--config", default="base", help="ViT preset for the state errors and the speed")
    parser.add_argument("--model", default=None, help="a BLIP model directory: its trained ViT instead of random")
    parser.add_argument("--image-sizes", default="224,384", help="comma-separated, for the state errors")
    parser.add_argument("--batch", type=int, default=1, help="images for the state errors")
    parser.add_argument("--speed-batch", type=int, default=256)
    parser.add_argument("--speed-image-size", type=int, default=384)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sections", default="states,tasks,speed", help="comma-separated subset")
    parser.add_argument("--name", default="fp8_vit")
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or harness.default_device())
    dtype = DTYPES[args.dtype]
    report = harness.Report(args.out, args.name, COLUMNS, lambda first: (
        f"{args.name}: FP8 ViT GEMMs (per-tensor e4m3) against fp32, random weights"))
    sections = set(args.sections.split(","))
    failures = 0
    for section, rows in (("states", lambda: state_rows(args, device, dtype)), ("tasks", lambda: task_rows(device)),
                          ("speed", lambda: speed_rows(args, device, dtype))):
        if section not in sections or (section == "speed" and device.type != "cuda"):
            continue
        produced = rows()
        failures += sum("error" in row for row in produced)
        report.add(*produced)
    print(report.text())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
