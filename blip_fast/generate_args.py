"""HuggingFace's ``generate()`` arguments -> the keyword arguments of the decoding engine.

HuggingFace code steers decoding with keywords and with ``generation_config=`` (a ``transformers.GenerationConfig``
or a dict). Priority is HuggingFace's: keywords > the values set in the passed config > the model's defaults
(``model.generation_defaults``; a folder's ``generation_config.json`` is not among them: transformers' BLIP
``generate`` ignores it) > the global defaults (:class:`~blip_fast.generation.GenerationSettings`). A config
also carries fields that do not steer decoding (metadata, token ids that BLIP's ``generate`` sets itself) and
settings blip_fast does not implement: those are accepted at the value that leaves decoding unchanged, and any
other value is an error naming the field, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from blip_fast.generation import GenerationSettings

logger = logging.getLogger("blip_fast")

#: Config entries that do not steer decoding: metadata, and token ids BLIP's ``generate`` fixes itself
#: (eos = ``[SEP]`` and pad from the model config; the prompt starts with ``[DEC]``).
NOT_SETTINGS = frozenset({
    "transformers_version", "_from_model_config", "_commit_hash", "_original_object_hash",
    "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
})

#: HuggingFace settings blip_fast does not implement, each at its value that changes nothing
#: (HuggingFace's global defaults; a saved config may spell them out).
NEUTRAL_VALUES: dict[str, Any] = {
    "output_attentions": False, "output_hidden_states": False, "typical_p": 1.0, "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0, "encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0, "num_beam_groups": 1,
    "diversity_penalty": 0.0, "remove_invalid_values": False, "renormalize_logits": False, "bad_words_ids": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "exponential_decay_length_penalty": None, "num_assistant_tokens": 20,
    "num_assistant_tokens_schedule": "constant", "assistant_confidence_threshold": 0.4, "assistant_lookbehind": 10,
    "target_lookbehind": 10, "token_healing": False, "is_assistant": False, "disable_compile": False,
    # generate() keywords: an empty LogitsProcessorList / StoppingCriteriaList (a list) adds nothing.
    "logits_processor": [], "stopping_criteria": [],
}

SETTINGS = frozenset(field.name for field in dataclasses.fields(GenerationSettings))


def settings_of(values: Mapping[str, Any], source: str, strict: bool = True) -> dict[str, Any]:
    """The engine settings among ``values`` (a config's fields, or keywords); None values count as unset.

    A field blip_fast does not implement, set to anything but its neutral value, raises ``ValueError`` naming
    ``source`` (``strict``) or is dropped with a warning (a checkpoint's ``generation_config.json``, which
    HuggingFace's BLIP does not apply either).
    """
    settings: dict[str, Any] = {}
    unsupported: list[str] = []
    for key, value in values.items():
        if value is None or key in NOT_SETTINGS:
            continue
        if key in SETTINGS:
            settings[key] = value
        elif key not in NEUTRAL_VALUES or NEUTRAL_VALUES[key] != value:
            unsupported.append(f"{key}={value!r}")
    if unsupported:
        message = f"{source} sets {', '.join(unsupported)}, which blip_fast does not implement"
        if strict:
            raise ValueError(f"{message}; supported: {sorted(SETTINGS)}")
        logger.warning("%s; ignored", message)
    return settings


def config_values(generation_config: Any) -> dict[str, Any]:
    """The fields of a ``transformers.GenerationConfig`` (anything with ``to_dict()``) or of a mapping."""
    if isinstance(generation_config, Mapping):
        return dict(generation_config)
    if callable(getattr(generation_config, "to_dict", None)):
        return generation_config.to_dict()
    raise TypeError(
        f"generation_config must be a transformers.GenerationConfig or a dict, got {type(generation_config).__name__}"
    )


def resolve(defaults: Mapping[str, Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The engine keywords of one ``generate`` call: ``defaults`` (the model's), then ``generation_config=``, then
    the other keywords. Keywords HuggingFace does not know either (``streamer=``, typos) pass through to the
    engine's ``TypeError``."""
    kwargs = dict(kwargs)
    passed = kwargs.pop("generation_config", None)
    from_config = {} if passed is None else settings_of(config_values(passed), "generation_config")
    settings_of({key: kwargs.pop(key) for key in list(kwargs) if key in NEUTRAL_VALUES}, "generate()")
    explicit = {key: value for key, value in kwargs.items() if value is not None}
    return {**defaults, **from_config, **explicit}
