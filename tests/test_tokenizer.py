"""BlipTokenizer vs transformers' BertTokenizer + BLIP's [DEC]/[ENC]; save/load interop; training; pre_caption."""

import json
import random
import shutil

import numpy as np
import pytest
import torch

from blip_fast.tokenizer import BlipTokenizer, TokenizerNotFoundError, pre_caption

transformers = pytest.importorskip("transformers")

SENTENCES = [
    "A man riding a horse on the beach.",
    "Two dogs, a cat & 3 birds: (all) playing!!  ",
    "Café naïve façade — ÉCOLE Über résumé",  # accents stripped by the uncased normaliser
    "zxqvbnm supercalifragilisticexpialidocious 🙂🦙",  # WordPiece pieces and [UNK]
    "東京タワー and 北京 at night",  # CJK characters are split one per token
    "don't mix [MASK] with [SEP] or [DEC] and [ENC] in\ttext\n",  # special tokens in raw text
    "",
    " ".join(["word"] * 600),  # longer than BLIP's 35 and than the 512 positions
]
MAX_LENGTHS = [35, None]


def hf_blip_tokenizer(vocab_file, **kwargs):
    """What the original BLIP builds: bert-base-uncased + bos [DEC] + additional special token [ENC]."""
    tokenizer = transformers.BertTokenizer(str(vocab_file), **kwargs)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


@pytest.fixture(scope="module")
def hf_tokenizer(bert_vocab_dir):
    tokenizer = hf_blip_tokenizer(bert_vocab_dir / "vocab.txt")
    tokenizer.model_max_length = 512
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer(bert_vocab_dir):
    return BlipTokenizer.from_pretrained(bert_vocab_dir)


def test_special_token_ids(tokenizer):
    assert (tokenizer.bos_token_id, tokenizer.enc_token_id) == (30522, 30523)
    assert (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.eos_token_id) == (
        0, 101, 102, 102,
    )
    assert tokenizer.vocab_size == len(tokenizer) == 30524
    assert tokenizer.model_max_length == 512


@pytest.mark.parametrize("max_length", MAX_LENGTHS)
@pytest.mark.parametrize("text", SENTENCES, ids=range(len(SENTENCES)))
def test_ids_match_transformers(tokenizer, hf_tokenizer, text, max_length):
    expected = hf_tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
    ours = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
    assert ours["input_ids"].dtype == torch.int64
    assert ours["input_ids"][0].tolist() == expected
    assert ours["attention_mask"].tolist() == [[1] * len(expected)]
    assert len(expected) <= (max_length or 512)


# (padding, truncation, max_length): transformers' defaults and its rules for combining them, e.g. max_length
# without padding truncates, padding=True ignores max_length unless truncation is on.
CALL_OPTIONS = [
    (False, None, None), (False, None, 12), (True, None, None), (True, None, 12), (True, True, 12),
    ("longest", "longest_first", 9), ("max_length", True, 16), ("max_length", None, 40), (False, True, None),
    ("do_not_pad", "do_not_truncate", 10), (True, False, 7),
]


@pytest.mark.parametrize("padding, truncation, max_length", CALL_OPTIONS)
@pytest.mark.parametrize("add_special_tokens", [True, False])
@pytest.mark.parametrize("texts", [SENTENCES[:3], SENTENCES[0], [SENTENCES[5]] * 2], ids=["batch", "one", "same"])
def test_call_options_match_transformers(tokenizer, hf_tokenizer, texts, padding, truncation, max_length,
                                         add_special_tokens):
    """Lists without return_tensors (flat for one string), tensors with it, HF's errors where HF errs."""
    options = dict(padding=padding, truncation=truncation, max_length=max_length,
                   add_special_tokens=add_special_tokens)
    expected = hf_tokenizer(texts, return_token_type_ids=False, **options)
    ours = tokenizer(texts, **options)
    assert dict(ours) == dict(expected)
    try:
        expected_pt = hf_tokenizer(texts, return_token_type_ids=False, return_tensors="pt", **options)
    except ValueError:
        with pytest.raises(ValueError, match="padding=True"):
            tokenizer(texts, return_tensors="pt", **options)
        return
    ours_pt = tokenizer(texts, return_tensors="pt", **options)
    assert ours_pt.keys() == expected_pt.keys()
    for key in expected_pt:
        assert torch.equal(ours_pt[key], expected_pt[key]), key


