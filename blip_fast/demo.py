"""``blip-fast demo``: the whole inference path on a fresh machine, with nothing to download.

Writes images of the built-in synthetic set (``blip_fast.data.synthetic``), trains a WordPiece vocabulary on their
captions, builds a tiny BLIP, saves everything in HuggingFace layout, reloads it through ``from_pretrained`` and
captions the image files with greedy, beam and nucleus decoding, timing each. The weights are random, so captions
are arbitrary words of the vocabulary; the CapFilt issue turns this into the full bootstrapping demo.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import PIL.Image
import torch

from blip_fast.captioning import Captioner
from blip_fast.config import BlipConfig
from blip_fast.data.synthetic import SyntheticNoisyDataset
from blip_fast.data.transforms import BlipImageProcessor
from blip_fast.modeling.blip import BlipForConditionalGeneration
from blip_fast.tokenizer import BlipTokenizer


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
    # The built-in synthetic set without label noise: the printed "scene" is what each image shows.
    annotation_path = SyntheticNoisyDataset(num_images, noise_fraction=0.0, seed=0).write_images(out_dir)
    records = json.loads(annotation_path.read_text(encoding="utf-8"))
    paths = [out_dir / record["image"] for record in records]
    captions = [record["caption"] for record in records]

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
