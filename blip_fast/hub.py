"""Hugging Face Hub ids wherever blip_fast takes a model directory, resolved the way transformers resolves them.

``resolve("Salesforce/blip-image-captioning-base")`` returns a local snapshot directory holding the files a BLIP
checkpoint needs, fetched one by one through ``huggingface_hub`` like transformers' ``cached_file``: the cache is
``cache_dir`` or ``HF_HUB_CACHE`` (default ``HF_HOME/hub``), ``revision`` picks a branch, tag or commit,
``local_files_only=True`` or ``HF_HUB_OFFLINE=1`` use the cache alone, ``token`` reaches private repos. After the
first file every other one is taken from the same commit. Weights follow transformers' order: ``model.safetensors``,
its sharded index, ``pytorch_model.bin``, its index (``use_safetensors`` narrows the choice). An existing local path
is returned unchanged, so every loader accepts both.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from blip_fast.errors import MissingFileError

CONFIG_FILE = "config.json"
WEIGHT_FILES = {  # transformers' order: single file, then sharded index; safetensors first
    True: ("model.safetensors", "model.safetensors.index.json"),
    False: ("pytorch_model.bin", "pytorch_model.bin.index.json"),
}
#: Files a model directory may hold besides config and weights; each is fetched when the repo has it.
MODEL_EXTRAS = ("generation_config.json",)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class HubError(MissingFileError):
    """A hub id that cannot be resolved: not cached while offline, unknown repo or revision, a missing file (a
    user error: the CLI prints it as one line)."""


@dataclass(frozen=True)
class HubOptions:
    """transformers' download keywords, shared by every ``from_pretrained``."""

    cache_dir: str | os.PathLike | None = None
    revision: str | None = None
    local_files_only: bool = False
    token: str | bool | None = None
    force_download: bool = False

    @classmethod
    def pop_from(cls, kwargs: dict[str, Any]) -> HubOptions:
        """Take the download keywords out of ``kwargs`` (a ``from_pretrained`` call's)."""
        return cls(**{name: kwargs.pop(name) for name in list(kwargs) if name in cls.__dataclass_fields__})


def is_local(name_or_path: str | os.PathLike) -> bool:
    return os.path.exists(os.fspath(name_or_path))


#: A missing path ending like this names a file, never a hub repo.
_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".json", ".txt")


def looks_like_repo_id(name: str) -> bool:
    """``name`` or ``namespace/name`` made of the characters the Hub allows, each starting and ending with a word
    character (``validate_repo_id``'s rule): ``./model`` is a path, not an id."""
    if name.endswith(_FILE_SUFFIXES):
        return False
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(re.fullmatch(r"\w([\w.-]{0,94}\w)?", part) for part in parts) and (
        ".." not in name and "--" not in name and not name.endswith(".git")
    )


def cache_location(options: HubOptions) -> str:
    """The hub cache that is searched: ``cache_dir``, else ``HF_HUB_CACHE``/``HF_HOME`` as huggingface_hub reads
    them (at its import)."""
    if options.cache_dir is not None:
        return os.fspath(options.cache_dir)
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def offline(options: HubOptions) -> bool:
    from huggingface_hub import constants

    return options.local_files_only or constants.HF_HUB_OFFLINE


def resolve(
    name_or_path: str | os.PathLike,
    options: HubOptions | None = None,
    files: str = "model",
    use_safetensors: bool | None = None,
) -> str:
    """A local directory (or file) for ``name_or_path``: the path itself when it exists, else the hub snapshot
    holding ``files``: "model" (config, weights, generation config, tokenizer and processor files), "config",
    "tokenizer", "processor" (tokenizer and image processor files) or "image_processor".

    Raises :class:`HubError` naming the id, the cache searched and why (offline and not cached, unknown repo,
    no weights), or ``FileNotFoundError`` for a path that is neither a local file nor a possible hub id.
    """
    options = options or HubOptions()
    path = os.fspath(name_or_path)
    if is_local(path):
        return path
    if not looks_like_repo_id(path):
        raise MissingFileError(f"no such file or directory: {path!r} (and it is not a Hugging Face Hub id)")
    fetch = _Fetcher(path, options)
    if files == "model":
        fetch.required(CONFIG_FILE)
        fetch.weights(use_safetensors)
        fetch.optional(*MODEL_EXTRAS, *TOKENIZER_FILES, *PROCESSOR_FILES)
    elif files == "tokenizer":
        fetch.one_of(*TOKENIZER_FILES[:2])
        fetch.optional(*TOKENIZER_FILES[2:])
    elif files == "processor":
        fetch.one_of(*TOKENIZER_FILES[:2])
        fetch.optional(*TOKENIZER_FILES[2:], *PROCESSOR_FILES)
    elif files == "image_processor":
        fetch.one_of(*PROCESSOR_FILES)
    elif files == "config":
        fetch.required(CONFIG_FILE)
    else:
        raise ValueError(f"files must be 'model', 'config', 'tokenizer', 'processor' or 'image_processor', got "
                         f"{files!r}")
    return fetch.snapshot


