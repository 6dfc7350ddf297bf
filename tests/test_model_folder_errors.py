"""A model folder with a malformed file (config.json, the image-processor settings, the tokenizer files) is one line
naming the file and the key, exit status 2, for every command that loads a model folder; the Python API raises
:class:`~blip_fast.errors.InvalidInputError`, a ``ValueError`` (probe s18, item 3)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from blip_fast.captioning import Captioner
from blip_fast.data.synthetic import SyntheticNoisyDataset
from blip_fast.errors import InvalidInputError
from blip_fast.modeling.blip import BlipForConditionalGeneration
from tests.cli_runs import assert_user_error, run
from tests.hub_fixtures import tiny_hf_repo
from tests.tiny_models import to_original_key


def _edit(name, change):
    """A case that loads ``name`` as JSON, applies ``change`` to it (a dict) and writes it back."""

    def apply(folder):
        path = folder / name
        values = json.loads(path.read_text())
        values = change(values) or values
        path.write_text(json.dumps(values))

    return apply


def _write(name, text):
    def apply(folder):
        (folder / name).write_text(text)

    return apply


def _set(*keys, value):
    """``values[keys[0]]...[keys[-1]] = value``."""

    def change(values):
        inner = values
        for key in keys[:-1]:
            inner = inner[key]
        inner[keys[-1]] = value

    return change


def _vocab_layout(*more):
    """The folder as original BLIP's bert dir holds its tokenizer (vocab.txt, no tokenizer.json), then ``more``."""

    def apply(folder, vocab_dir):
        (folder / "tokenizer.json").unlink()
        shutil.copyfile(vocab_dir / "vocab.txt", folder / "vocab.txt")
        for step in more:
            step(folder)

    apply.needs_vocab = True
    return apply


def _preprocessor(change):
    """A transformers-4 ``preprocessor_config.json`` (read before processor_config.json) with ``change``."""

    def apply(folder):
        settings = json.loads((folder / "processor_config.json").read_text())["image_processor"]
        (folder / "preprocessor_config.json").write_text(json.dumps(change(settings)))

    return apply


