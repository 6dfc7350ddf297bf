"""``blip-fast demo``: the whole inference path on a fresh machine, with nothing to download.

Draws synthetic images, trains a WordPiece vocabulary on their captions, builds a tiny BLIP, saves everything in
HuggingFace layout, reloads it through ``from_pretrained`` and captions the image files with greedy, beam and
nucleus decoding, timing each. The weights are random, so captions are arbitrary words of the vocabulary; training
arrives with the pre-training and CapFilt issues.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import torch

from blip_fast.captioning import Captioner
from blip_fast.config import BlipConfig
from blip_fast.data.transforms import BlipImageProcessor
from blip_fast.modeling.blip import BlipForConditionalGeneration
from blip_fast.tokenizer import BlipTokenizer

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
          "white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")


def draw_scene(rng: random.Random, size: int = 64) -> tuple[PIL.Image.Image, str]:
    """One shape of one colour on a plain background, and the caption that describes it."""
    shape, color, background = rng.choice(SHAPES), *rng.sample(sorted(COLORS), 2)
    image = PIL.Image.new("RGB", (size, size), COLORS[background])
    draw = PIL.ImageDraw.Draw(image)
    half = rng.randint(size // 6, size // 3)
    cx, cy = rng.randint(half, size - half), rng.randint(half, size - half)
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=COLORS[color])
    return image, f"a {color} {shape} on a {background} background"


def build_demo_model(out_dir: Path, captions: list[str], image_size: int = 64) -> Path:
    """Tokenizer trained on ``captions`` + random tiny captioner + processor, saved as one HuggingFace dir."""
    tokenizer = BlipTokenizer.train(captions + ["a picture of"], vocab_size=200)
    config = BlipConfig.tiny(image_size=image_size).for_tokenizer(tokenizer)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    model_dir = out_dir / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    BlipImageProcessor(size=image_size).save_pretrained(model_dir)
    return model_dir


def run_demo(
    out_dir: str | Path = "blip_fast_demo", num_images: int = 8, device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """Run the demo and print captions and images/s per decoding mode; returns the images/s."""
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    paths, captions = [], []
    for index in range(num_images):
        image, caption = draw_scene(rng)
        path = image_dir / f"{index:03d}.png"
        image.save(path)
        paths.append(path)
        captions.append(caption)

    model_dir = build_demo_model(out_dir, captions)
    captioner = Captioner.from_pretrained(model_dir, device=device, dtype=dtype)
    print(f"tiny BLIP (random weights) saved to {model_dir} and reloaded on {device} ({dtype})")

    modes = {
        "greedy": dict(max_length=20, min_length=5),
        "beam-3": dict(num_beams=3, max_length=20, min_length=5),
        "nucleus": dict(do_sample=True, top_p=0.9, repetition_penalty=1.1, max_length=20, min_length=5),
    }
    captioner.caption([PIL.Image.open(paths[0])], max_length=6)  # warm-up, excluded from the timings
    throughput = {}
    for mode, kwargs in modes.items():
        start = time.perf_counter()
        results = list(captioner.caption_files(paths, batch_size=num_images, **kwargs))
        elapsed = time.perf_counter() - start
        throughput[mode] = len(results) / elapsed
        print(f"\n{mode}: {throughput[mode]:.1f} images/s")
        for (path, caption, _), truth in zip(results[:3], captions):
            print(f"  {Path(path).name}  scene: {truth!r}  caption: {caption!r}")
    return throughput
