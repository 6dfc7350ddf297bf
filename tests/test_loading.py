"""from_pretrained with the keywords transformers users pass: dtype/torch_dtype, device_map, attn_implementation,
low_cpu_mem_usage, use_safetensors; unknown keywords fail clearly."""

import pytest
import torch

import blip_fast
from blip_fast.loading import device_from_map, parse_dtype
from tests.tiny_models import tiny_hf_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def fp16_dir(tmp_path_factory):
    """A transformers save in float16: transformers 5 loads it as float16 unless told otherwise ("auto")."""
    directory = tmp_path_factory.mktemp("fp16")
    tiny_hf_model("BlipForImageTextRetrieval").half().save_pretrained(directory)
    return directory


@pytest.mark.parametrize("kwargs", [dict(), dict(dtype="auto"), dict(torch_dtype=torch.float32), dict(dtype="bfloat16"),
                                    dict(torch_dtype="float32"), dict(dtype=torch.float16, torch_dtype="float16")],
                         ids=["default", "auto", "torch_dtype", "dtype-str", "torch_dtype-str", "both-agree"])
def test_dtype_like_transformers(fp16_dir, kwargs):
    expected = transformers.BlipForImageTextRetrieval.from_pretrained(fp16_dir, **kwargs).dtype
    assert blip_fast.BlipForImageTextRetrieval.from_pretrained(fp16_dir, **kwargs).dtype == expected


def test_auto_dtype_without_config_entry_reads_the_weights(fp16_dir, tmp_path):
    import json
    import shutil

    shutil.copytree(fp16_dir, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    assert blip_fast.BlipForImageTextRetrieval.from_pretrained(tmp_path / "model").dtype == torch.float16


@pytest.mark.parametrize("device_map", ["cpu", "auto", {"": "cpu"}, {"vision_model": "cpu", "text_encoder": "cpu"},
                                        torch.device("cpu")], ids=["cpu", "auto", "empty-key", "same", "device"])
def test_device_map_onto_one_device(fp16_dir, device_map):
    model = blip_fast.BlipForImageTextRetrieval.from_pretrained(fp16_dir, device_map=device_map)
    assert model.device.type == "cpu"


def test_device_maps_that_need_several_devices_say_so():
    with pytest.raises(ValueError, match="2 devices.*one device"):
        device_from_map({"vision_model": "cpu", "text_encoder": 0})
    with pytest.raises(ValueError, match="one device"):
        device_from_map({"vision_model": "disk"})
    with pytest.raises(ValueError, match="not a device"):
        device_from_map("gpu please")
    assert device_from_map(1) == torch.device("cuda", 1)


def test_accepted_keywords_and_unknown_ones(fp16_dir):
    model = blip_fast.BlipForImageTextRetrieval.from_pretrained(
        fp16_dir, attn_implementation="sdpa", low_cpu_mem_usage=True, use_safetensors=True, local_files_only=True,
        dtype=torch.float32,
    )
    assert model.dtype == torch.float32
    with pytest.raises(TypeError, match=r"unsupported arguments \['trust_remote_cod'\].*supported: \["):
        blip_fast.BlipForImageTextRetrieval.from_pretrained(fp16_dir, trust_remote_cod=True)
    with pytest.raises(ValueError, match="disagree"):
        blip_fast.BlipForImageTextRetrieval.from_pretrained(fp16_dir, dtype="float16", torch_dtype=torch.float32)
    with pytest.raises(ValueError, match="dtype must be"):
        parse_dtype("float17")


def test_blip_fast_keywords_still_work(fp16_dir):
    model = blip_fast.BlipForImageTextRetrieval.from_pretrained(fp16_dir, torch_dtype=torch.float32, device="cpu",
                                                                hf_compat=False)
    assert not model.config.hf_compat and model.dtype == torch.float32
