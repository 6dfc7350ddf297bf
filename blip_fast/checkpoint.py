"""Checkpoint I/O: HuggingFace model directories, original Salesforce BLIP ``.pth`` files, HF-layout saves.

The only module that knows parameter names (DESIGN.md §1). The task models' state-dict keys are HuggingFace's,
so an HF directory loads as is and an original checkpoint needs only its ViT keys renamed (text and head keys are
the same in both). Unlike the original loader, nothing is dropped silently: every missing, unexpected or mis-shaped
tensor is reported at once in one :class:`CheckpointError`; training-only state (momentum encoders, queues,
temperature) and components the task does not use are dropped with one log line; only the ``position_ids``
buffers, which hold no learned state, are ignored without a word.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from blip_fast import model_card
from blip_fast.atomic_files import atomic_write, atomic_write_text
from blip_fast.config import BlipConfig, TextConfig, VisionConfig
from blip_fast.errors import MissingFileError, UserError, read_json_object

logger = logging.getLogger("blip_fast")

ModelT = TypeVar("ModelT", bound=nn.Module)


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be loaded as asked: unreadable, of another task, or tensors that do not fit."""


SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_WEIGHTS, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
CONFIG_NAME, GENERATION_CONFIG_NAME = "config.json", "generation_config.json"
# The weights files of an HF model folder: a save removes those an earlier save left (a loader could pick them up
# instead of ours), and a load refuses one named alone (the folder's config.json holds what the file does not).
_HF_WEIGHT_FILES = re.compile(
    r"^(model(-\d{5}-of-\d{5})?\.safetensors|pytorch_model(-\d{5}-of-\d{5})?\.bin)(\.index\.json)?$")

POS_EMBED = "vision_model.embeddings.position_embedding"

#: Original BLIP ViT names -> HuggingFace names (``re.sub`` patterns, applied in order, first match wins).
ORIGINAL_VISION_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", POS_EMBED),
    (r"^visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm([12])\.", r"vision_model.encoder.layers.\1.layer_norm\2."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision_model.encoder.layers.\1.self_attn.qkv."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
    (r"^visual_encoder\.blocks\.(\d+)\.mlp\.(fc[12])\.", r"vision_model.encoder.layers.\1.mlp.\2."),
    (r"^visual_encoder\.norm\.", "vision_model.post_layernorm."),
)
_RENAMES = [(re.compile(pattern), replacement) for pattern, replacement in ORIGINAL_VISION_RENAMES]

# Top-level groups of the original pre-training/fine-tuning models that hold no inference weights.
_TRAINING_ONLY = frozenset({
    "visual_encoder_m", "text_encoder_m", "text_decoder_m", "vision_proj_m", "text_proj_m",
    "image_queue", "text_queue", "idx_queue", "ptr_queue", "queue_ptr", "temp",
})
#: Momentum copy -> online component, in the training modules' (and the original's) names.
MOMENTUM_OF = {"visual_encoder_m": "vision_model", "vision_proj_m": "vision_proj", "text_encoder_m": "text_encoder",
               "text_proj_m": "text_proj"}
_QUEUES = ("image_queue", "text_queue", "idx_queue", "ptr_queue")
# BLIP components; a task model lacking one of them (a captioner has no text_encoder) drops it from the file.
_COMPONENTS = frozenset({"vision_model", "text_encoder", "text_decoder", "vision_proj", "text_proj", "itm_head",
                         "cls_head"})

#: ``blip-fast convert --task`` -> task class name in :mod:`blip_fast.modeling.blip`.
TASKS = {
    "captioning": "BlipForConditionalGeneration",
    "retrieval": "BlipForImageTextRetrieval",
    "vqa": "BlipForQuestionAnswering",
    "nlvr": "BlipForNLVR",
}
#: Checkpoints (:func:`detect_task` names) a task model also starts from, besides its own task's and pre-training's:
#: NLVR2's twin cross-attention is initialised from any single one.
_ALSO_FROM = {"nlvr": ("retrieval",)}
#: Attention heads of BLIP's released widths (ViT-B/BERT-base 768, ViT-L 1024); other widths do not tell.
KNOWN_HEADS = {768: 12, 1024: 16}


def _is_position_ids(key: str) -> bool:
    return key.endswith("embeddings.position_ids")


def _is_grid(*num_positions: int) -> bool:
    """Whether each position table is a class token plus a square patch grid."""
    return all(n > 1 and math.isqrt(n - 1) ** 2 == n - 1 for n in num_positions)


# ---------------------------------------------------------------------------------------------------- reading
def _read_file(path: str) -> dict[str, torch.Tensor]:
    """One weights file as a flat ``{name: tensor}``; never unpickles anything but tensors and containers. The
    format is told by the content (:func:`_file_format`), else by the name."""
    file_format = _file_format(path)
    if file_format == "pickle":
        raise CheckpointError(f"cannot read {path}: {_PLAIN_PICKLE}")
    try:
        if file_format == "safetensors" or (file_format is None and path.endswith(".safetensors")):
            return load_file(path, device="cpu")
        with warnings.catch_warnings():  # torch's note on the pickle protocol would be a second, unasked-for line
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors header, unpickling, zip, truncation, missing shard: all the same to us
        raise CheckpointError(f"cannot read {path}: {_why_unreadable(path, error, file_format)}") from error
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]  # original BLIP: {"model": state_dict, "optimizer": ..., "config": ..., "epoch": ...}
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors, or one under 'model')")
    return dict(obj)


