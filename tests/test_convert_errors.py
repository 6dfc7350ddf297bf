"""``blip-fast convert`` and ``save_pretrained`` on what a hostile user gives them (probe s18, items 4, 5, 6, 13): a
malformed med_config.json, a full disk, a file already in HuggingFace's layout, a safetensors file named .pth, a
plain pickle; each is one line that says what it is, naming the CLI's flags."""

import collections
import json
import os
import pickle
import warnings

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from blip_fast import checkpoint
from blip_fast.data.transforms import BlipImageProcessor
from blip_fast.errors import InvalidInputError, MissingFileError
from blip_fast.modeling.blip import BlipForConditionalGeneration
from blip_fast.tokenizer import BlipTokenizer
from tests.cli_runs import assert_user_error, run
from tests.hub_fixtures import tiny_hf_repo
from tests.tiny_models import to_original_key


@pytest.fixture(scope="module")
def good(tmp_path_factory, bert_vocab_dir):
    """A tiny transformers captioner folder (48 wide: 4 vision heads, 3 text heads) and its original state dict."""
    root = tmp_path_factory.mktemp("convert_errors")
    folder = tiny_hf_repo("BlipForConditionalGeneration", root / "captioner", bert_vocab_dir / "vocab.txt")
    model = BlipForConditionalGeneration.from_pretrained(folder)
    original = {to_original_key(key): value.clone() for key, value in model.state_dict().items()}
    pth = root / "cap.pth"
    torch.save({"model": original}, pth)
    return {"folder": folder, "pth": pth, "original": original, "root": root}


# ---------------------------------------------------------------------------------------------------- item 4
MED = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 48, "num_hidden_layers": 2}


@pytest.mark.parametrize("config, fragments", [
    (MED, ["has no num_attention_heads"]),
    ({**MED, "num_attention_heads": "3"}, ["num_attention_heads must be a positive integer, got \"3\""]),
    ({**MED, "num_attention_heads": 0}, ["num_attention_heads must be a positive integer, got 0"]),
    ({**MED, "num_attention_heads": True}, ["num_attention_heads must be a positive integer, got true"]),
    ({**MED, "num_attention_heads": 5}, ["num_attention_heads 5 does not divide hidden_size 48"]),
    ([1], ["holds a JSON list, not an object"]),
    ({"model_type": "blip", "text_config": {"hidden_size": 48, "num_attention_heads": 5}},
     ["text_config.num_attention_heads", "not a multiple of num_attention_heads 5"]),
    ({"model_type": "blip", "vision_config": [48]}, ["vision_config must be a JSON object"]),
], ids=["no heads", "heads a string", "heads 0", "heads true", "heads 5", "a list", "hf heads 5", "hf section list"])
def test_a_malformed_config_is_one_line_naming_it_and_the_key(good, tmp_path, capsys, config, fragments):
    path = tmp_path / "med_config.json"
    path.write_text(json.dumps(config))
    heads = ["--heads", "4"] if isinstance(config, dict) and config.get("model_type") == "bert" else []
    line = assert_user_error(*run(["convert", good["pth"], tmp_path / "out", "--config", path, *heads], capsys),
                             *fragments)
    assert str(path) in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- item 5
def _disk_full(*args, **kwargs):
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_a_full_disk_is_an_os_error_and_leaves_no_temp_file(good, tmp_path, monkeypatch):
    model = BlipForConditionalGeneration.from_pretrained(good["folder"])
    monkeypatch.setattr(checkpoint, "save_file", _disk_full)
    with pytest.raises(OSError, match="No space left on device") as caught:
        model.save_pretrained(tmp_path / "out")
    assert caught.value.errno == 28 and str(tmp_path / "out") in str(caught.value)
    assert os.listdir(tmp_path / "out") == []


