"""CapFilt's input and output (the model calls live in :mod:`blip_fast.capfilt`): work units listed from shards or a
BLIP json, the checks that keep a run from touching data it was not given, one unit's writer, and the merge.

Safety rules, all checked before any work (:func:`open_input`, :func:`prepare_output`):

- every input exists: each shard of a folder, brace range or glob, or the json file; ``pipe:`` and URL specs are
  refused by name (shards are indexed and read by byte offset, which a stream cannot do);
- no input lies inside the output folder, and the output folder is new, empty, or marked as CapFilt's by
  ``capfilt_output.json`` (written first); input shards map to output shards of the same name, so two input shards
  with one name are refused too;
- the options that decide the output, and the input's listing (each shard's name and size, or the json's records
  and hash: a unit is its position in the listing), are pinned in ``capfilt_config.json`` only when the first unit
  is done (a failed start leaves nothing to resume); paths are compared absolute and normalised.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import itertools
import json
import os
import tarfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blip_fast.atomic_files import atomic_write_text
from blip_fast.caption_files import is_image_file
from blip_fast.data.datasets import (
    IMAGE_EXTENSIONS,
    expand_urls,
    read_annotation_file,
    read_member,
    refuse_streams,
    scan_tar,
    split_member_name,
)
from blip_fast.errors import InvalidInputError, UserError
from blip_fast.output_lock import OutputInUseError, OutputLock, command_line, lock_file

MARKER_FILE, CONFIG_FILE = "capfilt_output.json", "capfilt_config.json"
#: Error reasons whose record still gave a scored image (it is captioned without its web caption).
USABLE_REASONS = frozenset({"empty_caption"})
#: How many json records have their image file checked before any work.
JSON_IMAGES_CHECKED = 100


class CapFiltError(UserError, ValueError):
    """A CapFilt run that cannot start as asked: missing input, an output folder that would overwrite data, options
    that differ from the ones the output was made with."""


def normalised(path: str | os.PathLike) -> str:
    """An absolute path without redundant separators (``data/x/`` -> ``/cwd/data/x``); patterns stay patterns."""
    return os.path.abspath(os.fspath(path))


def _listing(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(map(str, names[:limit]))
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ==================================================================== input: units and items
@dataclass(frozen=True)
class Item:
    """One image and its web captions. ``key`` names it in outputs and errors: the json's ``image`` value, or
    ``shard:key``; ``path`` is the file (or shard) that holds it. In a shard: ``offset``/``size`` locate the image
    bytes, ``sample_key``/``extension`` are the sample's key and image extension, ``url`` its json's url,
    ``members`` every member of the sample as (name, offset, size) in shard order, and ``metadata`` its parsed
    ``key.json`` (None without one)."""

    key: str
    path: str
    web_captions: tuple[str, ...]
    sample_key: str = ""
    offset: int = -1
    size: int = -1
    extension: str = ""
    url: str | None = None
    members: tuple[tuple[str, int, int], ...] = ()
    metadata: dict[str, Any] | None = None


@dataclass
class Unit:
    """A work unit: its items and the errors found while listing them."""

    index: int
    name: str
    items: list[Item] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def error(self, key: str, reason: str, detail: str = "") -> None:
        self.errors.append({"unit": self.index, "key": key, "reason": reason, "detail": detail})


def _shard_names(source: str) -> list[str]:
    """The shards of a folder, brace pattern or glob, normalised; every one must exist and have its own name."""
    if os.path.isdir(source):
        names = sorted(glob.glob(os.path.join(glob.escape(source), "*.tar")))
        if not names:
            with os.scandir(source) as entries:
                images = sum(1 for entry in itertools.islice(entries, 10_000) if is_image_file(entry.name))
            hint = (f" but images ({images}{'+' if images == 10_000 else ''}): CapFilt reads image-text pairs, so "
                    "name the images and their web captions in a BLIP json (--input FILE.json --image-root "
                    f"{source})" if images else "")
            raise CapFiltError(f"--input {source}: the folder holds no .tar shards{hint}")
    else:
        names = expand_urls(source)
        if names == [source] and not os.path.exists(source):
            raise CapFiltError(f"--input {source}: no such file or folder")
        if not names:
            raise CapFiltError(f"--input {source!r} matches no file")
        missing = [name for name in names if not os.path.isfile(name)]
        if missing:
            raise CapFiltError(f"{len(missing)} of the {len(names)} input shards do not exist: {_listing(missing)}")
        others = [os.path.basename(name) for name in names if not is_shard_name(name)]
        if others:  # img2dataset writes .parquet and _stats.json files beside its shards
            what = "is neither a BLIP json (.json, .jsonl) nor a .tar shard" if names == [source] else \
                f"matches files that are not .tar shards: {_listing(others)}; name the shards alone (e.g. '*.tar')"
            raise CapFiltError(f"--input {source} {what}")
    names = [normalised(name) for name in names]
    by_name = Counter(os.path.basename(name) for name in names)
    clashes = sorted(name for name, count in by_name.items() if count > 1)
    if clashes:
        raise CapFiltError(f"input shards from different folders share the names {_listing(clashes)}; their output "
                           "shards (named after them) would collide: run each folder into its own --output")
    return names


def is_shard_name(name: str) -> bool:
    return name.lower().endswith(".tar")


def is_json_name(name: str) -> bool:
    return name.lower().endswith((".json", ".jsonl"))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CapFiltInput:
    """The units of an input (cheap to list in every rank) and their items (loaded only for the units run).
    Raises :class:`CapFiltError` for input that is missing or cannot be read at all."""

    def __init__(self, source: str | os.PathLike, image_root: str | os.PathLike | None, images_per_part: int) -> None:
        source = os.fspath(source)
        refuse_streams(source)
        self.source = normalised(source)
        self.is_json = is_json_name(source)
        self.image_root = "" if image_root is None else os.fspath(image_root)
        if self.is_json:
            if not os.path.isfile(source):
                raise CapFiltError(f"--input {source}: no such file")
            try:
                self.entries = read_annotation_file(Path(source))
            except InvalidInputError as error:
                raise CapFiltError(f"--input {error}") from None
            if not self.entries:
                raise CapFiltError(f"--input {source} holds no records: there is nothing to caption")
            starts = range(0, len(self.entries), images_per_part)
            self.unit_names = [f"{self.source}[{start}:{start + images_per_part}]" for start in starts]
            self.images_per_part = images_per_part
            self.files = [self.source]
        else:
            self.unit_names = self.files = _shard_names(source)

    def __len__(self) -> int:
        return len(self.unit_names)

    def listing(self) -> dict[str, Any]:
        """What the units are cut from, pinned with the options: a unit is a position in this listing, so a rerun
        over a shard added, removed or rewritten, or a json edited, would map finished units onto other data."""
        if self.is_json:
            return {"records": len(self.entries), "sha256": _sha256(self.source)}
        return {"shards": {os.path.basename(name): os.path.getsize(name) for name in self.unit_names}}

    def output_shard(self, index: int) -> str | None:
        """The output shard name of unit ``index``: its input shard's (None for json input)."""
        return None if self.is_json else os.path.basename(self.unit_names[index])

    def check_images(self, max_error_rate: float) -> None:
        """json input: refuse before any work when more than ``max_error_rate`` of the first records' image files
        are missing (a wrong or forgotten ``--image-root``)."""
        if not self.is_json:
            return
        paths = [os.path.join(self.image_root, entry["image"]) for entry in self.entries[:JSON_IMAGES_CHECKED]
                 if isinstance(entry, dict) and isinstance(entry.get("image"), str)]
        missing = [path for path in paths if not os.path.isfile(path)]
        if paths and len(missing) > max_error_rate * len(paths):
            where = f"under --image-root {self.image_root}" if self.image_root else \
                "(no --image-root given: pass the folder the json's image paths are relative to)"
            raise CapFiltError(f"{len(missing)} of the first {len(paths)} images of {self.source} do not exist "
                               f"{where}, e.g. {missing[0]}")

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
        samples: list[tuple[str, list[tuple[str, int, int]]]] = []  # webdataset's: a run of members of one key
        for name, offset, size in members:
            key_ext = split_member_name(name)
            if key_ext is None:
                continue
            if samples and samples[-1][0] == key_ext[0]:
                samples[-1][1].append((name, offset, size))
            else:
                samples.append((key_ext[0], [(name, offset, size)]))
        seen: set[str] = set()
        with open(shard, "rb") as handle:
            for key, parts in samples:
                if key in seen:  # its output sample would carry the key twice
                    unit.error(f"{shard}:{key}", "bad_record", "the key of an earlier sample of the shard again")
                    continue
                seen.add(key)
                self._add_shard_item(unit, key, parts, handle)

    @staticmethod
    def _add_shard_item(unit: Unit, key: str, members: list[tuple[str, int, int]], handle: Any) -> None:
        where = f"{unit.name}:{key}"
        parts: dict[str, tuple[int, int]] = {}
        for name, offset, size in members:
            parts.setdefault(split_member_name(name)[1], (offset, size))
        if len(parts) < len(members):  # webdataset refuses such a sample ("duplicate file name")
            repeated = sorted(name for name, count in Counter(name for name, *_ in members).items() if count > 1)
            unit.error(where, "bad_record", f"members repeated: {_listing(repeated)}")
            return
        extension = next((extension for extension in IMAGE_EXTENSIONS if extension in parts), None)
        if extension is None:
            unit.error(where, "missing_image", f"members: {sorted(parts)}")
            return
        metadata = None
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
            else (metadata or {}).get("caption")
        if caption is not None and not isinstance(caption, str):
            unit.error(where, "bad_record", f"caption is {type(caption).__name__}, not text")
            return
        url = (metadata or {}).get("url")
        offset, size = parts[extension]
        unit.items.append(Item(where, unit.name, (caption or "",), key, offset, size, extension,
                               url if isinstance(url, str) else None, tuple(members), metadata))


