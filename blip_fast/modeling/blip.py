"""BLIP task models with HuggingFace's class names, call signatures, output fields and state-dict keys.

Semantics follow the original BLIP unless ``config.hf_compat`` is set, which reproduces HuggingFace's deviations
exactly (DESIGN.md §2): HuggingFace feeds ``input_ids`` as given where BLIP writes ``[ENC]`` (ITM, VQA question) or
``[DEC]`` (captioning/answer decoder input) over position 0.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from blip_fast import generate_args, generation
from blip_fast.config import BlipConfig
from blip_fast.modeling.common import init_weights
from blip_fast.modeling.outputs import (
    BlipForConditionalGenerationModelOutput,
    BlipImageTextMatchingModelOutput,
    BlipNLVROutput,
    BlipTextVisionModelOutput,
)
from blip_fast.modeling.text import BlipTextLMHeadModel, BlipTextModel
from blip_fast.modeling.vit import BlipVisionModel, vision_states


class BlipPreTrainedModel(nn.Module):
    """Loading, saving and HuggingFace interop shared by the task models."""

    #: alias -> canonical name of parameters that are one tensor (HuggingFace's ``_tied_weights_keys``).
    _tied_weights_keys: dict[str, str] = {}

    def __init__(self, config: BlipConfig) -> None:
        super().__init__()
        self.config = config
        #: blip_fast's defaults under the caller's keyword arguments (``blip_fast.optimize`` sets the installed
        #: transformers' order of sampled beams).
        self.generation_defaults: dict[str, Any] = {}
        #: The decoding settings of the folder's ``generation_config.json``, saved with the model and not applied:
        #: transformers' BLIP ``generate`` ignores them too (its text decoder has a generation config of its own).
        self.saved_generation_settings: dict[str, Any] = {}

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @classmethod
    def can_generate(cls) -> bool:
        """Whether the model has ``generate`` (HuggingFace's question; transformers pipelines ask it)."""
        return hasattr(cls, "generate")

    def tie_weights(self) -> None:
        """Re-share tied parameters (after ``to_empty`` or anything else that replaces Parameter objects)."""
        for module in self.modules():
            if isinstance(module, BlipTextLMHeadModel):
                module.tie_weights()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """Load a HuggingFace directory, a hub id or an original BLIP ``.pth``, with transformers' keywords.

        ``dtype``/``torch_dtype`` (default ``"auto"``: the checkpoint's), ``device_map`` (one device),
        ``cache_dir``/``revision``/``local_files_only``/``token``/``force_download`` for hub ids,
        ``use_safetensors``; ``attn_implementation`` and ``low_cpu_mem_usage`` are accepted (see
        :mod:`blip_fast.loading`), anything else is a ``TypeError``. blip_fast's own: ``device``, ``strict``,
        ``hf_compat``, ``config``, ``tokenizer`` (:func:`blip_fast.checkpoint.load_pretrained`).
        """
        from blip_fast import checkpoint, hub, loading

        options, load = loading.split_kwargs(cls.__name__, kwargs)
        path = hub.resolve(pretrained_model_name_or_path, options, files="model",
                           use_safetensors=load["use_safetensors"])
        return checkpoint.load_pretrained(cls, path, **load)

    def save_pretrained(self, out_dir: str | os.PathLike, safe_serialization: bool = True) -> None:
        """Write an HuggingFace-layout directory (config.json + model.safetensors, or pytorch_model.bin without
        ``safe_serialization``) that transformers loads."""
        from blip_fast import checkpoint

        checkpoint.save_pretrained(self, out_dir, safe_serialization=safe_serialization)

    @classmethod
    def from_hf_model(cls, hf_model: nn.Module):
        """A blip_fast copy of a ``transformers`` Blip* model of the same task (same weights, device, dtype)."""
        config = BlipConfig.from_hf(hf_model.config.to_dict())
        model = cls(config)
        model.load_state_dict(hf_model.state_dict())
        parameter = next(hf_model.parameters())
        return model.to(device=parameter.device, dtype=parameter.dtype).train(hf_model.training)

    def _with_first_token(self, input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
        """BLIP writes ``[ENC]``/``[DEC]`` over position 0; HuggingFace-compat mode keeps the ids as given."""
        if self.config.hf_compat:
            return input_ids
        input_ids = input_ids.clone()
        input_ids[:, 0] = token_id
        return input_ids

    @staticmethod
    def _as_requested(output: Any, return_dict: bool | None) -> Any:
        """transformers' ``return_dict=False``: the output's set fields that transformers also has, as a tuple."""
        if return_dict is not False:
            return output
        return tuple(value for key, value in output.items() if key not in getattr(output, "blip_fast_only", ()))

    def _generation_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """HuggingFace's ``generate`` keywords (``generation_config=`` included) over the model's defaults."""
        return generate_args.resolve(self.generation_defaults, kwargs)


def _ones_mask(states: torch.Tensor) -> torch.Tensor:
    return torch.ones(states.shape[:2], dtype=torch.long, device=states.device)


class BlipForConditionalGeneration(BlipPreTrainedModel):
    """Image captioning: ViT + image-grounded text decoder."""

    main_input_name = "pixel_values"
    _tied_weights_keys = {
        "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias",
        "text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
    }

    def __init__(self, config: BlipConfig) -> None:
        super().__init__(config)
        self.vision_model = BlipVisionModel(config.vision)
        self.text_decoder = BlipTextLMHeadModel(config.text, config.vision.hidden_size)
        self.apply(init_weights)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> BlipForConditionalGenerationModelOutput | tuple:
        """pixel_values ``[B, 3, H, W]``, input_ids ``[B, L]`` -> logits ``[B, L, V]`` (+ LM loss with labels).
        ``token_type_ids`` are accepted and unused, as in transformers: BLIP's text embeddings have no token types."""
        image_embeds = self.vision_model(pixel_values, interpolate_pos_encoding).last_hidden_state
        if input_ids is None:
            raise ValueError("BlipForConditionalGeneration.forward needs input_ids; use generate() to caption")
        input_ids = self._with_first_token(input_ids, self.config.text.bos_token_id)
        decoded = self.text_decoder(input_ids, attention_mask, image_embeds, labels=labels)
        return self._as_requested(BlipForConditionalGenerationModelOutput(
            loss=decoded.loss, logits=decoded.logits, image_embeds=image_embeds, last_hidden_state=image_embeds
        ), return_dict)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        image_embeds: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Caption ``[B, 3, H, W]`` images -> token ids ``[B * num_return_sequences, L]``, starting with ``[DEC]``.

        An optional prompt (``input_ids`` from the tokenizer, e.g. "a picture of ", ending in ``[SEP]``) is kept
        at the start; like HuggingFace, position 0 becomes ``[DEC]`` and the trailing ``[SEP]`` is dropped
        (the caller's tensor is not modified). Keyword arguments are HuggingFace's (:func:`generation.generate`).
        ``image_embeds`` (blip_fast only): the ViT states ``[B, N, D]`` of ``pixel_values``, already computed (CapFilt
        shares a filter's with a captioner of the same vision tower); the ViT is then not run.
        """
        text = self.config.text
        if input_ids is None:
            input_ids = torch.tensor([[text.bos_token_id, text.sep_token_id]], device=pixel_values.device)
            input_ids = input_ids.repeat(pixel_values.shape[0], 1)
        input_ids = torch.as_tensor(input_ids, device=pixel_values.device).clone()
        input_ids[:, 0] = text.bos_token_id
        if attention_mask is not None:
            attention_mask = attention_mask[:, :-1]
        return generation.generate(
            self.text_decoder,
            input_ids[:, :-1],
            attention_mask=attention_mask,
            **(dict(encoder_hidden_states=image_embeds) if image_embeds is not None else
               dict(encoder=self.image_states, encoder_inputs=(pixel_values, interpolate_pos_encoding))),
            eos_token_id=text.sep_token_id,
            pad_token_id=text.pad_token_id,
            **self._generation_kwargs(generate_kwargs),
        )

    def image_states(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """ViT states ``[B, N, D]`` the decoder attends to (compiled on CUDA, inside the static engine's graph)."""
        return vision_states(self.vision_model, pixel_values, interpolate_pos_encoding)


class BlipForImageTextRetrieval(BlipPreTrainedModel):
    """Image-text matching (ITM head over the image-grounded ``[ENC]`` token) and ITC cosine similarity."""

    def __init__(self, config: BlipConfig) -> None:
        super().__init__(config)
        self.vision_model = BlipVisionModel(config.vision)
        self.text_encoder = BlipTextModel(config.text, config.vision.hidden_size, add_pooling_layer=False)
        self.vision_proj = nn.Linear(config.vision.hidden_size, config.image_text_hidden_size)
        self.text_proj = nn.Linear(config.text.hidden_size, config.image_text_hidden_size)
        self.itm_head = nn.Linear(config.text.hidden_size, 2)
        self.apply(init_weights)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        use_itm_head: bool = True,
        attention_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> BlipImageTextMatchingModelOutput | tuple:
        """ITM logits ``[B, 2]`` (index 1 = "matched") for pairs, or ITC cosine ``[B_img, B_text]``
        (``token_type_ids`` unused, as in transformers)."""
        image_embeds = self.vision_model(pixel_values, interpolate_pos_encoding).last_hidden_state
        if use_itm_head:
            text_embeds = self.matching_states(image_embeds, input_ids, attention_mask)
            score = self.itm_head(text_embeds[:, 0])
        else:
            text_embeds = self.text_encoder(input_ids, attention_mask).last_hidden_state
            score = self.image_features(image_embeds) @ self.text_features(text_embeds).t()
        return self._as_requested(BlipImageTextMatchingModelOutput(
            itm_score=score, last_hidden_state=image_embeds, question_embeds=text_embeds
        ), return_dict)

    # The pieces of ``forward``, for callers that reuse one image's states across many texts (retrieval
    # evaluation's ITM rerank, CapFilt's filter): the ViT runs once per image, not once per pair.
    def image_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """L2-normalised ITC image features ``[B, E]`` from ViT states ``[B, N, D]``."""
        return F.normalize(self.vision_proj(image_embeds[:, 0]), dim=-1)

    def text_features(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """L2-normalised ITC text features ``[B, E]`` from unimodal text-encoder states ``[B, L, D]``."""
        return F.normalize(self.text_proj(text_embeds[:, 0]), dim=-1)

    def matching_states(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
        texts_per_image: int = 1,
    ) -> torch.Tensor:
        """Image-grounded text states ``[R, L, D]`` (``[ENC]`` first) of ``texts_per_image`` consecutive rows of
        ``input_ids [R, L]`` per image of ``image_embeds [R / texts_per_image, N, D]``: each image's cross-attention
        K/V are projected once for all its texts (CapFilt scores an image's web and synthetic captions so)."""
        input_ids = self._with_first_token(input_ids, self.config.text.enc_token_id)
        return self.text_encoder(input_ids, attention_mask, image_embeds, _ones_mask(image_embeds),
                                 rows_per_context=texts_per_image).last_hidden_state

    def itm_logits(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
        texts_per_image: int = 1,
    ) -> torch.Tensor:
        """ITM logits ``[R, 2]`` (index 1 = "matched") of the texts of each image (see :meth:`matching_states`)."""
        return self.itm_head(self.matching_states(image_embeds, input_ids, attention_mask, texts_per_image)[:, 0])


class BlipForQuestionAnswering(BlipPreTrainedModel):
    """VQA: ViT, image-grounded question encoder, answer decoder over the question states."""

    _tied_weights_keys = BlipForConditionalGeneration._tied_weights_keys

    def __init__(self, config: BlipConfig) -> None:
        super().__init__(config)
        self.vision_model = BlipVisionModel(config.vision)
        self.text_encoder = BlipTextModel(config.text, config.vision.hidden_size, add_pooling_layer=False)
        self.text_decoder = BlipTextLMHeadModel(config.text, config.vision.hidden_size)
        self.apply(init_weights)

    def encode_question(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None,
        interpolate_pos_encoding: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (image_embeds ``[B, N_img, D]``, question states ``[B, L_q, D]``)."""
        image_embeds = self.vision_model(pixel_values, interpolate_pos_encoding).last_hidden_state
        input_ids = self._with_first_token(input_ids, self.config.text.enc_token_id)
        question = self.text_encoder(input_ids, attention_mask, image_embeds, _ones_mask(image_embeds))
        return image_embeds, question.last_hidden_state

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> BlipTextVisionModelOutput | tuple:
        """Answer loss (with ``labels``, which double as decoder inputs like HuggingFace) and answer logits
        (``token_type_ids`` unused, as in transformers)."""
        if labels is None and decoder_input_ids is None:
            raise ValueError("BlipForQuestionAnswering.forward needs labels (training) or decoder_input_ids")
        image_embeds, question = self.encode_question(input_ids, pixel_values, attention_mask, interpolate_pos_encoding)
        if decoder_input_ids is None:
            decoder_input_ids = labels
        decoder_input_ids = self._with_first_token(decoder_input_ids, self.config.text.bos_token_id)
        answer = self.text_decoder(
            decoder_input_ids, decoder_attention_mask, question, attention_mask, labels=labels
        )
        return self._as_requested(BlipTextVisionModelOutput(
            loss=answer.loss, image_embeds=image_embeds, last_hidden_state=image_embeds, logits=answer.logits
        ), return_dict)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Generate answers ``[B * num_return_sequences, L]`` (starting with ``[DEC]``) to questions ``[B, L_q]``."""
        text = self.config.text
        input_ids = torch.as_tensor(input_ids, device=pixel_values.device)
        bos = torch.full((input_ids.shape[0], 1), text.bos_token_id, dtype=torch.long, device=input_ids.device)
        # Both BLIP and HuggingFace let the decoder see every question position when generating (no context mask).
        return generation.generate(
            self.text_decoder,
            bos,
            encoder=self.question_states,
            encoder_inputs=(input_ids, pixel_values, attention_mask, interpolate_pos_encoding),
            eos_token_id=text.sep_token_id,
            pad_token_id=text.pad_token_id,
            **self._generation_kwargs(generate_kwargs),
        )

    def question_states(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None,
                        interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Image-grounded question states ``[B, L_q, D]`` the answer decoder attends to."""
        return self.encode_question(input_ids, pixel_values, attention_mask, interpolate_pos_encoding)[1]

    @torch.no_grad()
    def rank_answers(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_attention_mask: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        k: int = 128,
        label_smoothing: float = 0.1,
        interpolate_pos_encoding: bool = False,
    ) -> torch.Tensor:
        """BLIP's answer-ranking inference: index ``[B]`` of the best of ``A`` candidate answers per question.

        answer_ids/answer_attention_mask ``[A, L_a]`` are the tokenized candidate list. The ``k`` candidates whose
        first token is most likely are rescored by the full answer loss, which — as in the original, and hence the
        default ``label_smoothing=0.1`` — is the decoder's smoothed training loss.
        """
        _, question = self.encode_question(input_ids, pixel_values, attention_mask, interpolate_pos_encoding)
        if attention_mask is None:
            attention_mask = _ones_mask(question)
        answer_ids = answer_ids.clone()
        answer_ids[:, 0] = self.config.text.bos_token_id
        num_questions, k = question.shape[0], min(k, answer_ids.shape[0])

        start = answer_ids[:1, :1].expand(num_questions, 1)
        first_logits = self.text_decoder(start, None, question, attention_mask).logits[:, 0]  # [B, V]
        first_token_probs = first_logits.softmax(dim=-1).index_select(1, answer_ids[:, 1])  # [B, A]
        topk_ids = first_token_probs.topk(k, dim=1).indices  # [B, k]

        candidates = answer_ids[topk_ids.flatten()]  # [B*k, L_a]
        candidate_mask = answer_attention_mask[topk_ids.flatten()]
        targets = candidates.masked_fill(candidates == self.config.text.pad_token_id, -100)
        answer_loss = self.text_decoder(
            candidates,
            candidate_mask,
            question.repeat_interleave(k, dim=0),
            attention_mask.repeat_interleave(k, dim=0),
            labels=targets,
            reduction="none",
            label_smoothing=label_smoothing,
        ).loss.view(num_questions, k)
        best = (-answer_loss).argmax(dim=1)
        return topk_ids.gather(1, best[:, None]).squeeze(1)


class BlipForNLVR(BlipPreTrainedModel):
    """NLVR2: is a statement true of a pair of images? The original ``blip_nlvr.py``: both images through the ViT,
    the ``[ENC]`` statement through the text encoder with a twin cross-attention in every layer (one per image,
    averaged in layers before :attr:`MERGE_FROM_LAYER`, mixed by a linear layer from it on), and a two-layer ReLU
    head on ``[ENC]``. The state-dict keys are the original's (``crossattention.self0``/``self1``,
    ``output.dense0``/``dense1``/``merge_layer``, ``cls_head``), so ``model_base_nlvr.pth`` loads with the ViT renames.
    """

    #: The original merges the pair with a linear layer in text layers 6 and later, whatever the depth.
    MERGE_FROM_LAYER = 6

    def __init__(self, config: BlipConfig) -> None:
        super().__init__(config)
        width = config.text.hidden_size
        self.vision_model = BlipVisionModel(config.vision)
        self.text_encoder = BlipTextModel(config.text, config.vision.hidden_size,
                                          twin_merge_from=self.MERGE_FROM_LAYER)
        self.cls_head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2))
        self.apply(init_weights)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> BlipNLVROutput:
        """Statements ``input_ids [B, L]`` about image pairs ``pixel_values [B, 2, 3, H, W]`` -> logits ``[B, 2]``
        (+ cross-entropy with ``labels [B]``, 1 = true). One ViT pass over all ``2B`` images."""
        pairs = pixel_values.shape[0]
        image_embeds = self.vision_model(pixel_values.flatten(0, 1)).last_hidden_state.unflatten(0, (pairs, 2))
        images = (image_embeds[:, 0], image_embeds[:, 1])
        masks = (_ones_mask(images[0]), _ones_mask(images[1]))
        input_ids = self._with_first_token(input_ids, self.config.text.enc_token_id)
        states = self.text_encoder(input_ids, attention_mask, images, masks).last_hidden_state
        logits = self.cls_head(states[:, 0])
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return BlipNLVROutput(loss=loss, logits=logits)
