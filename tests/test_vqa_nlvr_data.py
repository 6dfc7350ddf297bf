"""VQA and NLVR2 data: the annotation layouts (BLIP's json, VQA v2's questions + annotations), BLIP's answer weights,
the training datasets and collators, and the synthetic questions and statements."""

import json

import PIL.Image
import pytest
import torch

from blip_fast.data import BlipTrainTransform, SyntheticNoisyDataset
from blip_fast.data import synthetic_tasks as tasks
from blip_fast.data.nlvr import NLVRCollator, NLVRDataset, read_nlvr, swap_sides
from blip_fast.data.vqa import AnnotationError, VQACollator, VQADataset, VQAQuestion, answer_weights, read_vqa
from blip_fast.tokenizer import BlipTokenizer, pre_question
from blip_fast.vqa_accuracy import question_accuracy

V2_ANSWERS = ["2", "2", "two", "2", "3", "2", "2", "2", "2", "2"]


def _write(path, value):
    path.write_text(json.dumps(value))
    return path


@pytest.fixture()
def v2_files(tmp_path):
    """A VQA v2 val pair of two questions about COCO image 42 (in val2014/) and one test-dev questions file."""
    (tmp_path / "val2014").mkdir()
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    questions = _write(tmp_path / "q.json", {"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "How many dogs?", "question_id": 420},
        {"image_id": 42, "question": "Is it sunny?", "question_id": 421}]})
    annotations = _write(tmp_path / "a.json", {"annotations": [
        {"question_id": 421, "answer_type": "yes/no", "answers": [{"answer": "yes", "answer_id": i} for i in range(10)]},
        {"question_id": 420, "answer_type": "number",
         "answers": [{"answer": answer, "answer_id": i} for i, answer in enumerate(V2_ANSWERS)]}]})
    test = _write(tmp_path / "test.json", {"data_subtype": "test-dev2015", "questions": [
        {"image_id": 7, "question": "What?", "question_id": 70}]})
    return {"root": tmp_path, "questions": questions, "annotations": annotations, "test": test}


def test_vqa_v2_pair_and_test_questions(v2_files):
    root = v2_files["root"]
    first, second = read_vqa([v2_files["questions"], v2_files["annotations"]], root)
    assert first == VQAQuestion(420, "How many dogs?", str(root / "val2014" / "COCO_val2014_000000000042.jpg"),
                                tuple(V2_ANSWERS), "number")
    assert second.answers == ("yes",) * 10 and second.answer_type == "yes/no"
    (test,) = read_vqa(v2_files["test"], root)
    # test-dev questions use the test2015 images; without that folder they lie in the root itself
    assert test.image == str(root / "COCO_test2015_000000000007.jpg") and test.answers is None


def test_blip_vqa_json(tmp_path):
    records = [{"question_id": 1, "question": "What color?", "image": "a.png", "answer": ["red", "red", "pink"],
                "dataset": "vqa"},
               {"question": "Where?", "image": "vg/b.jpg", "answer": "left", "dataset": "vg"},
               {"question_id": "x7", "question": "Test?", "image": "c.png"}]
    vqa, vg, test = read_vqa(_write(tmp_path / "vqa.json", records), tmp_path)
    assert vqa.answers == ("red", "red", "pink") and vqa.image == str(tmp_path / "a.png")
    assert vg.dataset == "vg" and vg.answers == ("left",) and vg.question_id is None
    assert test.question_id == "x7" and test.answers is None


def test_answer_weights_are_blips():
    """vqa_dataset.py: each distinct answer weighs its share of the humans, in first-seen order; VG answers 0.2."""
    answers, weights = answer_weights(VQAQuestion(1, "q", "i", tuple(V2_ANSWERS)))
    assert answers == ["2", "two", "3"] and weights == pytest.approx([0.8, 0.1, 0.1])
    assert answer_weights(VQAQuestion(1, "q", "i", ("left",), dataset="vg")) == (["left"], [0.2])


