"""The built-in synthetic noisy image-text dataset: drawn scenes, compositional captions, known label noise.

Each sample is a small RGB scene -- one to three shapes of one colour, each on a cell of a 5 x 5 grid, in one region
of a plain or patterned background -- and a caption that describes it ("Two red circles on the left of a striped blue
background."). A `noise_fraction` of the samples get a *wrong* caption instead, one that describes another scene (a
different shape or colour), while the true caption is kept beside it: training sees web-like noise, and CapFilt can
later be scored against the ground truth.

Everything is a pure function of `(seed, index)`: sample `i` has the same scene, pixels and captions whatever order
or process asks for it, so the set needs no files (it is drawn on the fly by `SyntheticDataset`), yet can be written
out as PNGs plus a BLIP json (`write_images`, `write_blip_json`) and read back by `BlipJsonDataset`. The set of noisy
indices is exact: `round(noise_fraction * num_samples)` of them, drawn by a seeded permutation.

Captions are written with mixed case and punctuation on purpose (BLIP's `pre_caption` cleans them in the datasets).
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw

COLORS = {
    "red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 220), "yellow": (240, 210, 40),
    "orange": (245, 140, 30), "purple": (140, 50, 180), "pink": (245, 130, 190), "brown": (130, 80, 40),
    "white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross")
PLURALS = {"cross": "crosses"}
POSITIONS = ("left", "right", "top", "bottom", "center")
PATTERNS = ("plain", "striped", "checkered", "dotted")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}

#: The scene is a GRID x GRID board; each shape sits centred on a cell of its own. With image_size a multiple of
#: GRID x the ViT's patch size (40 px for the tiny ViT's 8 px patches), every shape then shows the same offset from
#: the patch grid: a ViT must otherwise learn each shape again at every offset, which the demo's tiny one cannot in
#: its budget (benchmarks/demo_attribute_probe.py measures both).
GRID = 5
#: Each region's cells as (row, column): disjoint, so the cells of a group say where it is (corners stay empty).
REGION_CELLS = {
    "left": ((1, 0), (2, 0), (3, 0)), "right": ((1, 4), (2, 4), (3, 4)), "top": ((0, 1), (0, 2), (0, 3)),
    "bottom": ((4, 1), (4, 2), (4, 3)), "center": ((1, 2), (2, 1), (2, 2), (2, 3), (3, 2)),
}
_WHERE = {  # "... {where}", and "... {where} of a ... background"
    "left": ("on the left", "on the left side"), "right": ("on the right", "on the right side"),
    "top": ("at the top", "near the top"), "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the center", "in the middle"),
}
_TEMPLATES = (
    "{Objects} {where} of {a_background} background.",
    "A picture of {objects} {where}, on {a_background} background.",
    "{Objects} {where}. The background is {background}.",
    "There {are} {objects} {where} on {a_background} background",
    "{A_background} background with {objects} {where}",
    "{objects} placed {where} against {a_background} backdrop",
)


@dataclass(frozen=True)
class Scene:
    """What one image shows: `count` shapes of one colour in one region, over a background colour and pattern."""

    shape: str
    color: str
    count: int
    position: str
    background: str
    pattern: str

    def describes_same_objects(self, other: Scene) -> bool:
        """Same shape and colour: a caption of `other` would not be clearly wrong for this scene."""
        return self.shape == other.shape and self.color == other.color


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _visible_on(color: str, background: str) -> bool:
    """Whether shapes of `color` stand out from `background` and from its pattern tone (RGB distance > 90)."""
    far = lambda a, b: sum((x - y) ** 2 for x, y in zip(a, b)) > 90**2
    return far(COLORS[color], COLORS[background]) and far(COLORS[color], _shade(COLORS[background]))


def _sample_scene(rng: random.Random) -> Scene:
    shape, color = rng.choice(SHAPES), rng.choice(sorted(COLORS))
    background = rng.choice([name for name in sorted(COLORS) if _visible_on(color, name)])
    return Scene(shape, color, rng.randint(1, 3), rng.choice(POSITIONS), background, rng.choice(PATTERNS))


def render_caption(scene: Scene, rng: random.Random) -> str:
    """One caption of `scene` in a template and wording drawn from `rng`."""
    noun = scene.shape if scene.count == 1 else PLURALS.get(scene.shape, scene.shape + "s")
    if scene.count == 1:
        quantity = rng.choice((_article(scene.color), "one"))
    else:
        quantity = COUNT_WORDS[scene.count]
    objects = f"{quantity} {scene.color} {noun}"
    background = scene.background if scene.pattern == "plain" else f"{scene.pattern} {scene.background}"
    a_background = f"{_article(background)} {background}"
    text = rng.choice(_TEMPLATES).format(
        objects=objects, Objects=objects[0].upper() + objects[1:], where=rng.choice(_WHERE[scene.position]),
        background=background, a_background=a_background, A_background=a_background[0].upper() + a_background[1:],
        are="is" if scene.count == 1 else "are",
    )
    return text


def _shape_points(shape: str, cx: float, cy: float, half: float) -> list[tuple[float, float]]:
    """Polygon vertices of `shape` centred at (cx, cy) inside a box of side 2*half (circle/square drawn apart)."""
    if shape == "triangle":
        return [(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)]
    if shape == "diamond":
        return [(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)]
    if shape == "hexagon":
        return [(cx + half * math.cos(k * math.pi / 3), cy + half * math.sin(k * math.pi / 3)) for k in range(6)]
    if shape == "star":
        return [
            (cx + radius * math.sin(k * math.pi / 5), cy - radius * math.cos(k * math.pi / 5))
            for k, radius in zip(range(10), [half, half * 0.45] * 5)
        ]
    if shape == "cross":
        arm = half / 3
        return [(cx - arm, cy - half), (cx + arm, cy - half), (cx + arm, cy - arm), (cx + half, cy - arm),
                (cx + half, cy + arm), (cx + arm, cy + arm), (cx + arm, cy + half), (cx - arm, cy + half),
                (cx - arm, cy + arm), (cx - half, cy + arm), (cx - half, cy - arm), (cx - arm, cy - arm)]
    raise ValueError(f"unknown shape {shape!r}")


def _shade(color: tuple[int, int, int]) -> tuple[int, int, int]:
    """The background pattern's second tone: 35% towards white for dark colours, towards black for light ones."""
    target = 0 if sum(color) > 382 else 255
    return tuple(round(channel + 0.35 * (target - channel)) for channel in color)


