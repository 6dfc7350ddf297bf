"""BLIP's text side: a bert-base-uncased WordPiece tokenizer plus BLIP's `[DEC]`/`[ENC]` tokens.

Built on the Rust `tokenizers` library alone so that inference and training never need `transformers`. The
tokenizer is the one the original BLIP builds (`BertTokenizer` + `bos_token="[DEC]"` + additional special token
`[ENC]`): with the standard vocab `[DEC]`=30522 (bos), `[ENC]`=30523, `[SEP]`=102 (eos), `[PAD]`=0, `[CLS]`=101.
Token ids equal those of `transformers.BertTokenizer` with the same two tokens added (tests check this), and
`save_pretrained` writes a directory that `transformers.AutoTokenizer` loads to the same ids.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from blip_fast.errors import InvalidInputError, MissingFileError, is_kind, read_json_object
from blip_fast.wordpiece import train_wordpiece_vocab

if TYPE_CHECKING:
    from blip_fast.config import TextConfig

PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN, MASK_TOKEN = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
DEC_TOKEN, ENC_TOKEN = "[DEC]", "[ENC]"
#: BERT's special tokens in BERT's id order; a trained vocab gives them ids 0..4.
BERT_SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN, MASK_TOKEN)

TOKENIZER_FILE, VOCAB_FILE = "tokenizer.json", "vocab.txt"
TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, ADDED_TOKENS_FILE = (
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
)
#: BLIP's text encoder has 512 positions; bert-base-uncased's tokenizer_config says the same.
DEFAULT_MODEL_MAX_LENGTH = 512

Padding = bool | Literal["longest", "max_length", "do_not_pad"]
Truncation = bool | Literal["longest_first", "only_first", "do_not_truncate"] | None
#: A `model_max_length` above this means "no limit" (transformers writes 1e30 when a tokenizer has none).
UNLIMITED_LENGTH = int(1e20)


class TokenizerNotFoundError(MissingFileError):
    """A checkpoint directory holds neither `tokenizer.json` nor `vocab.txt`."""


class BatchFeature(dict):
    """A dict with attribute access and `.to()`, like transformers' BatchEncoding/BatchFeature.

    Returned by `BlipTokenizer.__call__` and `BlipImageProcessor.__call__` so HF-style code
    (`inputs.input_ids`, `processor(...).to(device)`) keeps working.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as error:
            raise AttributeError(name) from error

    def to(self, *args: Any, **kwargs: Any) -> BatchFeature:
        """Move tensors in place and return self, like transformers' BatchFeature: `.to(device)`, `.to(dtype)`,
        `.to(device, dtype)`, `.to(device=..., dtype=..., non_blocking=...)`. A dtype casts floating-point
        tensors only, so token ids and masks stay integers."""
        device = kwargs.get("device")
        if device is None and args and not isinstance(args[0], torch.dtype):
            device = args[0]
        if device is not None and not isinstance(device, (str, int, torch.device)):
            raise ValueError(f"cannot move a BatchFeature to {device!r}: pass a device and/or a dtype")
        non_blocking = kwargs.get("non_blocking", False)
        for key, value in self.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                self[key] = value.to(*args, **kwargs)
            elif isinstance(value, torch.Tensor) and device is not None:
                self[key] = value.to(device=device, non_blocking=non_blocking)
        return self


def pre_caption(caption: str, max_words: int = 30) -> str:
    """Normalise a caption exactly like BLIP's `data/utils.py:pre_caption` (training and eval captions).

    Lower-cases, turns `.!"()*#:;~` into spaces, collapses runs of 2+ whitespace characters into one space,
    strips a trailing newline and surrounding spaces, and keeps at most `max_words` space-separated words.
    """
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def pre_question(question: str, max_words: int = 50) -> str:
    """Normalise a VQA question exactly like BLIP's `data/utils.py:pre_question`: lower-cases, *deletes*
    `.!"()*#:;~` (where `pre_caption` puts spaces), strips trailing spaces and keeps at most `max_words` words."""
    question = re.sub(r"([.!\"()*#:;~])", "", question.lower()).rstrip(" ")
    words = question.split(" ")
    if len(words) > max_words:
        question = " ".join(words[:max_words])
    return question


