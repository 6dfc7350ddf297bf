"""``blip-fast demo --tasks vqa nlvr``: BLIP's downstream VQA and NLVR2 fine-tuning on the synthetic scenes.

What BLIP does after pre-training, at demo size on a CPU:

1. draw scenes with clean captions, VQA questions with ten human answers each (:mod:`blip_fast.data.synthetic_tasks`)
   and NLVR2 statements about image pairs; train a WordPiece vocab on all their text;
2. pre-train a tiny BLIP (ITC + ITM + LM) on the captions, its ViT started from the bootstrapping demo's shape and
   colour classifier (:mod:`blip_fast.demo_vision`; BLIP's starts from ImageNet);
3. VQA: score the pre-trained question encoder + answer decoder on unseen images (BLIP's answer ranking over the
   answer list, the official VQA accuracy), fine-tune it with the answer-weighted loss, score it again (ranking and
   generation), next to two baselines: a random answer and each question kind's most common training answer;
4. NLVR2: score the pre-trained model with its fresh head, fine-tune ``BlipForNLVR`` (twin cross-attention), score
   it again, against chance (50%).

Every step is a stage (:class:`blip_fast.demo.Stages`): rerun the command to resume. Writes
``<out>/tasks/report.md`` and ``results.json``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from blip_fast import errors
from blip_fast.atomic_files import atomic_write_text
from blip_fast.data import synthetic_tasks
from blip_fast.data.synthetic import SyntheticNoisyDataset
from blip_fast.demo import (
    SETTINGS_FILE,
    VISION_INIT,
    VISION_INIT_IMAGES,
    VISION_INIT_STEPS,
    SeedRun,
    Stages,
    _check_settings,
    _train,
)
from blip_fast.demo_report import vision_init_sentence
from blip_fast.output_lock import command_line, lock_folder

DEMO_TASKS = ("vqa", "nlvr")
SEED = 11
TRAIN_SEED = 7  # model initialisation and data order of every training stage
VOCAB_SIZE = 512


@dataclass(frozen=True)
class TaskDemoScale:
    """Sizes of the downstream demo. Training questions and pairs use the first ``train_images`` of the
    pre-training images (as VQA v2's COCO images are part of BLIP's pre-training data); test images are unseen."""

    pretrain_images: int
    train_images: int
    test_images: int
    pretrain_epochs: int
    questions_per_image: int
    nlvr_train_pairs: int
    nlvr_test_pairs: int
    vqa_epochs: int
    nlvr_epochs: int
    micro_batch: int = 32
    queue_size: int = 128
    image_size: int = 40  # pixels: the drawn scenes and the model's input (as the bootstrapping demo's)
    vision_init_images: int = VISION_INIT_IMAGES  # the ViT pre-training starts from, as the bootstrapping demo's
    vision_init_steps: int = VISION_INIT_STEPS


SCALES = {
    "full": TaskDemoScale(pretrain_images=1200, train_images=800, test_images=200, pretrain_epochs=6,
                          questions_per_image=3, nlvr_train_pairs=1600, nlvr_test_pairs=400, vqa_epochs=4,
                          nlvr_epochs=4),
    "small": TaskDemoScale(pretrain_images=600, train_images=400, test_images=100, pretrain_epochs=4,
                           questions_per_image=3, nlvr_train_pairs=640, nlvr_test_pairs=200, vqa_epochs=3,
                           nlvr_epochs=3),
}


# ---------------------------------------------------------------------------------------------------- data
def write_task_data(data_dir: Path, scale: TaskDemoScale) -> dict[str, str]:
    """Images, the pre-training captions, VQA and NLVR2 splits in BLIP's json layouts, the answer list and the
    tokenizer (``data_dir/tokenizer``); returns ``{name: path}``."""
    from blip_fast.tokenizer import BlipTokenizer

    scenes = SyntheticNoisyDataset(scale.pretrain_images + scale.test_images, noise_fraction=0.0, seed=SEED,
                                   image_size=scale.image_size)
    captions = scenes.write_blip_json(data_dir, {"pretrain": scale.pretrain_images, "test": scale.test_images})
    train, test = range(scale.train_images), range(scale.pretrain_images, scale.pretrain_images + scale.test_images)
    files = {"pretrain": captions["pretrain"],
             "vqa_train": synthetic_tasks.write_json(data_dir / "vqa_train.json", synthetic_tasks.vqa_records(
                 scenes, train, scale.questions_per_image, SEED)),
             "vqa_test": synthetic_tasks.write_json(data_dir / "vqa_test.json", synthetic_tasks.vqa_records(
                 scenes, test, scale.questions_per_image, SEED)),
             "answer_list": synthetic_tasks.write_json(data_dir / "answer_list.json", synthetic_tasks.answer_list()),
             "nlvr_train": synthetic_tasks.write_json(data_dir / "nlvr_train.json", synthetic_tasks.nlvr_records(
                 scenes, train, scale.nlvr_train_pairs, SEED)),
             "nlvr_test": synthetic_tasks.write_json(data_dir / "nlvr_test.json", synthetic_tasks.nlvr_records(
                 scenes, test, scale.nlvr_test_pairs, SEED + 1))}
    texts = [record["caption"] for record in _read(files["pretrain"])]
    for name in ("vqa_train", "vqa_test"):
        texts += [text for record in _read(files[name]) for text in (record["question"], *record["answer"])]
    texts += [record["sentence"] for name in ("nlvr_train", "nlvr_test") for record in _read(files[name])]
    BlipTokenizer.train(texts, vocab_size=VOCAB_SIZE).save_pretrained(data_dir / "tokenizer")
    files["tokenizer"] = data_dir / "tokenizer"
    return {name: str(path) for name, path in files.items()}


def _read(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------- baselines
def vqa_baselines(train_json: str | os.PathLike, test_json: str | os.PathLike,
                  answer_list: Sequence[str]) -> dict[str, float]:
    """Official VQA accuracy (percent) of two answer-only guesses: a uniformly random candidate (its expectation),
    and the most common training answer of the question's kind (a language prior)."""
    from blip_fast.vqa_accuracy import question_accuracy

    train, test = _read(train_json), _read(test_json)
    by_kind: dict[str, Counter] = {}
    for record in train:
        by_kind.setdefault(record["question_type"], Counter()).update(record["answer"])
    prior = {kind: counts.most_common(1)[0][0] for kind, counts in by_kind.items()}
    random_answer = [sum(question_accuracy(candidate, record["answer"]) for candidate in answer_list)
                     / len(answer_list) for record in test]
    prior_answer = [question_accuracy(prior.get(record["question_type"], answer_list[0]), record["answer"])
                    for record in test]
    return {"random_answer": 100.0 * sum(random_answer) / len(test),
            "question_kind_prior": 100.0 * sum(prior_answer) / len(test)}