def draw_background(scene: Scene, size: int) -> PIL.Image.Image:
    """A `size` x `size` RGB image of `scene`'s background colour and pattern, without the shapes."""
    image = PIL.Image.new("RGB", (size, size), COLORS[scene.background])
    draw = PIL.ImageDraw.Draw(image)
    tone, step = _shade(COLORS[scene.background]), max(size // 8, 2)
    if scene.pattern == "striped":
        for x in range(0, size, 2 * step):
            draw.rectangle((x, 0, x + step - 1, size), fill=tone)
    elif scene.pattern == "checkered":
        for y in range(0, size, step):
            for x in range((y // step) % 2 * step, size, 2 * step):
                draw.rectangle((x, y, x + step - 1, y + step - 1), fill=tone)
    elif scene.pattern == "dotted":
        dot = max(step // 4, 1)
        for y in range(step // 2, size, step):
            for x in range(step // 2, size, step):
                draw.ellipse((x - dot, y - dot, x + dot, y + dot), fill=tone)
    return image


def draw_shape(image: PIL.Image.Image, shape: str, cx: float, cy: float, half: float, color: str) -> None:
    """One `shape` of `color` centred at (cx, cy) in a box of side 2 * `half`, drawn onto `image`."""
    draw, fill, box = PIL.ImageDraw.Draw(image), COLORS[color], (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon(_shape_points(shape, cx, cy, half), fill=fill)


def draw_scene(scene: Scene, rng: random.Random, size: int) -> PIL.Image.Image:
    """Draw `scene` as a `size` x `size` RGB image; `rng` picks the cells of its region the shapes sit on."""
    image, cell = draw_background(scene, size), size / GRID
    for row, column in rng.sample(REGION_CELLS[scene.position], scene.count):
        draw_shape(image, scene.shape, (column + 0.5) * cell, (row + 0.5) * cell, 0.375 * cell, scene.color)
    return image


class SyntheticNoisyDataset:
    """`num_samples` drawn scenes with captions, a `noise_fraction` of them replaced by wrong captions.

    `record(i)` -> `{"image_id": i, "caption": str (wrong when noisy), "true_caption": str, "is_noisy": bool}`
    (cheap: no drawing); `image(i)` -> PIL RGB image of `image_size` x `image_size`; `scene(i)` / `noisy_scene(i)`
    -> the `Scene` the true / the wrong caption describes. All are pure functions of `(seed, i)`.
    """

    def __init__(self, num_samples: int, noise_fraction: float = 0.3, seed: int = 0, image_size: int = 64) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if not 0.0 <= noise_fraction <= 1.0:
            raise ValueError(f"noise_fraction must lie in [0, 1], got {noise_fraction}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
        self.num_samples, self.noise_fraction, self.seed, self.image_size = num_samples, noise_fraction, seed, image_size
        self.num_noisy = round(noise_fraction * num_samples)
        # Exactly num_noisy noisy samples: the first num_noisy of a seeded permutation (1 byte per sample).
        permutation = np.random.default_rng([seed, 0x6E6F697379]).permutation(num_samples)
        self._noisy = np.zeros(num_samples, dtype=bool)
        self._noisy[permutation[: self.num_noisy]] = True

    def __len__(self) -> int:
        return self.num_samples

    def _check(self, index: int) -> int:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        return index % self.num_samples if self.num_samples else index

    def _rng(self, stream: str, index: int) -> random.Random:
        # String seeds go through SHA-512: stable across processes, platforms and Python versions.
        return random.Random(f"blip_fast.synthetic/{stream}/{self.seed}/{index}")

    def scene(self, index: int) -> Scene:
        """The scene image `index` shows (what its true caption describes)."""
        return _sample_scene(self._rng("scene", self._check(index)))

    def is_noisy(self, index: int) -> bool:
        return bool(self._noisy[self._check(index)])

    def noisy_scene(self, index: int) -> Scene | None:
        """The scene the wrong caption of a noisy sample describes (other shape or colour); None when clean."""
        index = self._check(index)
        if not self._noisy[index]:
            return None
        true_scene, rng = self.scene(index), self._rng("noise", index)
        while True:
            wrong = _sample_scene(rng)
            if not wrong.describes_same_objects(true_scene):
                return wrong

    def record(self, index: int) -> dict[str, Any]:
        """`{"image_id", "caption", "true_caption", "is_noisy"}` of sample `index`, without drawing it."""
        index = self._check(index)
        true_caption = render_caption(self.scene(index), self._rng("caption", index))
        wrong = self.noisy_scene(index)
        caption = true_caption if wrong is None else render_caption(wrong, self._rng("noise-caption", index))
        return {"image_id": index, "caption": caption, "true_caption": true_caption, "is_noisy": wrong is not None}

    def image(self, index: int) -> PIL.Image.Image:
        """The RGB image of sample `index` (`image_size` x `image_size`)."""
        index = self._check(index)
        return draw_scene(self.scene(index), self._rng("layout", index), self.image_size)

    def captions(self) -> list[str]:
        """Every sample's (possibly noisy) caption, in index order: a corpus to train a tokenizer on."""
        return [self.record(index)["caption"] for index in range(self.num_samples)]

    @staticmethod
    def vocabulary() -> list[str]:
        """Texts that together contain every word any caption can use (so a tokenizer trained on a subset
        of captions plus these never maps a synthetic caption word to `[UNK]`)."""
        words = [*COLORS, *SHAPES, *(PLURALS.get(shape, shape + "s") for shape in SHAPES), *POSITIONS, *PATTERNS,
                 *COUNT_WORDS.values(), *(phrase for pair in _WHERE.values() for phrase in pair)]
        templates = [template.format_map(_Blank()) for template in _TEMPLATES]
        return [" ".join(words), *templates, "a an is are"]

    # ---------------------------------------------------------------- files
    def write_images(self, out_dir: str | os.PathLike, annotation_name: str = "annotations.json") -> Path:
        """Write every sample as `out_dir/images/{index:06d}.png` plus a BLIP json over all of them; returns the
        json's path. Image paths in the json are relative to `out_dir` (the `image_root` of `BlipJsonDataset`)."""
        return self.write_blip_json(out_dir, {Path(annotation_name).stem: self.num_samples},
                                    suffix=Path(annotation_name).suffix or ".json")[Path(annotation_name).stem]

    def write_blip_json(
        self, out_dir: str | os.PathLike, split_sizes: dict[str, int] | None = None, suffix: str = ".json"
    ) -> dict[str, Path]:
        """Write the PNGs once and one BLIP json per split; returns `{split: json path}`.

        `split_sizes` maps split names to sizes taken from consecutive index ranges in order (default
        `{"train": num_samples}`); they must not exceed `num_samples`. Each json is a list of
        `{"image": "images/000123.png", "caption", "true_caption", "is_noisy", "image_id"}` records.
        """
        split_sizes = {"train": self.num_samples} if split_sizes is None else dict(split_sizes)
        if any(size < 0 for size in split_sizes.values()) or sum(split_sizes.values()) > self.num_samples:
            raise ValueError(f"split sizes {split_sizes} must be >= 0 and sum to at most {self.num_samples}")
        out_dir = Path(out_dir)
        (out_dir / "images").mkdir(parents=True, exist_ok=True)
        paths, start = {}, 0
        for split, size in split_sizes.items():
            records = []
            for index in range(start, start + size):
                relative = f"images/{index:06d}.png"
                self.image(index).save(out_dir / relative, compress_level=1)
                records.append({"image": relative, **self.record(index)})
            paths[split] = out_dir / f"{split}{suffix}"
            paths[split].write_text(json.dumps(records, indent=0) + "\n", encoding="utf-8")
            start += size
        return paths


class _Blank(dict):
    """format_map filler: every template field becomes an empty string (for `vocabulary`)."""

    def __missing__(self, key: str) -> str:
        return ""
