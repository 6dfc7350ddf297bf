"""Checkpoint loading/saving against HuggingFace transformers and hand-made original BLIP ``.pth`` files."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from blip_fast import checkpoint  # noqa: E402
from blip_fast.checkpoint import CheckpointError, convert_original, load_pretrained, save_pretrained  # noqa: E402
from blip_fast.config import BlipConfig, TextConfig, VisionConfig  # noqa: E402
from blip_fast.modeling import blip  # noqa: E402
from tests.tiny_models import to_original_key  # noqa: E402

TASKS = ["BlipForConditionalGeneration", "BlipForImageTextRetrieval", "BlipForQuestionAnswering"]
TASK_NAMES = {"captioning": TASKS[0], "retrieval": TASKS[1], "vqa": TASKS[2]}
TIED = {"text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias"}

HF_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                 patch_size=8)
HF_TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=40, bos_token_id=97, pad_token_id=0, sep_token_id=2, eos_token_id=2)
TINY = BlipConfig(
    vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        image_size=32, patch_size=8),
    text=TextConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=40, bos_token_id=97, enc_token_id=98, sep_token_id=2),
    image_text_hidden_size=16,
)


# ---------------------------------------------------------------------------------------------------- helpers
def hf_model(task: str, seed: int, image_size: int = 32):
    """A tiny transformers model whose every parameter is random (nothing trivially zero or one)."""
    config = transformers.BlipConfig(vision_config={**HF_VISION, "image_size": image_size}, text_config=HF_TEXT,
                                     image_text_hidden_size=16)
    return randomize(getattr(transformers, task)(config), seed).eval()


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():  # tied parameters are yielded once and stay tied
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def assert_state_equal(actual: dict, expected: dict) -> None:
    actual = {k: v for k, v in actual.items() if not k.endswith("position_ids")}
    expected = {k: v for k, v in expected.items() if not k.endswith("position_ids")}
    assert actual.keys() == expected.keys(), f"only in actual {actual.keys() - expected.keys()}, only in expected " \
                                             f"{expected.keys() - actual.keys()}"
    differing = [k for k in expected if actual[k].dtype != expected[k].dtype or not torch.equal(actual[k], expected[k])]
    assert not differing, f"{len(differing)}/{len(expected)} tensors differ: {differing}"


def pretraining_state(seed: int, image_size: int = 32) -> dict[str, torch.Tensor]:
    """What a BLIP pre-training checkpoint holds (HF names): every component of every task."""
    state = dict(hf_model("BlipForQuestionAnswering", seed, image_size).state_dict())
    heads = hf_model("BlipForImageTextRetrieval", seed + 1).state_dict()
    state.update({k: v for k, v in heads.items() if k.split(".")[0] in ("vision_proj", "text_proj", "itm_head")})
    return state


def original_file(path: pathlib.Path, state: dict[str, torch.Tensor], wrap: bool = True) -> pathlib.Path:
    """Write ``state`` (HF names) as an original .pth, with the training-only tensors BLIP saves next to it."""
    original = {to_original_key(k): v.clone() for k, v in state.items()}  # clone: no shared storage on disk
    assert not [k for k in original if k.startswith("vision_model.")]  # every ViT key has its original name
    generator = torch.Generator().manual_seed(123)
    for key in list(original):
        if key.startswith(("visual_encoder.", "text_encoder.")):
            prefix, rest = key.split(".", 1)
            original[f"{prefix}_m.{rest}"] = original[key] + 0.01 * torch.randn(original[key].shape, generator=generator)
    original.update({
        "vision_proj_m.weight": torch.randn(16, 32, generator=generator),
        "text_proj_m.weight": torch.randn(16, 32, generator=generator),
        "image_queue": torch.randn(16, 57, generator=generator),
        "text_queue": torch.randn(16, 57, generator=generator),
        "idx_queue": torch.full((1, 57), -100),
        "ptr_queue": torch.zeros(1, dtype=torch.long),
        "temp": torch.tensor(0.07),
        "text_encoder.embeddings.position_ids": torch.arange(40)[None],
        "text_decoder.bert.embeddings.position_ids": torch.arange(40)[None],
    })
    torch.save({"model": original, "epoch": 3} if wrap else original, path)
    return path


def expected_for(task: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keys = getattr(blip, task)(TINY).state_dict().keys()
    expected = {k: state[k] for k in keys if k not in TIED}
    if TIED & keys:
        expected["text_decoder.cls.predictions.decoder.weight"] = state["text_decoder.bert.embeddings.word_embeddings.weight"]
        expected["text_decoder.cls.predictions.decoder.bias"] = state["text_decoder.cls.predictions.bias"]
    return expected


def write_bin_dir(directory: pathlib.Path, model, shards: int) -> None:
    """An older-transformers ``pytorch_model.bin`` directory (tied aliases included), optionally sharded."""
    model.save_pretrained(directory)
    os.remove(directory / "model.safetensors")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(state, directory / "pytorch_model.bin")
        return
    keys, weight_map = sorted(state), {}
    for index in range(shards):
        name = f"pytorch_model-{index + 1:05d}-of-{shards:05d}.bin"
        part = keys[index::shards]
        torch.save({k: state[k] for k in part}, directory / name)
        weight_map.update(dict.fromkeys(part, name))
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def hf_dir(directory: pathlib.Path, task: str, layout: str, seed: int = 0):
    model = hf_model(task, seed)
    if layout == "safetensors":
        model.save_pretrained(directory)
    elif layout == "safetensors-sharded":
        model.save_pretrained(directory, max_shard_size="20KB")
        assert (directory / "model.safetensors.index.json").exists()
    else:
        write_bin_dir(directory, model, shards=1 if layout == "bin" else 3)
    return model


# ---------------------------------------------------------------------------------------------------- HF directories
@pytest.mark.parametrize("layout", ["safetensors", "safetensors-sharded", "bin", "bin-sharded"])
@pytest.mark.parametrize("task", TASKS)
def test_hf_dir_loads_exactly(tmp_path, task, layout):
    source = hf_dir(tmp_path, task, layout)
    generation_path = tmp_path / "generation_config.json"
    decoding = {}
    if generation_path.exists():  # HF writes token ids and output flags; add decoding settings a hub model has
        written = json.loads(generation_path.read_text())
        generation_path.write_text(json.dumps({**written, "num_beams": 3, "top_k": None}))
        decoding = {"num_beams": 3, **({"use_cache": written["use_cache"]} if "use_cache" in written else {})}
    model = load_pretrained(getattr(blip, task), tmp_path)
    assert type(model) is getattr(blip, task)
    assert not model.training and model.config.hf_compat
    assert model.config.vision.image_size == 32 and model.config.text.bos_token_id == 97
    assert_state_equal(model.state_dict(), source.state_dict())
    if TIED & model.state_dict().keys():  # aliases stay one tensor after loading
        decoder = model.text_decoder
        assert decoder.cls.predictions.decoder.weight is decoder.bert.embeddings.word_embeddings.weight
    # Kept to be saved again, not applied (transformers' BLIP generate ignores them: test_hf_parity).
    assert model.saved_generation_settings == decoding  # transformers 5 also writes use_cache, 4.57 does not
    assert model.generation_defaults == {}


@pytest.mark.parametrize("settings, message", [
    ({"num_beams": 0}, "num_beams and num_return_sequences must be >= 1"),
    ({"do_sample": True, "top_p": 1.5}, "top_p must be in (0, 1], got 1.5"),
    ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences (3) > num_beams (2)"),
    ({"num_beams": "3"}, "num_beams must be int, got '3'"),
    ({"do_sample": "yes"}, "do_sample must be bool, got 'yes'"),
    ({"max_length": 20.5}, "max_length must be int or None, got 20.5"),
    ({"temperature": True, "do_sample": True}, "temperature must be float, got True"),
])
def test_unusable_decoding_settings_fail_the_load_naming_the_file(tmp_path, settings, message):
    """A hand-edited generation_config.json: the load names the file (the error came at the first generate(),
    naming nothing)."""
    hf_dir(tmp_path, "BlipForConditionalGeneration", "safetensors")
    (tmp_path / "generation_config.json").write_text(json.dumps(settings))
    with pytest.raises(CheckpointError) as error:
        load_pretrained(blip.BlipForConditionalGeneration, tmp_path)
    assert str(error.value) == f"{tmp_path / 'generation_config.json'}: {message}"


@pytest.mark.parametrize(("dtype", "hf_compat"), [(torch.float16, None), (torch.bfloat16, False), (None, True)])
def test_dtype_device_and_compat_flag(tmp_path, dtype, hf_compat):
    source = hf_dir(tmp_path, "BlipForConditionalGeneration", "safetensors")
    model = load_pretrained(blip.BlipForConditionalGeneration, tmp_path, torch_dtype=dtype, device="cpu",
                            hf_compat=hf_compat)
    assert model.config.hf_compat is (True if hf_compat is None else hf_compat)
    expected = {k: v.to(dtype) if dtype is not None else v for k, v in source.state_dict().items()}
    assert_state_equal(model.state_dict(), expected)


def test_hf_dir_position_mismatch_is_an_error(tmp_path):
    hf_model("BlipForConditionalGeneration", 0, image_size=16).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vision_config"]["image_size"] = 32
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path} does not fit")) as error:
        load_pretrained(blip.BlipForConditionalGeneration, tmp_path)
    shape_problem = "shape: vision_model.embeddings.position_embedding is [1, 5, 32] in the file, the model expects [1, 17, 32]"
    assert shape_problem in str(error.value)


def test_task_components_missing_from_the_dir_are_errors(tmp_path):
    hf_dir(tmp_path, "BlipForConditionalGeneration", "safetensors")
    with pytest.raises(CheckpointError, match="is a captioning model .config.json names BlipForConditionalGeneration., "
                                              "not a vqa model"):
        load_pretrained(blip.BlipForQuestionAnswering, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["architectures"]  # nothing names the task: the missing keys do
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        load_pretrained(blip.BlipForQuestionAnswering, tmp_path)
    assert "missing: text_encoder.embeddings.word_embeddings.weight" in str(error.value)


# ---------------------------------------------------------------------------------------------------- saving
@pytest.mark.parametrize("safe", [True, False])
@pytest.mark.parametrize("task", TASKS)
def test_save_loads_in_transformers(tmp_path, task, safe):
    model = randomize(getattr(blip, task)(TINY), seed=5)
    model.saved_generation_settings = {"max_length": 20, "num_beams": 3}
    save_pretrained(model, tmp_path / "ours", safe_serialization=safe)

    hf = getattr(transformers, task).from_pretrained(tmp_path / "ours")
    assert_state_equal(hf.state_dict(), model.state_dict())
    assert hf.config.vision_config.image_size == 32 and hf.config.text_config.bos_token_id == 97
    reloaded = load_pretrained(getattr(blip, task), tmp_path / "ours")
    assert_state_equal(reloaded.state_dict(), model.state_dict())
    assert reloaded.saved_generation_settings == {"max_length": 20, "num_beams": 3}

    # the file holds exactly what transformers' own save writes (no tied aliases)
    hf.save_pretrained(tmp_path / "theirs")
    ours = load_file(tmp_path / "ours" / "model.safetensors") if safe else torch.load(tmp_path / "ours" / "pytorch_model.bin")
    assert ours.keys() == load_file(tmp_path / "theirs" / "model.safetensors").keys()
    assert not TIED & ours.keys()


def test_save_is_atomic_and_removes_stale_weights(tmp_path, monkeypatch):
    model = randomize(blip.BlipForImageTextRetrieval(TINY), seed=1)
    save_pretrained(model, tmp_path, safe_serialization=False)
    save_pretrained(model, tmp_path)
    # the stale .bin is gone; README.md is the model card of a model with BLIP's original semantics
    assert sorted(os.listdir(tmp_path)) == ["README.md", "config.json", "model.safetensors"]
    before = (tmp_path / "model.safetensors").read_bytes()

    def crash(state, filename, metadata=None):
        pathlib.Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(randomize(model, seed=2), tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "config.json", "model.safetensors"]  # no temp file left
    assert (tmp_path / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("safe", [True, False])
def test_the_weights_file_of_a_model_folder_named_alone_is_refused(tmp_path, safe):
    """``from_pretrained("model/model.safetensors")``: the file alone lacks the folder's head counts, and loading it
    as a bare state dict silently built a model with guessed heads (the demo's 128-wide model: 2 instead of its 4)
    that computes something else. The folder is named instead; the same file outside a model folder still loads as a
    bare state dict."""
    model = randomize(blip.BlipForImageTextRetrieval(TINY), seed=1)
    save_pretrained(model, tmp_path / "model", safe_serialization=safe)
    weights = tmp_path / "model" / ("model.safetensors" if safe else "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=re.escape(f"{weights} is the weights file of the model folder "
                                                        f"{tmp_path / 'model'}, whose config.json holds")):
        load_pretrained(blip.BlipForImageTextRetrieval, weights)
    alone = tmp_path / "alone" / weights.name
    alone.parent.mkdir()
    alone.write_bytes(weights.read_bytes())
    assert load_pretrained(blip.BlipForImageTextRetrieval, alone, config=TINY).state_dict().keys() == \
        model.state_dict().keys()


# ---------------------------------------------------------------------------------------------------- original .pth
@pytest.mark.parametrize("wrap", [True, False])
@pytest.mark.parametrize("task", TASKS)
def test_original_pth_loads_and_drops_training_state(tmp_path, caplog, task, wrap):
    state = pretraining_state(seed=3)
    path = original_file(tmp_path / "model_base.pth", state, wrap)
    caplog.set_level(logging.INFO, logger="blip_fast")
    model = load_pretrained(getattr(blip, task), path, config=TINY)
    assert not model.config.hf_compat and not model.training
    assert_state_equal(model.state_dict(), expected_for(task, state))

    drop_lines = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(drop_lines) == 1, drop_lines
    unused = {"BlipForConditionalGeneration": ["text_encoder", "vision_proj", "itm_head"],
              "BlipForImageTextRetrieval": ["text_decoder"],
              "BlipForQuestionAnswering": ["vision_proj", "text_proj", "itm_head"]}[task]
    for group in ["visual_encoder_m", "text_encoder_m", "image_queue", "ptr_queue", "temp", *unused]:
        assert re.search(rf"\b{group} \(", drop_lines[0]), (group, drop_lines[0])
    assert "position_ids" not in drop_lines[0]


def test_original_pth_infers_config(tmp_path, caplog):
    """Sizes come from the shapes; heads from BLIP's known widths or the caller; any other width is a guess of
    64-d heads, said in a warning (and refused by ``convert``, see test_user_errors)."""
    config = BlipConfig(
        vision=VisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
                            image_size=48, patch_size=8),
        text=TextConfig(vocab_size=110, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=24, bos_token_id=108, enc_token_id=109),
        image_text_hidden_size=24,
    )
    source = randomize(blip.BlipForImageTextRetrieval(config), seed=4)
    state = {to_original_key(k): v for k, v in source.state_dict().items()}
    torch.save({"model": state}, tmp_path / "model.pth")
    guessed = load_pretrained(blip.BlipForImageTextRetrieval, tmp_path / "model.pth")
    assert guessed.config.vision.num_attention_heads == guessed.config.text.num_attention_heads == 1
    assert "the vision transformer is 64 wide, not one of BLIP's; assuming 64-d heads (1)" in caplog.text
    model = load_pretrained(blip.BlipForImageTextRetrieval, tmp_path / "model.pth", heads=(2, 4))
    assert model.config == config
    assert_state_equal(model.state_dict(), source.state_dict())


def test_original_pos_embed_is_resized_bicubically(tmp_path, caplog):
    state = pretraining_state(seed=6, image_size=16)  # a 2x2 patch grid; TINY has 4x4
    path = original_file(tmp_path / "model_base.pth", state)
    caplog.set_level(logging.INFO, logger="blip_fast")
    model = load_pretrained(blip.BlipForConditionalGeneration, path, config=TINY)

    old = state["vision_model.embeddings.position_embedding"]  # [1, 1 + 2*2, 32]
    grid = old[:, 1:].reshape(1, 2, 2, 32).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 16, 32)
    expected = torch.cat([old[:, :1], grid], dim=1)
    torch.testing.assert_close(model.vision_model.embeddings.position_embedding.data, expected, rtol=0, atol=1e-7)
    assert not torch.equal(expected[:, 1:5], old[:, 1:])
    assert sum("resized position embeddings" in r.getMessage() for r in caplog.records) == 1
    rest = expected_for("BlipForConditionalGeneration", state)
    rest.pop("vision_model.embeddings.position_embedding")
    assert_state_equal({k: v for k, v in model.state_dict().items() if k in rest}, rest)


@pytest.mark.parametrize("task", list(TASK_NAMES))
def test_convert_original(tmp_path, task):
    state = pretraining_state(seed=7)
    path = original_file(tmp_path / "model_base.pth", state)
    out, written = convert_original(path, tmp_path / "hf", task=task, config=TINY)
    assert written == task
    hf = getattr(transformers, TASK_NAMES[task]).from_pretrained(out)
    assert_state_equal(hf.state_dict(), expected_for(TASK_NAMES[task], state))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [TASK_NAMES[task]]
    with pytest.raises(ValueError, match="unknown task"):
        convert_original(path, tmp_path / "x", task="ocr")


# ---------------------------------------------------------------------------------------------------- errors
def test_all_key_problems_in_one_error(tmp_path):
    state = pretraining_state(seed=8)
    del state["vision_model.encoder.layers.1.mlp.fc2.bias"]
    state["visual_encoder.head.weight"] = torch.randn(4, 32)  # not a BLIP tensor: unexpected, not dropped
    state["text_proj.weight"] = torch.randn(16, 31)
    path = original_file(tmp_path / "broken.pth", state)
    with pytest.raises(CheckpointError) as error:
        load_pretrained(blip.BlipForImageTextRetrieval, path, config=TINY)
    message = str(error.value)
    assert str(path) in message and "(3 problems)" in message, message
    assert "missing: vision_model.encoder.layers.1.mlp.fc2.bias" in message
    assert "unexpected: visual_encoder.head.weight" in message
    assert "shape: text_proj.weight is [16, 31] in the file, the model expects [16, 32]" in message


def test_strict_false_logs_missing_and_unexpected_but_not_shapes(tmp_path, caplog):
    state = pretraining_state(seed=9)
    del state["itm_head.bias"]
    state["itm_head.extra"] = torch.randn(2)
    path = original_file(tmp_path / "m.pth", state)
    caplog.set_level(logging.INFO, logger="blip_fast")
    model = load_pretrained(blip.BlipForImageTextRetrieval, path, config=TINY, strict=False)
    assert torch.equal(model.itm_head.weight, state["itm_head.weight"])
    assert any("itm_head.bias" in r.getMessage() and "itm_head.extra" in r.getMessage() for r in caplog.records)
    state["itm_head.weight"] = torch.randn(3, 32)
    path = original_file(tmp_path / "m.pth", state)
    with pytest.raises(CheckpointError, match="itm_head.weight is"):
        load_pretrained(blip.BlipForImageTextRetrieval, path, config=TINY, strict=False)


def test_tied_alias_disagreeing_is_an_error(tmp_path):
    state = pretraining_state(seed=10)
    state["text_decoder.cls.predictions.decoder.weight"] = state["text_decoder.bert.embeddings.word_embeddings.weight"] + 1
    path = original_file(tmp_path / "m.pth", state)
    with pytest.raises(CheckpointError, match="tied: text_decoder.cls.predictions.decoder.weight differs"):
        load_pretrained(blip.BlipForConditionalGeneration, path, config=TINY)


@pytest.mark.parametrize("keep", [0, 7, 0.5])
def test_truncated_safetensors(tmp_path, keep):
    hf_dir(tmp_path, "BlipForImageTextRetrieval", "safetensors")
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError, match=re.escape(f"cannot read {weights}")):
        load_pretrained(blip.BlipForImageTextRetrieval, tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_bin_and_pth(tmp_path, damage):
    hf_dir(tmp_path, "BlipForImageTextRetrieval", "bin")
    weights = tmp_path / "pytorch_model.bin"
    data = weights.read_bytes()
    weights.write_bytes(b"not a checkpoint " * 40 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=re.escape(f"cannot read {weights}")):
        load_pretrained(blip.BlipForImageTextRetrieval, tmp_path)
    pth = tmp_path / "model.pth"
    pth.write_bytes(weights.read_bytes())
    with pytest.raises(CheckpointError, match=re.escape(f"cannot read {pth}")):
        load_pretrained(blip.BlipForImageTextRetrieval, pth, config=TINY)


def test_missing_shard_and_dir_without_weights(tmp_path):
    hf_dir(tmp_path, "BlipForImageTextRetrieval", "safetensors-sharded")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"cannot read {shard}")):
        load_pretrained(blip.BlipForImageTextRetrieval, tmp_path)
    for name in os.listdir(tmp_path):
        if name != "config.json":
            os.remove(tmp_path / name)
    with pytest.raises(CheckpointError) as error:
        load_pretrained(blip.BlipForImageTextRetrieval, tmp_path)
    for name in ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"]:
        assert name in str(error.value)


class _Payload:
    """Pickles as a call that creates a file: proof of whether unpickling executed code."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_pth_is_loaded_weights_only(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.ones(1)}, "hook": _Payload(tmp_path / "executed")}, path)
    with pytest.raises(CheckpointError, match=re.escape(f"cannot read {path}")):
        load_pretrained(blip.BlipForConditionalGeneration, path, config=TINY)
    assert not (tmp_path / "executed").exists()
    torch.load(path, weights_only=False)  # the payload is real: a full unpickle does run it
    assert (tmp_path / "executed").exists()
