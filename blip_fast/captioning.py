"""Captioning as a user runs it: model + image processor + tokenizer + prompt, over files or PIL images."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import PIL.Image
import torch

from blip_fast.data.transforms import BlipImageProcessor
from blip_fast.errors import UserError
from blip_fast.modeling.blip import BlipForConditionalGeneration
from blip_fast.tokenizer import BlipTokenizer


class Captioner:
    """Writes captions continuing ``prompt`` (BLIP's captioners are fine-tuned with "a picture of ")."""

    def __init__(
        self,
        model: BlipForConditionalGeneration,
        processor: BlipImageProcessor,
        tokenizer: BlipTokenizer,
        prompt: str = "a picture of ",
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = tokenizer
        self.prompt_ids = tokenizer([prompt], return_tensors="pt").input_ids  # [1, P + 1]: [CLS] prompt [SEP]

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
        prompt: str = "a picture of ", **hub_kwargs: Any,
    ) -> Captioner:
        """Model, tokenizer and image processor from one HuggingFace-layout directory or hub id (``hub_kwargs``:
        ``cache_dir``, ``revision``, ``local_files_only``, ``token``)."""
        from blip_fast.hub import HubOptions
        from blip_fast.task_models import load_task_model

        model, tokenizer, processor = load_task_model(BlipForConditionalGeneration, directory, device, dtype,
                                                      HubOptions(**hub_kwargs))
        return cls(model, processor, tokenizer, prompt)

    def check_lengths(self, max_length: int, min_length: int = 0) -> None:
        """Refuse, before any image is decoded, lengths (in tokens, [DEC] and prompt included) this model cannot
        produce: past its text positions, no room after the prompt, or a minimum above the maximum."""
        positions = self.model.config.text.max_position_embeddings
        prompt_length = self.prompt_ids.shape[1] - 1  # [DEC] + prompt; its [SEP] is not fed
        if max_length > positions:
            raise UserError(f"max_length {max_length} exceeds the {positions} text positions of this model")
        if max_length <= prompt_length:
            raise UserError(f"max_length {max_length} leaves no room for a caption after the prompt "
                            f"({prompt_length} tokens with [DEC])")
        if min_length > max_length:
            raise UserError(f"min_length {min_length} is above max_length {max_length}")

    def caption(self, images: Sequence[PIL.Image.Image], **generate_kwargs: Any) -> list[str]:
        """One caption per image (the first of ``num_return_sequences``, if more are asked for, per image)."""
        return self.caption_pixels(self.processor(list(images), return_tensors="pt").pixel_values, **generate_kwargs)

    @torch.no_grad()
    def caption_pixels(
        self, pixel_values: torch.Tensor, with_scores: bool = False, **generate_kwargs: Any
    ) -> list[str] | list[tuple[str, float]]:
        """Captions of preprocessed images ``[B, 3, H, W]`` (the prompt stripped; the first of
        ``num_return_sequences`` per image). With ``with_scores``, ``(caption, score)`` pairs: the caption's mean
        log-probability per generated token, ``[SEP]`` included (beam search: its ``sequences_scores``)."""
        model = self.model
        pixel_values = pixel_values.to(model.device, model.dtype)
        prompt = self.prompt_ids.to(model.device).expand(len(pixel_values), -1)
        if not generate_kwargs.get("do_sample"):
            generate_kwargs.pop("generator", None)
        output = model.generate(pixel_values, input_ids=prompt, return_dict_in_generate=True,
                                output_scores=with_scores, **generate_kwargs)
        per_image = output.sequences.shape[0] // len(pixel_values)
        fed = prompt.shape[1] - 1  # [DEC] + prompt (its [SEP] is not fed)
        captions = self.tokenizer.batch_decode(output.sequences[::per_image, fed:], skip_special_tokens=True)
        if not with_scores:
            return captions
        scores = output.sequences_scores
        if scores is None:
            scores = mean_token_log_prob(output.sequences, output.scores, fed, self.model.config.text.sep_token_id)
        return list(zip(captions, scores[::per_image].tolist()))


def mean_token_log_prob(
    sequences: torch.Tensor, step_scores: tuple[torch.Tensor, ...], prompt_length: int, eos_token_id: int
) -> torch.Tensor:
    """Per row of ``sequences [R, P + T]``: the mean log-probability of its generated tokens up to and including
    the first ``eos_token_id`` under the per-step (processed) scores ``T x [R, V]``, i.e. beam search's
    ``sequences_scores`` (length penalty 1) for greedy and sampled rows."""
    generated = sequences[:, prompt_length:]  # [R, T]
    log_probs = torch.stack([step.float().log_softmax(dim=-1) for step in step_scores], dim=1)  # [R, T, V]
    chosen = log_probs.gather(2, generated[:, :, None]).squeeze(2)  # [R, T]
    ended_before = (generated == eos_token_id).int().cumsum(dim=1) - (generated == eos_token_id).int()
    counted = ended_before == 0  # tokens up to and including the first eos
    return (chosen * counted).sum(dim=1) / counted.sum(dim=1)
