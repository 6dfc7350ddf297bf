"""CapFilt (BLIP §3.3) at scale: a captioner writes synthetic captions, a filter (ITM head) keeps the matched ones.

Per image: the captioner samples ``num_captions`` captions (nucleus, top_p 0.9, repetition penalty 1.1, as BLIP's
``generate(sample=True)``; or, with ``num_beams``, the best of a beam search, BLIP's ablation in its Table 2; all
captions of an image share its cross-attention K/V), then the filter scores the web
caption(s) and every synthetic caption with its ITM head, running the ViT once per image for all of them. A caption
is kept when ITM predicts "matched" (argmax, i.e. p(match) > 0.5) or, with ``threshold``, when p(match) exceeds it.
Every caption is cleaned with BLIP's ``pre_caption`` before it is tokenised or written.

Work is cut into *units*: one per input shard, or ``images_per_part`` consecutive entries of a BLIP json. Unit ``u``
belongs to rank ``u % WORLD_SIZE`` (RANK/WORLD_SIZE as torchrun and the deepspeed launcher set them; the ranks never
talk to each other). Batches never straddle units and unit ``u`` samples from a generator seeded with
``unit_seed(seed, u)``, so a unit gives the same output whichever rank, run or resume computes it. Output layout::

    <output>/capfilt_output.json       marks the folder as CapFilt's (written first)
    <output>/capfilt_config.json       options that decide the output, pinned when the first unit is done; a
                                       rerun with other values is refused
    <output>/parts/unit-00003.jsonl    every scored caption of unit 3 (kept or not), one json per line
    <output>/parts/unit-00003.errors.jsonl   records of unit 3 that could not be used, with the reason
    <output>/web-00042.tar             (shard input) the kept images of input shard web-00042.tar: every member of
                                       the input sample, key.txt = the best kept caption, key.json = the input's
                                       fields + "caption", "captions" (all kept, with source and itm_score) and
                                       "web_caption" (the input's)
    <output>/manifest/unit-00003.json  written last: unit 3 is done, with its counts and seconds
    <output>/bootstrapped.json         (json input) kept captions: [{"image", "caption", "source", "itm_score"}]
    <output>/scored.jsonl, errors.jsonl, manifest.json, summary.json     the merge of all units

Nothing the run did not write is touched (the checks and all file I/O live in :mod:`blip_fast.capfilt_io`; this
module runs the models): before any work, the input must exist (every shard of a pattern, the json
file; ``pipe:`` and URL specs are refused: shards are read by byte offset), no input may lie inside the output
folder, and the output folder must be new, empty, or an earlier CapFilt output. Input paths are compared in
absolute, normalised form, so ``data/x`` and ``data/x/`` are the same input.

Fault tolerance: every file is written under a temporary name and renamed when complete, and a unit counts as done
only once its manifest entry exists (written after its other files). A rerun skips done units, deletes the
temporaries of the others and redoes them, so after a crash (even SIGKILL) the final files are byte-identical to an
uninterrupted run's (``summary.json``'s timing fields excepted). The merge runs in whichever rank finishes with every
unit done (the last one, or any rerun), needs no barrier, and is deterministic, so concurrent merges are harmless;
rerunning with every unit done only merges. Launch one process per GPU, on one or many nodes sharing ``<output>``:

    torchrun --nnodes N --nproc_per_node 8 -m blip_fast.cli capfilt --captioner C --filter F --input I --output O
    deepspeed --num_gpus 8 --module blip_fast.cli capfilt ...     (``--device auto`` picks cuda:LOCAL_RANK)

Images are read by DataLoader workers and decoded there (PIL) or, on CUDA with torchvision, JPEGs are decoded and
resized as a batch on the GPU (nvJPEG; ``image_decode``, :mod:`blip_fast.capfilt_images`), with the same error
accounting. Once the run starts, bad records never stop it and are never silently lost: each input record ends up in
``scored.jsonl`` or in ``errors.jsonl`` (``{"unit", "key", "reason", "detail"}``). Reasons: ``unreadable_image``
(missing, corrupt or truncated file; images over twice PIL's ``MAX_IMAGE_PIXELS``, ~179 megapixels, are refused as
possible decompression bombs before decoding, smaller huge images are decoded and resized), ``empty_caption`` (the
web caption is missing or empty after cleaning; the image is still captioned), ``missing_image``, ``bad_record``,
``missing_shard`` and ``truncated_shard`` (its complete samples are kept). Grayscale, palette and CMYK images are
valid: the image processors convert them to RGB. The summary's ``error_rate`` is the fraction of input records that
could not be used at all (every reason but ``empty_caption``; 1.0 when no image was usable); ``blip-fast capfilt``
exits with status 1 when it passes ``--max-error-rate``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from blip_fast.capfilt_images import BatchPixels, ImageStream, decodes_on_device
from blip_fast.capfilt_io import (
    CapFiltError,
    CapFiltInput,
    Item,
    Unit,
    UnitWriter,
    check_options,
    claim_unit,
    lock_unit,
    manifest_path,
    merge,
    normalised,
    prepare_output,
)
from blip_fast.captioning import Captioner
from blip_fast.data.transforms import BlipImageProcessor
from blip_fast.data.workers import die_with_parent
from blip_fast.errors import environment_int
from blip_fast.hub import resolve
from blip_fast.modeling.blip import BlipForImageTextRetrieval
from blip_fast.modeling.vit import vision_states
from blip_fast.task_models import load_task_model
from blip_fast.tokenizer import BlipTokenizer, pre_caption

#: BLIP tokenises ITM texts to at most 35 tokens (``blip_retrieval.py``: ``max_length=35``).
ITM_MAX_TOKENS = 35
#: BLIP's captioner samples with this repetition penalty (``blip.py: generate(sample=True)``).
REPETITION_PENALTY = 1.1
#: Options that do not change the output; every other option must match when a run resumes.
_RUNTIME_OPTIONS = ("output", "workers", "device", "image_decode", "rank", "world_size", "progress",
                    "max_error_rate")
#: Options naming files: compared in absolute, normalised form.
_PATH_OPTIONS = ("captioner", "filter", "input", "image_root")


@dataclass(frozen=True)
class CapFiltOptions:
    """What ``blip-fast capfilt`` takes. ``input``: a folder of ``.tar`` shards, a shard pattern (braces/glob), or a
    BLIP ``.json``/``.jsonl`` whose image paths are relative to ``image_root``. ``rank``/``world_size`` default to
    the RANK/WORLD_SIZE environment variables. ``batch_size`` is part of the sampling stream (same seed and batch
    size -> same captions). ``image_decode``: ``auto``, ``workers`` or ``device`` (:mod:`blip_fast.capfilt_images`)."""

    captioner: str | os.PathLike
    filter: str | os.PathLike
    input: str | os.PathLike
    output: str | os.PathLike
    image_root: str | os.PathLike | None = None
    num_captions: int = 1
    top_p: float = 0.9
    num_beams: int | None = None  # None: nucleus sampling (BLIP's); N: the num_captions best of N beams
    max_length: int = 20
    min_length: int = 5
    prompt: str = "a picture of "
    threshold: float | None = None
    batch_size: int = 32
    workers: int = 4
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    image_decode: str = "auto"
    images_per_part: int = 1000
    max_words: int = 30
    rank: int | None = None
    world_size: int | None = None
    progress: bool = True
    max_error_rate: float = 0.05

    def __post_init__(self) -> None:
        for name in ("num_captions", "batch_size", "images_per_part", "max_length"):
            if getattr(self, name) < 1:
                raise CapFiltError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.workers < 0 or self.min_length < 0:
            raise CapFiltError(f"workers and min_length must be >= 0, got {self.workers} and {self.min_length}")
        if not 0.0 < self.top_p <= 1.0:
            raise CapFiltError(f"top_p is a probability mass in (0, 1], got {self.top_p}")
        if self.num_beams is not None and self.num_beams < self.num_captions:
            raise CapFiltError(f"num_beams must be >= num_captions ({self.num_captions}): a beam search returns at "
                               f"most one caption per beam, got {self.num_beams}")
        if self.threshold is not None and not 0.0 <= self.threshold < 1.0:
            raise CapFiltError(f"threshold is a probability in [0, 1), got {self.threshold}")
        if not hasattr(torch, self.dtype) or not isinstance(getattr(torch, self.dtype), torch.dtype):
            raise CapFiltError(f"dtype must name a torch dtype (float32, float16, bfloat16), got {self.dtype!r}")

    def fingerprint(self) -> dict[str, Any]:
        """The options that decide the output, as json values (paths absolute and normalised)."""
        values = dataclasses.asdict(self)
        return {name: (normalised(value) if name in _PATH_OPTIONS and value is not None else value)
                for name, value in values.items() if name not in _RUNTIME_OPTIONS}


def default_batch_size(device: torch.device | str) -> int:
    """Images per batch when none is given: 256 on a GPU (the decoder's K/V reads dominate there and amortise over
    the batch), 32 on a CPU."""
    return 256 if torch.device(device).type == "cuda" else 32


def unit_seed(seed: int, unit: int) -> int:
    """The sampling seed of work unit ``unit``: a pure function of (seed, unit), the same in every process."""
    digest = hashlib.sha256(f"blip_fast.capfilt/{seed}/{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _as_list(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batch


# ==================================================================== the two models
class CapFiltModels:
    """The captioner and the filter (each with its tokenizer and image processor) on one device.

    The filter's ViT runs once per image (compiled on CUDA, on a side stream that overlaps the captioner's decoding),
    or not at all when the captioner has the same vision tower and preprocessing (its states are shared); each
    image's cross-attention K/V are projected once for all its captions."""

    def __init__(
        self, captioner: Captioner, filter_model: BlipForImageTextRetrieval, filter_tokenizer: BlipTokenizer,
        filter_processor: BlipImageProcessor, options: CapFiltOptions,
    ) -> None:
        self.captioner, self.filter = captioner, filter_model.eval()
        self.filter_tokenizer, self.options = filter_tokenizer, options
        self.processors = {"captioner": captioner.processor}
        if filter_processor != captioner.processor:  # equal settings: preprocess once for both models
            self.processors["filter"] = filter_processor
        self.shared_vision = "filter" not in self.processors and _same_weights(
            captioner.model.vision_model, filter_model.vision_model)
        self.pixels = BatchPixels(self.processors, filter_model.device)
        self._side_stream = torch.cuda.Stream(filter_model.device) if filter_model.device.type == "cuda" else None

    @classmethod
    def from_options(cls, options: CapFiltOptions) -> CapFiltModels:
        dtype = getattr(torch, options.dtype)
        captioner = Captioner.from_pretrained(options.captioner, options.device, dtype, options.prompt)
        captioner.check_lengths(options.max_length, options.min_length)
        filter_model, filter_tokenizer, processor = load_task_model(BlipForImageTextRetrieval, options.filter,
                                                                    options.device, dtype)
        return cls(captioner, filter_model, filter_tokenizer, processor, options)

    def decoding(self) -> dict[str, Any]:
        """The captioner's ``generate`` arguments: BLIP's nucleus sampling, or its beam search (no repetition
        penalty, as BLIP's ``generate(sample=False)``)."""
        options = self.options
        lengths = dict(num_return_sequences=options.num_captions, max_length=options.max_length,
                       min_length=options.min_length)
        if options.num_beams is not None:
            return dict(num_beams=options.num_beams, **lengths)
        return dict(do_sample=True, top_p=options.top_p, repetition_penalty=REPETITION_PENALTY, **lengths)

    @torch.no_grad()
    def filter_states(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The filter's ViT states ``[B, N, D]``, launched on a side stream on CUDA (the captioner decodes on the
        main stream meanwhile); :meth:`match_logits` waits for them."""
        model = self.filter
        pixels = pixel_values.to(model.device, model.dtype, non_blocking=True)
        if self._side_stream is None:
            return vision_states(model.vision_model, pixels)
        main = torch.cuda.current_stream(model.device)
        self._side_stream.wait_stream(main)
        with torch.cuda.stream(self._side_stream):
            states = vision_states(model.vision_model, pixels)
        pixels.record_stream(self._side_stream)
        states.record_stream(main)
        return states

    @torch.no_grad()
    def caption_ids(self, pixel_values: torch.Tensor, generator: torch.Generator | None,
                    image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The captioner's sampled ids ``[B * K, L]`` for ``pixel_values [B, 3, H, W]``, from the prompt's last token
        on, on the CPU (the device part of :meth:`synthetic_captions`). ``image_embeds``: the filter's states, when
        :attr:`shared_vision` (the captioner then runs no ViT)."""
        model = self.captioner.model
        prompt = self.captioner.prompt_ids.to(model.device).expand(pixel_values.shape[0], -1)
        if image_embeds is not None:
            self._wait_for_side_stream()
        ids = model.generate(pixel_values.to(model.device, model.dtype), input_ids=prompt, generator=generator,
                             image_embeds=image_embeds, **self.decoding())  # [B * K, L]
        return ids[:, prompt.shape[1] - 1 :].cpu()

    def caption_texts(self, ids: torch.Tensor) -> list[list[str]]:
        """:meth:`caption_ids` -> ``num_captions`` cleaned captions per image (host work only)."""
        cleaned = [pre_caption(text, self.options.max_words) for text in self.captioner.tokenizer.batch_decode(
            ids, skip_special_tokens=True)]
        per_image = self.options.num_captions
        return [cleaned[start : start + per_image] for start in range(0, len(cleaned), per_image)]

    def synthetic_captions(self, pixel_values: torch.Tensor, generator: torch.Generator | None,
                           image_embeds: torch.Tensor | None = None) -> list[list[str]]:
        """``num_captions`` cleaned captions per image of ``pixel_values [B, 3, H, W]`` (the prompt stripped)."""
        return self.caption_texts(self.caption_ids(pixel_values, generator, image_embeds))

    def itm_tokens(self, captions: Sequence[Sequence[str]]) -> dict[str, torch.Tensor] | None:
        """The filter's input ids and mask (CPU) of every image's captions, flattened; None when there are none."""
        flat = [text for texts in captions for text in texts]
        if not flat:
            return None
        return self.filter_tokenizer(flat, padding=True, truncation=True, max_length=ITM_MAX_TOKENS,
                                     return_tensors="pt")

    @torch.no_grad()
    def match_logits(self, pixel_values: torch.Tensor, captions: Sequence[Sequence[str]],
                     image_embeds: torch.Tensor | None = None,
                     tokens: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """ITM logits ``[n_b, 2]`` (fp32, index 1 = matched) of each image's captions.

        One ViT pass per image (or ``image_embeds`` from :meth:`filter_states`), and one cross-attention K/V
        projection per image: its captions attend as extra query rows (``texts_per_image``), an image with fewer
        captions than the widest repeating its last one (scores dropped). ``tokens``: :meth:`itm_tokens` of
        ``captions`` when already computed (on the text thread)."""
        model = self.filter
        counts = [len(texts) for texts in captions]
        scored = [image for image, count in enumerate(counts) if count]
        if not scored:
            return [torch.empty(0, 2) for _ in captions]
        if image_embeds is None:
            image_embeds = vision_states(model.vision_model, pixel_values.to(model.device, model.dtype))
        tokens = self.itm_tokens(captions) if tokens is None else tokens
        input_ids = tokens["input_ids"].to(model.device, non_blocking=True)
        attention_mask = tokens["attention_mask"].to(model.device, non_blocking=True)
        width, starts = max(counts), [sum(counts[:image]) for image in range(len(counts))]
        slots = torch.tensor([starts[image] + min(row, counts[image] - 1) for image in scored for row in range(width)],
                             device=model.device)
        if len(scored) < len(counts):
            image_embeds = image_embeds[torch.tensor(scored, device=model.device)]
        self._wait_for_side_stream()
        logits = model.itm_logits(image_embeds, input_ids[slots], attention_mask[slots],
                                  texts_per_image=width).float().cpu().view(len(scored), width, 2)
        per_image = [torch.empty(0, 2) for _ in captions]
        for position, image in enumerate(scored):
            per_image[image] = logits[position, : counts[image]]
        return per_image

    def _wait_for_side_stream(self) -> None:
        if self._side_stream is not None:
            torch.cuda.current_stream(self.filter.device).wait_stream(self._side_stream)

    def keep(self, logits: torch.Tensor) -> tuple[list[bool], list[float]]:
        """Decisions and p(match) for ITM logits ``[n, 2]``: argmax by default, else p(match) > threshold."""
        p_match = logits.softmax(dim=-1)[:, 1]
        kept = logits.argmax(dim=-1) == 1 if self.options.threshold is None else p_match > self.options.threshold
        return kept.tolist(), p_match.tolist()


def _same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    """Whether two modules hold equal parameters (one shared vision tower, or equal copies of it)."""
    if first is second:
        return True
    pairs = list(zip(first.state_dict().values(), second.state_dict().values()))
    return len(pairs) == len(first.state_dict()) == len(second.state_dict()) and all(
        a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b) for a, b in pairs)


