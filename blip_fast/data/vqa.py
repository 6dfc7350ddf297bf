"""VQA annotations in the layouts users have, one record type, and BLIP's VQA training dataset and collator.

Readable layouts (:func:`read_vqa`, by content, any mix of files):

- BLIP's own json (``vqa_train.json``, ``vqa_val.json``, ``vqa_test.json``, ``vg_qa.json``): a list of
  ``{"question_id", "question", "image": path under the image root, "answer": [human answers] | str, "dataset":
  "vqa" | "vg"}``; test files have no ``answer``;
- VQA v2's official pair: a questions file ``{"data_subtype", "questions": [{"question_id", "image_id",
  "question"}]}`` (alone for test splits) and its annotations file ``{"annotations": [{"question_id", "answers":
  [{"answer", "answer_id", ...}], "answer_type", ...}]}``. Images are ``COCO_<subtype>_<image_id:012d>.jpg`` in
  ``<image root>/<subtype>/`` or directly in the image root (test-dev questions use the test2015 images).

Training follows BLIP's ``vqa_dataset``/``vqa_collate_fn``: a question (``pre_question``) with its distinct human
answers, each weighted by the share of humans who gave it; a Visual Genome answer (``"dataset": "vg"``) weighs 0.2.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from blip_fast.data.datasets import OnError, Transform, _MapDataset
from blip_fast.data.transforms import load_image
from blip_fast.errors import InvalidInputError
from blip_fast.tokenizer import BlipTokenizer, pre_question

#: BLIP's weight of a Visual Genome answer (one human answer, no agreement to measure).
VG_ANSWER_WEIGHT = 0.2
#: BLIP tokenises questions to at most 35 tokens.
QUESTION_MAX_LENGTH = 35
#: The image folder of each VQA v2 question subtype.
_IMAGE_FOLDER = {"test-dev2015": "test2015"}


class AnnotationError(InvalidInputError):
    """An annotation file that cannot be read as the task's format (a user error: one line, exit status 2); the
    message names the file and record."""


@dataclass(frozen=True)
class VQAQuestion:
    """One question about one image, with every human answer (VQA v2: ten) when the file has them."""

    question_id: int | str | None
    question: str
    image: str
    answers: tuple[str, ...] | None = None
    answer_type: str | None = None
    #: "vqa", or "vg" for BLIP's Visual Genome questions (one answer, weight 0.2).
    dataset: str = "vqa"


def read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise AnnotationError(f"cannot read annotations {os.fspath(path)!r}: {error}") from error


def _text(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise AnnotationError(f"{where}: {key!r} must be text, got {type(value).__name__}")
    return value


def _question_id(record: dict, where: str, required: bool) -> int | str | None:
    value = record.get("question_id")
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise AnnotationError(f"{where}: 'question_id' must be an integer or text, got {value!r}")
    return value


def _blip_records(records: list, path: str, image_root: str) -> list[VQAQuestion]:
    questions = []
    for position, record in enumerate(records):
        where = f"{path}[{position}]"
        if not isinstance(record, dict):
            raise AnnotationError(f"{where}: not a record")
        dataset = record.get("dataset", "vqa")
        if dataset not in ("vqa", "vg"):
            raise AnnotationError(f"{where}: 'dataset' must be 'vqa' or 'vg', got {dataset!r}")
        answers = record.get("answer")
        if isinstance(answers, str):
            answers = [answers]
        if answers is not None and (not isinstance(answers, list) or not answers
                                    or not all(isinstance(answer, str) for answer in answers)):
            raise AnnotationError(f"{where}: 'answer' must be text or a non-empty list of texts")
        questions.append(VQAQuestion(
            question_id=_question_id(record, where, required=False), question=_text(record, "question", where),
            image=os.path.join(image_root, _text(record, "image", where)),
            answers=None if answers is None else tuple(answers), answer_type=record.get("answer_type"),
            dataset=dataset))
    return questions


def coco_image_path(image_root: str, subtype: str, image_id: int) -> str:
    """Where VQA v2's image ``image_id`` of ``subtype`` lies: ``<root>/<folder>/COCO_<folder>_<id:012d>.jpg`` when
    that folder exists, else directly in the root."""
    folder = _IMAGE_FOLDER.get(subtype, subtype)
    name = f"COCO_{folder}_{image_id:012d}.jpg"
    nested = os.path.join(image_root, folder)
    return os.path.join(nested, name) if os.path.isdir(nested) else os.path.join(image_root, name)


def _v2_questions(data: dict, path: str, image_root: str) -> list[tuple[dict, str]]:
    subtype = data.get("data_subtype")
    if not isinstance(subtype, str) or not isinstance(data.get("questions"), list):
        raise AnnotationError(f"{path}: a VQA v2 questions file has 'data_subtype' (text) and a 'questions' list")
    found = []
    for position, record in enumerate(data["questions"]):
        where = f"{path}: questions[{position}]"
        if not isinstance(record, dict) or isinstance(record.get("image_id"), bool) \
                or not isinstance(record.get("image_id"), int):
            raise AnnotationError(f"{where}: not a record with an integer 'image_id'")
        _question_id(record, where, required=True)
        _text(record, "question", where)
        found.append((record, coco_image_path(image_root, subtype, record["image_id"])))
    return found


def _v2_annotations(data: dict, path: str) -> dict[Any, dict]:
    if not isinstance(data.get("annotations"), list):
        raise AnnotationError(f"{path}: a VQA v2 annotations file holds an 'annotations' list")
    by_id = {}
    for position, record in enumerate(data["annotations"]):
        where = f"{path}: annotations[{position}]"
        answers = record.get("answers") if isinstance(record, dict) else None
        if not isinstance(answers, list) or not answers or not all(
                isinstance(answer, dict) and isinstance(answer.get("answer"), str) for answer in answers):
            raise AnnotationError(f"{where}: 'answers' must be a non-empty list of {{'answer': text}} records")
        by_id[_question_id(record, where, required=True)] = record
    return by_id


def read_vqa(paths: str | os.PathLike | Sequence[str | os.PathLike], image_root: str | os.PathLike) -> list[VQAQuestion]:
    """Every question of ``paths`` (BLIP json files and/or VQA v2 questions + annotations files), in file order, with
    image paths joined to ``image_root``; an annotations file must come with the questions file it annotates."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise AnnotationError("no annotation file given")
    root = os.fspath(image_root)
    questions: list[VQAQuestion] = []
    v2_questions: list[tuple[dict, str]] = []
    annotations: dict[Any, dict] = {}
    annotation_files = []
    for path in map(os.fspath, paths):
        data = read_json(path)
        if isinstance(data, list):
            questions += _blip_records(data, path, root)
        elif isinstance(data, dict) and "questions" in data:
            v2_questions += _v2_questions(data, path, root)
        elif isinstance(data, dict) and "annotations" in data:
            annotations.update(_v2_annotations(data, path))
            annotation_files.append(path)
        else:
            raise AnnotationError(f"{path}: neither BLIP's VQA json (a list) nor a VQA v2 questions or annotations "
                                  "file (an object with 'questions' or 'annotations')")
    if annotation_files and not v2_questions:
        raise AnnotationError(f"{annotation_files[0]}: VQA v2 annotations need their questions file (pass both)")
    unannotated = [record["question_id"] for record, _ in v2_questions if record["question_id"] not in annotations]
    if annotation_files and unannotated:
        raise AnnotationError(f"{len(unannotated)} questions have no annotation in {', '.join(annotation_files)} "
                              f"(e.g. question_id {unannotated[0]}): questions and annotations of other splits?")
    for record, image in v2_questions:
        annotation = annotations.get(record["question_id"])
        answers = None if annotation is None else tuple(answer["answer"] for answer in annotation["answers"])
        questions.append(VQAQuestion(record["question_id"], record["question"], image, answers,
                                     None if annotation is None else annotation.get("answer_type")))
    if not questions:
        raise AnnotationError(f"no questions in {', '.join(map(os.fspath, paths))}")
    return questions


