"""``blip-fast demo``: BLIP's bootstrapping loop, end to end, on the built-in synthetic noisy dataset.

What the paper does with 129M web images and COCO, on drawn scenes whose wrong captions are known:

1. draw a noisy "web" set (a fraction of captions describe another scene), a small clean set (COCO's role) and a
   clean test set with several reference captions per image;
2. pre-train a tiny BLIP (ITC + ITM + LM) on the noisy set;
3. fine-tune a captioner (LM) and a filter (ITC + ITM) from it on the clean set;
4. CapFilt the noisy set: synthetic captions for every image, the filter drops web and synthetic captions its ITM
   head calls unmatched;
5. pre-train the same model, for the same number of steps, on the bootstrapped set;
6. compare both pre-trained models on the test set (retrieval R@1/R@5 with ITC top-k + ITM rerank; captions:
   how often they name the right shape and colour, BLEU-4, CIDEr) and score the filter against the injected noise.

Training runs as ``python -m blip_fast.train`` subprocesses (the real entry point, single process), CapFilt and
evaluation in process. Every stage records its result under ``<out>/stages/``; rerunning the command after a crash
skips finished stages and resumes the interrupted one from its last checkpoint. Writes ``report.md``,
``results.json`` and ``results.png``.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from blip_fast.checkpoint import atomic_write_text
from blip_fast.data.synthetic import COLORS, PLURALS, SHAPES, SyntheticNoisyDataset, render_caption


@dataclass(frozen=True)
class DemoScale:
    """How big the demo is. ``full`` fits 10 minutes on a 2-core CPU; ``small`` is the CI run."""

    web_images: int
    clean_images: int
    test_images: int
    noise_fraction: float
    pretrain_epochs: int
    captioner_epochs: int
    filter_epochs: int
    micro_batch: int
    queue_size: int
    k_test: int = 16
    references_per_image: int = 3


SCALES = {
    "full": DemoScale(web_images=2000, clean_images=400, test_images=200, noise_fraction=0.4, pretrain_epochs=7,
                      captioner_epochs=5, filter_epochs=20, micro_batch=32, queue_size=256),
    # Half the web images; the filter gets more passes over the clean set to keep its precision at this size.
    "small": DemoScale(web_images=1000, clean_images=400, test_images=100, noise_fraction=0.4, pretrain_epochs=7,
                       captioner_epochs=5, filter_epochs=30, micro_batch=32, queue_size=128),
}
IMAGE_SIZE = 64
SEED = 7
EXAMPLES = 20  # test captions kept per model in the results
_DS_CONFIG = {"gradient_accumulation_steps": 1, "gradient_clipping": 0.0, "steps_per_print": 10**9,
              "zero_optimization": {"stage": 0}}


# ---------------------------------------------------------------------------------------------------- data
def write_datasets(data_dir: Path, scale: DemoScale) -> dict[str, Path]:
    """PNGs of all three splits (one index range of one synthetic set) and a BLIP json per split.

    web: the noisy captions (``is_noisy`` kept for scoring the filter); clean and test: true captions; test holds
    ``references_per_image`` renderings of each true scene (COCO-style multi-reference).
    """
    dataset = SyntheticNoisyDataset(scale.web_images + scale.clean_images + scale.test_images,
                                    scale.noise_fraction, seed=SEED, image_size=IMAGE_SIZE)
    sizes = {"web": scale.web_images, "clean": scale.clean_images, "test": scale.test_images}
    paths = dataset.write_blip_json(data_dir, sizes)
    clean = json.loads(paths["clean"].read_text(encoding="utf-8"))
    _write_json(paths["clean"], [{"image": record["image"], "image_id": record["image_id"],
                                  "caption": record["true_caption"]} for record in clean])
    test = json.loads(paths["test"].read_text(encoding="utf-8"))
    _write_json(paths["test"], [
        {"image": record["image"], "image_id": record["image_id"],
         "caption": reference_captions(dataset, record["image_id"], scale.references_per_image)}
        for record in test
    ])
    return paths


def reference_captions(dataset: SyntheticNoisyDataset, index: int, count: int) -> list[str]:
    """``count`` differently worded true captions of image ``index`` (the first is its dataset caption)."""
    scene, references = dataset.scene(index), [dataset.record(index)["true_caption"]]
    for attempt in range(100):  # wordings repeat (a few templates): draw until enough distinct ones
        if len(references) == count:
            break
        caption = render_caption(scene, random.Random(f"blip_fast.demo/reference/{index}/{attempt}"))
        if caption not in references:
            references.append(caption)
    return references


_PLURAL_TO_SHAPE = {PLURALS.get(shape, shape + "s"): shape for shape in SHAPES}


def named_objects(caption: str) -> tuple[str | None, str | None]:
    """The (shape, colour) of the objects a caption names: its first shape noun and the colour word before it
    (captions say "two red circles"; a colour elsewhere is the background's). None for what it does not name."""
    words = re.findall(r"[a-z]+", caption.lower())
    for position, word in enumerate(words):
        shape = _PLURAL_TO_SHAPE.get(word, word if word in SHAPES else None)
        if shape is not None:
            color = words[position - 1] if position and words[position - 1] in COLORS else None
            return shape, color
    return None, None


def object_accuracy(predictions: list[str], references: list[list[str]]) -> float:
    """Percent of captions that name the right shape *and* colour (those of the image's first reference)."""
    hits = [named_objects(prediction) == named_objects(refs[0]) for prediction, refs in zip(predictions, references)]
    return 100.0 * sum(hits) / len(hits)


# ---------------------------------------------------------------------------------------------------- stages
def _write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=1) + "\n")


