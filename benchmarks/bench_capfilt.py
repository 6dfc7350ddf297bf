"""CapFilt throughput (captioner + filter, images/s): a HuggingFace-transformers pipeline vs blip_fast, same weights.

One random captioner and one random filter are saved as HuggingFace-layout directories; ``transformers`` loads
them with ``from_pretrained`` (the HF engine), blip_fast with :class:`blip_fast.capfilt.CapFiltModels` (the exact
code ``blip-fast capfilt`` runs). Per batch of preprocessed images each engine

1. samples ``K`` captions per image (nucleus top_p 0.9, repetition penalty 1.1, prompt "a picture of "),
2. decodes and cleans them (``pre_caption``) and tokenises the web caption and the K synthetic ones,
3. scores all ``1 + K`` pairs per image with the ITM head.

HF's ITM runs as its documented API does, ``BlipForImageTextRetrieval(input_ids, pixel_values)``: one ViT pass per
pair; blip_fast runs the ViT once per image. Both decode exactly ``--max-length`` tokens (``min_length`` =
``max_length``) so random weights that stop early do not shorten the work; both use blip_fast's tokenizer (the
same host cost). Image decoding and resizing (DataLoader workers in the real run) are not timed. The vocabulary is
trained on the synthetic captions (a few hundred tokens), so the LM head is smaller than BERT's 30,524: the row
records ``vocab_size``.

    python -m benchmarks.bench_capfilt --config base --dtype fp16 --out benchmarks/results/h100
    python -m benchmarks.bench_capfilt --config tiny --device cpu --batch-scale 0.1   # CPU smoke run (DRY)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import harness

ENGINES = ("hf", "ours")
PROMPT = "a picture of "


@dataclass(frozen=True)
class Case:
    batch: int
    num_captions: int


CASES: dict[str, Case] = {"k1_bs64": Case(64, 1), "k3_bs64": Case(64, 3), "k5_bs32": Case(32, 5)}


def save_models(config_name: str, out_dir: Path, image_size: int | None = None) -> tuple[Path, Path]:
    """A random captioner and filter (tokenizer + processor in each) saved as HF-layout dirs under ``out_dir``."""
    from blip_fast.config import BlipConfig
    from blip_fast.data.synthetic import SyntheticNoisyDataset
    from blip_fast.data.transforms import BlipImageProcessor
    from blip_fast.modeling.blip import BlipForConditionalGeneration, BlipForImageTextRetrieval
    from blip_fast.tokenizer import BlipTokenizer

    texts = SyntheticNoisyDataset(200, seed=0).captions() + SyntheticNoisyDataset.vocabulary() + [PROMPT]
    tokenizer = BlipTokenizer.train(texts, vocab_size=400)
    overrides = {"image_size": image_size} if image_size else {}
    config = BlipConfig.from_name(config_name, **overrides).for_tokenizer(tokenizer)
    dirs = []
    for name, model_cls in (("captioner", BlipForConditionalGeneration), ("filter", BlipForImageTextRetrieval)):
        torch.manual_seed(0)
        directory = out_dir / name
        model_cls(config).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        BlipImageProcessor(size=config.vision.image_size).save_pretrained(directory)
        dirs.append(directory)
    return dirs[0], dirs[1]


class HfPipeline:
    """CapFilt as a transformers user writes it: ``generate`` with sampling, then ITM ``forward`` per pair."""

    def __init__(self, captioner_dir: Path, filter_dir: Path, device: str, dtype: torch.dtype) -> None:
        import transformers

        from blip_fast.tokenizer import BlipTokenizer

        self.captioner = transformers.BlipForConditionalGeneration.from_pretrained(captioner_dir, dtype=dtype)
        self.filter = transformers.BlipForImageTextRetrieval.from_pretrained(filter_dir, dtype=dtype)
        self.captioner, self.filter = self.captioner.to(device).eval(), self.filter.to(device).eval()
        self.tokenizer = BlipTokenizer.from_pretrained(captioner_dir)
        self.prompt_ids = self.tokenizer([PROMPT], return_tensors="pt").input_ids.to(device)

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor, web: Sequence[str], num_captions: int, length: int) -> Any:
        from blip_fast.capfilt import ITM_MAX_TOKENS, REPETITION_PENALTY
        from blip_fast.tokenizer import pre_caption

        prompt = self.prompt_ids.expand(pixel_values.shape[0], -1).clone()  # HF generate writes into its input
        ids = self.captioner.generate(
            pixel_values=pixel_values, input_ids=prompt, do_sample=True, top_p=0.9, repetition_penalty=REPETITION_PENALTY,
            num_return_sequences=num_captions, max_length=length, min_length=length,
        )
        captions = self.tokenizer.batch_decode(ids[:, prompt.shape[1] - 1 :], skip_special_tokens=True)
        synthetic = [pre_caption(text) for text in captions]
        texts = [text for row, caption in enumerate(web)
                 for text in [caption, *synthetic[row * num_captions : (row + 1) * num_captions]]]
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=ITM_MAX_TOKENS, return_tensors="pt").to(pixel_values.device)
        pair_pixels = pixel_values.repeat_interleave(1 + num_captions, dim=0)
        logits = self.filter(input_ids=tokens.input_ids, pixel_values=pair_pixels,
                             attention_mask=tokens.attention_mask, use_itm_head=True).itm_score
        return logits.float().softmax(-1)[:, 1]


class OursPipeline:
    """The same steps through :class:`blip_fast.capfilt.CapFiltModels` (ViT once per image in the filter)."""

    def __init__(self, captioner_dir: Path, filter_dir: Path, device: str, dtype: torch.dtype) -> None:
        from blip_fast.capfilt import CapFiltModels, CapFiltOptions

        self.options = CapFiltOptions(captioner=captioner_dir, filter=filter_dir, input="-", output="-", prompt=PROMPT,
                                      device=device, dtype=str(dtype).removeprefix("torch."))
        self.models = CapFiltModels.from_options(self.options)

    def __call__(self, pixel_values: torch.Tensor, web: Sequence[str], num_captions: int, length: int) -> Any:
        self.models.options = dataclasses.replace(self.options, num_captions=num_captions, max_length=length,
                                                  min_length=length)
        synthetic = self.models.synthetic_captions(pixel_values, generator=None)
        logits = self.models.match_logits(pixel_values, [[caption, *texts] for caption, texts in zip(web, synthetic)])
        return torch.cat(logits).softmax(-1)[:, 1]


def build_engines(config_name: str, out_dir: Path, device: str, dtype: torch.dtype, image_size: int | None = None,
                  engines: Sequence[str] = ENGINES) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(image size, {engine: pipeline}, {engine: error}) over the same saved weights."""
    captioner_dir, filter_dir = save_models(config_name, out_dir, image_size)
    from blip_fast.config import BlipConfig

    classes = {"hf": HfPipeline, "ours": OursPipeline}
    pipelines, errors = {}, {}
    for engine in engines:
        try:
            pipelines[engine] = classes[engine](captioner_dir, filter_dir, device, dtype)
        except Exception as error:  # recorded in the results; the other engine still runs
            errors[engine] = f"{type(error).__name__}: {error}"
    return BlipConfig.from_hf(captioner_dir).vision.image_size, pipelines, errors


