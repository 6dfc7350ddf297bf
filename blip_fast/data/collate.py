"""Batching for BLIP training: stack images, tokenise captions, drop the samples a dataset could not load."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch

from blip_fast.data.tensor_transforms import EncodedImage
from blip_fast.tokenizer import BlipTokenizer

logger = logging.getLogger("blip_fast")


class BlipCollator:
    """`collate_fn` for the blip_fast datasets: records -> one batch dict, or None when every record was dropped.

    Returns `{"pixel_values": FloatTensor [B, 3, H, W], "input_ids": LongTensor [B, L], "attention_mask":
    LongTensor [B, L], "image_ids": LongTensor [B], "indices": LongTensor [B]}`. Captions are tokenised as
    `[CLS] tokens [SEP]`, truncated to `max_length` tokens (BLIP: 30 in pre-training, 35 for retrieval, 40 for
    captioning) and right-padded with `[PAD]` to the longest row (`padding="longest"`) or to `max_length`
    (`"max_length"`: static shapes). The training loop puts `[ENC]`/`[DEC]` at position 0 itself.

    Records of the GPU input path (``dataset.encoded_images``: an `EncodedImage` per record) give `"images"`, the list
    of them, instead of `"pixel_values"`; `TensorTrainTransform.encoded_batch` turns it into pixels on the device.

    `None` records (samples a dataset skipped at load time) are dropped, so B may be smaller than the sampler's
    batch; `dropped` counts them (in the process that collates: a DataLoader worker when num_workers > 0).
    """

    def __init__(
        self, tokenizer: BlipTokenizer, max_length: int = 35, padding: Literal["longest", "max_length"] = "longest"
    ) -> None:
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        self.tokenizer, self.max_length, self.padding = tokenizer, max_length, padding
        self.dropped = 0

    def __call__(self, records: Sequence[dict[str, Any] | None]) -> dict[str, torch.Tensor] | None:
        kept = [record for record in records if record is not None]
        if len(kept) < len(records):
            self.dropped += len(records) - len(kept)
            logger.debug("BlipCollator: dropped %d unloadable samples (%d so far)", len(records) - len(kept),
                         self.dropped)
        if not kept:
            return None
        text = self.tokenizer([record["caption"] for record in kept], padding=self.padding, truncation=True,
                              max_length=self.max_length, return_tensors="pt")
        images = [record["image"] for record in kept]
        pixels = {"images": images} if isinstance(images[0], EncodedImage) else {
            "pixel_values": torch.stack(images)}  # [B, 3, H, W]
        return {
            **pixels,
            "input_ids": text["input_ids"],  # [B, L]
            "attention_mask": text["attention_mask"],  # [B, L]
            "image_ids": torch.tensor([record["image_id"] for record in kept], dtype=torch.long),  # [B]
            "indices": torch.tensor([record["index"] for record in kept], dtype=torch.long),  # [B]
        }