def answer_weights(question: VQAQuestion) -> tuple[list[str], list[float]]:
    """BLIP's training targets of a question: its distinct answers (first-seen order) and their weights, the share
    of humans who gave each (VQA), or 0.2 for a Visual Genome answer."""
    if not question.answers:
        raise ValueError(f"question {question.question_id} has no answer to train on")
    if question.dataset == "vg":
        return [question.answers[0]], [VG_ANSWER_WEIGHT]
    weights: dict[str, float] = {}
    for answer in question.answers:
        weights[answer] = weights.get(answer, 0.0) + 1 / len(question.answers)
    return list(weights), list(weights.values())


class VQADataset(_MapDataset):
    """BLIP's VQA training set: item ``{"image": tensor, "question": str (pre_question), "answers": [str],
    "weights": [float], "image_id", "index"}``. Questions without answers are skipped (``no_answer``), as are images
    that do not exist (``missing_image``, when ``check_files``)."""

    def __init__(self, questions: Sequence[VQAQuestion], transform: Transform | None, seed: int = 0,
                 on_error: OnError = "skip", check_files: bool = True, max_words: int = 50) -> None:
        super().__init__(transform, seed, max_words, on_error)
        self.questions: list[VQAQuestion] = []
        self.image_paths: list[str] = []  # by image id
        self.image_ids: list[int] = []  # by sample
        ids: dict[str, int] = {}
        exists: dict[str, bool] = {}
        for question in questions:
            if not question.answers:
                self._skip("no_answer", f"question {question.question_id} ({question.image})")
                continue
            if check_files:
                if question.image not in exists:
                    exists[question.image] = os.path.isfile(question.image)
                if not exists[question.image]:
                    self._skip("missing_image", question.image, f"question {question.question_id}")
                    continue
            if question.image not in ids:
                ids[question.image] = len(self.image_paths)
                self.image_paths.append(question.image)
            self.questions.append(question)
            self.image_ids.append(ids[question.image])
        self._log_index_summary(f"{len(questions)} questions")

    def __len__(self) -> int:
        return len(self.questions)

    def _load(self, index: int) -> tuple[PIL.Image.Image, VQAQuestion, int]:
        return load_image(self.questions[index].image), self.questions[index], self.image_ids[index]

    def _item(self, loaded: tuple[PIL.Image.Image, VQAQuestion, int], rng: random.Random, index: int,
              candidate: int) -> dict[str, Any]:
        image, question, image_id = loaded
        answers, weights = answer_weights(question)
        return {"image": image if self.transform is None else self.transform(image, rng),
                "question": pre_question(question.question, self.max_words), "answers": answers, "weights": weights,
                "image_id": image_id, "index": index}

    def _name(self, index: int) -> str:
        return self.questions[index].image


