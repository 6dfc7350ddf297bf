"""Output containers with HuggingFace's field names, read as attributes, keys, or tuple positions."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch


class ModelOutput:
    """Like ``transformers.utils.ModelOutput``: ``out.logits``, ``out["logits"]`` and ``out[0]`` all work.

    Integer and tuple access skip fields that are ``None``, exactly as HuggingFace does, so code written against
    HuggingFace outputs (``outputs[0]``) reads the same tensor here.
    """

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(value for value in (getattr(self, f.name) for f in dataclasses.fields(self)) if value is not None)

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]


@dataclass
class VisionModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor  # [B, N_img, D_vision]
    pooler_output: torch.Tensor | None = None  # [B, D_vision]


@dataclass
class TextModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor  # [B, L, D_text]
    pooler_output: torch.Tensor | None = None  # [B, D_text]


@dataclass
class CausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # [B, L, V]


@dataclass
class BlipForConditionalGenerationModelOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # [B, L, V]
    image_embeds: torch.Tensor | None = None  # [B, N_img, D_vision]
    last_hidden_state: torch.Tensor | None = None  # [B, N_img, D_vision]


@dataclass
class BlipTextVisionModelOutput(ModelOutput):
    loss: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None  # [B, N_img, D_vision]
    last_hidden_state: torch.Tensor | None = None  # [B, N_img, D_vision]
    #: Answer-decoder logits [B, L_answer, V] (HuggingFace computes but does not return them).
    logits: torch.Tensor | None = None


@dataclass
class BlipImageTextMatchingModelOutput(ModelOutput):
    #: ITM logits [B, 2] (``use_itm_head=True``) or ITC cosine similarities [B_img, B_text].
    itm_score: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None  # [B, N_img, D_vision]
    question_embeds: torch.Tensor | None = None  # [B, L, D_text]
