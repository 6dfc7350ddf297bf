"""Map-style image-text datasets for BLIP training: the synthetic set, BLIP json annotations, webdataset shards.

Every dataset yields `{"image": FloatTensor [3, H, W], "caption": str, "image_id": int, "index": int}` (the
`transform`'s output; the PIL image itself when `transform` is None). Captions are cleaned with BLIP's
`pre_caption(max_words)`. Augmentation draws from `sample_rng(seed, epoch, index)`, a pure function of the dataset
seed, the epoch (`set_epoch`) and the index, so sample `i` of epoch `e` is the same tensor whichever worker, rank or
resumed run produces it.

Bad inputs are skipped and counted, never fatal (`dataset.skipped`, a Counter by reason, and log lines on the
"blip_fast" logger naming each file or key):

- at index time (cheap checks): `empty_caption` (missing, or empty after cleaning), `missing_image` (json: no such
  file; shards: a key without an image member), `bad_record` (not a dict, no "image", a caption that is not text,
  unparsable sample json), `truncated_shard` / `missing_shard` (a shard that ends early or is not there; its
  complete samples are kept) and `truncated_sample` (a sample cut off by the truncation);
- at `__getitem__` time: `unreadable_image` (decode failure). With `on_error="skip"` (default) the item is `None`
  and `BlipCollator` drops it, so that batch is smaller. With `on_error="replace"` the next readable index (i + 1,
  i + 2, ... mod len; None only when no image of the set can be read) stands in for it, keeping `"index"` = i:
  batches keep their size, which cross-rank all_gather (ITC, queues) needs: a run of unreadable files (a folder
  that failed to download) must not stop a training run hours in. Runtime counters live in the process that loads the item (a DataLoader
  worker); the log lines are the record across processes.

Webdataset shards are indexed, not streamed: each tar (img2dataset layout: `key.jpg|jpeg|png|webp` with `key.txt`
and/or `key.json` holding "caption") is scanned once with `tarfile` (headers only, plus the small caption members),
and each sample is stored as (shard, byte offset, size) of its image, read back with one seek. That makes shards a
map-style dataset, so `ResumableSampler`'s shuffling, rank split and exact mid-epoch resume apply unchanged. Member
names are split into key and extension with webdataset's rule (key = path up to the first dot of the file name;
extension lower-cased; `__*` metadata members ignored), so the samples are the ones webdataset 0.2.x yields (a test
checks this against the pinned package); the package itself is not needed.
"""

from __future__ import annotations

import abc
import glob
import json
import logging
import os
import random
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import PIL.Image
import torch

from blip_fast.data.synthetic import SyntheticNoisyDataset
from blip_fast.data.transforms import ImageLoadError, load_image, load_image_bytes
from blip_fast.errors import InvalidInputError, MissingFileError
from blip_fast.tokenizer import pre_caption

logger = logging.getLogger("blip_fast")

