"""Model configuration: frozen dataclasses, named presets, and HuggingFace ``config.json`` conversion.

Field names follow HuggingFace's ``BlipVisionConfig``/``BlipTextConfig`` so a conversion is a plain rename-free
copy; the presets carry the original Salesforce BLIP values (DESIGN.md §2), which differ from HuggingFace's class
defaults in three places: vision LayerNorm eps (1e-6 vs 1e-5), text attention heads (12 vs 8) and dropout (0.1 vs 0).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from blip_fast.errors import InvalidInputError, MissingFileError, is_kind, json_type

#: Activations the models know by name (HuggingFace spellings).
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "quick_gelu")

# HuggingFace's class defaults: config.json files omit any field equal to them (``use_diff=True``), so a
# missing key means *this* value, not ours.
_HF_VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=384,
    patch_size=16, hidden_act="gelu", layer_norm_eps=1e-5, attention_dropout=0.0,
)
_HF_TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=8,
    max_position_embeddings=512, hidden_act="gelu", layer_norm_eps=1e-12, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0, bos_token_id=30522, pad_token_id=0, sep_token_id=102, label_smoothing=0.0,
)
_HF_TOP_DEFAULTS: dict[str, Any] = dict(image_text_hidden_size=256)


class InvalidFieldError(ValueError):
    """A config field holds a value the model cannot be built with; ``field`` names it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


@dataclass(frozen=True)
class VisionConfig:
    """ViT image encoder (pre-norm, qkv bias, GELU MLP, final LayerNorm over all tokens)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    #: Stochastic depth rate at the last block (linearly increasing from 0 over the blocks), as in BLIP's ViT.
    drop_path_rate: float = 0.0
    #: Recompute each block in backward (activation checkpointing) while training.
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        _check_fields(self, "vision", _VISION_LIMITS)
        _check_heads("vision", self.hidden_size, self.num_attention_heads)
        _check_activation("vision", self.hidden_act)
        if self.image_size % self.patch_size:
            raise InvalidFieldError("image_size", f"vision image_size {self.image_size} is not a multiple of "
                                    f"patch_size {self.patch_size}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Patch tokens plus the class token: 197 at 224px/16, 577 at 384px/16."""
        return self.grid_size**2 + 1


@dataclass(frozen=True)
class TextConfig:
    """BERT-style mixture-of-encoder-decoder text transformer (no token-type embeddings)."""

    vocab_size: int = 30524
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 512
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0
    #: ``[DEC]``: replaces position 0 for the decoder (it is not prepended).
    bos_token_id: int = 30522
    #: ``[ENC]``: replaces position 0 for image-grounded encoding (ITM, VQA questions).
    enc_token_id: int = 30523
    #: ``[SEP]`` ends a caption: the decoder's end-of-sequence token.
    sep_token_id: int = 102
    #: Label smoothing of the LM head's loss when labels are passed to a task model's forward.
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _check_fields(self, "text", _TEXT_LIMITS)
        _check_heads("text", self.hidden_size, self.num_attention_heads)
        _check_activation("text", self.hidden_act)
        for name in ("pad_token_id", "bos_token_id", "enc_token_id", "sep_token_id"):
            token_id = getattr(self, name)
            if not 0 <= token_id < self.vocab_size:
                raise InvalidFieldError(name, f"text {name}={token_id} is outside the vocabulary (size "
                                        f"{self.vocab_size})")


