"""Training options: argparse with YAML defaults (timm's pattern), and the DeepSpeed config they run under.

Resolution order, last wins: the option's default here < the ``--config`` YAML file < flags on the command line.
Every YAML key is an option name (a flat mapping; unknown keys are an error, so a typo never silently falls back to
a default). The ds_config is read from ``--deepspeed_config`` (or the YAML's ``deepspeed_config``); its values must
be concrete: raw ``deepspeed.initialize`` does not resolve HuggingFace's ``"auto"``, so one is rejected here by name.
``micro_batch_size`` / ``gradient_accumulation_steps``, when set, overwrite the ds_config's
``train_micro_batch_size_per_gpu`` / ``gradient_accumulation_steps`` (and drop its ``train_batch_size`` so that
DeepSpeed derives it); otherwise the ds_config is authoritative.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from blip_fast.atomic_files import atomic_write_text
from blip_fast.data.workers import default_workers
from blip_fast.errors import (
    ArgumentParser,
    InvalidInputError,
    MissingFileError,
    UserError,
    add_debug_flag,
    check_output_dir,
    is_kind,
)

#: The keys of :data:`blip_fast.training.tasks.TASKS` (kept here so that parsing imports no model code).
TRAINING_TASKS = ("pretrain", "retrieval", "captioning", "vqa", "nlvr")
PRESETS = ("tiny", "base", "large")
DATA_SOURCES = ("synthetic", "blip_json", "webdataset")
LR_SCHEDULES = ("step", "cosine")
EXPORT_TASKS = ("captioning", "retrieval", "vqa", "nlvr")
#: Tasks that read their own annotation format (``--data blip_json --annotations``), not image-text pairs.
ANNOTATION_TASKS = ("vqa", "nlvr")
#: Written next to the outputs: the resolved options, the ds_config actually used, and the model config.
RESOLVED_CONFIG_FILE, RESOLVED_DS_CONFIG_FILE = "config.yaml", "ds_config.json"
#: Options that describe how a process was started, not the run: never written to the resolved config.
_LAUNCH_ONLY = frozenset({"config", "local_rank", "deepspeed", "deepscale", "deepscale_config", "resume", "debug"})


class ConfigError(InvalidInputError):
    """A training option, YAML file or ds_config that cannot be used; the message names the option or file."""


class BoolFlag(argparse.Action):
    """``--name`` / ``--no-name``, or ``--name true|false``: every YAML key is also a flag, and a YAML line
    ``resume: false`` gets typed as ``--resume false`` as often as ``--no-resume``."""

    VALUES = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}

    def __init__(self, option_strings: list[str], dest: str, default: Any = None, help: str | None = None) -> None:
        negated = [f"--no-{option[2:]}" for option in option_strings if option.startswith("--")]
        super().__init__([*option_strings, *negated], dest, nargs="?", default=default, help=help,
                         metavar="true|false")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: str | None,
                 option_string: str | None = None) -> None:
        if option_string is not None and option_string.startswith("--no-"):
            if value is not None:
                parser.error(f"{option_string} takes no value, got {value!r}")
            setattr(namespace, self.dest, False)
        elif value is None:
            setattr(namespace, self.dest, True)
        elif value.lower() in self.VALUES:
            setattr(namespace, self.dest, self.VALUES[value.lower()])
        else:
            parser.error(f"{option_string}: expected true or false, got {value!r}")

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--name [true|false], --no-name`` for a :class:`BoolFlag` (argparse would give ``--no-name`` a value too)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, BoolFlag):
            plain = [option for option in action.option_strings if not option.startswith("--no-")]
            negated = [option for option in action.option_strings if option.startswith("--no-")]
            return ", ".join([f"{option} [{action.metavar}]" for option in plain] + negated)
        return super()._format_action_invocation(action)


def _add_options(parser: argparse.ArgumentParser) -> None:
    bool_flag = BoolFlag

    task = parser.add_argument_group("task")
    task.add_argument("--task", default="pretrain", choices=TRAINING_TASKS,
                      help="pretrain: ITC + ITM + LM; retrieval: ITC (multi-positive by image id) + ITM, CapFilt's "
                           "filter; captioning: LM on prompt + caption, CapFilt's captioner; vqa: answer decoder over "
                           "question states, answers weighted by human agreement; nlvr: true/false of a statement "
                           "about an image pair")
    task.add_argument("--init_from", default=None,
                      help="fine-tuning: a blip_fast.train output dir (pre-training or the same task; its `latest` or "
                           "a global_stepN dir) or an HF-layout dir of the task's model; model config and tokenizer "
                           "come from it. Any task (pre-training too): an original BLIP .pth, with --tokenizer_dir")
    task.add_argument("--vision_init", default=None,
                      help="pre-training: the image encoder's initial weights, as BLIP starts from a ViT trained on "
                           "ImageNet: a timm/DeiT ViT state dict (.pth or .safetensors), BLIP's visual_encoder.* or "
                           "our vision_model.*; the classifier head is dropped, the position table resized")
    task.add_argument("--prompt", default="a picture of ",
                      help="captioning: text put before every caption and masked from the loss (BLIP's)")
    task.add_argument("--negative_all_rank", action=bool_flag, default=False,
                      help="retrieval: draw ITM hard negatives from every rank's batch (BLIP on COCO) instead of the "
                           "local one")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None, choices=PRESETS,
                       help="BlipConfig preset (default: tiny; fine-tuning: the --init_from model's, which a preset "
                            "given here must match)")
    model.add_argument("--image_size", type=int, default=None,
                       help="input resolution (default: the preset's; fine-tuning: the --init_from model's)")
    model.add_argument("--gradient_checkpointing", action=bool_flag, default=False,
                       help="recompute ViT blocks in backward (activation checkpointing)")
    model.add_argument("--drop_path_rate", type=float, default=0.0, help="ViT stochastic depth (BLIP pre-training: 0)")
    model.add_argument("--tokenizer_dir", default=None,
                       help="pre-training: tokenizer directory (e.g. bert-base-uncased + [DEC]/[ENC]); default: train "
                            "a WordPiece vocab on the training captions (fine-tuning takes --init_from's)")
    model.add_argument("--vocab_size", type=int, default=4096, help="size of a trained WordPiece vocab")
    model.add_argument("--max_text_length", type=int, default=30, help="caption tokens incl. [CLS]/[SEP] (BLIP: 30)")
    model.add_argument("--compile", action=bool_flag, default=None,
                       help="regional torch.compile of the ViT blocks and text layers, text padded to max_text_length "
                            "(default: on with CUDA; off on CPU, where inductor compiles for minutes, and under ZeRO-3, "
                            "which it does not support)")

    pretrain = parser.add_argument_group("pre-training objectives")
    pretrain.add_argument("--queue_size", type=int, default=57600,
                          help="ITC feature queue length; a multiple of the global micro batch")
    pretrain.add_argument("--momentum", type=float, default=0.995, help="EMA factor of the momentum encoders")
    pretrain.add_argument("--alpha", type=float, default=0.4,
                          help="momentum-distillation weight, ramped linearly over the first 2 epochs")
    pretrain.add_argument("--negatives_by_image_id", action=bool_flag, default=False,
                          help="pre-training: never treat another caption of the same image as a negative: not "
                               "drawn as an ITM negative, and an ITC target (in the batch and the queue), as retrieval "
                               "fine-tuning does (BLIP pre-training, with one caption per web image, does not)")

    data = parser.add_argument_group("data")
    data.add_argument("--data", default="synthetic", choices=DATA_SOURCES, help="training data source")
    data.add_argument("--num_samples", type=int, default=4096, help="synthetic: number of samples")
    data.add_argument("--noise_fraction", type=float, default=0.3, help="synthetic: fraction of wrong captions")
    data.add_argument("--annotations", nargs="+", default=[], help="blip_json: annotation json file(s)")
    data.add_argument("--image_root", default="", help="blip_json: directory the json's image paths start from")
    data.add_argument("--shards", nargs="+", default=[],
                      help="webdataset: tar shard paths/URLs (brace patterns allowed)")
    data.add_argument("--crop_scale", type=float, nargs=2, default=[0.2, 1.0],
                      help="RandomResizedCrop area range (BLIP pre-training 0.2 1.0, fine-tuning 0.5 1.0)")
    data.add_argument("--flip_prob", type=float, default=0.5,
                      help="horizontal flip probability (0 where captions name sides, as the synthetic set does)")
    data.add_argument("--num_workers", type=int, default=default_workers(),
                      help="DataLoader worker processes per rank (default: up to 4, at most the usable CPUs)")
    data.add_argument("--random_augment", action=bool_flag, default=False,
                      help="BLIP's RandomAugment(2, 5) after the crop and flip (BLIP's pre-training and fine-tuning)")
    data.add_argument("--alpha_on_white", action=bool_flag, default=False,
                      help="composite transparent pixels on white (transformers' processor from 5.21 on) instead of "
                           "keeping the colour beneath, as BLIP's training datasets' convert('RGB') does")
    data.add_argument("--gpu_decode", action=bool_flag, default=None,
                      help="workers read encoded images and draw the augmentation; decoding (nvJPEG) and the pixel "
                           "work run on the GPU (default: on with CUDA and torchvision; the PIL path otherwise)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=20, help="passes over the data (the LR decays per epoch)")
    optim.add_argument("--max_steps", type=int, default=None,
                       help="stop after this many optimizer steps in total (the schedule is unchanged)")
    optim.add_argument("--lr_schedule", default="step", choices=LR_SCHEDULES,
                       help="step: BLIP pre-training (warmup in epoch 0, then init_lr * lr_decay_rate**epoch); "
                            "cosine: BLIP fine-tuning (per epoch from init_lr to min_lr)")
    optim.add_argument("--init_lr", type=float, default=3e-4, help="peak learning rate")
    optim.add_argument("--warmup_lr", type=float, default=1e-6, help="learning rate at step 0 (step schedule)")
    optim.add_argument("--warmup_steps", type=int, default=3000, help="linear warmup length in steps, in epoch 0")
    optim.add_argument("--min_lr", type=float, default=1e-6, help="floor of the decay")
    optim.add_argument("--lr_decay_rate", type=float, default=0.9, help="per-epoch decay factor (step schedule)")
    optim.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay (all parameters, as BLIP)")
    optim.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999], help="AdamW betas")
    optim.add_argument("--micro_batch_size", type=int, default=None,
                       help="per-rank micro batch; overrides the ds_config's train_micro_batch_size_per_gpu")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=None,
                       help="overrides the ds_config's gradient_accumulation_steps")

    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=int, default=42, help="model init seed; rank r trains with seed + r")
    run.add_argument("--deterministic", action=bool_flag, default=False,
                     help="torch.use_deterministic_algorithms (same seed, ranks and threads -> same weights; on CUDA "
                          "it picks slower deterministic kernels, and an op without one warns)")
    run.add_argument("--output_dir", default=None,
                     help="checkpoints, logs, resolved configs, exports (default: output/<task>)")
    run.add_argument("--save_every_steps", type=int, default=1000, help="checkpoint period in optimizer steps")
    run.add_argument("--keep_checkpoints", type=int, default=0, help="keep only the newest N checkpoints (0: all)")
    run.add_argument("--log_every_steps", type=int, default=50, help="log period in optimizer steps")
    run.add_argument("--resume", action=bool_flag, default=False,
                     help="continue exactly from output_dir's `latest` checkpoint (a fresh start when none)")
    run.add_argument("--export_tasks", nargs="*", default=None, choices=EXPORT_TASKS,
                     help="task models exported as HuggingFace-layout dirs output_dir/export/<task> at the end "
                          "(default: captioning retrieval after pre-training, the fine-tuned task's model after "
                          "fine-tuning; no value: none)")
    run.add_argument("--progress_bar", action=bool_flag, default=True, help="tqdm progress bar on rank 0")


def build_parser() -> argparse.ArgumentParser:
    """The full training parser: options, DeepSpeed's config flags and the launchers' ``--local_rank``."""
    import deepspeed

    parser = ArgumentParser(
        prog="python -m blip_fast.train",
        description="BLIP pre-training (ITC + ITM + LM) and retrieval/caption/VQA/NLVR2 fine-tuning with DeepSpeed. "
                    "Also: `python -m blip_fast.train export ...`.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML file of option defaults (flags override it)")
    # The deepspeed launcher passes --local_rank=N; torch.distributed.launch spells it --local-rank.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    _add_options(parser)
    add_debug_flag(parser)
    deepspeed.add_config_arguments(parser)
    return parser


def _coerce(action: argparse.Action, value: Any, key: str, source: str) -> Any:
    """A YAML value converted as argparse would convert the flag (PyYAML reads ``3e-4`` as a string)."""
    if value is None:
        return None
    if isinstance(action, BoolFlag) or action.nargs == 0:  # flags (BoolFlag, store_true)
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    if many:
        values = value if isinstance(value, list) else [value]
        if isinstance(action.nargs, int) and len(values) != action.nargs:
            raise ConfigError(f"{source}: {key} takes {action.nargs} values, got {value!r}")
        return [_coerce_one(action, item, key, source) for item in values]
    if isinstance(value, list):
        raise ConfigError(f"{source}: {key} takes one value, got the list {value!r}")
    return _coerce_one(action, value, key, source)


def _coerce_one(action: argparse.Action, value: Any, key: str, source: str) -> Any:
    if action.type is not None:
        fractional = action.type is int and isinstance(value, float) and not value.is_integer()
        try:
            if isinstance(value, bool) or fractional:
                raise TypeError
            value = action.type(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: {key}={value!r} is not a valid {action.type.__name__}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{source}: {key}={value!r} is not one of {list(action.choices)}")
    return value


def _read_file(path: str | os.PathLike, what: str, language: str, load: Callable[[Any], Any],
               syntax_errors: tuple) -> Any:
    """``load(handle)`` of ``path``; a missing, unreadable or unparsable file is a one-line user error naming
    ``what`` it is."""
    try:
        with open(path, encoding="utf-8") as handle:
            return load(handle)
    except FileNotFoundError:
        raise MissingFileError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder; give the {language} file") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{what} {path} is not a {language} text file (not UTF-8: {error.reason} at byte "
                          f"{error.start})") from None
    except syntax_errors as error:
        where = " ".join(str(error).split())  # parsers' messages span lines (YAML marks the spot with several)
        raise ConfigError(f"{what} {path} is not valid {language}: {where}") from None


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    loaded = _read_file(path, "config", "YAML", yaml.safe_load, (yaml.YAMLError,))
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values, got {type(loaded).__name__}")
    return loaded


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options from ``argv`` on top of the ``--config`` YAML on top of the defaults.

    Relative paths in the YAML (``deepspeed_config``, data, tokenizer) are taken from the working directory; a
    ``deepspeed_config`` that does not exist there is also looked for next to the YAML file.
    """
    parser = build_parser()
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("--config", default=None)
    known, _ = config_parser.parse_known_args(argv)
    if known.config is not None:
        values = read_yaml(known.config)
        actions = {action.dest: action for action in parser._actions}
        unknown = sorted(set(values) - set(actions) - {"help"})
        if unknown:
            raise ConfigError(f"{known.config}: unknown option(s) {unknown}; see `python -m blip_fast.train --help`")
        defaults = {key: _coerce(actions[key], value, key, known.config) for key, value in values.items()}
        ds_path = defaults.get("deepspeed_config")
        if ds_path and not os.path.exists(ds_path):
            beside = Path(known.config).parent / ds_path
            if beside.exists():
                defaults["deepspeed_config"] = str(beside)
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    check_args(args)
    if not os.path.isfile(args.deepspeed_config):
        where = f"the working directory {os.getcwd()}"
        if known.config is not None and args.deepspeed_config == parser.get_default("deepspeed_config"):
            where += f" and next to {known.config} ({Path(known.config).parent.resolve()})"
        raise MissingFileError(f"ds_config {args.deepspeed_config} does not exist (looked in {where})")
    return args


