"""VQA and NLVR2 fine-tuning end to end: ``python -m blip_fast.train --task vqa|nlvr --init_from ORIGINAL.pth``
(the oracle fixtures' tiny Salesforce checkpoints, 32 px), exact resume, export, and ``blip-fast evaluate`` on the
exports (VQA in both modes, from VQA v2's question + annotation files; NLVR2 accuracy).

The data: 12 synthetic scenes at 32 px; VQA questions (3 per image) and NLVR2 statements about the first 8, the
test questions and statements about the last 4. Runs use the shipped ``base-vqa.yaml`` / ``base-nlvr.yaml`` with
the sizes turned down on the command line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from blip_fast.data import SyntheticNoisyDataset
from blip_fast.data import synthetic_tasks as synthetic
from tests.test_train import CONFIGS, _consolidated, _max_differences, _metrics, _train

FIXTURES = Path(__file__).parent / "fixtures" / "original"
TRAIN_IMAGES, TEST_IMAGES = 8, 4


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tasks")
    scenes = SyntheticNoisyDataset(TRAIN_IMAGES + TEST_IMAGES, noise_fraction=0.0, seed=4, image_size=32)
    scenes.write_blip_json(root, {"all": TRAIN_IMAGES + TEST_IMAGES})
    train, test = range(TRAIN_IMAGES), range(TRAIN_IMAGES, TRAIN_IMAGES + TEST_IMAGES)
    files = {"vqa_train": synthetic.write_json(root / "vqa_train.json", synthetic.vqa_records(scenes, train)),
             "answers": synthetic.write_json(root / "answer_list.json", synthetic.answer_list()),
             "nlvr_train": synthetic.write_json(root / "nlvr_train.json", synthetic.nlvr_records(scenes, train, 16)),
             "nlvr_test": synthetic.write_json(root / "nlvr_test.json", synthetic.nlvr_records(scenes, test, 8, 1))}
    # The test questions as VQA v2's official pair, over COCO-named copies of the images.
    (root / "val2014").mkdir()
    questions, annotations = [], []
    for record in synthetic.vqa_records(scenes, test):
        image_id = int(record["image"][7:13])
        scenes.image(image_id).save(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", quality=95)
        questions.append({"image_id": image_id, "question": record["question"], "question_id": record["question_id"]})
        annotations.append({"question_id": record["question_id"], "answer_type": record["answer_type"],
                            "answers": [{"answer": answer, "answer_id": index + 1, "answer_confidence": "yes"}
                                        for index, answer in enumerate(record["answer"])]})
    files["v2_questions"] = synthetic.write_json(root / "v2_questions.json",
                                                 {"data_subtype": "val2014", "questions": questions})
    files["v2_annotations"] = synthetic.write_json(root / "v2_annotations.json", {"annotations": annotations})
    return {"root": root, **files}


def _flags(task: str, data: dict, pth: str, *extra: str) -> list[str]:
    return ["--init_from", str(FIXTURES / pth), "--tokenizer_dir", str(FIXTURES), "--image_size", "32",
            "--annotations", str(data[f"{task}_train"]), "--image_root", str(data["root"]),
            "--deepspeed_config", str(CONFIGS / "ds_zero2.json"), "--micro_batch_size", "8", "--num_workers", "0",
            "--max_text_length", "35", "--init_lr", "1e-3", "--log_every_steps", "1", "--save_every_steps", "100",
            *extra]


def _run_pair(task: str, data: dict, pth: str, tmp_path: Path, steps: int, split: int, *extra: str) -> tuple:
    """An uninterrupted run and one stopped at ``split`` steps then resumed; both must end identical."""
    config = CONFIGS / f"base-{task}.yaml"
    straight = tmp_path / "straight"
    log = _train("python", straight, *_flags(task, data, pth, *extra), config=config)
    stopped = tmp_path / "stopped"
    _train("python", stopped, *_flags(task, data, pth, *extra, "--max_steps", str(split), "--export_tasks"),
           config=config)
    resumed_log = _train("python", stopped, *_flags(task, data, pth, *extra, "--resume"), config=config)
    assert f"at step {split}" in resumed_log
    differences = _max_differences(_consolidated(straight, steps), _consolidated(stopped, steps))
    worst = max(differences, key=differences.get)
    assert differences[worst] == 0.0, f"{worst} differs by {differences[worst]} after resuming"
    losses = [record["loss"] for record in _metrics(straight)]
    assert [record["loss"] for record in _metrics(stopped)] == losses
    assert len(losses) == steps and all(np.isfinite(losses))
    return straight, log, losses


@pytest.mark.slow
def test_vqa_from_an_original_pth_learns_resumes_exactly_and_evaluates(data, tmp_path):
    """24 questions, 3 steps per epoch, 4 epochs; stopped after 5 steps (mid-epoch) and resumed."""
    from blip_fast import BlipForQuestionAnswering
    from blip_fast.cli import main

    output_dir, log, losses = _run_pair("vqa", data, "pretrain.pth", tmp_path, 12, 5, "--epochs", "4")
    assert "dropped what BlipForQuestionAnswering does not use" in log  # the .pth's ITC/ITM parts and queues
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5, losses
    export = output_dir / "export" / "vqa"
    model = BlipForQuestionAnswering.from_pretrained(export)
    assert torch.equal(model.state_dict()["text_decoder.cls.predictions.bias"],
                       _consolidated(output_dir, 12)["model.text_decoder.cls.predictions.bias"])

    inputs = ["evaluate", "--task", "vqa", "--model", str(export), "--annotations", str(data["v2_questions"]),
              str(data["v2_annotations"]), "--image-root", str(data["root"]), "--device", "cpu"]
    for mode in ("rank", "generate"):
        results, report = tmp_path / f"{mode}.json", tmp_path / f"{mode}-report.json"
        assert main([*inputs, "--mode", mode, "--answer-list", str(data["answers"]), "--rank-k", "8",
                     "--results", str(results), "--out", str(report)]) == 0
        answered = json.loads(results.read_text())
        assert [sorted(record) for record in answered] == [["answer", "question_id"]] * 12
        metrics = json.loads(report.read_text())["metrics"]
        assert 0.0 <= metrics["accuracy"] <= 100.0 and "accuracy_number" in metrics
        if mode == "rank":
            assert {record["answer"] for record in answered} <= set(synthetic.answer_list())


@pytest.mark.slow
def test_nlvr_from_an_original_pth_resumes_exactly_and_evaluates(data, tmp_path):
    """model_base_nlvr.pth's layout (7 text layers: the 7th merges the twin outputs); 16 statements, 2 steps per
    epoch, 3 epochs; stopped after 3 steps and resumed."""
    from blip_fast import BlipForNLVR
    from blip_fast.cli import main

    output_dir, _, _ = _run_pair("nlvr", data, "nlvr.pth", tmp_path, 6, 3, "--epochs", "3")
    export = output_dir / "export" / "nlvr"
    model = BlipForNLVR.from_pretrained(export)
    assert torch.equal(model.state_dict()["cls_head.2.weight"], _consolidated(output_dir, 6)["cls_head.2.weight"])
    report = tmp_path / "nlvr-report.json"
    assert main(["evaluate", "--task", "nlvr", "--model", str(export), "--annotations", str(data["nlvr_test"]),
                 "--image-root", str(data["root"]), "--device", "cpu", "--out", str(report)]) == 0
    written = json.loads(report.read_text())
    assert written["num_statements"] == 8 and 0.0 <= written["metrics"]["accuracy"] <= 100.0
    labels = [int(record["label"] == "True") for record in json.loads(Path(data["nlvr_test"]).read_text())]
    predictions = [record["prediction"] for record in written["predictions"]]
    assert written["metrics"]["accuracy"] == pytest.approx(100 * np.mean(np.equal(predictions, labels)))