def _special(token: str) -> AddedToken:
    # normalized=False: matched on the raw text, like HF registers BERT's special tokens.
    return AddedToken(token, special=True, normalized=False)


def _bert_pipeline(model: WordPiece, lowercase: bool, strip_accents: bool | None, chinese: bool) -> Tokenizer:
    """The BERT pipeline transformers' BertTokenizer builds: BertNormalizer, BertPreTokenizer, `##` decoder."""
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=chinese, strip_accents=strip_accents, lowercase=lowercase
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def _read_json(path: Path) -> dict[str, Any]:
    """A tokenizer file's JSON object ({} when the file is not there); an `InvalidInputError` naming it otherwise."""
    return read_json_object(path) if path.is_file() else {}


def _setting(config: dict[str, Any], key: str, default: Any, path: Path, kinds: tuple[type, ...]) -> Any:
    """``config[key]`` (``default`` when missing), which must be of one of ``kinds`` (a bool is no number)."""
    value = config.get(key, default)
    if not is_kind(value, *kinds):
        wanted = " or ".join(dict.fromkeys(_KIND_NAMES[kind] for kind in kinds))
        raise InvalidInputError(f"{path}: {key} must be {wanted}, got {json.dumps(value)}")
    return value


_KIND_NAMES = {bool: "true or false", int: "a number", float: "a number", type(None): "null"}


