"""``BlipProcessor``: transformers' BLIP processor (image processor + tokenizer behind one call), without transformers.

Model-card code runs unchanged: ``processor = BlipProcessor.from_pretrained("Salesforce/blip-vqa-base")``,
``inputs = processor(raw_image, question, return_tensors="pt").to("cuda", torch.float16)``,
``processor.decode(out[0], skip_special_tokens=True)``. Outputs equal transformers' ``BlipProcessor``: text keys
(``input_ids``, ``attention_mask``; no ``token_type_ids``) before ``pixel_values``, lists without ``return_tensors``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from blip_fast.data.transforms import BlipImageProcessor, ImageInput
from blip_fast.hub import HubOptions, resolve
from blip_fast.tokenizer import BatchFeature, BlipTokenizer

#: Tokenizer keywords a processor call forwards (transformers' BlipProcessor text kwargs).
TEXT_KWARGS = frozenset({
    "padding", "truncation", "max_length", "add_special_tokens", "return_attention_mask", "return_token_type_ids",
})
#: Image keywords a processor call forwards: per-call overrides of the image processor's settings.
IMAGE_KWARGS = frozenset(field.name for field in dataclasses.fields(BlipImageProcessor))


class BlipProcessor:
    """A :class:`BlipImageProcessor` and a :class:`BlipTokenizer` called together, like transformers'."""

    attributes = ("image_processor", "tokenizer")

    def __init__(self, image_processor: BlipImageProcessor, tokenizer: BlipTokenizer) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> BlipProcessor:
        """Load from a directory or hub id (``cache_dir``, ``revision``, ``local_files_only``, ``token``,
        ``force_download``), reading what any transformers version writes: ``preprocessor_config.json`` (4.x, the
        hub repos) or ``processor_config.json`` (5.x), and the tokenizer files. ``alpha_on_white=False`` converts
        transparent images as transformers did before 5.21 (:class:`BlipImageProcessor`)."""
        options = HubOptions.pop_from(kwargs)
        alpha_on_white = kwargs.pop("alpha_on_white", True)
        if kwargs:
            raise TypeError(f"BlipProcessor.from_pretrained got unsupported arguments {sorted(kwargs)}")
        directory = resolve(pretrained_model_name_or_path, options, files="processor")
        return cls(BlipImageProcessor.from_pretrained(directory, alpha_on_white=alpha_on_white),
                   BlipTokenizer.from_pretrained(directory))

    def save_pretrained(self, save_directory: str | os.PathLike) -> list[str]:
        """Write ``preprocessor_config.json`` and the tokenizer files: the layout of the hub's BLIP repos, which
        every transformers version loads. Returns the written paths."""
        return [self.image_processor.save_pretrained(save_directory), *self.tokenizer.save_pretrained(save_directory)]

    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput] | None = None,
        text: str | Sequence[str] | None = None,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Tokenise ``text`` and preprocess ``images`` (either may be None, not both) -> one BatchFeature.

        Keywords go to the tokenizer (``padding``, ``truncation``, ``max_length``, ``add_special_tokens``, ...) or
        override the image processor's settings for this call (``size``, ``do_resize``, ``image_mean``, ...).
        """
        if images is None and text is None:
            raise ValueError("BlipProcessor needs images, text or both")
        unknown = sorted(set(kwargs) - TEXT_KWARGS - IMAGE_KWARGS)
        if unknown:
            raise TypeError(f"BlipProcessor got unsupported arguments {unknown}; text: {sorted(TEXT_KWARGS)}, "
                            f"images: {sorted(IMAGE_KWARGS)}")
        features = BatchFeature()
        if text is not None:
            text_kwargs = {key: value for key, value in kwargs.items() if key in TEXT_KWARGS}
            text_kwargs["return_token_type_ids"] = False  # transformers' BlipProcessor drops them (BLIP has no types)
            features.update(self.tokenizer(text, return_tensors=return_tensors, **text_kwargs))
        if images is not None:
            image_kwargs = {key: value for key, value in kwargs.items() if key in IMAGE_KWARGS}
            image_processor = self.image_processor.with_settings(**image_kwargs)
            features.update(image_processor(images, return_tensors=return_tensors))
        return features

    def decode(self, token_ids: Any, skip_special_tokens: bool = False) -> str | list[str]:
        """Ids ``[L]`` -> text (transformers' default keeps special tokens; pass ``skip_special_tokens=True``);
        ids ``[B, L]`` -> B texts, as transformers 5."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        """Ids ``[B, L]`` -> B texts, as :meth:`decode` row by row."""
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "input_ids", "attention_mask"]

    def __repr__(self) -> str:
        return f"BlipProcessor(image_processor={self.image_processor!r}, tokenizer={self.tokenizer!r})"
