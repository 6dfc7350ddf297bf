"""The demo's ImageNet: the image encoder both of a seed's pre-trainings start from.

BLIP does not pre-train its ViT from random weights: it starts from a ViT trained to classify ImageNet's objects
(DeiT's). The demo's analogue trains the tiny ViT from scratch to name the object -- shape and colour -- in the drawn
scenes of a labelled set of its own, drawn apart from every split the demo trains or tests on
(:data:`VISION_DATA_SEED`; labels, no captions), and hands it to pre-training (``blip_fast.train --vision_init``).
From random weights, the tiny ViT does not learn shapes from captions in the demo's budget (the README's attribute
probe).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from blip_fast.atomic_files import atomic_write
from blip_fast.config import BlipConfig, VisionConfig
from blip_fast.data.synthetic import COLORS, SHAPES, SyntheticNoisyDataset
from blip_fast.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from blip_fast.modeling.vit import BlipVisionModel

#: The labelled set's synthetic seed: scenes apart from the demo's data (7) and caption test set (8).
VISION_DATA_SEED = 9
#: The classifier's labels, Scene field -> class names: what object a scene shows. Shape alone is not enough: a ViT
#: trained to name shapes learns to ignore colour, and pre-training's few hundred steps do not bring it back (seed 0's
#: CapFilt captions then named the colour of 11.5% of the images).
LABELS = {"shape": SHAPES, "color": tuple(sorted(COLORS))}
#: Scenes held out of the classifier's training, to report how well it names each label.
HELD_OUT = 200


def scene_pixels(images: Sequence[PIL.Image.Image]) -> torch.Tensor:
    """``[N, 3, H, W]`` float tensor of RGB ``images``, normalised as the demo's training transform does."""
    pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images]))
    mean, std = (torch.tensor(values).view(1, 3, 1, 1) for values in (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    return (pixels.permute(0, 3, 1, 2).float() / 255 - mean) / std


def train_classifier(vision: VisionConfig, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[int],
                     steps: int, lr: float = 1e-3, batch: int = 32, seed: int = 0, position_std: float | None = None,
                     frozen: BlipVisionModel | None = None) -> tuple[BlipVisionModel, torch.nn.Linear]:
    """A ViT trained from scratch to classify ``images``: one linear head on the class token, one cross-entropy per
    label column (``labels[:, k]`` has ``classes[k]`` classes), AdamW at ``lr`` after a 20-step linear warmup, batches
    of ``batch`` drawn with replacement; ``position_std`` re-draws the position table's initial weights. Given a
    ``frozen`` ViT, only the head is trained on its features (a linear probe of what it knows)."""
    torch.manual_seed(seed)
    model, head = frozen or BlipVisionModel(vision), torch.nn.Linear(vision.hidden_size, sum(classes))
    if position_std is not None and frozen is None:
        with torch.no_grad():
            model.embeddings.position_embedding.normal_(0.0, position_std)
    model.requires_grad_(frozen is None)
    trained = [*head.parameters()] + ([] if frozen is not None else [*model.parameters()])
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20)
        rows = torch.randint(0, len(images), (batch,), generator=generator)
        logits = head(model(images[rows]).last_hidden_state[:, 0]).split(list(classes), dim=1)
        loss = sum(F.cross_entropy(part, labels[rows, column]) for column, part in enumerate(logits))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), head


def accuracies(model: BlipVisionModel, head: torch.nn.Linear, images: torch.Tensor, labels: torch.Tensor,
               classes: Sequence[int]) -> list[float]:
    """Percent of ``images`` whose predicted class is right, per label column."""
    with torch.no_grad():
        logits = head(model(images).last_hidden_state[:, 0]).split(list(classes), dim=1)
    return [100.0 * float((part.argmax(1) == labels[:, column]).float().mean()) for column, part in enumerate(logits)]


def pretrain_vision(out_file: str | os.PathLike, image_size: int, images: int, steps: int,
                    seed: int) -> dict[str, Any]:
    """Train the tiny preset's ViT to name the object of ``images`` labelled scenes -- its shape and its colour, the
    classes (:data:`LABELS`) -- for ``steps`` steps and save it as ``out_file`` (safetensors, ``vision_model.*``:
    what ``--vision_init`` reads); returns how often it names each of :data:`HELD_OUT` other scenes right (%)."""
    dataset = SyntheticNoisyDataset(images + HELD_OUT, 0.0, seed=VISION_DATA_SEED, image_size=image_size)
    pixels = scene_pixels([dataset.image(index) for index in range(images + HELD_OUT)])
    labels = torch.tensor([[names.index(getattr(dataset.scene(index), field)) for field, names in LABELS.items()]
                           for index in range(images + HELD_OUT)])
    classes = [len(names) for names in LABELS.values()]
    model, head = train_classifier(BlipConfig.tiny(image_size=image_size).vision, pixels[:images], labels[:images],
                                   classes, steps, seed=seed)
    held_out = accuracies(model, head, pixels[images:], labels[images:], classes)
    state = {f"vision_model.{key}": tensor.contiguous() for key, tensor in model.state_dict().items()}
    atomic_write(Path(out_file), lambda tmp: save_file(state, tmp))
    return {"images": images, "steps": steps, "held_out_accuracy": dict(zip(LABELS, held_out))}
