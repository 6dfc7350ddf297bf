"""Datasets, samplers, batching and image transforms for BLIP training, evaluation and CapFilt.

Light to import: nothing here imports webdataset (shards are read with `tarfile`).
"""

from blip_fast.data.collate import BlipCollator
from blip_fast.data.datasets import (
    BlipJsonDataset,
    SyntheticDataset,
    WebDatasetShards,
    expand_urls,
    sample_rng,
)
from blip_fast.data.sampler import ResumableSampler
from blip_fast.data.synthetic import Scene, SyntheticNoisyDataset
from blip_fast.data.transforms import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    BlipEvalTransform,
    BlipImageProcessor,
    BlipTrainTransform,
    ImageLoadError,
    load_image,
    load_image_bytes,
)

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "BlipCollator",
    "BlipEvalTransform",
    "BlipImageProcessor",
    "BlipJsonDataset",
    "BlipTrainTransform",
    "ImageLoadError",
    "ResumableSampler",
    "Scene",
    "SyntheticDataset",
    "SyntheticNoisyDataset",
    "WebDatasetShards",
    "expand_urls",
    "load_image",
    "load_image_bytes",
    "sample_rng",
]