def test_convert_on_a_full_disk_is_one_line(good, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(checkpoint, "save_file", _disk_full)
    code, stderr = run(["convert", good["pth"], tmp_path / "out", "--config", good["folder"]], capsys)
    assert code == 1 and "Traceback" not in stderr, stderr
    assert stderr.splitlines()[0].startswith("blip-fast: error: [Errno 28] cannot write the weights into ")
    assert "No space left on device" in stderr.splitlines()[0]
    assert os.listdir(tmp_path / "out") == []


def test_another_safetensors_error_is_not_taken_for_a_disk_error(good, tmp_path, monkeypatch):
    def refuses(*args, **kwargs):
        raise SafetensorError("Error while serializing: invalid tensor")

    monkeypatch.setattr(checkpoint, "save_file", refuses)
    with pytest.raises(SafetensorError, match="invalid tensor"):
        BlipForConditionalGeneration.from_pretrained(good["folder"]).save_pretrained(tmp_path / "out")


# ---------------------------------------------------------------------------------------------------- item 6
def test_a_huggingface_weights_file_is_refused_not_flipped(good, tmp_path, capsys):
    """Its keys are HF's already; converting it would write it with the original [ENC] semantics."""
    weights = good["folder"] / "model.safetensors"
    assert_user_error(*run(["convert", weights, tmp_path / "out", "--heads", "4", "3", "--tokenizer", good["folder"]],
                           capsys), f"{weights} is already a HuggingFace checkpoint",
                      f"load its folder {good['folder']} directly")
    assert not (tmp_path / "out").exists()
    elsewhere = tmp_path / "hf.pth"  # a copy without its folder: load the folder it came from
    torch.save(BlipForConditionalGeneration.from_pretrained(good["folder"]).state_dict(), elsewhere)
    assert_user_error(*run(["convert", elsewhere, tmp_path / "out", "--heads", "4", "3"], capsys),
                      "is already a HuggingFace checkpoint", "load the model folder it came from")


# ---------------------------------------------------------------------------------------------------- item 13
def test_a_safetensors_file_is_told_by_its_content_not_its_name(good, tmp_path, capsys):
    path = tmp_path / "original.pth"
    save_file(good["original"], str(path))
    argv = ["convert", path, tmp_path / "out", "--config", good["folder"], "--tokenizer", good["folder"]]
    assert run(argv, capsys)[0] == 0
    converted = BlipForConditionalGeneration.from_pretrained(tmp_path / "out").state_dict()
    source = BlipForConditionalGeneration.from_pretrained(good["folder"]).state_dict()
    assert all(torch.equal(converted[key], source[key]) for key in source)


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_plain_pickle_is_named_without_torchs_advice(tmp_path, capsys, protocol):
    path = tmp_path / "weights.pth"
    path.write_bytes(pickle.dumps(collections.OrderedDict(a=1), protocol=protocol))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = assert_user_error(*run(["convert", path, tmp_path / "out"], capsys),
                                 f"cannot read {path}: it is a plain Python pickle (pickle.dump)",
                                 "does not unpickle it, since unpickling can run code from the file")
    assert not caught, [str(warning.message) for warning in caught]
    assert "weights_only" not in line


def test_a_pickle_the_safe_loader_refuses_is_named_without_torchs_advice(tmp_path, capsys):
    """torch.save with pickle protocol 4 (whose FRAME opcode the weights-only unpickler lacks): no torch page, no
    torch warning."""
    path = tmp_path / "p4.pth"
    torch.save({"model": {"a": torch.ones(2)}}, path, pickle_protocol=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_user_error(*run(["convert", path, tmp_path / "out"], capsys),
                          "it holds pickled data that torch's safe loader refuses (Unsupported operand 149)")
    assert not caught, [str(warning.message) for warning in caught]


def test_sizes_that_do_not_fit_name_the_flags_that_gave_them(good, tmp_path, capsys):
    argv = ["convert", good["pth"], tmp_path / "out", "--tokenizer", good["folder"]]
    line = assert_user_error(*run([*argv, "--heads", "5"], capsys), "vision hidden_size 48 is not a multiple of "
                             "num_attention_heads 5", "--heads", "--config")
    assert "or the tokenizer" not in line
    other = BlipTokenizer.train(["a dog", "a cat on a mat"], vocab_size=60)
    other.save_pretrained(tmp_path / "other_tokenizer")
    assert_user_error(*run([*argv[:3], "--heads", "4", "3", "--tokenizer", tmp_path / "other_tokenizer"], capsys),
                      f"the tokenizer (tokenizer=, blip-fast convert --tokenizer) has {len(other)} tokens but "
                      f"{good['pth']}'s embeddings 30524 rows")


def test_a_null_image_processor_is_reported_as_such(good, tmp_path):
    path = tmp_path / "processor_config.json"
    path.write_text(json.dumps({"image_processor": None, "processor_class": "BlipProcessor"}))
    with pytest.raises(InvalidInputError, match=f"{path}: image_processor is a JSON null, not an object"):
        BlipImageProcessor.from_pretrained(tmp_path)
    path.write_text(json.dumps({"processor_class": "BlipProcessor"}))
    with pytest.raises(MissingFileError, match="its processor_config.json has no image_processor entry"):
        BlipImageProcessor.from_pretrained(tmp_path)
