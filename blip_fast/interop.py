"""Drop-in acceleration of an existing HuggingFace BLIP instance or pipeline: same parameters, blip_fast's engine."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from blip_fast import pipelines
from blip_fast.config import BlipConfig
from blip_fast.modeling import blip

_TASKS = ("BlipForConditionalGeneration", "BlipForImageTextRetrieval", "BlipForQuestionAnswering")


def optimize(model_or_pipeline: Any) -> Any:
    """blip_fast's engine for a transformers BLIP model (:func:`optimize_model`) or pipeline.

    A pipeline (``pipeline("image-to-text" | "image-text-to-text" | "visual-question-answering", ...)`` on a BLIP
    captioning or VQA model) comes back as a copy whose model is the optimized one: same preprocessing, same
    outputs, blip_fast's decoding (:func:`blip_fast.pipelines.optimize_pipeline`).
    """
    if pipelines.is_pipeline(model_or_pipeline):
        return pipelines.optimize_pipeline(model_or_pipeline, optimize_model)
    return optimize_model(model_or_pipeline)


def optimize_model(hf_model: nn.Module) -> blip.BlipPreTrainedModel:
    """The blip_fast model of ``hf_model``'s task, holding *the same* parameter tensors (nothing is copied).

    ``hf_model`` is a ``transformers`` ``BlipForConditionalGeneration``, ``BlipForImageTextRetrieval`` or
    ``BlipForQuestionAnswering``. The two objects stay in step: training or editing either one changes both. Outputs
    follow HuggingFace exactly (``hf_compat``); ``generate`` runs blip_fast's engine with HuggingFace's arguments.
    """
    name = type(hf_model).__name__
    if name not in _TASKS:
        raise TypeError(f"optimize() takes a transformers model of {_TASKS} or a BLIP pipeline, got {name}")
    config = BlipConfig.from_hf(hf_model.config.to_dict()).replace(hf_compat=True)
    with torch.device("meta"):
        model = getattr(blip, name)(config)
    hf_parameters = dict(hf_model.named_parameters(remove_duplicate=False))
    missing = [key for key, _ in model.named_parameters(remove_duplicate=False) if key not in hf_parameters]
    if missing:
        raise ValueError(f"{name} from transformers lacks parameters blip_fast needs: {missing[:5]}")
    for key, _ in list(model.named_parameters(remove_duplicate=False)):
        owner, _, attribute = key.rpartition(".")
        setattr(model.get_submodule(owner), attribute, hf_parameters[key])
    if name != "BlipForImageTextRetrieval":
        import transformers

        # Sampled beams then follow the installed transformers exactly (its candidate order changed in 5.24).
        model.generation_defaults["sort_sampled_beams"] = sorts_sampled_beams(transformers.__version__)
    return model.train(hf_model.training)


def _major_minor(transformers_version: str) -> tuple[int, int]:
    major, minor = (int(part) for part in re.findall(r"\d+", transformers_version)[:2])
    return major, minor


def sorts_sampled_beams(transformers_version: str) -> bool:
    """Whether that transformers version ranks beam sampling's drawn candidates by score before picking the
    ones that may end (5.24 and later) or keeps them in draw order (4.x to 5.23): blip_fast's
    ``sort_sampled_beams`` generate() argument reproducing it."""
    return _major_minor(transformers_version) >= (5, 24)


def composites_alpha(transformers_version: str) -> bool:
    """Whether that transformers version's image processors composite transparent images onto white (5.21 and
    later) or drop the alpha with PIL's ``convert("RGB")`` (4.x to 5.20): blip_fast's ``alpha_on_white``
    (:class:`blip_fast.BlipImageProcessor`) reproducing it."""
    return _major_minor(transformers_version) >= (5, 21)