#: name: (how to break the folder, the file named, fragments of the message: the key and what is wrong).
CASES = {
    "config.json a list": (_write("config.json", "[1, 2]"), "config.json", ["holds a JSON list, not an object"]),
    "config.json bad json": (_write("config.json", '{"text_config": '), "config.json", ["is not valid JSON"]),
    "vision_config a string": (_edit("config.json", _set("vision_config", value="x")), "config.json",
                               ["vision_config must be a JSON object"]),
    "text heads a string": (_edit("config.json", _set("text_config", "num_attention_heads", value="3")),
                            "config.json", ["text_config.num_attention_heads", "must be an integer, got '3'"]),
    "text heads 5": (_edit("config.json", _set("text_config", "num_attention_heads", value=5)), "config.json",
                     ["text_config.num_attention_heads", "48 is not a multiple of num_attention_heads 5"]),
    "vision heads 0": (_edit("config.json", _set("vision_config", "num_attention_heads", value=0)), "config.json",
                       ["vision_config.num_attention_heads", "must be >= 1, got 0"]),
    "patch size 0": (_edit("config.json", _set("vision_config", "patch_size", value=0)), "config.json",
                     ["vision_config.patch_size", "must be >= 1"]),
    "hidden_act swish": (_edit("config.json", _set("text_config", "hidden_act", value="swish")), "config.json",
                         ["text_config.hidden_act", "'swish' is not supported"]),
    "vocab_size 10": (_edit("config.json", _set("text_config", "vocab_size", value=10)), "config.json",
                      ["text_config.bos_token_id", "outside the vocabulary (size 10)"]),
    "hidden_size null": (_edit("config.json", _set("text_config", "hidden_size", value=None)), "config.json",
                         ["text_config.hidden_size", "must be an integer, got None"]),
    "layer_norm_eps a string": (_edit("config.json", _set("vision_config", "layer_norm_eps", value="1e-5")),
                                "config.json", ["vision_config.layer_norm_eps", "must be a finite number"]),
    "dropout 2": (_edit("config.json", _set("text_config", "hidden_dropout_prob", value=2)), "config.json",
                  ["text_config.hidden_dropout_prob", "must lie in [0, 1]"]),
    "hf_compat a string": (_edit("config.json", _set("blip_fast_hf_compat", value="false")), "config.json",
                           ["blip_fast_hf_compat", "must be True or False"]),
    "architectures a string": (_edit("config.json", _set("architectures", value="BlipForConditionalGeneration")),
                               "config.json", ["architectures must be a list of class names"]),
    "processor bad json": (_write("processor_config.json", '{"image_processor": '), "processor_config.json",
                           ["cannot read", "JSONDecodeError"]),
    "processor a list": (_write("processor_config.json", "[]"), "processor_config.json",
                         ["holds a JSON list, not an object"]),
    "image_processor null": (_edit("processor_config.json", _set("image_processor", value=None)),
                             "processor_config.json", ["image_processor is a JSON null, not an object"]),
    "image_mean of two": (_edit("processor_config.json", _set("image_processor", "image_mean", value=[0.5, 0.5])),
                          "processor_config.json", ["image_mean needs one value or three"]),
    "image_std a string": (_edit("processor_config.json", _set("image_processor", "image_std", value="abc")),
                           "processor_config.json", ["image_std needs one value or three"]),
    "resample 99": (_edit("processor_config.json", _set("image_processor", "resample", value=99)),
                    "processor_config.json", ["resample must be a PIL resampling filter", "got 99"]),
    "size shortest_edge": (_edit("processor_config.json",
                                 _set("image_processor", "size", value={"shortest_edge": 32})),
                           "processor_config.json", ["size must be {height, width} or an int"]),
    "size a string": (_edit("processor_config.json",
                            _set("image_processor", "size", value={"height": "a", "width": 32})),
                      "processor_config.json", ["size must be a positive int or (height, width)"]),
    "do_resize a string": (_edit("processor_config.json", _set("image_processor", "do_resize", value="false")),
                           "processor_config.json", ["do_resize must be True or False, got 'false'"]),
    "preprocessor a list": (_preprocessor(lambda settings: [settings]), "preprocessor_config.json",
                            ["holds a JSON list, not an object"]),
    "preprocessor resample": (_preprocessor(lambda settings: {**settings, "resample": "bicubic"}),
                              "preprocessor_config.json", ["resample must be a PIL resampling filter"]),
    "tokenizer.json truncated": (_write("tokenizer.json", '{"x":'), "tokenizer.json",
                                 ["not a tokenizers tokenizer.json"]),
    "tokenizer_config bad json": (_write("tokenizer_config.json", "["), "tokenizer_config.json",
                                  ["cannot read", "JSONDecodeError"]),
    "tokenizer_config a list": (_write("tokenizer_config.json", "[1]"), "tokenizer_config.json",
                                ["holds a JSON list, not an object"]),
    "model_max_length a string": (_edit("tokenizer_config.json", _set("model_max_length", value="512")),
                                  "tokenizer_config.json", ["model_max_length must be a number or null"]),
    "do_lower_case a string": (_vocab_layout(_edit("tokenizer_config.json", _set("do_lower_case", value="yes"))),
                               "tokenizer_config.json", ["do_lower_case must be true or false"]),
    "added token id a string": (_vocab_layout(_write("added_tokens.json", '{"[DEC]": "30522"}')),
                                "added_tokens.json", ["[DEC]: the id must be an integer"]),
}
CONFIG_CASES = [name for name, (_, file, _) in CASES.items() if file == "config.json"]
TOKENIZER_CASES = [name for name, (_, file, _) in CASES.items() if file.startswith(("tokenizer", "added"))]


