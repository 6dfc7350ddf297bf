"""A task model with the tokenizer and image processor of its folder: what ``caption``, ``evaluate`` and CapFilt
load, checked to belong together (another model's tokenizer or processor size would give nonsense or a late
traceback)."""

from __future__ import annotations

import os
from typing import TypeVar

import torch

from blip_fast.checkpoint import CheckpointError
from blip_fast.data.transforms import BlipImageProcessor
from blip_fast.hub import HubOptions, resolve
from blip_fast.tokenizer import BlipTokenizer

Model = TypeVar("Model", bound=torch.nn.Module)


def load_task_model(
    model_class: type[Model], directory: str | os.PathLike, device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32, hub_options: HubOptions | None = None,
) -> tuple[Model, BlipTokenizer, BlipImageProcessor]:
    """A task model of ``model_class``, its tokenizer and image processor (saved, else the model's resolution) from
    one directory or hub id; a tokenizer that does not fit the model is refused
    (:meth:`BlipTokenizer.check_fits`), and so is a processor of another size (:meth:`BlipImageProcessor.for_model_dir`).
    So is a checkpoint that leaves modules freshly initialised (an NLVR2 model made from a retrieval or pre-training
    checkpoint, whose head only fine-tuning trains): their outputs would be noise."""
    directory = resolve(directory, hub_options)
    model = model_class.from_pretrained(directory, torch_dtype=dtype, device=device)
    if model.freshly_initialised:
        raise CheckpointError(
            f"{directory} is no {model_class.__name__} checkpoint: it lacks the {', '.join(model.freshly_initialised)}, "
            f"which would start random (fine-tune from it first, e.g. python -m blip_fast.train --task nlvr "
            f"--init_from {directory})")
    tokenizer = BlipTokenizer.from_pretrained(directory)
    tokenizer.check_fits(model.config.text, os.fspath(directory))
    processor = BlipImageProcessor.for_model_dir(directory, model.config.vision.image_size)
    return model, tokenizer, processor
