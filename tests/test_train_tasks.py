"""VQA and NLVR2 fine-tuning: the task table's pieces in process (dataset -> collator -> inputs -> model, from the
oracle fixtures' tiny Salesforce checkpoints at 32 px), and one end-to-end test: ``deepspeed --module
blip_fast.train --task vqa --init_from ORIGINAL.pth``, its export scored by ``blip-fast evaluate --task vqa`` from
VQA v2's question + annotation files, in both modes, with the official result file checked against the official
accuracy; then ``--task nlvr`` the same way. (Exact resume is the training loop's, the same for every task:
tests/test_train*.py.)

The data: 12 synthetic scenes at 32 px; VQA questions (3 per image) and NLVR2 statements about the first 8, the
test questions and statements about the last 4.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blip_fast.data import SyntheticNoisyDataset
from blip_fast.data import synthetic_tasks as synthetic
from blip_fast.tokenizer import BlipTokenizer
from blip_fast.training import options, tasks
from blip_fast.vqa_accuracy import vqa_accuracy
from tests.test_train import CONFIGS, _consolidated, _metrics, _train

FIXTURES = Path(__file__).parent / "fixtures" / "original"
TRAIN_IMAGES, TEST_IMAGES = 8, 4
ORIGINAL = {"vqa": "pretrain.pth", "nlvr": "nlvr.pth"}  # model_base.pth's and model_base_nlvr.pth's layouts


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


def _flags(task: str, data: dict) -> list[str]:
    return ["--init_from", str(FIXTURES / ORIGINAL[task]), "--tokenizer_dir", str(FIXTURES), "--image_size", "32",
            "--annotations", str(data[f"{task}_train"]), "--image_root", str(data["root"]),
            "--max_text_length", "35", "--init_lr", "1e-3", "--seed", "3"]


@pytest.mark.parametrize("task", ["vqa", "nlvr"])
def test_the_task_table_trains_its_model_on_its_own_data(task, data):
    """What ``blip_fast.train`` composes for ``--task vqa|nlvr``, one batch through it: the loss is the model's own
    (NLVR2: cross-entropy of ``BlipForNLVR``'s logits, recomputed here) and a few AdamW steps on the batch lower it."""
    args = options.parse_args(["--config", str(CONFIGS / f"base-{task}.yaml"), "--task", task, *_flags(task, data),
                               "--deepspeed_config", str(CONFIGS / "ds_zero2.json")])
    table = tasks.TASKS[task]
    source = tasks.InitSource(args.init_from, args.tokenizer_dir)
    tokenizer = BlipTokenizer.from_pretrained(source.tokenizer_dir)
    torch.manual_seed(0)
    trainer = table.build_model(source.run_config(args, tokenizer), args, source, tokenizer).eval()  # no dropout
    dataset = table.dataset(args, 32)
    batch = table.collator(tokenizer, args)([dataset[index] for index in range(6)])
    inputs = table.forward_inputs(batch, None)
    if task == "nlvr":
        assert batch["pixel_values"].shape == (6, 2, 3, 32, 32) and set(batch["labels"].tolist()) <= {0, 1}
        with torch.no_grad():
            output = trainer(**inputs)
            logits = trainer(batch["input_ids"], batch["pixel_values"], batch["attention_mask"]).logits
        torch.testing.assert_close(output.loss, F.cross_entropy(logits, batch["labels"]), rtol=1e-6, atol=1e-6)
    else:
        assert int(batch["answers_per_question"].sum()) == len(batch["answer_ids"]) == len(batch["answer_weights"])
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        loss = trainer(**inputs).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses


@pytest.mark.parametrize("task", ["vqa", "nlvr"])
def test_gpu_decode_is_refused_for_tasks_with_their_own_datasets(task, data, monkeypatch):
    """Their datasets hand the DataLoader decoded pixels, never the encoded images the GPU input path needs; the
    default stays off for them even where nvJPEG is there."""
    import blip_fast.data.tensor_transforms as tensor_transforms

    monkeypatch.setattr(tensor_transforms, "nvjpeg_available", lambda: True)
    argv = ["--config", str(CONFIGS / f"base-{task}.yaml"), "--task", task, *_flags(task, data),
            "--deepspeed_config", str(CONFIGS / "ds_zero2.json")]
    assert options.parse_args(argv).gpu_decode is False
    with pytest.raises(options.ConfigError, match=f"gpu_decode is for the image-text tasks; task {task}"):
        options.parse_args([*argv, "--gpu_decode"])


@pytest.mark.slow
def test_vqa_and_nlvr_from_original_pths_then_evaluate(data, tmp_path):
    """VQA under the deepspeed launcher, 2 ranks x 4 questions, 24 questions: 3 steps from model_base.pth's layout;
    the export is the trained weights, and ``blip-fast evaluate`` writes the official result file, scored as the
    official VQA accuracy scores it. NLVR2 (one rank, 2 steps from model_base_nlvr.pth's layout): its export's
    accuracy is the share of its own predictions that match the labels."""
    from blip_fast import BlipForNLVR, BlipForQuestionAnswering
    from blip_fast.cli import main

    output_dir = tmp_path / "vqa"
    log = _train("deepspeed", output_dir, *_flags("vqa", data), "--deepspeed_config",
                 str(CONFIGS / "ds_zero2.json"), "--micro_batch_size", "4", "--num_workers", "0", "--epochs", "1",
                 "--log_every_steps", "1", "--save_every_steps", "100", config=CONFIGS / "base-vqa.yaml")
    assert "dropped what BlipForQuestionAnswering does not use" in log  # the .pth's ITC/ITM parts and queues
    losses = [record["loss"] for record in _metrics(output_dir)]
    assert len(losses) == 3 and np.isfinite(losses).all(), losses
    export = output_dir / "export" / "vqa"
    state = BlipForQuestionAnswering.from_pretrained(export).state_dict()
    trained = _consolidated(output_dir, 3)
    for key in ("text_decoder.cls.predictions.bias", "text_encoder.encoder.layer.0.crossattention.self.query.weight"):
        assert torch.equal(state[key], trained[f"model.{key}"]), key

    annotations = json.loads(Path(data["v2_annotations"]).read_text())["annotations"]
    humans = {record["question_id"]: [answer["answer"] for answer in record["answers"]] for record in annotations}
    types = {record["question_id"]: record["answer_type"] for record in annotations}
    for mode in ("rank", "generate"):
        results, report = tmp_path / f"{mode}.json", tmp_path / f"{mode}-report.json"
        assert main(["evaluate", "--task", "vqa", "--model", str(export), "--annotations", str(data["v2_questions"]),
                     str(data["v2_annotations"]), "--image-root", str(data["root"]), "--device", "cpu", "--mode",
                     mode, "--answer-list", str(data["answers"]), "--rank-k", "8", "--results", str(results),
                     "--out", str(report)]) == 0
        answered = json.loads(results.read_text())
        assert [sorted(record) for record in answered] == [["answer", "question_id"]] * len(humans)
        official = vqa_accuracy({record["question_id"]: record["answer"] for record in answered}, humans, types)
        metrics = json.loads(report.read_text())["metrics"]
        assert metrics["accuracy"] == pytest.approx(official["overall"])
        assert metrics["accuracy_number"] == pytest.approx(official["per_answer_type"]["number"])
        if mode == "rank":
            assert {record["answer"] for record in answered} <= set(synthetic.answer_list())

    output_dir = tmp_path / "nlvr"
    _train("python", output_dir, *_flags("nlvr", data), "--deepspeed_config", str(CONFIGS / "ds_zero2.json"),
           "--micro_batch_size", "8", "--num_workers", "0", "--max_steps", "2", "--log_every_steps", "1",
           "--save_every_steps", "100", config=CONFIGS / "base-nlvr.yaml")
    assert len(_metrics(output_dir)) == 2
    export = output_dir / "export" / "nlvr"
    assert torch.equal(BlipForNLVR.from_pretrained(export).state_dict()["cls_head.2.weight"],
                       _consolidated(output_dir, 2)["cls_head.2.weight"])
    report = tmp_path / "nlvr-report.json"
    assert main(["evaluate", "--task", "nlvr", "--model", str(export), "--annotations", str(data["nlvr_test"]),
                 "--image-root", str(data["root"]), "--device", "cpu", "--out", str(report)]) == 0
    written = json.loads(report.read_text())
    labels = [int(record["label"] == "True") for record in json.loads(Path(data["nlvr_test"]).read_text())]
    predictions = [record["prediction"] for record in written["predictions"]]
    assert written["num_statements"] == 8 == len(predictions)
    assert written["metrics"]["accuracy"] == pytest.approx(100 * np.mean(np.equal(predictions, labels)))