Transform = Callable[[PIL.Image.Image, random.Random], Any]
OnError = Literal["skip", "replace"]
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
#: Per reason, how many skips are logged one by one at WARNING before the rest go to DEBUG.
WARN_PER_REASON = 20


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The augmentation rng of sample `index` in `epoch`: a pure function of (seed, epoch, index).

    A string seed goes through SHA-512 inside `random.Random`, so it is the same in every process, platform and
    Python version (unlike `hash()` of a tuple, which Python may change).
    """
    return random.Random(f"blip_fast.data/{seed}/{epoch}/{index}")


class _MapDataset(torch.utils.data.Dataset, abc.ABC):
    """Shared machinery: epoch, per-sample rng, transform, skip counting/logging, the on_error policy."""

    def __init__(self, transform: Transform | None, seed: int, max_words: int, on_error: OnError) -> None:
        if on_error not in ("skip", "replace"):
            raise ValueError(f"on_error must be 'skip' or 'replace', got {on_error!r}")
        self.transform, self.seed, self.max_words, self.on_error = transform, seed, max_words, on_error
        #: The GPU input path: items carry the transform's ``encode`` output (the encoded file and the augmentation
        #: parameters this sample's rng draws) instead of pixels; see ``blip_fast.data.tensor_transforms``.
        self.encoded_images = False
        self.epoch = 0
        self.skipped: Counter[str] = Counter()
        self._logged_runtime: set[str] = set()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations `__getitem__` draws (call it with the sampler's)."""
        self.epoch = int(epoch)

    def _skip(self, reason: str, name: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        level = logging.WARNING if self.skipped[reason] <= WARN_PER_REASON else logging.DEBUG
        logger.log(level, "%s: skipped %s (%s)%s", type(self).__name__, name, reason, f": {detail}" if detail else "")

    def _log_index_summary(self, source: str) -> None:
        total = sum(self.skipped.values())
        if total:
            reasons = ", ".join(f"{reason}={count}" for reason, count in sorted(self.skipped.items()))
            logger.warning("%s: %d samples indexed from %s; skipped %d (%s)", type(self).__name__, len(self), source,
                           total, reasons)
        else:
            logger.info("%s: %d samples indexed from %s", type(self).__name__, len(self), source)

    @abc.abstractmethod
    def _load(self, index: int) -> tuple[Any, ...]:
        """What :meth:`_item` makes sample ``index`` from (raises ImageLoadError for an unreadable image): here the
        decoded image, the clean caption and the image id."""

    def _load_encoded(self, index: int) -> tuple[bytes | PIL.Image.Image, str, int]:
        """Like ``_load``, with the image's encoded file bytes where the dataset reads files (default: decoded)."""
        return self._load(index)

    @abc.abstractmethod
    def _name(self, index: int) -> str:
        """How logs name sample ``index`` (a path, or ``shard:key``)."""

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        length = len(self)
        if not -length <= index < length:
            raise IndexError(f"index {index} out of range for {length} samples")
        index %= length
        for offset in range(length if self.on_error == "replace" else 1):
            candidate = (index + offset) % length
            rng = sample_rng(self.seed, self.epoch, candidate)
            try:
                loaded = self._load_encoded(candidate) if self.encoded_images else self._load(candidate)
                item = self._item(loaded, rng, index, candidate)
            except ImageLoadError as error:
                self.skipped["unreadable_image"] += 1
                name = self._name(candidate)
                # Each bad file is named once per process at WARNING; repeats (later epochs) go to DEBUG.
                level = logging.DEBUG if name in self._logged_runtime else logging.WARNING
                self._logged_runtime.add(name)
                logger.log(level, "%s: skipped %s (unreadable_image, %d so far in this process): %s",
                           type(self).__name__, name, self.skipped["unreadable_image"], error)
                continue
            return item
        return None

    def _item(self, loaded: tuple[Any, ...], rng: random.Random, index: int, candidate: int) -> dict[str, Any]:
        """The sample of what :meth:`_load` (or :meth:`_load_encoded`) returned for ``candidate``, augmented with
        ``rng`` (a pure function of seed, epoch and ``candidate``); ``index`` is the one asked for. Raises
        ImageLoadError for an encoded image whose header is unusable."""
        image, caption, image_id = loaded
        if self.encoded_images:
            pixels = self.transform.encode(image, rng, self._name(candidate))
        else:
            pixels = image if self.transform is None else self.transform(image, rng)
        return {"image": pixels, "caption": caption, "image_id": image_id, "index": index}


class SyntheticDataset(_MapDataset):
    """A `SyntheticNoisyDataset` drawn on the fly: item i = transform(synthetic.image(i)) with its (possibly noisy)
    caption; `image_id` = i. The ground truth stays on `self.synthetic.record(i)`."""

    def __init__(
        self, synthetic: SyntheticNoisyDataset, transform: Transform | None, seed: int = 0, max_words: int = 30
    ) -> None:
        super().__init__(transform, seed, max_words, on_error="skip")
        self.synthetic = synthetic

    def __len__(self) -> int:
        return len(self.synthetic)

    def _load(self, index: int) -> tuple[PIL.Image.Image, str, int]:
        record = self.synthetic.record(index)
        return self.synthetic.image(index), pre_caption(record["caption"], self.max_words), record["image_id"]

    def _name(self, index: int) -> str:
        return f"synthetic[{index}]"


def read_annotation_file(path: Path) -> list[Any]:
    """A BLIP/COCO-Karpathy json list, or jsonl (one record per line, as CapFilt can write). A file that is no such
    list (truncated, not text, one json object) is an :class:`InvalidInputError` naming the file and the line: json's
    own message names neither."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InvalidInputError(f"{path}: not UTF-8 text (byte {error.start}), so no json annotation file") from None
    if path.suffix == ".jsonl":
        return [_json_value(line, path, number) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    data = _json_value(text, path)
    if not isinstance(data, list):
        raise InvalidInputError(f"{path}: a BLIP annotation file holds a json list of records, got "
                                f"{type(data).__name__}")
    return data


def _json_value(text: str, path: Path, line: int | None = None) -> Any:
    """``text`` parsed as json; an error names ``path`` and the line (``line``: the jsonl line ``text`` is)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {line}" if line is not None else f"line {error.lineno} column {error.colno}"
        hint = " (one record per line is JSON Lines: name the file .jsonl)" if error.msg == "Extra data" else ""
        raise InvalidInputError(f"{path}, {where}: not valid json ({error.msg}){hint}") from None


class BlipJsonDataset(_MapDataset):
    """BLIP json annotations: `[{"image": path, "caption": str | [str, ...]}, ...]` (also COCO-Karpathy files).

    One sample per caption: a caption list expands to one record per caption, as BLIP's pre-training datasets do.
    Image paths are joined to `image_root` (absolute paths are kept). `image_id` = index of the distinct image
    (by resolved path) in order of first appearance across the files. `check_files` stats each distinct image at
    index time (missing ones are skipped and counted); turn it off for very large sets on slow file systems, then
    missing files surface as `unreadable_image` at load time. `.jsonl` files are read line by line.
    """

    def __init__(
        self,
        annotation_paths: str | os.PathLike | Sequence[str | os.PathLike],
        image_root: str | os.PathLike | None,
        transform: Transform | None,
        seed: int = 0,
        max_words: int = 30,
        on_error: OnError = "skip",
        check_files: bool = True,
    ) -> None:
        super().__init__(transform, seed, max_words, on_error)
        if isinstance(annotation_paths, (str, os.PathLike)):
            annotation_paths = [annotation_paths]
        self.annotation_paths = [Path(path) for path in annotation_paths]
        root = "" if image_root is None else os.fspath(image_root)
        self.image_paths: list[str] = []  # by image_id
        self.captions: list[str] = []  # by sample
        self.image_ids: list[int] = []  # by sample
        ids: dict[str, int] = {}
        exists: dict[str, bool] = {}
        for annotation_path in self.annotation_paths:
            for position, entry in enumerate(read_annotation_file(annotation_path)):
                where = f"{annotation_path}[{position}]"
                if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                    self._skip("bad_record", where, "not a record with an 'image' path")
                    continue
                captions = entry.get("caption")
                captions = captions if isinstance(captions, list) else [captions]
                path = os.path.join(root, entry["image"])
                if check_files:
                    if path not in exists:
                        exists[path] = os.path.isfile(path)
                    if not exists[path]:
                        self._skip("missing_image", path, f"{len(captions)} caption(s) in {where}")
                        continue
                for caption in captions:
                    if caption is not None and not isinstance(caption, str):
                        self._skip("bad_record", where, f"caption is {type(caption).__name__}, not text")
                        continue
                    caption = pre_caption(caption or "", max_words)
                    if not caption:
                        self._skip("empty_caption", f"{where} ({path})")
                        continue
                    if path not in ids:
                        ids[path] = len(self.image_paths)
                        self.image_paths.append(path)
                    self.captions.append(caption)
                    self.image_ids.append(ids[path])
        self._log_index_summary(", ".join(map(str, self.annotation_paths)))

    def __len__(self) -> int:
        return len(self.captions)

    def _load(self, index: int) -> tuple[PIL.Image.Image, str, int]:
        image_id = self.image_ids[index]
        return load_image(self.image_paths[image_id]), self.captions[index], image_id

    def _load_encoded(self, index: int) -> tuple[bytes, str, int]:
        image_id = self.image_ids[index]
        path = self.image_paths[image_id]
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise ImageLoadError(f"cannot load image {path!r}: {error.strerror or error}") from error
        return data, self.captions[index], image_id

    def _name(self, index: int) -> str:
        return self.image_paths[self.image_ids[index]]


# ==================================================================== webdataset shards
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_BRACES = re.compile(r"\{([^{}]*)\}")


def refuse_streams(spec: str) -> None:
    """Shards here are indexed and read by byte offset, which webdataset's ``pipe:`` and URL openers cannot do."""
    if spec.startswith("pipe:") or "://" in spec:
        raise InvalidInputError(f"{spec!r}: pipe: and URL shard specs are not supported (shards are indexed and read "
                                "by byte offset); download the shards and pass their local paths")


def expand_urls(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths from a list, a brace pattern (`shards/{00000..00041}.tar`, `{a,b}`) and/or a glob, in order.

    Brace ranges keep the zero padding of their first bound, like webdataset's braceexpand. A pattern with glob
    characters lists the matching files, sorted; other paths are returned as given, whether they exist or not.
    ``pipe:`` and URL specs are refused (:func:`refuse_streams`).
    """
    items = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    expanded: list[str] = []
    for item in map(os.fspath, items):
        refuse_streams(item)
        for path in _expand_braces(item):
            expanded.extend(sorted(glob.glob(path)) if glob.has_magic(path) else [path])
    return expanded


def _expand_braces(pattern: str) -> list[str]:
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end():]
    range_match = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if range_match:
        first, last = range_match.groups()
        width = len(first) if first.startswith("0") else 0
        options = [str(number).zfill(width) for number in range(int(first), int(last) + 1)]
    else:
        options = body.split(",")
    return [expanded for option in options for expanded in _expand_braces(head + option + tail)]


class WebDatasetShards(_MapDataset):
    """img2dataset-layout tar shards as a map-style dataset (see the module docstring for the indexing design).

    Per key: the image is the first of `key.jpg`, `.jpeg`, `.png`, `.webp`; the caption is `key.txt`, else the
    "caption" field of `key.json`; a `key.json` with a "captions" list (CapFilt's output: every kept caption, web
    and synthetic) gives one sample per listed caption, as BLIP trains on both. `image_id` = the image's position
    in the index (shared by the samples of one image).
    `urls` is a shard list, a brace pattern and/or a glob (`expand_urls`); no shard at all is an error.
    """

    def __init__(
        self,
        urls: str | os.PathLike | Sequence[str | os.PathLike],
        transform: Transform | None,
        seed: int = 0,
        max_words: int = 30,
        on_error: OnError = "skip",
    ) -> None:
        super().__init__(transform, seed, max_words, on_error)
        self.shards = expand_urls(urls)
        if not self.shards:
            raise MissingFileError(f"no webdataset shards match {urls!r}")
        if folders := [shard for shard in self.shards if os.path.isdir(shard)]:
            raise InvalidInputError(f"{folders[0]} is a folder, not a webdataset shard: name its .tar files (e.g. "
                                    f"'{os.path.join(folders[0], '*.tar')}')")
        # One row per image: (shard number, byte offset, size); one row per sample: image id, key, caption.
        self._image_offsets: list[tuple[int, int, int]] = []
        self._image_ids: list[int] = []
        self.keys: list[str] = []
        self.captions: list[str] = []
        for shard_id, shard in enumerate(self.shards):
            self._index_shard(shard_id, shard)
        self._log_index_summary(f"{len(self.shards)} shards")

    def __len__(self) -> int:
        return len(self.captions)

    def _index_shard(self, shard_id: int, shard: str) -> None:
        members, truncation, cut_member = scan_tar(shard)
        if truncation == "missing":
            self._skip("missing_shard", shard)
            return
        if truncation:
            self._skip("truncated_shard", shard, truncation)
        groups: dict[str, dict[str, tuple[int, int]]] = {}
        for name, offset, size in members:
            key_ext = split_member_name(name)
            if key_ext is not None:
                groups.setdefault(key_ext[0], {}).setdefault(key_ext[1], (offset, size))
        cut_parts = split_member_name(cut_member) if cut_member else None
        if cut_parts is not None and cut_parts[0] not in groups:
            self._skip("truncated_sample", f"{shard}:{cut_parts[0]}", f"{cut_member!r} is cut off")
        # The last key of a truncated shard may have lost members to the cut: name that, not a bad sample.
        last_key = next(reversed(groups), None) if truncation else None
        with open(shard, "rb") as handle:
            for key, parts in groups.items():
                self._add_sample(shard_id, shard, key, parts, handle, cut=key == last_key)

    def _add_sample(
        self, shard_id: int, shard: str, key: str, parts: dict[str, tuple[int, int]], handle: Any, cut: bool
    ) -> None:
        where = f"{shard}:{key}"
        image = next((parts[extension] for extension in IMAGE_EXTENSIONS if extension in parts), None)
        if image is None:
            self._skip("truncated_sample" if cut else "missing_image", where, f"members: {sorted(parts)}")
            return
        metadata: Any = None
        if "json" in parts:
            try:
                metadata = json.loads(read_member(handle, *parts["json"]))
            except ValueError as error:
                if "txt" not in parts:
                    self._skip("bad_record", where, f"unreadable {key}.json ({error})")
                    return
        kept = metadata.get("captions") if isinstance(metadata, dict) else None
        if isinstance(kept, list) and kept and all(isinstance(entry, dict) for entry in kept):
            captions = [entry.get("caption") for entry in kept]  # CapFilt output: every kept caption
        elif "txt" in parts:
            captions = [read_member(handle, *parts["txt"]).decode("utf-8", errors="replace")]
        elif metadata is not None and not isinstance(metadata, dict):
            self._skip("bad_record", where, f"{key}.json holds a {type(metadata).__name__}, not an object")
            return
        else:
            captions = [None if metadata is None else metadata.get("caption")]
        if any(caption is not None and not isinstance(caption, str) for caption in captions):
            self._skip("bad_record", where, "a caption is not text")
            return
        cleaned = [pre_caption(caption or "", self.max_words) for caption in captions]
        if not any(cleaned):
            self._skip("truncated_sample" if cut and "txt" not in parts and "json" not in parts else "empty_caption",
                       where)
            return
        image_id = len(self._image_offsets)
        self._image_offsets.append((shard_id, *image))
        for caption in filter(None, cleaned):
            self._image_ids.append(image_id)
            self.keys.append(key)
            self.captions.append(caption)

    def _load(self, index: int) -> tuple[PIL.Image.Image, str, int]:
        data, caption, image_id = self._load_encoded(index)
        return load_image_bytes(data, self._name(index)), caption, image_id

    def _load_encoded(self, index: int) -> tuple[bytes, str, int]:
        image_id = self._image_ids[index]
        shard_id, offset, size = self._image_offsets[image_id]
        try:
            with open(self.shards[shard_id], "rb") as handle:
                data = read_member(handle, offset, size)
        except OSError as error:
            raise ImageLoadError(f"cannot read {self._name(index)}: {error}") from error
        if len(data) != size:
            raise ImageLoadError(f"cannot load image {self._name(index)!r}: shard ends inside it (changed on disk?)")
        return data, self.captions[index], image_id

    def _name(self, index: int) -> str:
        return f"{self.shards[self._image_offsets[self._image_ids[index]][0]]}:{self.keys[index]}"


def split_member_name(name: str) -> tuple[str, str] | None:
    """webdataset's (key, lower-cased extension) of a member name; None for names it ignores."""
    match = _KEY_EXT.match(name)
    if match is None or ("/" not in name and name.startswith("__")):
        return None
    return match.group(1), match.group(2).lower()


def read_member(handle: Any, offset: int, size: int) -> bytes:
    """The bytes of one tar member located by :func:`scan_tar` in an open shard."""
    handle.seek(offset)
    return handle.read(size)


def scan_tar(shard: str) -> tuple[list[tuple[str, int, int]], str, str | None]:
    """Regular-file members of a tar as (name, data offset, size), why it is truncated ("" when intact, "missing"
    when there is no such file), and the name of the member cut off by the truncation (None when unknown).
    Members whose data runs past the end of the file are left out.

    An intact tar ends with zero blocks after its last member; a file cut exactly between members lacks them and
    counts as truncated too (the rest of the shard is gone, though no member is broken).
    """
    try:
        file_size = os.path.getsize(shard)
    except OSError:
        return [], "missing", None
    members: list[tuple[str, int, int]] = []
    try:
        tar = tarfile.open(shard, mode="r:")
    except (tarfile.TarError, OSError, EOFError) as error:
        return [], f"not a readable tar ({error})", None
    with tar:
        while True:
            try:
                info = tar.next()
            except (tarfile.TarError, OSError, EOFError) as error:
                return members, f"unreadable after {len(members)} members ({error})", None
            if info is None:
                break
            if not info.isfile():
                continue
            if info.offset_data + info.size > file_size:
                cut = f"member {info.name!r} is cut off ({max(file_size - info.offset_data, 0)} of {info.size} bytes)"
                return members, cut, info.name
            members.append((info.name, info.offset_data, info.size))
        end = tar.offset  # where the end-of-archive zero blocks must start
    with open(shard, "rb") as handle:
        handle.seek(end)
        trailer = handle.read(tarfile.BLOCKSIZE)
    if len(trailer) < tarfile.BLOCKSIZE or trailer.count(0) != tarfile.BLOCKSIZE:
        return members, f"no end-of-archive marker after {len(members)} members", None
    return members, "", None
