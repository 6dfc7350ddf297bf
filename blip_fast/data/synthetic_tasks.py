"""VQA questions and NLVR2 statements about the synthetic set's drawn scenes (see :mod:`blip_fast.data.synthetic`).

VQA: each image gets questions of distinct kinds -- the objects' colour, shape, count and side, the background's
colour and pattern, and yes/no questions about what is there -- each with ten human answers in VQA v2's style:
already normalised ("2", not "two"), mostly agreeing, with an occasional annotator's slip (another colour, a
neighbouring count) so that the official accuracy's partial credit matters. Answer types are VQA v2's
("yes/no", "number", "other").

NLVR2: true/false statements about a pair of images, half of them true: an object shown in at least one image,
a shape or colour shown in both, a shape shown in neither. The statements are symmetric in the two images on
purpose: BLIP's NLVR2 model averages its two cross-attentions in text layers before 6, so a model of fewer layers
(the tiny preset has 4) cannot tell the left image from the right.

Everything is a pure function of ``(seed, index)``; the writers produce BLIP's json layouts (``vqa_*.json`` with an
``answer_list.json``, ``nlvr_*.json``) over images that :meth:`SyntheticNoisyDataset.write_blip_json` wrote.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from blip_fast.data.synthetic import (
    COLORS,
    COUNT_WORDS,
    PATTERNS,
    PLURALS,
    POSITIONS,
    SHAPES,
    Scene,
    SyntheticNoisyDataset,
)

HUMANS = 10
#: How often an annotator gives the true answer (the rest slip to a plausible wrong one).
AGREEMENT = 0.9
YES_NO, NUMBER, OTHER = "yes/no", "number", "other"


@dataclass(frozen=True)
class SyntheticQuestion:
    """A question with its true answer, VQA v2's question and answer types, and the answers a human could slip to."""

    question: str
    answer: str
    question_type: str
    answer_type: str
    alternatives: tuple[str, ...]


def _plural(shape: str) -> str:
    return PLURALS.get(shape, shape + "s")


def _objects(scene: Scene) -> str:
    """'the circle' or 'the circles'."""
    return f"the {scene.shape}" if scene.count == 1 else f"the {_plural(scene.shape)}"


def _others(options: Sequence[str], answer: str) -> tuple[str, ...]:
    return tuple(option for option in options if option != answer)


def _colour_word(rng: random.Random) -> str:
    return rng.choice(("colour", "color"))


def _ask_colour(scene: Scene, rng: random.Random) -> SyntheticQuestion:
    verb = "is" if scene.count == 1 else "are"
    question = f"What {_colour_word(rng)} {verb} {_objects(scene)}?"
    return SyntheticQuestion(question, scene.color, "what color is the", OTHER, _others(sorted(COLORS), scene.color))


def _ask_shape(scene: Scene, rng: random.Random) -> SyntheticQuestion:
    question = rng.choice(("What shape is shown?", f"What shape are the {scene.color} objects?",
                           "Which shape is drawn in the picture?"))
    return SyntheticQuestion(question, scene.shape, "what shape", OTHER, _others(SHAPES, scene.shape))


def _ask_count(scene: Scene, rng: random.Random) -> SyntheticQuestion:
    question = rng.choice((f"How many {_plural(scene.shape)} are there?", "How many shapes are in the picture?",
                           f"How many {scene.color} objects can you see?"))
    neighbours = tuple(str(count) for count in COUNT_WORDS if abs(count - scene.count) == 1)
    return SyntheticQuestion(question, str(scene.count), "how many", NUMBER, neighbours)


def _ask_side(scene: Scene, rng: random.Random) -> SyntheticQuestion:
    verb = "is" if scene.count == 1 else "are"
    question = rng.choice((f"Where {verb} {_objects(scene)}?", f"Which side {verb} {_objects(scene)} on?"))
    return SyntheticQuestion(question, scene.position, "where are the", OTHER, _others(POSITIONS, scene.position))


def _ask_background(scene: Scene, rng: random.Random) -> SyntheticQuestion:
    question = f"What {_colour_word(rng)} is the background?"
    alternatives = _others(sorted(COLORS), scene.background)
    return SyntheticQuestion(question, scene.background, "what color is the", OTHER, alternatives)


def _ask_pattern(scene: Scene, rng: random.Random) -> SyntheticQuestion:
    question = rng.choice(("What pattern does the background have?", "What kind of background is it?"))
    return SyntheticQuestion(question, scene.pattern, "what kind of", OTHER, _others(PATTERNS, scene.pattern))


def _ask_yes_no(scene: Scene, rng: random.Random) -> SyntheticQuestion:
    """'Is there a red circle?' about the true objects (yes) or about another colour or shape (no)."""
    shape, color, count = scene.shape, scene.color, scene.count
    answer = rng.choice(("yes", "no"))
    if answer == "no":
        if rng.random() < 0.5:
            color = rng.choice(_others(sorted(COLORS), color))
        else:
            shape = rng.choice(_others(SHAPES, shape))
    if count == 1:
        question = f"Is there {'an' if color[0] in 'aeiou' else 'a'} {color} {shape}?"
    else:
        question = f"Are there {COUNT_WORDS[count]} {color} {_plural(shape)}?"
    return SyntheticQuestion(question, answer, "is there a", YES_NO, _others(("yes", "no"), answer))


