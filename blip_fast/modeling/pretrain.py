"""BLIP pre-training: one model, three losses (ITC + ITM + LM), momentum distillation and feature queues.

Module names: the inference components keep HuggingFace's names (``vision_model``, ``text_encoder``,
``text_decoder``, ``vision_proj``, ``text_proj``, ``itm_head``), so a task model is exported by picking keys;
the training-only state keeps the original BLIP names (``visual_encoder_m``, ``text_encoder_m``,
``vision_proj_m``, ``text_proj_m``, ``image_queue``, ``text_queue``, ``idx_queue``, ``ptr_queue``, ``temp``),
which :mod:`blip_fast.checkpoint` knows to drop. Every loss goes through :mod:`blip_fast.ops`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from blip_fast import distributed, ops
from blip_fast.config import BlipConfig
from blip_fast.modeling.common import init_weights
from blip_fast.modeling.momentum import MomentumEMA
from blip_fast.modeling.outputs import ModelOutput
from blip_fast.modeling.text import BlipTextLMHeadModel, BlipTextModel, CrossContext, decoder_inputs_and_targets
from blip_fast.modeling.vit import BlipVisionModel


def queue_misfit(queue_size: int, rank_batch: int, world_size: int) -> str | None:
    """Why an ITC queue of ``queue_size`` cannot take each step's features whole (BLIP enqueues every rank's
    gathered batch at once), or None when it can. Training checks it before building the model."""
    global_batch = rank_batch * world_size
    if queue_size % global_batch:
        return (f"queue_size {queue_size} is not a multiple of the global batch {global_batch} ({rank_batch} per "
                f"rank x {world_size} ranks)")
    return None


@dataclass
class PretrainOutput(ModelOutput):
    loss: torch.Tensor
    loss_itc: torch.Tensor
    loss_itm: torch.Tensor
    loss_lm: torch.Tensor


class ContrastiveStep(NamedTuple):
    """What :meth:`MomentumContrastiveModel.contrastive` computed: the ITC loss and the states ITM reuses."""

    loss_itc: torch.Tensor
    image_embeds: torch.Tensor  # [B, N, Dv] ViT states
    image_feat: torch.Tensor  # [B, D] online ITC features
    text_feat: torch.Tensor
    image_feat_m: torch.Tensor  # [B, D] momentum ITC features of the same batch
    text_feat_m: torch.Tensor


def share_all_but_self_attention(encoder: BlipTextModel, decoder: BlipTextModel) -> None:
    """Make the decoder use the encoder's embeddings, cross-attention and FFN modules (BLIP's parameter sharing);
    only the self-attention blocks (q/k/v, output dense, LayerNorm) stay separate."""
    decoder.embeddings = encoder.embeddings
    for encoder_layer, decoder_layer in zip(encoder.encoder.layer, decoder.encoder.layer, strict=True):
        decoder_layer.crossattention = encoder_layer.crossattention
        decoder_layer.intermediate = encoder_layer.intermediate
        decoder_layer.output = encoder_layer.output


def _normalized_cls(projection: nn.Linear, states: torch.Tensor) -> torch.Tensor:
    """ITC feature: the first token projected to the shared space and L2-normalised, ``[B, D_itc]``."""
    return F.normalize(projection(states[:, 0]), dim=-1)


class MomentumContrastiveModel(nn.Module):
    """What pre-training and retrieval fine-tuning share: ViT, text encoder, ITC projections, ITM head, learnable
    temperature, momentum copies (EMA) and feature queues, plus the ITC and ITM computations."""

    def __init__(self, config: BlipConfig, queue_size: int, momentum: float, share_cross_kv: bool = True) -> None:
        super().__init__()
        self.config = config
        self.queue_size = queue_size
        self.momentum = momentum
        #: Project each image's cross-attention K/V once per step for all its ITM pairs (and the decoder) instead of
        #: once per pair; False is the reference computation (same losses and gradients, more FLOPs).
        self.share_cross_kv = share_cross_kv
        vision_width, text_width = config.vision.hidden_size, config.text.hidden_size
        embed_dim = config.image_text_hidden_size

        self.vision_model = BlipVisionModel(config.vision)
        self.text_encoder = BlipTextModel(config.text, vision_width)
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.itm_head = nn.Linear(text_width, 2)
        # Shape [1], not BLIP's 0-dim: DeepSpeed broadcasts parameters through ``view(torch.uint8)``, which a 0-dim
        # float cannot do. The value broadcasts the same; exports drop it as training-only state.
        self.temp = nn.Parameter(torch.full((1,), 0.07))
        self.apply(init_weights)

        self.visual_encoder_m = BlipVisionModel(config.vision)
        self.vision_proj_m = nn.Linear(vision_width, embed_dim)
        self.text_encoder_m = BlipTextModel(config.text, vision_width)
        self.text_proj_m = nn.Linear(text_width, embed_dim)
        for online, momentum_model in self._momentum_pairs():
            momentum_model.load_state_dict(online.state_dict())
            momentum_model.requires_grad_(False)

        # BLIP's [D, Q] buffers (what checkpoints hold), each column contiguous in memory: the fused ITC kernel reads
        # them as [Q, D] rows in place (queue_columns_contiguous).
        for name in ("image_queue", "text_queue"):
            queue = F.normalize(torch.randn(embed_dim, queue_size), dim=0)
            self.register_buffer(name, queue_columns_contiguous(queue))
        self.register_buffer("idx_queue", torch.full((queue_size,), -100, dtype=torch.long))
        self.register_buffer("ptr_queue", torch.zeros(1, dtype=torch.long))
        self.ema = MomentumEMA(momentum)
        # The EMA runs before the forward, ahead of any hook DeepSpeed registers later (ZeRO-3 fetches weights in
        # its own pre-hooks; the partitions must be updated before that). Equivalent to BLIP's order (EMA after the
        # online forward, before the momentum forward): the online forward neither reads nor changes either side.
        self.register_forward_pre_hook(_momentum_update_hook)
        # Weights loaded from elsewhere make the fp32 masters stale: they are rebuilt from the loaded weights.
        self.register_load_state_dict_post_hook(_reset_ema_hook)

    def _momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [
            (self.vision_model, self.visual_encoder_m),
            (self.vision_proj, self.vision_proj_m),
            (self.text_encoder, self.text_encoder_m),
            (self.text_proj, self.text_proj_m),
        ]

    def momentum_parameters(self) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
        """``(momentum weight name, online weight, momentum weight)`` for every momentum-encoder weight."""
        return [
            (f"{self._module_name(momentum_model)}.{name}", parameter, parameter_m)
            for online, momentum_model in self._momentum_pairs()
            for (name, parameter), parameter_m in zip(online.named_parameters(), momentum_model.parameters(),
                                                      strict=True)
        ]

    def _module_name(self, module: nn.Module) -> str:
        return next(name for name, child in self.named_children() if child is module)

    def momentum_update(self) -> None:
        """EMA of the online weights into the momentum copies, ``m = momentum * m + (1 - momentum) * online``,
        accumulated in fp32 whatever the weights' precision (:mod:`blip_fast.modeling.momentum`)."""
        self.ema.momentum = self.momentum
        self.ema.step(self.momentum_parameters)

    @torch.no_grad()
    def store_queues_as(self, dtype: torch.dtype) -> None:
        """Keep the feature queues in the momentum features' dtype (bf16 under bf16 training, where DeepSpeed leaves
        buffers fp32): the fused ITC reads them in place instead of casting ``2 x Q x D`` values every step. Lossless
        for enqueued entries, which are those features; a no-op once converted. Checkpoints keep the ``[D, Q]``
        shape, and loading copies into the buffers whatever their dtype."""
        for name in ("image_queue", "text_queue"):
            queue = getattr(self, name)
            if queue.dtype != dtype:
                setattr(self, name, queue_columns_contiguous(queue.to(dtype)))

    @torch.no_grad()
    def enqueue(self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor, image_ids: torch.Tensor | None) -> None:
        """Write every rank's momentum features ``[B, D]`` (all-gathered, rank order) at the queue pointer."""
        global_batch = image_feat_m.shape[0] * distributed.world_size()
        if misfit := queue_misfit(self.queue_size, image_feat_m.shape[0], distributed.world_size()):
            raise ValueError(misfit)
        positions = (self.ptr_queue + torch.arange(global_batch, device=self.ptr_queue.device)) % self.queue_size
        self.image_queue[:, positions] = distributed.all_gather_no_grad(image_feat_m).t().to(self.image_queue.dtype)
        self.text_queue[:, positions] = distributed.all_gather_no_grad(text_feat_m).t().to(self.text_queue.dtype)
        if image_ids is not None:
            self.idx_queue[positions] = distributed.all_gather_no_grad(image_ids)
        self.ptr_queue.copy_((self.ptr_queue + global_batch) % self.queue_size)

    def contrastive(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        alpha: float,
        image_ids: torch.Tensor | None,
        multi_positive: bool,
    ) -> ContrastiveStep:
        """Encode, update momentum and queues, and compute ITC; ``multi_positive`` makes every caption of the same
        image a target."""
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image_embeds = self.vision_model(pixel_values).last_hidden_state
        image_feat = _normalized_cls(self.vision_proj, image_embeds)
        text_feat = _normalized_cls(self.text_proj, self.text_encoder(input_ids, attention_mask).last_hidden_state)
        with torch.no_grad():  # the momentum encoders were updated by the forward pre-hook
            image_feat_m = _normalized_cls(self.vision_proj_m, self.visual_encoder_m(pixel_values).last_hidden_state)
            text_states_m = self.text_encoder_m(input_ids, attention_mask).last_hidden_state
            text_feat_m = _normalized_cls(self.text_proj_m, text_states_m)
        positives = dict(image_ids=image_ids, id_queue=self.idx_queue) if multi_positive else {}
        self.store_queues_as(image_feat_m.dtype)
        loss_itc = ops.itc_loss(
            image_feat, text_feat, image_feat_m, text_feat_m, self.image_queue, self.text_queue, self.temp, alpha,
            **positives, enqueue_at=(self.ptr_queue, image_feat_m.shape[0] * distributed.world_size()),
        )
        self.enqueue(image_feat_m, text_feat_m, image_ids)
        return ContrastiveStep(loss_itc, image_embeds, image_feat, text_feat, image_feat_m, text_feat_m)

    def matching(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        negative_texts: torch.Tensor,
        negative_images: torch.Tensor,
        candidates: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        context: CrossContext | None = None,
    ) -> torch.Tensor:
        """ITM cross-entropy over 3B pairs: matched, (negative image, text), (image, negative text).

        Negative indices point into ``candidates = (image_embeds, input_ids, attention_mask)`` gathered across
        ranks, or into the local batch when None. ``[ENC]`` replaces ``[CLS]`` at position 0. ``context``: the local
        images' projected cross-attention K/V when the caller already has it (pre-training shares it with the
        decoder); with ``share_cross_kv`` it is projected here otherwise.
        """
        pool_images, pool_ids, pool_mask = candidates or (image_embeds, input_ids, attention_mask)
        pair_ids = torch.cat([input_ids, input_ids, pool_ids[negative_texts]])
        pair_ids[:, 0] = self.config.text.enc_token_id
        pair_mask = torch.cat([attention_mask, attention_mask, pool_mask[negative_texts]])
        if self.share_cross_kv:
            pair_images = self._pair_context(image_embeds, negative_images, candidates, context)
        else:
            pair_images = torch.cat([image_embeds, pool_images[negative_images], image_embeds])
        pair_states = self.text_encoder(pair_ids, pair_mask, pair_images).last_hidden_state
        labels = torch.zeros(len(pair_ids), dtype=torch.long, device=pair_ids.device)
        labels[: len(input_ids)] = 1
        return F.cross_entropy(self.itm_head(pair_states[:, 0]), labels)

    def _pair_context(
        self,
        image_embeds: torch.Tensor,
        negative_images: torch.Tensor,
        candidates: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
        context: CrossContext | None,
    ) -> CrossContext:
        """The ITM pairs' cross-attention context with each image projected once: the local batch's images, plus,
        when negatives come from other ranks, the drawn negative images (projecting every rank's batch would cost
        more than the B negatives it serves)."""
        local = torch.arange(image_embeds.shape[0], device=image_embeds.device)
        if candidates is not None:
            negatives = candidates[0][negative_images]
            context = self.text_encoder.project_context(torch.cat([image_embeds, negatives]))
            return context.for_rows(torch.cat([local, local + len(local), local]))
        if context is None:
            context = self.text_encoder.project_context(image_embeds)
        return context.for_rows(torch.cat([local, negative_images, local]))

    def export(self, out_dir: str | os.PathLike, task: str = "retrieval") -> str:
        """Write the ``task`` model ("captioning", "retrieval", "vqa") as an HuggingFace-layout directory."""
        return export_state_dict(self.state_dict(), self.config, out_dir, task)


