"""``blip-fast demo --tasks vqa nlvr``: the data it writes, its answer-only baselines, and (slow) the default run, where
fine-tuning must lift VQA and NLVR2 accuracy above the pre-trained model and the baselines (opt-in:
BLIP_FAST_TASK_DEMO=1, about 5 minutes)."""

import json
import os

import pytest

from blip_fast.demo_tasks import SCALES, TaskDemoScale, task_report, vqa_baselines, write_task_data
from blip_fast.tokenizer import BlipTokenizer, pre_question

TINY = TaskDemoScale(pretrain_images=30, train_images=20, test_images=10, pretrain_epochs=1, questions_per_image=2,
                     nlvr_train_pairs=12, nlvr_test_pairs=8, vqa_epochs=1, nlvr_epochs=1)


def test_task_data_layouts_and_vocabulary(tmp_path):
    files = write_task_data(tmp_path, TINY)
    read = {name: json.loads(open(files[name]).read()) for name in files if name != "tokenizer"}
    assert len(read["pretrain"]) == 30 and len(read["vqa_train"]) == 40 and len(read["vqa_test"]) == 20
    assert len(read["nlvr_train"]) == 12 and len(read["nlvr_test"]) == 8
    train_images = {record["image"] for record in read["vqa_train"]}
    test_images = {record["image"] for record in read["vqa_test"]} | {
        image for record in read["nlvr_test"] for image in record["images"]}
    assert train_images <= {record["image"] for record in read["pretrain"][:20]}  # VQA v2's images are pre-trained on
    assert not test_images & {record["image"] for record in read["pretrain"]}  # test scenes are unseen
    tokenizer = BlipTokenizer.from_pretrained(files["tokenizer"])
    texts = [pre_question(record["question"]) for record in read["vqa_test"]] + read["answer_list"] + [
        record["sentence"] for record in read["nlvr_test"]]
    ids = tokenizer(texts, padding=True, return_tensors="pt").input_ids
    assert not (ids == tokenizer.token_to_id("[UNK]")).any()  # every question, answer and statement word is known


def test_vqa_baselines_by_hand(tmp_path):
    train = [{"question_type": "how many", "answer": ["2"] * 9 + ["3"]},
             {"question_type": "how many", "answer": ["2"] * 10},
             {"question_type": "what color", "answer": ["red"] * 10}]
    test = [{"question_type": "how many", "answer": ["3"] * 10},
            {"question_type": "what color", "answer": ["red"] * 2 + ["blue"] * 8}]
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "test.json").write_text(json.dumps(test))
    baselines = vqa_baselines(tmp_path / "train.json", tmp_path / "test.json", ["2", "3", "red", "blue"])
    # prior: "2" for counts (0 on the first test question), "red" for colours (2 humans: 0.6)
    assert baselines["question_kind_prior"] == pytest.approx(100 * (0.0 + 0.6) / 2)
    # random: question 1 scores 1 for "3" only (1/4); question 2: red 0.6, blue 1.0 -> 1.6 / 4
    assert baselines["random_answer"] == pytest.approx(100 * (0.25 + 0.4) / 2)


def test_report_shows_before_after_and_baselines():
    results = {"scale": {**SCALES["small"].__dict__}, "tasks": ["vqa", "nlvr"], "seconds": {"data": 1.0},
               "vqa": {"baselines": {"random_answer": 3.0, "question_kind_prior": 20.0}, "before": {"rank": 5.0},
                       "after": {"rank": 60.0, "generate": 55.5}},
               "nlvr": {"before": {"accuracy": 50.5}, "after": {"accuracy": 70.25}},
               "vision_init": {"images": 2000, "steps": 400, "held_out_accuracy": {"shape": 97.5, "color": 100.0}}}
    report = task_report(results)
    assert "which names the shape of 97.5% and the color of 100.0% of held-out scenes" in report
    for row in ("| fine-tuned (rank) | 60.0 |", "| fine-tuned (generate) | 55.5 |", "| chance | 50.0 |",
                "| fine-tuned | 70.2 |", "| most common answer of the question kind | 20.0 |"):
        assert row in report


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("BLIP_FAST_TASK_DEMO"), reason="the task demo takes about 5 minutes on 2 free "
                    "cores, beyond what CI's budget has left: set BLIP_FAST_TASK_DEMO=1 to run it")
def test_task_demo_lifts_vqa_and_nlvr2_accuracy(tmp_path):
    """The default scale (the small one stays below the language prior: VQA 23 % vs 30 %)."""
    from blip_fast.demo_tasks import run_task_demo

    results = run_task_demo(tmp_path, scale="full", log=lambda line: None)
    vqa, nlvr = results["vqa"], results["nlvr"]
    assert vqa["after"]["rank"] > max(vqa["before"]["rank"], vqa["baselines"]["question_kind_prior"]) + 5, vqa
    assert vqa["after"]["generate"] > vqa["baselines"]["question_kind_prior"], vqa
    assert nlvr["after"]["accuracy"] > max(nlvr["before"]["accuracy"], 50.0) + 5, nlvr
    assert json.loads((tmp_path / "tasks" / "results.json").read_text())["vqa"] == vqa
    assert "## NLVR2" in (tmp_path / "tasks" / "report.md").read_text()


def test_unknown_task_or_a_folder_of_another_scale_is_a_user_error(tmp_path):
    from blip_fast.demo_tasks import run_task_demo
    from blip_fast.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="demo tasks are"):
        run_task_demo(tmp_path, ["vqa", "gqa"], scale=TINY)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "demo_scale.json").write_text(json.dumps(SCALES["full"].__dict__))
    with pytest.raises(InvalidInputError, match="another scale"):
        run_task_demo(tmp_path, ["vqa"], scale="small")
    assert not (tmp_path / "tasks" / "data").exists()  # refused before any work
