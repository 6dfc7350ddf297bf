"""The training tasks: what differs between pre-training and fine-tuning CapFilt's captioner and filter.

One loop (:mod:`blip_fast.train`) runs every task; a :class:`TrainingTask` row holds what differs:

==========  ====================  ======================================  ===================================
task        training module       forward inputs                          exports (HF-layout task dirs)
==========  ====================  ======================================  ===================================
pretrain    BlipPretrainer        images, captions, alpha, image ids      captioning, retrieval (default), vqa
retrieval   BlipRetrievalTrainer  images, captions, alpha, image ids      retrieval: CapFilt's filter
captioning  BlipCaptionTrainer    images, ``prompt + caption``            captioning: CapFilt's captioner
vqa         BlipVQATrainer        images, questions, weighted answers     vqa
nlvr        BlipForNLVR           image pairs, statements, labels         nlvr
==========  ====================  ======================================  ===================================

VQA and NLVR2 read their own annotations (``--data blip_json --annotations``: BLIP's ``vqa_*.json`` or VQA v2's
questions + annotations files, BLIP's ``nlvr_*.json``); the other tasks read image-text pairs.

Fine-tuning starts from ``--init_from`` (:class:`InitSource`): a ``blip_fast.train`` output dir (pre-training, or a
run of the same task) or an HuggingFace-layout dir of the task's model. The model config and the tokenizer come
from it, so a fine-tuned model keeps the vocabulary its embeddings were trained with. What is copied:

- retrieval: ViT, text encoder, ITC projections, ITM head; from a training checkpoint also the momentum encoders and
  the learned temperature (BLIP loads them too), from an HF dir the momentum encoders start as copies of the online
  ones. The queues always start fresh: queued features of other data would be wrong negatives (and wrong ids).
- captioning: ViT + text decoder (pre-training's decoder shares embeddings, cross-attention and FFN with the
  encoder; the exported captioner holds them as its own).
- vqa: ViT + text encoder (the question encoder) + text decoder (the answer decoder), as BLIP's ``blip_vqa``.
- nlvr: ViT + text encoder, each twin cross-attention from the one of pre-training; the two-layer head and the merge
  layers start fresh (from an NLVR2 run or an exported NLVR2 dir: everything).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from blip_fast import checkpoint, hub
from blip_fast.config import BlipConfig
from blip_fast.data import BlipCollator
from blip_fast.errors import InvalidInputError, MissingFileError
from blip_fast.tokenizer import TOKENIZER_FILE, VOCAB_FILE, BlipTokenizer
from blip_fast.training import checkpointing, options
from blip_fast.training.options import ConfigError

logger = logging.getLogger("blip_fast")

Batch = Mapping[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------- init sources
def _architecture(config: BlipConfig) -> dict[str, int]:
    """The shape-defining fields a fine-tuning run may not change (image size is checked on its own)."""
    fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    return {**{f"vision.{name}": getattr(config.vision, name) for name in (*fields, "patch_size")},
            **{f"text.{name}": getattr(config.text, name) for name in fields}}


class InitSource:
    """Where a run starts: a ``blip_fast.train`` output dir (its ``latest``), one of its ``global_stepN`` dirs, an
    HuggingFace-layout task dir (``config.json`` + weights + tokenizer files), or an original Salesforce BLIP
    ``.pth`` (``model_base.pth``, ``model_base_retrieval_coco.pth``, ...; it holds no tokenizer, so ``tokenizer_dir``
    names one: bert-base-uncased's ``vocab.txt``, to which ``[DEC]``/``[ENC]`` are added as the original does).
    A HuggingFace hub id stands for its snapshot directory."""

    def __init__(self, path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> None:
        if not hub.is_local(path) and hub.looks_like_repo_id(os.fspath(path)):
            path = hub.resolve(path)  # a HuggingFace hub id: its cached (or downloaded) snapshot
        self.path = Path(path)
        #: (output_dir, tag) of a training checkpoint; None for an HF-layout dir.
        self.checkpoint: tuple[Path, str] | None = None
        #: An original ``.pth``'s tensors under our names; None for the other sources.
        self.original: dict[str, torch.Tensor] | None = None
        if self.path.is_file():
            if tokenizer_dir is None:
                raise ConfigError(f"--init_from {self.path} is an original BLIP checkpoint, which holds no "
                                  "tokenizer: pass --tokenizer_dir (a dir with bert-base-uncased's vocab.txt)")
            self.tokenizer_dir = Path(tokenizer_dir)
            self.original = checkpoint.read_original(self.path)
            self.config = checkpoint.infer_config(self.original, str(self.path),
                                                  BlipTokenizer.from_pretrained(self.tokenizer_dir))
        elif tokenizer_dir is not None:
            raise ConfigError("tokenizer_dir and init_from exclude each other unless init_from is an "
                              "original .pth: fine-tuning keeps the tokenizer of init_from")
        elif (self.path / checkpoint.CONFIG_NAME).is_file():
            self.config = BlipConfig.from_hf(self.path)
            self.tokenizer_dir = self.path
        else:
            try:
                self.checkpoint = checkpointing.resolve_checkpoint(self.path)
            except FileNotFoundError as error:
                raise MissingFileError(f"--init_from {self.path}: neither an HF-layout model dir (no config.json) "
                                       f"nor a blip_fast.train output dir ({error})") from None
            output_dir = self.checkpoint[0]
            self.config = checkpointing.read_model_config(output_dir)
            self.tokenizer_dir = output_dir / checkpointing.TOKENIZER_DIR
        if not any((self.tokenizer_dir / name).is_file() for name in (TOKENIZER_FILE, VOCAB_FILE)):
            raise MissingFileError(f"--init_from {self.path}: no tokenizer in {self.tokenizer_dir} ({TOKENIZER_FILE} "
                                   f"or {VOCAB_FILE}); fine-tuning keeps the vocabulary the model was trained with")

    def __str__(self) -> str:
        return str(self.path) if self.checkpoint is None else "/".join(map(str, self.checkpoint))

    def run_config(self, args: argparse.Namespace, tokenizer: BlipTokenizer) -> BlipConfig:
        """The source's model config at the run's ``image_size`` when given (BLIP fine-tunes at a higher resolution
        than it pre-trains: the position tables are resized, as the original's ``interpolate_pos_embed``); the
        run's ``model``, when given, must agree with the source's architecture."""
        config = self.config
        if args.image_size is not None:
            config = config.replace(vision=dataclasses.replace(config.vision, image_size=args.image_size))
        if args.model is not None:
            preset, source = _architecture(BlipConfig.from_name(args.model)), _architecture(config)
            changed = {key: (preset[key], source[key]) for key in preset if preset[key] != source[key]}
            if changed:
                raise ConfigError(f"model {args.model!r} differs from --init_from {self} in {changed} (preset, source): "
                                  "fine-tuning keeps the source's architecture (leave model unset)")
        if config.for_tokenizer(tokenizer).text != config.text:
            raise ConfigError(f"the tokenizer in {self.tokenizer_dir} ({len(tokenizer)} tokens) does not match the "
                              f"model of --init_from {self} (vocab_size {config.text.vocab_size}, special-token ids)")
        return config

    @functools.cached_property
    def _training_state(self) -> dict[str, torch.Tensor]:
        """The checkpoint's consolidated state under task-model key names (a captioning run's prefix removed)."""
        output_dir, tag = self.checkpoint
        prefix = run_task(output_dir).state_prefix
        state = checkpointing.consolidated_state_dict(output_dir, tag)
        return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}

    def task_model(self, task: str, config: BlipConfig) -> nn.Module:
        """The source's model of ``task`` (the fine-tuning task is also the exported model's) built with ``config``;
        errors say what the source lacks. An NLVR2 model from a checkpoint with one cross-attention per layer starts
        both halves of each twin from it and its head fresh (:func:`checkpoint.model_from_state_dict`)."""
        model_cls = checkpoint.task_class(task)
        if self.original is not None:
            checkpoint.check_task(str(self), model_cls, self.original)
            return checkpoint.model_from_state_dict(model_cls, self.original, config, source=str(self),
                                                    resize_pos_embed=True)
        if self.checkpoint is None:
            config_text = (self.path / checkpoint.CONFIG_NAME).read_text(encoding="utf-8")
            architectures = json.loads(config_text).get("architectures")
            if architectures and architectures[0] != model_cls.__name__:
                raise ConfigError(f"--init_from {self} holds a {architectures[0]}; task {task} starts from a "
                                  f"{model_cls.__name__} dir or a pre-training output dir")
            saved = config.replace(vision=dataclasses.replace(config.vision, image_size=self.config.vision.image_size))
            model = checkpoint.load_pretrained(model_cls, self.path, config=saved)
            if saved == config:
                return model
            return checkpoint.model_from_state_dict(model_cls, model.state_dict(), config, source=str(self),
                                                    resize_pos_embed=True)
        with torch.device("meta"):
            needed = {key.split(".")[0] for key in model_cls(config).state_dict()}
        if task == "nlvr":
            needed.discard("cls_head")  # NLVR2 starts from pre-training with a fresh head, as the original does
        held = {key.split(".")[0] for key in self._training_state}
        if needed - held:
            raise ConfigError(f"--init_from {self} lacks {sorted(needed - held)}, which task {task} needs "
                              f"(a {model_cls.__name__}); it holds {sorted(held)}")
        return checkpoint.model_from_state_dict(model_cls, self._training_state, config, source=str(self),
                                                resize_pos_embed=True)

    def load_training_state(self, trainer: nn.Module) -> None:
        """Load an original ``.pth`` into a pre-training/retrieval trainer: momentum encoders and queues included
        when present and of the same shape, logged in one block (:func:`checkpoint.load_training_state`)."""
        checkpoint.load_training_state(trainer, self.original, str(self))

    def training_state(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Those of ``keys`` the source's training checkpoint holds (none for an HF-layout dir)."""
        if self.checkpoint is None:
            return {}
        return {key: self._training_state[key] for key in keys if key in self._training_state}


