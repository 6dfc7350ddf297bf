"""CapFilt (BLIP §3.3) at scale: a captioner writes synthetic captions, a filter (ITM head) keeps the matched ones.

Per image: the captioner samples ``num_captions`` captions (nucleus, top_p 0.9, repetition penalty 1.1, as BLIP's
``generate(sample=True)``; all samples of an image share its cross-attention K/V), then the filter scores the web
caption(s) and every synthetic caption with its ITM head, running the ViT once per image for all of them. A caption
is kept when ITM predicts "matched" (argmax, i.e. p(match) > 0.5) or, with ``threshold``, when p(match) exceeds it.
Every caption is cleaned with BLIP's ``pre_caption`` before it is tokenised or written.

Work is cut into *units*: one per input shard, or ``images_per_part`` consecutive entries of a BLIP json. Unit ``u``
belongs to rank ``u % WORLD_SIZE`` (RANK/WORLD_SIZE as torchrun and the deepspeed launcher set them; the ranks never
talk to each other). Batches never straddle units and unit ``u`` samples from a generator seeded with
``unit_seed(seed, u)``, so a unit gives the same output whichever rank, run or resume computes it. Output layout::

    <output>/capfilt_config.json       options that decide the output; a rerun with other values is refused
    <output>/parts/unit-00003.jsonl    every scored caption of unit 3 (kept or not), one json per line
    <output>/parts/unit-00003.errors.jsonl   records of unit 3 that could not be used, with the reason
    <output>/00003.tar                 (shard input) the kept images of unit 3: image bytes + key.json
    <output>/manifest/unit-00003.json  written last: unit 3 is done, with its counts and seconds
    <output>/bootstrapped.json         (json input) kept captions: [{"image", "caption", "source", "itm_score"}]
    <output>/scored.jsonl, errors.jsonl, manifest.json, summary.json     the merge of all units

Fault tolerance: every file is written under a temporary name and renamed when complete, and a unit counts as done
only once its manifest entry exists (written after its other files). A rerun skips done units, deletes the
temporaries of the others and redoes them, so after a crash (even SIGKILL) the final files are byte-identical to an
uninterrupted run's (``summary.json``'s timing fields excepted). The merge runs in whichever rank finishes with every
unit done (the last one, or any rerun), needs no barrier, and is deterministic, so concurrent merges are harmless;
rerunning with every unit done only merges. Launch one process per GPU, on one or many nodes sharing ``<output>``:

    torchrun --nnodes N --nproc_per_node 8 -m blip_fast.cli capfilt --captioner C --filter F --input I --output O
    deepspeed --num_gpus 8 --module blip_fast.cli capfilt ...     (``--device auto`` picks cuda:LOCAL_RANK)

Bad input never stops the run and is never silently lost: each input record ends up in ``scored.jsonl`` or in
``errors.jsonl`` (``{"unit", "key", "reason", "detail"}``). Reasons: ``unreadable_image`` (missing, corrupt or
truncated file; images over twice PIL's ``MAX_IMAGE_PIXELS``, ~179 megapixels, are refused as possible
decompression bombs before decoding, smaller huge images are decoded and resized), ``empty_caption`` (the web
caption is missing or empty after cleaning; the image is still captioned), ``missing_image``, ``bad_record``,
``missing_shard`` and ``truncated_shard`` (its complete samples are kept). Grayscale, palette and CMYK images are
valid: the image processors convert them to RGB.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import io
import json
import os
import tarfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from blip_fast.captioning import Captioner
from blip_fast.checkpoint import atomic_write_text
from blip_fast.data.datasets import (
    IMAGE_EXTENSIONS,
    expand_urls,
    read_annotation_file,
    read_member,
    scan_tar,
    split_member_name,
)
from blip_fast.data.transforms import BlipImageProcessor, ImageLoadError, load_image, load_image_bytes
from blip_fast.modeling.blip import BlipForImageTextRetrieval
from blip_fast.tokenizer import BlipTokenizer, pre_caption

#: BLIP tokenises ITM texts to at most 35 tokens (``blip_retrieval.py``: ``max_length=35``).
ITM_MAX_TOKENS = 35
#: BLIP's captioner samples with this repetition penalty (``blip.py: generate(sample=True)``).
REPETITION_PENALTY = 1.1
#: Options that do not change the output; every other option must match when a run resumes.
_RUNTIME_OPTIONS = ("output", "workers", "device", "rank", "world_size", "progress")


@dataclass(frozen=True)
class CapFiltOptions:
    """What ``blip-fast capfilt`` takes. ``input``: a folder of ``.tar`` shards, a shard pattern (braces/glob), or a
    BLIP ``.json``/``.jsonl`` whose image paths are relative to ``image_root``. ``rank``/``world_size`` default to
    the RANK/WORLD_SIZE environment variables. ``batch_size`` is part of the sampling stream (same seed and batch
    size -> same captions)."""

    captioner: str | os.PathLike
    filter: str | os.PathLike
    input: str | os.PathLike
    output: str | os.PathLike
    image_root: str | os.PathLike | None = None
    num_captions: int = 1
    top_p: float = 0.9
    max_length: int = 20
    min_length: int = 5
    prompt: str = "a picture of "
    threshold: float | None = None
    batch_size: int = 32
    workers: int = 4
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    images_per_part: int = 1000
    max_words: int = 30
    rank: int | None = None
    world_size: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("num_captions", "batch_size", "images_per_part"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threshold is not None and not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold is a probability in [0, 1), got {self.threshold}")
        if not hasattr(torch, self.dtype) or not isinstance(getattr(torch, self.dtype), torch.dtype):
            raise ValueError(f"dtype must name a torch dtype (float32, float16, bfloat16), got {self.dtype!r}")

    def fingerprint(self) -> dict[str, Any]:
        """The options that decide the output, as json values."""
        values = dataclasses.asdict(self)
        return {name: (os.fspath(value) if isinstance(value, os.PathLike) else value)
                for name, value in values.items() if name not in _RUNTIME_OPTIONS}


def unit_seed(seed: int, unit: int) -> int:
    """The sampling seed of work unit ``unit``: a pure function of (seed, unit), the same in every process."""
    digest = hashlib.sha256(f"blip_fast.capfilt/{seed}/{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ==================================================================== input: units and items
@dataclass(frozen=True)
class Item:
    """One image and its web captions. ``key`` names it in outputs and errors: the json's ``image`` value, or
    ``shard:key``; ``path`` is the file (or shard) that holds it; in a shard, ``offset``/``size`` locate its bytes
    and ``sample_key``/``extension``/``url`` are the sample's key, image extension and its json's url."""

    key: str
    path: str
    web_captions: tuple[str, ...]
    sample_key: str = ""
    offset: int = -1
    size: int = -1
    extension: str = ""
    url: str | None = None


@dataclass
class Unit:
    """A work unit: its items, the errors found while listing them, and (shard input) its output shard name."""

    index: int
    name: str
    items: list[Item] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def error(self, key: str, reason: str, detail: str = "") -> None:
        self.errors.append({"unit": self.index, "key": key, "reason": reason, "detail": detail})


class CapFiltInput:
    """The units of an input (cheap to list in every rank) and their items (loaded only for the units run)."""

    def __init__(self, source: str | os.PathLike, image_root: str | os.PathLike | None, images_per_part: int) -> None:
        self.source = source = os.fspath(source)
        self.is_json = source.endswith((".json", ".jsonl"))
        self.image_root = "" if image_root is None else os.fspath(image_root)
        if self.is_json:
            self.entries = read_annotation_file(Path(source))
            starts = range(0, len(self.entries), images_per_part)
            self.unit_names = [f"{source}[{start}:{start + images_per_part}]" for start in starts]
            self.images_per_part = images_per_part
        else:
            self.unit_names = sorted(glob.glob(os.path.join(source, "*.tar"))) if os.path.isdir(source) \
                else expand_urls(source)
            if not self.unit_names:
                raise FileNotFoundError(f"no .tar shards in {source!r}")

    def __len__(self) -> int:
        return len(self.unit_names)

    def unit(self, index: int) -> Unit:
        unit = Unit(index, self.unit_names[index])
        if self.is_json:
            start = index * self.images_per_part
            for position, entry in enumerate(self.entries[start : start + self.images_per_part], start):
                self._add_json_item(unit, entry, f"{self.source}[{position}]")
        else:
            self._add_shard_items(unit)
        return unit

    def _add_json_item(self, unit: Unit, entry: Any, where: str) -> None:
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            unit.error(where, "bad_record", "not a record with an 'image' path")
            return
        captions = entry.get("caption")
        captions = captions if isinstance(captions, list) else [captions]
        if any(caption is not None and not isinstance(caption, str) for caption in captions):
            unit.error(entry["image"], "bad_record", f"{where}: a caption is not text")
            return
        path = os.path.join(self.image_root, entry["image"])
        unit.items.append(Item(entry["image"], path, tuple(caption or "" for caption in captions)))

    def _add_shard_items(self, unit: Unit) -> None:
        shard = unit.name
        members, truncation, _ = scan_tar(shard)
        if truncation == "missing":
            unit.error(shard, "missing_shard", "no such file")
            return
        if truncation:
            unit.error(shard, "truncated_shard", truncation)
        groups: dict[str, dict[str, tuple[int, int]]] = {}
        for name, offset, size in members:
            key_ext = split_member_name(name)
            if key_ext is not None:
                groups.setdefault(key_ext[0], {}).setdefault(key_ext[1], (offset, size))
        with open(shard, "rb") as handle:
            for key, parts in groups.items():
                self._add_shard_item(unit, key, parts, handle)

    @staticmethod
    def _add_shard_item(unit: Unit, key: str, parts: dict[str, tuple[int, int]], handle: Any) -> None:
        where = f"{unit.name}:{key}"
        extension = next((extension for extension in IMAGE_EXTENSIONS if extension in parts), None)
        if extension is None:
            unit.error(where, "missing_image", f"members: {sorted(parts)}")
            return
        metadata: dict[str, Any] = {}
        if "json" in parts:
            try:
                metadata = json.loads(read_member(handle, *parts["json"]))
            except ValueError as error:
                unit.error(where, "bad_record", f"unreadable json member ({error})")
                return
            if not isinstance(metadata, dict):
                unit.error(where, "bad_record", f"json member holds a {type(metadata).__name__}, not an object")
                return
        caption = read_member(handle, *parts["txt"]).decode("utf-8", "replace") if "txt" in parts \
            else metadata.get("caption")
        if caption is not None and not isinstance(caption, str):
            unit.error(where, "bad_record", f"caption is {type(caption).__name__}, not text")
            return
        url = metadata.get("url") if isinstance(metadata.get("url"), str) else None
        offset, size = parts[extension]
        unit.items.append(Item(where, unit.name, (caption or "",), key, offset, size, extension, url))


# ==================================================================== decoding in DataLoader workers
class ImageStream(torch.utils.data.Dataset):
    """Items -> ``{"pixels": {processor name: FloatTensor [3, H, W]}, "data": bytes | None, "error": str | None}``.

    Runs in DataLoader workers: file reads, decoding and preprocessing happen off the main process. ``keep_bytes``
    returns the encoded image too (shard output copies it unchanged)."""

    def __init__(self, items: Sequence[Item], processors: dict[str, BlipImageProcessor], keep_bytes: bool) -> None:
        self.items, self.processors, self.keep_bytes = items, processors, keep_bytes

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        try:
            data = self._read(item)
            image = load_image(item.path) if data is None else load_image_bytes(data, item.key)
            pixels = {name: processor([image]).pixel_values[0] for name, processor in self.processors.items()}
        except (ImageLoadError, OSError, ValueError) as error:  # unreadable, or a mode PIL cannot convert
            return {"pixels": None, "data": None, "error": str(error)}
        return {"pixels": pixels, "data": data if self.keep_bytes else None, "error": None}

    def _read(self, item: Item) -> bytes | None:
        if item.offset < 0:
            return None
        with open(item.path, "rb") as handle:
            data = read_member(handle, item.offset, item.size)
        if len(data) != item.size:
            raise ImageLoadError(f"cannot load image {item.key!r}: shard ends inside it (changed on disk?)")
        return data


def _as_list(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batch


# ==================================================================== the two models
class CapFiltModels:
    """The captioner and the filter (each with its tokenizer and image processor) on one device."""

    def __init__(
        self, captioner: Captioner, filter_model: BlipForImageTextRetrieval, filter_tokenizer: BlipTokenizer,
        filter_processor: BlipImageProcessor, options: CapFiltOptions,
    ) -> None:
        self.captioner, self.filter = captioner, filter_model.eval()
        self.filter_tokenizer, self.options = filter_tokenizer, options
        self.processors = {"captioner": captioner.processor}
        if filter_processor != captioner.processor:  # equal settings: preprocess once for both models
            self.processors["filter"] = filter_processor

    @classmethod
    def from_options(cls, options: CapFiltOptions) -> CapFiltModels:
        dtype = getattr(torch, options.dtype)
        captioner = Captioner.from_pretrained(options.captioner, options.device, dtype, options.prompt)
        filter_model = BlipForImageTextRetrieval.from_pretrained(options.filter, torch_dtype=dtype,
                                                                 device=options.device)
        processor = BlipImageProcessor.for_model_dir(options.filter, filter_model.config.vision.image_size)
        return cls(captioner, filter_model, BlipTokenizer.from_pretrained(options.filter), processor, options)

    def decoding(self) -> dict[str, Any]:
        """The captioner's ``generate`` arguments (BLIP's nucleus sampling)."""
        options = self.options
        return dict(do_sample=True, top_p=options.top_p, repetition_penalty=REPETITION_PENALTY,
                    num_return_sequences=options.num_captions, max_length=options.max_length,
                    min_length=options.min_length)

    @torch.no_grad()
    def synthetic_captions(self, pixel_values: torch.Tensor, generator: torch.Generator | None) -> list[list[str]]:
        """``num_captions`` cleaned captions per image of ``pixel_values [B, 3, H, W]`` (the prompt stripped)."""
        model = self.captioner.model
        prompt = self.captioner.prompt_ids.to(model.device).expand(pixel_values.shape[0], -1)
        ids = model.generate(pixel_values.to(model.device, model.dtype), input_ids=prompt, generator=generator,
                             **self.decoding())  # [B * K, L]
        texts = self.captioner.tokenizer.batch_decode(ids[:, prompt.shape[1] - 1 :])
        cleaned = [pre_caption(text, self.options.max_words) for text in texts]
        per_image = self.options.num_captions
        return [cleaned[start : start + per_image] for start in range(0, len(cleaned), per_image)]

    @torch.no_grad()
    def match_logits(self, pixel_values: torch.Tensor, captions: Sequence[Sequence[str]]) -> list[torch.Tensor]:
        """ITM logits ``[n_b, 2]`` (fp32, index 1 = matched) of each image's captions; one ViT pass per image."""
        model = self.filter
        image_embeds = model.vision_model(pixel_values.to(model.device, model.dtype)).last_hidden_state  # [B, N, D]
        counts = torch.tensor([len(texts) for texts in captions], device=model.device)
        flat = [text for texts in captions for text in texts]
        if not flat:
            return [torch.empty(0, 2) for _ in captions]
        tokens = self.filter_tokenizer(flat, padding=True, truncation=True, max_length=ITM_MAX_TOKENS,
                                       return_tensors="pt").to(model.device)
        pair_embeds = image_embeds.repeat_interleave(counts, dim=0)  # [sum n_b, N, D]
        logits = model.itm_logits(pair_embeds, tokens.input_ids, tokens.attention_mask).float().cpu()
        return list(logits.split(counts.tolist()))

    def keep(self, logits: torch.Tensor) -> tuple[list[bool], list[float]]:
        """Decisions and p(match) for ITM logits ``[n, 2]``: argmax by default, else p(match) > threshold."""
        p_match = logits.softmax(dim=-1)[:, 1]
        kept = logits.argmax(dim=-1) == 1 if self.options.threshold is None else p_match > self.options.threshold
        return kept.tolist(), p_match.tolist()


