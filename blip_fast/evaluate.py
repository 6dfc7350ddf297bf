"""Downstream evaluation as BLIP reports it: image-text retrieval recall@K and caption BLEU-4 / CIDEr-D.

Retrieval follows BLIP's ``evaluation`` + ``itm_eval`` (train_retrieval.py): every image goes through the ViT once
and every text through the unimodal encoder once; ``sims = image_feat @ text_feat.T`` (ITC cosine). Each row's top
``k_test`` candidates are reranked by ``score = ITM "matched" logit + ITC cosine``; every other entry is -100.
Image->text rows and text->image rows share one ITM pass over the union of their candidate pairs (BLIP scores
most pairs twice). Under torch.distributed each rank reranks a contiguous slice of rows and the score matrices
are summed across ranks, like BLIP; every rank encodes all images and texts, as BLIP does.

Caption metrics reproduce coco-caption's pure-Python scorers (pycocoevalcap ``Bleu(4)`` with the "closest"
reference length, ``Cider()`` = CIDEr-D: n=4, sigma=6, document frequencies from the references, clipped
n-gram weights, x10) on captions tokenised by :func:`normalize_caption`, which stands in for the PTB tokenizer
(a Java program); tests check both scorers against pycocoevalcap on the same tokens.

Evaluation never drops a test item: a missing or undecodable image is an error naming the file.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import PIL.Image
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from blip_fast.captioning import Captioner
from blip_fast.data.transforms import BlipImageProcessor, load_image
from blip_fast.distributed import world_size
from blip_fast.errors import InvalidInputError
from blip_fast.modeling.blip import BlipForImageTextRetrieval
from blip_fast.task_models import load_task_model
from blip_fast.tokenizer import BlipTokenizer, pre_caption

#: BLIP's retrieval evaluation tokenises test captions to at most 35 tokens and cleans them with max_words=30.
TEXT_MAX_LENGTH = 35
CAPTION_MAX_WORDS = 30
#: The score BLIP gives pairs outside a row's top-k (below any reranked score).
NOT_RERANKED = -100.0
RECALL_KS = (1, 5, 10)

ImageSource = PIL.Image.Image | str | os.PathLike


class EvaluationInputError(InvalidInputError):
    """An annotation file or one of its images cannot be evaluated; the message names the file and record."""


# ==================================================================== retrieval: encoding
@dataclass(frozen=True)
class EncodedImages:
    """ViT states ``[N_img, T, D]`` (kept for the ITM rerank) and ITC features ``[N_img, E]`` (float32)."""

    states: torch.Tensor
    features: torch.Tensor


@dataclass(frozen=True)
class EncodedTexts:
    """Token ids and mask ``[N_txt, L]`` (``[CLS]`` first, padded to the longest) and ITC features ``[N_txt, E]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    features: torch.Tensor


def _is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _progress(total: int, batch_size: int, unit: str, description: str) -> tqdm:
    """A progress bar on rank 0 only, and only when the work takes more than one batch."""
    return tqdm(total=total, unit=unit, desc=description, disable=not _is_main_process() or total <= batch_size)


def image_batches(images: Sequence[ImageSource], batch_size: int) -> Iterator[list[PIL.Image.Image]]:
    """Decoded images in batches; a path that cannot be read raises :class:`ImageLoadError` naming it."""
    for start in range(0, len(images), batch_size):
        yield [image if isinstance(image, PIL.Image.Image) else load_image(image)
               for image in images[start : start + batch_size]]


@torch.no_grad()
def encode_images(
    model: BlipForImageTextRetrieval, processor: BlipImageProcessor, images: Sequence[ImageSource], batch_size: int = 64
) -> EncodedImages:
    """Run the ViT once per image (PIL images or paths), keeping its states for the rerank."""
    states, features = [], []
    with _progress(len(images), batch_size, "img", "encode images") as progress:
        for batch in image_batches(images, batch_size):
            pixel_values = processor(batch).pixel_values.to(model.device, model.dtype)  # [B, 3, H, W]
            image_embeds = model.vision_model(pixel_values).last_hidden_state  # [B, T, D]
            states.append(image_embeds)
            features.append(model.image_features(image_embeds).float())
            progress.update(len(batch))
    return EncodedImages(torch.cat(states), torch.cat(features))