# ---------------------------------------------------------------------------------------------------- models
def _build_pretrainer(config: BlipConfig, args: argparse.Namespace, source: InitSource | None,
                      tokenizer: BlipTokenizer) -> nn.Module:
    from blip_fast.modeling.pretrain import BlipPretrainer

    trainer = BlipPretrainer(config, queue_size=args.queue_size, momentum=args.momentum,
                             negatives_by_image_id=args.negatives_by_image_id)
    if source is not None:  # continuing the original's pre-training from its .pth
        source.load_training_state(trainer)
    if args.vision_init is not None:  # BLIP's ViT trained on ImageNet
        checkpoint.load_vision_init(trainer, args.vision_init)
    return trainer


def _build_retrieval(config: BlipConfig, args: argparse.Namespace, source: InitSource,
                     tokenizer: BlipTokenizer) -> nn.Module:
    from blip_fast.modeling.finetune import BlipRetrievalTrainer

    trainer = BlipRetrievalTrainer(config, args.queue_size, args.momentum, args.negative_all_rank)
    if source.original is not None:
        source.load_training_state(trainer)
        return trainer
    missing, unexpected = trainer.load_state_dict(source.task_model("retrieval", config).state_dict(),
                                                  strict=False)
    if unexpected:
        raise RuntimeError(f"BlipRetrievalTrainer lacks retrieval-model tensors {unexpected}")
    # What the trainer holds beyond the task model: momentum encoders and temperature (parameters, taken from a
    # training checkpoint) and the queues (buffers, which stay fresh).
    buffers = {name for name, _ in trainer.named_buffers()}
    extras = [key for key in missing if key not in buffers]
    state = source.training_state(extras)
    if len(state) == len(extras):
        resized = checkpoint.resize_vision_positions(state, trainer.state_dict())  # the momentum ViT's
        if resized:
            logger.info("%s: resized %s (bicubic, class token kept)", source, ", ".join(resized))
        trainer.load_state_dict(state, strict=False)
    else:
        logger.info("%s holds no momentum encoders: they start as copies of the online encoders", source)
        trainer.reset_momentum_encoders()
    return trainer