# ==================================================================== one unit's output
class UnitWriter:
    """Collects one unit's records, errors and (shard input) output shard; ``commit`` makes the unit done."""

    def __init__(self, unit: Unit, output: Path, shard_output: bool) -> None:
        self.unit, self.output = unit, output
        self.records: list[dict[str, Any]] = []
        self.errors = list(unit.errors)
        self.counts: Counter[str] = Counter()
        self.started = time.perf_counter()
        self.tar_path = output / f"{unit.index:05d}.tar" if shard_output else None
        self.tar: tarfile.TarFile | None = None
        if self.tar_path is not None:
            self.tar = tarfile.open(_partial(self.tar_path), "w", format=tarfile.PAX_FORMAT)

    def error(self, key: str, reason: str, detail: str = "") -> None:
        self.errors.append({"unit": self.unit.index, "key": key, "reason": reason, "detail": detail})

    def add(self, item: Item, data: bytes | None, captions: list[tuple[str, str, bool, float]]) -> None:
        """One image's scored captions, as (caption, source, kept, p(match))."""
        self.counts["images"] += 1
        where = {"image": item.key} if self.tar is None else {"key": item.sample_key, "shard": self.tar_path.name}
        if self.tar is not None and item.url is not None:
            where["url"] = item.url
        kept = []
        for caption, source, is_kept, score in captions:
            self.counts[f"{source}_{'kept' if is_kept else 'dropped'}"] += 1
            record = {**where, "caption": caption, "source": source, "itm_score": round(score, 6)}
            self.records.append({**record, "kept": is_kept})
            if is_kept:
                kept.append(record)
        if self.tar is not None and kept:
            self._add_to_shard(where["key"], item.extension, data, kept, item.url)

    def _add_to_shard(self, key: str, extension: str, data: bytes, kept: list[dict[str, Any]], url: str | None) -> None:
        best = max(kept, key=lambda record: record["itm_score"])
        captions = [{name: record[name] for name in ("caption", "source", "itm_score")} for record in kept]
        metadata = {"key": key, **({"url": url} if url else {}), "caption": best["caption"], "captions": captions}
        _add_member(self.tar, f"{key}.{extension}", data)
        _add_member(self.tar, f"{key}.json", json.dumps(metadata, sort_keys=True).encode())

    def commit(self) -> dict[str, Any]:
        """Write the unit's files (temp name + rename each), then its manifest entry, which marks it done."""
        if self.tar is not None:
            self.tar.close()
            _fsync_replace(_partial(self.tar_path), self.tar_path)
        self.counts["errors"] = len(self.errors)
        parts = self.output / "parts"
        atomic_write_text(parts / f"unit-{self.unit.index:05d}.errors.jsonl", _jsonl(self.errors))
        atomic_write_text(parts / f"unit-{self.unit.index:05d}.jsonl", _jsonl(self.records))
        entry = {"unit": self.unit.index, "input": self.unit.name, "counts": dict(sorted(self.counts.items())),
                 "seconds": round(time.perf_counter() - self.started, 3)}
        atomic_write_text(_manifest_path(self.output, self.unit.index), json.dumps(entry, sort_keys=True) + "\n")
        return entry


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def _fsync_replace(tmp: Path, target: Path) -> None:
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, target)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """A member with fixed metadata (mtime 0, root, 0644): identical inputs give byte-identical shards."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _jsonl(records: Sequence[dict[str, Any]]) -> str:
    return "".join(json.dumps(record, sort_keys=True) + "\n" for record in records)


def _manifest_path(output: Path, unit: int) -> Path:
    return output / "manifest" / f"unit-{unit:05d}.json"


def _remove_temporaries(output: Path, unit: int) -> None:
    """Delete what a killed run left half-written for ``unit`` (atomic_write's and the shard writer's temps)."""
    for pattern in (f"parts/.unit-{unit:05d}.*", f".{unit:05d}.tar.*"):
        for path in output.glob(pattern):
            path.unlink(missing_ok=True)


# ==================================================================== the run
def _batches(units: Sequence[Unit], batch_size: int) -> list[list[int]]:
    """Dataset indices per batch: consecutive items of one unit, never two units in one batch."""
    batches, start = [], 0
    for unit in units:
        batches += [list(range(first, min(first + batch_size, start + len(unit.items))))
                    for first in range(start, start + len(unit.items), batch_size)]
        start += len(unit.items)
    return batches


def _process_batch(models: CapFiltModels, writer: UnitWriter, items: list[Item], loaded: list[dict[str, Any]],
                   generator: torch.Generator) -> None:
    """Caption, score and record one batch; unreadable images and empty web captions go to the errors."""
    good = []
    for item, entry in zip(items, loaded):
        if entry["error"] is not None:
            writer.error(item.key, "unreadable_image", entry["error"])
        else:
            good.append((item, entry))
    if not good:
        return
    caption_pixels = torch.stack([entry["pixels"]["captioner"] for _, entry in good])
    filter_pixels = torch.stack([entry["pixels"].get("filter", entry["pixels"]["captioner"]) for _, entry in good])
    synthetic = models.synthetic_captions(caption_pixels, generator)
    candidates = []  # per image: [(caption, source)]
    for (item, _), samples in zip(good, synthetic):
        web = [pre_caption(caption, models.options.max_words) for caption in item.web_captions]
        if not all(web):
            writer.error(item.key, "empty_caption", "web caption missing or empty after cleaning")
        writer.counts["synthetic_empty"] += samples.count("")
        candidates.append([(text, "web") for text in web if text] + [(text, "synthetic") for text in samples if text])
    logits = models.match_logits(filter_pixels, [[text for text, _ in pairs] for pairs in candidates])
    for (item, entry), pairs, image_logits in zip(good, candidates, logits):
        kept, scores = models.keep(image_logits)
        writer.add(item, entry["data"], [(text, source, k, s) for (text, source), k, s in zip(pairs, kept, scores)])


def _check_config(output: Path, options: CapFiltOptions) -> None:
    """Record the output-deciding options; refuse to resume into an output made with other ones."""
    path = output / "capfilt_config.json"
    wanted = options.fingerprint()
    if path.is_file():
        found = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(name for name in set(found) | set(wanted) if found.get(name) != wanted.get(name))
        if changed:
            raise ValueError(f"{path}: this output was made with other options ({', '.join(changed)}); "
                             "use a new --output or the same options to resume")
    else:
        atomic_write_text(path, json.dumps(wanted, indent=2, sort_keys=True) + "\n")


def _rank_and_world(options: CapFiltOptions) -> tuple[int, int]:
    rank = options.rank if options.rank is not None else int(os.environ.get("RANK", 0))
    world = options.world_size if options.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world size {world}")
    return rank, world


def _run_units(models: CapFiltModels, units: list[Unit], options: CapFiltOptions, shard_output: bool) -> None:
    stream = ImageStream([item for unit in units for item in unit.items], models.processors, shard_output)
    loader = torch.utils.data.DataLoader(
        stream, batch_sampler=_batches(units, options.batch_size), num_workers=options.workers,
        collate_fn=_as_list, pin_memory=torch.device(options.device).type == "cuda",
    )
    output = Path(options.output)
    batches: Iterator[list[dict[str, Any]]] = iter(loader)
    total = sum(len(unit.items) for unit in units)
    with tqdm(total=total, unit="img", desc="capfilt", disable=not options.progress) as progress:
        for unit in units:
            writer = UnitWriter(unit, output, shard_output)
            generator = torch.Generator(device=options.device).manual_seed(unit_seed(options.seed, unit.index))
            for start in range(0, len(unit.items), options.batch_size):
                items = unit.items[start : start + options.batch_size]
                _process_batch(models, writer, items, next(batches), generator)
                progress.update(len(items))
            writer.commit()


def merge(output: str | os.PathLike, num_units: int, is_json: bool, options: dict[str, Any]) -> dict[str, Any] | None:
    """Concatenate every unit's parts in unit order and write the summary; None while a unit is not done."""
    output = Path(output)
    paths = [_manifest_path(output, unit) for unit in range(num_units)]
    if not all(path.is_file() for path in paths):
        return None
    entries = [json.loads(path.read_text(encoding="utf-8")) for path in paths]
    parts = output / "parts"
    scored = "".join((parts / f"unit-{unit:05d}.jsonl").read_text(encoding="utf-8") for unit in range(num_units))
    errors = "".join((parts / f"unit-{unit:05d}.errors.jsonl").read_text(encoding="utf-8")
                     for unit in range(num_units))
    atomic_write_text(output / "scored.jsonl", scored)
    atomic_write_text(output / "errors.jsonl", errors)
    if is_json:
        kept = [{name: value for name, value in record.items() if name != "kept"}
                for record in map(json.loads, scored.splitlines()) if record["kept"]]
        atomic_write_text(output / "bootstrapped.json", "[\n" + ",\n".join(json.dumps(r, sort_keys=True) for r in kept)
                          + ("\n]\n" if kept else "]\n"))
    atomic_write_text(output / "manifest.json", json.dumps(entries, indent=1, sort_keys=True) + "\n")
    summary = _summary(entries, errors, options)
    atomic_write_text(output / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def _summary(entries: list[dict[str, Any]], errors: str, options: dict[str, Any]) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    for entry in entries:
        counts.update(entry["counts"])
    seconds = sum(entry["seconds"] for entry in entries)
    web = counts["web_kept"] + counts["web_dropped"]
    reasons = Counter(json.loads(line)["reason"] for line in errors.splitlines())
    return {
        "units": len(entries),
        "images": counts["images"],
        **{name: counts[name] for name in ("web_kept", "web_dropped", "synthetic_kept", "synthetic_dropped",
                                           "synthetic_empty")},
        "noise_ratio": counts["web_dropped"] / web if web else 0.0,  # fraction of web captions the filter dropped
        "errors": sum(reasons.values()),
        "errors_by_reason": dict(sorted(reasons.items())),
        "unit_seconds": round(seconds, 3),
        # Per-process throughput (all units' images over the time their own process spent on them).
        "images_per_s": counts["images"] / seconds if seconds else 0.0,
        "config": options,
    }


def run_capfilt(options: CapFiltOptions) -> dict[str, Any]:
    """Run this rank's pending units, then merge if every unit is done. Returns the summary (``"merged": True``),
    or this rank's progress (``"merged": False``) while other ranks still work."""
    rank, world = _rank_and_world(options)
    output = Path(options.output)
    for folder in (output / "parts", output / "manifest"):
        folder.mkdir(parents=True, exist_ok=True)
    _check_config(output, options)
    source = CapFiltInput(options.input, options.image_root, options.images_per_part)
    mine = [unit for unit in range(len(source)) if unit % world == rank]
    pending = [unit for unit in mine if not _manifest_path(output, unit).is_file()]
    for unit in pending:
        _remove_temporaries(output, unit)
    if pending:
        models = CapFiltModels.from_options(options)
        _run_units(models, [source.unit(unit) for unit in pending], options, shard_output=not source.is_json)
    summary = merge(output, len(source), source.is_json, options.fingerprint())
    if summary is None:
        return {"merged": False, "rank": rank, "units_done_here": len(pending), "units_of_rank": len(mine)}
    return {"merged": True, **summary}
