"""``blip-fast demo``: BLIP's bootstrapping loop, end to end, on the built-in synthetic noisy dataset.

What the paper does with 129M web images and COCO, on drawn scenes whose wrong captions are known:

1. draw a noisy "web" set (a fraction of captions describe another scene), a small clean set (COCO's role), a
   clean retrieval test set and a larger clean caption test set, with several reference captions per test image;
2. pre-train a tiny BLIP (ITC + ITM + LM) on the noisy set together with the clean set (BLIP pre-trains on web data
   and the human-annotated COCO/VG pairs), its ViT started from a shape and colour classifier trained on a labelled
   set of its own (:mod:`blip_fast.demo_vision`; BLIP starts from a ViT trained on ImageNet);
3. fine-tune a captioner (LM) and a filter (ITC + ITM) from it on the clean set;
4. CapFilt the noisy set: a synthetic caption for every image (nucleus sampling, as BLIP), the filter drops web and
   synthetic captions its ITM head calls unmatched;
5. pre-train the same model, for the same number of steps, on the bootstrapped set: CapFilt's kept web and
   synthetic captions together with the clean set, as BLIP combines them;
6. compare both pre-trained models on the test sets (retrieval R@1/R@5 with ITC top-k + ITM rerank; captions:
   how often they name the right shape and colour, BLEU-4, CIDEr) and score the filter against the injected noise.

The data is one fixed synthetic benchmark; a run *seed* draws everything else (model initialisation, data order,
dropout and ITM negatives, CapFilt's sampling), one independent stream per component (:func:`component_seed`).
Same command, seed and thread count -> byte-identical ``results.json`` on every Intel CPU with AVX2: the tokenizer
vocabulary is trained deterministically, every random stream is seeded, DataLoader batches arrive in sampler order,
torch runs with ``use_deterministic_algorithms``, and the seed runs with ATen, MKL and oneDNN capped at AVX2
(``determinism.portable_cpu_environment``; ``portable_cpu=False`` lets them use the whole CPU, and the numbers then
follow its instruction sets). Other vendors' CPUs reproduce their own numbers: MKL's cap holds on Intel CPUs only.
The thread count and the CPU numerics (vendor included) are part of the result (they change how sums are split), so
both are recorded; timings live apart, in ``timing.json``.

Each seed runs in its own process (``python -m blip_fast.demo``, under ``<out>/seed-<S>/``), several at once when
``--seeds N`` asks for more than one; training runs as ``blip_fast.train`` subprocesses of it (the real entry point:
one process, or two ranks started as ``torchrun --standalone`` would), CapFilt and evaluation in it. Every stage
records its result under ``seed-<S>/stages/``; rerunning the command after a crash skips finished stages and resumes
the interrupted one from its last checkpoint. Writes ``report.md``, ``results.json`` (mean, standard deviation and
per-seed values of every metric), ``results.png`` and ``timing.json``.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import random
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from blip_fast import errors
from blip_fast.atomic_files import atomic_write_text
from blip_fast.build_locks import watch_build_locks
from blip_fast.config import BlipConfig
from blip_fast.data.synthetic import (
    COLORS,
    COUNT_WORDS,
    GRID,
    PLURALS,
    POSITIONS,
    SHAPES,
    SyntheticNoisyDataset,
    render_caption,
)
from blip_fast.data.workers import usable_cpus
from blip_fast.determinism import portable_cpu_environment
from blip_fast.launch import ChildProcesses, run_ranks, sigterm_raises, stop_with_parent
from blip_fast.output_lock import command_line, lock_folder

#: The ViT both pre-trainings start from, as BLIP's from ImageNet: trained to name the shape and colour of this many
#: labelled scenes of a set of its own, for this many steps (demo_vision).
VISION_INIT_IMAGES, VISION_INIT_STEPS = 2000, 400


@dataclass(frozen=True)
class DemoScale:
    """How big the demo is. ``full`` is the default run (about 10 minutes on a 2-core CPU); ``small`` the opt-in
    direction check; ``tiny`` the CI smoke run."""

    web_images: int
    clean_images: int
    test_images: int  # retrieval's gallery (its ITM rerank costs k_test passes per query)
    # Captions are scored per image, so their test set is larger: with 200 images, the paired difference of two
    # captioners that name ~88% of colours right has a test-set noise of ~2.5 points, the size of the effect.
    caption_test_images: int
    noise_fraction: float
    pretrain_epochs: int
    captioner_epochs: int
    filter_epochs: int
    micro_batch: int  # the global batch of pre-training and captioning, split over the seed's ranks
    queue_size: int
    # The filter's global batch, taken ``filter_rank_batch`` images per rank and micro step (accumulated when the seed
    # trains on one rank): BLIP mines each ITM hard negative within them, and of a fixed budget, more steps over
    # smaller pools gave the filter the best precision (few hard negatives then differ from the positive only in
    # what the tiny model cannot see, so it hedges less on true captions).
    filter_batch: int = 16
    filter_rank_batch: int = 8
    # BLIP's pre-training mines ITM hard negatives within each GPU's batch: 16 images per rank and micro step whether
    # the seed trains on two ranks or on one (accumulating), so a seed draws its negatives from pools of one size
    # alone (two ranks) or in a three-seed run (one rank each).
    pretrain_rank_batch: int = 16
    k_test: int = 16
    references_per_image: int = 3
    vision_init_images: int = VISION_INIT_IMAGES
    vision_init_steps: int = VISION_INIT_STEPS
    # Pixels, the drawn scenes' and the model's input: one 8 px ViT patch per cell of the scenes' 5 x 5 board, so
    # every shape sits at the same offset from the patch grid (see synthetic.GRID).
    image_size: int = 40

    def __post_init__(self) -> None:
        patch = BlipConfig.tiny().vision.patch_size
        if self.image_size <= 0 or self.image_size % (GRID * patch):
            raise ValueError(f"image_size {self.image_size} must be a positive multiple of {GRID * patch} "
                             f"({GRID} scene cells of the tiny ViT's {patch} px patches)")


SCALES = {
    # Of a fixed training budget, twice the clean images for half the filter epochs gave the filter the best
    # precision. The captioner needs ten epochs to read the shape the ViT sees: after three, seed 2's named the shape
    # of 62% of the caption test images (six: 85%, ten: 96%), and its CapFilt captions added shape noise.
    "full": DemoScale(web_images=1200, clean_images=800, test_images=200, caption_test_images=2000,
                      noise_fraction=0.4, pretrain_epochs=5, captioner_epochs=10, filter_epochs=8, micro_batch=32,
                      queue_size=256),
    # The opt-in direction check (tests/test_demo.py), one thread.
    "small": DemoScale(web_images=1000, clean_images=400, test_images=100, caption_test_images=500,
                       noise_fraction=0.4, pretrain_epochs=5, captioner_epochs=5, filter_epochs=30, micro_batch=32,
                       queue_size=128),
    # Every stage for a few steps (numbers without meaning): what the byte-identity test reruns.
    "tiny": DemoScale(web_images=128, clean_images=64, test_images=16, caption_test_images=16, noise_fraction=0.4,
                      pretrain_epochs=2, captioner_epochs=1, filter_epochs=2, micro_batch=32, queue_size=64, k_test=4,
                      vision_init_images=64, vision_init_steps=4),
}
#: Bounds that keep a typo from pinning a folder to a setting no machine runs (the folder records them).
MAX_SEEDS, MAX_PER_CORE = 1000, 8
#: A demo folder's first file: the scale it runs at (a rerun of another scale is refused).
SETTINGS_FILE = "demo_scale.json"
#: The synthetic benchmark's seed: every run seed sees the same images, captions and injected noise.
DATA_SEED = 7
#: The ViT both pre-trainings start from, in a seed's folder (demo_vision.pretrain_vision).
VISION_INIT = "vision_init.safetensors"
#: The caption test set's: scenes drawn apart from the rest, so its size changes none of the other splits.
CAPTION_TEST_DATA_SEED = 8
EXAMPLES = 20  # test captions kept per model in the results
CAPTION_PROMPT = "a picture of "  # BLIP's captioning prompt (fine-tuning, CapFilt, evaluation)
_DS_CONFIG = {"gradient_accumulation_steps": 1, "gradient_clipping": 0.0, "steps_per_print": 10**9,
              "zero_optimization": {"stage": 0}}


# ---------------------------------------------------------------------------------------------------- data
def write_datasets(data_dir: Path, scale: DemoScale) -> dict[str, Path]:
    """PNGs of all four splits and a BLIP json per split.

    web, clean and test are one index range of one synthetic set; caption_test (under ``caption_test/``) is drawn
    apart (:data:`CAPTION_TEST_DATA_SEED`). web: the noisy captions (``is_noisy`` kept for scoring the filter); clean:
    true captions; test and caption_test hold ``references_per_image`` renderings of each true scene (COCO-style
    multi-reference).
    """
    dataset = SyntheticNoisyDataset(scale.web_images + scale.clean_images + scale.test_images,
                                    scale.noise_fraction, seed=DATA_SEED, image_size=scale.image_size)
    sizes = {"web": scale.web_images, "clean": scale.clean_images, "test": scale.test_images}
    paths = dataset.write_blip_json(data_dir, sizes)
    clean = json.loads(paths["clean"].read_text(encoding="utf-8"))
    _write_json(paths["clean"], [{"image": record["image"], "image_id": record["image_id"],
                                  "caption": record["true_caption"]} for record in clean])
    _write_json(paths["test"], _with_references(dataset, paths["test"], scale.references_per_image))
    caption_test = SyntheticNoisyDataset(scale.caption_test_images, 0.0, seed=CAPTION_TEST_DATA_SEED,
                                         image_size=scale.image_size)
    inner = caption_test.write_blip_json(data_dir / "caption_test", {"caption_test": scale.caption_test_images})
    paths["caption_test"] = data_dir / "caption_test.json"
    _write_json(paths["caption_test"], _with_references(caption_test, inner["caption_test"],
                                                        scale.references_per_image, prefix="caption_test/"))
    inner["caption_test"].unlink()
    return paths


def split_paths(data_dir: Path) -> dict[str, Path]:
    """Each split's BLIP json, as :func:`write_datasets` writes them."""
    return {name: data_dir / f"{name}.json" for name in ("web", "clean", "test", "caption_test")}