class BlipPretrainer(MomentumContrastiveModel):
    """The pre-training model: ``forward`` returns the three losses and updates the momentum encoders and queues.
    The text decoder shares everything but self-attention with the text encoder.

    ITM hard negatives are drawn as in the original pre-training: from the online features against the batch's
    momentum features (``softmax(sim_i2t[:, :bs]) + 1e-4``), the diagonal excluded. ``negatives_by_image_id``
    (given ``image_ids``) never treats another caption of the same image as a negative, as retrieval fine-tuning
    does: no such ITM negative, and all of them ITC targets. The original pre-training does neither (its web pairs
    have one caption per image; bootstrapped data has two for many images, which matters when the queue holds a
    tenth of the dataset).
    """

    def __init__(
        self,
        config: BlipConfig,
        queue_size: int = 57600,
        momentum: float = 0.995,
        negative_smoothing: float = 1e-4,
        label_smoothing: float = 0.1,
        negatives_by_image_id: bool = False,
        share_cross_kv: bool = True,
    ) -> None:
        super().__init__(config, queue_size, momentum, share_cross_kv)
        self.negative_smoothing = negative_smoothing
        self.negatives_by_image_id = negatives_by_image_id
        self.label_smoothing = label_smoothing
        self.text_decoder = BlipTextLMHeadModel(config.text, config.vision.hidden_size)
        self.text_decoder.apply(init_weights)
        share_all_but_self_attention(self.text_encoder, self.text_decoder.bert)
        self.text_decoder.tie_weights()

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        alpha: float,
        image_ids: torch.Tensor | None = None,
    ) -> PretrainOutput:
        """pixel_values ``[B, 3, H, W]``; input_ids/attention_mask ``[B, L]`` tokenized captions (``[CLS] ... [SEP]``);
        ``alpha`` the momentum-distillation weight; ``image_ids [B]`` (optional) fill the id queue and, with
        ``negatives_by_image_id``, mark captions of the same image, whose pairs are never drawn as ITM negatives."""
        step = self.contrastive(pixel_values, input_ids, attention_mask, alpha, image_ids,
                                multi_positive=self.negatives_by_image_id and image_ids is not None)
        ids = image_ids if self.negatives_by_image_id else None
        negative_texts, negative_images = ops.sample_hard_negatives(
            step.image_feat, step.text_feat, self.temp, ids, self.negative_smoothing,
            image_columns=step.image_feat_m, text_columns=step.text_feat_m, column_ids=ids,
        )
        image_embeds, loss_itc = step.image_embeds, step.loss_itc
        # The decoder's cross-attention is the encoder's (shared): one projection of the images serves both.
        context = self.text_encoder.project_context(image_embeds) if self.share_cross_kv else None
        loss_itm = self.matching(image_embeds, input_ids, attention_mask, negative_texts, negative_images,
                                 context=context)

        # LM: [DEC] replaces [CLS]; padding is not predicted.
        decoder_ids, targets = decoder_inputs_and_targets(input_ids, attention_mask, self.config.text.bos_token_id)
        loss_lm = self.text_decoder(
            decoder_ids, attention_mask, image_embeds if context is None else context, labels=targets,
            label_smoothing=self.label_smoothing, return_logits=False,
        ).loss
        return PretrainOutput(loss=loss_itc + loss_itm + loss_lm, loss_itc=loss_itc, loss_itm=loss_itm, loss_lm=loss_lm)

    def export(self, out_dir: str | os.PathLike, task: str = "captioning") -> str:
        return super().export(out_dir, task)


def queue_columns_contiguous(queue: torch.Tensor) -> torch.Tensor:
    """The same ``[D, Q]`` values stored column by column (strides ``(1, D)``): ``queue.t()`` is then a contiguous
    ``[Q, D]`` view. Module casts and moves (``.to``, ``.cuda``, ``.bfloat16``) preserve the strides; loading a
    state dict copies into them."""
    return queue.t().contiguous().t()


def _momentum_update_hook(module: MomentumContrastiveModel, args: tuple) -> None:
    module.momentum_update()


def _reset_ema_hook(module: MomentumContrastiveModel, incompatible_keys) -> None:
    module.ema.reset()


def export_state_dict(
    state: dict[str, torch.Tensor], config: BlipConfig, out_dir: str | os.PathLike, task: str = "captioning"
) -> str:
    """Export a (consolidated, e.g. ZeRO-3) pre-training state dict as a task model directory."""
    from blip_fast import checkpoint

    model = checkpoint.model_from_state_dict(checkpoint.task_class(task), state, config, source="pre-training state")
    return checkpoint.save_pretrained(model, out_dir)
