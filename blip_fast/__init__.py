"""blip_fast: a fast, faithful BLIP engine (HuggingFace-compatible classes, original BLIP semantics by default)."""

from blip_fast.config import BlipConfig, TextConfig, VisionConfig
from blip_fast.interop import optimize
from blip_fast.modeling import (
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForNLVR,
    BlipForQuestionAnswering,
    BlipVisionModel,
)

__version__ = "0.1.0"

# Loaded on first use so that `import blip_fast` does not pay for PIL/tokenizers when only the models are needed.
_LAZY = {
    "BlipImageProcessor": "blip_fast.data.transforms",
    "load_image": "blip_fast.data.transforms",
    "BlipTokenizer": "blip_fast.tokenizer",
    "BlipProcessor": "blip_fast.processing",
    "pipeline": "blip_fast.pipelines",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'blip_fast' has no attribute {name!r}")


__all__ = [
    "BlipConfig",
    "BlipForConditionalGeneration",
    "BlipForImageTextRetrieval",
    "BlipForNLVR",
    "BlipForQuestionAnswering",
    "BlipImageProcessor",
    "BlipProcessor",
    "BlipTokenizer",
    "BlipVisionModel",
    "TextConfig",
    "VisionConfig",
    "load_image",
    "optimize",
    "pipeline",
]
