"""Ordinary mistakes as a user makes them: each is one line on stderr (``blip-fast: error: ...``), exit status 2,
no traceback, and found before any work. Also: a model of the wrong task is refused naming the task it is, and
``convert`` refuses what it would otherwise guess or mix (issue 11, items 6, 7, 9)."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blip_fast import errors
from blip_fast.cli import build_parser, main
from blip_fast.config import BlipConfig
from blip_fast.data.synthetic import SyntheticNoisyDataset
from blip_fast.data.transforms import BlipImageProcessor
from blip_fast.modeling.blip import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipForQuestionAnswering
from blip_fast.tokenizer import BlipTokenizer
from tests.cli_runs import assert_user_error, run
from tests.tiny_models import save_tiny_captioner, to_original_key

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny captioner, filter (retrieval) and VQA model sharing one tokenizer; three images and a test json."""
    root = tmp_path_factory.mktemp("user_errors")
    synthetic = SyntheticNoisyDataset(3, noise_fraction=0.0, seed=0)
    annotations = synthetic.write_images(root / "data")
    records = json.loads(annotations.read_text())
    captioner = save_tiny_captioner(root, [record["caption"] for record in records])
    tokenizer = BlipTokenizer.from_pretrained(captioner)
    config = BlipConfig.tiny(image_size=64).for_tokenizer(tokenizer)
    dirs = {"captioner": captioner}
    for name, model_cls in [("filter", BlipForImageTextRetrieval), ("vqa", BlipForQuestionAnswering)]:
        model_cls(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        BlipImageProcessor(size=64).save_pretrained(root / name)
        dirs[name] = root / name
    return {**dirs, "root": root, "annotations": annotations, "image_root": root / "data",
            "image": root / "data" / records[0]["image"]}


def _bad_arguments(models):
    caption = ["caption", models["image"], "--model", models["captioner"]]
    evaluate = ["evaluate", "--task", "retrieval", "--model", models["filter"], "--annotations", models["annotations"],
                "--image-root", models["image_root"]]
    capfilt = ["capfilt", "--captioner", models["captioner"], "--filter", models["filter"], "--input",
               models["annotations"], "--image-root", models["image_root"]]
    return {
        "beams 0": ([*caption, "--beams", "0"], "--beams: must be >= 1, got 0"),
        "batch size 0": ([*caption, "--batch-size", "0"], "--batch-size: must be >= 1"),
        "top-p 1.5": ([*caption, "--sample", "--top-p", "1.5"], "--top-p: must lie in (0, 1]"),
        "max length 0": ([*caption, "--max-length", "0"], "--max-length: must be >= 1"),
        "max length past the positions": ([*caption, "--max-length", "1000"], "exceeds the 64 text positions"),
        "device banana": ([*caption, "--device", "banana"], "'banana' is not a device"),
        "missing model": (["caption", models["image"], "--model", models["root"] / "nope"], "nope: no such directory"),
        "model is a file": (["caption", models["image"], "--model", models["image"]], "is a file, not a directory"),
        "capfilt output is a file": ([*capfilt, "--output", models["image"]], "is a file; give a folder"),
        "capfilt workers -1": ([*capfilt, "--output", models["root"] / "o", "--workers", "-1"], "--workers"),
        "capfilt threshold 1": ([*capfilt, "--output", models["root"] / "o", "--threshold", "1"], "--threshold"),
        "capfilt fewer beams than captions": ([*capfilt, "--output", models["root"] / "o", "--num-captions", "3",
                                               "--beams", "2"], "num_beams must be >= num_captions (3)"),
        "k-test 0": ([*evaluate, "--k-test", "0"], "--k-test: must be >= 1, got 0"),
        "k-test -5": ([*evaluate, "--k-test", "-5"], "--k-test: must be >= 1, got -5"),
        "evaluate out is a folder": ([*evaluate, "--out", models["root"]], "is a directory; give a file name"),
        "missing annotations": ([*evaluate[:6], models["root"] / "none.json", *evaluate[7:]], "none.json: no such file"),
        "demo out-dir is a file": (["demo", "--out-dir", models["image"]], "is a file"),
        "demo seeds 0": (["demo", "--out-dir", models["root"] / "d", "--seeds", "0"], "--seeds: must be >= 1, got 0"),
        "demo seed -1": (["demo", "--out-dir", models["root"] / "d", "--seed", "-1"], "--seed: must be >= 0, got -1"),
    }


CASES = [
    "beams 0", "batch size 0", "top-p 1.5", "max length 0", "max length past the positions", "device banana",
    "missing model", "model is a file", "capfilt output is a file", "capfilt workers -1", "capfilt threshold 1",
    "capfilt fewer beams than captions",
    "k-test 0", "k-test -5", "evaluate out is a folder", "missing annotations", "demo out-dir is a file",
    "demo seeds 0", "demo seed -1",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_argument_is_one_line_and_exit_2(models, case, capsys, monkeypatch):
    from blip_fast.captioning import Captioner

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the argument was checked")

    monkeypatch.setattr(Captioner, "caption", no_work)
    argv, fragment = _bad_arguments(models)[case]
    assert_user_error(*run(argv, capsys), fragment)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_on_a_cpu_torch(models, capsys):
    code, stderr = run(["caption", models["image"], "--model", models["captioner"], "--device", "cuda"], capsys)
    assert_user_error(code, stderr, "device 'cuda' is not available here")


def test_a_folder_above_the_models_names_the_model_folders_in_it(models, tmp_path, capsys):
    """A run's folder given for the model it exported (``<run>/export/<task>``): the error lists what is there."""
    expected = ", ".join(sorted(str(models[name]) for name in ("captioner", "filter", "vqa")))
    assert_user_error(*run(["caption", models["image"], "--model", models["root"]], capsys),
                      f"no config.json at {models['root'] / 'config.json'}; model folders inside it: {expected}")
    run_dir = tmp_path / "run"
    for task in ("retrieval", "captioning"):
        (run_dir / "export" / task).mkdir(parents=True)
        (run_dir / "export" / task / "config.json").write_text("{}")
    (run_dir / "checkpoints" / "global_step5").mkdir(parents=True)
    assert_user_error(*run(["caption", models["image"], "--model", run_dir], capsys),
                      f"model folders inside it: {run_dir}/export/captioning, {run_dir}/export/retrieval")
    (run_dir / "images").mkdir()
    code, stderr = run(["caption", models["image"], "--model", run_dir / "images"], capsys)
    assert_user_error(code, stderr, f"no config.json at {run_dir / 'images' / 'config.json'}")
    assert "inside it" not in stderr


def test_corrupt_checkpoint(models, tmp_path, capsys):
    corrupt = tmp_path / "model.pth"
    corrupt.write_bytes(b"PK\x03\x04 not a checkpoint")
    assert_user_error(*run(["convert", corrupt, tmp_path / "out"], capsys), f"cannot read {corrupt}")


def _namespace_checkpoint(path):
    torch.save({"model": {"x": torch.ones(1)}, "args": argparse.Namespace(lr=1e-4)}, path)


@pytest.mark.parametrize("name,write,fragment", [
    ("annotations.pth", lambda path: path.write_text('[{"image": "a.jpg", "caption": "a dog"}]'),
     "not a PyTorch checkpoint (torch.save writes a zip archive or a pickle) nor a safetensors file"),
    ("empty.pth", lambda path: path.write_bytes(b""), "the file is empty"),
    ("args.pth", _namespace_checkpoint, "it holds Python objects beyond tensors and plain containers "
     "(argparse.Namespace), which blip_fast does not unpickle"),
    ("model.safetensors", lambda path: path.write_text("{}" * 10), "SafetensorError"),
])
def test_a_file_that_is_no_checkpoint_is_one_line_saying_what_it_is(tmp_path, capsys, name, write, fragment):
    """Not torch's page-long weights-only refusal, whose advice (unpickle it in full) blip_fast never follows."""
    path = tmp_path / name
    write(path)
    assert_user_error(*run(["convert", path, tmp_path / "out"], capsys), f"cannot read {path}: {fragment}")
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(models, capsys, monkeypatch):
    argv = ["caption", models["image"], "--model", models["captioner"], "--max-length", "1000"]
    with pytest.raises(errors.UserError, match="exceeds the 64 text positions"):
        main([str(arg) for arg in [*argv, "--debug"]])
    monkeypatch.setenv(errors.DEBUG_ENV, "1")
    with pytest.raises(errors.UserError):
        main([str(arg) for arg in argv])


def test_evaluation_results_are_written_before_they_are_printed(models, tmp_path, capsys):
    out = tmp_path / "new" / "metrics.json"
    argv = ["evaluate", "--task", "retrieval", "--model", models["filter"], "--annotations", models["annotations"],
            "--image-root", models["image_root"], "--k-test", "2", "--out", out]
    assert run(argv, capsys)[0] == 0
    assert json.loads(out.read_text())["k_test"] == 2
    assert run([*argv[:-3], "3", "--out", out], capsys)[0] == 0  # a rerun replaces its own report
    assert json.loads(out.read_text())["k_test"] == 3


@pytest.mark.parametrize("flag", ["--out", "--results"])
@pytest.mark.parametrize("victim", ["a model's config.json", "another json", "a text file", "an empty file",
                                    "the other flag's kind of file"])
def test_evaluation_output_over_a_file_it_did_not_write_is_refused(models, tmp_path, capsys, flag, victim):
    """`--out` replaces only an earlier evaluation report and `--results` only a VQA result file: anything else
    (here the captioner's config.json, which evaluating the VQA model does not read) stays as it was."""
    other_kind = [{"question_id": 1, "answer": "two"}] if flag == "--out" else {"task": "vqa", "num_questions": 1}
    path = {"a model's config.json": models["captioner"] / "config.json", "another json": tmp_path / "a.json",
            "a text file": tmp_path / "notes.txt", "an empty file": tmp_path / "empty.json",
            "the other flag's kind of file": tmp_path / "other.json"}[victim]
    content = {"another json": '{"a": 1}', "a text file": "notes", "an empty file": "",
               "the other flag's kind of file": json.dumps(other_kind)}.get(victim)
    if content is not None:
        path.write_text(content)
    before = path.read_bytes()
    argv = ["evaluate", "--task", "vqa", "--model", models["vqa"], "--annotations", models["annotations"],
            "--image-root", models["image_root"], flag, path]
    assert_user_error(*run(argv, capsys), f"{flag} {path} exists and is not a file this command wrote")
    assert path.read_bytes() == before


def test_training_config_error_is_one_line(tmp_path, capsys):
    from blip_fast.train import main as train_main

    config = tmp_path / "run.yaml"
    config.write_text("deepspeed_config: nowhere.json\nqueue_size: 8\n")
    code = train_main(["--config", str(config)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("blip_fast.train: error: ds_config nowhere.json does not exist (looked in the working "
                               f"directory {os.getcwd()} and next to {config}")
    code = train_main(["--config", str(config), "--queue_size", "0"])
    assert code == 2 and capsys.readouterr().err.strip() == "blip_fast.train: error: queue_size must be > 0, got 0"


@pytest.mark.parametrize("spelled", ["same", "trailing slash", "relative"])
def test_fine_tuning_into_the_folder_it_starts_from_is_refused(tmp_path, capsys, monkeypatch, spelled):
    """``--output_dir`` the ``--init_from`` folder (however spelled) would write over the model being read."""
    from blip_fast.train import main as train_main

    model = tmp_path / "pretrain"
    model.mkdir()
    monkeypatch.chdir(tmp_path)
    output = {"same": str(model), "trailing slash": f"{model}/", "relative": "./pretrain"}[spelled]
    code = train_main(["--task", "captioning", "--init_from", str(model), "--output_dir", output])
    assert code == 2 and capsys.readouterr().err.strip() == (
        f"blip_fast.train: error: output_dir {output} is the init_from model's folder: this run's checkpoints, "
        "config and tokenizer would go over the model it starts from; choose another output_dir")
    assert list(model.iterdir()) == []


@pytest.mark.parametrize("command", ["demo", "train"])
def test_a_folder_of_other_files_is_no_output_folder(tmp_path, capsys, command):
    """``--out-dir ~`` or ``--output_dir .`` by a tired user: one line, exit 2, and the folder's files untouched
    (the demo would write results.json and data/ among them, training config.yaml)."""
    from blip_fast.train import main as train_main

    (tmp_path / "config.yaml").write_text("mine: 1\n")
    (tmp_path / "results.json").write_text("{}")
    if command == "demo":
        code = main(["demo", "--scale", "tiny", "--out-dir", str(tmp_path)])
    else:
        code = train_main(["--config", str(ROOT / "configs" / "tiny-cpu.yaml"), "--output_dir", str(tmp_path),
                           "--deepspeed_config", str(ROOT / "configs" / "ds_zero2.json")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and f"{tmp_path} holds other files (config.yaml, results.json): this run would write among " in error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.yaml", "results.json"]
    assert (tmp_path / "config.yaml").read_text() == "mine: 1\n"


@pytest.mark.parametrize("records, expected", [
    ([{"caption": "no image"}], "every record was skipped (1 bad_record; the warnings above name the first ones), so "
                                "there is nothing to train on"),
    ([{"image": "x.png", "caption": "a"}, {"image": "y.png", "caption": ["b", "c"]}],
     "every record was skipped (2 missing_image; the warnings above name the first ones), so there is nothing to "
     "train on: are the image paths relative to --image_root"),
    ([], "holds no training sample"),
])
def test_a_training_set_with_no_usable_sample_is_one_line(tmp_path, capsys, records, expected):
    """A wrong --image_root (every image missing) or records without images: one line saying so and where to look,
    not the sampler's "dataset is empty" traceback."""
    from blip_fast.train import main as train_main

    annotations = tmp_path / "train.json"
    annotations.write_text(json.dumps(records))
    code = train_main(["--config", str(ROOT / "configs" / "tiny-cpu.yaml"), "--output_dir", str(tmp_path / "out"),
                       "--deepspeed_config", str(ROOT / "configs" / "ds_zero2.json"), "--data", "blip_json",
                       "--annotations", str(annotations), "--image_root", str(tmp_path / "images")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("blip_fast.train: error:")]
    assert code == 2 and lines == [f"blip_fast.train: error: {annotations}{':' if records else ''} {expected}"
                                   + (f" {str(tmp_path / 'images')!r}?" if "image_root" in expected else "")]


def test_a_training_set_smaller_than_one_step_is_one_line_before_the_model(tmp_path, capsys):
    """Three images against a step of 2 ranks x 8: one line saying what a step takes (the sampler raised a
    traceback after the model was built)."""
    import PIL.Image

    from blip_fast.train import main as train_main

    for name in ("a.png", "b.png", "c.png"):
        PIL.Image.new("RGB", (16, 16)).save(tmp_path / name)
    annotations = tmp_path / "train.json"
    annotations.write_text(json.dumps([{"image": name, "caption": "a red circle"} for name in ("a.png", "b.png", "c.png")]))
    (tmp_path / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 4,
                                                  "gradient_accumulation_steps": 2}))
    code = train_main(["--config", str(ROOT / "configs" / "tiny-cpu.yaml"), "--output_dir", str(tmp_path / "out"),
                       "--deepspeed_config", str(tmp_path / "ds.json"), "--data", "blip_json",
                       "--annotations", str(annotations), "--image_root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "trained a WordPiece vocab" not in err
    assert (f"blip_fast.train: error: {annotations}: 3 training samples do not fill one optimizer step of 8 (ranks x "
            "micro batch x gradient accumulation)") in err


@pytest.mark.parametrize("name, expected", [("trian.json", "no such file"),
                                            ("images", "no such file (it is a folder: name the json files in it)")])
def test_a_missing_annotation_file_is_one_line_before_any_output(tmp_path, capsys, name, expected):
    """A typo'd --annotations: refused while parsing, before DeepSpeed starts or the output folder is made."""
    from blip_fast.train import main as train_main

    (tmp_path / "train.json").write_text("[]")
    (tmp_path / "images").mkdir()
    code = train_main(["--config", str(ROOT / "configs" / "tiny-cpu.yaml"), "--output_dir", str(tmp_path / "out"),
                       "--deepspeed_config", str(ROOT / "configs" / "ds_zero2.json"), "--data", "blip_json",
                       "--annotations", str(tmp_path / "train.json"), str(tmp_path / name),
                       "--image_root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and f"blip_fast.train: error: annotations {tmp_path / name}: {expected}" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["train", "export"])
def test_a_file_as_the_output_folder_is_one_line_before_any_work(tmp_path, capsys, command):
    """``--output_dir notes.txt`` (training) or ``--out model.safetensors`` (export): refused while parsing, the file
    untouched; training failed on the mkdir after DeepSpeed started, export after loading the checkpoint."""
    from blip_fast.train import main as train_main

    victim = tmp_path / "notes.txt"
    victim.write_text("mine\n")
    if command == "train":
        argv = ["--config", str(ROOT / "configs" / "tiny-cpu.yaml"), "--output_dir", str(victim),
                "--deepspeed_config", str(ROOT / "configs" / "ds_zero2.json")]
        expected = f"blip_fast.train: error: output_dir {victim} is a file; give a folder (new or empty)"
    else:
        argv = ["export", "--checkpoint", str(tmp_path), "--out", str(victim)]
        expected = f"error: argument --out: {victim} is a file; give a folder (new or empty)"
    try:
        code = train_main(argv)
    except SystemExit as exit_:  # argparse's exit
        code = exit_.code
    assert code == 2 and expected in capsys.readouterr().err
    assert victim.read_text() == "mine\n"


def test_a_truncated_annotation_file_is_one_line_naming_it(tmp_path, capsys):
    """A json cut short by a full disk: one line naming the file and where it ends, not json's traceback."""
    from blip_fast.train import main as train_main

    annotations = tmp_path / "train.json"
    annotations.write_text('[{"image": "a.png", "caption": "a red circle"},\n')
    code = train_main(["--config", str(ROOT / "configs" / "tiny-cpu.yaml"), "--output_dir", str(tmp_path / "out"),
                       "--deepspeed_config", str(ROOT / "configs" / "ds_zero2.json"), "--data", "blip_json",
                       "--annotations", str(annotations), "--image_root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"blip_fast.train: error: {annotations}, line 2 column 1: not valid json (Expecting value)" in err


# ---------------------------------------------------------------------------------------------------- item 9: --help
@pytest.mark.parametrize("command", ["caption", "capfilt", "evaluate", "convert", "demo"])
def test_help_shows_the_defaults(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    expected = {"caption": "(default: 3)", "capfilt": "(default: 0.05)", "evaluate": "(default: 256)",
                "convert": "(default: auto)", "demo": "about 10 minutes"}[command]
    assert expected in text


def test_default_workers_fit_the_machine():
    from blip_fast.data.workers import default_workers, usable_cpus

    assert 1 <= default_workers() <= min(4, usable_cpus())
    assert build_parser().parse_args(["capfilt", "--captioner", ".", "--filter", ".", "--input", "x", "--output",
                                      "o"]).workers == default_workers()


# ---------------------------------------------------------------------------------------------------- argparse types
@pytest.mark.parametrize("kind,text,ok", [
    (errors.positive_int, "1", True), (errors.positive_int, "0", False), (errors.positive_int, "2.5", False),
    (errors.non_negative_int, "0", True), (errors.non_negative_int, "-1", False),
    (errors.float_in(0, 1, low_open=True), "1", True), (errors.float_in(0, 1, low_open=True), "0", False),
    (errors.float_in(0, 1, high_open=True), "1", False), (errors.float_in(0, 1), "nan", False),
    (errors.float_in(0, 1), "inf", False), (errors.float_in(0, 1), "x", False),
    (errors.device_spec, "cpu", True), (errors.device_spec, "auto", True), (errors.device_spec, "meta", False),
    (errors.device_spec, "cuda:x", False),
])
def test_argument_types(kind, text, ok):
    if ok:
        kind(text)
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            kind(text)


# ---------------------------------------------------------------------------------------------------- item 7
def test_vqa_model_is_refused_as_captioner(models, capsys):
    code, stderr = run(["caption", models["image"], "--model", models["vqa"]], capsys)
    assert_user_error(code, stderr, "is a vqa model (config.json names BlipForQuestionAnswering), not a captioning")


@pytest.mark.parametrize("hf_class", ["BlipModel", "BlipVisionModel"])
def test_a_transformers_model_without_blip_task_heads_is_named_not_listed_key_by_key(models, tmp_path, capsys,
                                                                                      hf_class):
    """HF's BlipModel (the ITC encoders alone) or its ViT alone, saved by transformers, passed as a captioner or a
    filter: one line naming what it is, where the loader listed 100+ unexpected tensors or raised a traceback."""
    import transformers
    from tiny_models import tiny_hf_config

    config = tiny_hf_config()
    model = getattr(transformers, hf_class)(config.vision_config if hf_class == "BlipVisionModel" else config)
    model.save_pretrained(tmp_path / "hf")
    capsys.readouterr()  # transformers' deprecation notice for BlipModel
    if hf_class == "BlipModel":  # a blip model_type: named by its architectures
        expected = [f"holds a {hf_class} (config.json's architectures), which is not one of BLIP's task models"]
        wanted = {"caption": "use a captioning checkpoint (BlipForConditionalGeneration) here",
                  "retrieval": "use a retrieval checkpoint (BlipForImageTextRetrieval) here"}
    else:  # one tower alone: another model_type
        expected = [f"{tmp_path / 'hf' / 'config.json'} has model_type 'blip_vision_model', not 'blip': no BLIP model"]
        wanted = {"caption": "", "retrieval": ""}
    caption = run(["caption", models["image"], "--model", tmp_path / "hf"], capsys)
    assert_user_error(*caption, *expected, wanted["caption"])
    retrieval = run(["evaluate", "--task", "retrieval", "--model", tmp_path / "hf", "--annotations",
                     models["annotations"], "--image-root", models["image_root"]], capsys)
    assert_user_error(*retrieval, *expected, wanted["retrieval"])


def test_another_models_tokenizer_in_a_model_folder_is_refused(models, bert_vocab_dir, tmp_path, capsys):
    """A captioner folder whose tokenizer files were swapped for bert-base-uncased's (a copy from the wrong folder):
    its ids select other embedding rows, and the captions were nonsense without an error."""
    import shutil

    folder = tmp_path / "captioner"
    shutil.copytree(models["captioner"], folder)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    shutil.copy(bert_vocab_dir / "vocab.txt", folder / "vocab.txt")
    assert_user_error(*run(["caption", models["image"], "--model", folder], capsys),
                      f"the tokenizer in {folder} does not fit its model ([DEC] is id 30522 here")


def test_vqa_model_is_refused_as_capfilt_captioner(models, tmp_path, capsys):
    argv = ["capfilt", "--captioner", models["vqa"], "--filter", models["filter"], "--input", models["annotations"],
            "--image-root", models["image_root"], "--output", tmp_path / "out", "--workers", "0", "--no-progress"]
    assert_user_error(*run(argv, capsys), "is a vqa model")
    argv[2] = argv[4] = models["captioner"]  # a captioner as the filter
    assert_user_error(*run(argv, capsys), "is a captioning model", "not a retrieval model")


def _original_pth(path, model):
    torch.save({"model": {to_original_key(key): value for key, value in model.state_dict().items()}}, path)
    return path


def test_convert_detects_and_names_the_task(models, tmp_path, capsys):
    """An ITM checkpoint converts as retrieval without --task, and --task captioning is refused naming it."""
    pth = _original_pth(tmp_path / "itm.pth", BlipForImageTextRetrieval.from_pretrained(models["filter"]))
    code, stderr = run(["convert", pth, tmp_path / "out", "--task", "captioning", "--config", models["filter"]], capsys)
    assert_user_error(code, stderr, "is a retrieval checkpoint, not a captioning one: pass --task retrieval")
    code = run(["convert", pth, tmp_path / "out", "--config", models["filter"], "--tokenizer", models["filter"]],
               capsys)[0]
    assert code == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["BlipForImageTextRetrieval"]


def test_convert_refuses_to_guess_heads(models, tmp_path, capsys):
    """The tiny model is 128 wide with 4 heads; the weights cannot tell 4 from 2 (BLIP's 64-d guess)."""
    source = BlipForConditionalGeneration.from_pretrained(models["captioner"])
    pth = _original_pth(tmp_path / "cap.pth", source)
    code, stderr = run(["convert", pth, tmp_path / "guessed"], capsys)
    assert_user_error(code, stderr, "is 128 wide; its number of attention heads is not in the weights")
    assert not (tmp_path / "guessed").exists()

    assert run(["convert", pth, tmp_path / "heads", "--heads", "4", "--tokenizer", models["captioner"]], capsys)[0] == 0
    converted = json.loads((tmp_path / "heads" / "config.json").read_text())
    assert converted["vision_config"]["num_attention_heads"] == converted["text_config"]["num_attention_heads"] == 4

    med_config = tmp_path / "med_config.json"  # the original repository's BERT config for the text model
    med_config.write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 128,
                                      "num_attention_heads": 4, "num_hidden_layers": 4, "encoder_width": 128,
                                      "add_cross_attention": True}))
    assert_user_error(*run(["convert", pth, tmp_path / "med", "--config", med_config], capsys),
                      "vision transformer is 128 wide")
    assert run(["convert", pth, tmp_path / "med", "--config", med_config, "--heads", "4"], capsys)[0] == 0
    assert json.loads((tmp_path / "med" / "config.json").read_text())["text_config"]["num_attention_heads"] == 4


def test_convert_refuses_a_folder_with_files(models, tmp_path, capsys):
    pth = _original_pth(tmp_path / "cap.pth", BlipForConditionalGeneration.from_pretrained(models["captioner"]))
    out = tmp_path / "old_model"
    out.mkdir()
    (out / "vocab.txt").write_text("[PAD]\nold\n")
    code, stderr = run(["convert", pth, out, "--config", models["captioner"]], capsys)
    assert_user_error(code, stderr, f"{out} is not empty")
    assert sorted(path.name for path in out.iterdir()) == ["vocab.txt"]


def test_convert_of_a_pretraining_checkpoint_needs_a_task(models, tmp_path, capsys):
    state = {**BlipForQuestionAnswering.from_pretrained(models["vqa"]).state_dict(),
             **BlipForImageTextRetrieval.from_pretrained(models["filter"]).state_dict()}
    pth = tmp_path / "model_base.pth"
    torch.save({"model": {to_original_key(key): value for key, value in state.items()}}, pth)
    assert_user_error(*run(["convert", pth, tmp_path / "out", "--config", models["vqa"]], capsys),
                      "is a pre-training checkpoint", "--task")
    assert run(["convert", pth, tmp_path / "out", "--config", models["vqa"], "--task", "vqa"], capsys)[0] == 0


@pytest.mark.parametrize("raised, status, lines", [
    (errors.InvalidInputError("queue_size 50 is no multiple of 16"), errors.EXIT_USER_ERROR,
     ["prog: error: queue_size 50 is no multiple of 16"]),
    (PermissionError("cannot write out/"), errors.EXIT_FAILED,
     ["prog: error: cannot write out/", f"prog: (set {errors.DEBUG_ENV}=1 for the traceback)"]),
])
def test_a_rank_that_does_not_report_says_its_error_after_the_wait(capsys, monkeypatch, raised, status, lines):
    """The wait comes before the line (the reporting rank's line first); a rank still running after it failed alone."""
    waits = []

    def sleep(seconds):
        waits.append((seconds, capsys.readouterr().err))

    def fail(argv):
        raise raised

    monkeypatch.setattr(errors.time, "sleep", sleep)
    assert errors.run_main(fail, [], "prog", delay_s=7.5) == status
    assert waits == [(7.5, "")] and capsys.readouterr().err.splitlines() == lines


@pytest.mark.parametrize("signal_error", [KeyboardInterrupt, errors.Terminated])
def test_a_signal_in_the_wait_stops_the_rank_without_a_line(capsys, monkeypatch, signal_error):
    def sleep(seconds):
        raise signal_error()

    def fail(argv):
        raise errors.InvalidInputError("bad")

    monkeypatch.setattr(errors.time, "sleep", sleep)
    assert errors.run_main(fail, [], "prog", delay_s=1.0) == errors.EXIT_USER_ERROR
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("delay_s, expected", [(0.0, "prog: interrupted\n"), (1.0, "")])
def test_only_the_reporting_rank_says_it_was_interrupted(capsys, delay_s, expected):
    def interrupted(argv):
        raise KeyboardInterrupt

    assert errors.run_main(interrupted, [], "prog", delay_s=delay_s) == 130
    assert capsys.readouterr().err == expected


@pytest.mark.parametrize("local_rank, delay_s", [(None, 0.0), ("0", 0.0), ("1", errors.FOLLOWER_REPORT_DELAY_S)])
def test_report_delay_follows_the_local_rank(monkeypatch, local_rank, delay_s):
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert errors.report_delay() == delay_s


def test_an_error_every_rank_hits_shows_once_when_another_rank_hits_it_first(tmp_path):
    """Under torchrun, rank 1 fails two seconds before rank 0: the launcher stops the others as soon as one rank
    exits, so a rank 1 that exited at once would take rank 0's line with it (the CI failure of stop 27)."""
    script = tmp_path / "fail.py"
    script.write_text("import os, sys, time\n"
                      "from blip_fast import errors\n"
                      "def main(argv):\n"
                      "    time.sleep(2.0 if os.environ['LOCAL_RANK'] == '0' else 0.0)\n"
                      "    raise errors.InvalidInputError('queue_size 50 is not a multiple of 16')\n"
                      "sys.exit(errors.run_main(main, [], 'fail', delay_s=errors.report_delay()))\n")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count("fail: error: queue_size 50 is not a multiple of 16") == 1, output
