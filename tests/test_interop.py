"""blip_fast.optimize: a fast model sharing a transformers instance's parameters."""

import pytest
import torch

import blip_fast
from tests.tiny_models import assert_close, tiny_hf_model

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize(
    "task", ["BlipForConditionalGeneration", "BlipForImageTextRetrieval", "BlipForQuestionAnswering"]
)
def test_optimized_model_shares_every_parameter(task):
    hf_model = tiny_hf_model(task)
    model = blip_fast.optimize(hf_model)
    hf_parameters = dict(hf_model.named_parameters(remove_duplicate=False))
    for name, parameter in model.named_parameters(remove_duplicate=False):
        assert parameter is hf_parameters[name], name
    assert type(model) is getattr(blip_fast, task) and model.config.hf_compat


def test_optimized_captioner_matches_hf_and_follows_its_edits():
    hf_model = tiny_hf_model("BlipForConditionalGeneration")
    model = blip_fast.optimize(hf_model)
    pixel_values = torch.randn(3, 3, 40, 40, generator=torch.Generator().manual_seed(3))
    assert torch.equal(model.generate(pixel_values, num_beams=3), hf_model.generate(pixel_values=pixel_values, num_beams=3))
    with torch.no_grad():
        hf_model.text_decoder.cls.predictions.bias[5] += 3.0  # an edit through HF is seen by blip_fast
        input_ids = torch.randint(6, 90, (3, 7))
        assert_close(model(pixel_values, input_ids).logits, hf_model(pixel_values=pixel_values, input_ids=input_ids).logits)
    assert torch.equal(model.generate(pixel_values), hf_model.generate(pixel_values=pixel_values))


def test_other_models_are_refused():
    with pytest.raises(TypeError, match="BlipForConditionalGeneration"):
        blip_fast.optimize(torch.nn.Linear(2, 2))