class BackgroundWriter:
    """A unit's :class:`~blip_fast.capfilt_io.UnitWriter` driven from a worker thread: recording captions and
    writing the output shard overlap the next batch's GPU work. Calls run in order; :meth:`commit` waits for them
    and raises what any of them raised."""

    def __init__(self, writer: UnitWriter) -> None:
        self.writer = writer
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="capfilt-writer")
        self._pending: list[concurrent.futures.Future] = []

    def submit(self, fn, *args) -> None:
        """Run ``fn(writer, *args)`` on the worker thread, after everything submitted before."""
        self._pending.append(self._pool.submit(fn, self.writer, *args))

    def commit(self) -> dict[str, Any]:
        try:
            for future in self._pending:
                future.result()
            return self.writer.commit()
        finally:
            self._pool.shutdown()


# ==================================================================== the run
def _batches(units: Sequence[Unit], batch_size: int) -> list[list[int]]:
    """Dataset indices per batch: consecutive items of one unit, never two units in one batch."""
    batches, start = [], 0
    for unit in units:
        batches += [list(range(first, min(first + batch_size, start + len(unit.items))))
                    for first in range(start, start + len(unit.items), batch_size)]
        start += len(unit.items)
    return batches


def _record_batch(writer: UnitWriter, unreadable: list[tuple[Item, str]], scored: list[tuple[Any, ...]]) -> None:
    """One batch's results into the unit's writer (on the writer thread)."""
    for item, reason in unreadable:
        writer.error(item.key, "unreadable_image", reason)
    for item, data, web_empty, synthetic_empty, captions in scored:
        if web_empty:
            writer.error(item.key, "empty_caption", "web caption missing or empty after cleaning")
        writer.counts["synthetic_empty"] += synthetic_empty
        writer.add(item, data, captions)


