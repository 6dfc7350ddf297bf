"""What limits the demo's captions? Re-runs the bootstrapped arm of a finished ``blip-fast demo`` seed on two other
bootstrapped sets and compares the captioners' attributes, background pattern included:

- ``web-only``: CapFilt's kept web captions alone (no synthetic captions; BLIP's Table 1 "filter only");
- ``oracle``: those plus only the synthetic captions that name the object colour and shape, the background colour
  and the background pattern right (a filter that sees what the benchmark knows).

Each arm pre-trains from the same initial weights for the same steps with the seed's tokenizer, scale, seed and thread
count (``blip_fast.demo.pretrain_again``) and CPU numerics (this process takes the seeds' recorded AVX2 caps), in
``<seed dir>/ablation-<variant>/`` (resumable).

    python -m benchmarks.demo_capfilt_ablation --out-dir blip_fast_demo_3 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blip_fast import demo
from blip_fast.data.synthetic import COLORS, PATTERNS, Scene, SyntheticNoisyDataset
from blip_fast.determinism import cpu_numerics, portable_cpu_environment

VARIANTS = ("web-only", "oracle")


def background_attributes(caption: str) -> tuple[str | None, str | None]:
    """(colour, pattern) a caption gives its background ("plain" when it names a colour only); None for what it does
    not name. Reads every template of the synthetic set: "... of a striped red background", "The background is
    dotted white", "A checkered blue background with ...", "... against a gray backdrop"."""
    words = re.findall(r"[a-z]+", caption.lower())
    for index, word in enumerate(words):
        if word not in ("background", "backdrop"):
            continue
        if word == "background" and words[index + 1:index + 2] == ["is"]:
            described = words[index + 2:index + 4]
        else:
            described = words[max(index - 2, 0):index]
        colours = [name for name in described if name in COLORS]
        patterns = [name for name in described if name in PATTERNS]
        colour = colours[-1] if colours else None
        return colour, patterns[0] if patterns else ("plain" if colour else None)
    return None, None


def names_what_it_sees(caption: str, scene: Scene) -> bool:
    """The caption names the object's colour and shape, the background colour and its pattern right (what the
    demo's model can learn; count and position it cannot: README)."""
    named = demo.caption_attributes(caption)
    return ((named["colour"], named["shape"]) == (scene.color, scene.shape)
            and background_attributes(caption) == (scene.background, scene.pattern))


def ablated_captions(bootstrapped: list[dict[str, Any]], scenes: dict[str, Scene], variant: str) -> list[dict[str, Any]]:
    """CapFilt's kept captions (``bootstrapped.json`` rows) as ``variant`` keeps them; ``scenes`` maps image -> scene."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: one of {VARIANTS}")
    return [row for row in bootstrapped if row["source"] == "web"
            or (variant == "oracle" and names_what_it_sees(row["caption"], scenes[row["image"]]))]


def pattern_auc(scored: list[dict[str, Any]], scenes: dict[str, Scene]) -> float:
    """How well CapFilt's ITM score ranks a synthetic caption naming the background pattern right above one naming
    it wrong (``scored.jsonl`` rows): the probability a right one scores higher, ties half (0.5: blind)."""
    synthetic = [(row["itm_score"], background_attributes(row["caption"])[1] == scenes[row["image"]].pattern)
                 for row in scored if row["source"] == "synthetic"]
    right = [score for score, is_right in synthetic if is_right]
    wrong = [score for score, is_right in synthetic if not is_right]
    if not right or not wrong:
        raise ValueError("pattern_auc needs synthetic captions with right and with wrong patterns")
    wins = sum((a > b) + 0.5 * (a == b) for a in right for b in wrong)
    return wins / (len(right) * len(wrong))


def _web_scenes(out_dir: Path, scale: demo.DemoScale) -> dict[str, Scene]:
    """Image path -> the scene it shows, for the demo's web split."""
    dataset = SyntheticNoisyDataset(scale.web_images + scale.clean_images + scale.test_images, scale.noise_fraction,
                                    seed=demo.DATA_SEED, image_size=scale.image_size)
    web = json.loads((out_dir / "data" / "web.json").read_text(encoding="utf-8"))
    return {record["image"]: dataset.scene(record["image_id"]) for record in web}


def attribute_report(captioner: Path, data_dir: Path, scale: demo.DemoScale) -> dict[str, float]:
    """Percent of caption test images whose beam-3 caption (the demo's decoding) names each attribute right."""
    captions = demo.beam_captions(captioner / "export" / "captioning", data_dir / "caption_test.json", data_dir, "cpu")
    scenes = SyntheticNoisyDataset(scale.caption_test_images, 0.0, seed=demo.CAPTION_TEST_DATA_SEED,
                                   image_size=scale.image_size)
    hits = {"colour": 0, "background": 0, "pattern": 0}
    for index, item in enumerate(captions["predictions"]):
        scene = scenes.scene(index)
        background, pattern = background_attributes(item["caption"])
        hits["colour"] += demo.caption_attributes(item["caption"])["colour"] == scene.color
        hits["background"] += background == scene.background
        hits["pattern"] += pattern == scene.pattern
    count = len(captions["predictions"])
    return {name: 100.0 * value / count for name, value in hits.items()}


