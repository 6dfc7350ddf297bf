"""Hub ids wherever a model directory is accepted: the cache, revisions, offline mode, weight layouts, errors."""

import json
import shutil

import pytest
import torch

import blip_fast
from blip_fast import hub
from blip_fast.hub import HubError, HubOptions
from tests.hub_fixtures import add_to_hub_cache, commit_of, tiny_hf_repo
from tests.tiny_models import assert_close

transformers = pytest.importorskip("transformers")

REPO = "Salesforce/blip-image-captioning-base"


@pytest.fixture(scope="module")
def saved_repo(tmp_path_factory, bert_vocab_dir):
    return tiny_hf_repo("BlipForConditionalGeneration", tmp_path_factory.mktemp("repo"), bert_vocab_dir / "vocab.txt")


@pytest.fixture
def cache(tmp_path, saved_repo):
    cache = tmp_path / "hub"
    add_to_hub_cache(cache, REPO, saved_repo)
    return cache


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 as huggingface_hub sees it (it reads the variable once, at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _pixels(batch=2):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_local_paths_pass_through_and_impossible_ids_fail(tmp_path):
    assert hub.resolve(tmp_path) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a Hugging Face Hub id"):
        hub.resolve(tmp_path / "a" / "b" / "c")
    assert hub.looks_like_repo_id("Salesforce/blip-vqa-base") and hub.looks_like_repo_id("bert-base-uncased")
    assert not hub.looks_like_repo_id("a/b/c") and not hub.looks_like_repo_id("a--b/c")
    assert hub.looks_like_repo_id("a") and hub.looks_like_repo_id("org/blip_v1.0")
    for path in ("./model", "models/.hidden", "-model", "model-", "org/model.", ".", "a/"):
        assert not hub.looks_like_repo_id(path), path


def test_cached_id_loads_like_transformers(cache, saved_repo, offline):
    options = dict(cache_dir=cache)
    model = blip_fast.BlipForConditionalGeneration.from_pretrained(REPO, **options)
    hf_model = transformers.BlipForConditionalGeneration.from_pretrained(REPO, **options)
    assert torch.equal(model.generate(_pixels()), hf_model.generate(pixel_values=_pixels()))
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / commit_of(REPO)
    assert hub.resolve(REPO, HubOptions(cache_dir=cache)) == str(snapshot)
    tokenizer = blip_fast.BlipTokenizer.from_pretrained(REPO, cache_dir=cache)
    assert tokenizer("a dog").input_ids == [101, 1037, 3899, 102]
    assert blip_fast.BlipImageProcessor.from_pretrained(REPO, cache_dir=cache).size == (32, 32)
    processor = blip_fast.BlipProcessor.from_pretrained(REPO, cache_dir=cache, local_files_only=True)
    assert processor.tokenizer.bos_token_id == 30522


def test_hf_home_and_hf_hub_cache_are_the_default_cache(cache, offline, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    model = blip_fast.BlipForConditionalGeneration.from_pretrained(REPO)
    assert model.config.text.vocab_size == 30524


def test_revision_branch_and_commit(cache, saved_repo, tmp_path, offline):
    other = tmp_path / "v2"
    shutil.copytree(saved_repo, other)
    config = json.loads((other / "generation_config.json").read_text())
    (other / "generation_config.json").write_text(json.dumps({**config, "num_beams": 2}))
    add_to_hub_cache(cache, REPO, other, revision="v2")
    for revision in ("v2", commit_of(REPO, "v2")):
        model = blip_fast.BlipForConditionalGeneration.from_pretrained(REPO, cache_dir=cache, revision=revision)
        assert model.saved_generation_settings["num_beams"] == 2
    assert "num_beams" not in blip_fast.BlipForConditionalGeneration.from_pretrained(
        REPO, cache_dir=cache).saved_generation_settings


@pytest.mark.parametrize("switch", ["env", "local_files_only"])
def test_absent_id_offline_names_the_id_and_the_cache(tmp_path, monkeypatch, switch):
    from huggingface_hub import constants

    kwargs = dict(cache_dir=tmp_path / "empty")
    if switch == "env":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    else:
        kwargs["local_files_only"] = True
    for load in (blip_fast.BlipForConditionalGeneration.from_pretrained, blip_fast.BlipProcessor.from_pretrained,
                 blip_fast.BlipTokenizer.from_pretrained):
        with pytest.raises(HubError) as info:
            load("Salesforce/blip-not-cached", **kwargs)
        message = str(info.value)
        assert "'Salesforce/blip-not-cached'" in message and str(tmp_path / "empty") in message
        assert ("HF_HUB_OFFLINE=1" if switch == "env" else "local_files_only=True") in message
        assert info.value.__cause__ is None and info.value.__context__ is None, "one clean error, no chained traceback"


@pytest.mark.parametrize("layout", ["sharded-safetensors", "bin", "sharded-bin", "both"])
def test_weight_layouts(tmp_path, saved_repo, layout, offline):
    """transformers' order: safetensors (single, then index) before pytorch_model.bin (single, then index)."""
    files = tmp_path / "files"
    shutil.copytree(saved_repo, files)
    model = blip_fast.BlipForConditionalGeneration.from_pretrained(files)
    if layout != "both":
        (files / "model.safetensors").unlink()
    _write_weights(model, files, safe=layout.endswith("safetensors"), shards=2 if layout.startswith("sharded") else 1)
    if layout == "both":  # a .bin that differs: it must not be read while safetensors exist
        state = torch.load(files / "pytorch_model.bin", weights_only=True)
        state["vision_model.post_layernorm.bias"] += 1.0
        torch.save(state, files / "pytorch_model.bin")
    cache = tmp_path / "hub"
    add_to_hub_cache(cache, REPO, files)
    loaded = blip_fast.BlipForConditionalGeneration.from_pretrained(REPO, cache_dir=cache)
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    if layout == "both":
        from_bin = blip_fast.BlipForConditionalGeneration.from_pretrained(REPO, cache_dir=cache, use_safetensors=False)
        assert not torch.equal(from_bin.vision_model.post_layernorm.bias, model.vision_model.post_layernorm.bias)
    else:
        safe = layout == "sharded-safetensors"
        with pytest.raises(HubError, match="model.safetensors" if not safe else "pytorch_model.bin"):
            blip_fast.BlipForConditionalGeneration.from_pretrained(REPO, cache_dir=cache, use_safetensors=not safe)


def _write_weights(model, directory, safe: bool, shards: int) -> None:
    """The model's tensors as one file or ``shards`` files plus transformers' index json."""
    from safetensors.torch import save_file

    from blip_fast.checkpoint import state_dict_to_save

    state = state_dict_to_save(model)
    keys = sorted(state)
    extension = "safetensors" if safe else "bin"
    stem = "model" if safe else "pytorch_model"
    names = [f"{stem}.{extension}"] if shards == 1 else [
        f"{stem}-{index + 1:05d}-of-{shards:05d}.{extension}" for index in range(shards)]
    weight_map = {}
    for index, name in enumerate(names):
        part = {key: state[key] for key in keys[index::shards]}
        save_file(part, directory / name) if safe else torch.save(part, directory / name)
        weight_map.update(dict.fromkeys(part, name))
    if shards > 1:
        (directory / f"{stem}.{extension}.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_outputs_equal_transformers_from_the_same_cached_id(cache, offline):
    hf_model = transformers.BlipForConditionalGeneration.from_pretrained(REPO, cache_dir=cache)
    model = blip_fast.BlipForConditionalGeneration.from_pretrained(REPO, cache_dir=cache)
    ids = torch.tensor([[101, 1037, 3899, 102]])
    with torch.no_grad():
        assert_close(model(_pixels(1), ids).logits, hf_model(pixel_values=_pixels(1), input_ids=ids).logits)


def test_cli_takes_hub_ids(cache, offline, monkeypatch, tmp_path, capsys):
    from huggingface_hub import constants

    from blip_fast import cli
    from tests.test_transforms import random_image

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    random_image("RGB", (40, 30)).save(tmp_path / "a.png")
    assert cli.main(["caption", str(tmp_path / "a.png"), "--model", REPO, "--max-length", "8", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith(str(tmp_path / "a.png") + "\t")


def test_cli_offline_absent_id_is_one_line(tmp_path):
    """The acceptance check: offline and not cached -> one line naming the id and the cache, exit 2, no traceback."""
    import os
    import subprocess
    import sys

    from tests.test_transforms import random_image

    random_image("RGB", (8, 8)).save(tmp_path / "a.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "blip_fast.cli", "caption", str(tmp_path / "a.png"), "--model",
                             "Salesforce/blip-image-captioning-large"], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("blip-fast: error: 'Salesforce/blip-image-captioning-large'")
    assert str(tmp_path / "cache") in result.stderr and "HF_HUB_OFFLINE=1" in result.stderr


def test_training_init_from_takes_a_hub_id(cache, offline, monkeypatch):
    """``--init_from Salesforce/...`` fine-tunes from the cached snapshot: its config and its tokenizer."""
    from huggingface_hub import constants

    from blip_fast.config import BlipConfig
    from blip_fast.training.tasks import InitSource

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    source = InitSource(REPO)
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / commit_of(REPO)
    assert source.path == snapshot and source.tokenizer_dir == snapshot and source.checkpoint is None
    assert source.config == BlipConfig.from_hf(snapshot)
    with pytest.raises(HubError, match="Salesforce/blip-itm-large-coco"):
        InitSource("Salesforce/blip-itm-large-coco")