#: option -> (whether a value is usable, what the message says it must be); ``None`` (unset) always passes.
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{name: (lambda value: value > 0, "be > 0") for name in (
        "epochs", "save_every_steps", "log_every_steps", "queue_size", "vocab_size", "max_steps",
        "num_samples", "init_lr", "image_size", "micro_batch_size", "gradient_accumulation_steps")},
    **{name: (lambda value: value >= 0, "be >= 0") for name in (
        "warmup_steps", "warmup_lr", "min_lr", "weight_decay", "num_workers", "keep_checkpoints")},
    **{name: (lambda value: 0.0 <= value <= 1.0, "lie in [0, 1]") for name in ("noise_fraction", "alpha", "flip_prob")},
    **{name: (lambda value: 0.0 <= value < 1.0, "lie in [0, 1)") for name in ("momentum", "drop_path_rate")},
    "max_text_length": (lambda value: value >= 3, "be >= 3 ([CLS], a token, [SEP])"),
    "lr_decay_rate": (lambda value: 0.0 < value <= 1.0, "lie in (0, 1]"),
    "seed": (lambda value: 0 <= value < 2**31, "lie in [0, 2**31)"),
    "crop_scale": (lambda pair: 0.0 < pair[0] <= pair[1] <= 1.0, "satisfy 0 < low <= high <= 1"),
    "betas": (lambda pair: all(0.0 <= beta < 1.0 for beta in pair), "each lie in [0, 1)"),
}