def prompt_length(tokenizer: BlipTokenizer, prompt: str) -> int:
    """``[CLS]`` (``[DEC]`` in the decoder) plus the prompt's tokens: the positions the captioning loss skips."""
    return len(tokenizer(prompt).input_ids) - 1  # without [SEP]


def _build_captioner(config: BlipConfig, args: argparse.Namespace, source: InitSource,
                     tokenizer: BlipTokenizer) -> nn.Module:
    from blip_fast.modeling.finetune import BlipCaptionTrainer

    skipped = prompt_length(tokenizer, args.prompt)
    if skipped + 2 > args.max_text_length:  # [DEC], the prompt, one caption token, [SEP]
        raise ConfigError(f"max_text_length {args.max_text_length} leaves no caption token after the prompt "
                          f"{args.prompt!r} ({skipped} tokens with [DEC]) and [SEP]: raise it (BLIP: 30)")
    return BlipCaptionTrainer(source.task_model("captioning", config), skipped)


def _build_vqa(config: BlipConfig, args: argparse.Namespace, source: InitSource,
               tokenizer: BlipTokenizer) -> nn.Module:
    from blip_fast.modeling.finetune import BlipVQATrainer

    return BlipVQATrainer(source.task_model("vqa", config))


def _build_nlvr(config: BlipConfig, args: argparse.Namespace, source: InitSource,
                tokenizer: BlipTokenizer) -> nn.Module:
    return source.task_model("nlvr", config)  # BlipForNLVR returns its cross-entropy itself