@dataclass
class _Batch:
    """One batch between its stages (:func:`_caption_batch` -> :func:`_batch_texts` -> :func:`_score_batch`)."""

    unreadable: list[tuple[Item, str]]
    good: list[tuple[Item, dict[str, Any]]]
    filter_pixels: torch.Tensor | None = None
    filter_states: torch.Tensor | None = None
    ids: torch.Tensor | None = None  # [B * K, L] the captioner's samples (CPU)


def _caption_batch(models: CapFiltModels, items: list[Item], loaded: list[dict[str, Any]],
                   generator: torch.Generator) -> _Batch:
    """The device work that draws from the unit's generator (main thread, in batch order): pixels, the filter's ViT
    (a side stream on CUDA), the captioner's sampling. Unreadable images are set aside for the errors."""
    pixels, errors = models.pixels(loaded, [item.key for item in items])
    batch = _Batch([(item, error) for item, error in zip(items, errors) if error is not None],
                   [(item, entry) for item, entry, error in zip(items, loaded, errors) if error is None])
    if batch.good:
        caption_pixels = pixels["captioner"]
        batch.filter_pixels = pixels.get("filter", caption_pixels)
        batch.filter_states = models.filter_states(batch.filter_pixels)  # overlaps the decoding below on CUDA
        batch.ids = models.caption_ids(caption_pixels, generator,
                                       batch.filter_states if models.shared_vision else None)
    return batch


