"""Output containers with HuggingFace's field names, read as attributes, keys, or tuple positions."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch


class ModelOutput(dict):
    """Like ``transformers.utils.ModelOutput``: a dict of the fields that are not None, in field order, readable as
    ``out.logits``, ``out["logits"]`` and ``out[0]`` (positions skip None fields exactly as HuggingFace does).

    Being a dict matters beyond HuggingFace habits: DeepSpeed ZeRO-3 finds the tensors a forward returns (to hook
    their backward and re-gather parameters) only inside tensors, tuples, lists and dicts, and replaces them in
    place through ``__setitem__``, which keeps the attributes in step.
    """

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                dict.__setitem__(self, f.name, value)

    def __setitem__(self, key: str, value: Any) -> None:
        dict.__setitem__(self, key, value)
        object.__setattr__(self, key, value)

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            return dict.__getitem__(self, key)
        return self.to_tuple()[key]

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self.values())


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
    #: Fields transformers' output lacks: left out of ``return_dict=False``'s tuple, which HF code unpacks.
    blip_fast_only: ClassVar[tuple[str, ...]] = ("logits",)


@dataclass
class BlipImageTextMatchingModelOutput(ModelOutput):
    #: ITM logits [B, 2] (``use_itm_head=True``) or ITC cosine similarities [B_img, B_text].
    itm_score: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None  # [B, N_img, D_vision]
    question_embeds: torch.Tensor | None = None  # [B, L, D_text]


@dataclass
class BlipNLVROutput(ModelOutput):
    #: Cross-entropy against ``labels`` (when given).
    loss: torch.Tensor | None = None
    #: [B, 2] (index 1 = the statement is true of the image pair).
    logits: torch.Tensor | None = None


@dataclass
class GenerateDecoderOnlyOutput(ModelOutput):
    """``generate(..., return_dict_in_generate=True)`` of greedy search and sampling (HuggingFace's fields).

    ``scores``/``logits``: one ``[B * num_return_sequences, V]`` fp32 tensor per generated step, the processed
    scores (``output_scores``) and the raw logits (``output_logits``). blip_fast returns no attentions, hidden
    states or cache; those fields stay None.
    """

    sequences: torch.Tensor  # [B * num_return_sequences, L]
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    cache: Any = None


@dataclass
class GenerateBeamDecoderOnlyOutput(ModelOutput):
    """``generate(..., num_beams>1, return_dict_in_generate=True)`` (HuggingFace's fields).

    ``sequences_scores`` ``[B * num_return_sequences]``: each returned hypothesis' length-penalised log-probability
    (with ``output_scores``); ``scores``/``logits``: one ``[B * num_beams, V]`` tensor per step (processed log-probs,
    raw logits); ``beam_indices`` ``[B * num_return_sequences, L_generated]`` int32: the flat beam each token came
    from, -1 past the hypothesis' end.
    """

    sequences: torch.Tensor  # [B * num_return_sequences, L]
    sequences_scores: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    beam_indices: torch.Tensor | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    cache: Any = None
