"""``blip_fast.optimize(pipe)``: a transformers BLIP pipeline whose model is blip_fast's, sharing the parameters.

A pipeline keeps its own preprocessing and postprocessing and calls ``pipe.model.generate(**inputs, **kwargs)``, so
the optimized pipeline is a shallow copy of ``pipe`` whose ``model`` is :func:`blip_fast.interop.optimize` of the
HuggingFace model. That model answers the calls (``generate`` with HuggingFace's keywords, ``dtype``, ``device``,
``can_generate()``, ``main_input_name``, ``config.model_type``); what a pipeline reads besides, the HuggingFace
model's ``generation_config`` (from which the pipeline derives its defaults, e.g. ``max_new_tokens=256`` unless the
model sets a length) and its modality tags, is carried over as the same objects, so the pipeline decides exactly
what it decided before and every output is unchanged. :func:`pipeline` is the import swap for code that builds
its pipeline: ``from blip_fast import pipeline`` in place of ``from transformers import pipeline``.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from typing import Any

from torch import nn

from blip_fast.modeling import blip

#: The BLIP models a pipeline runs: captioning ("image-to-text" in transformers 4, "image-text-to-text") and VQA
#: ("visual-question-answering" in transformers 4, "image-text-to-text" with the model passed in).
PIPELINE_MODELS = ("BlipForConditionalGeneration", "BlipForQuestionAnswering")
#: What pipelines read from their model besides the calls blip_fast's models answer themselves.
CARRIED_ATTRIBUTES = ("generation_config", "input_modalities", "output_modalities")


def is_pipeline(obj: Any) -> bool:
    """Whether ``obj`` is a transformers pipeline (without importing transformers: one exists only if it is)."""
    base = sys.modules.get("transformers.pipelines.base")
    return base is not None and isinstance(obj, base.Pipeline)


def optimize_pipeline(pipe: Any, optimize_model: Callable[[nn.Module], blip.BlipPreTrainedModel]) -> Any:
    """A copy of the transformers pipeline ``pipe`` running its BLIP model through ``optimize_model(pipe.model)``.

    ``pipe`` itself is left as it was (HuggingFace's model); both hold the same parameter tensors. A pipeline already
    on a blip_fast model is returned as it is.
    """
    model = pipe.model
    if isinstance(model, blip.BlipPreTrainedModel):
        return pipe
    name = type(model).__name__
    if name not in PIPELINE_MODELS or not isinstance(model, nn.Module):
        task = getattr(pipe, "task", None) or "?"
        raise TypeError(
            f"optimize() speeds up transformers pipelines that run {' or '.join(PIPELINE_MODELS)} (tasks "
            f"'image-to-text', 'image-text-to-text', 'visual-question-answering'); this {type(pipe).__name__} "
            f"(task {task!r}) runs a {name}"
            + (": pass the model itself, blip_fast.optimize(pipe.model)" if name == "BlipForImageTextRetrieval" else "")
        )
    _check_loaded_task(pipe, model)
    fast = optimize_model(model)
    for attribute in CARRIED_ATTRIBUTES:
        if hasattr(model, attribute):
            setattr(fast, attribute, getattr(model, attribute))
    optimized = copy.copy(pipe)
    optimized.model = fast
    return optimized


def _check_loaded_task(pipe: Any, model: nn.Module) -> None:
    """Refuse a pipeline that loaded another BLIP task's checkpoint into its model: transformers reports the weights
    it lacks and runs their random values (a retrieval checkpoint's captions come from a random text decoder)."""
    name = type(model).__name__
    loaded = [arch for arch in getattr(model.config, "architectures", None) or [] if arch.startswith("Blip")]
    if loaded and name not in loaded:
        raise TypeError(
            f"this {type(pipe).__name__} loaded a {loaded[0]} checkpoint into a {name}, whose weights it lacks are "
            f"random (transformers' load report lists them): give it a {name} checkpoint"
            + (", or pass model=BlipForQuestionAnswering.from_pretrained(...) and its processor"
               if loaded[0] == "BlipForQuestionAnswering" else "")
        )


def pipeline(*args: Any, **kwargs: Any) -> Any:
    """``transformers.pipeline(*args, **kwargs)`` running on blip_fast's engine (:func:`blip_fast.optimize` of it).

    A pipeline of a model that is not BLIP captioning or VQA, or one that loaded another BLIP task's checkpoint into
    its model, is a ``TypeError`` naming its task and model.
    """
    import transformers

    from blip_fast.interop import optimize_model

    return optimize_pipeline(transformers.pipeline(*args, **kwargs), optimize_model)