# ---------------------------------------------------------------------------------------------------- stages
def _finetune_options(task: str, scale: TaskDemoScale, files: dict[str, str], init_from: Path) -> dict[str, Any]:
    epochs = scale.vqa_epochs if task == "vqa" else scale.nlvr_epochs
    return {"task": task, "init_from": init_from, "annotations": files[f"{task}_train"], "epochs": epochs,
            "lr_schedule": "cosine", "init_lr": 5e-4, "min_lr": 0.0, "export_tasks": [task],
            "max_text_length": 35 if task == "vqa" else 40, "seed": TRAIN_SEED}


def _vqa_accuracy(model_dir: Path, files: dict[str, str], data_dir: Path, device: str, mode: str) -> float:
    from blip_fast.evaluate_vqa import run_vqa_evaluation

    report = run_vqa_evaluation(model_dir, files["vqa_test"], data_dir, device, mode=mode,
                                answer_list=files["answer_list"], batch_size=64)
    return report["metrics"]["accuracy"]


def _nlvr_before(pretrained: Path, files: dict[str, str], data_dir: Path, device: str) -> float:
    """The pre-trained model as NLVR2 starts from it: twin cross-attention from the single one, a fresh head."""
    import torch

    from blip_fast.data.nlvr import read_nlvr
    from blip_fast.data.transforms import BlipImageProcessor
    from blip_fast.evaluate_nlvr import nlvr_accuracy, predict_statements
    from blip_fast.tokenizer import BlipTokenizer
    from blip_fast.training.tasks import InitSource

    source = InitSource(pretrained)
    torch.manual_seed(SEED)  # the fresh head's draw
    model = source.task_model("nlvr", source.config).to(device)
    statements = read_nlvr(files["nlvr_test"], data_dir)
    predictions = predict_statements(model, BlipTokenizer.from_pretrained(source.tokenizer_dir),
                                     BlipImageProcessor(size=source.config.vision.image_size), statements)
    return nlvr_accuracy(predictions, [statement.label for statement in statements])


def _nlvr_after(model_dir: Path, files: dict[str, str], data_dir: Path, device: str) -> float:
    from blip_fast.evaluate_nlvr import run_nlvr_evaluation

    return run_nlvr_evaluation(model_dir, files["nlvr_test"], data_dir, device)["metrics"]["accuracy"]


