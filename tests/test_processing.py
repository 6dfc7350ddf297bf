"""blip_fast.BlipProcessor vs transformers' BlipProcessor; the image-processor loader of both transformers layouts."""

import json

import numpy as np
import pytest
import torch

import blip_fast
from blip_fast.data.transforms import BlipImageProcessor
from blip_fast.errors import InvalidInputError
from tests.hub_fixtures import hf_processor, save_as_transformers_4
from tests.test_transforms import INSTALLED, random_image

transformers = pytest.importorskip("transformers")

TEXTS = ["A man riding a horse on the beach.", "two dogs", "Café naïve — ÉCOLE " + "word " * 40]
IMAGE_CASES = [("RGB", (50, 30)), ("RGBA", (17, 64)), ("L", (1, 1)), ("CMYK", (33, 33)), ("P", (300, 41))]


@pytest.fixture(scope="module")
def processors(bert_vocab_dir, tmp_path_factory):
    """transformers' processor saved by transformers 5 (processor_config.json only), and ours loaded from it."""
    directory = tmp_path_factory.mktemp("processor")
    hf = hf_processor(bert_vocab_dir / "vocab.txt", image_size=40)
    hf.save_pretrained(directory)
    assert not (directory / "preprocessor_config.json").exists()
    # Transparent images converted as the installed transformers converts them (changed in 5.21).
    return hf, blip_fast.BlipProcessor.from_pretrained(directory, **INSTALLED)


def assert_same(ours, expected):
    assert list(ours.keys()) == list(expected.keys())
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert ours[key].dtype == value.dtype, key
            torch.testing.assert_close(ours[key], value, atol=1e-6, rtol=0)
        elif key == "pixel_values":  # a list of [3, H, W] arrays without return_tensors
            assert len(ours[key]) == len(value)
            for mine, theirs in zip(ours[key], value):
                np.testing.assert_allclose(mine, theirs, atol=1e-6, rtol=0)
        else:
            assert ours[key] == value, key


@pytest.mark.parametrize("mode, size", IMAGE_CASES, ids=[mode for mode, _ in IMAGE_CASES])
@pytest.mark.parametrize("text_kwargs", [dict(), dict(padding="max_length", truncation=True, max_length=35),
                                         dict(padding=True), dict(truncation=True, max_length=9),
                                         dict(padding=True, return_token_type_ids=True)],
                         ids=["plain", "max_length35", "longest", "truncate9", "token-types-asked"])
def test_outputs_equal_transformers(processors, mode, size, text_kwargs):
    hf, ours = processors
    images = [random_image(mode, size), random_image("RGB", (23, 71))]
    for text in (TEXTS[0], TEXTS[:2], None):
        batch_images = images[:1] if isinstance(text, str) else images
        for return_tensors in ("pt", None):
            kwargs = dict(text_kwargs if text is not None else {}, return_tensors=return_tensors)
            try:
                expected = hf(batch_images, text, **kwargs)
            except ValueError:  # unpadded texts of different lengths make no tensor: an error in both
                with pytest.raises(ValueError, match="padding=True"):
                    ours(batch_images, text, **kwargs)
                continue
            assert_same(ours(batch_images, text, **kwargs), expected)
    assert_same(ours(text=TEXTS, padding=True, return_tensors="pt"), hf(text=TEXTS, padding=True, return_tensors="pt"))


def test_positional_order_image_keywords_and_errors(processors):
    hf, ours = processors
    image = random_image("RGB", (31, 20))
    assert_same(ours(image, "a dog", return_tensors="pt", size={"height": 24, "width": 16}),
                hf(image, "a dog", return_tensors="pt", size={"height": 24, "width": 16}))
    with pytest.raises(ValueError, match="images, text or both"):
        ours()
    with pytest.raises(TypeError, match="unsupported arguments \\['foo'\\]"):
        ours(text="a", foo=3)