def test_token_type_ids_and_attention_mask_switches(tokenizer, hf_tokenizer):
    for options in (dict(return_token_type_ids=True), dict(return_attention_mask=False, return_token_type_ids=False)):
        assert dict(tokenizer(SENTENCES[:2], padding=True, **options)) == dict(
            hf_tokenizer(SENTENCES[:2], padding=True, **options))


def test_unlimited_model_max_length_does_not_truncate(bert_vocab_dir, hf_tokenizer):
    """transformers writes model_max_length 1e30 for a tokenizer without a limit: no truncation then."""
    unlimited = BlipTokenizer.from_pretrained(bert_vocab_dir)
    unlimited.model_max_length = int(1e30)
    assert len(unlimited(SENTENCES[-1], truncation=True).input_ids) == 602
    assert unlimited(SENTENCES[:2], padding="max_length").input_ids == hf_tokenizer(SENTENCES[:2]).input_ids


def test_padding_options(tokenizer):
    texts = ["a dog", "a dog on a red sofa"]
    fixed = tokenizer(texts, padding="max_length", max_length=12, return_tensors="pt")
    assert fixed.input_ids.shape == (2, 12)
    assert fixed.input_ids[0].tolist() == [101, 1037, 3899, 102] + [0] * 8
    assert fixed.attention_mask[0].tolist() == [1] * 4 + [0] * 8
    lists = tokenizer(texts)
    assert [len(row) for row in lists.input_ids] == [4, 8]
    assert tokenizer("a dog").input_ids == [101, 1037, 3899, 102]
    arrays = tokenizer(texts, padding=True, return_tensors="np")
    assert isinstance(arrays["input_ids"], np.ndarray) and arrays["input_ids"].shape == (2, 8)
    untruncated = tokenizer(" ".join(["dog"] * 600), return_tensors="pt")
    assert untruncated.input_ids.shape == (1, 602)
    with pytest.raises(ValueError, match="padding=True"):
        tokenizer(texts, return_tensors="pt")
    with pytest.raises(ValueError, match="padding"):
        tokenizer(texts, padding="left")
    with pytest.raises(ValueError, match="truncation"):
        tokenizer(texts, truncation="left")
    with pytest.raises(ValueError, match="no texts"):
        tokenizer([])
    with pytest.raises(TypeError, match="list of strings"):
        tokenizer([["a", "dog"]])


def test_batch_feature_to_casts_only_floating_tensors(tokenizer):
    batch = tokenizer(["a dog"], return_tensors="pt")
    batch["pixel_values"] = torch.randn(1, 3, 4, 4)
    assert batch.to("cpu", torch.float16) is batch, "like transformers, .to() works in place and returns self"
    assert batch.input_ids.dtype == torch.int64 and batch["attention_mask"].dtype == torch.int64
    assert batch.pixel_values.dtype == torch.float16
    assert batch.to(torch.float64).pixel_values.dtype == torch.float64
    assert batch.to(device="cpu", dtype=torch.float32).pixel_values.dtype == torch.float32
    with pytest.raises(ValueError, match="device"):
        batch.to([1, 2])


@pytest.mark.parametrize("text", SENTENCES[:6], ids=range(6))
def test_token_level_methods_match_transformers(tokenizer, hf_tokenizer, text):
    """tokenize / encode / convert_tokens_to_ids / convert_ids_to_tokens, which HF code calls on the tokenizer
    (``convert_tokens_to_ids("[ENC]")`` to write BLIP's ITM token, say)."""
    tokens = hf_tokenizer.tokenize(text)
    assert tokenizer.tokenize(text) == tokens
    for add in (True, False):
        assert tokenizer.encode(text, add_special_tokens=add) == hf_tokenizer.encode(text, add_special_tokens=add)
    assert tokenizer.convert_tokens_to_ids(tokens + ["[ENC]", "[DEC]", "no-such-token"]) == \
        hf_tokenizer.convert_tokens_to_ids(tokens + ["[ENC]", "[DEC]", "no-such-token"])
    assert tokenizer.convert_tokens_to_ids("[ENC]") == hf_tokenizer.convert_tokens_to_ids("[ENC]") == 30523
    ids = hf_tokenizer.encode(text)
    for skip in (False, True):
        assert tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=skip) == \
            hf_tokenizer.convert_ids_to_tokens(ids, skip_special_tokens=skip)
    assert tokenizer.convert_ids_to_tokens(ids[1]) == hf_tokenizer.convert_ids_to_tokens(ids[1])


