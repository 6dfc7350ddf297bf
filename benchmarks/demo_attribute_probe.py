"""Can the demo's tiny ViT see what its captions name? Trains it from scratch with the scene attributes themselves as
labels (shape, count, position: a linear head on the class token, no captions), on the demo's first 2,000 scenes, and
reports held-out accuracy next to a uniform guess. An upper bound on what pre-training can teach the ViT about each
attribute at the demo's data size and step budget.

`--layout jittered` redraws the same scenes as the demo drew them before its scenes moved onto a grid: each shape
jittered inside its region, across the ViT's patch borders. It shows why they moved: the tiny ViT must then learn each
shape again at every offset from its patch grid, and at the demo's budget it barely names one. `--frozen MODEL_DIR`
trains only the head, on the frozen ViT of a pre-trained model: what pre-training taught it.

    python -m benchmarks.demo_attribute_probe --steps 400 --position-std 0.5 --lr 5e-4 --layout jittered
    python -m benchmarks.demo_attribute_probe --frozen blip_fast_demo/seed-0/pretrain_noisy/export/retrieval
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from collections.abc import Sequence

import PIL.Image
import torch

from blip_fast.config import BlipConfig
from blip_fast.data.synthetic import (
    COUNT_WORDS,
    POSITIONS,
    SHAPES,
    Scene,
    SyntheticNoisyDataset,
    draw_background,
    draw_shape,
)
from blip_fast.demo import DATA_SEED, SCALES
from blip_fast.demo_vision import accuracies, scene_pixels, train_classifier
from blip_fast.modeling.blip import BlipForImageTextRetrieval

#: attribute -> (number of classes, the scene's class index)
ATTRIBUTES = {
    "shape": (len(SHAPES), lambda scene: SHAPES.index(scene.shape)),
    "count": (len(COUNT_WORDS), lambda scene: scene.count - 1),
    "position": (len(POSITIONS), lambda scene: POSITIONS.index(scene.position)),
}

#: The regions the jittered layout spread a group over, as (x0, y0, x1, y1) fractions of the image side.
JITTERED_REGIONS = {
    "left": (0.0, 0.1, 0.48, 0.9), "right": (0.52, 0.1, 1.0, 0.9), "top": (0.1, 0.0, 0.9, 0.48),
    "bottom": (0.1, 0.52, 0.9, 1.0), "center": (0.22, 0.22, 0.78, 0.78),
}


def draw_jittered(scene: Scene, rng: random.Random, size: int) -> PIL.Image.Image:
    """``scene`` as the demo drew it until 2026-12-01: the group along its region's long axis, one slot per shape,
    each shape scaled by 0.75-1 and jittered inside its slot (1.5 px kept free at the slot's borders)."""
    image = draw_background(scene, size)
    x0, y0, x1, y1 = (fraction * size for fraction in JITTERED_REGIONS[scene.position])
    horizontal = (x1 - x0) >= (y1 - y0)
    slot = ((x1 - x0) if horizontal else (y1 - y0)) / scene.count
    across = (y1 - y0) if horizontal else (x1 - x0)
    half_max = 0.4 * min(slot, across)
    for k in range(scene.count):
        half = half_max * rng.uniform(0.75, 1.0)
        slack_along, slack_across = max(slot / 2 - half - 1.5, 0.0), max(across / 2 - half - 1.5, 0.0)
        along = (k + 0.5) * slot + rng.uniform(-slack_along, slack_along)
        offset = across / 2 + rng.uniform(-slack_across, slack_across)
        cx, cy = (x0 + along, y0 + offset) if horizontal else (x0 + offset, y0 + along)
        draw_shape(image, scene.shape, cx, cy, half, scene.color)
    return image


#: layout -> how a scene is drawn ("demo": the demo's own images)
LAYOUTS = ("demo", "jittered")


def _draw(dataset: SyntheticNoisyDataset, index: int, layout: str) -> PIL.Image.Image:
    if layout == "demo":
        return dataset.image(index)
    return draw_jittered(dataset.scene(index), random.Random(f"probe-layout/{index}"), dataset.image_size)


def _scenes(train: int, test: int, image_size: int, layout: str = "demo") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (normalised as the demo's training transform does) and their attribute labels ``[N, 3]``: the demo's
    scenes, same seed, drawn in ``layout``."""
    dataset = SyntheticNoisyDataset(train + test, 0.0, seed=DATA_SEED, image_size=image_size)
    images = scene_pixels([_draw(dataset, index, layout) for index in range(train + test)])
    labels = torch.tensor([[label(dataset.scene(index)) for _, label in ATTRIBUTES.values()]
                           for index in range(train + test)])
    return images, labels


def probe(steps: int, image_size: int = 40, patch_size: int = 8, lr: float = 1e-3, position_std: float = 0.02,
          batch: int = 32, train: int = 2000, test: int = 200, seed: int = 0, layout: str = "demo",
          frozen: str | None = None) -> dict[str, float]:
    """Held-out accuracy (%) per attribute after ``steps`` AdamW steps (linear warmup over 20) on ``train`` scenes:
    of a ViT trained from scratch, or of a linear head on the ``frozen`` ViT of a model directory."""
    images, labels = _scenes(train, test, image_size, layout)
    vision = dataclasses.replace(BlipConfig.tiny(image_size=image_size).vision, patch_size=patch_size)
    frozen_vit = None
    if frozen is not None:
        retrieval = BlipForImageTextRetrieval.from_pretrained(frozen)
        frozen_vit, vision = retrieval.vision_model, retrieval.config.vision
    classes = [classes for classes, _ in ATTRIBUTES.values()]
    model, head = train_classifier(vision, images[:train], labels[:train], classes, steps, lr, batch, seed,
                                   position_std, frozen_vit)
    return dict(zip(ATTRIBUTES, accuracies(model, head, images[train:], labels[train:], classes)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo_attribute_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=SCALES["full"].image_size)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak LR (the demo's ViT initialisation's)")
    parser.add_argument("--position-std", type=float, default=0.02, help="position embeddings' initial std")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frozen", metavar="MODEL_DIR", help="probe the frozen ViT of this retrieval model (a demo "
                        "stage's export/retrieval): only the linear head trains")
    parser.add_argument("--layout", choices=LAYOUTS, default="demo",
                        help="demo: the demo's scenes as drawn (each shape on a grid cell of its own); jittered: "
                             "as the demo drew them before (each shape anywhere in its region)")
    args = parser.parse_args(argv)
    accuracy = probe(args.steps, args.image_size, args.patch_size, args.lr, args.position_std, seed=args.seed,
                     layout=args.layout, frozen=args.frozen)
    chance = {name: 100.0 / classes for name, (classes, _) in ATTRIBUTES.items()}
    print(json.dumps({"settings": vars(args), "accuracy": accuracy, "uniform_guess": chance}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
