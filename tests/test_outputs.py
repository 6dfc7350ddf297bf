"""ModelOutput: HuggingFace-style access, and dict semantics DeepSpeed ZeRO-3 relies on."""

import torch

from blip_fast.modeling.outputs import BlipForConditionalGenerationModelOutput


def test_fields_read_by_name_key_and_position_skipping_none():
    logits, embeds = torch.ones(1), torch.zeros(2)
    out = BlipForConditionalGenerationModelOutput(logits=logits, image_embeds=embeds)
    assert out.logits is logits and out["logits"] is logits and out[0] is logits and out[1] is embeds
    assert list(out.keys()) == ["logits", "image_embeds"] and out.loss is None
    assert isinstance(out, dict)


def test_in_place_replacement_keeps_attributes_in_step():
    """ZeRO-3 wraps returned tensors with ``output[key] = hooked(output[key])``; attribute reads must see them."""
    out = BlipForConditionalGenerationModelOutput(loss=torch.tensor(1.0))
    replacement = torch.tensor(2.0)
    out["loss"] = replacement
    assert out.loss is replacement and out[0] is replacement
