"""Bulk captioning (``blip-fast caption``): find the images, caption them in batches, write one record per image.

Inputs are image files, folders (searched recursively for image extensions), glob patterns (``**`` recursive) and
``.txt`` files listing one path per line (relative paths are taken from the list's folder; blank and ``#`` lines
are skipped). Each image is captioned once, in the order found (sorted within folders and globs), however often it
is named. A named file that is missing or unreadable is a bad image, like one inside a folder; a named file that is
no image by its extension nor by its content (a ``config.json``), and a named path that is neither an image nor a
folder, list or pattern, are user errors.

Output (``output``) is ``.jsonl``, ``.csv`` or ``.parquet``, one record per image: ``path`` (as named, or joined to
its folder or list), ``caption`` and, with ``score``, the caption's mean log-probability per generated token. Images
that cannot be used go to the errors file (``captions.errors.jsonl`` beside ``captions.jsonl``) as
``{"path", "reason"}``. Without ``output``, captions go to stdout (``path<TAB>caption``) and errors to stderr (an
errors file then is refused). The settings that decide the captions (the model folder -- for a hub id its cached
snapshot, named by its commit --, the prompt, the decoding settings) are pinned beside the output
(``captions.jsonl.settings.json``) with the folder that relative paths in the records are relative to.

Work goes in *chunks* of ``batch_size`` consecutive images: each chunk is decoded (in ``workers`` processes, ahead
of the model), captioned (sampling seeded per chunk) and appended to the files with one write each, flushed to
disk. A rerun of the same command skips the images both files already hold (compared as absolute paths: ``./x.jpg``
and ``x.jpg`` are one image) and loads the model only if any are left; a rerun with other settings is refused,
naming them. A torn last line (``kill -9`` during a write) is cut off first, and a chunk that was partly written is
recomputed with only its missing records appended, so the files end byte-identical to an uninterrupted run's. A last
line that is a complete record without its newline (an editor's save) is kept and the newline added: so is a CSV
row torn inside its last field, which cannot be told from a complete one (JSON lines can). Files are read as lines
split at ``\\n`` only (a path may hold U+2028 or U+0085), CSV with the csv module (a quoted path may hold a newline).
Parquet cannot be appended to: its records go to a ``.partial.jsonl`` journal that becomes the ``.parquet`` file
(written under a temporary name, then renamed) when every image is done; pyarrow is needed only then
(``pip install blip_fast[parquet]``).
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm.auto import tqdm

from blip_fast.errors import InvalidInputError, MissingFileError, differences
from blip_fast.output_lock import command_line, lock_output_file

#: What a folder or a pattern contributes (wider than the webdataset members CapFilt reads: any PIL still image).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"})
LIST_EXTENSION = ".txt"
OUTPUT_FORMATS = (".jsonl", ".csv", ".parquet")


def is_image_file(path: str) -> bool:
    """Whether ``path`` names an image by its extension (the files ``blip-fast caption`` takes from a folder)."""
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


# ---------------------------------------------------------------------------------------------------- finding images
def _walk(folder: str) -> Iterator[str]:
    """Image files under ``folder``, recursively, in sorted order (sub-folders and files sorted by name)."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        yield from (os.path.join(root, name) for name in sorted(files) if is_image_file(name))


def _read_list(list_file: str) -> Iterator[str]:
    base = os.path.dirname(list_file)
    try:
        with open(list_file, encoding="utf-8", newline="") as handle:
            lines = handle.read().split("\n")  # not splitlines(): a path may hold U+2028 or U+0085
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidInputError(f"cannot read the list of images {list_file}: {error}") from None
    for line in lines:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            yield entry if os.path.isabs(entry) else os.path.join(base, entry)


def _is_image_content(path: str) -> bool:
    """Whether PIL recognises the file's header as an image (a named image without an image extension); a file it
    cannot read counts as one: the errors file then says why."""
    import PIL.Image

    try:
        with PIL.Image.open(path):
            return True
    except PIL.UnidentifiedImageError:
        return False
    except (OSError, ValueError, PIL.Image.DecompressionBombError):
        return True