# ---------------------------------------------------------------------------------------------------- datasets
def train_transform(args: argparse.Namespace, image_size: int):
    """BLIP's training augmentation of every task (random resized crop, flip, ``--random_augment``)."""
    from blip_fast.data import BlipTrainTransform

    return BlipTrainTransform(image_size=image_size, scale=tuple(args.crop_scale), flip_prob=args.flip_prob,
                              random_augment=args.random_augment, alpha_on_white=args.alpha_on_white)


# "replace": an unreadable image is swapped for the next readable one, so every rank keeps its full micro batch.
def _vqa_dataset(args: argparse.Namespace, image_size: int) -> torch.utils.data.Dataset:
    from blip_fast.data.vqa import VQADataset, read_vqa

    return VQADataset(read_vqa(args.annotations, args.image_root), train_transform(args, image_size),
                      seed=args.seed, on_error="replace")


def _nlvr_dataset(args: argparse.Namespace, image_size: int) -> torch.utils.data.Dataset:
    from blip_fast.data.nlvr import NLVRDataset, read_nlvr

    return NLVRDataset(read_nlvr(args.annotations, args.image_root), train_transform(args, image_size),
                       seed=args.seed, on_error="replace")


# ---------------------------------------------------------------------------------------------------- batches
def _contrastive_inputs(batch: Batch, alpha: float | None) -> dict[str, Any]:
    return dict(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"], alpha=alpha,
                # captions of one image are each other's positives, never ITM negatives
                image_ids=batch["image_ids"])