def _batch_texts(models: CapFiltModels, batch: _Batch) -> tuple[list[tuple[bool, int, list]], dict | None]:
    """Host work (the text thread, while the device decodes the next batch): the samples' text, every caption
    cleaned, per image ``(web caption empty, empty samples, [(caption, source)])``, and the filter's tokens."""
    if not batch.good:
        return [], None
    candidates = []
    for (item, _), samples in zip(batch.good, models.caption_texts(batch.ids)):
        web = [pre_caption(caption, models.options.max_words) for caption in item.web_captions]
        candidates.append((not all(web), samples.count(""),
                           [(text, "web") for text in web if text] + [(text, "synthetic") for text in samples if text]))
    return candidates, models.itm_tokens([[text for text, _ in pairs] for *_, pairs in candidates])


def _score_batch(models: CapFiltModels, writer: BackgroundWriter, batch: _Batch,
                 texts: concurrent.futures.Future) -> None:
    """The filter's ITM pass on the device, then the batch's records and errors to the writer thread."""
    candidates, tokens = texts.result()
    scored = []
    if batch.good:
        logits = models.match_logits(batch.filter_pixels, [[text for text, _ in pairs] for *_, pairs in candidates],
                                     image_embeds=batch.filter_states, tokens=tokens)
        for (item, entry), (web_empty, synthetic_empty, pairs), image_logits in zip(batch.good, candidates, logits):
            kept, scores = models.keep(image_logits)
            scored.append((item, entry["data"], web_empty, synthetic_empty,
                           [(text, source, k, s) for (text, source), k, s in zip(pairs, kept, scores)]))
    writer.submit(_record_batch, batch.unreadable, scored)