def _read_tokenizer_file(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust library raises a bare Exception for every malformed file
        raise InvalidInputError(f"cannot read {path}: not a tokenizers tokenizer.json ({_first_line(error)})") from None


def _first_line(error: Exception) -> str:
    return str(error).strip().split("\n", 1)[0] or type(error).__name__


def _vocab_file_tokenizer(
    vocab_file: str | os.PathLike, do_lower_case: bool, strip_accents: bool | None, chinese: bool
) -> Tokenizer:
    try:
        vocab = WordPiece.read_file(str(vocab_file))  # the Rust parser transformers' BertTokenizer uses too
    except Exception as error:  # a bare Exception from the Rust library
        raise InvalidInputError(f"cannot read {vocab_file}: {_first_line(error)}") from None
    return _bert_pipeline(WordPiece(vocab, unk_token=UNK_TOKEN, max_input_chars_per_word=100),
                          do_lower_case, strip_accents, chinese)


def _add_saved_tokens(tokenizer: Tokenizer, path: Path) -> None:
    """Re-add `{token: id}` from an added_tokens.json (BLIP's: `[DEC]`/`[ENC]`) in id order, checking each id."""
    added = _read_json(path)
    for token, token_id in added.items():
        if not is_kind(token_id, int):
            raise InvalidInputError(f"{path}: {token}: the id must be an integer, got {json.dumps(token_id)}")
    for token, token_id in sorted(added.items(), key=lambda item: item[1]):
        tokenizer.add_special_tokens([_special(token)])
        if tokenizer.token_to_id(token) != token_id:
            raise InvalidInputError(
                f"{path}: {token!r} should have id {token_id} but got {tokenizer.token_to_id(token)};"
                " added tokens must follow the vocab without gaps"
            )


class BlipTokenizer:
    """BERT WordPiece tokenizer with BLIP's `[DEC]` (bos) and `[ENC]` tokens, padding right with `[PAD]`.

    Wraps a `tokenizers.Tokenizer` (and takes ownership of it): the BERT special tokens and `[DEC]`/`[ENC]`
    are registered as special tokens, appended after the vocab when missing, `[DEC]` first.
    """

    def __init__(self, tokenizer: Tokenizer, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> None:
        tokenizer.add_special_tokens([_special(token) for token in (*BERT_SPECIAL_TOKENS, DEC_TOKEN, ENC_TOKEN)])
        tokenizer.no_padding()
        tokenizer.no_truncation()
        ids = {token: tokenizer.token_to_id(token) for token in (CLS_TOKEN, SEP_TOKEN)}
        # The post-processor is not used by __call__ (which adds [CLS]/[SEP] itself); it makes the saved
        # tokenizer.json produce the same ids when loaded by transformers.
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{CLS_TOKEN}:0 $A:0 {SEP_TOKEN}:0",
            pair=f"{CLS_TOKEN}:0 $A:0 {SEP_TOKEN}:0 $B:1 {SEP_TOKEN}:1",
            special_tokens=list(ids.items()),
        )
        self._tokenizer = tokenizer
        self.model_max_length = model_max_length

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_vocab_file(
        cls,
        vocab_file: str | os.PathLike,
        do_lower_case: bool = True,
        strip_accents: bool | None = None,
        tokenize_chinese_chars: bool = True,
        model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
    ) -> BlipTokenizer:
        """Build from a BERT `vocab.txt` (one token per line, id = line number) with BERT's text pipeline."""
        return cls(_vocab_file_tokenizer(vocab_file, do_lower_case, strip_accents, tokenize_chinese_chars),
                   model_max_length)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kwargs: Any) -> BlipTokenizer:
        """Load from a checkpoint directory (HF hub layout, original BLIP's bert dir, or our saves) or a hub id
        (with transformers' download keywords: `cache_dir`, `revision`, `local_files_only`, `token`, ...).

        Reads `tokenizer.json` when present, else `vocab.txt` with `do_lower_case`/`strip_accents`/
        `tokenize_chinese_chars` from `tokenizer_config.json` and extra tokens from `added_tokens.json`.
        `[DEC]`/`[ENC]` are added when the files lack them (HF's BLIP checkpoints ship plain bert files).
        """
        from blip_fast import hub

        options = hub.HubOptions.pop_from(kwargs)
        if kwargs:
            raise TypeError(f"BlipTokenizer.from_pretrained got unsupported arguments {sorted(kwargs)}")
        if not hub.is_local(directory) and hub.looks_like_repo_id(os.fspath(directory)):
            directory = hub.resolve(directory, options, files="tokenizer")
        directory = Path(directory)
        config_path = directory / TOKENIZER_CONFIG_FILE
        config = _read_json(config_path)
        max_length = _setting(config, "model_max_length", None, config_path, (int, float, type(None)))
        if max_length is not None and not (max_length >= 1 and math.isfinite(max_length)):
            raise InvalidInputError(f"{config_path}: model_max_length must be a number >= 1, got {max_length}")
        max_length = int(max_length or DEFAULT_MODEL_MAX_LENGTH)
        if (directory / TOKENIZER_FILE).is_file():
            return cls(_read_tokenizer_file(directory / TOKENIZER_FILE), max_length)
        if not (directory / VOCAB_FILE).is_file():
            raise TokenizerNotFoundError(
                f"no tokenizer in {str(directory)!r}: looked for {TOKENIZER_FILE} and {VOCAB_FILE}"
                + ("" if directory.is_dir() else " (the directory does not exist)")
            )
        tokenizer = _vocab_file_tokenizer(
            directory / VOCAB_FILE,
            do_lower_case=_setting(config, "do_lower_case", True, config_path, (bool,)),
            strip_accents=_setting(config, "strip_accents", None, config_path, (bool, type(None))),
            chinese=_setting(config, "tokenize_chinese_chars", True, config_path, (bool,)),
        )
        _add_saved_tokens(tokenizer, directory / ADDED_TOKENS_FILE)
        return cls(tokenizer, max_length)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        min_frequency: int = 1,
        model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
    ) -> BlipTokenizer:
        """Train a lower-cased BERT-style WordPiece vocab on `texts`, for tiny models that cannot download one.

        The WordPiece vocab holds at most `vocab_size` tokens (more only when the alphabet alone is larger),
        `[PAD]`=0, `[UNK]`, `[CLS]`, `[SEP]`, `[MASK]` first; `[DEC]` and `[ENC]` follow it as the last two ids (so
        `len(tokenizer) <= vocab_size + 2`). Deterministic: the same texts give the same vocab in every process
        (:mod:`blip_fast.wordpiece`; `tokenizers`' own trainer does not).
        """
        tokenizer = _bert_pipeline(WordPiece(unk_token=UNK_TOKEN), lowercase=True, strip_accents=None, chinese=True)
        words = (word for text in texts
                 for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(text)))
        vocab = train_wordpiece_vocab(words, vocab_size, BERT_SPECIAL_TOKENS, min_frequency=min_frequency)
        tokenizer.model = WordPiece({token: token_id for token_id, token in enumerate(vocab)}, unk_token=UNK_TOKEN,
                                    max_input_chars_per_word=100)
        return cls(tokenizer, model_max_length)

    def save_pretrained(self, directory: str | os.PathLike) -> list[str]:
        """Write tokenizer.json, vocab.txt, tokenizer_config.json, special_tokens_map.json; returns the paths.

        Loads back with `BlipTokenizer.from_pretrained` and with transformers' `AutoTokenizer`/`BertTokenizer`
        (tokenizer_class "BertTokenizer", bos "[DEC]", additional special token "[ENC]") to the same ids.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        special_map = {
            "unk_token": UNK_TOKEN, "sep_token": SEP_TOKEN, "pad_token": PAD_TOKEN, "cls_token": CLS_TOKEN,
            "mask_token": MASK_TOKEN, "bos_token": DEC_TOKEN, "additional_special_tokens": [ENC_TOKEN],
        }
        normalizer = json.loads(self._tokenizer.to_str())["normalizer"] or {}
        config = {
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": normalizer.get("lowercase", False),
            "strip_accents": normalizer.get("strip_accents"),
            "tokenize_chinese_chars": normalizer.get("handle_chinese_chars", True),
            "model_max_length": self.model_max_length,
            **special_map,
            # Pins [DEC]/[ENC] (and BERT's tokens) to their ids for transformers loading vocab.txt alone.
            "added_tokens_decoder": {
                str(token_id): {
                    "content": token.content, "lstrip": token.lstrip, "rstrip": token.rstrip,
                    "normalized": token.normalized, "single_word": token.single_word, "special": token.special,
                }
                for token_id, token in sorted(self._tokenizer.get_added_tokens_decoder().items())
            },
        }
        vocab = self._tokenizer.get_vocab(with_added_tokens=False)
        paths = {name: directory / name for name in (TOKENIZER_FILE, VOCAB_FILE, TOKENIZER_CONFIG_FILE,
                                                       SPECIAL_TOKENS_MAP_FILE)}
        self._tokenizer.save(str(paths[TOKENIZER_FILE]))
        paths[VOCAB_FILE].write_text("".join(f"{token}\n" for token in sorted(vocab, key=vocab.get)), "utf-8")
        paths[TOKENIZER_CONFIG_FILE].write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")
        paths[SPECIAL_TOKENS_MAP_FILE].write_text(json.dumps(special_map, indent=2) + "\n", "utf-8")
        return [str(path) for path in paths.values()]

    # ---------------------------------------------------------------- vocabulary
    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The wrapped `tokenizers.Tokenizer` (shared, not a copy)."""
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of ids including the added tokens (`[DEC]`/`[ENC]`): 30524 for BLIP's standard vocab."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def check_fits(self, text: TextConfig, where: str) -> None:
        """Refuse to pair this tokenizer with a model (``text``: its text config) whose [DEC], [SEP] or [PAD] ids
        differ, or whose embeddings have fewer rows than it has tokens: its ids would select other embeddings, and
        the model would caption and score nonsense without an error. ``where`` names the model folder."""
        wanted = {DEC_TOKEN: text.bos_token_id, SEP_TOKEN: text.sep_token_id, PAD_TOKEN: text.pad_token_id}
        found = {token: self._tokenizer.token_to_id(token) for token in wanted}
        wrong = [f"{token} is id {found[token]} here, {token_id} in the model" for token, token_id in wanted.items()
                 if found[token] != token_id]
        if self.vocab_size > text.vocab_size:
            wrong.append(f"{self.vocab_size} tokens for the model's {text.vocab_size} embeddings")
        if wrong:
            raise InvalidInputError(f"the tokenizer in {where} does not fit its model ({'; '.join(wrong)}): is it "
                                    "another model's tokenizer.json or vocab.txt?")

    def token_to_id(self, token: str) -> int:
        """Id of `token`; `KeyError` when it is not in the vocab."""
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise KeyError(token)
        return token_id

    @property
    def pad_token_id(self) -> int:
        return self.token_to_id(PAD_TOKEN)

    @property
    def cls_token_id(self) -> int:
        return self.token_to_id(CLS_TOKEN)

    @property
    def sep_token_id(self) -> int:
        """`[SEP]`, which BLIP also uses as eos."""
        return self.token_to_id(SEP_TOKEN)

    @property
    def eos_token_id(self) -> int:
        return self.sep_token_id

    @property
    def bos_token_id(self) -> int:
        """`[DEC]`: replaces `[CLS]` at position 0 of decoder inputs."""
        return self.token_to_id(DEC_TOKEN)

    @property
    def enc_token_id(self) -> int:
        """`[ENC]`: replaces `[CLS]` at position 0 of ITM (image-grounded encoder) inputs."""
        return self.token_to_id(ENC_TOKEN)

    # ---------------------------------------------------------------- transformers' token-level methods
    def tokenize(self, text: str) -> list[str]:
        """The WordPiece tokens of `text`, without `[CLS]`/`[SEP]` (transformers' `tokenize`)."""
        return self._tokenizer.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The ids of `text` (`[CLS] ... [SEP]` unless `add_special_tokens=False`), as transformers' `encode`."""
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Id of a token (a list: of each), `[UNK]`'s for one not in the vocab, as transformers."""
        if isinstance(tokens, str):
            token_id = self._tokenizer.token_to_id(tokens)
            return self.token_to_id(UNK_TOKEN) if token_id is None else token_id
        return [self.convert_tokens_to_ids(token) for token in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> str | list[str]:
        """Token of an id (a list: of each; `skip_special_tokens` leaves out `[CLS]`, `[SEP]`, `[PAD]`, ...)."""
        if isinstance(ids, numbers.Integral):
            return self._tokenizer.id_to_token(int(ids))
        special = set(BERT_SPECIAL_TOKENS) | {DEC_TOKEN, ENC_TOKEN} if skip_special_tokens else set()
        tokens = [self._tokenizer.id_to_token(int(token_id)) for token_id in ids]
        return [token for token in tokens if token not in special]

    # ---------------------------------------------------------------- encoding / decoding
    def __call__(
        self,
        text: str | Sequence[str],
        padding: Padding = False,
        truncation: Truncation = None,
        max_length: int | None = None,
        return_tensors: Literal["pt", "np"] | None = None,
        add_special_tokens: bool = True,
        return_attention_mask: bool | None = None,
        return_token_type_ids: bool | None = None,
    ) -> BatchFeature:
        """Tokenise to `[CLS] tokens [SEP]` rows with transformers' BertTokenizer defaults and rules.

        padding: False/"do_not_pad" (default), True/"longest" pads right with `[PAD]` to the longest row,
        "max_length" to `max_length` (else `model_max_length`). truncation: True/"longest_first"/"only_first" cuts
        rows to `max_length` (else `model_max_length`) tokens including `[CLS]`/`[SEP]`; None truncates only when
        `max_length` is given without padding (as transformers does). `add_special_tokens=False` leaves out
        `[CLS]`/`[SEP]`. Returns `input_ids` and `attention_mask` (and all-zero `token_type_ids` when asked: BLIP
        has no token types, and transformers' BlipProcessor drops them): lists without `return_tensors` (a flat
        list for one string), int64 LongTensors [B, L] for "pt", int64 arrays for "np".
        """
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("no texts given")
        if not all(isinstance(item, str) for item in texts):
            raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
        if padding not in (True, False, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if truncation not in (None, True, False, "longest_first", "only_first", "do_not_truncate"):
            raise ValueError(f"truncation must be True, False, 'longest_first' or 'do_not_truncate', got {truncation!r}")
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        pad_to_max = padding == "max_length"
        if truncation is None:
            truncation = max_length is not None and padding in (False, "do_not_pad")
        truncation = truncation not in (False, "do_not_truncate")
        limit = max_length
        if limit is None and self.model_max_length <= UNLIMITED_LENGTH:
            limit = self.model_max_length
        specials = 2 if add_special_tokens else 0
        if truncation and limit is not None and limit < specials:
            raise ValueError(f"max_length must leave room for [CLS] and [SEP], got {limit}")

        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        content_limit = limit - specials if truncation and limit is not None else None
        rows = [encoding.ids[:content_limit] for encoding in encodings]
        if add_special_tokens:
            rows = [[self.cls_token_id, *row, self.sep_token_id] for row in rows]
        lengths = [len(row) for row in rows]
        width = None
        if padding in (True, "longest"):
            width = max(lengths)
        elif pad_to_max and limit is not None:
            width = limit
        pad = [] if width is None else [[self.pad_token_id] * max(0, width - length) for length in lengths]
        columns = {"input_ids": [row + extra for row, extra in zip(rows, pad)] if pad else rows}
        if return_token_type_ids:
            columns["token_type_ids"] = [[0] * len(row) for row in columns["input_ids"]]
        if return_attention_mask is not False:
            columns["attention_mask"] = [
                [1] * length + [0] * (len(row) - length) for row, length in zip(columns["input_ids"], lengths)
            ]
        if return_tensors is None:
            return BatchFeature({key: value[0] if isinstance(text, str) else value for key, value in columns.items()})
        if len({len(row) for row in columns["input_ids"]}) > 1:
            raise ValueError("texts have different lengths: pass padding=True to return tensors")
        arrays = {key: np.asarray(value, dtype=np.int64) for key, value in columns.items()}  # each [B, L]
        if return_tensors == "pt":
            return BatchFeature({key: torch.from_numpy(value) for key, value in arrays.items()})
        return BatchFeature(arrays)

    def decode(self, ids: int | Sequence[int] | torch.Tensor | np.ndarray,
               skip_special_tokens: bool = False) -> str | list[str]:
        """Ids [L] (or one id) -> text, joining `##` pieces like HF; `skip_special_tokens` drops `[CLS]`/`[SEP]`/
        `[PAD]`/`[DEC]`/`[ENC]` (kept by default, as transformers keeps them). Ids [B, L] -> B texts, as
        transformers 5's `decode` gives (`batch_decode`)."""
        if _dims(ids) == 2:
            return self.batch_decode(ids, skip_special_tokens=skip_special_tokens)
        return self._tokenizer.decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(
        self, sequences: Sequence[Sequence[int]] | torch.Tensor | np.ndarray, skip_special_tokens: bool = False
    ) -> list[str]:
        """Ids [B, L] -> B texts, as `decode` row by row."""
        return self._tokenizer.decode_batch(
            [_as_id_list(ids) for ids in sequences], skip_special_tokens=skip_special_tokens
        )


def _dims(ids: Any) -> int:
    """1 for one id or a row of ids, 2 for rows of them."""
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        return max(ids.ndim, 1)
    if isinstance(ids, Sequence) and ids and isinstance(ids[0], (Sequence, torch.Tensor, np.ndarray)):
        return 2
    return 1


def _as_id_list(ids: int | Sequence[int] | torch.Tensor | np.ndarray) -> list[int]:
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        return [int(token_id) for token_id in ids.reshape(-1).tolist()]
    if isinstance(ids, numbers.Integral):
        return [int(ids)]
    return [int(token_id) for token_id in ids]
