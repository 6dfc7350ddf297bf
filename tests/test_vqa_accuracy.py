"""The official VQA accuracy on hand-made cases. Every expected value is worked out by hand from the definition of
GT-Vision-Lab's ``vqaEval.py``: per human answer left out, ``min(#other humans matching / 3, 1)``, averaged; the
prediction normalised (punctuation, number words, articles, contractions), the human answers only punctuation-
processed and only when they disagree."""

import pytest

from blip_fast.vqa_accuracy import (
    normalize_prediction,
    process_digit_article,
    process_punctuation,
    question_accuracy,
    vqa_accuracy,
)

TEN = 10


@pytest.mark.parametrize(
    "matching, expected",
    [
        # k of 10 humans gave the answer. Leaving out one of the k: (k-1)/3 capped at 1; one of the others: k/3.
        (0, 0.0),
        (1, (1 * 0 + 9 * (1 / 3)) / 10),  # 0.3
        (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # 0.6
        (3, (3 * (2 / 3) + 7 * 1) / 10),  # 0.9
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_partial_credit_over_the_ten_leave_one_out_subsets(matching, expected):
    humans = ["red"] * matching + ["blue"] * (TEN - matching)
    assert question_accuracy("red", humans) == pytest.approx(expected)


@pytest.mark.parametrize(
    "prediction, humans, expected",
    [
        # number words become digits, articles go, case is folded (the prediction only)
        ("two", ["2"] * 10, 1.0),
        ("Two.", ["2"] * 10, 1.0),  # the final period goes (no digit after it), then "two" -> "2"
        ("none", ["0"] * 10, 1.0),
        ("the left", ["left"] * 10, 1.0),
        ("an apple", ["apple"] * 7 + ["pear"] * 3, 1.0),
        # human answers are never lower-cased or article-stripped: unanimous ones are not even punctuation-processed
        ("the left", ["the left"] * 10, 0.0),
        ("Red", ["Red"] * 10, 0.0),
        # contractions are restored in the prediction
        ("dont know", ["don't know"] * 10, 1.0),
        ("isnt", ["isn't"] * 4 + ["no"] * 6, 1.0),
        # "yes!": "!" touches no space -> becomes a space -> "yes"
        ("yes!", ["yes"] * 10, 1.0),
        # a mark touching a space is deleted, elsewhere it becomes a space: both give "black white"
        ("black - white", ["black white"] * 10, 1.0),
        ("black-white", ["black white"] * 10, 1.0),
        # a digit-comma-digit group deletes every mark: "1,000" -> "1000"; the two disagreeing humans' "1,000" too
        ("1,000", ["1,000"] * 2 + ["999"] * 8, 0.6),
        # a period before a digit stays ("3.5"), the trailing one goes
        ("3.5.", ["3.5"] * 10, 1.0),
        # whitespace: tabs and newlines are spaces, the ends are stripped, runs collapse
        ("\tblue\n", ["blue"] * 10, 1.0),
        ("light   blue", ["light blue"] * 3 + ["blue"] * 7, 0.9),
        # disagreeing humans are punctuation-processed: "yes." -> "yes" matches
        ("yes", ["yes."] * 2 + ["no"] * 8, 0.6),
        # ... but unanimous ones are compared as written: "yes." never matches "yes"
        ("yes", ["yes."] * 10, 0.0),
    ],
)
def test_normalisation_edge_cases(prediction, humans, expected):
    assert question_accuracy(prediction, humans) == pytest.approx(expected)


def test_the_normalisation_steps():
    assert process_punctuation("what? yes") == "what yes"  # "? " touches a space: deleted
    assert process_punctuation("a/b") == "a b"
    assert process_punctuation("1,000/2") == "10002"  # a digit-comma-digit group: every mark deleted
    assert process_punctuation("e.g.") == "eg"
    assert process_punctuation("." * 40) == "." * 8  # the official code removes at most 32 periods
    assert process_digit_article("The Three Dogs") == "3 dogs"
    assert process_digit_article("a wont an") == "won't"
    assert process_digit_article("Im here") == "im here"  # the table's capitalised "Im" never matches
    assert normalize_prediction(" Ten, the dogs! ") == "10 dogs"


def test_corpus_accuracy_and_answer_types():
    predictions = {1: "2", 2: "yes", 3: "red", 4: "no"}
    humans = {1: ["2"] * 10, 2: ["yes"] * 3 + ["no"] * 7, 3: ["blue"] * 10, 4: ["no"] * 2 + ["yes"] * 8}
    types = {1: "number", 2: "yes/no", 3: "other", 4: "yes/no"}
    metrics = vqa_accuracy(predictions, humans, types)
    assert metrics["overall"] == pytest.approx(100 * (1.0 + 0.9 + 0.0 + 0.6) / 4)
    assert metrics["per_answer_type"] == pytest.approx({"number": 100.0, "other": 0.0, "yes/no": 75.0})
    assert "per_answer_type" not in vqa_accuracy(predictions, humans)
    with pytest.raises(ValueError, match=r"unanswered: \['4'\]"):
        vqa_accuracy({1: "2", 2: "yes", 3: "red"}, humans)
    with pytest.raises(ValueError, match="at least one human answer"):
        question_accuracy("red", [])
