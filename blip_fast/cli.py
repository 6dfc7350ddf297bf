"""``blip-fast`` console entry: caption, capfilt, convert, demo, evaluate. ``main(argv)`` is callable from tests.

Every argument is checked when it is parsed (ranges, paths, devices); mistakes found later (a model of the wrong
kind, an output folder that would overwrite data) are :class:`~blip_fast.errors.UserError`s. Both end as one line
``blip-fast: error: ...`` with exit status 2 (``--debug`` or ``BLIP_FAST_DEBUG=1`` adds the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from blip_fast import errors
from blip_fast.data.workers import default_workers
from blip_fast.launch import sigterm_raises

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROG = "blip-fast"
EVALUATION_TASKS = ("retrieval", "caption", "vqa", "nlvr")


def _device_and_dtype(device: str, dtype: str, local_rank: int | None = None) -> tuple[torch.device, torch.dtype]:
    resolved = errors.resolve_device(device, local_rank)
    if dtype == "auto":
        return resolved, torch.float16 if resolved.type == "cuda" else torch.float32
    return resolved, DTYPES[dtype]


def _add_decoding_lengths(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    parser.add_argument("--max-length", type=errors.positive_int, default=20,
                        help=f"{prefix}tokens incl. [DEC] and prompt (BLIP: 20)")
    parser.add_argument("--min-length", type=errors.non_negative_int, default=5,
                        help=f"{prefix}tokens incl. [DEC] and prompt (BLIP: 5)")


def _add_device_arguments(parser: argparse.ArgumentParser, device_help: str = "auto: cuda when available") -> None:
    parser.add_argument("--device", type=errors.device_spec, default="auto", help=device_help)
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: fp16 on cuda, else fp32")


def _add_caption_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="INPUT",
                        help="image files, folders (searched recursively), glob patterns, .txt lists of paths")
    parser.add_argument("--model", required=True, type=errors.model_dir,
                        help="BLIP captioning model: HuggingFace-layout directory or hub id")
    parser.add_argument("--output", type=errors.output_file,
                        help="captions.jsonl, .csv or .parquet, one record per image; rerun to resume "
                             "(default: path<TAB>caption lines on stdout)")
    parser.add_argument("--errors", type=errors.output_file,
                        help="where unusable images go with the reason, with --output only (default: OUTPUT's name + "
                             ".errors.jsonl; without --output: stderr)")
    parser.add_argument("--score", action="store_true",
                        help="add each caption's mean log-probability per generated token")
    decoding = parser.add_mutually_exclusive_group()
    decoding.add_argument("--beams", type=errors.positive_int, default=3, help="beam search width (BLIP: 3)")
    decoding.add_argument("--sample", action="store_true", help="nucleus sampling instead of beam search")
    parser.add_argument("--top-p", type=errors.float_in(0, 1, low_open=True), default=argparse.SUPPRESS,
                        help="nucleus mass, with --sample only (default: 0.9, BLIP's)")
    parser.add_argument("--prompt", default="a picture of ", help="text the caption continues; stripped from output")
    _add_decoding_lengths(parser)
    parser.add_argument("--batch-size", type=errors.positive_int, default=None,
                        help="images per forward (default: 128 on a GPU, 8 on a CPU)")
    parser.add_argument("--workers", type=errors.non_negative_int, default=default_workers(),
                        help="processes decoding images ahead of the model")
    parser.add_argument("--seed", type=int, default=argparse.SUPPRESS,
                        help="sampling seed, with --sample only (default: 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_device_arguments(parser)


def _caption(args: argparse.Namespace) -> int:
    from blip_fast.caption_files import CaptionJob, caption_files, default_batch_size, errors_file
    from blip_fast.captioning import Captioner

    sampling = [flag for flag, name in (("--top-p", "top_p"), ("--seed", "seed")) if hasattr(args, name)]
    if sampling and not args.sample:  # beam search draws nothing: the option would be silently ignored
        raise errors.UserError(f"argument{'s' * (len(sampling) > 1)} {' and '.join(sampling)}: only with --sample "
                               "(beam search draws no samples)")
    device, dtype = _device_and_dtype(args.device, args.dtype)
    job = CaptionJob(
        inputs=tuple(args.images), output=args.output, errors=args.errors, score=args.score,
        seed=getattr(args, "seed", 0), batch_size=args.batch_size or default_batch_size(device),
        workers=args.workers, progress=not args.no_progress and args.output is not None,
    )
    decoding = dict(max_length=args.max_length, min_length=args.min_length)
    if args.sample:
        decoding.update(do_sample=True, top_p=getattr(args, "top_p", 0.9), repetition_penalty=1.1)
    else:
        decoding.update(num_beams=args.beams)

    def load_captioner(folder: str) -> Captioner:
        captioner = Captioner.from_pretrained(folder, device=device, dtype=dtype, prompt=args.prompt)
        captioner.check_lengths(max_length=args.max_length, min_length=args.min_length)
        return captioner

    counts = caption_files(job, args.model, load_captioner, args.prompt, **decoding)
    unusable = counts["failed"] + counts["failed_earlier"]
    if unusable:  # like an image that failed, one named by mistake (a typo) fails the run: scripts must see it
        where = "" if args.output is None else f" (see {errors_file(args.output, args.errors)})"
        earlier = f", {counts['failed_earlier']} of them in earlier runs" if counts["failed_earlier"] else ""
        print(f"{unusable} of {counts['images']} images could not be captioned{earlier}{where}", file=sys.stderr)
    if args.output is not None:
        print(json.dumps({"output": str(args.output), **counts}), file=sys.stderr)
    return errors.EXIT_FAILED if unusable else 0


def _add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    from blip_fast.checkpoint import TASKS

    parser.add_argument("checkpoint", type=errors.existing_file, help="original Salesforce BLIP .pth")
    parser.add_argument("out_dir", type=errors.output_dir, help="new (or empty) output folder")
    parser.add_argument("--task", choices=["auto", *TASKS], default="auto",
                        help="the model to write; auto: the checkpoint's own task, detected from its keys")
    parser.add_argument("--tokenizer", type=errors.existing_dir,
                        help="directory with bert-base-uncased tokenizer files to include")
    parser.add_argument("--config", type=Path,
                        help="the model's sizes and heads: an HF config.json (or its directory), or the original "
                             "med_config.json (text; the ViT's heads then come from --heads or its width)")
    parser.add_argument("--heads", type=errors.positive_int, nargs="+", metavar="N",
                        help="attention heads (one value for both, or vision then text) when they cannot be told "
                             "from the weights: only BLIP's 768/1024 widths can")


def _convert_sizes(config_path: Path | None, heads: list[int] | None):
    """``--config`` and ``--heads`` as (BlipConfig or None, (vision heads, text heads)): an HF config.json (or its
    folder) fixes everything; the original med_config.json (a BERT config) gives the text's heads."""
    from blip_fast.config import BlipConfig

    if heads is not None and len(heads) > 2:
        raise errors.UserError(f"--heads takes one value (both models) or two (vision, text), got {len(heads)}")
    vision_heads, text_heads = (None, None) if heads is None else (heads[0], heads[-1])
    if config_path is None:
        return None, (vision_heads, text_heads)
    if not config_path.exists():
        raise errors.MissingFileError(f"--config {config_path}: no such file or folder")
    if config_path.is_file():
        try:
            values = json.loads(config_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise errors.InvalidInputError(f"--config {config_path} is not valid JSON: {error}") from None
        if not isinstance(values, dict):
            raise errors.InvalidInputError(f"--config {config_path} holds a JSON {type(values).__name__}, not an "
                                           "object: give an HF config.json (or its folder) or the original "
                                           "med_config.json")
        if values.get("model_type") == "bert":  # the original med_config.json
            text_heads = _med_config_heads(config_path, values)
            if heads is not None and len(heads) == 2 and heads[1] != text_heads:
                raise errors.UserError(f"--heads gives the text {heads[1]} heads, {config_path} {text_heads}")
            return None, (vision_heads, text_heads)
    if heads is not None:
        raise errors.UserError("--heads and an HF config.json exclude each other: the config holds the heads")
    return BlipConfig.from_hf(config_path).replace(hf_compat=False), (None, None)


def _med_config_heads(config_path: Path, values: dict[str, Any]) -> int:
    """The text model's attention heads in the original med_config.json: a positive integer dividing its
    hidden_size (when it gives one)."""
    if "num_attention_heads" not in values:
        raise errors.InvalidInputError(f"--config {config_path} has no num_attention_heads (the text model's "
                                       "attention heads)")
    text_heads, width = values["num_attention_heads"], values.get("hidden_size")
    if not errors.is_kind(text_heads, int) or text_heads < 1:
        raise errors.InvalidInputError(f"--config {config_path}: num_attention_heads must be a positive integer, got "
                                       f"{json.dumps(text_heads)}")
    if errors.is_kind(width, int) and width % text_heads:
        raise errors.InvalidInputError(f"--config {config_path}: num_attention_heads {text_heads} does not divide "
                                       f"hidden_size {width}")
    return text_heads


def _convert(args: argparse.Namespace) -> int:
    from blip_fast.checkpoint import convert_original
    from blip_fast.config import BlipConfig
    from blip_fast.data.transforms import BlipImageProcessor
    from blip_fast.tokenizer import BlipTokenizer

    tokenizer = None if args.tokenizer is None else BlipTokenizer.from_pretrained(args.tokenizer)
    config, heads = _convert_sizes(args.config, args.heads)
    out_dir, task = convert_original(args.checkpoint, args.out_dir, task=args.task, config=config,
                                     tokenizer=tokenizer, heads=heads)
    image_size = BlipConfig.from_hf(out_dir).vision.image_size
    BlipImageProcessor(size=image_size).save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    else:
        print("note: no --tokenizer given; copy bert-base-uncased tokenizer files into the output to caption",
              file=sys.stderr)
    print(f"{task} model written to {out_dir}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from blip_fast.demo import run_demo

    downstream = [task for task in args.tasks if task != "bootstrap"]
    if downstream and args.scale == "tiny":
        raise errors.UserError("--scale tiny is for the bootstrapping demo only; vqa and nlvr run at full or small")
    with sigterm_raises():  # a killed demo stops its seeds and training ranks on the way out
        if "bootstrap" in args.tasks:
            run_demo(args.out_dir, scale=args.scale, seeds=args.seeds, first_seed=args.seed, threads=args.threads,
                     jobs=args.jobs, portable_cpu=not args.native_cpu)
        if downstream:
            from blip_fast.demo_tasks import run_task_demo

            run_task_demo(args.out_dir, downstream, scale=args.scale)
    return 0


def _add_capfilt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--captioner", required=True, type=errors.model_dir,
                        help="BLIP captioning model: HuggingFace-layout directory or hub id")
    parser.add_argument("--filter", required=True, type=errors.model_dir,
                        help="BLIP retrieval (ITM) model: HuggingFace-layout directory or hub id")
    parser.add_argument("--input", required=True, help="folder or brace/glob pattern of .tar shards, or BLIP .json")
    parser.add_argument("--image-root", type=errors.existing_dir, help="folder the json's image paths are relative to")
    parser.add_argument("--output", required=True, type=errors.output_dir,
                        help="output folder: new, empty, or an earlier run's (rerun the same command to resume)")
    parser.add_argument("--num-captions", type=errors.positive_int, default=1, help="synthetic captions per image (BLIP: 1)")
    parser.add_argument("--top-p", type=errors.float_in(0, 1, low_open=True), default=0.9,
                        help="nucleus sampling mass (BLIP: 0.9)")
    parser.add_argument("--beams", type=errors.positive_int, default=None,
                        help="beam search with this many beams instead of nucleus sampling (BLIP's ablation; "
                             "returns the --num-captions best)")
    _add_decoding_lengths(parser)
    parser.add_argument("--prompt", default="a picture of ", help="text the captions continue; stripped from output")
    parser.add_argument("--threshold", type=errors.float_in(0, 1, high_open=True),
                        help="keep when p(match) > this (default: ITM argmax)")
    parser.add_argument("--batch-size", type=errors.positive_int, default=None,
                        help="images per batch, part of the sampling stream (default: 256 on a GPU, 32 on a CPU)")
    parser.add_argument("--workers", type=errors.non_negative_int, default=default_workers(),
                        help="DataLoader processes decoding images (default: up to 4, at most the usable CPUs)")
    parser.add_argument("--image-decode", choices=["auto", "workers", "device"], default="auto",
                        help="where images are decoded and resized: in the DataLoader workers (PIL), or as a batch on "
                             "the device (nvJPEG on CUDA: workers only read bytes); auto: device on CUDA when "
                             "torchvision imports")
    parser.add_argument("--images-per-part", type=errors.positive_int, default=1000,
                        help="json input: images per work unit")
    parser.add_argument("--max-error-rate", type=errors.float_in(0, 1), default=0.05,
                        help="exit with status 1 when more than this fraction of the input records is unusable")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    _add_device_arguments(parser, "auto: cuda:LOCAL_RANK when CUDA is available")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _capfilt(args: argparse.Namespace) -> int:
    from blip_fast.capfilt import CapFiltOptions, default_batch_size, run_capfilt

    local_rank = args.local_rank if args.local_rank is not None else errors.environment_int("LOCAL_RANK", 0)
    device, dtype = _device_and_dtype(args.device, args.dtype, local_rank)
    options = CapFiltOptions(
        captioner=args.captioner, filter=args.filter, input=args.input, output=args.output,
        image_root=args.image_root, num_captions=args.num_captions, top_p=args.top_p, num_beams=args.beams,
        max_length=args.max_length, min_length=args.min_length, prompt=args.prompt, threshold=args.threshold,
        batch_size=args.batch_size or default_batch_size(device),
        workers=args.workers, seed=args.seed, device=str(device), dtype=str(dtype).removeprefix("torch."),
        image_decode=args.image_decode, images_per_part=args.images_per_part, progress=not args.no_progress,
    )
    summary = run_capfilt(options)
    print(json.dumps({key: value for key, value in summary.items() if key != "config"}, sort_keys=True))
    if summary.get("merged") and not summary["records"]:
        errors.report(PROG, errors.UserError(f"--input {args.input} holds no samples: there was nothing to caption"))
        return errors.EXIT_FAILED
    if summary.get("merged") and summary["error_rate"] > args.max_error_rate:
        errors.report(PROG, errors.UserError(
            f"{summary['unusable']} of {summary['records']} input records ({summary['error_rate']:.1%}) could not be "
            f"used, more than --max-error-rate {args.max_error_rate:g}: see {Path(args.output) / 'errors.jsonl'}"))
        return errors.EXIT_FAILED
    return 0


def _add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=EVALUATION_TASKS, required=True,
                        help="what to evaluate")
    parser.add_argument("--model", required=True, type=errors.model_dir,
                        help="BLIP model of that task: HuggingFace-layout directory or hub id")
    parser.add_argument("--annotations", required=True, type=errors.existing_file, nargs="+",
                        help='test json: [{"image", "caption"}, ...]; vqa: BLIP\'s vqa json, or VQA v2\'s questions '
                             "file (+ its annotations file to score); nlvr: BLIP's nlvr json")
    parser.add_argument("--image-root", required=True, type=errors.existing_dir,
                        help="directory the json's image paths are under")
    parser.add_argument("--k-test", type=errors.positive_int, default=256,
                        help="retrieval: ITC candidates reranked by ITM (BLIP: 256)")
    parser.add_argument("--batch-size", type=errors.positive_int, default=64,
                        help="images (and retrieval texts; VQA questions, NLVR2 pairs) per forward")
    parser.add_argument("--itm-batch-size", type=errors.positive_int, default=128,
                        help="retrieval: image-text pairs per ITM forward")
    parser.add_argument("--beams", type=errors.positive_int, default=3, help="caption: beam search width (BLIP: 3)")
    _add_decoding_lengths(parser, "caption: ")
    parser.add_argument("--prompt", default="a picture of ", help="caption: text the caption continues")
    parser.add_argument("--mode", choices=["rank", "generate"], default="rank",
                        help="vqa: rank the --answer-list candidates (BLIP's reported mode) or generate answers "
                             "(3 beams, at most 10 tokens)")
    parser.add_argument("--answer-list", type=errors.existing_file,
                        help="vqa rank: BLIP's answer_list.json (a json list of answers)")
    parser.add_argument("--rank-k", type=errors.positive_int, default=128,
                        help="vqa rank: candidates (most likely first tokens) rescored by the whole answer's loss "
                             "(BLIP's k_test: 128)")
    parser.add_argument("--results", type=errors.output_file,
                        help='vqa: write the answers as the official result file [{"question_id", "answer"}]')
    _add_device_arguments(parser)
    parser.add_argument("--out", type=errors.output_file, help="write the metrics (and predictions) as JSON here")


