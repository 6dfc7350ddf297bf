"""``blip-fast`` console entry: caption, convert, demo. ``main(argv)`` is callable from tests."""

from __future__ import annotations

import argparse
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

    device, dtype = _device_and_dtype(args.device, "auto")
    run_demo(args.out_dir, num_images=args.images, device=device, dtype=dtype)
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

    demo = commands.add_parser("demo", help="end-to-end smoke run on built-in synthetic images")
    demo.add_argument("--out-dir", type=Path, default=Path("blip_fast_demo"))
    demo.add_argument("--images", type=int, default=8)
    demo.add_argument("--device", default="auto")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
