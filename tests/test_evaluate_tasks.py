"""``blip-fast evaluate --task vqa|nlvr`` on tiny random models: the answers are the model's own (ranking over the
answer list, generation), scored with the official accuracy, written as the official result file; NLVR2 accuracy is
the share of statements the head gets right; bad inputs are one clear error."""

import json

import pytest
import torch

from blip_fast.cli import main
from blip_fast.config import BlipConfig
from blip_fast.data import SyntheticNoisyDataset
from blip_fast.data import synthetic_tasks as synthetic
from blip_fast.data.nlvr import read_nlvr
from blip_fast.data.transforms import BlipImageProcessor, load_image
from blip_fast.data.vqa import read_vqa
from blip_fast.evaluate_nlvr import nlvr_accuracy
from blip_fast.evaluate_vqa import answer_questions
from blip_fast.modeling.blip import BlipForImageTextRetrieval, BlipForNLVR, BlipForQuestionAnswering
from blip_fast.tokenizer import BlipTokenizer, pre_caption, pre_question
from blip_fast.vqa_accuracy import vqa_accuracy
from tests.tiny_models import randomize_

IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Six synthetic scenes, their VQA questions and NLVR2 statements, and tiny random VQA and NLVR2 model dirs."""
    root = tmp_path_factory.mktemp("evaluate_tasks")
    scenes = SyntheticNoisyDataset(6, noise_fraction=0.0, seed=9, image_size=IMAGE_SIZE)
    scenes.write_blip_json(root, {"all": 6})
    vqa = synthetic.write_json(root / "vqa.json", synthetic.vqa_records(scenes, range(6), 2))
    nlvr = synthetic.write_json(root / "nlvr.json", synthetic.nlvr_records(scenes, range(6), 10))
    answers = synthetic.write_json(root / "answers.json", synthetic.answer_list())
    texts = [record["question"] for record in json.loads(vqa.read_text())] + synthetic.answer_list() + [
        record["sentence"] for record in json.loads(nlvr.read_text())]
    tokenizer = BlipTokenizer.train(texts, vocab_size=200)
    config = BlipConfig.tiny(image_size=IMAGE_SIZE).for_tokenizer(tokenizer)
    torch.manual_seed(0)
    for name, model in (("vqa_model", BlipForQuestionAnswering(config)), ("nlvr_model", BlipForNLVR(config))):
        randomize_(model).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        BlipImageProcessor(size=IMAGE_SIZE).save_pretrained(root / name)
    return {"root": root, "vqa": vqa, "nlvr": nlvr, "answers": answers, "tokenizer": tokenizer}


def _vqa_command(task_dir, *extra):
    return ["evaluate", "--task", "vqa", "--model", str(task_dir["root"] / "vqa_model"), "--annotations",
            str(task_dir["vqa"]), "--image-root", str(task_dir["root"]), "--device", "cpu", *extra]


@pytest.mark.parametrize("mode", ["rank", "generate"])
def test_vqa_answers_are_the_models_and_scored_officially(task_dir, tmp_path, mode):
    results, report = tmp_path / "results.json", tmp_path / "report.json"
    assert main(_vqa_command(task_dir, "--mode", mode, "--answer-list", str(task_dir["answers"]), "--rank-k", "5",
                             "--batch-size", "5", "--results", str(results), "--out", str(report))) == 0
    answered = json.loads(results.read_text())
    records = json.loads(task_dir["vqa"].read_text())
    assert [record["question_id"] for record in answered] == [record["question_id"] for record in records]
    assert all(sorted(record) == ["answer", "question_id"] for record in answered)

    model = BlipForQuestionAnswering.from_pretrained(task_dir["root"] / "vqa_model")
    tokenizer, processor = task_dir["tokenizer"], BlipImageProcessor(size=IMAGE_SIZE)
    pixel_values = processor([load_image(task_dir["root"] / record["image"]) for record in records]).pixel_values
    text = tokenizer([pre_question(record["question"]) for record in records], padding=True, return_tensors="pt")
    with torch.no_grad():
        if mode == "rank":  # every question at once, against the answer list tokenised once
            candidates = tokenizer(synthetic.answer_list(), padding=True, return_tensors="pt")
            best = model.rank_answers(text.input_ids, pixel_values, candidates.input_ids, candidates.attention_mask,
                                      attention_mask=text.attention_mask, k=5)
            expected = [synthetic.answer_list()[index] for index in best.tolist()]
        else:
            generated = model.generate(text.input_ids, pixel_values, attention_mask=text.attention_mask,
                                       num_beams=3, max_length=10, min_length=1)
            expected = tokenizer.batch_decode(generated, skip_special_tokens=True)
    assert [record["answer"] for record in answered] == expected
    scored = json.loads(report.read_text())["metrics"]
    official = vqa_accuracy({r["question_id"]: a for r, a in zip(records, expected)},
                            {r["question_id"]: r["answer"] for r in records},
                            {r["question_id"]: r["answer_type"] for r in records})
    assert scored["accuracy"] == pytest.approx(official["overall"])
    for name, value in official["per_answer_type"].items():
        assert scored[f"accuracy_{name}"] == pytest.approx(value)


def test_rank_with_k_at_least_the_list_ranks_every_candidate(task_dir):
    """k >= the answer list: the answer is the candidate of lowest (smoothed) answer loss among all."""
    model = BlipForQuestionAnswering.from_pretrained(task_dir["root"] / "vqa_model")
    questions = read_vqa(task_dir["vqa"], task_dir["root"])[:3]
    processor, answers = BlipImageProcessor(size=IMAGE_SIZE), synthetic.answer_list()
    every = answer_questions(model, task_dir["tokenizer"], processor, questions, "rank", answers, k=len(answers))
    assert every == answer_questions(model, task_dir["tokenizer"], processor, questions, "rank", answers, k=10_000)


def test_nlvr_accuracy_is_the_share_the_head_gets_right(task_dir, tmp_path):
    report = tmp_path / "nlvr.json"
    assert main(["evaluate", "--task", "nlvr", "--model", str(task_dir["root"] / "nlvr_model"), "--annotations",
                 str(task_dir["nlvr"]), "--image-root", str(task_dir["root"]), "--batch-size", "4", "--device",
                 "cpu", "--out", str(report)]) == 0
    written = json.loads(report.read_text())
    statements = read_nlvr(task_dir["nlvr"], task_dir["root"])
    model = BlipForNLVR.from_pretrained(task_dir["root"] / "nlvr_model")
    pixel_values = BlipImageProcessor(size=IMAGE_SIZE)(
        [load_image(path) for statement in statements for path in statement.images]).pixel_values
    text = task_dir["tokenizer"]([pre_caption(statement.sentence, 40) for statement in statements], padding=True,
                                 return_tensors="pt")
    with torch.no_grad():
        logits = model(text.input_ids, pixel_values.unflatten(0, (len(statements), 2)), text.attention_mask).logits
    predictions = logits.argmax(dim=1).tolist()
    assert [record["prediction"] for record in written["predictions"]] == predictions
    labels = [statement.label for statement in statements]
    assert written["metrics"]["accuracy"] == pytest.approx(nlvr_accuracy(predictions, labels))
    assert nlvr_accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 50.0


def test_bad_inputs_are_one_clear_error(task_dir, tmp_path, capsys):
    """User errors: one line ``blip-fast: error: ...`` naming the file or option, exit status 2."""
    def error_of(command):
        assert main(command) == 2
        return capsys.readouterr().err

    assert "rank mode needs --answer-list" in error_of(_vqa_command(task_dir, "--mode", "rank"))
    records = json.loads(task_dir["vqa"].read_text())
    broken = synthetic.write_json(tmp_path / "missing.json", [{**records[0], "image": "images/none.png"}])
    command = _vqa_command(task_dir, "--mode", "generate")
    command[command.index(str(task_dir["vqa"]))] = str(broken)
    assert "images/none.png' not found" in error_of(command)
    twice = synthetic.write_json(tmp_path / "twice.json", [records[0], records[0]])
    command[command.index(str(broken))] = str(twice)
    assert f"question_id {records[0]['question_id']} appears twice" in error_of(command)
    assert "reads one --annotations file, got 2" in error_of(
        ["evaluate", "--task", "caption", "--model", str(tmp_path), "--annotations", str(task_dir["vqa"]),
         str(task_dir["vqa"]), "--image-root", str(tmp_path)])
    assert "--answer-list and --results are for --task vqa" in error_of(
        ["evaluate", "--task", "nlvr", "--model", str(tmp_path), "--annotations", str(task_dir["nlvr"]),
         "--image-root", str(tmp_path), "--results", str(tmp_path / "r.json")])
    nlvr = synthetic.write_json(tmp_path / "nlvr.json", [{"images": ["a.png"], "sentence": "x", "label": "True"}])
    assert "nlvr.json[0]: 'images' must list two image paths" in error_of(
        ["evaluate", "--task", "nlvr", "--model", str(task_dir["root"] / "nlvr_model"), "--annotations", str(nlvr),
         "--image-root", str(tmp_path)])
    answers = synthetic.write_json(tmp_path / "answers.json", ["yes", "yes"])
    assert "answer list repeats answers" in error_of(_vqa_command(task_dir, "--answer-list", str(answers)))
    answers = synthetic.write_json(tmp_path / "blank.json", ["yes", " ", "no"])
    assert f"{answers}[1]: a blank answer" in error_of(_vqa_command(task_dir, "--answer-list", str(answers)))


@pytest.mark.parametrize("flag", ["--results", "--out"])
def test_an_output_over_an_input_is_refused_before_any_work(task_dir, capsys, flag):
    before = task_dir["vqa"].read_bytes()
    assert main(_vqa_command(task_dir, "--mode", "generate", flag, str(task_dir["vqa"]))) == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert f"{flag} {task_dir['vqa']} is one of the input files" in line
    assert task_dir["vqa"].read_bytes() == before


@pytest.mark.parametrize("task, model, found", [("vqa", "nlvr_model", "nlvr"), ("nlvr", "vqa_model", "vqa")])
def test_a_model_of_another_task_is_refused(task_dir, capsys, task, model, found):
    annotations = task_dir["vqa" if task == "vqa" else "nlvr"]
    assert main(["evaluate", "--task", task, "--model", str(task_dir["root"] / model), "--annotations",
                 str(annotations), "--image-root", str(task_dir["root"]), "--mode", "generate"]) == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert f"{model} is a {found} model (config.json names" in line and f"not a {task} model" in line


def test_nlvr_from_a_retrieval_checkpoint_is_refused_not_scored_with_a_random_head(task_dir, tmp_path, capsys):
    """A retrieval model fine-tunes into NLVR2 (each twin cross-attention from its one, the head fresh), so it
    loads as a BlipForNLVR; evaluating that would score a random head, differently on every run."""
    config = BlipConfig.tiny(image_size=IMAGE_SIZE).for_tokenizer(task_dir["tokenizer"])
    retrieval = tmp_path / "retrieval_model"
    BlipForImageTextRetrieval(config).save_pretrained(retrieval)
    task_dir["tokenizer"].save_pretrained(retrieval)
    assert main(["evaluate", "--task", "nlvr", "--model", str(retrieval), "--annotations", str(task_dir["nlvr"]),
                 "--image-root", str(task_dir["root"]), "--out", str(tmp_path / "report.json")]) == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert f"{retrieval} is no BlipForNLVR checkpoint: it lacks the cls_head, which would start random" in line
    assert not (tmp_path / "report.json").exists()


def test_out_and_results_naming_one_file_are_refused(task_dir, tmp_path, capsys):
    same = tmp_path / "both.json"
    assert main(_vqa_command(task_dir, "--mode", "generate", "--out", str(same), "--results", str(same))) == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert f"--out and --results name the same file {same}" in line and not same.exists()


def test_malformed_vqa_json_names_the_file_and_line(task_dir, tmp_path, capsys):
    broken = tmp_path / "vqa_broken.json"
    broken.write_text('[{"question": "what colour is the cube?", "image": "a.png",\n  "answer": ["red"]\n')
    command = _vqa_command(task_dir, "--mode", "generate")
    command[command.index(str(task_dir["vqa"]))] = str(broken)
    assert main(command) == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"blip-fast: error: cannot read annotations '{broken}'") and "line 3 column 1" in line