def _read_dir(directory: str, use_safetensors: bool | None = None) -> dict[str, torch.Tensor]:
    """An HF directory's weights: single file or sharded index, safetensors preferred (transformers' order);
    ``use_safetensors`` True/False reads only that format."""
    formats = ((SAFE_WEIGHTS, SAFE_INDEX), (BIN_WEIGHTS, BIN_INDEX))
    if use_safetensors is not None:
        formats = formats[:1] if use_safetensors else formats[1:]
    for single, index in formats:
        if os.path.isfile(os.path.join(directory, single)):
            return _read_file(os.path.join(directory, single))
        index_path = os.path.join(directory, index)
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as handle:
                    shards = sorted(set(json.load(handle)["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
                raise CheckpointError(f"cannot read {index_path}: {type(error).__name__}: {error}") from error
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_read_file(os.path.join(directory, shard)))
            return state
    raise CheckpointError(f"no weights in {directory}: looked for {', '.join(name for pair in formats for name in pair)}")


def _rename_vision(key: str) -> str:
    for pattern, replacement in _RENAMES:
        new_key, count = pattern.subn(replacement, key)
        if count:
            return new_key
    return key


def _rename_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original BLIP names -> ours: the ViT's (online and momentum), and the training state's layout (the
    pre-training model's ``queue_ptr`` is the retrieval model's ``ptr_queue``; ``idx_queue`` ``[1, Q]`` -> ``[Q]``;
    the 0-dim ``temp`` -> ``[1]``)."""
    renamed = {}
    for key, tensor in state.items():
        if key.startswith("visual_encoder_m."):
            key = "visual_encoder_m." + _rename_vision("visual_encoder." + key.removeprefix("visual_encoder_m."))
            key = key.replace("visual_encoder_m.vision_model.", "visual_encoder_m.")
        elif key == "queue_ptr":
            key = "ptr_queue"
        else:
            key = _rename_vision(key)
        if key == "idx_queue" and tensor.ndim == 2:
            tensor = tensor.reshape(-1)
        elif key == "temp" and tensor.ndim == 0:
            tensor = tensor.reshape(1)
        renamed[key] = tensor
    return renamed


def detect_task(state: Mapping[str, torch.Tensor]) -> str:
    """What an original checkpoint (HF key names) was saved for, from the components it holds: ``captioning``
    (decoder), ``retrieval`` (encoder + ITM head), ``vqa`` (encoder + answer decoder), ``nlvr`` (encoder + NLVR2
    ``cls_head``), ``pretrain`` (encoder, decoder and ITM head: any task can be cut from it) or ``unknown``."""
    groups = {key.split(".")[0] for key in state}
    encoder, decoder, itm = "text_encoder" in groups, "text_decoder" in groups, "itm_head" in groups
    if "cls_head" in groups:
        return "nlvr"
    if encoder and decoder and itm:
        return "pretrain"
    if encoder and itm:
        return "retrieval"
    if encoder and decoder:
        return "vqa"
    return "captioning" if decoder else "unknown"


def starts_from(task: str, found: str) -> bool:
    """Whether a ``task`` model can be made from a checkpoint :func:`detect_task` calls ``found``."""
    return found in (task, "pretrain", "unknown", *_ALSO_FROM.get(task, ()))


def _task_of_class(name: str) -> str | None:
    return next((task for task, class_name in TASKS.items() if class_name == name), None)


def _check_task(path: str, model_cls: type, found: str, how: str) -> None:
    """Refuse a checkpoint of another task than ``model_cls``'s: a VQA model's weights fit a captioner, which then
    writes answers as captions. ``found`` is the file's task (``detect_task``'s name), ``how`` how it was told."""
    wanted = _task_of_class(model_cls.__name__)
    if wanted is None or starts_from(wanted, found):
        return
    raise CheckpointError(f"{path} is a {found} model ({how}), not a {wanted} model ({model_cls.__name__}): "
                          f"use a {wanted} checkpoint here")


def check_task(source: str, model_cls: type, state: Mapping[str, torch.Tensor]) -> None:
    """Refuse an original checkpoint's ``state`` (our key names) when its components are another task's than
    ``model_cls``'s (:func:`detect_task`)."""
    _check_task(source, model_cls, detect_task(state), "by its weights")


#: ``transformers`` classes whose checkpoints are no BLIP task model: HF's ``BlipModel`` holds the ITC encoders
#: alone (no captioning decoder, ITM head or answer decoder), the others are one tower or another model family.
_NOT_TASK_MODELS = ("BlipModel", "BlipVisionModel", "BlipTextModel", "BlipTextLMHeadModel", "Blip2", "InstructBlip")


def _check_architecture(directory: str, config_json: Mapping[str, Any], model_cls: type) -> None:
    architectures = config_json.get("architectures") or []
    other = next((name for name in architectures if name.startswith(_NOT_TASK_MODELS)), None)
    wanted = _task_of_class(model_cls.__name__)
    if other is not None and wanted is not None:
        raise CheckpointError(f"{directory} holds a {other} (config.json's architectures), which is not one of BLIP's "
                              f"task models ({', '.join(TASKS.values())}): use a {wanted} checkpoint "
                              f"({model_cls.__name__}) here")
    found = next((task for name in architectures if (task := _task_of_class(name))), None)
    if found is not None and model_cls.__name__ not in architectures:
        _check_task(directory, model_cls, found, f"config.json names {architectures[0]}")


def _heads(width: int, given: int | None, where: str, path: str, guess: bool) -> int:
    if given is not None:
        return given
    if width in KNOWN_HEADS:
        return KNOWN_HEADS[width]
    if not guess:
        raise CheckpointError(
            f"{path}: the {where} is {width} wide; its number of attention heads is not in the weights (only BLIP's "
            f"{' and '.join(map(str, KNOWN_HEADS))} widths are known): pass heads (blip-fast convert --heads "
            "VISION TEXT) or a config (--config config.json or the original med_config.json)"
        )
    if width % 64:
        raise ValueError(f"hidden size {width} is not a multiple of BLIP's 64-d heads")
    logger.warning("%s: the %s is %d wide, not one of BLIP's; assuming 64-d heads (%d)", path, where, width,
                   width // 64)
    return width // 64


def infer_config(
    state: Mapping[str, torch.Tensor], path: str, tokenizer: Any = None,
    heads: tuple[int | None, int | None] = (None, None), guess_heads: bool = True,
) -> BlipConfig:
    """Sizes from tensor shapes (HF key names). Head counts are not in the weights: ``heads`` (vision, text) when
    given, else BLIP's for its 768/1024 widths; other widths are assumed to have 64-d heads with a warning, or
    refused with ``guess_heads=False``. Special-token ids come from ``tokenizer`` when given, else BLIP's
    (bert-base-uncased ids, ``[DEC]``/``[ENC]`` the last two vocabulary entries)."""

    def count_layers(prefix: str) -> int:
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
        return 1 + max((int(m.group(1)) for k in state if (m := pattern.match(k))), default=-1)

    try:
        pos_embed, patch = state[POS_EMBED], state["vision_model.embeddings.patch_embedding.weight"]
        vision_hidden, grid = pos_embed.shape[-1], math.isqrt(pos_embed.shape[-2] - 1)
        vision = VisionConfig(
            hidden_size=vision_hidden,
            intermediate_size=state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=count_layers("vision_model.encoder.layers."),
            num_attention_heads=_heads(vision_hidden, heads[0], "vision transformer", path, guess_heads),
            image_size=grid * patch.shape[-1],
            patch_size=patch.shape[-1],
        )
        text_prefix = "text_encoder." if "text_encoder.embeddings.word_embeddings.weight" in state else "text_decoder.bert."
        vocab_size, text_hidden = state[text_prefix + "embeddings.word_embeddings.weight"].shape
        special = dict(bos_token_id=vocab_size - 2, enc_token_id=vocab_size - 1)
        if tokenizer is not None:
            if len(tokenizer) != vocab_size:
                raise CheckpointError(f"the tokenizer (tokenizer=, blip-fast convert --tokenizer) has {len(tokenizer)} "
                                      f"tokens but {path}'s embeddings {vocab_size} rows: give this model's tokenizer")
            special = dict(
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                enc_token_id=tokenizer.enc_token_id, sep_token_id=tokenizer.sep_token_id,
            )
        text = TextConfig(
            vocab_size=vocab_size,
            hidden_size=text_hidden,
            intermediate_size=state[text_prefix + "encoder.layer.0.intermediate.dense.weight"].shape[0],
            num_hidden_layers=count_layers(text_prefix + "encoder.layer."),
            num_attention_heads=_heads(text_hidden, heads[1], "text transformer", path, guess_heads),
            max_position_embeddings=state[text_prefix + "embeddings.position_embeddings.weight"].shape[0],
            **special,
        )
        proj = state.get("vision_proj.weight")
        return BlipConfig(vision=vision, text=text, image_text_hidden_size=256 if proj is None else proj.shape[0])
    except CheckpointError:
        raise
    except KeyError as error:
        raise CheckpointError(f"cannot infer the model's config from {path}: it has no tensor {error}; is it a BLIP "
                              "checkpoint?") from error
    except ValueError as error:
        raise CheckpointError(f"cannot infer the model's config from {path}: {error}; "
                              f"{_sizes_hint(heads, getattr(error, 'field', None))}") from error


def _sizes_hint(heads: tuple[int | None, int | None], field: str | None) -> str:
    """What fixes sizes that do not fit, named as the keyword and the ``blip-fast convert`` flag that give it."""
    if field == "num_attention_heads" and heads != (None, None):
        return (f"the heads given (heads={heads}: convert's --heads, or --config's med_config.json) must divide the "
                "widths; or pass the model's config (config=, --config)")
    return "pass the model's config (config=, blip-fast convert --config config.json)"


# ---------------------------------------------------------------------------------------------------- fitting
def _fit(model: nn.Module, state: dict[str, torch.Tensor], path: str, resize_pos_embed: bool, strict: bool) -> dict:
    """Check ``state`` against ``model`` and return the dict to load; raise one error listing every problem."""
    expected = {k: v for k, v in model.state_dict().items() if not _is_position_ids(k)}
    tied: dict[str, str] = dict(getattr(model, "_tied_weights_keys", None) or {})
    problems: list[str] = []

    for alias, canonical in tied.items():  # HF's save omits aliases; the original's state_dict has both
        if alias in state:
            value = state.pop(alias)
            if canonical not in state:
                state[canonical] = value
            elif value.shape != state[canonical].shape or not torch.equal(value, state[canonical]):
                problems.append(f"tied: {alias} differs from {canonical}, which the model holds as one tensor")

    model_groups = {key.split(".")[0] for key in expected}
    dropped: dict[str, int] = {}
    for key in list(state):
        group = key.split(".")[0]
        if _is_position_ids(key):
            del state[key]
        elif group not in model_groups and (group in _TRAINING_ONLY or group in _COMPONENTS):
            dropped[group] = dropped.get(group, 0) + 1
            del state[key]
    if dropped:
        groups = ", ".join(f"{group} ({count})" for group, count in sorted(dropped.items()))
        logger.info("%s: dropped what %s does not use (tensors per group): %s", path, type(model).__name__, groups)

    source, target = state.get(POS_EMBED), expected.get(POS_EMBED)
    if resize_pos_embed and source is not None and target is not None and source.shape != target.shape:
        if source.ndim == 3 and source.shape[-1] == target.shape[-1] and _is_grid(source.shape[1], target.shape[1]):
            from blip_fast.modeling.vit import resize_position_embedding

            new_grid = math.isqrt(target.shape[1] - 1)
            state[POS_EMBED] = resize_position_embedding(source, (new_grid, new_grid))
            logger.info("%s: resized position embeddings %s -> %s (bicubic, class token kept)", path,
                        tuple(source.shape), tuple(target.shape))

    missing = sorted(key for key in expected if key not in state and key not in tied)
    unexpected = sorted(key for key in state if key not in expected)
    problems += [
        f"shape: {key} is {list(tensor.shape)} in the file, the model expects {list(expected[key].shape)}"
        for key, tensor in sorted(state.items())
        if key in expected and tensor.shape != expected[key].shape
    ]
    if strict:
        problems += [f"missing: {key}" for key in missing] + [f"unexpected: {key}" for key in unexpected]
    elif missing or unexpected:
        logger.warning("%s: strict=False, %d missing keys keep their initial values (%s), %d unexpected dropped (%s)",
                       path, len(missing), ", ".join(missing), len(unexpected), ", ".join(unexpected))
    if problems:
        count = f"{len(problems)} problem" + "s" * (len(problems) > 1)
        raise CheckpointError(f"{path} does not fit {type(model).__name__} ({count}):\n  " + "\n  ".join(problems))
    for key in unexpected:
        del state[key]
    for alias, canonical in tied.items():  # also fills models whose aliases are separate tensors
        if canonical in state:
            state[alias] = state[canonical]
    return state


def read_original(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """An original Salesforce BLIP ``.pth`` (``{"model": state_dict, ...}`` or a bare state dict) under our names."""
    return _rename_original(_read_file(os.fspath(path)))


def resize_vision_positions(state: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """``interpolate_pos_embed`` of the original, in place in ``state`` for the online and the momentum ViT's
    position tables whose grid differs from ``expected``'s; returns what was resized."""
    from blip_fast.modeling.vit import resize_position_embedding

    resized = []
    for key in (POS_EMBED, "visual_encoder_m.embeddings.position_embedding"):
        old, new = state.get(key), expected.get(key)
        if old is None or new is None or old.shape == new.shape:
            continue
        if old.ndim == 3 and old.shape[-1] == new.shape[-1] and _is_grid(old.shape[1], new.shape[1]):
            grid = math.isqrt(new.shape[1] - 1)
            state[key] = resize_position_embedding(old, (grid, grid))
            resized.append(f"{key} {tuple(old.shape)} -> {tuple(new.shape)}")
    return resized


def load_training_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> dict[str, list[str]]:
    """Load a training checkpoint's tensors (our names: :func:`read_original` for an original ``.pth``) into a
    pre-training or retrieval training module, as the original's ``load_checkpoint`` does but nothing silently.

    Momentum encoders and queues are loaded when the file has them and their shapes agree; momentum encoders it
    lacks start as copies of the online ones (the original's ``copy_params``); queues it lacks, or of another length,
    start fresh; position tables of another resolution are resized bicubically. Components the module does not have
    are dropped. Any other tensor the module needs and the file lacks, or holds in another shape, is an error, all
    of them listed in one :class:`CheckpointError`. Logs one block and returns it: ``{"loaded", "copied", "fresh",
    "dropped", "resized"}`` -> names (top-level groups, with tensor counts).
    """
    expected = {k: v for k, v in model.state_dict().items() if not _is_position_ids(k)}
    state = {k: v for k, v in state.items() if not _is_position_ids(k)}
    report: dict[str, list[str]] = {name: [] for name in ("loaded", "copied", "fresh", "dropped", "resized")}
    report["resized"] = resize_vision_positions(state, expected)

    def group_of(key: str) -> str:
        return key.split(".")[0]

    model_groups = {group_of(key) for key in expected}
    file_groups: dict[str, int] = {}
    for key in state:
        file_groups[group_of(key)] = file_groups.get(group_of(key), 0) + 1
    for group, count in sorted(file_groups.items()):
        if group not in model_groups:
            report["dropped"].append(f"{group} ({count}, not in {type(model).__name__})")
    for queue in _QUEUES:
        if queue in expected and queue in state and state[queue].shape != expected[queue].shape:
            report["dropped"].append(f"{queue} {list(state[queue].shape)} (this run's is {list(expected[queue].shape)})")
            del state[queue]
    # A queue pointer or id queue only means something next to the feature queues it indexes.
    queues_loaded = "image_queue" in state and "text_queue" in state
    for queue in ("idx_queue", "ptr_queue"):
        if not queues_loaded and queue in state:
            del state[queue]

    problems = [f"shape: {key} is {list(state[key].shape)} in the file, the model expects {list(tensor.shape)}"
                for key, tensor in sorted(expected.items()) if key in state and state[key].shape != tensor.shape]
    copied = sorted(group for group in MOMENTUM_OF if group in model_groups and group not in file_groups)
    missing = sorted(key for key in expected if key not in state and group_of(key) not in copied
                     and group_of(key) not in _QUEUES)
    problems += [f"missing: {key}" for key in missing]
    if problems:
        count = f"{len(problems)} problem" + "s" * (len(problems) > 1)
        raise CheckpointError(f"{source} does not fit {type(model).__name__} ({count}):\n  " + "\n  ".join(problems))

    loadable = {key: tensor for key, tensor in state.items() if key in expected}
    model.load_state_dict(loadable, strict=False)
    with torch.no_grad():
        for group in copied:
            getattr(model, group).load_state_dict(getattr(model, MOMENTUM_OF[group]).state_dict())
    loaded_groups = sorted({group_of(key) for key in loadable})
    report["loaded"] = [f"{group} ({sum(group_of(k) == group for k in loadable)})" for group in loaded_groups]
    report["copied"] = [f"{group} <- {MOMENTUM_OF[group]}" for group in copied]
    report["fresh"] = [queue for queue in _QUEUES if queue in expected and queue not in loadable]
    lines = [f"  {name}: {', '.join(items)}" for name, items in report.items() if items]
    logger.info("%s -> %s (tensors per group):\n%s", source, type(model).__name__, "\n".join(lines))
    return report


def read_vision_init(path: str | os.PathLike, vision: VisionConfig) -> dict[str, torch.Tensor]:
    """An image classifier's ViT as BLIP's image encoder, under ``vision_model.`` names: BLIP starts pre-training
    from a ViT trained on ImageNet (the original loads DeiT's weights into its ``visual_encoder``). Reads a timm/DeiT
    state dict (``blocks.N.*``, bare or under ``"model"`` as DeiT ships it), the original's ``visual_encoder.*`` or
    ours / HuggingFace's ``vision_model.*``. What is no ViT weight (the classifier head) is dropped with a log line;
    the position table is resized to ``vision``'s grid; any other misfit is a :class:`CheckpointError` naming it."""
    from blip_fast.modeling.vit import BlipVisionModel

    path = os.fspath(path)
    state, dropped = {}, []
    for key, tensor in _read_file(path).items():
        name = key if key.startswith(("vision_model.", "visual_encoder.")) else f"visual_encoder.{key}"
        name = _rename_vision(name)
        if name.startswith("vision_model."):
            state[name] = tensor
        else:
            dropped.append(key)
    if not state:
        raise CheckpointError(f"{path} holds no ViT weights (timm's blocks.N.*, BLIP's visual_encoder.* or our "
                              "vision_model.*)")
    if dropped:
        logger.info("%s: dropped what is no image-encoder weight: %s", path, ", ".join(sorted(dropped)))
    with torch.device("meta"):
        holder = nn.Module()
        holder.vision_model = BlipVisionModel(vision)
    return _fit(holder, state, path, resize_pos_embed=True, strict=True)


def load_vision_init(trainer: nn.Module, path: str | os.PathLike) -> None:
    """Start a pre-training ``trainer``'s ViT, and its momentum copy, from :func:`read_vision_init`'s weights."""
    state = read_vision_init(path, trainer.config.vision)
    momentum = {"visual_encoder_m." + key.removeprefix("vision_model."): tensor for key, tensor in state.items()}
    trainer.load_state_dict({**state, **momentum}, strict=False)
    logger.info("%s -> %s: the image encoder and its momentum copy (%d tensors each)", path,
                type(trainer).__name__, len(state))


#: The magic number the legacy (non-zip) ``torch.save`` pickles first (0x1950a86a20f9469cfc6c, little-endian).
_LEGACY_TORCH_MAGIC = bytes.fromhex("6cfc9c46f9206aa85019")
_PLAIN_PICKLE = ("it is a plain Python pickle (pickle.dump), not a torch.save checkpoint or a safetensors file; "
                 "blip_fast does not unpickle it, since unpickling can run code from the file; if you trust the file, "
                 "save its tensors with torch.save(state_dict, 'model.pth') or safetensors")


def _file_format(path: str) -> str | None:
    """What ``path`` holds by its first bytes: "safetensors" (an 8-byte header length that fits the file, then a
    JSON object), "torch" (torch.save's zip, or its legacy pickle), "pickle" (a pickle without torch's magic
    number), "empty"; None when unreadable or none of these (the name then decides)."""
    head = _first_bytes(path, 32)
    if head is None:
        return None
    if head == b"":
        return "empty"
    if len(head) > 8 and head[8:9] == b"{":
        header_length = int.from_bytes(head[:8], "little")
        try:
            fits = 8 + header_length <= os.path.getsize(path)
        except OSError:
            fits = False
        if fits:
            return "safetensors"
    if head.startswith(b"PK\x03\x04") or (head.startswith(b"\x80") and _LEGACY_TORCH_MAGIC in head):
        return "torch"
    return "pickle" if head.startswith(b"\x80") else None


def _why_unreadable(path: str, error: Exception, file_format: str | None = None) -> str:
    """One line on why ``path`` did not load. torch's weights-only refusal is a page that suggests unpickling the
    file in full, which blip_fast never does (the file could run code): it is never passed on."""
    if file_format == "empty":
        return "the file is empty"
    if file_format is None and not path.endswith(".safetensors") and _first_bytes(path, 1) is not None:
        return "not a PyTorch checkpoint (torch.save writes a zip archive or a pickle) nor a safetensors file"
    message = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    if isinstance(error, pickle.UnpicklingError) and "weights_only" in message:
        forbidden = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
        if forbidden:
            return (f"it holds Python objects beyond tensors and plain containers ({forbidden.group(1)}), which "
                    "blip_fast does not unpickle (that can run code from the file); if you trust the file, save its "
                    "state dict alone: torch.save(torch.load(PATH, weights_only=False)['model'], 'model.pth')")
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", message)
        return ("it holds pickled data that torch's safe loader refuses"
                f"{f' ({detail.group(1).strip()})' if detail else ''}; blip_fast does not unpickle it in full, since "
                "that can run code from the file")
    first_line = message.strip().split("\n", 1)[0]
    return f"{type(error).__name__}: {first_line}"


def _first_bytes(path: str, count: int) -> bytes | None:
    """The first ``count`` bytes of ``path``, None when it cannot be read (torch's own error then says why)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(count)
    except OSError:
        return None


def _read_generation_settings(path: str) -> dict[str, Any]:
    """The decoding settings of an HF ``generation_config.json`` (num_beams, max_length, top_p, ...), kept to be
    saved again; ``generate`` does not apply them, as transformers' BLIP ``generate`` does not (its text decoder has
    a generation config of its own).

    Token ids are left out (the model's config owns them; HF's BLIP ``generate`` also ends on ``sep_token_id``);
    settings blip_fast does not implement are dropped with a warning (:func:`blip_fast.generate_args.settings_of`).
    """
    if not os.path.isfile(path):
        return {}
    from blip_fast.generate_args import settings_of
    from blip_fast.generation import GenerationSettings

    settings = settings_of(read_json_object(path, CheckpointError), path, strict=False)
    try:  # checked when the model loads, naming the file, not at its first generate()
        GenerationSettings.from_kwargs(**settings)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: {error}") from None
    return settings


# ---------------------------------------------------------------------------------------------------- public API
def load_pretrained(
    model_cls: type[ModelT],
    path: str | os.PathLike,
    torch_dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    strict: bool = True,
    hf_compat: bool | None = None,
    config: BlipConfig | None = None,
    tokenizer: Any = None,
    heads: tuple[int | None, int | None] = (None, None),
    use_safetensors: bool | None = None,
) -> ModelT:
    """Build ``model_cls(config)`` and load an HF model directory or an original BLIP ``.pth`` into it, in eval mode.

    The config comes from ``config.json`` for a directory (``hf_compat=True``) and from the tensor shapes for a
    ``.pth`` (``hf_compat=False``), unless ``config`` is given; ``hf_compat`` overrides either. A ``.pth`` position
    table of another resolution is resized bicubically; in an HF directory that is an error, like any missing,
    unexpected or mis-shaped tensor (``strict=False`` only logs missing and unexpected keys). ``torch_dtype`` casts
    floating tensors (``"auto"``: to the checkpoint's dtype, as transformers), ``device`` moves the model;
    ``use_safetensors`` picks a directory's weight format. The decoding settings of ``generation_config.json`` land in
    ``model.saved_generation_settings`` (saved again, not applied: transformers' BLIP does not). ``config`` may be a
    transformers ``BlipConfig``. ``tokenizer`` supplies the special-token ids when inferring a ``.pth`` config
    whose vocabulary is not BLIP's bert-base-uncased one; ``heads`` (vision, text) its attention heads, which only
    BLIP's 768/1024 widths imply (see :func:`infer_config`; ``convert`` refuses to guess). A checkpoint of another
    task than
    ``model_cls``'s (``config.json``'s architectures, or a ``.pth``'s components) is refused: a VQA model's weights
    would load into a captioner.
    """
    path = os.fspath(path)
    config = None if config is None else BlipConfig.of(config)
    generation_settings: dict[str, Any] = {}
    if os.path.isdir(path):
        config = config or BlipConfig.from_hf(path)
        if os.path.isfile(os.path.join(path, CONFIG_NAME)):
            _check_architecture(path, read_json_object(os.path.join(path, CONFIG_NAME), CheckpointError),
                                model_cls)
        state = _read_dir(path, use_safetensors)
        generation_settings = _read_generation_settings(os.path.join(path, GENERATION_CONFIG_NAME))
    elif os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        if _HF_WEIGHT_FILES.match(os.path.basename(path)) and os.path.isfile(os.path.join(folder, CONFIG_NAME)):
            raise CheckpointError(f"{path} is the weights file of the model folder {folder}, whose {CONFIG_NAME} holds "
                                  f"what the file alone does not (attention heads, token ids): pass {folder}")
        state = _rename_original(_read_file(path))
        check_task(path, model_cls, state)
        config = config or infer_config(state, path, tokenizer, heads)
    else:
        raise MissingFileError(f"no checkpoint at {path}")
    if hf_compat is not None:
        config = config.replace(hf_compat=hf_compat)

    model = model_from_state_dict(
        model_cls, state, config, source=path, strict=strict, resize_pos_embed=not os.path.isdir(path)
    )
    model.saved_generation_settings = generation_settings
    if torch_dtype == "auto":
        from blip_fast.loading import checkpoint_dtype

        torch_dtype = checkpoint_dtype(path if os.path.isdir(path) else None, state)
    if torch_dtype is not None:
        model.to(dtype=torch_dtype)
    if device is not None:
        model.to(device)
    return model.eval()


def model_from_state_dict(
    model_cls: type[ModelT],
    state: Mapping[str, torch.Tensor],
    config: BlipConfig,
    source: str = "state dict",
    strict: bool = True,
    resize_pos_embed: bool = False,
) -> ModelT:
    """``model_cls(config)`` holding ``state`` (HF key names; training-only state and unused components dropped),
    with the same checks as :func:`load_pretrained`; ``source`` names the origin in messages. The model's
    ``freshly_initialised`` names the modules the checkpoint did not hold (an NLVR2 model's head and merge layers when
    it starts from a single cross-attention, as the original's fine-tuning does), which inference must not run."""
    twin = model_cls.__name__ == "BlipForNLVR" and not any(".crossattention.self0." in key for key in state)
    model = _empty_model(model_cls, config) if strict and not twin else model_cls(config)
    fresh: tuple[str, ...] = ()
    if twin:
        state, fresh = _twin_from_single(state, model, source)
    state = _fit(model, dict(state), source, resize_pos_embed=resize_pos_embed, strict=strict)
    model.load_state_dict(state, strict=False)  # _fit has already checked every key and shape
    model.freshly_initialised = fresh
    return model.eval()


def _twin_from_single(state: Mapping[str, torch.Tensor], model: nn.Module,
                      source: str) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """NLVR2 from a checkpoint with one cross-attention per layer (pre-training, retrieval), as the original's NLVR
    loader: it initialises both of the pair's (``self`` -> ``self0``/``self1``, ``output.dense`` ->
    ``dense0``/``dense1``); the merge layers and a missing classifier head keep the model's fresh initialisation."""
    twin: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if ".crossattention.self." in key:
            for copy in ("self0", "self1"):
                twin[key.replace(".crossattention.self.", f".crossattention.{copy}.")] = tensor
        elif ".crossattention.output.dense." in key:
            for copy in ("dense0", "dense1"):
                twin[key.replace(".output.dense.", f".output.{copy}.")] = tensor
        else:
            twin[key] = tensor
    fresh = {key: value for key, value in model.state_dict().items()
             if ".merge_layer." in key or (key.startswith("cls_head.") and key not in state)}
    merges = len({key.rsplit(".", 1)[0] for key in fresh if ".merge_layer." in key})
    modules = (*sorted({key.split(".")[0] for key in fresh if key.startswith("cls_head.")}),
               *([f"{merges} cross-attention merge_layer{'s' * (merges > 1)}"] if merges else []))
    logger.info("%s: twin cross-attention initialised from the single one; freshly initialised: %s", source,
                ", ".join(modules) or "nothing")
    return {**twin, **fresh}, modules


def _empty_model(model_cls: type[ModelT], config: BlipConfig) -> ModelT:
    """The model with uninitialised storage: a strict load overwrites every tensor, so random init is wasted work."""
    with torch.device("meta"):
        model = model_cls(config)
    model.to_empty(device="cpu")
    model.tie_weights()
    return model


def _write_json(target: str, data: dict[str, Any]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")

    atomic_write(target, write)


def state_dict_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an HF-layout save holds: tied aliases left out (as transformers 5 writes them), contiguous,
    CPU, and no two sharing memory (safetensors refuses shared storage)."""
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    out: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for key, tensor in model.state_dict().items():
        if key in tied or _is_position_ids(key):
            continue
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen_storages:
            tensor = tensor.clone()
        seen_storages.add(storage)
        out[key] = tensor
    return out


def save_pretrained(model: nn.Module, out_dir: str | os.PathLike, safe_serialization: bool = True) -> str:
    """Write an HF-layout directory (``config.json``, ``model.safetensors`` or ``pytorch_model.bin``,
    ``generation_config.json`` when ``model.saved_generation_settings`` is set, and for a model whose outputs transformers
    would not reproduce as is, a README.md model card saying how) that ``transformers`` loads unchanged.

    Each file is written to a temp file and renamed; weight files an earlier save left (other format, shards) are
    removed afterwards so no loader picks them up. Returns ``out_dir``.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    state = state_dict_to_save(model)
    weights_name = SAFE_WEIGHTS if safe_serialization else BIN_WEIGHTS
    if safe_serialization:
        atomic_write(os.path.join(out_dir, weights_name), lambda tmp: _save_safetensors(state, tmp, out_dir))
    else:
        atomic_write(os.path.join(out_dir, weights_name), lambda tmp: torch.save(state, tmp))
    hf_config = model.config.to_hf(architecture=type(model).__name__)
    floating = [t.dtype for t in state.values() if t.is_floating_point()]
    if floating:
        hf_config["dtype"] = str(floating[0]).removeprefix("torch.")
    _write_json(os.path.join(out_dir, CONFIG_NAME), hf_config)
    generation_settings = getattr(model, "saved_generation_settings", None)
    if generation_settings:
        _write_json(os.path.join(out_dir, GENERATION_CONFIG_NAME), dict(generation_settings))
    for name in os.listdir(out_dir):
        if name != weights_name and _HF_WEIGHT_FILES.match(name):
            os.unlink(os.path.join(out_dir, name))
    _write_model_card(out_dir, type(model).__name__, model.config)
    return out_dir


def _save_safetensors(state: dict[str, torch.Tensor], tmp: str, out_dir: str) -> None:
    """``save_file``, whose I/O failures (a full disk, a lost mount) are ``SafetensorError``s: raised as the
    ``OSError`` they are (``errno`` kept), so that callers handle them as any failed write."""
    try:
        save_file(state, tmp, metadata={"format": "pt"})
    except SafetensorError as error:
        message = str(error)
        if "I/O error" not in message and "os error" not in message:
            raise
        code = re.search(r"\(os error (\d+)\)", message)
        if code is None:
            raise OSError(f"cannot write the weights into {out_dir}: {message}") from error
        errno = int(code.group(1))
        raise OSError(errno, f"cannot write the weights into {out_dir}: {os.strerror(errno)}") from error


def _write_model_card(out_dir: str, architecture: str, config: BlipConfig) -> None:
    """README.md's section on using the model in transformers, and a warning when transformers alone would give
    other outputs (:mod:`blip_fast.model_card`)."""
    path = os.path.join(out_dir, "README.md")
    existing = None
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            existing = handle.read()
    card = model_card.merged(existing, architecture, config)
    if card is not None and card != existing:
        atomic_write_text(path, card)
    if (deviation := model_card.deviation(architecture, config)) is not None:
        logger.warning("%s: this %s keeps BLIP's original [ENC]/[DEC] semantics, and transformers loading it as is %s; "
                       "%s shows the transformers call that gives blip_fast's outputs", out_dir, architecture,
                       deviation, path)


def _is_hf_layout(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` has HuggingFace's ViT names and not the original's (the text keys are alike in both)."""
    groups = {key.split(".")[0] for key in state}
    return "vision_model" in groups and "visual_encoder" not in groups


def task_class(task: str) -> type[nn.Module]:
    """The blip_fast model class for a ``convert --task`` name."""
    if task not in TASKS:
        raise CheckpointError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    from blip_fast.modeling import blip

    return getattr(blip, TASKS[task])


def convert_original(
    pth_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    task: str = "auto",
    config: BlipConfig | None = None,
    tokenizer: Any = None,
    heads: tuple[int | None, int | None] = (None, None),
) -> tuple[str, str]:
    """Convert an original Salesforce BLIP ``.pth`` to an HF-layout directory (``blip-fast convert``); returns
    ``(out_dir, task)``.

    ``task`` "auto" writes the checkpoint's own task (:func:`detect_task`); a pre-training checkpoint holds every
    task's parts and needs an explicit ``task`` (a key of :data:`TASKS`), whose unused parts and the training-only
    state are dropped with one log line. A task-specific checkpoint converts to its own task only (and a retrieval
    one also to NLVR2, whose twin cross-attention starts from its single one).
    ``config``/``tokenizer``/``heads`` as in :func:`load_pretrained`. ``out_dir`` must be new or empty: files of an
    earlier model (tokenizer, weights) would otherwise mix with this one.
    """
    pth_path, out_dir = os.fspath(pth_path), os.fspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise CheckpointError(f"{out_dir} is not empty: convert writes a complete model folder, and files already "
                              "there (an earlier tokenizer or weights) would mix with it; choose a new or empty folder")
    if task != "auto":
        task_class(task)
    raw = _read_file(pth_path)
    if _is_hf_layout(raw):
        where = os.path.dirname(pth_path) or "."
        folder = (f"its folder {where}" if os.path.isfile(os.path.join(where, CONFIG_NAME))
                  else "the model folder it came from (with its config.json)")
        raise CheckpointError(f"{pth_path} is already a HuggingFace checkpoint (vision_model.* keys, no original "
                              f"visual_encoder.* ones): convert is for original Salesforce BLIP .pth files; load "
                              f"{folder} directly (blip-fast caption --model FOLDER, from_pretrained(FOLDER))")
    state = _rename_original(raw)
    found = detect_task(state)
    if found == "pretrain" and task == "auto":
        raise CheckpointError(f"{pth_path} is a pre-training checkpoint (text encoder, decoder and ITM head): choose the "
                              f"model to write with --task ({', '.join(TASKS)})")
    if found == "unknown":
        raise CheckpointError(f"{pth_path} holds neither a text encoder nor a text decoder: not a BLIP checkpoint")
    if task != "auto" and not starts_from(task, found):
        raise CheckpointError(f"{pth_path} is a {found} checkpoint, not a {task} one: pass --task {found} "
                              "(or leave --task at auto)")
    task = found if task == "auto" else task
    config = config or infer_config(state, pth_path, tokenizer, heads, guess_heads=False)
    model = model_from_state_dict(task_class(task), state, config, source=pth_path, resize_pos_embed=True)
    return save_pretrained(model, out_dir), task