def _expand(item: str) -> Iterator[str]:
    if os.path.isdir(item):
        yield from _walk(item)
    elif item.lower().endswith(LIST_EXTENSION) and os.path.isfile(item):
        yield from _read_list(item)
    elif os.path.isfile(item):
        if not (is_image_file(item) or _is_image_content(item)):
            raise InvalidInputError(f"{item} is not an image (by its name or its content), a folder, a glob pattern "
                                    f"or a {LIST_EXTENSION} list of paths")
        yield item  # a named image, even if broken: the errors file says why
    elif is_image_file(item) and not glob.has_magic(item):
        yield item  # a named image that is missing: the errors file says so
    elif glob.has_magic(item):
        matches = sorted(glob.glob(item, recursive=True))
        if not matches:
            raise MissingFileError(f"{item!r} matches no files")
        for match in matches:
            yield from _walk(match) if os.path.isdir(match) else [match] if is_image_file(match) else []
    else:
        raise MissingFileError(f"{item}: no such file or folder (give images, folders, glob patterns or "
                               f"{LIST_EXTENSION} lists of paths)")


def find_images(inputs: Iterable[str | os.PathLike]) -> list[str]:
    """Image paths from files, folders, glob patterns and ``.txt`` lists, each once, in the order found."""
    inputs = [os.fspath(item) for item in inputs]
    found: list[str] = []
    seen: set[str] = set()
    for item in inputs:
        for path in _expand(item):
            key = os.path.normpath(os.path.abspath(path))
            if key not in seen:
                seen.add(key)
                found.append(path)
    if not found:
        raise MissingFileError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {', '.join(inputs)}")
    return found


# ---------------------------------------------------------------------------------------------------- record files
def _read_lines(path: Path) -> tuple[list[str], bytes]:
    """The file's complete lines (split at ``\\n`` only: ``str.splitlines`` also splits at U+2028, U+0085 and other
    characters JSON writes raw) and its tail (the bytes after the last newline), as they are: nothing is cut
    before the caller has seen that the lines are this command's (:func:`_cut_tail`)."""
    if not path.exists():
        return [], b""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    try:
        return data[:end].decode("utf-8").split("\n")[:-1], data[end:]
    except UnicodeDecodeError:
        raise InvalidInputError(f"{path} is not a text file this command wrote; choose another output") from None


def _cut_tail(path: Path, tail: bytes, starts: str) -> None:
    """Cut a torn tail off ``path`` if it can be the start of a line this command writes (``starts``, or a shorter
    piece of it); else the file is someone else's (their last line lacks a newline) and is left whole."""
    if not tail:
        return
    start = starts.encode()
    if not (tail.startswith(start) or start.startswith(tail)):
        raise InvalidInputError(f"{path}: its last line ({tail[:40]!r}) is not one this command wrote; choose "
                                "another output")
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - len(tail))


def _append(path: Path, text: str) -> None:
    """One write, then flush and fsync: a kill leaves at most a torn last line."""
    if not text:
        return
    with open(path, "a", encoding="utf-8", newline="") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _json_value(line: str | bytes) -> tuple[bool, Any]:
    """(True, value) when ``line`` is a whole JSON value, else (False, None). A last line that is one is complete
    but for its newline: a torn line of ours never is (a record is an object, and an object cut short does not
    parse)."""
    try:
        return True, json.loads(line)
    except ValueError:  # UnicodeDecodeError (bytes cut inside a character) included
        return False, None