# ==================================================================== the output folder
def prepare_output(output: str | os.PathLike, input_files: Sequence[str]) -> Path:
    """Check that writing CapFilt's files into ``output`` touches nothing else, then create and mark it.

    Refused: ``output`` is a file; an input lies inside it; it holds files but no CapFilt marker. Safe when ranks
    start together: the marker is the first entry a run creates (with O_EXCL, no temporary name)."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise CapFiltError(f"--output {output} is a file; give a folder (new, empty, or an earlier CapFilt output)")
    resolved = output.resolve()
    inside = [name for name in input_files if Path(name).resolve().is_relative_to(resolved)]
    if inside:
        raise CapFiltError(f"the output folder {output} holds the input {_listing(inside)}: CapFilt would write over "
                           "or mix with its own input; choose another --output")
    if output.is_dir():
        present = sorted(os.listdir(output))
        if present and MARKER_FILE not in present and CONFIG_FILE not in present:
            raise CapFiltError(f"the output folder {output} holds files CapFilt did not write ({_listing(present)}); "
                               "choose a new or empty folder")
    output.mkdir(parents=True, exist_ok=True)
    try:
        with open(output / MARKER_FILE, "x", encoding="utf-8") as handle:
            handle.write(json.dumps({"written_by": "blip-fast capfilt", "resume": "rerun the same command"}) + "\n")
    except FileExistsError:
        pass
    for folder in (output / "parts", output / "manifest", output / "locks"):
        folder.mkdir(exist_ok=True)
    return output


def check_options(output: Path, fingerprint: dict[str, Any]) -> None:
    """Refuse to resume into an output whose pinned options differ from ``fingerprint``."""
    path = output / CONFIG_FILE
    if not path.is_file():
        return
    found = json.loads(path.read_text(encoding="utf-8"))
    changed = sorted(name for name in set(found) | set(fingerprint) if found.get(name) != fingerprint.get(name))
    if changed == ["input_listing"] and found.get("input_listing"):
        change = _listing_change(found["input_listing"], fingerprint["input_listing"])
        raise CapFiltError(f"--input {fingerprint['input']}: {change} since {path.parent} was started; it resumes the "
                           "same input only: restore the input, or use a new --output")
    if changed:
        raise CapFiltError(f"{path}: this output was made with other options ({', '.join(changed)}); "
                           "use a new --output or the same options to resume")


def _listing_change(before: dict[str, Any], now: dict[str, Any]) -> str:
    if "shards" not in before or "shards" not in now:
        return (f"the json now holds {now['records']} records ({before['records']} then)"
                if now.get("records") != before.get("records") else "the json's content changed")
    before, now = before["shards"], now["shards"]
    added = [name for name in now if name not in before]
    removed = [name for name in before if name not in now]
    resized = [name for name in now if name in before and now[name] != before[name]]
    return "; ".join(f"{what} {_listing(names)}" for what, names in
                     (("shards added:", added), ("shards gone:", removed), ("shards rewritten:", resized)) if names)


def pin_options(output: Path, fingerprint: dict[str, Any]) -> None:
    """Record the options that decide the output (called before the first unit is marked done)."""
    path = output / CONFIG_FILE
    if not path.is_file():
        atomic_write_text(path, json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")


# ==================================================================== one unit's output
class UnitWriter:
    """Collects one unit's records, errors and (shard input) output shard ``shard_name``; ``commit`` makes the unit
    done. ``fingerprint`` is pinned (if it is not yet) before the unit is marked done."""

    def __init__(self, unit: Unit, output: Path, shard_name: str | None, fingerprint: dict[str, Any]) -> None:
        self.unit, self.output, self.fingerprint = unit, output, fingerprint
        self.records: list[dict[str, Any]] = []
        self.errors = list(unit.errors)
        self.counts: Counter[str] = Counter()
        self.started = time.perf_counter()
        self.tar_path = None if shard_name is None else output / shard_name
        self.tar: tarfile.TarFile | None = None
        self._input: Any = None  # the input shard, opened when a sample's other members are copied
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
            self._add_to_shard(item, data, kept)

    def _add_to_shard(self, item: Item, data: bytes, kept: list[dict[str, Any]]) -> None:
        """The sample with every input member: the image as read, ``key.txt`` = the best kept caption, ``key.json`` =
        the input's fields plus the kept captions; other members copied unchanged."""
        best = max(kept, key=lambda record: record["itm_score"])
        captions = [{name: record[name] for name in ("caption", "source", "itm_score")} for record in kept]
        metadata = {**(item.metadata or {}), "key": item.sample_key, "caption": best["caption"], "captions": captions}
        if item.web_captions[0]:
            metadata["web_caption"] = item.web_captions[0]
        written = {"txt": best["caption"].encode(), "json": json.dumps(metadata, sort_keys=True).encode()}
        members = item.members or ((f"{item.sample_key}.{item.extension}", item.offset, item.size),)
        for name, offset, size in members:
            extension = split_member_name(name)[1]
            if offset == item.offset:
                payload = data
            elif extension in written:
                payload = written.pop(extension)
            else:
                payload = self._read_input(item.path, offset, size)
            _add_member(self.tar, name, payload)
        for extension, payload in written.items():  # the input sample had no txt / json member
            _add_member(self.tar, f"{item.sample_key}.{extension}", payload)

    def _read_input(self, path: str, offset: int, size: int) -> bytes:
        if self._input is None:
            self._input = open(path, "rb")
        data = read_member(self._input, offset, size)
        if len(data) != size:
            raise OSError(f"{path} ends inside a member at byte {offset} (changed on disk?)")
        return data

    def commit(self) -> dict[str, Any]:
        """Write the unit's files (temp name + rename each), pin the options, then write its manifest entry, which
        marks it done."""
        if self._input is not None:
            self._input.close()
        if self.tar is not None:
            self.tar.close()
            _fsync_replace(_partial(self.tar_path), self.tar_path)
        self.counts["errors"] = len(self.errors)
        parts = self.output / "parts"
        atomic_write_text(parts / f"unit-{self.unit.index:05d}.errors.jsonl", _jsonl(self.errors))
        atomic_write_text(parts / f"unit-{self.unit.index:05d}.jsonl", _jsonl(self.records))
        pin_options(self.output, self.fingerprint)
        entry = {"unit": self.unit.index, "input": self.unit.name, "counts": dict(sorted(self.counts.items())),
                 "seconds": round(time.perf_counter() - self.started, 3)}
        atomic_write_text(manifest_path(self.output, self.unit.index), json.dumps(entry, sort_keys=True) + "\n")
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