def make_pipeline_call(pipeline: Any, pixel_values: torch.Tensor, case: Case, length: int) -> Callable[[], Any]:
    web = ["a picture of two red circles on the left of a striped blue background"] * pixel_values.shape[0]

    def call() -> Any:
        torch.manual_seed(0)
        return pipeline(pixel_values, web, case.num_captions, length)

    return call


def run(args: argparse.Namespace, report: harness.Report) -> int:
    """Measure every selected case, adding its rows to ``report`` as each finishes; returns the failure count."""
    device, dtype = harness.device_and_dtype(args)
    engines = tuple(name for name in args.engines.split(",") if name)
    env = harness.environment(device)
    with tempfile.TemporaryDirectory() as out_dir:
        image_size, pipelines, errors = build_engines(args.config, Path(out_dir), device, dtype, args.image_size,
                                                      engines)
    vocab_size = len(pipelines["hf"].tokenizer) if "hf" in pipelines else None
    common = {"bench": "capfilt", "config": args.config, "dtype": str(dtype).replace("torch.", ""),
              "image_size": image_size, "max_length": args.max_length, "vocab_size": vocab_size, **env}
    report.add(*harness.build_error_rows(errors, common))
    failures = len(errors)
    for case_name, case, batch, pixel_values in harness.model_cases(CASES, args, image_size, device, dtype):
        row = {**common, "case": case_name, "batch": batch, "num_captions": case.num_captions}
        case_rows, _, failed = harness.time_engines(
            pipelines, functools.partial(make_pipeline_call, pixel_values=pixel_values, case=case,
                                         length=args.max_length),
            device, row, args.warmup, args.repeats,
        )
        failures += failed
        report.add(*case_rows.values())
    return failures


COLUMNS = [*harness.TIMING_COLUMNS, "num_captions", "error"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_model_arguments(parser, name="capfilt", warmup=1, repeats=5)
    parser.add_argument("--cases", default="", help=f"comma-separated substrings of {', '.join(CASES)}")
    parser.add_argument("--max-length", type=int, default=20, help="caption tokens incl. [DEC] and prompt (BLIP: 20)")
    return harness.finish_model_arguments(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = harness.Report(args.out, args.name, COLUMNS, lambda first: f"{args.name}: {first['config']} "
                            f"{first['dtype']}, captions of {args.max_length} tokens")
    failures = run(args, report)
    print(report.text())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
