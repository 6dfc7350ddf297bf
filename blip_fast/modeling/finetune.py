"""BLIP's fine-tuning objectives, built from the pre-training parts.

- Retrieval: ITC with an image-id queue and multi-positive targets, ITM with hard negatives drawn from the local
  batch or, as BLIP's ``negative_all_rank``, from every rank (gathered with gradient).
- Captioning: the LM loss with the prompt ("a picture of ") masked out.
- VQA: the answer LM loss, each answer weighted (VQA v2's soft scores), questions repeated per answer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from blip_fast import distributed, ops
from blip_fast.config import BlipConfig
from blip_fast.modeling.blip import BlipForConditionalGeneration, BlipForQuestionAnswering
from blip_fast.modeling.outputs import ModelOutput
from blip_fast.modeling.pretrain import MomentumContrastiveModel
from blip_fast.modeling.text import decoder_inputs_and_targets


@dataclass
class RetrievalOutput(ModelOutput):
    loss: torch.Tensor
    loss_itc: torch.Tensor
    loss_itm: torch.Tensor


class BlipRetrievalTrainer(MomentumContrastiveModel):
    """Retrieval fine-tuning (COCO/Flickr): ``loss = ITC(multi-positive by image id) + ITM``."""

    def __init__(
        self, config: BlipConfig, queue_size: int = 57600, momentum: float = 0.995, negative_all_rank: bool = False,
        share_cross_kv: bool = True,
    ) -> None:
        super().__init__(config, queue_size, momentum, share_cross_kv)
        self.negative_all_rank = negative_all_rank

    @torch.no_grad()
    def reset_momentum_encoders(self) -> None:
        """Momentum copies = the online weights: the start when fine-tuning a model saved without them (HF dirs)."""
        for online, momentum_model in self._momentum_pairs():
            momentum_model.load_state_dict(online.state_dict())
        self.ema.reset()

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        alpha: float,
        image_ids: torch.Tensor,
    ) -> RetrievalOutput:
        """``image_ids [B]`` identify images: every caption of the same image is a positive and never a negative."""
        # Negatives from online x online similarities, as the original retrieval fine-tuning (pre-training uses the
        # momentum features as columns).
        loss_itc, image_embeds, image_feat, text_feat, _, _ = self.contrastive(
            pixel_values, input_ids, attention_mask, alpha, image_ids, multi_positive=True
        )
        candidates = None
        if self.negative_all_rank and distributed.world_size() > 1:
            columns = dict(
                image_columns=distributed.all_gather_no_grad(image_feat.detach()),
                text_columns=distributed.all_gather_no_grad(text_feat.detach()),
                column_ids=distributed.all_gather_no_grad(image_ids),
            )
            candidates = (
                distributed.all_gather_with_grad(image_embeds),
                distributed.all_gather_no_grad(input_ids),
                distributed.all_gather_no_grad(attention_mask),
            )
        else:
            columns = {}
        negative_texts, negative_images = ops.sample_hard_negatives(
            image_feat, text_feat, self.temp, image_ids, smoothing=0.0, **columns
        )
        loss_itm = self.matching(image_embeds, input_ids, attention_mask, negative_texts, negative_images, candidates)
        return RetrievalOutput(loss=loss_itc + loss_itm, loss_itc=loss_itc, loss_itm=loss_itm)


@dataclass
class LMOutput(ModelOutput):
    loss: torch.Tensor


class BlipCaptionTrainer(torch.nn.Module):
    """Caption fine-tuning of a :class:`BlipForConditionalGeneration`: the prompt's tokens are not predicted."""

    def __init__(self, model: BlipForConditionalGeneration, prompt_length: int, label_smoothing: float = 0.1) -> None:
        super().__init__()
        self.model = model
        self.prompt_length = prompt_length  # [DEC] + prompt tokens, e.g. 4 for "a picture of "
        self.label_smoothing = label_smoothing

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> LMOutput:
        """input_ids ``[B, L]``: tokenized ``prompt + caption`` (``[CLS]`` at 0, replaced by ``[DEC]``)."""
        image_embeds = self.model.vision_model(pixel_values).last_hidden_state
        decoder_ids, targets = decoder_inputs_and_targets(input_ids, attention_mask,
                                                          self.model.config.text.bos_token_id)
        targets[:, : self.prompt_length] = -100
        decoded = self.model.text_decoder(
            decoder_ids, attention_mask, image_embeds, labels=targets, label_smoothing=self.label_smoothing,
            return_logits=False,
        )
        return LMOutput(loss=decoded.loss)

    def export(self, out_dir: str | os.PathLike) -> None:
        self.model.save_pretrained(out_dir)


class BlipVQATrainer(torch.nn.Module):
    """VQA fine-tuning of a :class:`BlipForQuestionAnswering`: ``sum(weight * answer loss) / questions``."""

    def __init__(self, model: BlipForQuestionAnswering, label_smoothing: float = 0.1) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(
        self,
        pixel_values: torch.Tensor,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        answer_ids: torch.Tensor,
        answer_mask: torch.Tensor,
        answer_weights: torch.Tensor,
        answers_per_question: torch.Tensor,
    ) -> LMOutput:
        """Questions ``[B, Lq]`` about images ``[B, 3, H, W]``; answers ``[A, La]`` grouped by question (question b owns
        ``answers_per_question[b]`` consecutive rows), with weights ``[A]``."""
        _, question = self.model.encode_question(question_ids, pixel_values, question_mask, False)
        answer_ids, targets = decoder_inputs_and_targets(answer_ids, answer_mask, self.model.config.text.bos_token_id)
        per_answer = self.model.text_decoder(
            answer_ids,
            answer_mask,
            question.repeat_interleave(answers_per_question, dim=0),
            question_mask.repeat_interleave(answers_per_question, dim=0),
            labels=targets,
            reduction="none",
            label_smoothing=self.label_smoothing,
        ).loss
        return LMOutput(loss=(answer_weights * per_answer).sum() / len(question_ids))

    def export(self, out_dir: str | os.PathLike) -> None:
        self.model.save_pretrained(out_dir)