class _Fetcher:
    """Per-file downloads (or cache look-ups) of one repo, pinned to the commit of the first file found."""

    def __init__(self, repo_id: str, options: HubOptions) -> None:
        self.repo_id, self.options = repo_id, options
        self.revision = options.revision
        self.snapshot: str | None = None
        self.unreachable: Exception | None = None  # the last "not cached and the Hub not reached" error

    def _get(self, filename: str) -> str | None:
        """The cached path of ``filename``, or None when the repo (or, offline, the cache) does not have it."""
        import huggingface_hub
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            path = huggingface_hub.hf_hub_download(
                self.repo_id, filename, revision=self.revision, cache_dir=self.options.cache_dir,
                local_files_only=self.options.local_files_only, token=self.options.token,
                force_download=self.options.force_download,
            )
        except LocalEntryNotFoundError as error:
            self.unreachable = error
            return None
        except EntryNotFoundError:
            return None
        except Exception as error:  # unknown repo or revision, gated repo, bad token, HTTP errors
            revision = "" if self.revision is None else f" at revision {self.revision!r}"
            raise HubError(f"{self.repo_id!r} is not a local path, and fetching its {filename}{revision} from the "
                           f"Hugging Face Hub failed: {type(error).__name__}: {error}") from None
        directory = os.path.dirname(path)
        if self.snapshot is None:
            self.snapshot = directory
            if _COMMIT.match(os.path.basename(directory)):
                self.revision = os.path.basename(directory)  # every later file from the same commit
        return path

    def _missing(self, what: str) -> HubError:
        cache = cache_location(self.options)
        revision = "" if self.options.revision is None else f" (revision {self.options.revision!r})"
        where = f"{self.repo_id!r}{revision} is not a local path, and its {what} is not in the Hugging Face cache {cache}"
        if offline(self.options):
            switch = "local_files_only=True" if self.options.local_files_only else "HF_HUB_OFFLINE=1"
            return HubError(f"{where} while downloads are off ({switch}): download it once with network access "
                            "(or point HF_HUB_CACHE/cache_dir at the cache that has it), or pass a local directory")
        if self.unreachable is not None:
            return HubError(f"{where}, and the Hub could not be reached ({self.unreachable})")
        return HubError(f"the Hub repo {self.repo_id!r}{revision} has no {what} (cache: {cache})")

    def required(self, filename: str) -> str:
        path = self._get(filename)
        if path is None:
            raise self._missing(filename)
        return path

    def one_of(self, *filenames: str) -> str:
        for filename in filenames:
            path = self._get(filename)
            if path is not None:
                return path
        raise self._missing(" or ".join(filenames))

    def optional(self, *filenames: str) -> None:
        for filename in filenames:
            self._get(filename)

    def weights(self, use_safetensors: bool | None) -> None:
        """transformers' weight files: single file or sharded index (every shard fetched), safetensors first."""
        formats = (True, False) if use_safetensors is None else (use_safetensors,)
        for safe in formats:
            single, index = WEIGHT_FILES[safe]
            if self._get(single) is not None:
                return
            index_path = self._get(index)
            if index_path is not None:
                for shard in _shards(index_path):
                    self.required(shard)
                return
        names = " or ".join(name for safe in formats for name in WEIGHT_FILES[safe])
        raise self._missing(f"weights ({names})")


def _shards(index_path: str) -> list[str]:
    try:
        with open(index_path, encoding="utf-8") as handle:
            return sorted(set(json.load(handle)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise HubError(f"cannot read the shard index {index_path}: {type(error).__name__}: {error}") from None
