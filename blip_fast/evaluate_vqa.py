"""``blip-fast evaluate --task vqa``: BLIP's two VQA inference modes, the official accuracy, the official result file.

As the original ``train_vqa.py`` evaluation: questions are cleaned with ``pre_question`` and cut to 35 tokens;

- ``rank`` (BLIP's reported mode): the candidate answers (BLIP's ``answer_list.json``, 3,128 for VQA v2) are
  tokenised once; per question, the ``k`` (128) candidates whose first token the decoder finds most likely are
  rescored by their whole answer's loss (:meth:`BlipForQuestionAnswering.rank_answers`), and the best one answers;
- ``generate``: beam search (3 beams, at most 10 tokens with ``[DEC]``, at least 1) through the decoding engine.

The answers go to a result file in the official format, ``[{"question_id": ..., "answer": ...}]`` (what the VQA
evaluation server takes for test-dev/test-std), and, when the annotations hold human answers, are scored with the
official VQA accuracy (:mod:`blip_fast.vqa_accuracy`), overall and per answer type.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from blip_fast.atomic_files import atomic_write_text
from blip_fast.data.transforms import BlipImageProcessor, load_image
from blip_fast.data.vqa import QUESTION_MAX_LENGTH, AnnotationError, VQAQuestion, read_json, read_vqa
from blip_fast.evaluate import EvaluationInputError, _progress
from blip_fast.modeling.blip import BlipForQuestionAnswering
from blip_fast.task_models import load_task_model
from blip_fast.tokenizer import BlipTokenizer, pre_question
from blip_fast.vqa_accuracy import vqa_accuracy

MODES = ("rank", "generate")
#: BLIP's answer-ranking candidates per question and its beam search for generated answers.
RANK_K = 128
GENERATE_SETTINGS = {"num_beams": 3, "max_length": 10, "min_length": 1}


def read_answer_list(path: str | os.PathLike) -> list[str]:
    """BLIP's ``answer_list.json``: a json list of distinct answer strings."""
    answers = read_json(path)
    if not isinstance(answers, list) or not answers or not all(isinstance(answer, str) for answer in answers):
        raise AnnotationError(f"{os.fspath(path)}: an answer list is a non-empty json list of answer strings")
    if len(set(answers)) != len(answers):
        raise AnnotationError(f"{os.fspath(path)}: the answer list repeats answers")
    if blank := [index for index, answer in enumerate(answers) if not answer.strip()]:
        raise AnnotationError(f"{os.fspath(path)}[{blank[0]}]: a blank answer (ranking would pick it as an answer)")
    return answers