def _rank_and_world(options: CapFiltOptions) -> tuple[int, int]:
    rank = options.rank if options.rank is not None else environment_int("RANK", 0)
    world = options.world_size if options.world_size is not None else environment_int("WORLD_SIZE", 1)
    if not 0 <= rank < world:
        raise CapFiltError(f"rank {rank} is outside world size {world}")
    return rank, world


def _run_units(models: CapFiltModels, units: list[Unit], options: CapFiltOptions, source: CapFiltInput,
               fingerprint: dict[str, Any]) -> None:
    stream = ImageStream([item for unit in units for item in unit.items], models.processors, not source.is_json,
                         decodes_on_device(options.image_decode, options.device, models.processors))
    loader = torch.utils.data.DataLoader(
        stream, batch_sampler=_batches(units, options.batch_size), num_workers=options.workers,
        collate_fn=_as_list, pin_memory=torch.device(options.device).type == "cuda",
        worker_init_fn=die_with_parent if options.workers else None,
    )
    output = Path(options.output)
    batches: Iterator[list[dict[str, Any]]] = iter(loader)
    total = sum(len(unit.items) for unit in units)
    # Two batches in flight: while batch i's captions are decoded, cleaned and tokenised on the text thread, the
    # main thread runs batch i + 1's ViT and sampling, then batch i's ITM pass (the device never waits on the host
    # text work, and the sampling order, hence the output, is unchanged).
    text_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="capfilt-text")
    with text_thread, tqdm(total=total, unit="img", desc="capfilt", disable=not options.progress) as progress:
        for unit in units:
            shard_name = source.output_shard(unit.index)
            with claim_unit(output, unit.index, shard_name):
                writer = BackgroundWriter(UnitWriter(unit, output, shard_name, fingerprint))
                _caption_unit(models, unit, writer, batches, text_thread, progress, options)
                writer.commit()