class Stages:
    """Runs each named stage once: its result is saved to ``stages/<name>.json`` and replayed on a rerun."""

    def __init__(self, out_dir: Path, log: Callable[[str], None]) -> None:
        self.dir = out_dir / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.seconds: dict[str, float] = {}  # per stage, in the order they ran (or were replayed)

    def run(self, name: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        done = self.dir / f"{name}.json"
        if done.is_file():
            self.log(f"[{name}] done in an earlier run, skipped")
            result = json.loads(done.read_text(encoding="utf-8"))
        else:
            self.log(f"[{name}] ...")
            start = time.perf_counter()
            result = {**work(), "seconds": round(time.perf_counter() - start, 1)}
            _write_json(done, result)
            self.log(f"[{name}] {result['seconds']:.0f} s")
        self.seconds[name] = result["seconds"]
        return result


def _train(out_dir: Path, name: str, scale: DemoScale, options: dict[str, Any], threads: int) -> dict[str, Any]:
    """One ``python -m blip_fast.train`` run (resumed if a checkpoint exists); returns its summary line."""
    ds_config = out_dir / "ds_config.json"
    _write_json(ds_config, {**_DS_CONFIG, "train_micro_batch_size_per_gpu": scale.micro_batch})
    options = {
        "model": "tiny", "deepspeed_config": ds_config, "output_dir": out_dir / name, "data": "blip_json",
        # No crops, no flips: these captions name the objects' side and count, which a crop or flip can falsify
        # (with BLIP's random crops the filter misjudges far more clean captions).
        "image_root": out_dir / "data", "crop_scale": [1.0, 1.0], "flip_prob": 0.0, "num_workers": 1,
        "save_every_steps": 100, "log_every_steps": 25, "seed": SEED, "max_text_length": 30, **options,
    }
    command = [sys.executable, "-m", "blip_fast.train", "--resume", "--no-progress_bar"]
    for key, value in options.items():
        values = value if isinstance(value, list) else [value]
        command += [f"--{key}", *map(str, values)]
    log_path = out_dir / f"{name}.log"
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log_path, "a", encoding="utf-8") as log:
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=environment, check=False)
    if finished.returncode != 0:
        tail = "".join(log_path.read_text(encoding="utf-8").splitlines(keepends=True)[-20:])
        raise RuntimeError(f"training stage {name!r} failed (exit {finished.returncode}); log {log_path}:\n{tail}")
    summary_lines = [line for line in log_path.read_text(encoding="utf-8").splitlines() if line.startswith('{"summary"')]
    return json.loads(summary_lines[-1])["summary"]


def _pretrain_options(scale: DemoScale, annotations: Path, **extra: Any) -> dict[str, Any]:
    """BLIP's pre-training recipe at demo size: LR warmup then per-epoch decay, with a higher peak LR (2e-3) and a
    faster momentum encoder (0.99) because the run is a few hundred steps, not BLIP's hundreds of thousands."""
    return {"task": "pretrain", "annotations": annotations, "epochs": scale.pretrain_epochs, "init_lr": 2e-3,
            "warmup_lr": 1e-5, "warmup_steps": 20, "min_lr": 1e-5, "lr_decay_rate": 0.85, "momentum": 0.99,
            "queue_size": scale.queue_size, "export_tasks": ["captioning", "retrieval"], **extra}


def _finetune_options(scale: DemoScale, task: str, init_from: Path, annotations: Path) -> dict[str, Any]:
    epochs = scale.captioner_epochs if task == "captioning" else scale.filter_epochs
    return {"task": task, "init_from": init_from, "annotations": annotations, "epochs": epochs,
            "lr_schedule": "cosine", "init_lr": 5e-4, "min_lr": 0.0, "queue_size": scale.queue_size,
            "momentum": 0.99, "export_tasks": [task]}


def _filter_quality(scored_path: Path, web_json: Path) -> dict[str, Any]:
    """Precision/recall of "web caption dropped" against the injected noise; counts of kept synthetic captions."""
    noisy = {record["image"]: record["is_noisy"] for record in json.loads(web_json.read_text(encoding="utf-8"))}
    dropped_noisy = dropped_clean = kept_noisy = synthetic_kept = synthetic_total = 0
    for line in scored_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["source"] != "web":
            synthetic_total += 1
            synthetic_kept += record["kept"]
            continue
        is_noisy = noisy[record["image"]]
        dropped_noisy += is_noisy and not record["kept"]
        dropped_clean += not is_noisy and not record["kept"]
        kept_noisy += is_noisy and record["kept"]
    dropped = dropped_noisy + dropped_clean
    return {
        "precision": 100.0 * dropped_noisy / dropped if dropped else 0.0,
        "recall": 100.0 * dropped_noisy / (dropped_noisy + kept_noisy) if dropped_noisy + kept_noisy else 0.0,
        "web_dropped": dropped, "web_noisy": dropped_noisy + kept_noisy,
        "synthetic_kept": synthetic_kept, "synthetic_total": synthetic_total,
    }


