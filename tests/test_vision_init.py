"""Pre-training's ``--vision_init``: BLIP's image encoder started from an image classifier's ViT (timm/DeiT, the
original's or our layout), and the demo's classifier that supplies it (``blip_fast.demo_vision``)."""

import logging
import pathlib

import pytest
import torch
from safetensors.torch import save_file

from blip_fast.checkpoint import CheckpointError, load_vision_init, read_vision_init
from blip_fast.config import BlipConfig
from blip_fast.demo_vision import pretrain_vision
from blip_fast.modeling.pretrain import BlipPretrainer
from blip_fast.modeling.vit import BlipVisionModel, resize_position_embedding
from blip_fast.training import options
from tests.tiny_models import to_original_key

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "configs" / "tiny-cpu.yaml"
CONFIG = BlipConfig.tiny(vocab_size=200, image_size=40)


def vit_state(seed: int, image_size: int = 40) -> dict[str, torch.Tensor]:
    """A random tiny ViT's weights under ``vision_model.`` names."""
    torch.manual_seed(seed)
    model = BlipVisionModel(BlipConfig.tiny(image_size=image_size).vision)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_()
    return {f"vision_model.{key}": value.clone() for key, value in model.state_dict().items()}


def write(path: pathlib.Path, state: dict[str, torch.Tensor], layout: str) -> pathlib.Path:
    """``state`` as a file of ``layout``: timm's (bare, or under "model" with a classifier head, as DeiT ships it),
    the original BLIP's ``visual_encoder.*`` or ours."""
    if layout == "ours":
        save_file(state, path.with_suffix(".safetensors"))
        return path.with_suffix(".safetensors")
    original = {to_original_key(key): value for key, value in state.items()}
    if layout.startswith("timm"):
        original = {key.removeprefix("visual_encoder."): value for key, value in original.items()}
    if layout == "timm-deit":
        original = {"model": {**original, "head.weight": torch.randn(1000, 128), "head.bias": torch.randn(1000)}}
    torch.save(original, path)
    return path


@pytest.mark.parametrize("layout", ["timm", "timm-deit", "original", "ours"])
def test_every_layout_reads_as_the_same_vit(tmp_path, caplog, layout):
    state = vit_state(seed=1)
    caplog.set_level(logging.INFO, logger="blip_fast")
    read = read_vision_init(write(tmp_path / "vit.pth", state, layout), CONFIG.vision)
    assert read.keys() == state.keys()
    assert all(torch.equal(read[key], state[key]) for key in state)
    dropped = [record.getMessage() for record in caplog.records if "dropped" in record.getMessage()]
    assert dropped == ([f"{tmp_path / 'vit.pth'}: dropped what is no image-encoder weight: head.bias, head.weight"]
                       if layout == "timm-deit" else [])


def test_a_vit_of_another_resolution_gets_its_position_table_resized(tmp_path):
    """As BLIP's interpolate_pos_embed: a 32 px (4 x 4 patches) ViT read for 40 px (5 x 5)."""
    state = vit_state(seed=2, image_size=32)
    read = read_vision_init(write(tmp_path / "vit.pth", state, "timm"), CONFIG.vision)
    key = "vision_model.embeddings.position_embedding"
    assert read[key].shape == (1, 26, 128)
    torch.testing.assert_close(read[key], resize_position_embedding(state[key], (5, 5)))


def test_what_does_not_fit_is_one_error_naming_it(tmp_path):
    state = vit_state(seed=3)
    state["vision_model.post_layernorm.weight"] = torch.ones(64)
    del state["vision_model.encoder.layers.3.mlp.fc2.bias"]
    with pytest.raises(CheckpointError) as refused:
        read_vision_init(write(tmp_path / "vit.pth", state, "timm"), CONFIG.vision)
    message = str(refused.value)
    assert "2 problems" in message and "missing: vision_model.encoder.layers.3.mlp.fc2.bias" in message
    assert "shape: vision_model.post_layernorm.weight is [64]" in message
    save_file({"text_encoder.embeddings.word_embeddings.weight": torch.zeros(4, 4)}, tmp_path / "text.safetensors")
    with pytest.raises(CheckpointError, match="holds no ViT weights"):
        read_vision_init(tmp_path / "text.safetensors", CONFIG.vision)


