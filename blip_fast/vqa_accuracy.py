"""The VQA accuracy of the official VQA evaluation (GT-Vision-Lab/VQA ``vqaEval.py``), reproduced rule for rule.

A predicted answer scores ``min(#humans who gave it / 3, 1)``, averaged over the 10 leave-one-out subsets of the 10
human answers (so 3 matching humans score 0.9 and 4 or more score 1.0). Before comparing, the official code
normalises answers; its quirks are kept, because they change scores:

- the prediction: newlines and tabs become spaces and the ends are stripped; then :func:`process_punctuation` and
  :func:`process_digit_article` (lower case, number words to digits, articles dropped, contractions restored);
- the human answers: only :func:`process_punctuation`, and only when the humans disagree (VQA v2's annotation files
  hold answers that are already normalised, so the official code never lower-cases or maps them);
- punctuation is deleted where it touches a space (or anywhere, when the text holds a digit-comma-digit group) and
  replaced by a space elsewhere; a period is deleted unless a digit follows it (``3.5`` keeps it), at most 32 of them
  (the official code passes ``re.UNICODE``, 32, where ``re.sub`` expects its ``count``).

Pure Python; :func:`vqa_accuracy` returns percent like the official ``accuracy["overall"]`` (unrounded; the official
code rounds to 2 decimals) and per answer type when the annotations have one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

#: The official list, in its order (the order matters: each mark is tested against the *original* text).
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# As written officially: "(?!<=\d)" is a lookahead (a typo for a lookbehind) that never fails before a period.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_OFFICIAL_PERIOD_COUNT = re.UNICODE  # 32
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
# The official contraction table, grouped by what it restores: "restored form": "the spellings mapped to it". Its
# capitalised spellings (Im, Ive, Id've, I'dve) never match (words are lower-cased first); "somebody'd" really maps
# to "somebodyd" there.
_RESTORED = {
    "ain't": "aint", "aren't": "arent", "can't": "cant", "could've": "couldve", "couldn't": "couldnt",
    "couldn't've": "couldn'tve couldnt've", "didn't": "didnt", "doesn't": "doesnt", "don't": "dont",
    "hadn't": "hadnt", "hadn't've": "hadnt've hadn'tve", "hasn't": "hasnt", "haven't": "havent", "he'd": "hed",
    "he'd've": "hed've he'dve", "he's": "hes", "how'd": "howd", "how'll": "howll", "how's": "hows",
    "I'd've": "Id've I'dve", "I'm": "Im", "I've": "Ive", "isn't": "isnt", "it'd": "itd", "it'd've": "itd've it'dve",
    "it'll": "itll", "let's": "let's", "ma'am": "maam", "mightn't": "mightnt", "mightn't've": "mightnt've mightn'tve",
    "might've": "mightve", "mustn't": "mustnt", "must've": "mustve", "needn't": "neednt", "not've": "notve",
    "o'clock": "oclock", "oughtn't": "oughtnt", "'ow's'at": "ow's'at 'ows'at 'ow'sat", "shan't": "shant",
    "she'd've": "shed've she'dve", "she's": "she's", "should've": "shouldve", "shouldn't": "shouldnt",
    "shouldn't've": "shouldnt've shouldn'tve", "somebodyd": "somebody'd", "somebody'd've": "somebodyd've somebody'dve",
    "somebody'll": "somebodyll", "somebody's": "somebodys", "someone'd": "someoned",
    "someone'd've": "someoned've someone'dve", "someone'll": "someonell", "someone's": "someones",
    "something'd": "somethingd", "something'd've": "somethingd've something'dve", "something'll": "somethingll",
    "that's": "thats", "there'd": "thered", "there'd've": "thered've there'dve", "there're": "therere",
    "there's": "theres", "they'd": "theyd", "they'd've": "theyd've they'dve", "they'll": "theyll",
    "they're": "theyre", "they've": "theyve", "'twas": "twas", "wasn't": "wasnt", "we'd've": "wed've we'dve",
    "we've": "weve", "weren't": "werent", "what'll": "whatll", "what're": "whatre", "what's": "whats",
    "what've": "whatve", "when's": "whens", "where'd": "whered", "where's": "wheres", "where've": "whereve",
    "who'd": "whod", "who'd've": "whod've who'dve", "who'll": "wholl", "who's": "whos", "who've": "whove",
    "why'll": "whyll", "why're": "whyre", "why's": "whys", "won't": "wont", "would've": "wouldve",
    "wouldn't": "wouldnt", "wouldn't've": "wouldnt've wouldn'tve", "y'all": "yall", "y'all'll": "yall'll y'allll",
    "y'all'd've": "yall'd've y'alld've y'all'dve", "you'd": "youd", "you'd've": "youd've you'dve", "you'll": "youll",
    "you're": "youre", "you've": "youve",
}
CONTRACTIONS = {spelling: restored for restored, spellings in _RESTORED.items() for spelling in spellings.split()}
#: Matching humans for full credit.
HUMANS_FOR_FULL_CREDIT = 3


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``: marks touching a space (or all of them, when the text has a
    digit-comma-digit group) are deleted, the others become spaces; periods not followed by a digit are deleted."""
    out = text
    strip_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in PUNCTUATION:
        if strip_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower case, split on whitespace, number words to digits, articles
    dropped, contractions restored, joined by single spaces."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_prediction(answer: str) -> str:
    """A predicted answer as the official evaluation compares it."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def question_accuracy(answer: str, human_answers: Sequence[str]) -> float:
    """Accuracy in [0, 1] of one predicted ``answer`` against the human answers of its question (VQA v2: 10)."""
    if not human_answers:
        raise ValueError("a question needs at least one human answer to be scored")
    answer = normalize_prediction(answer)
    humans = list(human_answers)
    if len(set(humans)) > 1:
        humans = [process_punctuation(human) for human in humans]
    scores = []
    for left_out in range(len(humans)):
        matching = sum(human == answer for index, human in enumerate(humans) if index != left_out)
        scores.append(min(1.0, matching / HUMANS_FOR_FULL_CREDIT))
    return sum(scores) / len(scores)


def vqa_accuracy(
    predictions: Mapping[Any, str],
    human_answers: Mapping[Any, Sequence[str]],
    answer_types: Mapping[Any, str] | None = None,
) -> dict[str, Any]:
    """``{"overall": percent, "per_answer_type": {type: percent}}`` over every annotated question (the official
    evaluation refuses a result file that does not answer exactly the annotated questions; so does this)."""
    if predictions.keys() != human_answers.keys():
        missing = sorted(map(str, human_answers.keys() - predictions.keys()))[:5]
        extra = sorted(map(str, predictions.keys() - human_answers.keys()))[:5]
        raise ValueError(f"the results must answer exactly the annotated questions (unanswered: {missing}, "
                         f"not annotated: {extra})")
    if not predictions:
        raise ValueError("no questions to score")
    scores = {key: question_accuracy(predictions[key], human_answers[key]) for key in human_answers}
    metrics: dict[str, Any] = {"overall": 100.0 * sum(scores.values()) / len(scores)}
    if answer_types:
        by_type: dict[str, list[float]] = {}
        for key, score in scores.items():
            by_type.setdefault(answer_types[key], []).append(score)
        metrics["per_answer_type"] = {name: 100.0 * sum(values) / len(values)
                                      for name, values in sorted(by_type.items())}
    return metrics
