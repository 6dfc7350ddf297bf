"""A fake Hugging Face Hub cache: tiny random BLIP repos saved by transformers under real repo ids.

Nothing can be downloaded in CI, so the repos are written in huggingface_hub's cache layout
(``models--ORG--NAME/{refs/main, snapshots/COMMIT/...}``) and read with ``HF_HUB_OFFLINE=1``, exactly as a
machine that downloaded them before would read them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from tests.tiny_models import randomize_

#: The model-card repos and their task classes.
REPOS = {
    "Salesforce/blip-image-captioning-base": "BlipForConditionalGeneration",
    "Salesforce/blip-vqa-base": "BlipForQuestionAnswering",
    "Salesforce/blip-itm-base-coco": "BlipForImageTextRetrieval",
}
IMAGE_SIZE = 32
#: Added to [SEP]'s logit bias so that captions end at different lengths (tuned on these random weights).
SEP_BOOST = 1.6
# BLIP's token ids with the bert-base-uncased vocab: [DEC] bos, [SEP] ends captions, [PAD] 0; eos 2 as on the hub.
TEXT_IDS = dict(vocab_size=30524, bos_token_id=30522, sep_token_id=102, eos_token_id=2, pad_token_id=0)


def commit_of(repo_id: str, revision: str = "main") -> str:
    return hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()


def add_to_hub_cache(cache_dir: Path, repo_id: str, files_dir: Path, revision: str = "main") -> Path:
    """Copy ``files_dir``'s files into the cache as ``repo_id`` at branch ``revision``; returns the snapshot dir."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    commit = commit_of(repo_id, revision)
    snapshot = repo / "snapshots" / commit
    shutil.copytree(files_dir, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return snapshot


def hf_processor(vocab_file: Path, image_size: int = IMAGE_SIZE, **image_kwargs):
    """transformers' BlipProcessor as BLIP's repos hold it: bert-base-uncased plus [DEC] (bos) and [ENC]."""
    import transformers

    tokenizer = transformers.BertTokenizer(str(vocab_file), model_max_length=512)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    image_processor = transformers.BlipImageProcessor(size={"height": image_size, "width": image_size},
                                                      **image_kwargs)
    return transformers.BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def save_as_transformers_4(processor_dir: Path) -> None:
    """Rewrite a transformers-5 processor save in the layout transformers 4 writes (and the hub repos hold):
    ``preprocessor_config.json`` instead of ``processor_config.json``. A save by transformers 4 is left as it is."""
    if not (processor_dir / "processor_config.json").exists():
        assert (processor_dir / "preprocessor_config.json").exists(), f"no processor config in {processor_dir}"
        return
    config = json.loads((processor_dir / "processor_config.json").read_text())
    (processor_dir / "preprocessor_config.json").write_text(json.dumps(config["image_processor"], indent=2))
    (processor_dir / "processor_config.json").unlink()


def tiny_hf_repo(task: str, out_dir: Path, vocab_file: Path, transformers_4_layout: bool = False,
                 hidden: int = 48, **config_kwargs) -> Path:
    """A tiny random transformers model of ``task`` with the real vocab and its processor, saved in ``out_dir``."""
    import transformers

    config = transformers.BlipConfig(
        text_config=dict(hidden_size=hidden, num_attention_heads=3, intermediate_size=64, num_hidden_layers=2,
                         max_position_embeddings=64, **TEXT_IDS),
        vision_config=dict(hidden_size=hidden, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=8),
        image_text_hidden_size=24, **config_kwargs,
    )
    torch.manual_seed(0)
    model = randomize_(getattr(transformers, task)(config))
    with torch.no_grad():  # [SEP] likely enough that captions end at different lengths
        for decoder in [getattr(model, "text_decoder", None)]:
            if decoder is not None:
                decoder.cls.predictions.bias[TEXT_IDS["sep_token_id"]] += SEP_BOOST
    model.save_pretrained(out_dir)
    hf_processor(vocab_file).save_pretrained(out_dir)
    if transformers_4_layout:
        save_as_transformers_4(out_dir)
    return out_dir


def fake_hub_cache(root: Path, vocab_file: Path) -> Path:
    """The three model-card repos (the VQA one in transformers 4's layout) in a hub cache under ``root``."""
    cache = root / "hub"
    for repo_id, task in REPOS.items():
        files = tiny_hf_repo(task, root / "saved" / repo_id.split("/")[1], vocab_file,
                             transformers_4_layout=task == "BlipForQuestionAnswering")
        add_to_hub_cache(cache, repo_id, files)
    return cache