def _evaluate(out_dir: Path, model_dir: Path, test_json: Path, scale: DemoScale, device: str) -> dict[str, Any]:
    """Retrieval and captioning quality of one pre-trained model on the test split."""
    from blip_fast import evaluate

    data = out_dir / "data"
    retrieval = evaluate.run_retrieval_evaluation(model_dir / "export" / "retrieval", test_json, data, device,
                                                  k_test=scale.k_test)["metrics"]
    # Pre-training's LM learns captions from [DEC] alone: no prompt.
    captions = evaluate.run_caption_evaluation(model_dir / "export" / "captioning", test_json, data, device,
                                               prompt="", num_beams=3, max_length=20, min_length=5)
    references = [record["caption"] for record in json.loads(test_json.read_text(encoding="utf-8"))]
    predictions = [item["caption"] for item in captions["predictions"]]
    return {"retrieval": retrieval,
            "captions": {**captions["metrics"], "object_accuracy": object_accuracy(predictions, references)},
            "examples": [{"references": refs, "caption": caption}
                         for refs, caption in zip(references[:EXAMPLES], predictions[:EXAMPLES])]}


# ---------------------------------------------------------------------------------------------------- the run
def run_demo(out_dir: str | os.PathLike = "blip_fast_demo", scale: str | DemoScale = "full",
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the whole demo in ``out_dir``; returns the results written to ``results.json``."""
    import torch

    from blip_fast.capfilt import CapFiltOptions, run_capfilt

    scale = SCALES[scale] if isinstance(scale, str) else scale
    out_dir = Path(out_dir)
    settings = out_dir / "demo_scale.json"
    if settings.is_file() and json.loads(settings.read_text(encoding="utf-8")) != asdict(scale):
        raise ValueError(f"{out_dir} holds a demo of another scale ({settings}): use another --out-dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(settings, asdict(scale))
    threads = max(1, os.cpu_count() or 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # training picks its accelerator itself
    torch.set_num_threads(threads)
    stages = Stages(out_dir, log)
    data = out_dir / "data"
    splits = {name: data / f"{name}.json" for name in ("web", "clean", "test")}

    stages.run("data", lambda: {"splits": {name: str(path) for name, path in write_datasets(data, scale).items()}})
    noisy = stages.run("pretrain_noisy", lambda: _train(
        out_dir, "pretrain_noisy", scale, _pretrain_options(scale, splits["web"]), threads))
    stages.run("finetune_captioner", lambda: _train(out_dir, "captioner", scale, _finetune_options(
        scale, "captioning", out_dir / "pretrain_noisy", splits["clean"]), threads))
    stages.run("finetune_filter", lambda: _train(out_dir, "filter", scale, _finetune_options(
        scale, "retrieval", out_dir / "pretrain_noisy", splits["clean"]), threads))
    capfilt = stages.run("capfilt", lambda: run_capfilt(CapFiltOptions(
        captioner=out_dir / "captioner" / "export" / "captioning", filter=out_dir / "filter" / "export" / "retrieval",
        input=splits["web"], image_root=data, output=out_dir / "capfilt", num_captions=1, batch_size=64,
        workers=1, seed=SEED, images_per_part=500, device=device, progress=False)))
    filter_quality = stages.run("filter_quality", lambda: _filter_quality(out_dir / "capfilt" / "scored.jsonl",
                                                                          splits["web"]))
    # The same tokenizer and the same number of optimizer steps: only the data differs.
    stages.run("pretrain_bootstrapped", lambda: _train(out_dir, "pretrain_bootstrapped", scale, _pretrain_options(
        scale, out_dir / "capfilt" / "bootstrapped.json", tokenizer_dir=out_dir / "pretrain_noisy" / "tokenizer",
        epochs=100, max_steps=noisy["final_step"]), threads))
    before = stages.run("evaluate_noisy", lambda: _evaluate(
        out_dir, out_dir / "pretrain_noisy", splits["test"], scale, device))
    after = stages.run("evaluate_bootstrapped", lambda: _evaluate(
        out_dir, out_dir / "pretrain_bootstrapped", splits["test"], scale, device))

    results = {"scale": asdict(scale), "filter": filter_quality, "before": before, "after": after,
               "capfilt": {key: value for key, value in capfilt.items() if key != "config"},
               "seconds": stages.seconds}
    _write_json(out_dir / "results.json", results)
    from blip_fast.demo_report import write_plot, write_report

    write_report(out_dir / "report.md", results)
    write_plot(out_dir / "results.png", results)
    log((out_dir / "report.md").read_text(encoding="utf-8"))
    return results