def _caption_unit(models: CapFiltModels, unit: Unit, writer: BackgroundWriter,
                  batches: Iterator[list[dict[str, Any]]], text_thread: concurrent.futures.Executor,
                  progress: tqdm, options: CapFiltOptions) -> None:
    """Caption and score ``unit``'s batches (the next ones ``batches`` yields) into ``writer``, two in flight."""
    generator = torch.Generator(device=options.device).manual_seed(unit_seed(options.seed, unit.index))
    in_flight = None
    for start in range(0, len(unit.items), options.batch_size):
        items = unit.items[start : start + options.batch_size]
        batch = _caption_batch(models, items, next(batches), generator)
        texts = text_thread.submit(_batch_texts, models, batch)
        if in_flight is not None:
            _score_batch(models, writer, *in_flight)
        in_flight = (batch, texts)
        progress.update(len(items))
    if in_flight is not None:
        _score_batch(models, writer, *in_flight)


def run_capfilt(options: CapFiltOptions) -> dict[str, Any]:
    """Run this rank's pending units, then merge if every unit is done. Returns the summary (``"merged": True``),
    or this rank's progress (``"merged": False``) while other ranks still work.

    Everything that can be checked without the models is checked before they load: the input exists and is not
    inside the output, the output folder is safe to write, the options match a pinned earlier run's (see
    :mod:`blip_fast.capfilt_io`), no other live run holds a unit this rank would write;
    :class:`~blip_fast.capfilt_io.CapFiltError` (or ``OutputInUseError``) says what is wrong."""
    rank, world = _rank_and_world(options)
    source = CapFiltInput(options.input, options.image_root, options.images_per_part)
    output = prepare_output(options.output, source.files)
    # Hub ids become their cached (or downloaded) snapshot folders: the pinned options name the models' commits.
    options = dataclasses.replace(options, captioner=resolve(options.captioner), filter=resolve(options.filter))
    fingerprint = {**options.fingerprint(), "input_listing": source.listing()}
    check_options(output, fingerprint)
    mine = [unit for unit in range(len(source)) if unit % world == rank]
    pending = [unit for unit in mine if not manifest_path(output, unit).is_file()]
    for unit in pending:  # another run on any of them stops this one before the models load
        lock_unit(output, unit).release()
    if pending:
        source.check_images(options.max_error_rate)
        models = CapFiltModels.from_options(options)
        _run_units(models, [source.unit(unit) for unit in pending], options, source, fingerprint)
    summary = merge(output, len(source), source.is_json, options.fingerprint())
    if summary is None:
        return {"merged": False, "rank": rank, "units_done_here": len(pending), "units_of_rank": len(mine)}
    return {"merged": True, **summary}
