"""``blip-fast`` console entry: caption, capfilt, convert, demo, evaluate. ``main(argv)`` is callable from tests."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    resolved = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dtype == "auto":
        return resolved, torch.float16 if resolved.type == "cuda" else torch.float32
    return resolved, DTYPES[dtype]


def _add_caption_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, help="image files")
    parser.add_argument("--model", required=True, type=Path, help="HuggingFace-layout BLIP captioning directory")
    decoding = parser.add_mutually_exclusive_group()
    decoding.add_argument("--beams", type=int, default=3, help="beam search width (BLIP: 3)")
    decoding.add_argument("--sample", action="store_true", help="nucleus sampling instead of beam search")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus mass with --sample (BLIP: 0.9)")
    parser.add_argument("--prompt", default="a picture of ", help="text the caption continues; stripped from output")
    parser.add_argument("--max-length", type=int, default=20, help="tokens incl. [DEC] and prompt (BLIP: 20)")
    parser.add_argument("--min-length", type=int, default=5, help="tokens incl. [DEC] and prompt (BLIP: 5)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto")


def _caption(args: argparse.Namespace) -> int:
    from blip_fast.captioning import Captioner

    device, dtype = _device_and_dtype(args.device, args.dtype)
    captioner = Captioner.from_pretrained(args.model, device=device, dtype=dtype, prompt=args.prompt)
    decoding = dict(max_length=args.max_length, min_length=args.min_length)
    if args.sample:
        decoding.update(do_sample=True, top_p=args.top_p, repetition_penalty=1.1)
    else:
        decoding.update(num_beams=args.beams)
    failures = 0
    for path, caption, error in captioner.caption_files(args.images, args.batch_size, args.seed, **decoding):
        if error is None:
            print(f"{path}\t{caption}", flush=True)
        else:
            failures += 1
            print(f"error: {error}", file=sys.stderr, flush=True)
    if failures:
        print(f"{failures} of {len(args.images)} images could not be captioned", file=sys.stderr)
    return 1 if failures else 0


def _convert(args: argparse.Namespace) -> int:
    from blip_fast.checkpoint import convert_original
    from blip_fast.config import BlipConfig
    from blip_fast.data.transforms import BlipImageProcessor
    from blip_fast.tokenizer import BlipTokenizer

    tokenizer = None if args.tokenizer is None else BlipTokenizer.from_pretrained(args.tokenizer)
    config = None if args.config is None else BlipConfig.from_hf(args.config).replace(hf_compat=False)
    out_dir = convert_original(args.checkpoint, args.out_dir, task=args.task, config=config, tokenizer=tokenizer)
    image_size = BlipConfig.from_hf(out_dir).vision.image_size
    BlipImageProcessor(size=image_size).save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    else:
        print("note: no --tokenizer given; copy bert-base-uncased tokenizer files into the output to caption",
              file=sys.stderr)
    print(out_dir)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from blip_fast.demo import run_demo

    run_demo(args.out_dir, scale=args.scale)
    return 0


def _add_capfilt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--captioner", required=True, type=Path, help="HuggingFace-layout BLIP captioning directory")
    parser.add_argument("--filter", required=True, type=Path, help="HuggingFace-layout BLIP retrieval (ITM) directory")
    parser.add_argument("--input", required=True, help="folder or brace/glob pattern of .tar shards, or BLIP .json")
    parser.add_argument("--image-root", type=Path, help="folder the json's image paths are relative to")
    parser.add_argument("--output", required=True, type=Path, help="output folder (rerun the same command to resume)")
    parser.add_argument("--num-captions", type=int, default=1, help="synthetic captions per image (BLIP: 1)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (BLIP: 0.9)")
    parser.add_argument("--max-length", type=int, default=20, help="tokens incl. [DEC] and prompt (BLIP: 20)")
    parser.add_argument("--min-length", type=int, default=5, help="tokens incl. [DEC] and prompt (BLIP: 5)")
    parser.add_argument("--prompt", default="a picture of ", help="text the captions continue; stripped from output")
    parser.add_argument("--threshold", type=float, help="keep when p(match) > this (default: ITM argmax)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (part of the sampling stream)")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader processes decoding images")
    parser.add_argument("--images-per-part", type=int, default=1000, help="json input: images per work unit")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--device", default="auto", help="auto: cuda:LOCAL_RANK when CUDA is available")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _capfilt(args: argparse.Namespace) -> int:
    import os

    from blip_fast.capfilt import CapFiltOptions, run_capfilt

    device, dtype = _device_and_dtype(args.device, args.dtype)
    if device.type == "cuda" and device.index is None:
        local_rank = args.local_rank if args.local_rank is not None else int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank)
    options = CapFiltOptions(
        captioner=args.captioner, filter=args.filter, input=args.input, output=args.output,
        image_root=args.image_root, num_captions=args.num_captions, top_p=args.top_p, max_length=args.max_length,
        min_length=args.min_length, prompt=args.prompt, threshold=args.threshold, batch_size=args.batch_size,
        workers=args.workers, seed=args.seed, device=str(device), dtype=str(dtype).removeprefix("torch."),
        images_per_part=args.images_per_part, progress=not args.no_progress,
    )
    summary = run_capfilt(options)
    print(json.dumps({key: value for key, value in summary.items() if key != "config"}, sort_keys=True))
    return 0


def _add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=["retrieval", "caption"], required=True)
    parser.add_argument("--model", required=True, type=Path, help="HuggingFace-layout BLIP directory of that task")
    parser.add_argument("--annotations", required=True, type=Path, help='test json: [{"image", "caption"}, ...]')
    parser.add_argument("--image-root", required=True, type=Path, help="directory the json's image paths are under")
    parser.add_argument("--k-test", type=int, default=256, help="retrieval: ITC candidates reranked by ITM (BLIP: 256)")
    parser.add_argument("--batch-size", type=int, default=64, help="images (and retrieval texts) per forward")
    parser.add_argument("--itm-batch-size", type=int, default=128, help="retrieval: image-text pairs per ITM forward")
    parser.add_argument("--beams", type=int, default=3, help="caption: beam search width (BLIP: 3)")
    parser.add_argument("--max-length", type=int, default=20, help="caption: tokens incl. [DEC] and prompt (BLIP: 20)")
    parser.add_argument("--min-length", type=int, default=5, help="caption: tokens incl. [DEC] and prompt (BLIP: 5)")
    parser.add_argument("--prompt", default="a picture of ", help="caption: text the caption continues")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto")
    parser.add_argument("--out", type=Path, help="write the metrics (and captions) as JSON here")


def _evaluate(args: argparse.Namespace) -> int:
    from blip_fast import evaluate
    from blip_fast.data.transforms import ImageLoadError

    device, dtype = _device_and_dtype(args.device, args.dtype)
    inputs = dict(model_dir=args.model, annotations=args.annotations, image_root=args.image_root, device=device,
                  dtype=dtype)
    try:
        if args.task == "retrieval":
            report = evaluate.run_retrieval_evaluation(
                **inputs, k_test=args.k_test, batch_size=args.batch_size, itm_batch_size=args.itm_batch_size
            )
        else:
            report = evaluate.run_caption_evaluation(
                **inputs, batch_size=args.batch_size, prompt=args.prompt, num_beams=args.beams,
                max_length=args.max_length, min_length=args.min_length,
            )
    except (evaluate.EvaluationInputError, ImageLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(evaluate.format_table(report["metrics"]))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip-fast", description="Fast, faithful BLIP.")
    commands = parser.add_subparsers(dest="command", required=True)

    caption = commands.add_parser("caption", help="caption images, one line per image")
    _add_caption_arguments(caption)
    caption.set_defaults(run=_caption)

    convert = commands.add_parser("convert", help="original Salesforce BLIP .pth -> HuggingFace-layout directory")
    convert.add_argument("checkpoint", type=Path)
    convert.add_argument("out_dir", type=Path)
    convert.add_argument("--task", choices=["captioning", "retrieval", "vqa"], default="captioning")
    convert.add_argument("--tokenizer", type=Path, help="directory with bert-base-uncased tokenizer files to include")
    convert.add_argument(
        "--config", type=Path, help="config.json to use instead of inferring sizes (needed when heads are not 64-d)"
    )
    convert.set_defaults(run=_convert)

    demo = commands.add_parser(
        "demo", help="BLIP's bootstrapping loop on built-in synthetic noisy data: pre-train, CapFilt, pre-train again"
    )
    demo.add_argument("--out-dir", type=Path, default=Path("blip_fast_demo"), help="rerun the same command to resume")
    demo.add_argument("--scale", choices=["full", "small"], default="full",
                      help="full: about 10 minutes on a 2-core CPU; small: the CI-sized run")
    demo.set_defaults(run=_demo)

    capfilt = commands.add_parser("capfilt", help="caption and filter an image-text dataset (BLIP's CapFilt)")
    _add_capfilt_arguments(capfilt)
    capfilt.set_defaults(run=_capfilt)

    evaluate = commands.add_parser("evaluate", help="retrieval recall@K or caption BLEU-4/CIDEr on a test json")
    _add_evaluate_arguments(evaluate)
    evaluate.set_defaults(run=_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