@pytest.mark.parametrize("content, message", [
    ({"annotations": []}, "need their questions file"),
    ({"questions": [{"image_id": 1, "question": "q", "question_id": 1}]}, "'data_subtype'"),
    ({"data_subtype": "val2014", "questions": [{"image_id": "1", "question": "q", "question_id": 1}]},
     r"questions\[0\]: not a record with an integer 'image_id'"),
    ([{"question": "q", "image": "a", "answer": []}], r"\[0\]: 'answer' must be text or a non-empty list"),
    ([{"question": "q", "image": "a", "dataset": "coco"}], "'dataset' must be 'vqa' or 'vg'"),
    ([{"question": 3, "image": "a"}], "'question' must be text"),
    ({"something": 1}, "neither BLIP's VQA json"),
])
def test_vqa_format_errors_name_the_file_and_record(tmp_path, content, message):
    path = _write(tmp_path / "bad.json", content)
    with pytest.raises(AnnotationError, match=message):
        read_vqa(path, tmp_path)


def test_vqa_questions_without_annotations_are_an_error(v2_files, tmp_path):
    other = _write(tmp_path / "other_annotations.json", {"annotations": [
        {"question_id": 421, "answers": [{"answer": "no"}]}]})
    with pytest.raises(AnnotationError, match="1 questions have no annotation .* question_id 420"):
        read_vqa([v2_files["questions"], other], v2_files["root"])
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(AnnotationError, match="cannot read annotations"):
        read_vqa(tmp_path / "broken.json", tmp_path)


def _tokenizer(texts):
    return BlipTokenizer.train(texts, vocab_size=120)


def test_vqa_dataset_and_collator(tmp_path):
    for name in ("a.png", "b.png"):
        PIL.Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / name)
    records = [{"question_id": 1, "question": "What COLOR is it?!", "image": "a.png", "answer": ["red"] * 9 + ["pink"]},
               {"question_id": 2, "question": "Where?", "image": "b.png", "answer": "top", "dataset": "vg"},
               {"question_id": 3, "question": "No answer", "image": "a.png"},
               {"question_id": 4, "question": "Missing", "image": "gone.png", "answer": ["x"]}]
    questions = read_vqa(_write(tmp_path / "vqa.json", records), tmp_path)
    dataset = VQADataset(questions, BlipTrainTransform(16, scale=(1.0, 1.0), flip_prob=0.0))
    assert len(dataset) == 2 and dataset.skipped == {"no_answer": 1, "missing_image": 1}
    item = dataset[0]
    assert item["question"] == pre_question("What COLOR is it?!") == "what color is it?"
    assert item["answers"] == ["red", "pink"] and item["weights"] == pytest.approx([0.9, 0.1])
    tokenizer = _tokenizer(["what color is it where", "red pink top"])
    batch = VQACollator(tokenizer, max_length=4)([item, None, dataset[1]])
    assert batch["question_ids"].shape == (2, 4) and batch["pixel_values"].shape == (2, 3, 16, 16)
    assert batch["answers_per_question"].tolist() == [2, 1]
    assert batch["answer_weights"].dtype == torch.float32
    assert batch["answer_weights"].tolist() == pytest.approx([0.9, 0.1, 0.2])
    assert torch.equal(batch["answer_ids"], tokenizer(["red", "pink", "top"], padding=True, return_tensors="pt").input_ids)


def test_nlvr_reader_labels_and_errors(tmp_path):
    records = [{"images": ["l.png", "r.png"], "sentence": "The left one.", "label": "True"},
               {"images": ["l.png", "r.png"], "sentence": "x", "label": False},
               {"images": ["l.png", "r.png"], "sentence": "x", "label": 1}]
    statements = read_nlvr(_write(tmp_path / "n.json", records), tmp_path)
    assert [statement.label for statement in statements] == [1, 0, 1]
    assert statements[0].images == (str(tmp_path / "l.png"), str(tmp_path / "r.png"))
    for record, message in [({"images": ["a"], "sentence": "x", "label": "True"}, "'images' must list two"),
                            ({"images": ["a", "b"], "sentence": "x", "label": "true"}, "'label' must be"),
                            ({"images": ["a", "b"], "sentence": "x", "label": [1]}, "'label' must be"),
                            ({"images": ["a", "b"], "sentence": None, "label": "True"}, "'sentence' must be text")]:
        with pytest.raises(AnnotationError, match=r"n.json\[0\]: " + message):
            read_nlvr(_write(tmp_path / "n.json", [record]), tmp_path)


