"""ViT: resolution changes vs HuggingFace's interpolation, stochastic depth, activation checkpointing."""

import pytest
import torch

import blip_fast
from blip_fast.config import VisionConfig
from blip_fast.modeling.vit import BlipVisionModel
from tests.tiny_models import assert_close, tiny_hf_model

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("height, width", [(56, 56), (24, 40), (40, 40)])
def test_interpolated_position_encoding_matches_hf(height, width):
    hf_captioner = tiny_hf_model("BlipForConditionalGeneration", image_size=40, patch_size=8)
    model = blip_fast.BlipForConditionalGeneration.from_hf_model(hf_captioner).vision_model
    hf_model = hf_captioner.vision_model
    pixel_values = torch.randn(2, 3, height, width)
    with torch.no_grad():
        expected = hf_model(pixel_values, interpolate_pos_encoding=True)
        actual = model(pixel_values, interpolate_pos_encoding=True)
    assert_close(actual.last_hidden_state, expected.last_hidden_state)
    assert_close(actual.pooler_output, expected.pooler_output)


def test_wrong_resolution_without_interpolation_is_a_clear_error():
    model = BlipVisionModel(VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=32, patch_size=8))
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        model(torch.randn(1, 3, 48, 48))


def _tiny_vit(**overrides):
    config = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=32, patch_size=8, **overrides)
    return BlipVisionModel(config)


def test_drop_path_is_stochastic_in_training_and_off_in_eval():
    model = _tiny_vit(drop_path_rate=0.5)
    pixel_values = torch.randn(8, 3, 32, 32)
    assert [layer.drop_path.drop_prob for layer in model.encoder.layers] == [0.0, 0.25, 0.5]
    model.train()
    first, second = model(pixel_values).last_hidden_state, model(pixel_values).last_hidden_state
    assert not torch.allclose(first, second)
    model.eval()
    assert torch.equal(model(pixel_values).last_hidden_state, model(pixel_values).last_hidden_state)


def test_activation_checkpointing_gives_identical_gradients():
    plain = _tiny_vit()
    checkpointed = _tiny_vit(gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    pixel_values = torch.randn(3, 3, 32, 32)
    for model in (plain, checkpointed):
        model.train()
        model(pixel_values).last_hidden_state.square().mean().backward()
    for (name, p_plain), p_ckpt in zip(plain.named_parameters(), checkpointed.parameters()):
        assert_close(p_ckpt.grad, p_plain.grad, rtol=1e-6), name


@pytest.mark.slow
def test_compiled_inference_vit_equals_eager(monkeypatch):
    """The fast path (torch.compile, static shapes, one graph per batch size) gives the eager ViT's states; here
    Inductor's CPU backend stands in for the GPU one, which gpu_check.sh times. One batch size: each is a compile."""
    from blip_fast.modeling import vit

    monkeypatch.setenv("BLIP_FAST_COMPILE", "1")
    model = _tiny_vit().eval()
    with torch.no_grad():
        pixel_values = torch.randn(2, 3, 32, 32)
        assert_close(vit.vision_states(model, pixel_values), model(pixel_values).last_hidden_state)
    assert not vit._compile_failed


def test_vision_states_is_eager_when_off_or_training(monkeypatch):
    from blip_fast.modeling import vit

    monkeypatch.setenv("BLIP_FAST_COMPILE", "0")
    model = _tiny_vit().eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(vit.vision_states(model, pixel_values), model(pixel_values).last_hidden_state)
    assert not vit.compile_enabled(torch.device("cuda"))
    monkeypatch.delenv("BLIP_FAST_COMPILE")
    assert vit.compile_enabled(torch.device("cuda")) and not vit.compile_enabled(torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layer_norm_keeps_fp32_statistics(dtype):
    """The ViT's LayerNorms in fp16/bf16 normalise with fp32 statistics: the result is the fp32 LayerNorm of the
    same inputs, rounded once (a half-precision mean/variance would be off by many rounding steps on wide rows)."""
    model = _tiny_vit()
    norm = model.encoder.layers[0].layer_norm1
    x = (torch.randn(4, 9, 32) * 3 + 20).to(dtype)  # a large mean: half-precision statistics would cancel badly
    with torch.no_grad():
        exact = torch.nn.functional.layer_norm(x.float(), (32,), norm.weight, norm.bias, norm.eps).to(dtype)
        actual = norm.to(dtype)(x)
    step = torch.finfo(dtype).eps * exact.float().abs().max()
    assert (actual.float() - exact.float()).abs().max() <= step
