"""BLIP's large shapes (ViT-L/16 at 384 px, 24 layers, 1024 wide, text 768 wide): the full configs build on the meta
device with transformers' parameter names and shapes, and a tiny config of the same structure (vision wider than
text) matches transformers' outputs."""

import pytest
import torch

import blip_fast
from blip_fast.config import BlipConfig
from tests.tiny_models import assert_close, randomize_

transformers = pytest.importorskip("transformers")

LARGE_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=384, patch_size=16)
TEXT_IDS = dict(vocab_size=30524, bos_token_id=30522, sep_token_id=102, pad_token_id=0)


@pytest.mark.parametrize("task", ["BlipForConditionalGeneration", "BlipForImageTextRetrieval"])
def test_full_large_config_builds_on_meta_with_transformers_shapes(task):
    hf_config = transformers.BlipConfig(text_config=TEXT_IDS, vision_config=LARGE_VISION)
    with torch.device("meta"):
        expected = {key: tuple(value.shape) for key, value in getattr(transformers, task)(hf_config).state_dict().items()}
        model = getattr(blip_fast, task)(BlipConfig.from_hf(hf_config.to_dict()))
    actual = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert {k: v for k, v in actual.items() if not k.endswith("position_ids")} == {
        k: v for k, v in expected.items() if not k.endswith("position_ids")}
    assert actual["vision_model.embeddings.position_embedding"][1] == 577  # 24 x 24 patches + class token


@pytest.mark.parametrize("task", ["BlipForConditionalGeneration", "BlipForImageTextRetrieval"])
def test_tiny_large_structure_matches_transformers(task, tmp_path):
    """Vision wider than text (the large models' 1024 vs 768) with 8 text heads (the hub's large configs)."""
    hf_config = transformers.BlipConfig(
        text_config=dict(hidden_size=48, num_attention_heads=8, intermediate_size=64,
                         num_hidden_layers=2, max_position_embeddings=40, vocab_size=99, bos_token_id=97,
                         sep_token_id=5, eos_token_id=5, pad_token_id=0),
        vision_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                           image_size=32, patch_size=8),
        image_text_hidden_size=24,
    )
    hf_model = randomize_(getattr(transformers, task)(hf_config))
    hf_model.save_pretrained(tmp_path)
    model = getattr(blip_fast, task).from_pretrained(tmp_path)
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    input_ids = torch.tensor([[1, 11, 12, 13, 5], [1, 21, 22, 5, 0]])
    mask = (input_ids != 0).long()
    with torch.no_grad():
        if task == "BlipForConditionalGeneration":
            assert_close(model(pixel_values, input_ids, mask).logits,
                         hf_model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=mask).logits)
            assert torch.equal(model.generate(pixel_values, num_beams=3, max_length=12),
                               hf_model.generate(pixel_values=pixel_values, num_beams=3, max_length=12))
        else:
            for head in (True, False):
                assert_close(model(input_ids, pixel_values, use_itm_head=head, attention_mask=mask).itm_score,
                             hf_model(input_ids=input_ids, pixel_values=pixel_values, use_itm_head=head,
                                      attention_mask=mask).itm_score)