def manifest_path(output: Path, unit: int) -> Path:
    return output / "manifest" / f"unit-{unit:05d}.json"


def lock_unit(output: Path, unit: int) -> OutputLock:
    """Hold ``unit`` of ``output`` for this process (:func:`~blip_fast.output_lock.lock_file`): one folder takes
    all ranks of a run, so a second run on it (the command started twice, or resumed with another world size while
    the first still works) must meet the first on the unit, not on the folder."""
    return lock_file(output / "locks" / f"unit-{unit:05d}.lock", f"{output} (unit {unit})", command_line())


@contextlib.contextmanager
def claim_unit(output: Path, unit: int, shard_name: str | None) -> Iterator[None]:
    """Write ``unit`` under its lock: refused while another run holds it or once another run finished it (both
    runs would write it), and cleared of what a killed run left half-written (never of a live run's files)."""
    with lock_unit(output, unit):
        if manifest_path(output, unit).is_file():
            raise OutputInUseError(f"{output}: unit {unit} was finished by another run while this one ran; stop the "
                                   "other run, then rerun the command: it resumes from what both finished")
        remove_temporaries(output, unit, shard_name)
        yield


def remove_temporaries(output: Path, unit: int, shard_name: str | None) -> None:
    """Delete what a killed run left half-written for ``unit`` (atomic_write's and the shard writer's temps)."""
    patterns = [f"parts/.unit-{unit:05d}.*"] + ([] if shard_name is None else [f".{glob.escape(shard_name)}.partial"])
    for pattern in patterns:
        for path in output.glob(pattern):
            path.unlink(missing_ok=True)


