"""A deterministic WordPiece vocabulary trainer (BPE merges with a ``##`` continuation prefix).

`tokenizers`' ``WordPieceTrainer`` gives a different vocabulary in every process (its merge counts live in hash maps
with per-process random seeds, so ties between equally frequent pairs break differently, and even the token set can
change): a model trained on its vocabulary cannot be reproduced. This trainer does what it does — start from the
characters (first characters plain, later ones ``##``-prefixed), then repeatedly add the merge of the most frequent
adjacent pair — with every tie broken by the pair's text, so the same corpus always gives the same vocabulary in
the same order. Words come from the caller (already normalised and pre-tokenised).
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Sequence

CONTINUATION = "##"

Pair = tuple[str, str]


def _merged(first: str, second: str) -> str:
    return first + second.removeprefix(CONTINUATION)


def _pairs(symbols: Sequence[str]) -> Iterable[Pair]:
    return zip(symbols, symbols[1:])


def train_wordpiece_vocab(words: Iterable[str], vocab_size: int, special_tokens: Sequence[str],
                          min_frequency: int = 1, max_word_chars: int = 100) -> list[str]:
    """The vocabulary (index = token id): ``special_tokens``, the sorted alphabet, then merges in the order made.

    Merges stop at ``vocab_size`` tokens or when no adjacent pair occurs ``min_frequency`` times. The alphabet is
    always kept whole (like ``tokenizers``' trainer), so a tiny ``vocab_size`` can be exceeded by it. Words longer
    than ``max_word_chars`` are skipped: WordPiece maps them to ``[UNK]`` anyway.
    """
    counts = Counter(word for word in words if 0 < len(word) <= max_word_chars)
    distinct = sorted(counts)  # a fixed word order: every later step is a pure function of the corpus
    frequency = [counts[word] for word in distinct]
    splits = [[word[0], *(CONTINUATION + char for char in word[1:])] for word in distinct]
    vocab = list(dict.fromkeys(special_tokens))
    known = set(vocab)
    for symbol in sorted({symbol for symbols in splits for symbol in symbols} - known):
        vocab.append(symbol)
        known.add(symbol)

    pair_counts: Counter[Pair] = Counter()
    holders: dict[Pair, set[int]] = {}  # pair -> indices of the words that contain it
    for index, symbols in enumerate(splits):
        for pair in _pairs(symbols):
            pair_counts[pair] += frequency[index]
            holders.setdefault(pair, set()).add(index)
    # Max-heap by count, then the smallest pair text; entries go stale when counts change and are re-checked.
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    while len(vocab) < vocab_size and heap:
        negative_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -negative_count:
            continue  # stale entry
        if -negative_count < min_frequency:
            break
        token = _merged(*pair)
        if token not in known:  # two different pairs can spell one token ("##a"+"##bc", "##ab"+"##c")
            vocab.append(token)
            known.add(token)
        changed: set[Pair] = set()
        for index in sorted(holders.pop(pair)):
            symbols, weight = splits[index], frequency[index]
            for old in _pairs(symbols):
                pair_counts[old] -= weight
                changed.add(old)
            merged, position = [], 0
            while position < len(symbols):
                if position + 1 < len(symbols) and (symbols[position], symbols[position + 1]) == pair:
                    merged.append(token)
                    position += 2
                else:
                    merged.append(symbols[position])
                    position += 1
            splits[index] = merged
            for new in _pairs(merged):
                pair_counts[new] += weight
                holders.setdefault(new, set()).add(index)
                changed.add(new)
        for changed_pair in sorted(changed):
            count = pair_counts[changed_pair]
            if count > 0:
                heapq.heappush(heap, (-count, changed_pair))
            else:
                del pair_counts[changed_pair]
                holders.pop(changed_pair, None)
    return vocab
