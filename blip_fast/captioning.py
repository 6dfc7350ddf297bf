"""Captioning as a user runs it: model + image processor + tokenizer + prompt, over files or PIL images."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import PIL.Image
import torch
from tqdm.auto import tqdm

from blip_fast.data.transforms import BlipImageProcessor, ImageLoadError, load_image
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
        prompt: str = "a picture of ",
    ) -> Captioner:
        """Model, tokenizer and (if saved) ``preprocessor_config.json`` from one HuggingFace-layout directory."""
        model = BlipForConditionalGeneration.from_pretrained(directory, torch_dtype=dtype, device=device)
        tokenizer = BlipTokenizer.from_pretrained(directory)
        processor = BlipImageProcessor.for_model_dir(directory, model.config.vision.image_size)
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
        model = self.model
        pixel_values = self.processor(list(images)).pixel_values.to(model.device, model.dtype)
        prompt = self.prompt_ids.to(model.device).expand(len(images), -1)
        generated = model.generate(pixel_values, input_ids=prompt, **generate_kwargs)  # [B*R, L]
        continuation = generated[:, prompt.shape[1] - 1 :]  # drop [DEC] + prompt (its [SEP] is not fed)
        return self.tokenizer.batch_decode(continuation, skip_special_tokens=True)

    def caption_files(
        self, paths: Sequence[str | os.PathLike], batch_size: int = 16, seed: int = 0, **generate_kwargs: Any
    ) -> Iterator[tuple[str, str | None, str | None]]:
        """Yield ``(path, caption, None)`` per readable image and ``(path, None, reason)`` per unreadable one."""
        generator = torch.Generator(device=self.model.device).manual_seed(seed)
        if generate_kwargs.get("do_sample"):
            generate_kwargs = {**generate_kwargs, "generator": generator}
        with tqdm(total=len(paths), unit="img", disable=len(paths) <= batch_size) as progress:
            for start in range(0, len(paths), batch_size):
                batch, images = [], []
                for path in paths[start : start + batch_size]:
                    try:
                        images.append(load_image(path))
                        batch.append(os.fspath(path))
                    except ImageLoadError as error:
                        yield os.fspath(path), None, str(error)
                if images:
                    for path, caption in zip(batch, self.caption(images, **generate_kwargs)):
                        yield path, caption, None
                progress.update(len(paths[start : start + batch_size]))