def _run_evaluation(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    from blip_fast import evaluate

    if args.task in ("retrieval", "caption") and len(args.annotations) != 1:
        raise errors.UserError(f"--task {args.task} reads one --annotations file, got {len(args.annotations)}")
    if args.task != "vqa" and (args.answer_list or args.results):
        raise errors.UserError("--answer-list and --results are for --task vqa")
    inputs = dict(model_dir=args.model, image_root=args.image_root, device=device, dtype=dtype,
                  batch_size=args.batch_size)
    if args.task == "retrieval":
        return evaluate.run_retrieval_evaluation(**inputs, annotations=args.annotations[0], k_test=args.k_test,
                                                 itm_batch_size=args.itm_batch_size)
    if args.task == "caption":
        return evaluate.run_caption_evaluation(
            **inputs, annotations=args.annotations[0], prompt=args.prompt, num_beams=args.beams,
            max_length=args.max_length, min_length=args.min_length,
        )
    if args.task == "vqa":
        from blip_fast.evaluate_vqa import run_vqa_evaluation

        return run_vqa_evaluation(**inputs, annotations=args.annotations, mode=args.mode,
                                  answer_list=args.answer_list, k_test=args.rank_k, results=args.results)
    from blip_fast.evaluate_nlvr import run_nlvr_evaluation

    return run_nlvr_evaluation(**inputs, annotations=args.annotations)


def _is_evaluation_report(data: Any) -> bool:
    return isinstance(data, dict) and data.get("task") in EVALUATION_TASKS


def _is_vqa_result_file(data: Any) -> bool:
    """The official VQA result format that ``--results`` writes: ``[{"question_id", "answer"}, ...]``."""
    return isinstance(data, list) and all(isinstance(record, dict) and set(record) == {"question_id", "answer"}
                                          for record in data)


def _evaluate(args: argparse.Namespace) -> int:
    from blip_fast import evaluate

    inputs = [*args.annotations, *([args.answer_list] if args.answer_list else [])]
    errors.check_outputs_spare_inputs({"--out": args.out, "--results": args.results}, inputs)
    errors.check_replaceable("--out", args.out, _is_evaluation_report)
    errors.check_replaceable("--results", args.results, _is_vqa_result_file)
    for path in (args.out, args.results):  # before the evaluation: a folder that cannot be made must not lose it
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    device, dtype = _device_and_dtype(args.device, args.dtype)
    report = _run_evaluation(args, device, dtype)
    if args.out is not None:
        from blip_fast.atomic_files import atomic_write_text

        atomic_write_text(args.out, json.dumps(report, indent=2, default=str) + "\n")
    if "metrics" in report:
        print(evaluate.format_table(report["metrics"]))
    else:
        print(f"{report['num_questions']} questions answered (no human answers to score them)")
    if report.get("results"):
        print(f"results: {report['results']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = errors.ArgumentParser(prog=PROG, description="Fast, faithful BLIP.")
    errors.add_debug_flag(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, add_arguments, run) -> None:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        errors.add_debug_flag(sub)
        sub.set_defaults(run=run)

    command("caption", "caption images, one line per image", _add_caption_arguments, _caption)
    command("convert", "original Salesforce BLIP .pth -> HuggingFace-layout directory", _add_convert_arguments,
            _convert)
    command("demo", "BLIP's bootstrapping loop on built-in synthetic noisy data: pre-train, CapFilt, pre-train again"
            " (--tasks vqa nlvr: BLIP's VQA and NLVR2 fine-tuning)", _add_demo_arguments, _demo)
    command("capfilt", "caption and filter an image-text dataset (BLIP's CapFilt)", _add_capfilt_arguments, _capfilt)
    command("evaluate", "retrieval recall@K, caption BLEU-4/CIDEr, VQA accuracy or NLVR2 accuracy on a test json",
            _add_evaluate_arguments, _evaluate)
    return parser


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out-dir", type=errors.output_dir, default=Path("blip_fast_demo"),
                        help="rerun the same command to resume")
    parser.add_argument("--scale", choices=["full", "small", "tiny"], default="full",
                        help="full: about 10 minutes on a 2-core CPU; small: the opt-in direction check; tiny: a smoke run")
    parser.add_argument("--seeds", type=errors.positive_int, default=1,
                        help="runs with seeds --seed .. --seed + N - 1, reported as mean ± standard deviation")
    parser.add_argument("--seed", type=errors.int_at_least(0), default=0,
                        help="the first seed (model init, data order, sampling)")
    parser.add_argument("--threads", type=errors.positive_int, default=None,
                        help="torch threads per seed run (default: the cores split over the runs at once); the "
                             "numbers depend on it, so it is recorded")
    parser.add_argument("--jobs", type=errors.positive_int, default=None,
                        help="seed runs at once (default: up to two per core)")
    parser.add_argument("--native-cpu", action="store_true",
                        help="let torch's CPU libraries use every instruction set this CPU has (by default ATen, MKL "
                             "and oneDNN are capped at AVX2, so any Intel CPU with AVX2 gives the same numbers); "
                             "the numbers then follow this CPU's instruction sets")
    parser.add_argument("--tasks", nargs="+", choices=["bootstrap", "vqa", "nlvr"], default=["bootstrap"],
                        help="bootstrap: pre-train, CapFilt, pre-train again; vqa, nlvr: pre-train on captions, then "
                             "fine-tune and score BLIP's VQA and NLVR2 models (in <out-dir>/tasks)")


def _run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; user errors are one line on stderr and exit status 2 (under a launcher, once per node:
    :func:`blip_fast.errors.report_delay`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return errors.run_main(_run, argv, PROG, delay_s=errors.report_delay())


if __name__ == "__main__":
    sys.exit(main())
