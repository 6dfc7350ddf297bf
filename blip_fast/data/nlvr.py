"""NLVR2 annotations (BLIP's ``nlvr_train.json``, ``nlvr_dev.json``, ``nlvr_test.json``), and BLIP's training dataset
and collator for them.

A record is ``{"images": [left image, right image] (paths under the image root), "sentence": str, "label": "True" |
"False"}`` (booleans and 0/1 are read too; anything else is an error, where the original would read it as false).
Sentences are cleaned with ``pre_caption(sentence, 40)``, as BLIP does. In training, BLIP swaps the two images with
probability 0.5, and then swaps the words "left" and "right" in the sentence too; so does :class:`NLVRDataset`, with
the sample's own random stream.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch

from blip_fast.data.datasets import OnError, Transform, _MapDataset
from blip_fast.data.transforms import load_image
from blip_fast.data.vqa import AnnotationError, read_json
from blip_fast.tokenizer import BlipTokenizer, pre_caption

#: BLIP cleans NLVR2 sentences to at most 40 words.
SENTENCE_MAX_WORDS = 40
_LABELS = {"True": 1, "False": 0, True: 1, False: 0}  # 1 and 0 equal True and False
_SWAPPED_SIDE = {"left": "right", "right": "left"}


@dataclass(frozen=True)
class NLVRStatement:
    """A statement about a pair of images and whether it is true of them (None in a file without labels)."""

    images: tuple[str, str]
    sentence: str
    label: int | None


def read_nlvr(paths: str | os.PathLike | Sequence[str | os.PathLike], image_root: str | os.PathLike,
              require_labels: bool = True) -> list[NLVRStatement]:
    """Every statement of BLIP's NLVR2 json ``paths`` with image paths joined to ``image_root``."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    root = os.fspath(image_root)
    statements = []
    for path in map(os.fspath, paths):
        records = read_json(path)
        if not isinstance(records, list):
            raise AnnotationError(f"{path}: an NLVR2 annotation file holds a json list of {{images, sentence, label}}")
        for position, record in enumerate(records):
            where = f"{path}[{position}]"
            images = record.get("images") if isinstance(record, dict) else None
            if not isinstance(images, list) or len(images) != 2 or not all(isinstance(image, str) for image in images):
                raise AnnotationError(f"{where}: 'images' must list two image paths")
            if not isinstance(record.get("sentence"), str):
                raise AnnotationError(f"{where}: 'sentence' must be text")
            label = record.get("label")
            if label is None and not require_labels:
                statements.append(NLVRStatement((os.path.join(root, images[0]), os.path.join(root, images[1])),
                                                record["sentence"], None))
                continue
            if not isinstance(label, (str, int)) or label not in _LABELS:
                raise AnnotationError(f"{where}: 'label' must be \"True\" or \"False\", got {label!r}")
            statements.append(NLVRStatement((os.path.join(root, images[0]), os.path.join(root, images[1])),
                                            record["sentence"], _LABELS[label]))
    if not statements:
        raise AnnotationError(f"no statements in {', '.join(map(os.fspath, paths))}")
    return statements


def swap_sides(sentence: str) -> str:
    """The sentence about the swapped pair: "left" and "right" exchanged (whole words of the cleaned sentence)."""
    return " ".join(_SWAPPED_SIDE.get(word, word) for word in sentence.split(" "))


class NLVRDataset(_MapDataset):
    """BLIP's NLVR2 set: item ``{"images": tensor [2, 3, H, W], "sentence": str, "label": int, "index"}``.

    ``swap_pairs`` (training) exchanges the two images with probability 0.5, and "left"/"right" in the sentence
    with them, drawing from the sample's random stream (so a resumed run draws the same swaps)."""

    def __init__(self, statements: Sequence[NLVRStatement], transform: Transform | None, seed: int = 0,
                 on_error: OnError = "skip", swap_pairs: bool = True, check_files: bool = True) -> None:
        super().__init__(transform, seed, SENTENCE_MAX_WORDS, on_error)
        self.swap_pairs = swap_pairs
        self.statements: list[NLVRStatement] = []
        exists: dict[str, bool] = {}
        for statement in statements:
            if statement.label is None:
                self._skip("no_label", statement.images[0], statement.sentence)
                continue
            if check_files:
                missing = [image for image in statement.images
                           if not exists.setdefault(image, os.path.isfile(image))]
                if missing:
                    self._skip("missing_image", missing[0], statement.sentence)
                    continue
            self.statements.append(statement)
        self._log_index_summary(f"{len(statements)} statements")

    def __len__(self) -> int:
        return len(self.statements)

    def _load(self, index: int) -> tuple[PIL.Image.Image, PIL.Image.Image, NLVRStatement]:
        statement = self.statements[index]
        return load_image(statement.images[0]), load_image(statement.images[1]), statement

    def _item(self, loaded: tuple[PIL.Image.Image, PIL.Image.Image, NLVRStatement], rng: random.Random,
              index: int, candidate: int) -> dict[str, Any]:
        left, right, statement = loaded
        if self.transform is not None:
            left, right = self.transform(left, rng), self.transform(right, rng)
        sentence = pre_caption(statement.sentence, self.max_words)
        if self.swap_pairs and rng.random() < 0.5:
            left, right, sentence = right, left, swap_sides(sentence)
        images = torch.stack([left, right]) if self.transform is not None else (left, right)
        return {"images": images, "sentence": sentence, "label": statement.label, "index": index}

    def _name(self, index: int) -> str:
        return " + ".join(self.statements[index].images)


class NLVRCollator:
    """``{"pixel_values" [B, 2, 3, H, W], "input_ids"/"attention_mask" [B, L], "labels" [B], "indices" [B]}`` (BLIP
    does not truncate NLVR2 sentences; ``max_length`` defaults to the tokenizer's limit); None when every record was
    dropped."""

    def __init__(self, tokenizer: BlipTokenizer, max_length: int | None = None) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, records: Sequence[dict[str, Any] | None]) -> dict[str, torch.Tensor] | None:
        kept = [record for record in records if record is not None]
        if not kept:
            return None
        text = self.tokenizer([record["sentence"] for record in kept], padding="longest",
                              truncation=self.max_length is not None, max_length=self.max_length,
                              return_tensors="pt")
        return {
            "pixel_values": torch.stack([record["images"] for record in kept]),
            "input_ids": text.input_ids, "attention_mask": text.attention_mask,
            "labels": torch.tensor([record["label"] for record in kept], dtype=torch.long),
            "indices": torch.tensor([record["index"] for record in kept], dtype=torch.long),
        }