@torch.no_grad()
def encode_texts(
    model: BlipForImageTextRetrieval, tokenizer: BlipTokenizer, texts: Sequence[str], batch_size: int = 256
) -> EncodedTexts:
    """Tokenise (BLIP's 35-token limit) and run the unimodal text encoder once per text."""
    tokens = tokenizer(list(texts), padding=True, truncation=True, max_length=TEXT_MAX_LENGTH,
                       return_tensors="pt").to(model.device)
    features = []
    with _progress(len(texts), batch_size, "text", "encode texts") as progress:
        for start in range(0, len(texts), batch_size):
            input_ids = tokens.input_ids[start : start + batch_size]
            text_embeds = model.text_encoder(input_ids, tokens.attention_mask[start : start + batch_size])
            features.append(model.text_features(text_embeds.last_hidden_state).float())
            progress.update(len(input_ids))
    return EncodedTexts(tokens.input_ids, tokens.attention_mask, torch.cat(features))


# ==================================================================== retrieval: rerank
def rank_rows(num_rows: int) -> range:
    """The contiguous slice of score-matrix rows this rank reranks (all of them in a single process)."""
    if world_size() == 1:
        return range(num_rows)
    rank, ranks = dist.get_rank(), world_size()
    return range(num_rows * rank // ranks, num_rows * (rank + 1) // ranks)


def _top_k_pairs(sims: torch.Tensor, rows: range, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row index, column index, ITC value), each ``[len(rows) * k]``, of each row's ``k`` most similar columns."""
    k = min(k, sims.shape[1])
    top_values, top_columns = sims[rows.start : rows.stop].topk(k, dim=1)  # [R, k]
    row_index = torch.arange(rows.start, rows.stop, device=sims.device).repeat_interleave(k)
    return row_index, top_columns.reshape(-1), top_values.reshape(-1)


@torch.no_grad()
def itm_scores(
    model: BlipForImageTextRetrieval,
    images: EncodedImages,
    texts: EncodedTexts,
    image_index: torch.Tensor,
    text_index: torch.Tensor,
    batch_size: int = 128,
) -> torch.Tensor:
    """ITM "matched" logits ``[P]`` (float32) of the pairs ``(image_index[p], text_index[p])``."""
    scores = torch.empty(len(image_index), dtype=torch.float32, device=images.states.device)
    with _progress(len(image_index), batch_size, "pair", "ITM rerank") as progress:
        for start in range(0, len(image_index), batch_size):
            pair_images, pair_texts = image_index[start : start + batch_size], text_index[start : start + batch_size]
            attention_mask = texts.attention_mask[pair_texts]
            width = int(attention_mask.sum(dim=1).max())  # drop padding columns no text of this batch needs
            logits = model.itm_logits(
                images.states[pair_images], texts.input_ids[pair_texts, :width], attention_mask[:, :width]
            )
            scores[start : start + batch_size] = logits[:, 1].float()
            progress.update(len(pair_images))
    return scores


def _score_matrix(
    shape: tuple[int, int], rows: range, row_index: torch.Tensor, column_index: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """This rank's rows filled (-100 outside the top-k), zeros elsewhere, so a cross-rank sum is exact."""
    scores = torch.zeros(shape, dtype=torch.float32, device=values.device)
    scores[rows.start : rows.stop] = NOT_RERANKED
    scores[row_index, column_index] = values
    if world_size() > 1:
        dist.all_reduce(scores)
    return scores


@torch.no_grad()
def rerank_scores(
    model: BlipForImageTextRetrieval,
    images: EncodedImages,
    texts: EncodedTexts,
    k_test: int = 256,
    batch_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's retrieval scores: ``scores_i2t [N_img, N_txt]`` and ``scores_t2i [N_txt, N_img]`` (float32, CPU).

    Each row's ``k_test`` best candidates by ITC get ``ITM matched logit + ITC cosine``, the rest -100;
    ``k_test`` >= the number of candidates scores every pair with the ITM head.
    """
    num_images, num_texts = len(images.features), len(texts.features)
    sims = images.features @ texts.features.t()  # [N_img, N_txt] ITC cosine
    image_rows, text_rows = rank_rows(num_images), rank_rows(num_texts)
    i2t_images, i2t_texts, i2t_itc = _top_k_pairs(sims, image_rows, k_test)
    t2i_texts, t2i_images, t2i_itc = _top_k_pairs(sims.t(), text_rows, k_test)
    # One ITM pass over the union of both directions' pairs, keyed image-major (pairs of one image adjacent).
    i2t_keys, t2i_keys = i2t_images * num_texts + i2t_texts, t2i_images * num_texts + t2i_texts
    keys = torch.unique(torch.cat([i2t_keys, t2i_keys]))  # sorted
    matched = itm_scores(model, images, texts, keys // num_texts, keys % num_texts, batch_size)
    i2t_values = matched[torch.searchsorted(keys, i2t_keys)] + i2t_itc
    t2i_values = matched[torch.searchsorted(keys, t2i_keys)] + t2i_itc
    scores_i2t = _score_matrix((num_images, num_texts), image_rows, i2t_images, i2t_texts, i2t_values)
    scores_t2i = _score_matrix((num_texts, num_images), text_rows, t2i_texts, t2i_images, t2i_values)
    return scores_i2t.cpu(), scores_t2i.cpu()


# ==================================================================== retrieval: metrics
def flatten_captions(captions: Sequence[str | Sequence[str]]) -> tuple[list[str], list[int], list[list[int]]]:
    """Per-image captions -> (texts, txt2img [N_txt], img2txt [N_img] lists of text indices)."""
    texts: list[str] = []
    txt2img: list[int] = []
    img2txt: list[list[int]] = []
    for image, image_captions in enumerate(captions):
        image_captions = [image_captions] if isinstance(image_captions, str) else list(image_captions)
        if not image_captions:
            raise EvaluationInputError(f"image {image} has no caption")
        img2txt.append(list(range(len(texts), len(texts) + len(image_captions))))
        texts.extend(image_captions)
        txt2img.extend([image] * len(image_captions))
    return texts, txt2img, img2txt


def _ranks(scores: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """Per row, the 0-based rank of its best correct column: wrong columns scoring at least as high rank above
    it (ties count against the query, so the -100 fill never counts as a hit)."""
    best = scores.masked_fill(~correct, -math.inf).amax(dim=1, keepdim=True)  # [R, 1]
    return ((scores >= best) & ~correct).sum(dim=1)


def _recalls(ranks: torch.Tensor, prefix: str) -> dict[str, float]:
    recalls = {f"{prefix}_r{k}": 100.0 * float((ranks < k).double().mean()) for k in RECALL_KS}
    recalls[f"{prefix}_r_mean"] = sum(recalls.values()) / len(RECALL_KS)
    return recalls


def recall_at_k(
    scores_i2t: torch.Tensor, scores_t2i: torch.Tensor, txt2img: Sequence[int], img2txt: Sequence[Sequence[int]]
) -> dict[str, float]:
    """BLIP's ``itm_eval``, in percent: ``txt_r{1,5,10}`` = image->text recall (an image is a hit when its best-ranked
    caption is within the top K), ``img_r{1,5,10}`` = text->image recall, their means and ``r_mean``.

    scores_i2t ``[N_img, N_txt]``, scores_t2i ``[N_txt, N_img]``; txt2img maps each text to its image, img2txt each
    image to its texts. Equal scores rank against the query (BLIP's argsort leaves them in arbitrary order).
    """
    scores_i2t, scores_t2i = torch.as_tensor(scores_i2t).double(), torch.as_tensor(scores_t2i).double()
    num_images, num_texts = scores_i2t.shape
    if scores_t2i.shape != (num_texts, num_images) or len(txt2img) != num_texts or len(img2txt) != num_images:
        raise ValueError(
            f"shape mismatch: scores_i2t {tuple(scores_i2t.shape)}, scores_t2i {tuple(scores_t2i.shape)}, "
            f"{len(txt2img)} txt2img entries, {len(img2txt)} img2txt entries"
        )
    correct_i2t = torch.zeros(num_images, num_texts, dtype=torch.bool)
    for image, text_indices in enumerate(img2txt):
        if not text_indices:
            raise ValueError(f"image {image} has no text in img2txt")
        correct_i2t[image, list(text_indices)] = True
    correct_t2i = torch.zeros(num_texts, num_images, dtype=torch.bool)
    correct_t2i[torch.arange(num_texts), torch.as_tensor(list(txt2img), dtype=torch.long)] = True
    metrics = {**_recalls(_ranks(scores_i2t, correct_i2t), "txt"), **_recalls(_ranks(scores_t2i, correct_t2i), "img")}
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    return metrics


def retrieval_scores(
    model: BlipForImageTextRetrieval,
    tokenizer: BlipTokenizer,
    processor: BlipImageProcessor,
    images: Sequence[ImageSource],
    texts: Sequence[str],
    k_test: int = 256,
    batch_size: int = 64,
    itm_batch_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores_i2t [N_img, N_txt], scores_t2i [N_txt, N_img])`` of images (PIL or paths) against texts."""
    model.eval()
    encoded_images = encode_images(model, processor, images, batch_size)
    encoded_texts = encode_texts(model, tokenizer, texts, batch_size)
    return rerank_scores(model, encoded_images, encoded_texts, k_test, itm_batch_size)


def evaluate_retrieval(
    model: BlipForImageTextRetrieval,
    tokenizer: BlipTokenizer,
    processor: BlipImageProcessor,
    images: Sequence[ImageSource],
    captions: Sequence[str | Sequence[str]],
    k_test: int = 256,
    batch_size: int = 64,
    itm_batch_size: int = 128,
) -> dict[str, float]:
    """Recall@K metrics (:func:`recall_at_k`) of images (PIL or paths), each with its caption or list of captions.

    Captions are used as given; BLIP cleans them with ``pre_caption`` first (:func:`read_annotations` does).
    """
    texts, txt2img, img2txt = flatten_captions(captions)
    scores = retrieval_scores(model, tokenizer, processor, images, texts, k_test, batch_size, itm_batch_size)
    return recall_at_k(*scores, txt2img, img2txt)


# ==================================================================== caption metrics (coco-caption semantics)
_PUNCTUATION = re.compile(r"[^\w\s]")
# coco-caption's BLEU smoothing: a zero n-gram count still gives a finite (near-zero) precision.
_BLEU_TINY, _BLEU_SMALL = 1e-15, 1e-9


def normalize_caption(caption: str) -> str:
    """Lower-case, punctuation to spaces, single spaces: the stand-in for coco-caption's PTB tokenizer (Java)."""
    return " ".join(_PUNCTUATION.sub(" ", caption.lower()).split())


def _ngram_counts(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    """Counts of every 1..n-gram of ``words``."""
    return Counter(tuple(words[start : start + order]) for order in range(1, n + 1)
                   for start in range(len(words) - order + 1))


def _check_keys(predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]]) -> None:
    if predictions.keys() != references.keys():
        missing = sorted(map(str, references.keys() - predictions.keys()))[:5]
        extra = sorted(map(str, predictions.keys() - references.keys()))[:5]
        raise ValueError(f"predictions and references cover different ids (no prediction: {missing}, "
                         f"no reference: {extra})")
    empty = [key for key, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"ids without reference captions: {empty[:5]}")


def bleu(predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n of tokenised (space-separated) captions, as coco-caption's ``Bleu(n)``: clipped n-gram
    counts summed over the corpus, brevity penalty against the per-caption reference length closest to it."""
    _check_keys(predictions, references)
    correct, guesses = [0] * n, [0] * n
    prediction_length = reference_length = 0
    for key, prediction in predictions.items():
        words = prediction.split()
        reference_words = [reference.split() for reference in references[key]]
        max_reference_counts: Counter[tuple[str, ...]] = Counter()
        for reference in reference_words:
            max_reference_counts |= _ngram_counts(reference, n)  # | keeps the larger count per n-gram
        for ngram, count in _ngram_counts(words, n).items():
            correct[len(ngram) - 1] += min(count, max_reference_counts[ngram])
        for order in range(n):
            guesses[order] += max(0, len(words) - order)
        prediction_length += len(words)
        # Closest reference length; on a tie the shorter one (coco-caption's min over (distance, length)).
        reference_length += min((abs(len(reference) - len(words)), len(reference)) for reference in reference_words)[1]
    ratio = (prediction_length + _BLEU_TINY) / (reference_length + _BLEU_SMALL)
    brevity_penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores, precision_product = [], 1.0
    for order in range(n):
        precision_product *= (correct[order] + _BLEU_TINY) / (guesses[order] + _BLEU_SMALL)
        scores.append(precision_product ** (1 / (order + 1)) * brevity_penalty)
    return scores


@dataclass(frozen=True)
class _TfIdf:
    """One caption's tf-idf vector per n-gram order, its norms, and coco-caption's "length" (bigram count)."""

    vectors: list[dict[tuple[str, ...], float]]
    norms: list[float]
    length: int


def _tf_idf(counts: Counter[tuple[str, ...]], document_frequency: Counter, log_documents: float, n: int) -> _TfIdf:
    vectors: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
    for ngram, term_frequency in counts.items():
        inverse_document_frequency = log_documents - math.log(max(1.0, document_frequency[ngram]))
        vectors[len(ngram) - 1][ngram] = term_frequency * inverse_document_frequency
    norms = [math.sqrt(sum(weight * weight for weight in vector.values())) for vector in vectors]
    # coco-caption's length is the number of bigrams (its counter runs at n-gram index 1), not of words.
    length = sum(count for ngram, count in counts.items() if len(ngram) == 2)
    return _TfIdf(vectors, norms, length)


def _cider_similarity(prediction: _TfIdf, reference: _TfIdf, sigma: float) -> float:
    """Sum over n-gram orders of the clipped cosine (prediction weights capped at the reference's), each damped by a
    Gaussian on the length difference."""
    penalty = math.exp(-((prediction.length - reference.length) ** 2) / (2 * sigma**2))
    total = 0.0
    for vector, norm, reference_vector, reference_norm in zip(
        prediction.vectors, prediction.norms, reference.vectors, reference.norms
    ):
        value = sum(min(weight, reference_vector.get(ngram, 0.0)) * reference_vector.get(ngram, 0.0)
                    for ngram, weight in vector.items())
        if norm != 0 and reference_norm != 0:
            value /= norm * reference_norm
        total += value * penalty
    return total


def cider_d(
    predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]], n: int = 4, sigma: float = 6.0
) -> float:
    """Corpus CIDEr-D of tokenised captions, as coco-caption's ``Cider()``: tf-idf over 1..n-grams with document
    frequencies from the references, clipped cosine with a length penalty, averaged over orders and references,
    x10, then averaged over images."""
    _check_keys(predictions, references)
    reference_counts = {key: [_ngram_counts(reference.split(), n) for reference in refs]
                        for key, refs in references.items()}
    document_frequency: Counter[tuple[str, ...]] = Counter()
    for counts in reference_counts.values():
        document_frequency.update(set().union(*counts))
    log_documents = math.log(len(references))
    scores = []
    for key, prediction in predictions.items():
        prediction_vector = _tf_idf(_ngram_counts(prediction.split(), n), document_frequency, log_documents, n)
        total = sum(_cider_similarity(prediction_vector, _tf_idf(counts, document_frequency, log_documents, n), sigma)
                    for counts in reference_counts[key])
        scores.append(10.0 * total / n / len(reference_counts[key]))
    return sum(scores) / len(scores)


def caption_metrics(predictions: Mapping[Any, str], references: Mapping[Any, Sequence[str]]) -> dict[str, float]:
    """``{"bleu4", "cider"}`` of raw captions (normalised here), coco-caption's numbers on our tokenisation."""
    predictions = {key: normalize_caption(caption) for key, caption in predictions.items()}
    references = {key: [normalize_caption(caption) for caption in refs] for key, refs in references.items()}
    return {"bleu4": bleu(predictions, references)[-1], "cider": cider_d(predictions, references)}


def caption_images(
    captioner: Captioner, images: Sequence[ImageSource], batch_size: int = 16, **generate_kwargs: Any
) -> list[str]:
    """One caption per image (PIL or paths) with a :class:`blip_fast.captioning.Captioner`; unreadable files raise."""
    captions: list[str] = []
    with _progress(len(images), batch_size, "img", "caption") as progress:
        for batch in image_batches(images, batch_size):
            captions.extend(captioner.caption(batch, **generate_kwargs))
            progress.update(len(batch))
    return captions


# ==================================================================== annotation files and models
def read_annotations(path: str | os.PathLike, image_root: str | os.PathLike) -> tuple[list[str], list[list[str]]]:
    """A BLIP/COCO-Karpathy test json ``[{"image": path, "caption": str | [str, ...]}]`` -> (image paths joined to
    ``image_root``, raw captions per image). Records naming the same image (a training-style json, one record per
    caption) are one image with all their captions: scored apart, each copy would count the others' captions as
    wrong matches. Bad records and missing image files are errors naming them."""
    try:
        records = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        hint = " (a json list is needed, not JSON Lines)" if str(error).startswith("Extra data") else ""
        raise EvaluationInputError(f"cannot read annotations {os.fspath(path)!r}: {error}{hint}") from error
    if not isinstance(records, list) or not records:
        raise EvaluationInputError(f"{os.fspath(path)}: expected a non-empty json list of {{image, caption}} records")
    captions_by_image: dict[str, list[str]] = {}
    for position, record in enumerate(records):
        where = f"{os.fspath(path)}[{position}]"
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            raise EvaluationInputError(f"{where}: not a record with an 'image' path")
        record_captions = record.get("caption")
        record_captions = [record_captions] if isinstance(record_captions, str) else record_captions
        if not isinstance(record_captions, list) or not record_captions or not all(
            isinstance(caption, str) for caption in record_captions
        ):
            raise EvaluationInputError(f"{where}: 'caption' must be a string or a non-empty list of strings")
        if empty := [turn for turn, caption in enumerate(record_captions, 1) if not caption.strip()]:
            raise EvaluationInputError(f"{where}: caption {empty[0]} is empty (a reference or query must say "
                                       "something)")
        image_path = os.path.normpath(os.path.join(os.fspath(image_root), record["image"]))
        if image_path not in captions_by_image and not os.path.isfile(image_path):
            raise EvaluationInputError(f"{where}: image file {image_path!r} not found")
        captions_by_image.setdefault(image_path, []).extend(record_captions)
    return list(captions_by_image), list(captions_by_image.values())


def clean_captions(captions: Sequence[Sequence[str]], images: Sequence[str],
                   where: str = "annotations") -> list[list[str]]:
    """BLIP's ``pre_caption`` on every retrieval caption (``captions[i]`` are ``images[i]``'s); one that cleans to
    nothing is an error (never dropped), naming its text and image: records of one image are merged by then."""
    cleaned = [[pre_caption(caption, CAPTION_MAX_WORDS) for caption in image_captions] for image_captions in captions]
    for image, raw, image_captions in zip(images, captions, cleaned):
        if not all(image_captions):
            text = raw[image_captions.index("")]
            raise EvaluationInputError(f"{where}: the caption {text!r} of {image} is empty after cleaning (BLIP's "
                                       "pre_caption turns .!\"()*#:;~ into spaces)")
    return cleaned


def load_retrieval_model(
    directory: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[BlipForImageTextRetrieval, BlipTokenizer, BlipImageProcessor]:
    """Retrieval model, tokenizer and image processor from one directory or hub id."""
    return load_task_model(BlipForImageTextRetrieval, directory, device, dtype)


def format_table(metrics: Mapping[str, float]) -> str:
    """Metric names and values as an aligned two-column table."""
    width = max(map(len, metrics))
    return "\n".join(f"{name:<{width}}  {value:8.2f}" for name, value in metrics.items())


def run_retrieval_evaluation(
    model_dir: str | os.PathLike,
    annotations: str | os.PathLike,
    image_root: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    k_test: int = 256,
    batch_size: int = 64,
    itm_batch_size: int = 128,
) -> dict[str, Any]:
    """``blip-fast evaluate --task retrieval``: a report with the recall@K metrics and what produced them."""
    image_paths, captions = read_annotations(annotations, image_root)
    captions = clean_captions(captions, image_paths, os.fspath(annotations))
    model, tokenizer, processor = load_retrieval_model(model_dir, device, dtype)
    metrics = evaluate_retrieval(model, tokenizer, processor, image_paths, captions, k_test, batch_size, itm_batch_size)
    return {"task": "retrieval", "model": os.fspath(model_dir), "annotations": os.fspath(annotations),
            "num_images": len(image_paths), "num_texts": sum(map(len, captions)), "k_test": k_test, "metrics": metrics}


def run_caption_evaluation(
    model_dir: str | os.PathLike,
    annotations: str | os.PathLike,
    image_root: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
    prompt: str = "a picture of ",
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """``blip-fast evaluate --task caption``: a report with BLEU-4/CIDEr-D, the decoding settings and every caption."""
    image_paths, references = read_annotations(annotations, image_root)
    captioner = Captioner.from_pretrained(model_dir, device=device, dtype=dtype, prompt=prompt)
    if "max_length" in generate_kwargs:  # before any image is decoded
        captioner.check_lengths(generate_kwargs["max_length"], generate_kwargs.get("min_length", 0))
    predictions = caption_images(captioner, image_paths, batch_size, **generate_kwargs)
    metrics = caption_metrics(dict(enumerate(predictions)), dict(enumerate(references)))
    return {"task": "caption", "model": os.fspath(model_dir), "annotations": os.fspath(annotations),
            "num_images": len(image_paths), "generation": generate_kwargs, "metrics": metrics,
            "predictions": [{"image": path, "caption": caption} for path, caption in zip(image_paths, predictions)]}
