"""The deterministic WordPiece trainer: hand-computed merges, ties broken by text, one vocab in every process."""

import json
import os
import subprocess
import sys

from blip_fast.wordpiece import train_wordpiece_vocab

SPECIALS = ("[PAD]", "[UNK]")


def test_merges_most_frequent_pair_first():
    # pairs: (a, ##b) x3, (##b, ##c) x1 -> "ab"; then (ab, ##c) x1 -> "abc"
    vocab = train_wordpiece_vocab(["ab", "ab", "abc"], vocab_size=100, special_tokens=SPECIALS)
    assert vocab == ["[PAD]", "[UNK]", "##b", "##c", "a", "ab", "abc"]


def test_ties_break_by_pair_text_and_limits_hold():
    vocab = train_wordpiece_vocab(["zw", "xy"], vocab_size=100, special_tokens=SPECIALS)
    assert vocab[-2:] == ["xy", "zw"]  # both pairs occur once: the smaller text merges first
    assert train_wordpiece_vocab(["zw", "xy"], vocab_size=7, special_tokens=SPECIALS)[-1] == "xy"
    # The alphabet is kept whole even past vocab_size; min_frequency stops merges of rarer pairs.
    assert train_wordpiece_vocab(["zw", "xy"], vocab_size=3, special_tokens=SPECIALS) == [
        "[PAD]", "[UNK]", "##w", "##y", "x", "z"]
    assert train_wordpiece_vocab(["ab", "ab", "cd"], 100, SPECIALS, min_frequency=2)[-1] == "ab"


def test_repeated_symbols_and_equal_spellings():
    # "aaaa": (a, ##a) then (##a, ##a) ... merges overlap; every word must still be spelled by the vocab
    vocab = train_wordpiece_vocab(["aaaa", "aaa", "aa"], vocab_size=100, special_tokens=SPECIALS)
    assert len(vocab) == len(set(vocab))
    assert {"aa", "aaa", "aaaa"} <= set(vocab)


def test_special_tokens_keep_their_ids_and_long_words_are_skipped():
    vocab = train_wordpiece_vocab(["ab", "x" * 101], 100, ("[PAD]", "[UNK]", "[CLS]"), max_word_chars=100)
    assert vocab[:3] == ["[PAD]", "[UNK]", "[CLS]"] and "##x" not in vocab and "x" not in vocab


_TRAIN_IN_A_PROCESS = """
import json
from blip_fast.data.synthetic import SyntheticNoisyDataset
from blip_fast.tokenizer import BlipTokenizer, pre_caption
dataset = SyntheticNoisyDataset(300, 0.4, seed=7)
tokenizer = BlipTokenizer.train([pre_caption(c) for c in dataset.captions() + dataset.vocabulary()], vocab_size=160)
print(json.dumps(tokenizer._tokenizer.get_vocab(with_added_tokens=True), sort_keys=True))
"""


def test_blip_tokenizer_train_gives_one_vocab_in_every_process():
    """tokenizers' WordPieceTrainer gives another vocab per process; ours must not (string hashing differs too)."""
    vocabs = [json.loads(subprocess.run([sys.executable, "-c", _TRAIN_IN_A_PROCESS], capture_output=True, text=True,
                                        check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout)
              for seed in ("1", "2")]
    assert vocabs[0] == vocabs[1] and len(vocabs[0]) == 162
