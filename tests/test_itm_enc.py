"""A retrieval model blip_fast trains (original semantics: [ENC] at position 0 of the ITM text) loaded in transformers
gives blip_fast's ITM scores once the caller writes [ENC] there, as the README says; without it they differ. Every
export of such a model says so: a warning, and the README.md model card beside the weights, whose transformers code
(retrieval, VQA, captioning forward) gives blip_fast's outputs when run as written."""

import re

import pytest
import torch

import blip_fast
from blip_fast.config import BlipConfig
from tests.tiny_models import assert_close, randomize_

transformers = pytest.importorskip("transformers")

CONFIG = BlipConfig.tiny(vocab_size=200, image_size=32)  # a small vocab keeps saving and loading quick
PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
IDS = torch.tensor([[2, 11, 12, 13, 102], [2, 21, 22, 23, 102]])  # [CLS] ... [SEP]; unpadded (see the README)


def test_exported_retrieval_model_in_transformers_with_enc(tmp_path):
    config = CONFIG
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


# ------------------------------------------------------------------------------ the model card written at export


def card_snippet(model_dir):
    card = (model_dir / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)


def run_snippet(snippet, model_dir):
    """The card's code as a transformers user runs it; the processor gives IDS and PIXELS."""
    def processor(images, text, return_tensors):
        return {"input_ids": IDS.clone(), "attention_mask": torch.ones_like(IDS), "pixel_values": PIXELS}

    scope = {"model_dir": str(model_dir), "processor": processor, "image": None, "text": None, "question": None,
             "caption": None}
    with torch.no_grad():
        exec(snippet, scope)
    return scope


# What the card's snippet computes in transformers, and blip_fast's value of it.
CASES = {
    "BlipForImageTextRetrieval": ("itm_logits", lambda model: model(IDS, PIXELS).itm_score),
    "BlipForQuestionAnswering": ("answer_ids", lambda model: model.generate(IDS, PIXELS)),
    "BlipForConditionalGeneration": ("logits", lambda model: model(PIXELS, IDS).logits),
}


@pytest.mark.parametrize("architecture", CASES)
def test_export_card_gives_blip_fast_outputs_in_transformers(tmp_path, caplog, architecture):
    name, compute = CASES[architecture]
    model = randomize_(getattr(blip_fast, architecture)(CONFIG))
    model.save_pretrained(tmp_path)
    readme = tmp_path / "README.md"
    assert f"{architecture} keeps BLIP's original [ENC]/[DEC] semantics" in caplog.text and str(readme) in caplog.text
    with torch.no_grad():
        expected = compute(model)
    snippet = card_snippet(tmp_path)
    actual = run_snippet(snippet, tmp_path)[name]
    if name == "answer_ids":
        assert torch.equal(actual, expected)
    else:
        # Two float32 implementations (fused vs separate projections) round differently: this randomised model's own
        # float32 logits sit up to 2.3e-5 * max|logit| from its float64 ones (AVX-512 CPU), so 1e-5 is below the noise.
        assert_close(actual, expected, rtol=1e-4)
    # The card's line is what makes them equal: transformers alone gives other outputs.
    without = run_snippet(re.sub(r'inputs\["input_ids"\]\[:, 0\] = .*\n', "", snippet), tmp_path)[name]
    assert without.shape != expected.shape or not torch.allclose(without.float(), expected.float(), atol=1e-4)


def test_vqa_card_training_loss(tmp_path):
    model = randomize_(blip_fast.BlipForQuestionAnswering(CONFIG))
    model.save_pretrained(tmp_path)
    card = re.sub(r"\s+", " ", (tmp_path / "README.md").read_text())
    assert f"also write `{CONFIG.text.bos_token_id}` ([DEC]) at position 0 of `labels`" in card
    labels = torch.tensor([[2, 31, 32, 102], [2, 41, 102, 0]])
    with_dec = labels.clone()
    with_dec[:, 0] = CONFIG.text.bos_token_id
    with_enc = IDS.clone()
    with_enc[:, 0] = CONFIG.text.enc_token_id
    theirs = transformers.BlipForQuestionAnswering.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        expected = model(IDS, PIXELS, labels=labels).loss
        assert_close(theirs(input_ids=with_enc, pixel_values=PIXELS, labels=with_dec).loss, expected)


def test_card_keeps_the_readme_and_follows_the_model(tmp_path, caplog):
    readme = tmp_path / "README.md"
    readme.write_text("# My retrieval model\n\nTrained on my data.\n")
    model = randomize_(blip_fast.BlipForImageTextRetrieval(CONFIG))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # a second export replaces its section, never adds one
    card = readme.read_text()
    assert card.startswith("# My retrieval model\n\nTrained on my data.\n\n<!-- blip_fast")
    assert card.count("## Using this BlipForImageTextRetrieval in transformers") == 1
    # A model with HuggingFace's semantics needs no section: the stale one goes, the user's text stays.
    caplog.clear()
    hf_semantics = blip_fast.BlipForImageTextRetrieval(CONFIG.replace(hf_compat=True))
    hf_semantics.save_pretrained(tmp_path)
    assert readme.read_text() == "# My retrieval model\n\nTrained on my data.\n\n"
    hf_semantics.save_pretrained(tmp_path / "fresh")
    assert not (tmp_path / "fresh" / "README.md").exists() and "semantics" not in caplog.text