def _pixel_values(processor: BlipImageProcessor, paths: Sequence[str], model: torch.nn.Module) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` for ``paths``, each distinct file read and processed once."""
    distinct = list(dict.fromkeys(paths))
    processed = processor([load_image(path) for path in distinct]).pixel_values.to(model.device, model.dtype)
    position = {path: index for index, path in enumerate(distinct)}
    return processed[[position[path] for path in paths]]


@torch.no_grad()
def answer_questions(
    model: BlipForQuestionAnswering,
    tokenizer: BlipTokenizer,
    processor: BlipImageProcessor,
    questions: Sequence[VQAQuestion],
    mode: str = "rank",
    answer_list: Sequence[str] | None = None,
    k: int = RANK_K,
    batch_size: int = 32,
    **generate_kwargs: Any,
) -> list[str]:
    """One answer per question, in order: ``rank`` picks from ``answer_list``; ``generate`` decodes (BLIP's beam
    search unless ``generate_kwargs`` say otherwise)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "rank" and not answer_list:
        raise ValueError("rank mode needs the candidate answers (answer_list)")
    model.eval()
    if mode == "rank":
        candidates = tokenizer(list(answer_list), padding="longest", return_tensors="pt").to(model.device)
    answers: list[str] = []
    with _progress(len(questions), batch_size, "question", f"VQA ({mode})") as progress:
        for start in range(0, len(questions), batch_size):
            batch = questions[start : start + batch_size]
            pixel_values = _pixel_values(processor, [question.image for question in batch], model)
            text = tokenizer([pre_question(question.question) for question in batch], padding="longest",
                             truncation=True, max_length=QUESTION_MAX_LENGTH, return_tensors="pt").to(model.device)
            if mode == "rank":
                best = model.rank_answers(text.input_ids, pixel_values, candidates.input_ids,
                                          candidates.attention_mask, attention_mask=text.attention_mask, k=k)
                answers.extend(answer_list[index] for index in best.tolist())
            else:
                generated = model.generate(text.input_ids, pixel_values, attention_mask=text.attention_mask,
                                           **{**GENERATE_SETTINGS, **generate_kwargs})
                answers.extend(tokenizer.batch_decode(generated, skip_special_tokens=True))
            progress.update(len(batch))
    return answers


def result_records(questions: Sequence[VQAQuestion], answers: Sequence[str]) -> list[dict[str, Any]]:
    """The official result file's records: ``[{"question_id", "answer"}]``."""
    return [{"question_id": question.question_id, "answer": answer} for question, answer in zip(questions, answers)]


def score(questions: Sequence[VQAQuestion], answers: Sequence[str]) -> dict[str, float]:
    """``{"accuracy", "accuracy_<answer type>"...}`` in percent (the official VQA accuracy)."""
    accuracy = vqa_accuracy({question.question_id: answer for question, answer in zip(questions, answers)},
                            {question.question_id: question.answers for question in questions},
                            {question.question_id: question.answer_type or "all" for question in questions})
    metrics = {"accuracy": accuracy["overall"]}
    if len(accuracy["per_answer_type"]) > 1:
        metrics.update({f"accuracy_{name}": value for name, value in accuracy["per_answer_type"].items()})
    return metrics


def _check_questions(questions: Sequence[VQAQuestion], where: str) -> None:
    """Evaluation never drops a question: every one needs an id (the result file's key) and an image file."""
    seen: set = set()
    for position, question in enumerate(questions):
        if question.question_id is None:
            raise EvaluationInputError(f"{where}: question {position} ({question.question!r}) has no question_id")
        if question.question_id in seen:
            raise EvaluationInputError(f"{where}: question_id {question.question_id} appears twice")
        seen.add(question.question_id)
    for image in dict.fromkeys(question.image for question in questions):
        if not os.path.isfile(image):
            raise EvaluationInputError(f"{where}: image file {image!r} not found")


def run_vqa_evaluation(
    model_dir: str | os.PathLike,
    annotations: str | os.PathLike | Sequence[str | os.PathLike],
    image_root: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    mode: str = "rank",
    answer_list: str | os.PathLike | None = None,
    k_test: int = RANK_K,
    batch_size: int = 32,
    results: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """``blip-fast evaluate --task vqa``: answers every question, writes ``results`` (the official format) when
    given, and scores the answers when the annotations hold human answers. Returns the report."""
    paths = [annotations] if isinstance(annotations, (str, os.PathLike)) else list(annotations)
    where = ", ".join(map(os.fspath, paths))
    questions = read_vqa(paths, image_root)
    candidates = None if mode == "generate" else read_answer_list(answer_list) if answer_list else None
    if mode == "rank" and candidates is None:
        raise EvaluationInputError("rank mode needs --answer-list (BLIP's answer_list.json: the candidate answers)")
    _check_questions(questions, where)
    unanswered = sum(question.answers is None for question in questions)
    if 0 < unanswered < len(questions):
        raise EvaluationInputError(f"{where}: {unanswered} of {len(questions)} questions have no human answers; "
                                   "score a split whose questions all have them (or none: results only)")
    model, tokenizer, processor = load_task_model(BlipForQuestionAnswering, model_dir, device, dtype)
    answers = answer_questions(model, tokenizer, processor, questions, mode, candidates, k_test, batch_size)
    report: dict[str, Any] = {"task": "vqa", "model": os.fspath(model_dir), "annotations": [os.fspath(path) for path
                              in paths], "mode": mode, "num_questions": len(questions)}
    if mode == "rank":
        report.update(k_test=k_test, num_candidates=len(candidates))
    else:
        report["generation"] = GENERATE_SETTINGS
    if results is not None:
        Path(results).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(results, json.dumps(result_records(questions, answers)) + "\n")
        report["results"] = os.fspath(results)
    if unanswered == 0:
        report["metrics"] = score(questions, answers)
    report["predictions"] = result_records(questions, answers)
    return report
