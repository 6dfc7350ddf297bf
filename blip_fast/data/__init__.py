"""Datasets and image transforms for BLIP training, evaluation and CapFilt."""

from blip_fast.data.transforms import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    BlipImageProcessor,
    ImageLoadError,
    load_image,
)

__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "BlipImageProcessor", "ImageLoadError", "load_image"]
