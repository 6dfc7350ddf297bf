"""``blip-fast evaluate --task nlvr``: NLVR2 accuracy of a :class:`BlipForNLVR` on BLIP's ``nlvr_*.json``.

As the original ``train_nlvr.py`` evaluation: both images of a pair through the ViT, the sentence cleaned with
``pre_caption(sentence, 40)``, the prediction the argmax of the head; accuracy = percent of statements whose
true/false label is predicted. Evaluation keeps each pair in its file's order (no random swap).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from blip_fast.data.nlvr import SENTENCE_MAX_WORDS, NLVRStatement, read_nlvr
from blip_fast.data.transforms import BlipImageProcessor, load_image
from blip_fast.evaluate import EvaluationInputError, _progress
from blip_fast.modeling.blip import BlipForNLVR
from blip_fast.task_models import load_task_model
from blip_fast.tokenizer import BlipTokenizer, pre_caption


@torch.no_grad()
def predict_statements(
    model: BlipForNLVR,
    tokenizer: BlipTokenizer,
    processor: BlipImageProcessor,
    statements: Sequence[NLVRStatement],
    batch_size: int = 64,
) -> list[int]:
    """Per statement, 1 when the model finds it true of its image pair, else 0."""
    model.eval()
    predictions: list[int] = []
    with _progress(len(statements), batch_size, "pair", "NLVR2") as progress:
        for start in range(0, len(statements), batch_size):
            batch = statements[start : start + batch_size]
            images = [load_image(path) for statement in batch for path in statement.images]
            pixel_values = processor(images).pixel_values.to(model.device, model.dtype).unflatten(0, (len(batch), 2))
            text = tokenizer([pre_caption(statement.sentence, SENTENCE_MAX_WORDS) for statement in batch],
                             padding="longest", return_tensors="pt")
            logits = model(text.input_ids.to(model.device), pixel_values,
                           attention_mask=text.attention_mask.to(model.device)).logits  # [B, 2]
            predictions.extend(logits.argmax(dim=1).tolist())
            progress.update(len(batch))
    return predictions


def nlvr_accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Percent of predictions equal to their labels."""
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    return 100.0 * sum(int(prediction) == int(label) for prediction, label in zip(predictions, labels)) / len(labels)


def run_nlvr_evaluation(
    model_dir: str | os.PathLike,
    annotations: str | os.PathLike | Sequence[str | os.PathLike],
    image_root: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 64,
) -> dict[str, Any]:
    """``blip-fast evaluate --task nlvr``: the report with the accuracy and every prediction."""
    paths = [annotations] if isinstance(annotations, (str, os.PathLike)) else list(annotations)
    statements = read_nlvr(paths, image_root)
    for image in dict.fromkeys(path for statement in statements for path in statement.images):
        if not os.path.isfile(image):
            raise EvaluationInputError(f"{', '.join(map(os.fspath, paths))}: image file {image!r} not found")
    model, tokenizer, processor = load_task_model(BlipForNLVR, model_dir, device, dtype)
    predictions = predict_statements(model, tokenizer, processor, statements, batch_size)
    labels = [statement.label for statement in statements]
    return {"task": "nlvr", "model": os.fspath(model_dir), "annotations": [os.fspath(path) for path in paths],
            "num_statements": len(statements), "metrics": {"accuracy": nlvr_accuracy(predictions, labels)},
            "predictions": [{"images": list(statement.images), "sentence": statement.sentence,
                             "label": statement.label, "prediction": prediction}
                            for statement, prediction in zip(statements, predictions)]}