def run_task_demo(out_dir: str | os.PathLike = "blip_fast_demo", tasks: Sequence[str] = DEMO_TASKS,
                  scale: str | TaskDemoScale = "full", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the downstream demo in ``out_dir/tasks``; returns what ``results.json`` holds."""
    unknown = sorted(set(tasks) - set(DEMO_TASKS))
    if unknown or not tasks:
        raise errors.InvalidInputError(f"demo tasks are {list(DEMO_TASKS)}, got {list(tasks)}")
    scale = SCALES[scale] if isinstance(scale, str) else scale
    out_dir = Path(out_dir) / "tasks"
    with lock_folder(out_dir, command_line(), ours=[SETTINGS_FILE]):  # one run per folder, and only a demo's
        return _run_tasks(out_dir, tasks, scale, log)


def _run_tasks(out_dir: Path, tasks: Sequence[str], scale: TaskDemoScale, log: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from blip_fast.demo_vision import pretrain_vision

    _check_settings(out_dir / SETTINGS_FILE, asdict(scale), "of another scale")
    threads = max(1, os.cpu_count() or 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(threads)
    stages, data_dir = Stages(out_dir, log), out_dir / "data"
    run = SeedRun(out_dir, data_dir, scale, TRAIN_SEED, threads)  # _train reads its folders, micro_batch and threads

    files = stages.run("data", lambda: {"files": write_task_data(data_dir, scale)})["files"]
    vision_init = stages.run("pretrain_vision", lambda: pretrain_vision(
        out_dir / VISION_INIT, scale.image_size, scale.vision_init_images, scale.vision_init_steps, TRAIN_SEED))
    stages.run("pretrain", lambda: _train(run, "pretrain", {
        "task": "pretrain", "annotations": files["pretrain"], "tokenizer_dir": files["tokenizer"],
        "epochs": scale.pretrain_epochs, "init_lr": 2e-3, "warmup_lr": 1e-5, "warmup_steps": 20, "min_lr": 1e-5,
        "lr_decay_rate": 0.85, "momentum": 0.99, "queue_size": scale.queue_size, "export_tasks": ["vqa"],
        "vision_init": out_dir / VISION_INIT, "seed": TRAIN_SEED}))
    pretrained = out_dir / "pretrain"
    results: dict[str, Any] = {"scale": asdict(scale), "tasks": list(tasks), "vision_init": vision_init}
    if "vqa" in tasks:
        answers = _read(files["answer_list"])
        results["vqa"] = {
            "baselines": stages.run("vqa_baselines", lambda: vqa_baselines(files["vqa_train"], files["vqa_test"],
                                                                           answers)),
            "before": stages.run("vqa_before", lambda: {"rank": _vqa_accuracy(
                pretrained / "export" / "vqa", files, data_dir, device, "rank")}),
            "train": stages.run("vqa_finetune", lambda: _train(run, "vqa", _finetune_options(
                "vqa", scale, files, pretrained))),
            "after": stages.run("vqa_after", lambda: {mode: _vqa_accuracy(
                out_dir / "vqa" / "export" / "vqa", files, data_dir, device, mode) for mode in ("rank", "generate")}),
        }
    if "nlvr" in tasks:
        results["nlvr"] = {
            "before": stages.run("nlvr_before", lambda: {"accuracy": _nlvr_before(pretrained, files, data_dir,
                                                                                  device)}),
            "train": stages.run("nlvr_finetune", lambda: _train(run, "nlvr", _finetune_options(
                "nlvr", scale, files, pretrained))),
            "after": stages.run("nlvr_after", lambda: {"accuracy": _nlvr_after(
                out_dir / "nlvr" / "export" / "nlvr", files, data_dir, device)}),
        }
    results["seconds"] = {name: times["seconds"] for name, times in stages.times.items()}
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(out_dir / "report.md", task_report(results))
    log(task_report(results))
    return results


def task_report(results: dict[str, Any]) -> str:
    """The markdown report: accuracy before and after fine-tuning, next to the baselines."""
    scale = results["scale"]
    lines = ["# blip_fast downstream demo: VQA and NLVR2", "",
             f"A tiny BLIP ({scale['image_size']} px) pre-trained on {scale['pretrain_images']} captioned synthetic "
             "scenes, " + vision_init_sentence(scale["vision_init_images"], {
                 label: f"{accuracy:.1f}" for label, accuracy in results["vision_init"]["held_out_accuracy"].items()})
             + f"; then fine-tuned; tested on {scale['test_images']} unseen scenes.", ""]
    if "vqa" in results:
        vqa = results["vqa"]
        lines += ["## VQA (official VQA accuracy, %)", "",
                  f"{scale['train_images'] * scale['questions_per_image']} training questions, "
                  f"{scale['test_images'] * scale['questions_per_image']} test questions, ten human answers each; "
                  "rank: BLIP's answer ranking over the answer list; generate: beam search (3 beams).", "",
                  "| | accuracy |", "|---|---|",
                  f"| random answer from the list | {vqa['baselines']['random_answer']:.1f} |",
                  f"| most common answer of the question kind | {vqa['baselines']['question_kind_prior']:.1f} |",
                  f"| pre-trained, before fine-tuning (rank) | {vqa['before']['rank']:.1f} |",
                  f"| fine-tuned (rank) | {vqa['after']['rank']:.1f} |",
                  f"| fine-tuned (generate) | {vqa['after']['generate']:.1f} |", ""]
    if "nlvr" in results:
        nlvr = results["nlvr"]
        lines += ["## NLVR2 (accuracy, %)", "",
                  f"{scale['nlvr_train_pairs']} training statements, {scale['nlvr_test_pairs']} test statements "
                  "about pairs of unseen scenes, half of them true.", "",
                  "| | accuracy |", "|---|---|", "| chance | 50.0 |",
                  f"| pre-trained, fresh head (before fine-tuning) | {nlvr['before']['accuracy']:.1f} |",
                  f"| fine-tuned | {nlvr['after']['accuracy']:.1f} |", ""]
    seconds = results.get("seconds", {})
    lines.append(f"Stages took {sum(seconds.values()):.0f} s in all: "
                 + ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items()) + ".")
    return "\n".join(lines) + "\n"