@pytest.mark.parametrize("text", SENTENCES[:6], ids=range(6))
def test_decode_matches_transformers(tokenizer, hf_tokenizer, text):
    ids = hf_tokenizer(text)["input_ids"]
    for skip in (True, False):
        assert tokenizer.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(ids, skip_special_tokens=skip)


def test_decode_round_trip_of_a_generated_caption(tokenizer):
    """A decoder output: [DEC] replaces [CLS], then the caption, [SEP] (eos) and padding."""
    text = "a picture of a dog running on the grass"
    ids = tokenizer([text, "a cat"], padding=True, return_tensors="pt").input_ids  # [2, L], the second row padded
    ids[:, 0] = tokenizer.bos_token_id
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == text
    assert tokenizer.batch_decode(ids, skip_special_tokens=True) == [text, "a cat"]
    assert tokenizer.batch_decode(ids.numpy().tolist(), skip_special_tokens=True) == [text, "a cat"]
    with_enc = [tokenizer.enc_token_id, *ids[1, 1:].tolist()]
    assert tokenizer.decode(with_enc, skip_special_tokens=True) == "a cat"
    assert tokenizer.decode(ids[1]) == "[DEC] a cat [SEP] " + " ".join(["[PAD]"] * (ids.shape[1] - 4))


@pytest.mark.parametrize("shape", ["one id", "row", "rows", "tensor rows"])
def test_decode_defaults_and_shapes_follow_transformers(tokenizer, hf_tokenizer, shape):
    """Special tokens kept unless asked (BertTokenizer's default); one id decodes; rows decode to a list of texts
    (transformers 5's decode of a batch)."""
    ids = hf_tokenizer(["a dog on the grass", "a cat"], padding=True)["input_ids"]
    given = {"one id": ids[0][1], "row": ids[0], "rows": ids, "tensor rows": torch.tensor(ids)}[shape]
    assert tokenizer.decode(given) == hf_tokenizer.decode(given)


def assert_same_ids(ours: BlipTokenizer, other, texts=SENTENCES):
    for text in texts:
        expected = other(text, truncation=True, max_length=64)["input_ids"]
        assert ours(text, max_length=64).input_ids == expected, text


@pytest.mark.parametrize("keep_tokenizer_json", [True, False], ids=["tokenizer_json", "vocab_txt_only"])
def test_save_pretrained_round_trip_and_transformers_loading(tokenizer, hf_tokenizer, tmp_path, keep_tokenizer_json):
    tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "BertTokenizer"
    if not keep_tokenizer_json:
        (tmp_path / "tokenizer.json").unlink()
    reloaded = BlipTokenizer.from_pretrained(tmp_path)
    assert (reloaded.bos_token_id, reloaded.enc_token_id, len(reloaded)) == (30522, 30523, 30524)
    assert_same_ids(reloaded, hf_tokenizer)
    for hf_class in (transformers.AutoTokenizer, transformers.BertTokenizer):
        loaded = hf_class.from_pretrained(tmp_path)
        assert loaded.bos_token_id == 30522 and loaded.convert_tokens_to_ids("[ENC]") == 30523
        assert len(loaded) == 30524
        assert_same_ids(tokenizer, loaded)


@pytest.mark.parametrize("do_lower_case", [True, False])
def test_vocab_dir_respects_do_lower_case(bert_vocab_dir, tmp_path, do_lower_case):
    shutil.copyfile(bert_vocab_dir / "vocab.txt", tmp_path / "vocab.txt")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": do_lower_case}))
    ours = BlipTokenizer.from_pretrained(tmp_path)
    assert_same_ids(ours, hf_blip_tokenizer(tmp_path / "vocab.txt", do_lower_case=do_lower_case))
    # "Hello" is not in the uncased vocab: cased tokenisation must differ
    assert (ours("Hello").input_ids[1] == 7592) is do_lower_case


def test_added_tokens_json_ids_are_kept_and_checked(bert_vocab_dir, tmp_path):
    shutil.copyfile(bert_vocab_dir / "vocab.txt", tmp_path / "vocab.txt")
    (tmp_path / "added_tokens.json").write_text(json.dumps({"[ENC]": 30522, "[DEC]": 30523}))
    swapped = BlipTokenizer.from_pretrained(tmp_path)
    assert (swapped.enc_token_id, swapped.bos_token_id) == (30522, 30523)
    (tmp_path / "added_tokens.json").write_text(json.dumps({"[DEC]": 30530}))
    with pytest.raises(ValueError, match="30530"):
        BlipTokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("make_dir", [True, False], ids=["empty_dir", "missing_dir"])