def _caption_inputs(batch: Batch, alpha: float | None) -> dict[str, Any]:
    return dict(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"])


def _vqa_inputs(batch: Batch, alpha: float | None) -> dict[str, Any]:
    names = ("pixel_values", "question_ids", "question_mask", "answer_ids", "answer_mask", "answer_weights",
             "answers_per_question")
    return {name: batch[name] for name in names}


def _nlvr_inputs(batch: Batch, alpha: float | None) -> dict[str, Any]:
    return dict(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                attention_mask=batch["attention_mask"], labels=batch["labels"])


class PromptCollator(BlipCollator):
    """BLIP's caption fine-tuning text: ``prompt + caption`` (the trainer masks the prompt out of the loss)."""

    def __init__(self, tokenizer: BlipTokenizer, max_length: int, prompt: str,
                 padding: Literal["longest", "max_length"] = "longest") -> None:
        super().__init__(tokenizer, max_length=max_length, padding=padding)
        self.prompt = prompt

    def __call__(self, records: Sequence[dict[str, Any] | None]) -> dict[str, torch.Tensor] | None:
        prompted = [None if record is None else {**record, "caption": self.prompt + record["caption"]}
                    for record in records]
        return super().__call__(prompted)


def _padding(args: argparse.Namespace) -> Literal["longest", "max_length"]:
    # Compiled layers need static shapes: every batch padded to max_text_length (masked positions change no loss).
    return "max_length" if args.compile else "longest"


def _retrieval_padding(args: argparse.Namespace) -> Literal["longest", "max_length"]:
    # ITM negatives drawn across ranks (negative_all_rank) all-gather the token rows, which needs one length on every
    # rank, as BLIP's max_length padding gives; otherwise the longest caption of the batch bounds the text work.
    return "max_length" if args.negative_all_rank else _padding(args)


def _plain_collator(tokenizer: BlipTokenizer, args: argparse.Namespace) -> BlipCollator:
    return BlipCollator(tokenizer, max_length=args.max_text_length, padding=_padding(args))


def _retrieval_collator(tokenizer: BlipTokenizer, args: argparse.Namespace) -> BlipCollator:
    return BlipCollator(tokenizer, max_length=args.max_text_length, padding=_retrieval_padding(args))


def _prompt_collator(tokenizer: BlipTokenizer, args: argparse.Namespace) -> BlipCollator:
    return PromptCollator(tokenizer, args.max_text_length, args.prompt, _padding(args))


def _vqa_collator(tokenizer: BlipTokenizer, args: argparse.Namespace) -> Callable:
    from blip_fast.data.vqa import VQACollator

    return VQACollator(tokenizer, max_length=args.max_text_length)  # questions; answers are never cut


def _nlvr_collator(tokenizer: BlipTokenizer, args: argparse.Namespace) -> Callable:
    from blip_fast.data.nlvr import NLVRCollator

    return NLVRCollator(tokenizer, max_length=args.max_text_length)


# ---------------------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class TrainingTask:
    """One row of the task table (see the module docstring)."""

    name: str
    #: Output fields logged and written to metrics.jsonl; the first is the optimised total.
    loss_names: tuple[str, ...]
    #: ``(config, args, init source or None, tokenizer) -> training module``.
    build_model: Callable[[BlipConfig, argparse.Namespace, InitSource | None, BlipTokenizer], nn.Module]
    #: ``(batch on device, alpha) -> forward keyword arguments``.
    forward_inputs: Callable[[Batch, float | None], dict[str, Any]]
    #: ``(tokenizer, args) -> collate_fn``.
    collator: Callable[[BlipTokenizer, argparse.Namespace], Callable]
    #: ITC with momentum distillation and queues: alpha ramps over this many epochs (BLIP: 2 in pre-training, 1 in
    #: retrieval fine-tuning). None: no ITC, no alpha.
    alpha_ramp_epochs: int | None
    #: HF-layout task models a checkpoint of this task exports to; the first ``default_exports`` by default.
    export_tasks: tuple[str, ...]
    default_exports: int = 1
    #: Where the task model's weights sit in the training module's state dict.
    state_prefix: str = ""
    #: ``(args, image size) -> training dataset`` of the task's own annotations; None: the image-text data of
    #: ``--data`` (synthetic, BLIP json captions or webdataset shards).
    dataset: Callable[[argparse.Namespace, int], torch.utils.data.Dataset] | None = None

    @property
    def has_itc_queue(self) -> bool:
        """Whether the task trains ITC against a feature queue (its ``--queue_size`` then applies)."""
        return self.alpha_ramp_epochs is not None

    def exports(self, requested: Sequence[str] | None) -> list[str]:
        """The ``export_tasks`` option resolved: None -> this task's defaults; others must be exportable."""
        if requested is None:
            return list(self.export_tasks[: self.default_exports])
        unsupported = sorted(set(requested) - set(self.export_tasks))
        if unsupported:
            raise InvalidInputError(f"a {self.name} checkpoint exports to {list(self.export_tasks)}, not "
                                    f"{unsupported}")
        return list(requested)


TASKS: dict[str, TrainingTask] = {
    "pretrain": TrainingTask("pretrain", ("loss", "loss_itc", "loss_itm", "loss_lm"), _build_pretrainer,
                             _contrastive_inputs, _plain_collator, alpha_ramp_epochs=2,
                             export_tasks=("captioning", "retrieval", "vqa"), default_exports=2),
    "retrieval": TrainingTask("retrieval", ("loss", "loss_itc", "loss_itm"), _build_retrieval, _contrastive_inputs,
                              _retrieval_collator, alpha_ramp_epochs=1, export_tasks=("retrieval",)),
    "captioning": TrainingTask("captioning", ("loss",), _build_captioner, _caption_inputs, _prompt_collator,
                               alpha_ramp_epochs=None, export_tasks=("captioning",), state_prefix="model."),
    "vqa": TrainingTask("vqa", ("loss",), _build_vqa, _vqa_inputs, _vqa_collator, alpha_ramp_epochs=None,
                        export_tasks=("vqa",), state_prefix="model.", dataset=_vqa_dataset),
    "nlvr": TrainingTask("nlvr", ("loss",), _build_nlvr, _nlvr_inputs, _nlvr_collator, alpha_ramp_epochs=None,
                         export_tasks=("nlvr",), dataset=_nlvr_dataset),
}


# ---------------------------------------------------------------------------------------------------- export
def run_task(output_dir: str | os.PathLike) -> TrainingTask:
    """The task of the run that wrote ``output_dir`` (its resolved config.yaml; runs from before --task: pretrain)."""
    path = Path(output_dir) / options.RESOLVED_CONFIG_FILE
    name = options.read_yaml(path).get("task", "pretrain") if path.is_file() else "pretrain"
    if name not in TASKS:
        raise options.ConfigError(f"{path}: unknown task {name!r} (one of {', '.join(TASKS)})")
    return TASKS[name]


def export_checkpoint(checkpoint: str | os.PathLike, targets: dict[str, str | os.PathLike],
                      tag: str | None = None) -> list[str]:
    """Export a training checkpoint (output dir, ``latest`` unless ``tag``, or a ``global_stepN`` dir) as one complete
    HF-layout dir per ``{task: out_dir}``: weights, config.json, tokenizer, preprocessor_config.json."""
    output_dir, tag = checkpointing.resolve_checkpoint(checkpoint, tag)
    task = run_task(output_dir)
    task.exports(list(targets))
    return checkpointing.export(output_dir, targets, tag=tag, state_prefix=task.state_prefix)