_ASK = (_ask_colour, _ask_shape, _ask_count, _ask_side, _ask_background, _ask_pattern, _ask_yes_no)


def scene_questions(scene: Scene, rng: random.Random, count: int) -> list[SyntheticQuestion]:
    """``count`` questions of distinct kinds about ``scene`` (at most 7 kinds)."""
    return [ask(scene, rng) for ask in rng.sample(_ASK, min(count, len(_ASK)))]


def human_answers(question: SyntheticQuestion, rng: random.Random, humans: int = HUMANS,
                  agreement: float = AGREEMENT) -> list[str]:
    """``humans`` answers: the true one with probability ``agreement`` each, else a plausible slip."""
    return [question.answer if rng.random() < agreement or not question.alternatives
            else rng.choice(question.alternatives) for _ in range(humans)]


def answer_list() -> list[str]:
    """Every answer a synthetic question can have: the candidate list of ``rank`` inference (BLIP's
    ``answer_list.json`` role)."""
    return [*sorted(COLORS), *SHAPES, *(str(count) for count in COUNT_WORDS), *POSITIONS, *PATTERNS, "yes", "no"]


# ---------------------------------------------------------------------------------------------------- NLVR2
def _has(scene: Scene, shape: str | None = None, color: str | None = None) -> bool:
    return (shape is None or scene.shape == shape) and (color is None or scene.color == color)


def _noun(shape: str, color: str | None = None) -> str:
    return f"{color} {_plural(shape)}" if color else _plural(shape)


def nlvr_statement(first: Scene, second: Scene, rng: random.Random) -> tuple[str, bool]:
    """A statement about the pair and whether it is true. What it names is drawn half the time from what the images
    show and half the time at random; the caller picks pairs so that both labels occur."""
    scenes = (first, second)
    shown = rng.choice(scenes)
    from_images = rng.random() < 0.5
    shape = shown.shape if from_images else rng.choice(SHAPES)
    color = shown.color if from_images else rng.choice(sorted(COLORS))
    kind = rng.choice(("some", "both_shape", "both_color", "neither"))
    if kind == "some":
        text = rng.choice(("At least one image shows {}.", "One of the images contains {}."))
        return text.format(_noun(shape, color)), any(_has(scene, shape, color) for scene in scenes)
    if kind == "both_shape":
        return f"Both images show {_plural(shape)}.", all(_has(scene, shape=shape) for scene in scenes)
    if kind == "both_color":
        return f"Both images have {color} shapes.", all(_has(scene, color=color) for scene in scenes)
    return f"Neither image contains {_plural(shape)}.", not any(_has(scene, shape=shape) for scene in scenes)


def _pair_rng(seed: int, index: int) -> random.Random:
    return random.Random(f"blip_fast.synthetic_tasks/nlvr/{seed}/{index}")


def nlvr_pairs(dataset: SyntheticNoisyDataset, indices: Sequence[int], count: int, seed: int = 0
               ) -> list[tuple[int, int, str, bool]]:
    """``count`` statements ``(left index, right index, sentence, label)`` about pairs drawn from ``indices``, with
    balanced labels: statement ``i`` is drawn until its label is ``i % 2 == 0``."""
    scenes = {index: dataset.scene(index) for index in indices}
    pairs = []
    for number in range(count):
        rng, wanted = _pair_rng(seed, number), number % 2 == 0
        while True:
            left, right = rng.sample(list(indices), 2)
            # Pairs of one shape or colour make "both ..." statements true often enough.
            if rng.random() < 0.3:
                same = [index for index in indices if index != left and scenes[index].shape == scenes[left].shape]
                right = rng.choice(same) if same else right
            sentence, label = nlvr_statement(scenes[left], scenes[right], rng)
            if label == wanted:
                pairs.append((left, right, sentence, label))
                break
    return pairs


# ---------------------------------------------------------------------------------------------------- files
def _image(index: int) -> str:
    return f"images/{index:06d}.png"  # where SyntheticNoisyDataset.write_blip_json puts image ``index``


def vqa_records(dataset: SyntheticNoisyDataset, indices: Sequence[int], questions_per_image: int = 3,
                seed: int = 0) -> list[dict]:
    """BLIP's VQA json records (``question_id`` = image index x 10 + question number) with VQA v2's answer and
    question types."""
    records = []
    for index in indices:
        rng = random.Random(f"blip_fast.synthetic_tasks/vqa/{seed}/{index}")
        for number, question in enumerate(scene_questions(dataset.scene(index), rng, questions_per_image)):
            records.append({"question_id": index * 10 + number, "question": question.question,
                            "image": _image(index), "answer": human_answers(question, rng), "dataset": "vqa",
                            "question_type": question.question_type, "answer_type": question.answer_type})
    return records


def nlvr_records(dataset: SyntheticNoisyDataset, indices: Sequence[int], count: int, seed: int = 0) -> list[dict]:
    """BLIP's NLVR2 json records over pairs of the images ``indices``."""
    return [{"images": [_image(left), _image(right)], "sentence": sentence, "label": str(label),
             "identifier": f"synthetic-{seed}-{number}"}
            for number, (left, right, sentence, label) in enumerate(nlvr_pairs(dataset, indices, count, seed))]


def write_json(path: str | os.PathLike, records: object) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=0) + "\n", encoding="utf-8")
    return path