@dataclass(frozen=True)
class BlipConfig:
    """A whole BLIP model: image encoder, text transformer, and the 256-d contrastive projections."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    #: Width of the ITC projections (``vision_proj``/``text_proj``), 256 in BLIP.
    image_text_hidden_size: int = 256
    #: Reproduce HuggingFace's deviations from the original BLIP exactly: no ``[ENC]`` at position 0 for ITM and
    #: VQA questions, captioning ``forward`` without ``[DEC]``, answers fed as given. Checkpoints loaded from a
    #: HuggingFace directory default to True so that swapping the import changes no output.
    hf_compat: bool = False
    #: HuggingFace's name for the architecture (``config.json``'s ``model_type``; transformers pipelines read it).
    model_type: ClassVar[str] = "blip"

    def __post_init__(self) -> None:
        _check_fields(self, "model", {"image_text_hidden_size": 1})

    # ------------------------------------------------------------------ presets
    @classmethod
    def base(cls, image_size: int = 224, **overrides: Any) -> BlipConfig:
        """ViT-B/16 + BERT-base, as BLIP's pre-training (224px) and fine-tuning (384px) configs."""
        return cls(vision=VisionConfig(image_size=image_size), text=TextConfig(), **overrides)

    @classmethod
    def large(cls, image_size: int = 224, **overrides: Any) -> BlipConfig:
        """ViT-L/16 + BERT-base (the text side of BLIP-large is base-sized; cross-attention reads 1024-d)."""
        vision = VisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            image_size=image_size, drop_path_rate=0.0,
        )
        return cls(vision=vision, text=TextConfig(), **overrides)

    @classmethod
    def tiny(cls, vocab_size: int = 30524, image_size: int = 64, **overrides: Any) -> BlipConfig:
        """A model small enough to train on a 2-core CPU in minutes (the demo and the tests).

        With a trained vocabulary, follow with :meth:`for_tokenizer` to take its special-token ids.
        """
        vision = VisionConfig(
            hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, image_size=image_size,
            patch_size=8,
        )
        text = TextConfig(
            vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=64, bos_token_id=vocab_size - 2, enc_token_id=vocab_size - 1,
        )
        return cls(vision=vision, text=text, image_text_hidden_size=64, **overrides)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> BlipConfig:
        presets = {"base": cls.base, "large": cls.large, "tiny": cls.tiny}
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
        return presets[name](**overrides)

    def replace(self, **changes: Any) -> BlipConfig:
        return dataclasses.replace(self, **changes)

    # transformers' names for the two towers' configs (HF code reads ``model.config.text_config.vocab_size``).
    @property
    def text_config(self) -> TextConfig:
        return self.text

    @property
    def vision_config(self) -> VisionConfig:
        return self.vision

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **hub_options: Any) -> BlipConfig:
        """transformers' ``BlipConfig.from_pretrained``: a model folder, its ``config.json`` or a hub id
        (``cache_dir``, ``revision``, ``local_files_only``, ``token``, ``force_download``)."""
        from blip_fast import hub

        options = hub.HubOptions.pop_from(hub_options)
        if hub_options:
            raise TypeError(f"BlipConfig.from_pretrained() got unsupported arguments {sorted(hub_options)}")
        return cls.from_hf(hub.resolve(name_or_path, options, files="config"))

    @classmethod
    def of(cls, config: Any) -> BlipConfig:
        """``config`` as a :class:`BlipConfig`: itself, or built from a transformers ``BlipConfig``
        (``from_pretrained(..., config=transformers_config)``, as HF code passes it)."""
        if isinstance(config, cls):
            return config
        if callable(getattr(config, "to_dict", None)):
            return cls.from_hf(config.to_dict())
        raise TypeError(f"config must be a blip_fast or transformers BlipConfig, got {type(config).__name__}")

    def for_tokenizer(self, tokenizer: Any) -> BlipConfig:
        """This config with the vocabulary size and special-token ids of ``tokenizer`` (a :class:`BlipTokenizer`)."""
        text = dataclasses.replace(
            self.text,
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            enc_token_id=tokenizer.enc_token_id,
            sep_token_id=tokenizer.sep_token_id,
        )
        return dataclasses.replace(self, text=text)

    # ------------------------------------------------------------------ HuggingFace config.json
    @classmethod
    def from_hf(cls, hf_config: dict[str, Any] | str | os.PathLike) -> BlipConfig:
        """Build from a HuggingFace ``BlipConfig`` dict, a ``config.json`` path, or a model directory.

        Missing keys take HuggingFace's class defaults (not ours), since ``save_pretrained`` omits them. A file (or
        dict) the model cannot be built from is an :class:`InvalidInputError` naming it and the key.
        """
        where = "config.json"
        if not isinstance(hf_config, dict):
            where = _config_json_path(hf_config)
            hf_config = _read_config_json(hf_config)
        if not isinstance(hf_config, dict):
            raise InvalidInputError(f"{where} holds a JSON {json_type(hf_config)}, not an object: not a model's "
                                    "config.json")
        if hf_config.get("model_type", cls.model_type) != cls.model_type:
            raise InvalidInputError(f"{where} has model_type {hf_config.get('model_type')!r}, not 'blip': no BLIP "
                                    "model (BlipForConditionalGeneration, BlipForImageTextRetrieval or "
                                    "BlipForQuestionAnswering)")
        architectures = hf_config.get("architectures")
        if architectures is not None and not (
                isinstance(architectures, list) and all(isinstance(name, str) for name in architectures)):
            raise InvalidInputError(f"{where}: architectures must be a list of class names, got "
                                    f"{json.dumps(architectures)[:80]}")
        vision_src = {**_HF_VISION_DEFAULTS, **_section(hf_config, "vision_config", where)}
        text_src = {**_HF_TEXT_DEFAULTS, **_section(hf_config, "text_config", where)}
        vision = _from_file(VisionConfig, {name: vision_src[name] for name in _HF_VISION_DEFAULTS}, where,
                            "vision_config.")
        text_fields = {name: text_src[name] for name in _HF_TEXT_DEFAULTS}
        # HuggingFace has no [ENC] field; BLIP's tokenizer puts it right after [DEC].
        text_fields["enc_token_id"] = text_src.get("enc_token_id", _next_id(text_fields["bos_token_id"]))
        text = _from_file(TextConfig, text_fields, where, "text_config.")
        top = dict(
            image_text_hidden_size=hf_config.get("image_text_hidden_size", _HF_TOP_DEFAULTS["image_text_hidden_size"]),
            hf_compat=hf_config.get("blip_fast_hf_compat", True),
        )
        return _from_file(cls, {"vision": vision, "text": text, **top}, where, "")

    def to_hf(self, architecture: str | None = None) -> dict[str, Any]:
        """A ``config.json`` dict that ``transformers.BlipConfig`` (and :meth:`from_hf`) load back exactly."""
        vision = {name: getattr(self.vision, name) for name in _HF_VISION_DEFAULTS}
        text = {name: getattr(self.text, name) for name in _HF_TEXT_DEFAULTS}
        text.update(
            enc_token_id=self.text.enc_token_id,
            eos_token_id=self.text.sep_token_id,
            encoder_hidden_size=self.vision.hidden_size,
            is_decoder=True,
            tie_word_embeddings=True,
            model_type="blip_text_model",
        )
        vision["model_type"] = "blip_vision_model"
        config: dict[str, Any] = {
            "model_type": self.model_type,
            "image_text_hidden_size": self.image_text_hidden_size,
            "blip_fast_hf_compat": self.hf_compat,
            "tie_word_embeddings": True,
            "text_config": text,
            "vision_config": vision,
        }
        if architecture is not None:
            config["architectures"] = [architecture]
        return config