def test_missing_tokenizer_files_raise_clear_error(tmp_path, make_dir):
    directory = tmp_path / "checkpoint"
    if make_dir:
        directory.mkdir()
        (directory / "config.json").write_text("{}")
    with pytest.raises(TokenizerNotFoundError, match="tokenizer.json and vocab.txt") as info:
        BlipTokenizer.from_pretrained(directory)
    assert str(directory) in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def training_corpus(count: int = 50, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    subjects = ["a dog", "two cats", "a man", "the woman", "a red car", "children", "an old bus", "a bird"]
    verbs = ["running on", "sitting near", "looking at", "parked by", "playing in", "flying over"]
    places = ["the beach", "a green field", "the street", "a wooden table", "the snowy mountain", "the river"]
    return [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(places)}." for _ in range(count)]


@pytest.fixture(scope="module")
def trained():
    return BlipTokenizer.train(training_corpus(), vocab_size=150)


def test_train_builds_bert_layout_with_dec_enc_last(trained):
    size = len(trained)
    assert 50 < size <= 152
    assert (trained.pad_token_id, trained.cls_token_id, trained.sep_token_id) == (0, 2, 3)
    assert (trained.bos_token_id, trained.enc_token_id) == (size - 2, size - 1)
    for text in training_corpus(5, seed=1):
        ids = trained(text).input_ids
        assert ids[0] == trained.cls_token_id and ids[-1] == trained.sep_token_id
        assert trained.token_to_id("[UNK]") not in ids
        assert trained.decode(ids, skip_special_tokens=True) == text.lower()


def test_trained_tokenizer_loads_in_transformers(trained, tmp_path):
    trained.save_pretrained(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.bos_token_id == len(trained) - 2 and loaded.convert_tokens_to_ids("[ENC]") == len(trained) - 1
    texts = [*training_corpus(5, seed=2), "An UNSEEN word: xylophone!"]
    assert_same_ids(trained, loaded, texts)
    assert_same_ids(BlipTokenizer.from_pretrained(tmp_path), loaded, texts)


@pytest.mark.parametrize(
    "caption, max_words, expected",
    [
        ("A man riding a horse.", 30, "a man riding a horse"),
        ("  Two   dogs!!  playing\n", 30, "two dogs playing"),
        ('Hello (world): *test* #tag ~end; "quoted"', 30, "hello world test tag end quoted"),
        ("It's a dog, isn't it? Yes", 30, "it's a dog, isn't it? yes"),  # , ' ? are kept
        ("one two three four five", 3, "one two three"),
        ("one two three", 3, "one two three"),
        ("line one\n\nline two\n", 30, "line one line two"),
    ],
)
def test_pre_caption(caption, max_words, expected):
    assert pre_caption(caption, max_words=max_words) == expected


@pytest.mark.parametrize("change, message", [
    ({}, None),
    ({"bos_token_id": 5}, "[DEC] is id 30522 here, 5 in the model"),
    ({"sep_token_id": 3, "pad_token_id": 1}, "[SEP] is id 102 here, 3 in the model; [PAD] is id 0 here, 1 in the model"),
    ({"vocab_size": 30523, "enc_token_id": 1}, "30524 tokens for the model's 30523 embeddings"),
])
def test_a_tokenizer_that_does_not_fit_its_model_is_refused(bert_vocab_dir, change, message):
    """BLIP's bert-base tokenizer against BLIP's text config (its ids: [DEC] 30522, [SEP] 102, [PAD] 0, 30524
    embeddings), and against configs that differ: another model's tokenizer would select other embedding rows."""
    import dataclasses

    from blip_fast.config import TextConfig
    from blip_fast.errors import InvalidInputError

    tokenizer = BlipTokenizer.from_pretrained(bert_vocab_dir)
    text = dataclasses.replace(TextConfig(), **change)
    if message is None:
        tokenizer.check_fits(text, "model")
        return
    with pytest.raises(InvalidInputError) as error:
        tokenizer.check_fits(text, "model")
    assert str(error.value) == (f"the tokenizer in model does not fit its model ({message}): is it another model's "
                                "tokenizer.json or vocab.txt?")