def _with_references(dataset: SyntheticNoisyDataset, split_json: Path, count: int,
                     prefix: str = "") -> list[dict[str, Any]]:
    """The records of ``split_json`` with ``count`` reference captions each and image paths under ``prefix``."""
    return [{"image": prefix + record["image"], "image_id": record["image_id"],
             "caption": reference_captions(dataset, record["image_id"], count)}
            for record in json.loads(split_json.read_text(encoding="utf-8"))]


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
_COUNTS = {**{word: count for count, word in COUNT_WORDS.items()}, "a": 1, "an": 1}
_POSITIONS = {**{position: position for position in POSITIONS}, "middle": "center"}
#: The scene attributes a caption names, with the chance of naming each right by a uniform guess (percent).
CAPTION_ATTRIBUTES = {"colour": 100 / len(COLORS), "shape": 100 / len(SHAPES), "count": 100 / len(COUNT_WORDS),
                      "position": 100 / len(POSITIONS)}


def caption_attributes(caption: str) -> dict[str, Any]:
    """What a caption says of its objects: the first shape noun, the colour word before it and the count word before
    those (captions say "two red circles"; a colour elsewhere is the background's), and the first position word.
    None for what it does not name."""
    words = re.findall(r"[a-z]+", caption.lower())
    named: dict[str, Any] = {"colour": None, "shape": None, "count": None,
                             "position": next((_POSITIONS[word] for word in words if word in _POSITIONS), None)}
    for index, word in enumerate(words):
        shape = _PLURAL_TO_SHAPE.get(word, word if word in SHAPES else None)
        if shape is not None:
            before = words[:index]
            named["shape"] = shape
            if before and before[-1] in COLORS:
                named["colour"] = before.pop()
            named["count"] = _COUNTS.get(before[-1]) if before else None
            break
    return named