class VQACollator:
    """BLIP's ``vqa_collate_fn`` plus tokenisation: ``{"pixel_values" [B, 3, H, W], "question_ids"/"question_mask"
    [B, Lq] (at most ``max_length`` tokens), "answer_ids"/"answer_mask" [A, La] (every question's answers in turn),
    "answer_weights" [A] (float32), "answers_per_question" [B], "indices" [B]}``; None when every record was
    dropped."""

    def __init__(self, tokenizer: BlipTokenizer, max_length: int = QUESTION_MAX_LENGTH) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, records: Sequence[dict[str, Any] | None]) -> dict[str, torch.Tensor] | None:
        kept = [record for record in records if record is not None]
        if not kept:
            return None
        questions = self.tokenizer([record["question"] for record in kept], padding="longest", truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
        # BLIP tokenises answers without a length limit
        answers = self.tokenizer([answer for record in kept for answer in record["answers"]], padding="longest",
                                 return_tensors="pt")
        return {
            "pixel_values": torch.stack([record["image"] for record in kept]),
            "question_ids": questions.input_ids, "question_mask": questions.attention_mask,
            "answer_ids": answers.input_ids, "answer_mask": answers.attention_mask,
            "answer_weights": torch.tensor([weight for record in kept for weight in record["weights"]],
                                           dtype=torch.float32),
            "answers_per_question": torch.tensor([len(record["answers"]) for record in kept], dtype=torch.long),
            "indices": torch.tensor([record["index"] for record in kept], dtype=torch.long),
        }
