"""The optional FP8 ViT (blip_fast/modeling/fp8.py, ops.fp8_linear): off by default, refused without FP8 GEMMs, and
its arithmetic against an independent oracle: rounding to the e4m3 grid enumerated from all 256 bit patterns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blip_fast import ops
from blip_fast.config import BlipConfig
from blip_fast.modeling import fp8
from blip_fast.modeling.vit import BlipVisionModel, vision_states

#: Every finite float8 e4m3fn value, ascending (the bit patterns 0x00-0xFF as floats, NaNs dropped).
GRID = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
GRID = GRID[GRID.isfinite()].unique()


def _round_to_grid(values: torch.Tensor) -> torch.Tensor:
    """Round to the nearest e4m3 value, ties to the even mantissa (the lower bit pattern's last bit 0)."""
    index = torch.searchsorted(GRID, values.contiguous()).clamp(1, len(GRID) - 1)
    low, high = GRID[index - 1], GRID[index]
    pick_high = (values - low > high - values) | ((values - low == high - values) & _odd(low))
    return torch.where(pick_high, high, low)


def _odd(values: torch.Tensor) -> torch.Tensor:
    return (values.to(torch.float8_e4m3fn).view(torch.uint8) & 1).bool()


def _dequantised(tensor: torch.Tensor) -> torch.Tensor:
    scale = tensor.abs().max().double() / 448
    return (_round_to_grid((tensor.double() / scale).clamp(-448, 448).float()).double() * scale).float()


@pytest.mark.parametrize("rows,inner,out", [(1, 16, 16), (7, 48, 33), (33, 96, 80)])
def test_fp8_linear_equals_rounding_to_the_e4m3_grid(rows, inner, out):
    inputs, weight, bias = torch.randn(rows, inner) * 3, torch.randn(out, inner) * 0.05, torch.randn(out)
    inputs[0, 0] = 40.0  # an outlier sets the input's scale
    weight_fp8, weight_scale = ops.fp8_quantize(weight)
    assert weight_fp8.dtype == torch.float8_e4m3fn and weight_fp8.float().abs().max() == 448
    expected = F.linear(_dequantised(inputs), _dequantised(weight), bias)
    actual = ops.fp8_linear(inputs[None], weight_fp8, weight_scale, bias, emulate=True)[0]
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_quantize_maps_the_largest_magnitude_onto_e4m3s_largest_value():
    """Without the clamp, an amax that rounds a hair above 448 after the division casts to NaN."""
    for tensor in (torch.tensor([1e30, -3.0, 0.0]), torch.randn(1000) * 1e-20, torch.tensor([-7.0, 1.0])):
        values, scale = ops.fp8_quantize(tensor)
        assert values.float().isfinite().all() and values.float().abs().max() == 448
        torch.testing.assert_close(scale, tensor.abs().max() / 448)


def _vit() -> BlipVisionModel:
    torch.manual_seed(0)
    return BlipVisionModel(BlipConfig.tiny(image_size=32).vision).eval()


def test_env_flag_is_off_by_default_and_emulate_changes_only_the_encoder_gemms(monkeypatch):
    model, pixels = _vit(), torch.randn(2, 3, 32, 32)
    keys = list(model.state_dict())
    monkeypatch.delenv("BLIP_FAST_VIT_FP8", raising=False)
    with torch.no_grad():
        reference = vision_states(model, pixels)
        assert getattr(model, "fp8_mode", None) is None
        monkeypatch.setenv("BLIP_FAST_VIT_FP8", "emulate")
        emulated = vision_states(model, pixels)
    assert model.fp8_mode == "emulate" and list(model.state_dict()) == keys  # checkpoints unchanged
    relative = (emulated - reference).norm() / reference.norm()
    assert 0 < relative < 0.1, relative  # FP8 rounding: a few percent, never exact
    with torch.enable_grad():  # training and gradients take the ordinary path, exactly
        assert torch.equal(model(pixels).last_hidden_state, reference)


def test_captioning_with_the_env_flag_runs_the_static_engine_on_fp8_states(monkeypatch):
    """generate's image encoder runs inside the static engine (traced on fake tensors for its shape first): the
    flag converts the real ViT once, and the captions are those of the fp32 states rounded through FP8."""
    from blip_fast.modeling.blip import BlipForConditionalGeneration

    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig.tiny(image_size=32)).eval()
    pixels = torch.randn(3, 3, 32, 32)
    monkeypatch.setenv("BLIP_FAST_VIT_FP8", "emulate")
    ids = model.generate(pixels, max_new_tokens=6, min_new_tokens=6)
    assert model.vision_model.fp8_mode == "emulate" and ids.shape == (3, 7)
    with torch.no_grad():
        states = vision_states(model.vision_model, pixels)
    assert torch.equal(model.generate(pixels, image_embeds=states, max_new_tokens=6, min_new_tokens=6), ids)


def test_fp8_is_refused_without_fp8_gemms(monkeypatch):
    model = _vit()
    with pytest.raises(RuntimeError, match="compute capability 8.9.*the ViT is on cpu.*emulate"):
        fp8.enable_vit_fp8(model)
    monkeypatch.setenv("BLIP_FAST_VIT_FP8", "1")
    with pytest.raises(RuntimeError, match="8.9"), torch.no_grad():
        vision_states(model, torch.randn(1, 3, 32, 32))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(RuntimeError, match="NVIDIA A100 .* compute capability 8.0"):
        fp8.check_fp8_device(torch.device("cuda"))
    monkeypatch.setenv("BLIP_FAST_VIT_FP8", "yes")
    with pytest.raises(ValueError, match="BLIP_FAST_VIT_FP8='yes'"):
        fp8.requested_mode()


@pytest.mark.gpu
def test_scaled_mm_equals_the_emulation_on_an_fp8_gpu():
    if not ops.fp8_gemm_supported(torch.device("cuda")):
        pytest.skip("needs compute capability 8.9+")
    inputs = torch.randn(577 * 3, 768, device="cuda", dtype=torch.float16)
    weight = torch.randn(2304, 768, device="cuda", dtype=torch.float16) * 0.03
    weight_fp8, weight_scale = ops.fp8_quantize(weight)
    bias = torch.randn(2304, device="cuda", dtype=torch.float16)
    actual = ops.fp8_linear(inputs, weight_fp8, weight_scale, bias).float()
    expected = ops.fp8_linear(inputs, weight_fp8, weight_scale, bias, emulate=True).float()
    # Same operands; fp32 accumulation in another order, then one fp16 rounding of the output each.
    torch.testing.assert_close(actual, expected, rtol=2e-3, atol=2e-3)
    model = BlipVisionModel(BlipConfig.base(image_size=224).vision).to("cuda", torch.float16).eval()
    pixels = torch.randn(2, 3, 224, 224, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        reference = model(pixels).last_hidden_state.float()
        fp8.enable_vit_fp8(model)
        states = model(pixels).last_hidden_state.float()
    assert (states - reference).norm() / reference.norm() < 0.1
