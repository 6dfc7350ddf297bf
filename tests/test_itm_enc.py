"""A retrieval model blip_fast trains (original semantics: [ENC] at position 0 of the ITM text) loaded in transformers
gives blip_fast's ITM scores once the caller writes [ENC] there, as the README says; without it they differ."""

import pytest
import torch

import blip_fast
from blip_fast.config import BlipConfig
from tests.tiny_models import assert_close, randomize_

transformers = pytest.importorskip("transformers")


def test_exported_retrieval_model_in_transformers_with_enc(tmp_path):
    config = BlipConfig.tiny(image_size=32)
    assert not config.hf_compat
    randomize_(blip_fast.BlipForImageTextRetrieval(config)).save_pretrained(tmp_path)
    ours = blip_fast.BlipForImageTextRetrieval.from_pretrained(tmp_path)
    theirs = transformers.BlipForImageTextRetrieval.from_pretrained(tmp_path).eval()
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    input_ids = torch.tensor([[2, 11, 12, 13, 3], [2, 21, 22, 3, 0]])  # [CLS] ... [SEP], as the tokenizer gives
    mask = (input_ids != 0).long()
    with torch.no_grad():
        expected = ours(input_ids, pixel_values, attention_mask=mask).itm_score
        with_enc = input_ids.clone()
        with_enc[:, 0] = config.text.enc_token_id
        assert_close(theirs(input_ids=with_enc, pixel_values=pixel_values, attention_mask=mask).itm_score, expected)
        plain = theirs(input_ids=input_ids, pixel_values=pixel_values, attention_mask=mask).itm_score
        assert not torch.allclose(plain, expected, atol=1e-4), "without [ENC] transformers scores differently"
        itc = dict(pixel_values=pixel_values, attention_mask=mask, use_itm_head=False)
        assert_close(theirs(input_ids=input_ids, **itc).itm_score,
                     ours(input_ids, pixel_values, use_itm_head=False, attention_mask=mask).itm_score)