def check_args(args: argparse.Namespace) -> None:
    """Cross-option checks that argparse cannot express, and the defaults that depend on other options. Every
    check runs before a process group starts or a file is written, so a mistake costs no run."""
    for name, (usable, requirement) in _RANGES.items():
        value = getattr(args, name)
        if value is not None and not usable(value):
            raise ConfigError(f"{name} must {requirement}, got {value}")
    if args.min_lr > args.init_lr:
        raise ConfigError(f"min_lr {args.min_lr} is above init_lr {args.init_lr}: the schedule decays from init_lr "
                          "towards min_lr")
    if args.data == "blip_json" and not args.annotations:
        raise ConfigError("data=blip_json needs annotations (json files) and image_root")
    if args.data == "blip_json" and (missing := [path for path in args.annotations if not os.path.isfile(path)]):
        raise MissingFileError(f"annotations {missing[0]}: no such file" + (
            " (it is a folder: name the json files in it)" if os.path.isdir(missing[0]) else ""))
    if args.data == "webdataset" and not args.shards:
        raise ConfigError("data=webdataset needs shards")
    if args.task in ANNOTATION_TASKS and args.data != "blip_json":
        raise ConfigError(f"task {args.task} trains on its own annotation files: pass --data blip_json --annotations "
                          "FILE... (vqa: BLIP's vqa json or VQA v2 questions + annotations; nlvr: BLIP's nlvr json) "
                          "and --image_root")
    if args.task == "pretrain" and args.init_from is not None and not os.path.isfile(args.init_from):
        raise ConfigError("init_from is for fine-tuning (tasks retrieval, captioning, vqa, nlvr); pre-training "
                          "starts from random weights or continues an original BLIP .pth")
    if args.vision_init is not None:
        if args.task != "pretrain" or args.init_from is not None:
            raise ConfigError("vision_init starts pre-training's image encoder from a classifier's ViT: it goes with "
                              "task pretrain and without init_from (which holds an image encoder of its own)")
        if not os.path.isfile(args.vision_init):
            raise MissingFileError(f"vision_init {args.vision_init}: no such file (a ViT state dict: .pth or "
                                   ".safetensors)")
    if args.task != "pretrain" and args.init_from is None:
        raise ConfigError(f"task {args.task} fine-tunes a model: pass --init_from (a pre-training output dir or an "
                          "HF-layout task dir)")
    if args.init_from is not None and args.tokenizer_dir is not None and not os.path.isfile(args.init_from):
        raise ConfigError("tokenizer_dir and init_from exclude each other unless init_from is an original .pth: "
                          "fine-tuning keeps the tokenizer of init_from")
    if args.task == "pretrain" and args.model is None and args.init_from is None:
        args.model = "tiny"
    if args.image_size is not None and args.init_from is None:
        from blip_fast.config import BlipConfig  # dataclasses only: parsing still imports no model code

        try:
            BlipConfig.from_name(args.model, image_size=args.image_size)
        except ValueError as error:
            raise ConfigError(f"image_size {args.image_size} does not fit model {args.model}: {error}") from None
    if args.output_dir is None:
        args.output_dir = f"output/{args.task}"
    try:
        check_output_dir(args.output_dir)
    except UserError as error:
        raise ConfigError(f"output_dir {error}") from None
    if args.init_from is not None and os.path.realpath(args.init_from) == os.path.realpath(args.output_dir):
        raise ConfigError(f"output_dir {args.output_dir} is the init_from model's folder: this run's checkpoints, "
                          "config and tokenizer would go over the model it starts from; choose another output_dir")
    if args.gpu_decode and args.task in ANNOTATION_TASKS:
        raise ConfigError(f"gpu_decode is for the image-text tasks; task {args.task} decodes its images in the "
                          "DataLoader workers")
    if args.gpu_decode is None:
        from blip_fast.data.tensor_transforms import nvjpeg_available

        args.gpu_decode = args.task not in ANNOTATION_TASKS and nvjpeg_available()
    if not args.deepspeed_config:
        raise ConfigError("no ds_config: pass --deepspeed_config FILE.json or set deepspeed_config in the YAML")


