"""Bulk captioning (``blip-fast caption``): find the images, caption them in batches, write one record per image.

Inputs are image files, folders (searched recursively for image extensions), glob patterns (``**`` recursive) and
``.txt`` files listing one path per line (relative paths are taken from the list's folder; blank and ``#`` lines
are skipped). Each image is captioned once, in the order found (sorted within folders and globs), however often it
is named. A named file that is missing or unreadable is a bad image, like one inside a folder; a named path that is
neither an image nor a folder, list or pattern is a user error.

Output (``output``) is ``.jsonl``, ``.csv`` or ``.parquet``, one record per image: ``path``, ``caption`` and, with
``score``, the caption's mean log-probability per generated token. Images that cannot be used go to the errors file
(``captions.errors.jsonl`` beside ``captions.jsonl``) as ``{"path", "reason"}``. Without ``output``, captions go to
stdout (``path<TAB>caption``) and errors to stderr.

Work goes in *chunks* of ``batch_size`` consecutive images: each chunk is decoded (in ``workers`` processes, ahead
of the model), captioned (sampling seeded per chunk) and appended to the files with one write each, flushed to
disk. A rerun of the same command skips the images both files already hold: a torn last line (``kill -9`` during a
write) is cut off first, and a chunk that was partly written is recomputed with only its missing records appended,
so the files end byte-identical to an uninterrupted run's. Parquet cannot be appended to: its records go to a
``.partial.jsonl`` journal that becomes the ``.parquet`` file (written under a temporary name, then renamed) when
every image is done; pyarrow is needed only then (``pip install blip_fast[parquet]``).
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm.auto import tqdm

from blip_fast.errors import InvalidInputError, MissingFileError
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
        with open(list_file, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidInputError(f"cannot read the list of images {list_file}: {error}") from None
    for line in lines:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            yield entry if os.path.isabs(entry) else os.path.join(base, entry)


def _expand(item: str) -> Iterator[str]:
    if os.path.isdir(item):
        yield from _walk(item)
    elif item.lower().endswith(LIST_EXTENSION) and os.path.isfile(item):
        yield from _read_list(item)
    elif os.path.isfile(item) or (is_image_file(item) and not glob.has_magic(item)):
        yield item  # a named image, even if missing or broken: the errors file says why
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
    """The file's complete lines and its torn tail (the bytes after the last newline: a write cut short), as they
    are: nothing is cut before the caller has seen that the lines are this command's (:func:`_cut_tail`)."""
    if not path.exists():
        return [], b""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    try:
        return data[:end].decode("utf-8").splitlines(), data[end:]
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
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