def test_nlvr_dataset_swaps_pairs_with_left_and_right(tmp_path):
    PIL.Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "red.png")
    PIL.Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "blue.png")
    record = {"images": ["red.png", "blue.png"], "sentence": "The LEFT image is red, the right one blue.",
              "label": "True"}
    statements = read_nlvr(_write(tmp_path / "n.json", [record] * 40), tmp_path)
    dataset = NLVRDataset(statements, BlipTrainTransform(8, scale=(1.0, 1.0), flip_prob=0.0))
    items = [dataset[index] for index in range(40)]
    swapped = [item["images"][0, 2].mean() > item["images"][0, 0].mean() for item in items]  # blue first
    assert 5 < sum(swapped) < 35  # about half
    for item, was_swapped in zip(items, swapped):
        expected = "the left image is red, the right one blue"
        assert item["sentence"] == (swap_sides(expected) if was_swapped else expected)
    assert swap_sides("left of the right lefty") == "right of the left lefty"
    assert [item["sentence"] for item in items] == [dataset[index]["sentence"] for index in range(40)]  # pure
    fixed = NLVRDataset(statements, BlipTrainTransform(8, scale=(1.0, 1.0), flip_prob=0.0), swap_pairs=False)
    assert fixed[3]["images"][0, 0].mean() > fixed[3]["images"][0, 2].mean()
    batch = NLVRCollator(_tokenizer(["the left image is red right one blue"]))([items[0], items[1]])
    assert batch["pixel_values"].shape == (2, 2, 3, 8, 8) and batch["labels"].tolist() == [1, 1]


def test_synthetic_questions_are_true_of_their_scenes():
    dataset = SyntheticNoisyDataset(60, noise_fraction=0.0, seed=5)
    records = tasks.vqa_records(dataset, range(60), questions_per_image=3, seed=1)
    assert records == tasks.vqa_records(dataset, range(60), questions_per_image=3, seed=1)  # deterministic
    assert len(records) == 180 and len({record["question_id"] for record in records}) == 180
    candidates = set(tasks.answer_list())
    agreement = []
    for record in records:
        scene = dataset.scene(int(record["image"][7:13]))
        truth = max(set(record["answer"]), key=record["answer"].count)
        assert len(record["answer"]) == 10 and set(record["answer"]) <= candidates
        agreement.append(record["answer"].count(truth))
        question = record["question"].lower()
        if question.startswith("how many"):
            assert record["answer_type"] == "number"
        elif "background" in question and "colo" in question:
            assert truth == scene.background
        elif question.startswith("what colo"):
            assert truth == scene.color
        elif question.startswith(("what shape", "which shape")):
            assert truth == scene.shape
    assert {record["answer_type"] for record in records} == {"yes/no", "number", "other"}
    assert 8.5 < sum(agreement) / len(agreement) < 9.5  # ~90% of the humans agree
    # the majority answer scores full credit under the official accuracy
    assert all(question_accuracy(max(set(r["answer"]), key=r["answer"].count), r["answer"]) >= 0.9 for r in records)


@pytest.mark.parametrize("seed", [0, 1])
def test_synthetic_statements_are_balanced_and_true_or_false_as_labelled(seed):
    dataset = SyntheticNoisyDataset(50, noise_fraction=0.0, seed=2)
    pairs = tasks.nlvr_pairs(dataset, range(50), 60, seed=seed)
    assert sum(label for *_, label in pairs) == 30
    for left, right, sentence, label in pairs:
        scenes = (dataset.scene(left), dataset.scene(right))
        words = sentence.rstrip(".").lower().split()
        if words[:3] == ["both", "images", "show"]:
            assert label == all(words[3] in (s.shape + "s", s.shape + "es") for s in scenes)
        elif words[:3] == ["both", "images", "have"]:
            assert label == all(s.color == words[3] for s in scenes)
        elif words[0] == "neither":
            assert label == (not any(words[3] in (s.shape + "s", s.shape + "es") for s in scenes))
        else:
            color, shape = words[-2], words[-1]
            assert label == any(s.color == color and shape in (s.shape + "s", s.shape + "es") for s in scenes)
    records = tasks.nlvr_records(dataset, range(50), 4, seed=seed)
    assert [record["label"] for record in records] == ["True", "False", "True", "False"]