def resolved_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options of this run as a flat dict (what ``config.yaml`` next to the outputs holds)."""
    return {key: value for key, value in sorted(vars(args).items()) if key not in _LAUNCH_ONLY}


def write_resolved(args: argparse.Namespace, ds_config: dict[str, Any], output_dir: str | os.PathLike) -> None:
    """Write ``config.yaml`` (loadable again with ``--config``) and ``ds_config.json`` into ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    options = resolved_options(args)
    options["deepspeed_config"] = str((output_dir / RESOLVED_DS_CONFIG_FILE).resolve())
    atomic_write_text(output_dir / RESOLVED_DS_CONFIG_FILE, json.dumps(ds_config, indent=2) + "\n")
    atomic_write_text(output_dir / RESOLVED_CONFIG_FILE, yaml.safe_dump(options, sort_keys=True))


# ---------------------------------------------------------------------------------------------------- ds_config
def find_auto(config: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every ``"auto"`` value in a ds_config."""
    found = []
    if isinstance(config, dict):
        for key, value in config.items():
            found += find_auto(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(config, list):
        for index, value in enumerate(config):
            found += find_auto(value, f"{prefix}[{index}]")
    elif isinstance(config, str) and config.strip().lower() == "auto":
        found.append(prefix)
    return found


def load_ds_config(path: str | os.PathLike, micro_batch_size: int | None = None,
                   gradient_accumulation_steps: int | None = None) -> dict[str, Any]:
    """Read a ds_config JSON, apply the batch overrides, and reject ``"auto"`` values by key."""
    path = os.fspath(path)
    config = _read_file(path, "ds_config", "JSON", json.load, (json.JSONDecodeError,))
    return resolve_ds_config(config, path, micro_batch_size, gradient_accumulation_steps)


def resolve_compile(requested: bool | None, ds_config: dict[str, Any]) -> bool:
    """``--compile`` for this ds_config: by default on with CUDA, except under ZeRO-3, which gathers each layer's
    weights in hooks that a compiled layer would trace; asked for under ZeRO-3, a :class:`ConfigError` before the
    model is built."""
    import torch

    zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    if requested and zero3:
        raise ConfigError("--compile works with ZeRO stages 0-2: ZeRO-3 gathers each layer's weights in hooks that a "
                          "compiled layer would trace; pass --no-compile")
    return requested if requested is not None else torch.cuda.is_available() and not zero3


def batch_geometry(ds_config: dict[str, Any], world_size: int) -> tuple[int, int]:
    """(images per rank and micro step, micro steps per optimizer step), as ``deepspeed.initialize`` will derive them
    from a resolved ds_config (``train_batch_size = micro batch x gradient_accumulation_steps x ranks``): known
    before the model is built, so a batch that does not fit the run or its data fails in seconds."""
    accumulation = ds_config.get("gradient_accumulation_steps")
    if "train_micro_batch_size_per_gpu" not in ds_config:
        accumulation = int(accumulation or 1)
        total = int(ds_config["train_batch_size"])
        return _split(total, accumulation, world_size, "gradient_accumulation_steps"), accumulation
    micro = int(ds_config["train_micro_batch_size_per_gpu"])
    if accumulation is None and "train_batch_size" in ds_config:
        accumulation = _split(int(ds_config["train_batch_size"]), micro, world_size, "train_micro_batch_size_per_gpu")
    return micro, int(accumulation or 1)


def _split(total: int, per_rank: int, world_size: int, name: str) -> int:
    """``train_batch_size`` over ``per_rank`` (the ds_config's ``name``) x ``world_size`` ranks."""
    if total % (per_rank * world_size):
        raise ConfigError(f"ds_config: train_batch_size {total} is not a multiple of {name} {per_rank} x "
                          f"{world_size} ranks")
    return total // (per_rank * world_size)


_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _check_ds_values(config: dict[str, Any], source: str) -> None:
    """The values this script reads itself, typed: wrong, they fail in a traceback, some only at the first step."""
    for key in _BATCH_KEYS:
        value = config.get(key)
        if key in config and not (is_kind(value, int) and value >= 1):
            raise ConfigError(f"{source}: {key} must be a positive integer, got {value!r}")
    for key in ("zero_optimization", "bf16", "fp16"):
        if key in config and not isinstance(config[key], dict):
            raise ConfigError(f"{source}: {key} must be a JSON object, got {config[key]!r}")
    clipping = config.get("gradient_clipping", 0.0)
    if not (is_kind(clipping, int, float) and clipping >= 0):
        raise ConfigError(f"{source}: gradient_clipping must be a number >= 0, got {clipping!r}")


class _ReadKeys(dict):
    """A ds_config that records the top-level keys DeepSpeed's config reader asks for."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.read: set[str] = set()

    def get(self, key, *default):
        self.read.add(key)
        return super().get(key, *default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        self.read.add(key)
        return super().__contains__(key)


def _check_with_deepspeed(config: dict[str, Any], source: str) -> None:
    """DeepSpeed's own checks (ZeRO keys and stage, the batch over this run's ranks, bf16 with fp16) as one line
    before anything is written, and a top-level key DeepSpeed does not read that is close to one it does: a typo
    (``zero_optimisation``) that DeepSpeed would ignore, training without ZeRO."""
    import torch
    from deepspeed.runtime.config import DeepSpeedConfig

    if (config.get("fp16") or {}).get("enabled") and not torch.cuda.is_available():
        raise ConfigError(f"{source}: fp16 needs a GPU; on a CPU train in bf16 (\"bf16\": {{\"enabled\": true}}) or fp32")
    recorded = _ReadKeys(config)
    try:
        DeepSpeedConfig(recorded)
    except (AssertionError, ValueError, TypeError) as error:  # pydantic's ValidationError is a ValueError
        if hasattr(error, "errors") and hasattr(error, "title"):
            reason = "; ".join(f"{'.'.join(map(str, item['loc']))}: {item['msg']}" for item in error.errors())
            raise ConfigError(f"{source}: {error.title}: {reason}") from None
        raise ConfigError(f"{source}: {error}") from None
    known = recorded.read | {"optimizer", "scheduler"}
    for key in config:
        if key not in known and (close := difflib.get_close_matches(key, known, n=1, cutoff=0.85)):
            raise ConfigError(f"{source}: unknown key {key!r} (did you mean {close[0]!r}?): DeepSpeed would ignore it")


def resolve_ds_config(config: dict[str, Any], source: str = "ds_config", micro_batch_size: int | None = None,
                      gradient_accumulation_steps: int | None = None) -> dict[str, Any]:
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: a ds_config is a JSON object, got a {type(config).__name__}")
    config = copy.deepcopy(config)
    if micro_batch_size is not None:
        config["train_micro_batch_size_per_gpu"] = micro_batch_size
        config.pop("train_batch_size", None)
    if gradient_accumulation_steps is not None:
        config["gradient_accumulation_steps"] = gradient_accumulation_steps
        config.pop("train_batch_size", None)
    auto = find_auto(config)
    if auto:
        raise ConfigError(
            f"{source}: {', '.join(repr(key) for key in auto)} {'is' if len(auto) == 1 else 'are'} \"auto\"; "
            "deepspeed.initialize does not resolve \"auto\" (only the HuggingFace Trainer does): give concrete values"
        )
    if "train_micro_batch_size_per_gpu" not in config and "train_batch_size" not in config:
        raise ConfigError(f"{source}: set train_micro_batch_size_per_gpu (or micro_batch_size in the training config)")
    _check_ds_values(config, source)
    if "optimizer" in config or "scheduler" in config:
        raise ConfigError(
            f"{source}: remove the 'optimizer'/'scheduler' sections: the training script builds AdamW and sets BLIP's "
            "learning-rate schedule itself (init_lr, warmup_lr, warmup_steps, lr_decay_rate, weight_decay options)"
        )
    _check_with_deepspeed(config, source)
    return config
