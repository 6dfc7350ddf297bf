"""HuggingFace parity on CUDA (skipped without a GPU; run by benchmarks/gpu_check.sh): fp32 exact ids, fp16 close."""

import copy

import pytest
import torch

import blip_fast
from tests.tiny_models import assert_close, tiny_hf_model

pytestmark = pytest.mark.gpu
transformers = pytest.importorskip("transformers")

SHAPE = dict(hidden=64, text_heads=4, vision_heads=4, image_size=48, patch_size=8)


@pytest.fixture(scope="module")
def captioners():
    hf_model = tiny_hf_model("BlipForConditionalGeneration", **SHAPE).cuda()
    model = blip_fast.BlipForConditionalGeneration.from_hf_model(hf_model).eval()
    with torch.no_grad():
        for m in (hf_model, model):
            m.text_decoder.cls.predictions.bias[5] += 1.0  # mixed finish times
    return hf_model, model


@pytest.mark.parametrize("case", [dict(), dict(num_beams=3)], ids=["greedy", "beam3"])
def test_fp32_ids_identical_on_cuda(captioners, case):
    hf_model, model = captioners
    pixel_values = torch.randn(16, 3, 48, 48, device="cuda")
    expected = hf_model.generate(pixel_values=pixel_values, **case)
    assert torch.equal(model.generate(pixel_values, **case), expected)


def test_fp32_logits_on_cuda(captioners):
    hf_model, model = captioners
    pixel_values = torch.randn(4, 3, 48, 48, device="cuda")
    input_ids = torch.randint(6, 90, (4, 9), device="cuda")
    with torch.no_grad():
        expected = hf_model(pixel_values=pixel_values, input_ids=input_ids).logits
        actual = model(pixel_values, input_ids).logits
    assert_close(actual, expected, rtol=1e-4)  # SDPA's fused kernels vs eager matmul-softmax


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_within_twice_hf_error(captioners, dtype):
    """DESIGN §4: our low-precision error against the fp32 reference is at most 2x HuggingFace's."""
    hf_model, model = captioners
    pixel_values = torch.randn(4, 3, 48, 48, device="cuda")
    input_ids = torch.randint(6, 90, (4, 9), device="cuda")
    low_model, low_hf_model = copy.deepcopy(model).to(dtype), copy.deepcopy(hf_model).to(dtype)
    with torch.no_grad():
        reference = model(pixel_values, input_ids).logits
        ours = low_model(pixel_values.to(dtype), input_ids).logits.float()
        theirs = low_hf_model(pixel_values=pixel_values.to(dtype), input_ids=input_ids).logits.float()
    our_error, hf_error = (ours - reference).abs().max(), (theirs - reference).abs().max()
    assert our_error <= 2 * hf_error + 1e-3, (our_error, hf_error)