def _arm(evaluation: dict[str, Any], captioner: Path, data_dir: Path, scale: demo.DemoScale) -> dict[str, Any]:
    """One pre-training's row: its caption metrics (BLEU-4 and CIDEr x100), retrieval and attribute accuracies."""
    metrics = {key: 100 * value if key in ("bleu4", "cider") else value
               for key, value in evaluation["captions"].items()}
    return {**metrics, "retrieval": evaluation["retrieval"], "names": attribute_report(captioner, data_dir, scale)}


class SeedAblation:
    """A finished demo seed: its settings, web scenes and CapFilt output, and its own two arms scored once."""

    def __init__(self, seed_dir: Path) -> None:
        self.seed_dir, self.data_dir = seed_dir, seed_dir.parent / "data"
        self.settings = json.loads((seed_dir / "run.json").read_text(encoding="utf-8"))
        self.scale = demo.DemoScale(**self.settings["scale"])
        self.scenes = _web_scenes(seed_dir.parent, self.scale)
        capfilt = seed_dir / "capfilt"
        self.bootstrapped = json.loads((capfilt / "bootstrapped.json").read_text(encoding="utf-8"))
        scored = [json.loads(line) for line in (capfilt / "scored.jsonl").read_text(encoding="utf-8").splitlines()]
        self.pattern_auc = pattern_auc(scored, self.scenes)
        results = json.loads((seed_dir / "results.json").read_text(encoding="utf-8"))
        self.arms = {"noisy": _arm(results["before"], seed_dir / "captioner", self.data_dir, self.scale),
                     "bootstrapped": _arm(results["after"], seed_dir / "captioner_bootstrapped", self.data_dir,
                                          self.scale)}

    def run(self, variant: str) -> dict[str, Any]:
        """The ``variant`` arm (resumed if started), with the seed's own arms beside it."""
        import torch

        from blip_fast.determinism import use_deterministic_algorithms

        settings, seed_dir = self.settings, self.seed_dir
        run = demo.SeedRun(seed_dir / f"ablation-{variant}", self.data_dir, self.scale, settings["seed"],
                           settings["threads"])
        run.run_dir.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(run.threads)
        use_deterministic_algorithms()
        kept = ablated_captions(self.bootstrapped, self.scenes, variant)
        captions = run.run_dir / "bootstrapped.json"
        demo._write_json(captions, kept)

        def unfinished() -> dict[str, Any]:
            raise FileNotFoundError(f"{seed_dir}/stages/pretrain_noisy.json: the seed's noisy pre-training is missing")

        noisy = demo.Stages(seed_dir, print).run("pretrain_noisy", unfinished)
        evaluation = demo.pretrain_again(run, demo.Stages(run.run_dir, print), captions, seed_dir / "pretrain_noisy",
                                         noisy["final_step"], demo.split_paths(self.data_dir), "cpu")
        return {"seed": settings["seed"], "variant": variant, "captions_kept": len(kept),
                "synthetic_kept": sum(row["source"] == "synthetic" for row in kept),
                "capfilt_itm_pattern_auc": self.pattern_auc,
                "arms": {**self.arms, variant: _arm(evaluation, run.run_dir / "captioner_bootstrapped",
                                                   self.data_dir, self.scale)}}


def _take_cpu_numerics(parser: argparse.ArgumentParser, seed_dirs: list[Path]) -> None:
    """Run this process (before any computation) and its training stages with the CPU numerics the seeds recorded,
    so the arms compare like with like; refuse seeds that differ, or whose numerics this CPU cannot give."""
    recorded = {}
    for seed_dir in seed_dirs:
        numerics = json.loads((seed_dir / "run.json").read_text(encoding="utf-8")).get("cpu")
        if numerics is None:
            parser.error(f"{seed_dir}/run.json records no CPU numerics (a demo older than that record): rerun it")
        recorded[seed_dir] = numerics
    wanted = recorded[seed_dirs[0]]
    if any(numerics != wanted for numerics in recorded.values()):
        parser.error(f"the seeds ran with different CPU numerics ({recorded}): ablate them apart")
    if wanted["mkl_cbwr"]:  # a portable run (the demo's default)
        os.environ.update(portable_cpu_environment())
    here = cpu_numerics()
    if here != wanted:
        parser.error(f"{seed_dirs[0]}/run.json: the seeds ran with CPU numerics {wanted}, this process has "
                     f"{here} (another instruction set, or other caps in the environment)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, required=True, help="a finished blip-fast demo folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = parser.parse_args(argv)
    seed_dirs = [args.out_dir / f"seed-{seed}" for seed in args.seeds]
    for seed_dir in seed_dirs:
        if not (seed_dir / "results.json").is_file():
            parser.error(f"{seed_dir}/results.json: not a finished demo seed (run blip-fast demo first)")
    _take_cpu_numerics(parser, seed_dirs)
    for seed_dir in seed_dirs:
        seed = SeedAblation(seed_dir)
        for variant in args.variants:
            result = seed.run(variant)
            demo._write_json(seed_dir / f"ablation-{variant}" / "ablation.json", result)
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
