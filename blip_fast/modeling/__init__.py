"""nn.Modules only: no I/O and no tokenizer calls inside forward."""

from blip_fast.modeling.blip import (
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForNLVR,
    BlipForQuestionAnswering,
    BlipPreTrainedModel,
)
from blip_fast.modeling.text import BlipTextLMHeadModel, BlipTextModel, DecoderCache
from blip_fast.modeling.vit import BlipVisionModel

__all__ = [
    "BlipForConditionalGeneration",
    "BlipForImageTextRetrieval",
    "BlipForNLVR",
    "BlipForQuestionAnswering",
    "BlipPreTrainedModel",
    "BlipTextLMHeadModel",
    "BlipTextModel",
    "BlipVisionModel",
    "DecoderCache",
]