def test_pretraining_starts_its_vit_and_the_momentum_copy_from_the_file(tmp_path):
    state = vit_state(seed=4)
    torch.manual_seed(0)
    trainer = BlipPretrainer(CONFIG, queue_size=8, momentum=0.5)
    text_before = {key: value.clone() for key, value in trainer.text_encoder.state_dict().items()}
    load_vision_init(trainer, write(tmp_path / "vit.pth", state, "ours"))
    for prefix in ("vision_model.", "visual_encoder_m."):
        loaded = {f"vision_model.{key}": value for key, value in getattr(trainer, prefix[:-1]).state_dict().items()}
        assert all(torch.equal(loaded[key], state[key]) for key in state), prefix
    assert all(torch.equal(value, text_before[key]) for key, value in trainer.text_encoder.state_dict().items())
    trainer.momentum_update()  # online == momentum: the EMA keeps the loaded weights (no stale fp32 masters)
    assert torch.equal(trainer.visual_encoder_m.embeddings.patch_embedding.weight,
                       state["vision_model.embeddings.patch_embedding.weight"])


@pytest.mark.parametrize(("flags", "error", "message"), [
    (["--task", "captioning", "--init_from", "run"], options.ConfigError, "goes with task pretrain"),
    (["--init_from", "model_base.pth", "--tokenizer_dir", "vocab"], options.ConfigError, "without init_from"),
    (["--vision_init", "typo.pth"], FileNotFoundError, "vision_init typo.pth: no such file"),
])
def test_vision_init_options_are_checked_before_the_run(tmp_path, monkeypatch, flags, error, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model_base.pth").write_bytes(b"")
    vision_init = [] if "--vision_init" in flags else ["--vision_init", "model_base.pth"]
    with pytest.raises(error, match=message):
        options.parse_args(["--config", str(TINY_YAML), *vision_init, *flags])


def test_the_demos_classifier_writes_a_vit_pretraining_reads(tmp_path):
    """A few steps of demo_vision's shape classifier: a held-out accuracy and a file ``--vision_init`` takes."""
    result = pretrain_vision(tmp_path / "vit.safetensors", image_size=40, images=32, steps=2, seed=0)
    assert result["images"] == 32 and result["steps"] == 2
    assert set(result["held_out_accuracy"]) == {"shape", "color"}
    for accuracy in result["held_out_accuracy"].values():
        assert 0.0 <= accuracy <= 100.0 and abs(accuracy * 2 - round(accuracy * 2)) < 1e-4  # of 200 scenes
    read = read_vision_init(tmp_path / "vit.safetensors", CONFIG.vision)
    assert read.keys() == vit_state(seed=0).keys()


@pytest.mark.parametrize("frozen", [False, True])
def test_classifier_trains_the_vit_or_only_the_head_of_a_frozen_one(frozen):
    """From scratch every weight moves; a frozen ViT (the attribute probe's --frozen) keeps its weights, bit for bit."""
    from blip_fast.demo_vision import train_classifier

    torch.manual_seed(5)
    vit = BlipVisionModel(CONFIG.vision)
    before = {key: value.clone() for key, value in vit.state_dict().items()}
    images, labels = torch.randn(8, 3, 40, 40), torch.tensor([[0, 1], [1, 0], [2, 2], [0, 0]] * 2)
    model, head = train_classifier(CONFIG.vision, images, labels, [3, 3], steps=3, batch=4,
                                   frozen=vit if frozen else None)
    assert (model is vit) == frozen and head.out_features == 6
    changed = {key for key, value in model.state_dict().items() if not torch.equal(value, before[key])}
    parameters = {key for key, _ in model.named_parameters()}
    assert changed == (set() if frozen else parameters)