# ==================================================================== the merge
def merge(output: str | os.PathLike, num_units: int, is_json: bool, options: dict[str, Any]) -> dict[str, Any] | None:
    """Concatenate every unit's parts in unit order and write the summary; None while a unit is not done."""
    output = Path(output)
    paths = [manifest_path(output, unit) for unit in range(num_units)]
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
    unusable = sum(count for reason, count in reasons.items() if reason not in USABLE_REASONS)
    records = counts["images"] + unusable
    return {
        "units": len(entries),
        "images": counts["images"],
        **{name: counts[name] for name in ("web_kept", "web_dropped", "synthetic_kept", "synthetic_dropped",
                                           "synthetic_empty")},
        "noise_ratio": counts["web_dropped"] / web if web else 0.0,  # fraction of web captions the filter dropped
        "errors": sum(reasons.values()),
        "errors_by_reason": dict(sorted(reasons.items())),
        # Input records (images, or shards/records that gave none) and the fraction that gave no scored image.
        "records": records,
        "unusable": unusable,
        "error_rate": unusable / records if counts["images"] else 1.0,
        "unit_seconds": round(seconds, 3),
        # Per-process throughput (all units' images over the time their own process spent on them).
        "images_per_s": counts["images"] / seconds if seconds else 0.0,
        "config": options,
    }