def test_to_casts_only_pixel_values(processors):
    _, ours = processors
    batch = ours(random_image("RGB", (9, 9)), "a dog", return_tensors="pt")
    moved = batch.to("cpu", torch.float16)
    assert moved is batch
    assert batch.pixel_values.dtype == torch.float16
    assert batch.input_ids.dtype == torch.int64 and batch.attention_mask.dtype == torch.int64


def test_decode_like_transformers(processors):
    hf, ours = processors
    ids = [30522, 1037, 3899, 2652, 102, 0, 0]
    for kwargs in (dict(), dict(skip_special_tokens=True)):
        assert ours.decode(ids, **kwargs) == hf.decode(ids, **kwargs)
        assert ours.batch_decode(torch.tensor([ids, ids]), **kwargs) == hf.batch_decode(torch.tensor([ids, ids]),
                                                                                        **kwargs)


@pytest.mark.parametrize("layout", ["transformers-5", "transformers-4", "blip_fast"])
def test_every_layout_loads_with_its_settings(bert_vocab_dir, tmp_path, layout):
    """A processor with mean/std 0.5 must not fall back to BLIP's defaults, whichever layout saved it."""
    hf = hf_processor(bert_vocab_dir / "vocab.txt", image_size=24, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    if layout == "blip_fast":
        blip_fast.BlipProcessor.from_pretrained(_saved(hf, tmp_path / "hf")).save_pretrained(tmp_path / "saved")
        directory = tmp_path / "saved"
        reloaded = transformers.BlipProcessor.from_pretrained(directory)  # and transformers reads ours
        assert list(reloaded.image_processor.image_mean) == [0.5] * 3
    else:
        directory = _saved(hf, tmp_path / "saved")
        if layout == "transformers-4":
            save_as_transformers_4(directory)
    image = random_image("RGB", (40, 40))
    expected = hf(image, "a dog", return_tensors="pt")
    assert_same(blip_fast.BlipProcessor.from_pretrained(directory)(image, "a dog", return_tensors="pt"), expected)
    loaded = BlipImageProcessor.for_model_dir(directory, image_size=24)
    assert loaded.image_mean == (0.5, 0.5, 0.5) and loaded.size == (24, 24)
    assert BlipImageProcessor.from_pretrained(directory) == loaded
    # Saved settings that resize to another size than the model takes: refused when the model loads, not at its
    # first forward (the position table would not fit).
    with pytest.raises(InvalidInputError, match=r"resizes images to 24x24, but the model in .* takes 384x384"):
        BlipImageProcessor.for_model_dir(directory, image_size=384)


def _saved(processor, directory):
    processor.save_pretrained(directory)
    return directory


def test_captioner_uses_the_saved_settings(bert_vocab_dir, tmp_path):
    """The bug this loader fixes: a transformers-5 save (no preprocessor_config.json) fed default pixels."""
    from blip_fast.captioning import Captioner
    from tests.hub_fixtures import tiny_hf_repo

    directory = tiny_hf_repo("BlipForConditionalGeneration", tmp_path / "model", bert_vocab_dir / "vocab.txt")
    hf_processor(bert_vocab_dir / "vocab.txt", image_size=32, image_mean=[0.5] * 3,
                 image_std=[0.5] * 3).save_pretrained(directory)
    config = json.loads((directory / "processor_config.json").read_text())
    assert config["image_processor"]["image_mean"] == [0.5] * 3
    assert Captioner.from_pretrained(directory).processor.image_mean == (0.5, 0.5, 0.5)


def test_missing_settings_fall_back_loudly(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="blip_fast"):
        assert BlipImageProcessor.for_model_dir(tmp_path, 64) == BlipImageProcessor(size=64)
    assert "preprocessor_config.json" in caplog.text and str(tmp_path) in caplog.text
    with pytest.raises(FileNotFoundError, match="processor_config.json"):
        BlipImageProcessor.from_pretrained(tmp_path)