@pytest.fixture(scope="module")
def good(tmp_path_factory, bert_vocab_dir):
    """A tiny transformers captioner and ITM model (transformers 5's layout), its original .pth, three images."""
    root = tmp_path_factory.mktemp("model_folder_errors")
    vocab = bert_vocab_dir / "vocab.txt"
    captioner = tiny_hf_repo("BlipForConditionalGeneration", root / "captioner", vocab)
    retrieval = tiny_hf_repo("BlipForImageTextRetrieval", root / "retrieval", vocab)
    pth = root / "cap.pth"
    state = BlipForConditionalGeneration.from_pretrained(captioner).state_dict()
    torch.save({"model": {to_original_key(key): value for key, value in state.items()}}, pth)
    annotations = SyntheticNoisyDataset(3, noise_fraction=0.0, seed=0).write_images(root / "data")
    image = root / "data" / json.loads(annotations.read_text())[0]["image"]
    return {"captioner": captioner, "retrieval": retrieval, "pth": pth, "annotations": annotations,
            "image_root": root / "data", "image": image, "vocab_dir": bert_vocab_dir}


def broken(good, tmp_path, case, source="captioner"):
    """A copy of the ``source`` model folder, broken as ``case`` says; returns it."""
    folder = tmp_path / case.replace(" ", "_")
    shutil.copytree(good[source], folder)
    apply = CASES[case][0]
    apply(folder, good["vocab_dir"]) if getattr(apply, "needs_vocab", False) else apply(folder)
    return folder


def assert_one_line(code, stderr, path: Path, fragments):
    """Exit 2, one stderr line naming ``path`` and every fragment, no traceback."""
    assert_user_error(code, stderr, str(path), *fragments)


@pytest.mark.parametrize("case", list(CASES))
def test_caption_names_the_file_and_the_key(good, tmp_path, capsys, case):
    folder = broken(good, tmp_path, case)
    _, name, fragments = CASES[case]
    code, stderr = run(["caption", good["image"], "--model", folder, "--workers", "0", "--no-progress"], capsys)
    assert_one_line(code, stderr, folder / name, fragments)


@pytest.mark.parametrize("case", list(CASES))
def test_the_python_api_raises_invalid_input(good, tmp_path, case):
    """Every loader of a model folder: an InvalidInputError, which existing ``except ValueError`` callers catch."""
    folder = broken(good, tmp_path, case)
    _, name, fragments = CASES[case]
    with pytest.raises(InvalidInputError) as caught:
        Captioner.from_pretrained(folder)
    assert isinstance(caught.value, ValueError)
    assert str(folder / name) in str(caught.value) and all(fragment in str(caught.value) for fragment in fragments)
    if case in CONFIG_CASES:
        with pytest.raises(InvalidInputError, match="config.json"):
            BlipForConditionalGeneration.from_pretrained(folder)


@pytest.mark.parametrize("case", ["text heads a string", "image_processor null", "tokenizer.json truncated"])
def test_evaluate_and_capfilt_name_the_file_and_the_key(good, tmp_path, capsys, case):
    _, name, fragments = CASES[case]
    captioner = broken(good, tmp_path / "captioner", case)
    argv = ["evaluate", "--task", "caption", "--model", captioner, "--annotations", good["annotations"],
            "--image-root", good["image_root"], "--device", "cpu"]
    assert_one_line(*run(argv, capsys), captioner / name, fragments)
    argv = ["capfilt", "--captioner", captioner, "--filter", good["retrieval"], "--input", good["annotations"],
            "--image-root", good["image_root"], "--output", tmp_path / "out", "--workers", "0", "--device", "cpu"]
    assert_one_line(*run(argv, capsys), captioner / name, fragments)
    retrieval = broken(good, tmp_path / "filter", case, source="retrieval")
    argv[2], argv[4] = good["captioner"], retrieval
    assert_one_line(*run(argv, capsys), retrieval / name, fragments)


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_convert_config_names_the_file_and_the_key(good, tmp_path, capsys, case):
    folder = broken(good, tmp_path, case)
    _, name, fragments = CASES[case]
    argv = ["convert", good["pth"], tmp_path / "out", "--config", folder, "--tokenizer", good["captioner"]]
    assert_one_line(*run(argv, capsys), folder / name, fragments)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", TOKENIZER_CASES)
def test_convert_tokenizer_names_the_file_and_the_key(good, tmp_path, capsys, case):
    folder = broken(good, tmp_path, case)
    _, name, fragments = CASES[case]
    argv = ["convert", good["pth"], tmp_path / "out", "--config", good["captioner"], "--tokenizer", folder]
    assert_one_line(*run(argv, capsys), folder / name, fragments)
    assert not (tmp_path / "out").exists()