class JsonLines:
    """Records as one JSON object per line, appended; ``columns`` (when given) must be exactly each record's keys."""

    def __init__(self, path: Path, columns: Sequence[str] | None = None) -> None:
        self.path, self.columns = path, None if columns is None else list(columns)
        self.files = [path]

    def read(self) -> list[dict[str, Any]]:
        lines, tail = _read_lines(self.path)
        complete, last = _json_value(tail) if tail else (False, None)
        values = [(number, _json_value(line)[1]) for number, line in enumerate(lines, 1)]
        if complete:
            values.append((len(lines) + 1, last))
        for number, record in values:
            if not isinstance(record, dict) or "path" not in record:
                raise InvalidInputError(f"{self.path}:{number} is not a record this command wrote; choose another "
                                        "output")
            if self.columns is not None and list(record) != self.columns:
                raise InvalidInputError(f"{self.path}:{number} holds {list(record)}, this run writes {self.columns}: "
                                        "use the same --score setting, or another output")
        if complete:
            _append(self.path, "\n")
        else:
            _cut_tail(self.path, tail, '{"path": ')
        return [record for _, record in values]

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        _append(self.path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def _csv_records_end(data: bytes) -> int:
    """The length of ``data``'s complete CSV records: up to the last newline outside quotes (a quoted field may hold
    newlines; an escaped quote is two, so a record's quotes are even)."""
    end = position = quotes = 0
    for piece in data.split(b"\n")[:-1]:
        position += len(piece) + 1
        quotes += piece.count(b'"')
        if quotes % 2 == 0:
            end = position
    return end


def _csv_rows(text: str) -> list[list[str]]:
    return [row for row in csv.reader(io.StringIO(text, newline="")) if row]  # csv reads an empty line as []


class CsvFile:
    """Records as CSV rows under a header (``path,caption[,score]``), appended."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path, self.columns = path, list(columns)
        self.files = [path]

    def read(self) -> list[dict[str, Any]]:
        data = self.path.read_bytes() if self.path.exists() else b""
        end = _csv_records_end(data)
        try:
            rows = _csv_rows(data[:end].decode("utf-8"))
        except UnicodeDecodeError:
            raise InvalidInputError(f"{self.path} is not a text file this command wrote; choose another "
                                    "output") from None
        tail, last = data[end:], self._complete_row(data[end:], header=not rows)
        if last is not None:
            rows.append(last)
        if rows and rows[0] != self.columns:
            raise InvalidInputError(f"{self.path} has columns {rows[0]}, this run writes {self.columns}: use the "
                                    "same --score setting, or another output")
        for number, row in enumerate(rows[1:], 2):
            if len(row) != len(self.columns):
                raise InvalidInputError(f"{self.path}: row {number} has {len(row)} fields, this run writes "
                                        f"{len(self.columns)} ({','.join(self.columns)}); choose another output")
        if last is not None:
            _append(self.path, "\n")
        else:  # under our header, any row start is ours
            _cut_tail(self.path, tail, "" if rows else ",".join(self.columns))
        return [dict(zip(self.columns, row)) for row in rows[1:]]

    def _complete_row(self, tail: bytes, header: bool) -> list[str] | None:
        """``tail`` (a last line without its newline) as a row, if it is a whole one: our header where the file
        has none yet, else a record with every field (and a number for the score). A torn row (a quote left open,
        fields missing) is None; one with too many fields is kept as a row, for :meth:`read` to refuse."""
        if not tail or tail.count(b'"') % 2:
            return None
        try:
            rows = _csv_rows(tail.decode("utf-8"))
        except UnicodeDecodeError:
            return None
        if len(rows) != 1:
            return None
        row = rows[0]
        if header:
            return row if row == self.columns else None
        if len(row) < len(self.columns):
            return None
        if len(row) == len(self.columns) and "score" in self.columns:
            try:
                float(row[self.columns.index("score")])
            except ValueError:
                return None
        return row

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        if not self.path.exists() or self.path.stat().st_size == 0:
            writer.writerow(self.columns)
        writer.writerows([record[column] for column in self.columns] for record in records)
        _append(self.path, buffer.getvalue())


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401  (a submodule: import it so pyarrow.parquet resolves)
    except ImportError:
        raise InvalidInputError("writing .parquet needs pyarrow: pip install 'blip_fast[parquet]' (or pyarrow), or "
                                "write .jsonl or .csv") from None
    return pyarrow


class ParquetFile:
    """Records journaled as JSON lines (``<output>.partial.jsonl``), written as Parquet once every image is done."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.pyarrow = _pyarrow()  # before any work: a missing pyarrow must not surface after hours of captioning
        self.path, self.columns = path, list(columns)
        self.journal = JsonLines(path.with_name(path.name + ".partial.jsonl"), columns)
        self.files = [path, self.journal.path]

    def read(self) -> list[dict[str, Any]]:
        if self.path.exists() and not self.journal.path.exists():  # a finished file that a rerun extends
            table = self.pyarrow.parquet.read_table(self.path)
            if table.column_names != self.columns:
                raise InvalidInputError(f"{self.path} has columns {table.column_names}, this run writes "
                                        f"{self.columns}: use the same --score setting, or another output")
            self.journal.append(table.to_pylist())
        return self.journal.read()

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        self.journal.append(records)

    def finish(self) -> None:
        from blip_fast.atomic_files import atomic_write

        records = self.journal.read()
        table = self.pyarrow.table({column: [record[column] for record in records] for column in self.columns})
        atomic_write(self.path, lambda tmp: self.pyarrow.parquet.write_table(table, tmp))
        self.journal.path.unlink()


class Printed:
    """Records as lines on a stream (stdout: ``path<TAB>caption[<TAB>score]``; stderr: ``error: reason``)."""

    def __init__(self, stream: TextIO, columns: Sequence[str]) -> None:
        self.stream, self.columns = stream, list(columns)
        self.files: list[Path] = []

    def read(self) -> list[dict[str, Any]]:
        return []

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        for record in records:
            if "reason" in record:
                print(f"error: {record['reason']}", file=self.stream, flush=True)
            else:
                print("\t".join(str(record[column]) for column in self.columns), file=self.stream, flush=True)


def errors_file(output: Path, errors: Path | None = None) -> Path:
    """Where a run's unusable images go: ``errors``, or ``captions.errors.jsonl`` beside ``captions.jsonl``."""
    return errors or output.with_name(output.stem + ".errors.jsonl")


def settings_file(output: Path) -> Path:
    """Where an output's settings are pinned: ``captions.jsonl.settings.json`` beside ``captions.jsonl``."""
    return output.with_name(output.name + ".settings.json")


def record_files(output: Path | None, errors: Path | None, score: bool):
    """(captions, errors) record files of a run: the formats by ``output``'s suffix, or stdout/stderr."""
    columns = ["path", "caption", "score"] if score else ["path", "caption"]
    if output is None:
        if errors is not None:
            raise InvalidInputError(f"--errors {errors} needs --output: without it, captions go to stdout and "
                                    "unusable images to stderr")
        return Printed(sys.stdout, columns), Printed(sys.stderr, ["path", "reason"])
    errors = errors_file(output, errors)
    if errors.resolve() == output.resolve():
        raise InvalidInputError(f"the captions and the errors would both go to {output}")
    if errors.resolve() == settings_file(output).resolve():
        raise InvalidInputError(f"--errors {errors} is where the output's settings are pinned; give another name")
    suffix = output.suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise InvalidInputError(f"--output {output}: the name must end in {', '.join(OUTPUT_FORMATS)}")
    for path in (output, errors):
        if path.is_dir():
            raise InvalidInputError(f"{path} is a folder; give a file name")
        path.parent.mkdir(parents=True, exist_ok=True)
    formats = {".jsonl": lambda: JsonLines(output, columns), ".csv": lambda: CsvFile(output, columns),
               ".parquet": lambda: ParquetFile(output, columns)}
    return formats[suffix](), JsonLines(errors, ["path", "reason"])


class PinnedSettings:
    """The settings that decide an output's captions, pinned beside it (:func:`settings_file`), with ``cwd``: the
    folder that relative paths in its records are relative to. Written atomically, before the first record."""

    def __init__(self, output: Path) -> None:
        self.output, self.path = output, settings_file(output)

    def read(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        try:
            pinned = json.loads(self.path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError):
            pinned = None
        if not (isinstance(pinned, dict) and isinstance(pinned.get("settings"), dict)
                and isinstance(pinned.get("cwd"), str)):
            raise InvalidInputError(f"{self.path} is not the settings file this command pins beside {self.output}; "
                                    "move it away, or choose another output")
        return pinned

    def check(self, pinned: dict[str, Any], settings: Mapping[str, Any]) -> None:
        """Refuse to add to records made with other settings, naming each difference."""
        changed = differences(pinned["settings"], settings)
        if changed:
            raise InvalidInputError(f"{self.output} holds captions made with other settings ({'; '.join(changed)}; "
                                    f"pinned in {self.path}): use the same settings to resume, or another output")

    def write(self, settings: Mapping[str, Any]) -> None:
        from blip_fast.atomic_files import atomic_write_text

        text = json.dumps({"settings": dict(settings), "cwd": os.getcwd()}, indent=2, sort_keys=True,
                          ensure_ascii=False)
        atomic_write_text(self.path, text + "\n")


def caption_settings(model_folder: str | os.PathLike, prompt: str, seed: int,
                     generate_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that decide a run's captions, as json values: the model folder (absolute; a hub id's cached
    snapshot, whose name is its commit), the prompt, the decoding settings and, when sampling, the seed."""
    settings = {"model": os.path.normpath(os.path.abspath(model_folder)), "prompt": prompt, **generate_kwargs}
    if generate_kwargs.get("do_sample"):
        settings["seed"] = seed
    return settings


# ---------------------------------------------------------------------------------------------------- captioning
class ImageFiles(torch.utils.data.Dataset):
    """Decoded, preprocessed images by index; an unusable file gives its reason instead of a tensor."""

    def __init__(self, paths: Sequence[str], processor: Any) -> None:
        self.paths, self.processor = paths, processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        from blip_fast.data.transforms import ImageLoadError, load_image

        try:
            pixels = self.processor([load_image(self.paths[index])], return_tensors="pt").pixel_values[0]
        except (ImageLoadError, ValueError, OSError) as error:  # the processor refuses odd shapes with ValueError
            return index, None, str(error)
        return index, pixels, None


@dataclass(frozen=True)
class CaptionJob:
    """One ``blip-fast caption`` run (see the module docstring)."""

    inputs: tuple[str, ...]
    output: Path | None = None
    errors: Path | None = None
    batch_size: int = 8
    workers: int = 0
    seed: int = 0
    score: bool = False
    progress: bool = True


def default_batch_size(device: torch.device) -> int:
    """Images per batch when the user does not say: 128 on a GPU (beam 3 of ViT-B/16 at 384 px in fp16 holds its
    shared cross-attention K/V and caches in a few GB), 8 on a CPU."""
    return 128 if device.type == "cuda" else 8


def caption_files(job: CaptionJob, model: str | os.PathLike, load_captioner: Callable[[str], Any],
                  prompt: str = "a picture of ", **generate_kwargs: Any) -> dict[str, int]:
    """Caption ``job``'s images with the captioner ``load_captioner(folder)`` returns (a
    :class:`~blip_fast.captioning.Captioner` for ``model``'s folder, built with ``prompt``), resuming what earlier
    runs wrote. The inputs and the output's names are checked before ``model`` is resolved (a hub id to its cached
    snapshot, downloaded if need be) and the settings (:func:`caption_settings`) before the model loads, which it
    does only if images are left to caption.

    Returns counts: ``images`` found, ``captioned`` and ``failed`` in this run, ``skipped`` (in the files before)
    and ``failed_earlier`` (those of them in the errors file). A second run on the same output file while this one
    lives is refused (:func:`~blip_fast.output_lock.lock_output_file`)."""
    from blip_fast.hub import resolve

    paths = find_images(job.inputs)
    output, errors = record_files(job.output, job.errors, job.score)
    folder = resolve(model)
    settings = caption_settings(folder, prompt, job.seed, generate_kwargs)
    with contextlib.nullcontext() if job.output is None else lock_output_file(job.output, command_line()):
        return _caption_pending(lambda: load_captioner(folder), job, paths, output, errors, settings,
                                generate_kwargs)


def _path_key(path: str, base: str) -> str:
    """What makes two spellings of a path one image: the absolute path, ``base`` taken for a relative one."""
    return os.path.normpath(os.path.join(base, path))


def _resume(job: CaptionJob, output: Any, errors: Any,
            settings: Mapping[str, Any]) -> tuple[tuple[list, list], str, PinnedSettings | None]:
    """The records the files hold, as (caption records, error records), and the folder their relative paths are
    relative to, once the pinned settings are checked; ``PinnedSettings`` or None, to write before the first
    record, when they are not pinned yet (or pinned for files that hold nothing)."""
    pin = None if job.output is None else PinnedSettings(job.output)
    pinned = None if pin is None else pin.read()
    held = any(path.is_file() and path.stat().st_size for path in (*output.files, *errors.files))
    if pinned is not None and held:
        pin.check(pinned, settings)
    records = (output.read(), errors.read())
    base = pinned["cwd"] if pinned is not None and held else os.getcwd()
    return records, base, (pin if pin is not None and (pinned is None or not held) else None)


def _caption_pending(load_captioner: Callable[[], Any], job: CaptionJob, paths: list[str], output: Any, errors: Any,
                     settings: Mapping[str, Any], generate_kwargs: dict[str, Any]) -> dict[str, int]:
    """Caption the images that ``output`` and ``errors`` do not hold yet (the output locked, when a file)."""
    from blip_fast.data.workers import die_with_parent

    (captioned, failed), base, pin = _resume(job, output, errors, settings)
    captioned_keys = {_path_key(record["path"], base) for record in captioned}
    failed_keys = {_path_key(record["path"], base) for record in failed}
    done = captioned_keys | failed_keys
    keys = [_path_key(path, os.getcwd()) for path in paths]
    starts = range(0, len(paths), job.batch_size)
    pending = [start for start in starts if not done.issuperset(keys[start : start + job.batch_size])]
    relative = [paths[index] for start in pending for index in range(start, min(start + job.batch_size, len(paths)))
                if not os.path.isabs(paths[index]) and keys[index] not in done]
    if relative and os.path.realpath(base) != os.path.realpath(os.getcwd()):  # the new records' paths would be relative to another folder
        raise InvalidInputError(f"the relative paths in {job.output} are relative to {base}, this run's (as "
                                f"{relative[0]}) to {os.getcwd()}: resume from {base}, or name the images by "
                                "absolute paths")
    counts = {"images": len(paths), "captioned": 0, "failed": 0, "skipped": sum(key in done for key in keys),
              "failed_earlier": sum(key in failed_keys and key not in captioned_keys for key in keys)}
    if pending:
        captioner = load_captioner()
        if pin is not None:
            pin.write(settings)
        loader = torch.utils.data.DataLoader(  # one batch per chunk, decoded ahead in ``workers`` processes
            ImageFiles(paths, captioner.processor),
            batch_sampler=[range(start, min(start + job.batch_size, len(paths))) for start in pending],
            collate_fn=list, num_workers=job.workers, worker_init_fn=die_with_parent if job.workers else None,
        )
        with tqdm(total=len(paths) - counts["skipped"], unit="img", disable=not job.progress, dynamic_ncols=True,
                  file=sys.stderr) as progress:
            for start, loaded in zip(pending, loader):
                records, failures = _caption_chunk(captioner, paths, loaded, job, job.seed + start, generate_kwargs)
                new_failures = [record for record, index in failures if keys[index] not in done]
                new_records = [record for record, index in records if keys[index] not in done]
                errors.append(new_failures)
                output.append(new_records)
                counts["captioned"] += len(new_records)
                counts["failed"] += len(new_failures)
                progress.update(len(new_records) + len(new_failures))
    if isinstance(output, ParquetFile):
        output.finish()
    return counts


def _caption_chunk(captioner: Any, paths: Sequence[str], loaded: list, job: CaptionJob, seed: int,
                   generate_kwargs: dict[str, Any]) -> tuple[list[tuple[dict[str, Any], int]],
                                                             list[tuple[dict[str, Any], int]]]:
    """(caption records, error records) of one decoded chunk, in the chunk's order, each with its image's index."""
    good = [(index, pixels) for index, pixels, _ in loaded if pixels is not None]
    failed = [({"path": paths[index], "reason": reason}, index) for index, _, reason in loaded if reason is not None]
    if not good:
        return [], failed
    generator = torch.Generator(captioner.model.device).manual_seed(seed)
    captions = captioner.caption_pixels(torch.stack([pixels for _, pixels in good]), with_scores=job.score,
                                        generator=generator, **generate_kwargs)
    if job.score:
        return [({"path": paths[index], "caption": caption, "score": score}, index)
                for (index, _), (caption, score) in zip(good, captions)], failed
    return [({"path": paths[index], "caption": caption}, index) for (index, _), caption in zip(good, captions)], failed
