"""Config presets and HuggingFace config.json conversion."""

import json

import pytest

from blip_fast.config import BlipConfig, TextConfig, VisionConfig
from tests.tiny_models import tiny_hf_config

transformers = pytest.importorskip("transformers")


def test_presets_have_blip_shapes():
    base, base384, large = BlipConfig.base(), BlipConfig.base(image_size=384), BlipConfig.large()
    assert base.vision.num_positions == 197 and base384.vision.num_positions == 577
    assert (base.vision.hidden_size, base.vision.num_hidden_layers, base.vision.num_attention_heads) == (768, 12, 12)
    assert (large.vision.hidden_size, large.vision.num_hidden_layers, large.vision.num_attention_heads) == (1024, 24, 16)
    assert base.vision.layer_norm_eps == 1e-6 and base.text.layer_norm_eps == 1e-12
    assert (base.text.bos_token_id, base.text.enc_token_id, base.text.sep_token_id) == (30522, 30523, 102)
    assert base.text.num_attention_heads == 12 and base.image_text_hidden_size == 256
    tiny = BlipConfig.tiny(vocab_size=500)
    assert (tiny.text.bos_token_id, tiny.text.enc_token_id) == (498, 499)
    assert BlipConfig.from_name("tiny") == BlipConfig.tiny()


def test_missing_hf_keys_take_hf_defaults_not_blips():
    config = BlipConfig.from_hf({"model_type": "blip"})
    assert config.vision.layer_norm_eps == 1e-5 and config.vision.image_size == 384
    assert config.text.num_attention_heads == 8
    assert config.text.hidden_dropout_prob == 0.0 and config.text.attention_probs_dropout_prob == 0.0
    assert config.hf_compat is True


@pytest.mark.parametrize("config", [BlipConfig.base(), BlipConfig.large(image_size=384), BlipConfig.tiny(),
                                    BlipConfig.tiny(vocab_size=321, hf_compat=True)], ids=["base", "large", "tiny", "tiny-hf"])
def test_to_hf_round_trips_through_transformers(config, tmp_path):
    hf_config = transformers.BlipConfig.from_dict(config.to_hf("BlipForConditionalGeneration"))
    hf_config.save_pretrained(tmp_path)
    assert BlipConfig.from_hf(tmp_path) == config
    assert hf_config.text_config.encoder_hidden_size == config.vision.hidden_size
    assert hf_config.vision_config.layer_norm_eps == config.vision.layer_norm_eps


def test_from_hf_reads_a_transformers_config():
    hf_config = tiny_hf_config(hidden=60, text_heads=5, vision_heads=6, image_size=28, patch_size=7)
    config = BlipConfig.from_hf(hf_config.to_dict())
    assert config.text.num_attention_heads == 5 and config.vision.num_attention_heads == 6
    assert config.vision.image_size == 28 and config.vision.patch_size == 7
    assert config.text.vocab_size == 99 and config.text.enc_token_id == 98
    assert config.image_text_hidden_size == 24


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: VisionConfig(hidden_size=30, num_attention_heads=4), "multiple of num_attention_heads"),
        (lambda: VisionConfig(image_size=100, patch_size=16), "multiple of patch_size"),
        (lambda: TextConfig(hidden_act="swish"), "not supported"),
        (lambda: TextConfig(vocab_size=100), "outside the vocabulary"),
        (lambda: BlipConfig.from_hf({"model_type": "clip"}), "model_type"),
        (lambda: BlipConfig.from_name("huge"), "unknown preset"),
    ],
)
def test_invalid_configs_raise_clearly(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        BlipConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=str(tmp_path)):
        BlipConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(BlipConfig.tiny().to_hf()))
    assert BlipConfig.from_hf(tmp_path / "config.json") == BlipConfig.tiny()