def _config_json_path(path: str | os.PathLike) -> str:
    """The config.json a model folder (or the file itself) names."""
    path = os.fspath(path)
    return os.path.join(path, "config.json") if os.path.isdir(path) else path


def _read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    folder = os.fspath(path) if os.path.isdir(path) else None
    path = _config_json_path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        inside = _model_folders_inside(folder) if folder is not None else []
        hint = f"; model folders inside it: {', '.join(inside)}" if inside else ""
        raise MissingFileError(f"no config.json at {path}{hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidInputError(f"{path} is not valid JSON: {error}") from None


def _model_folders_inside(folder: str, depth: int = 2, limit: int = 3, scanned: int = 100) -> list[str]:
    """Up to ``limit`` folders within ``depth`` levels below ``folder`` that hold a config.json, in name order: a
    training run's folder keeps its models in ``export/<task>``, and users pass the run's folder. At most
    ``scanned`` folders are read per level (a dataset's thousands of folders are not walked for a hint)."""
    found, level = [], [folder]
    for _ in range(depth):
        level = sorted(os.path.join(parent, name) for parent in level for name in _subfolders(parent))[:scanned]
        found += [child for child in level if os.path.isfile(os.path.join(child, "config.json"))]
    return sorted(found)[:limit]


def _subfolders(folder: str) -> list[str]:
    try:
        return [entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith(".")]
    except OSError:
        return []


def _section(hf_config: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    """``hf_config[key]``, a JSON object (missing or null: HuggingFace's defaults)."""
    values = hf_config.get(key)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise InvalidInputError(f"{where}: {key} must be a JSON object, got a {json_type(values)}: "
                                f"{json.dumps(values)[:80]}")
    return values


def _next_id(token_id: Any) -> Any:
    """The id after ``token_id`` ([ENC] after [DEC]); a value of another type is left for the field check."""
    return token_id + 1 if is_kind(token_id, int) else token_id


def _from_file(cls: type, values: dict[str, Any], where: str, prefix: str) -> Any:
    """``cls(**values)`` with values read from ``where``; a value it refuses is an :class:`InvalidInputError`
    naming the file and the key (``prefix`` + field: ``text_config.num_attention_heads``)."""
    try:
        return cls(**values)
    except InvalidFieldError as error:
        key = "blip_fast_hf_compat" if error.field == "hf_compat" else prefix + error.field
        raise InvalidInputError(f"{where}: {key}: {error}") from None


# The least value of each integer field (token ids are checked against the vocabulary), and the probability fields.
_VISION_LIMITS = dict(hidden_size=1, intermediate_size=1, num_hidden_layers=0, num_attention_heads=1, image_size=1,
                      patch_size=1)
_TEXT_LIMITS = dict(vocab_size=1, hidden_size=1, intermediate_size=1, num_hidden_layers=0, num_attention_heads=1,
                    max_position_embeddings=1)
_PROBABILITIES = frozenset({"attention_dropout", "drop_path_rate", "hidden_dropout_prob",
                            "attention_probs_dropout_prob", "label_smoothing"})


def _check_fields(config: Any, where: str, minimum: dict[str, int]) -> None:
    """Each field of ``config`` of its annotated type (int, float, str or bool; a bool is no number), integers at
    least ``minimum[name]``, probabilities in [0, 1] and epsilons positive: a string "3" or a null from a
    config.json would otherwise fail later, deep in a tensor op."""
    for spec in dataclasses.fields(config):
        name, value = spec.name, getattr(config, spec.name)
        kind = spec.type if isinstance(spec.type, str) else getattr(spec.type, "__name__", "")
        if kind == "int" and not is_kind(value, int):
            raise InvalidFieldError(name, f"{where} {name} must be an integer, got {value!r}")
        if kind == "float" and not (is_kind(value, int, float) and math.isfinite(value)):
            raise InvalidFieldError(name, f"{where} {name} must be a finite number, got {value!r}")
        if kind in ("str", "bool") and type(value).__name__ != kind:
            wanted = "a string" if kind == "str" else "True or False"
            raise InvalidFieldError(name, f"{where} {name} must be {wanted}, got {value!r}")
        if name in minimum and value < minimum[name]:
            raise InvalidFieldError(name, f"{where} {name} must be >= {minimum[name]}, got {value}")
        if name in _PROBABILITIES and not 0.0 <= value <= 1.0:
            raise InvalidFieldError(name, f"{where} {name} must lie in [0, 1], got {value}")
        if name == "layer_norm_eps" and value <= 0:
            raise InvalidFieldError(name, f"{where} {name} must be > 0, got {value}")


def _check_heads(where: str, hidden_size: int, num_heads: int) -> None:
    if hidden_size % num_heads:
        raise InvalidFieldError("num_attention_heads", f"{where} hidden_size {hidden_size} is not a multiple of "
                                f"num_attention_heads {num_heads}")


def _check_activation(where: str, name: str) -> None:
    if name not in SUPPORTED_ACTIVATIONS:
        raise InvalidFieldError("hidden_act", f"{where} hidden_act {name!r} is not supported; use one of "
                                f"{SUPPORTED_ACTIVATIONS}")