def attribute_accuracy(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Percent of captions that name each attribute of the image's first reference right, and ``objects``: its
    shape and colour both."""
    pairs = [(caption_attributes(prediction), caption_attributes(refs[0]))
             for prediction, refs in zip(predictions, references)]
    hits = {name: [named[name] == true[name] for named, true in pairs] for name in CAPTION_ATTRIBUTES}
    hits["objects"] = [shape and colour for shape, colour in zip(hits["shape"], hits["colour"])]
    return {name: 100.0 * sum(right) / len(right) for name, right in hits.items()}


# ---------------------------------------------------------------------------------------------------- stages
def _write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=1) + "\n")


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Stages:
    """Runs each named stage once: its result and times are saved to ``stages/<name>.json`` and replayed on a rerun
    (the times apart from the result, which must not depend on them). Wall time grows with the machine's load, CPU
    time (this process and its children) much less: both are kept."""

    def __init__(self, out_dir: Path, log: Callable[[str], None]) -> None:
        self.dir = out_dir / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = log
        #: {"seconds": ..., "cpu_seconds": ...} per stage, in the order they ran (or were replayed).
        self.times: dict[str, dict[str, float]] = {}

    def run(self, name: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        done = self.dir / f"{name}.json"
        if done.is_file():
            self.log(f"[{name}] done in an earlier run, skipped")
            record = errors.read_json_object(done)
            if not {"result", "time"} <= record.keys():
                raise errors.InvalidInputError(f"{done} is not a finished stage's record: delete it to run the stage "
                                               "again")
        else:
            self.log(f"[{name}] ...")
            start, start_cpu = time.perf_counter(), cpu_seconds()
            record = {"result": work()}
            record["time"] = {"seconds": round(time.perf_counter() - start, 1),
                              "cpu_seconds": round(cpu_seconds() - start_cpu, 1)}
            _write_json(done, record)
            self.log(f"[{name}] {record['time']['seconds']:.0f} s ({record['time']['cpu_seconds']:.0f} CPU s)")
        self.times[name] = record["time"]
        return record["result"]


def component_seed(seed: int, component: str) -> int:
    """The seed of one component's random stream in run ``seed``: a pure function of both, the same in every
    process; different components get independent streams (the two pre-trainings share ``"pretrain"``, so they
    start from the same weights and differ only in their data)."""
    digest = hashlib.sha256(f"blip_fast.demo/{seed}/{component}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % 2**31


@dataclass(frozen=True)
class SeedRun:
    """Where one seed's run lives and what it runs with."""

    run_dir: Path
    data_dir: Path
    scale: DemoScale
    seed: int
    threads: int
    #: Run with every CPU library capped at AVX2 (the same numbers on every Intel CPU with AVX2), set in the seed
    #: process's environment by :func:`run_demo`.
    portable_cpu: bool = True

    @property
    def training_ranks(self) -> int:
        """Data-parallel ranks per training stage: two when the run's threads split evenly (two one-thread ranks
        train the tiny model ~1.3x faster than one two-thread process), each with half the threads and half the
        micro batch; else one. (Two one-thread ranks per seed for one-thread seeds would make results independent
        of the thread count, but three such seeds on two cores trained ~1.5x slower: the ranks' collectives wait on
        descheduled peers.)"""
        return 2 if self.threads % 2 == 0 and self.scale.micro_batch % 2 == 0 else 1


def _ds_config(run: SeedRun, name: str, batch: int, rank_batch: int | None) -> Path:
    """The DeepSpeed config of stage ``name``: a global ``batch`` of ``rank_batch`` images per rank and micro step
    (default: the batch split over the ranks), accumulated to the batch."""
    ranks = run.training_ranks
    rank_batch = rank_batch or batch // ranks
    if batch % (rank_batch * ranks):
        raise ValueError(f"stage {name!r}: a batch of {batch} is no multiple of {rank_batch} images x {ranks} ranks")
    path = run.run_dir / f"ds_config_{name}.json"
    _write_json(path, {**_DS_CONFIG, "train_micro_batch_size_per_gpu": rank_batch,
                       "gradient_accumulation_steps": batch // (rank_batch * ranks)})
    return path


def _train(run: SeedRun, name: str, options: dict[str, Any], batch: int | None = None,
           rank_batch: int | None = None) -> dict[str, Any]:
    """One ``blip_fast.train`` run (resumed if a checkpoint exists) on the seed's training ranks, with a global
    ``batch`` (default: the scale's ``micro_batch``) of ``rank_batch`` per rank and micro step; returns its summary
    line."""
    ranks = run.training_ranks
    ds_config = _ds_config(run, name, batch or run.scale.micro_batch, rank_batch)
    options = {
        "model": "tiny", "image_size": run.scale.image_size, "deepspeed_config": ds_config,
        "output_dir": run.run_dir / name, "data": "blip_json",
        # No crops, no flips: these captions name the objects' side and count, which a crop or flip can falsify
        # (with BLIP's random crops the filter misjudges far more clean captions).
        "image_root": run.data_dir, "crop_scale": [1.0, 1.0], "flip_prob": 0.0, "num_workers": 1,
        "save_every_steps": 100, "log_every_steps": 25, "max_text_length": 30, "deterministic": True, **options,
    }
    command = [sys.executable, "-m", "blip_fast.train", "--resume", "--no-progress_bar"]
    for key, value in options.items():
        if isinstance(value, bool):
            command.append(f"--{'' if value else 'no-'}{key}")
            continue
        values = value if isinstance(value, list) else [value]
        command += [f"--{key}", *map(str, values)]
    log_path = run.run_dir / f"{name}.log"
    environment = {**os.environ, "OMP_NUM_THREADS": str(run.threads // ranks)}
    # A stage waiting on a build lock that a killed run left says so in its log, which the user does not see: the
    # seed says it too.
    with open(log_path, "a", encoding="utf-8") as log, watch_build_locks():
        returncode = run_ranks(command, ranks, environment, log)
    if returncode != 0:
        tail = "".join(log_path.read_text(encoding="utf-8").splitlines(keepends=True)[-20:])
        raise errors.ProcessFailed(f"training stage {name!r} failed (exit {returncode}); its log {log_path} ends:"
                                   f"\n{tail}")
    lines = log_path.read_text(encoding="utf-8").splitlines()
    summary_lines = [line for line in lines if line.startswith('{"summary"')]
    return json.loads(summary_lines[-1])["summary"]


def _pretrain_options(run: SeedRun, annotations: list[Path], vision_init: Path, **extra: Any) -> dict[str, Any]:
    """BLIP's pre-training recipe at demo size: LR warmup then per-epoch decay, with a higher peak LR (1e-3) and a
    faster momentum encoder (0.99) because the run is a few hundred steps, not BLIP's hundreds of thousands. The peak
    LR trades retrieval against captions (three seeds and one default run each, README): at 2e-3 and 1.5e-3 one
    bootstrapped pre-training in four ended far below the others (image->text R@5 19.5 and 12.0; 2e-3: one retrieval
    gain in four cleared twice its spread); at 1e-3 none did and all four gains cleared, but the captioners name
    colours less well. A second caption of the same image is no negative (``--negatives_by_image_id``): the
    bootstrapped data holds a web and a synthetic caption for about half its images while the ITC queue holds a
    tenth of the data (BLIP's: 0.04%), so with BLIP's one-positive ITC true captions keep turning up as negatives;
    the bootstrapped pre-training of two seeds (1 and 2, at 2e-3) then reached text->image R@5 72.5 and 53.2, with
    this 84.7 and 76.7. The ViT starts from ``vision_init`` (the seed's classifier, :data:`VISION_INIT`)."""
    scale = run.scale
    return {"task": "pretrain", "annotations": annotations, "epochs": scale.pretrain_epochs, "init_lr": 1e-3,
            "warmup_lr": 1e-5, "warmup_steps": 20, "min_lr": 1e-5, "lr_decay_rate": 0.85, "momentum": 0.99,
            "queue_size": scale.queue_size, "negatives_by_image_id": True,
            "export_tasks": ["captioning", "retrieval"], "vision_init": vision_init,
            "seed": component_seed(run.seed, "pretrain"), **extra}


def _finetune_options(run: SeedRun, task: str, init_from: Path, annotations: Path) -> dict[str, Any]:
    """BLIP's fine-tuning (cosine LR to 0) at demo size: the captioner at 5e-4, the filter, with its smaller batch
    (``DemoScale.filter_batch``), at 1e-3."""
    captioning = task == "captioning"
    epochs = run.scale.captioner_epochs if captioning else run.scale.filter_epochs
    prompt = {"prompt": CAPTION_PROMPT} if captioning else {}
    return {"task": task, "init_from": init_from, "annotations": annotations, "epochs": epochs, **prompt,
            "lr_schedule": "cosine", "init_lr": 5e-4 if captioning else 1e-3, "min_lr": 0.0,
            "queue_size": run.scale.queue_size, "momentum": 0.99, "export_tasks": [task],
            "seed": component_seed(run.seed, task)}


def _filter_quality(scored_path: Path, web_json: Path) -> dict[str, Any]:
    """Precision/recall of "web caption dropped" against the injected noise; counts of kept synthetic captions; how
    often the synthetic captions (kept or not) name each attribute of their image right (``synthetic_names``)."""
    web = {record["image"]: record for record in json.loads(web_json.read_text(encoding="utf-8"))}
    dropped_noisy = dropped_clean = kept_noisy = synthetic_kept = 0
    synthetic, truths = [], []
    for line in scored_path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["source"] != "web":
            synthetic.append(record["caption"])
            truths.append([web[record["image"]]["true_caption"]])
            synthetic_kept += record["kept"]
            continue
        is_noisy = web[record["image"]]["is_noisy"]
        dropped_noisy += is_noisy and not record["kept"]
        dropped_clean += not is_noisy and not record["kept"]
        kept_noisy += is_noisy and record["kept"]
    dropped = dropped_noisy + dropped_clean
    return {
        "precision": 100.0 * dropped_noisy / dropped if dropped else 0.0,
        "recall": 100.0 * dropped_noisy / (dropped_noisy + kept_noisy) if dropped_noisy + kept_noisy else 0.0,
        "web_dropped": dropped, "web_noisy": dropped_noisy + kept_noisy,
        "synthetic_kept": synthetic_kept, "synthetic_total": len(synthetic),
        "synthetic_names": attribute_accuracy(synthetic, truths) if synthetic else {},
    }


def beam_captions(model_dir: Path, test_json: Path, data_dir: Path, device: str) -> dict[str, Any]:
    """``evaluate.run_caption_evaluation``'s report (metrics, every caption) of the demo's captioner at
    ``model_dir`` on ``test_json``, decoded as BLIP evaluates captions (beam 3, 5 to 20 tokens, the prompt)."""
    from blip_fast import evaluate

    return evaluate.run_caption_evaluation(model_dir, test_json, data_dir, device, batch_size=256,
                                           prompt=CAPTION_PROMPT, num_beams=3, max_length=20, min_length=5)


def _caption_quality(run: SeedRun, model_dir: Path, test_json: Path, device: str) -> dict[str, Any]:
    """BLEU-4, CIDEr, object accuracy (shape and colour) and each attribute's accuracy of beam-3 captions (BLIP's
    decoding) of the test images, and examples."""
    captions = beam_captions(model_dir, test_json, run.data_dir, device)
    references = [record["caption"] for record in json.loads(test_json.read_text(encoding="utf-8"))]
    predictions = [item["caption"] for item in captions["predictions"]]
    named = attribute_accuracy(predictions, references)
    return {"metrics": {**captions["metrics"], "object_accuracy": named.pop("objects"),
                        **{f"names_{attribute}": value for attribute, value in named.items()}},
            "examples": [{"references": refs, "caption": caption}
                         for refs, caption in zip(references[:EXAMPLES], predictions[:EXAMPLES])]}


def _evaluate(run: SeedRun, pretrained: Path, captioner: Path, splits: dict[str, Path], device: str) -> dict[str, Any]:
    """One pre-trained model as BLIP evaluates it: retrieval zero-shot (ITC top-k, ITM rerank) on the test split, and
    the captions of the captioner fine-tuned from it on the clean set (prompt "a picture of ") on the caption test
    split."""
    from blip_fast import evaluate

    retrieval = evaluate.run_retrieval_evaluation(pretrained / "export" / "retrieval", splits["test"], run.data_dir,
                                                  device, k_test=run.scale.k_test)["metrics"]
    captions = _caption_quality(run, captioner / "export" / "captioning", splits["caption_test"], device)
    return {"retrieval": retrieval, "captions": captions["metrics"], "examples": captions["examples"]}


# ---------------------------------------------------------------------------------------------------- one seed
def _check_settings(path: Path, settings: dict[str, Any], what: str) -> None:
    """Refuse to resume a folder made with other settings (its finished stages would mix into this run), naming
    each setting that differs."""
    if path.is_file():
        differences = errors.differences(errors.read_json_object(path), settings)
        if differences:
            raise errors.InvalidInputError(f"{path.parent} holds a demo {what} ({path}: {'; '.join(differences)}): "
                                           "use another --out-dir")
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, settings)


#: CapFilt summary fields that measure time, not what it did: kept out of results.json.
_CAPFILT_TIMING = ("seconds", "unit_seconds", "images_per_s")


def pretrain_again(run: SeedRun, stages: Stages, captions: Path, noisy_dir: Path, steps: int,
                   splits: dict[str, Path], device: str) -> dict[str, Any]:
    """The comparison's second arm, in ``run.run_dir``: pre-train on ``captions`` with the clean split -- the same
    tokenizer (``noisy_dir``'s), initial weights (the ViT: the classifier in ``noisy_dir``'s seed folder) and number
    of optimizer steps as the noisy pre-training, so only the data differs -- fine-tune its captioner the same way
    (seed included), and evaluate them (retrieval; captions)."""
    stages.run("pretrain_bootstrapped", lambda: _train(run, "pretrain_bootstrapped", _pretrain_options(
        run, [captions, splits["clean"]], noisy_dir.parent / VISION_INIT, tokenizer_dir=noisy_dir / "tokenizer",
        epochs=100, max_steps=steps), rank_batch=run.scale.pretrain_rank_batch))
    stages.run("finetune_captioner_bootstrapped", lambda: _train(run, "captioner_bootstrapped", _finetune_options(
        run, "captioning", run.run_dir / "pretrain_bootstrapped", splits["clean"])))
    return stages.run("evaluate_bootstrapped", lambda: _evaluate(
        run, run.run_dir / "pretrain_bootstrapped", run.run_dir / "captioner_bootstrapped", splits, device))


def run_seed(run: SeedRun, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) one seed's bootstrapping loop in ``run.run_dir`` on the data in ``run.data_dir``; writes and
    returns its ``results.json`` (stage times go to ``timing.json``). Sets torch's thread count and deterministic
    mode for the whole process: call it in a process of its own (``python -m blip_fast.demo``)."""
    import torch

    from blip_fast.capfilt import CapFiltOptions, run_capfilt
    from blip_fast.demo_vision import pretrain_vision
    from blip_fast.determinism import cpu_numerics, use_deterministic_algorithms

    run_dir, data = run.run_dir, run.data_dir
    numerics = cpu_numerics()
    _check_settings(run_dir / "run.json", {"scale": asdict(run.scale), "seed": run.seed, "threads": run.threads,
                                           "cpu": numerics},
                    "of another seed, scale, thread count or CPU numerics (--native-cpu, or a CPU of another vendor)")
    torch.set_num_threads(run.threads)
    use_deterministic_algorithms()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # training picks its accelerator itself
    stages = Stages(run_dir, log)
    splits = split_paths(data)

    vision_init = stages.run("pretrain_vision", lambda: pretrain_vision(
        run_dir / VISION_INIT, run.scale.image_size, run.scale.vision_init_images, run.scale.vision_init_steps,
        component_seed(run.seed, "vision_init")))
    noisy = stages.run("pretrain_noisy", lambda: _train(run, "pretrain_noisy", _pretrain_options(
        run, [splits["web"], splits["clean"]], run_dir / VISION_INIT), rank_batch=run.scale.pretrain_rank_batch))
    stages.run("finetune_captioner", lambda: _train(run, "captioner", _finetune_options(
        run, "captioning", run_dir / "pretrain_noisy", splits["clean"])))
    stages.run("finetune_filter", lambda: _train(run, "filter", _finetune_options(
        run, "retrieval", run_dir / "pretrain_noisy", splits["clean"]), run.scale.filter_batch,
        run.scale.filter_rank_batch))
    capfilt = stages.run("capfilt", lambda: run_capfilt(CapFiltOptions(
        captioner=run_dir / "captioner" / "export" / "captioning", filter=run_dir / "filter" / "export" / "retrieval",
        input=splits["web"], image_root=data, output=run_dir / "capfilt", prompt=CAPTION_PROMPT, num_captions=1,
        batch_size=64, workers=1, seed=component_seed(run.seed, "capfilt"), images_per_part=500, device=device,
        progress=False, rank=0, world_size=1)))  # one process, whatever RANK/WORLD_SIZE the shell exports
    filter_quality = stages.run("filter_quality", lambda: _filter_quality(run_dir / "capfilt" / "scored.jsonl",
                                                                          splits["web"]))
    after = pretrain_again(run, stages, run_dir / "capfilt" / "bootstrapped.json", run_dir / "pretrain_noisy",
                           noisy["final_step"], splits, device)
    before = stages.run("evaluate_noisy", lambda: _evaluate(
        run, run_dir / "pretrain_noisy", run_dir / "captioner", splits, device))

    results = {"seed": run.seed, "threads": run.threads, "cpu": numerics, "torch": torch.__version__,
               "scale": asdict(run.scale), "vision_init": vision_init, "filter": filter_quality, "before": before,
               "after": after,
               "capfilt": {key: value for key, value in capfilt.items() if key not in ("config", *_CAPFILT_TIMING)}}
    _write_json(run_dir / "results.json", results)
    _write_json(run_dir / "timing.json", {"stages": stages.times,
                                         **{key: capfilt[key] for key in _CAPFILT_TIMING if key in capfilt}})
    return results


# ---------------------------------------------------------------------------------------------------- seeds
def parallel_plan(seeds: int, cores: int, jobs: int | None = None, threads: int | None = None) -> tuple[int, int]:
    """(seed runs at once, torch threads per run): by default up to two runs per core, the cores split between
    them. One-thread runs share a core well; a multi-thread run on a busy core waits on its slowest thread."""
    jobs = jobs or min(seeds, 2 * cores)
    return jobs, threads or max(1, cores // jobs)


def _seed_process(run: SeedRun, children: ChildProcesses, log: Callable[[str], None], prefix: str) -> dict[str, Any]:
    """Run one seed in a child process (its own thread count, from the first import on), forwarding its log."""
    command = [sys.executable, "-u", "-m", "blip_fast.demo", "--run-dir", str(run.run_dir), "--data-dir",
               str(run.data_dir), "--scale", json.dumps(asdict(run.scale)), "--seed", str(run.seed),
               "--threads", str(run.threads)]
    environment = {**os.environ, "OMP_NUM_THREADS": str(run.threads),
                   **(portable_cpu_environment() if run.portable_cpu else {})}
    tail: collections.deque[str] = collections.deque(maxlen=20)
    with children.start(command, environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                        text=True) as process:
        for line in process.stdout:
            tail.append(line)
            log(prefix + line.rstrip("\n"))
    if process.returncode == errors.EXIT_USER_ERROR:  # the seed's one line says what to change
        said = [line.strip() for line in tail if ": error: " in line]
        raise errors.UserError(f"seed {run.seed}: {said[-1].split(': error: ', 1)[1] if said else ''.join(tail)}")
    if process.returncode != 0:
        raise errors.ProcessFailed(f"seed {run.seed} failed (exit {process.returncode}; its output is above); rerun "
                                   "the same command to resume it")
    return json.loads((run.run_dir / "results.json").read_text(encoding="utf-8"))


def run_demo(out_dir: str | os.PathLike = "blip_fast_demo", scale: str | DemoScale = "full", seeds: int = 1,
             first_seed: int = 0, threads: int | None = None, jobs: int | None = None, portable_cpu: bool = True,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the demo for seeds ``first_seed .. first_seed + seeds - 1`` in ``out_dir``, ``jobs`` of them
    at once with ``threads`` torch threads each (defaults: :func:`parallel_plan`), capped at AVX2 unless not
    ``portable_cpu`` (:class:`SeedRun`); returns the results written to ``results.json`` (mean, standard deviation and
    per-seed values of every metric)."""
    if not 1 <= seeds <= MAX_SEEDS:
        raise errors.InvalidInputError(f"seeds must lie in [1, {MAX_SEEDS}], got {seeds}")
    cores = usable_cpus()
    for name, value in (("threads", threads), ("jobs", jobs)):
        if value is not None and not 1 <= value <= MAX_PER_CORE * cores:
            raise errors.InvalidInputError(f"{name} must lie in [1, {MAX_PER_CORE * cores}] ({MAX_PER_CORE} per "
                                           f"usable core), got {value}")
    scale = SCALES[scale] if isinstance(scale, str) else scale
    with lock_folder(out_dir, command_line(), ours=[SETTINGS_FILE]):  # one run per folder, and only a demo's
        return _run_seeds(Path(out_dir), scale, seeds, first_seed, threads, jobs, portable_cpu, log)


def _run_seeds(out_dir: Path, scale: DemoScale, seeds: int, first_seed: int, threads: int | None, jobs: int | None,
               portable_cpu: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from blip_fast.demo_report import summarize, write_plot, write_report

    _check_settings(out_dir / SETTINGS_FILE, asdict(scale), "of another scale")
    jobs, threads = parallel_plan(seeds, usable_cpus(), jobs, threads)
    start, load_start, cpu_start = time.perf_counter(), os.getloadavg(), cpu_seconds()
    data = out_dir / "data"
    Stages(out_dir, log).run("data", lambda: {"splits": {name: str(path)
                                                         for name, path in write_datasets(data, scale).items()}})
    runs = [SeedRun(out_dir / f"seed-{seed}", data, scale, seed, threads, portable_cpu)
            for seed in range(first_seed, first_seed + seeds)]
    log(f"{seeds} seed(s), {jobs} at a time, {threads} torch thread(s) each")
    children, pool = ChildProcesses(), ThreadPoolExecutor(jobs)
    try:
        futures = [pool.submit(_seed_process, run, children, log, f"[seed {run.seed}] " if seeds > 1 else "")
                   for run in runs]
        wait(futures)
    except BaseException:  # Ctrl-C, or SIGTERM under launch.sigterm_raises: no seed runs on without this process
        pool.shutdown(wait=False, cancel_futures=True)
        children.stop(grace_seconds=20)  # a seed stops its training ranks first (10 s at most)
        raise
    finally:
        pool.shutdown()
    failed = [future.exception() for future in futures if future.exception() is not None]
    if failed:  # a user error (the folder's settings, say) before a crash: it says what to change
        first = next((error for error in failed if isinstance(error, errors.UserError)), failed[0])
        if len(failed) > 1 and isinstance(first, errors.UserError | errors.ProcessFailed):
            raise type(first)("; ".join(map(str, failed)))
        raise first

    results = summarize([future.result() for future in futures])
    _write_json(out_dir / "results.json", results)
    timing = {
        "wall_seconds": round(time.perf_counter() - start, 1), "cpu_seconds": round(cpu_seconds() - cpu_start, 1),
        "cores": usable_cpus(), "jobs": jobs, "threads": threads,
        "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "per_seed": {run.seed: json.loads((run.run_dir / "timing.json").read_text(encoding="utf-8")) for run in runs},
    }
    _write_json(out_dir / "timing.json", timing)
    write_report(out_dir / "report.md", results, timing)
    write_plot(out_dir / "results.png", results)
    log((out_dir / "report.md").read_text(encoding="utf-8"))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """One seed's run in a process of its own: what :func:`run_demo` starts per seed."""
    return errors.run_main(_seed_main, list(sys.argv[1:] if argv is None else argv), "python -m blip_fast.demo")


def _seed_main(argv: list[str]) -> int:
    stop_with_parent()  # a seed must not run on without the demo that started it
    parser = argparse.ArgumentParser(prog="python -m blip_fast.demo", description=main.__doc__)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True, help="the data stage's folder (run_demo writes it)")
    parser.add_argument("--scale", required=True, help=f"{' or '.join(SCALES)}, or a DemoScale as JSON")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args(argv)
    scale = SCALES[args.scale] if args.scale in SCALES else DemoScale(**json.loads(args.scale))
    with sigterm_raises():  # SIGTERM unwinds through launch.run_ranks, which stops the stage's ranks
        run_seed(SeedRun(args.run_dir, args.data_dir, scale, args.seed, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