class JsonLines:
    """Records as one JSON object per line, appended; ``columns`` (when given) must be exactly each record's keys."""

    def __init__(self, path: Path, columns: Sequence[str] | None = None) -> None:
        self.path, self.columns = path, None if columns is None else list(columns)

    def read(self) -> list[dict[str, Any]]:
        records = []
        lines, tail = _read_lines(self.path)
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict) or "path" not in record:
                raise InvalidInputError(f"{self.path}:{number} is not a record this command wrote; choose another "
                                        "output")
            if self.columns is not None and list(record) != self.columns:
                raise InvalidInputError(f"{self.path}:{number} holds {list(record)}, this run writes {self.columns}: "
                                        "use the same --score setting, or another output")
            records.append(record)
        _cut_tail(self.path, tail, '{"path": ')
        return records

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        _append(self.path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


class CsvFile:
    """Records as CSV rows under a header (``path,caption[,score]``), appended."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path, self.columns = path, list(columns)

    def read(self) -> list[dict[str, Any]]:
        lines, tail = _read_lines(self.path)
        rows = list(csv.reader(lines))
        if rows and rows[0] != self.columns:
            raise InvalidInputError(f"{self.path} has columns {rows[0]}, this run writes {self.columns}: use the "
                                    "same --score setting, or another output")
        _cut_tail(self.path, tail, "" if rows else ",".join(self.columns))  # under our header, any row start is ours
        return [dict(zip(self.columns, row)) for row in rows[1:]]

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

    def read(self) -> list[dict[str, Any]]:
        return []

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        for record in records:
            if "reason" in record:
                print(f"error: {record['reason']}", file=self.stream, flush=True)
            else:
                print("\t".join(str(record[column]) for column in self.columns), file=self.stream, flush=True)


def record_files(output: Path | None, errors: Path | None, score: bool):
    """(captions, errors) record files of a run: the formats by ``output``'s suffix, or stdout/stderr."""
    columns = ["path", "caption", "score"] if score else ["path", "caption"]
    if output is None:
        return Printed(sys.stdout, columns), Printed(sys.stderr, ["path", "reason"])
    errors = errors or output.with_name(output.stem + ".errors.jsonl")
    if errors.resolve() == output.resolve():
        raise InvalidInputError(f"the captions and the errors would both go to {output}")
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


def caption_files(captioner: Any, job: CaptionJob, **generate_kwargs: Any) -> dict[str, int]:
    """Caption ``job``'s images with ``captioner`` (a :class:`~blip_fast.captioning.Captioner`), resuming what
    earlier runs wrote. Returns counts: ``images`` found, ``captioned`` and ``failed`` in this run, ``skipped``
    (written before). A second run on the same output file while this one lives is refused
    (:func:`~blip_fast.output_lock.lock_output_file`)."""
    paths = find_images(job.inputs)
    output, errors = record_files(job.output, job.errors, job.score)
    with contextlib.nullcontext() if job.output is None else lock_output_file(job.output, command_line()):
        return _caption_pending(captioner, job, paths, output, errors, generate_kwargs)


def _caption_pending(captioner: Any, job: CaptionJob, paths: list[str], output: Any, errors: Any,
                     generate_kwargs: dict[str, Any]) -> dict[str, int]:
    """Caption the images that ``output`` and ``errors`` do not hold yet (the output locked, when a file)."""
    from blip_fast.data.workers import die_with_parent

    done = {record["path"] for record in output.read()} | {record["path"] for record in errors.read()}
    chunks = [(start, paths[start : start + job.batch_size]) for start in range(0, len(paths), job.batch_size)]
    pending = [(start, chunk) for start, chunk in chunks if not done.issuperset(chunk)]
    loader = torch.utils.data.DataLoader(  # one batch per chunk, decoded ahead in ``workers`` processes
        ImageFiles(paths, captioner.processor), batch_sampler=[range(start, start + len(chunk)) for start, chunk in
                                                               pending],
        collate_fn=list, num_workers=job.workers, worker_init_fn=die_with_parent if job.workers else None,
    )
    counts = {"images": len(paths), "captioned": 0, "failed": 0, "skipped": sum(path in done for path in paths)}
    with tqdm(total=len(paths) - counts["skipped"], unit="img", disable=not job.progress, dynamic_ncols=True,
              file=sys.stderr) as progress:
        for (start, _), loaded in zip(pending, loader):
            records, failed = _caption_chunk(captioner, paths, loaded, job, job.seed + start, generate_kwargs)
            new_failed = [record for record in failed if record["path"] not in done]
            new_records = [record for record in records if record["path"] not in done]
            errors.append(new_failed)
            output.append(new_records)
            counts["captioned"] += len(new_records)
            counts["failed"] += len(new_failed)
            progress.update(len(new_records) + len(new_failed))
    if isinstance(output, ParquetFile):
        output.finish()
    return counts


def _caption_chunk(captioner: Any, paths: Sequence[str], loaded: list, job: CaptionJob, seed: int,
                   generate_kwargs: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(caption records, error records) of one decoded chunk, in the chunk's order."""
    good = [(paths[index], pixels) for index, pixels, _ in loaded if pixels is not None]
    failed = [{"path": paths[index], "reason": reason} for index, _, reason in loaded if reason is not None]
    if not good:
        return [], failed
    generator = torch.Generator(captioner.model.device).manual_seed(seed)
    captions = captioner.caption_pixels(torch.stack([pixels for _, pixels in good]), with_scores=job.score,
                                        generator=generator, **generate_kwargs)
    if job.score:
        return [{"path": path, "caption": caption, "score": score}
                for (path, _), (caption, score) in zip(good, captions)], failed
    return [{"path": path, "caption": caption} for (path, _), caption in zip(good, captions)], failed
