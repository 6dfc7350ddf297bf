"""Fine-tuning in the training entry: CapFilt's captioner (``--task captioning``) and filter (``--task retrieval``).

A tiny pre-training run (2 steps, one process) is made once per module; the fine-tuning runs start from it with
``--init_from`` on a fixed BLIP json set of 8 images with two captions each (16 samples, 2 steps per epoch). Runs go
through `python -m blip_fast.train` with tests/test_train.py's launch helpers; one slow test uses the real
`deepspeed --num_gpus 2` launcher.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blip_fast.data import BlipEvalTransform, BlipImageProcessor, SyntheticNoisyDataset, load_image
from blip_fast.data.synthetic import render_caption
from blip_fast.errors import UserError
from blip_fast.launch import free_port
from blip_fast.tokenizer import BlipTokenizer
from blip_fast.training import checkpointing, options, tasks
from tests.test_train import (
    CONFIGS,
    _consolidated,
    _kill_after_checkpoint,
    _max_differences,
    _metrics,
    _run,
    _train,
    _train_command,
)
from tests.tiny_models import assert_close

FINETUNE_TASKS = ("captioning", "retrieval")
PRETRAIN_STEPS, STEPS = 2, 8  # fine-tuning: 4 epochs of 2 steps
QUEUE_SIZE = 16
#: What an exported task dir holds: weights and config, tokenizer files, the image processor's config.
EXPORT_FILES = {"README.md", "config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "tokenizer_config.json",
                "special_tokens_map.json", "preprocessor_config.json"}


def _config(task: str) -> Path:
    return CONFIGS / f"tiny-cpu-{task}.yaml"


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """8 synthetic images, two captions each as a BLIP json caption list (the second in another wording)."""
    synthetic = SyntheticNoisyDataset(8, noise_fraction=0.0, seed=3)
    root = tmp_path_factory.mktemp("data")
    annotations = synthetic.write_images(root)
    records = json.loads(annotations.read_text())
    for index, record in enumerate(records):
        record["caption"] = [record["caption"], render_caption(synthetic.scene(index), random.Random(index))]
    annotations.write_text(json.dumps(records))
    flags = ["--data", "blip_json", "--annotations", str(annotations), "--image_root", str(root)]
    return {"root": root, "records": records, "flags": flags}


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory) -> Path:
    """A pre-training output dir (2 steps) with its exports: the init source of every fine-tuning run."""
    output_dir = tmp_path_factory.mktemp("pretrain") / "pretrain"
    _train("python", output_dir, *data["flags"], "--max_steps", str(PRETRAIN_STEPS), "--queue_size", str(QUEUE_SIZE),
           "--export_tasks", "captioning", "retrieval")
    return output_dir


def _finetune_flags(task: str, pretrained: Path, data: dict, *extra: str) -> list[str]:
    # 4 epochs over the 16 samples; the LR stays high enough for the tiny model to learn in 8 steps.
    return ["--init_from", str(pretrained), *data["flags"], "--epochs", "4", "--init_lr", "1e-3",
            "--queue_size", str(QUEUE_SIZE), "--log_every_steps", "1", *extra]


@pytest.fixture(scope="module")
def finetuned(pretrained, data, tmp_path_factory):
    """``finetuned(task)``: the output dir and log of an uninterrupted 8-step run of ``task`` (run once, on demand)."""
    runs: dict[str, tuple[Path, str]] = {}

    def run(task: str) -> tuple[Path, str]:
        if task not in runs:
            output_dir = tmp_path_factory.mktemp(task) / "straight"
            log = _train("python", output_dir, *_finetune_flags(task, pretrained, data), config=_config(task))
            runs[task] = output_dir, log
        return runs[task]

    return run


def _build(task: str, init_from: Path, *flags: str):
    """The training module ``train`` builds for ``task`` from ``init_from`` (no DeepSpeed), and its args."""
    args = options.parse_args(["--config", str(_config(task)), "--init_from", str(init_from), *flags])
    source = tasks.InitSource(args.init_from)
    tokenizer = BlipTokenizer.from_pretrained(source.tokenizer_dir)
    config = source.run_config(args, tokenizer)
    torch.manual_seed(args.seed)
    return tasks.TASKS[task].build_model(config, args, source, tokenizer), args


def _without_position_ids(state: dict) -> dict:
    return {key: value for key, value in state.items() if not key.endswith("position_ids")}


# ---------------------------------------------------------------------------------------------------- fast checks
def test_task_table_and_shipped_configs():
    assert tuple(tasks.TASKS) == options.TRAINING_TASKS
    for task in FINETUNE_TASKS:
        args = options.parse_args(["--config", str(_config(task))])
        assert (args.task, args.model, args.image_size, args.lr_schedule) == (task, None, None, "cosine")
        assert tasks.TASKS[task].exports(args.export_tasks) == [task]
    assert options.parse_args(["--config", str(_config("captioning"))]).prompt == "a picture of "
    args = options.parse_args(["--config", str(_config("captioning"))])
    args.init_from = None
    with pytest.raises(ValueError, match="task captioning fine-tunes a model: pass --init_from"):
        options.check_args(args)
    with pytest.raises(ValueError, match="init_from is for fine-tuning"):
        options.parse_args(["--config", str(CONFIGS / "tiny-cpu.yaml"), "--init_from", "somewhere"])
    with pytest.raises(ValueError, match="exports to \\['retrieval'\\], not \\['captioning'\\]"):
        tasks.TASKS["retrieval"].exports(["captioning"])


def test_prompt_collator_prepends_the_prompt(pretrained):
    tokenizer = BlipTokenizer.from_pretrained(pretrained / "tokenizer")
    records = [{"image": torch.zeros(3, 2, 2), "caption": "a red circle", "image_id": 4, "index": 0}, None]
    batch = tasks.PromptCollator(tokenizer, 40, "a picture of ")(records)
    expected = tokenizer(["a picture of a red circle"], return_tensors="pt")
    assert torch.equal(batch["input_ids"], expected.input_ids) and batch["image_ids"].tolist() == [4]
    prompt = tokenizer(["a picture of "], return_tensors="pt").input_ids[0, :-1]  # [CLS] + prompt, no [SEP]
    assert tasks.prompt_length(tokenizer, "a picture of ") == len(prompt)
    assert torch.equal(batch["input_ids"][0, : len(prompt)], prompt)


@pytest.mark.parametrize("max_text_length", [5, 6])
def test_max_text_length_must_leave_a_caption_token_after_the_prompt(pretrained, max_text_length):
    """[DEC] + "a picture of " (4 tokens) + one caption token + [SEP] = 6: at 5 the loss would see no caption token,
    and the run trained on nothing without a word."""
    tokenizer = BlipTokenizer.from_pretrained(pretrained / "tokenizer")
    assert tasks.prompt_length(tokenizer, "a picture of ") == 4
    if max_text_length == 6:
        _build("captioning", pretrained, "--max_text_length", "6")
        return
    with pytest.raises(options.ConfigError, match=r"max_text_length 5 leaves no caption token after the prompt "
                                                  r"'a picture of ' \(4 tokens with \[DEC\]\) and \[SEP\]"):
        _build("captioning", pretrained, "--max_text_length", "5")


def test_resuming_a_run_as_another_task_is_refused_and_keeps_its_files(pretrained, tmp_path, capsys):
    """``--resume`` of a pre-training run with a fine-tuning command (another task, queue): one line naming the
    options that differ, and the run's config.yaml and blip_config.json as they were. The resume failed on DeepSpeed's
    state dict, after it had rewritten both (a later export then took the run for the other task)."""
    import shutil

    from blip_fast.train import main as train_main

    run = tmp_path / "pretrain"
    shutil.copytree(pretrained, run)
    saved = {name: (run / name).read_bytes() for name in ("config.yaml", "blip_config.json")}
    (tmp_path / "train.json").write_text("[]")  # never read
    code = train_main(["--config", str(_config("captioning")), "--output_dir", str(run), "--resume", "--init_from",
                       str(pretrained / "export" / "captioning"), "--data", "blip_json", "--annotations",
                       str(tmp_path / "train.json"), "--image_root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and f"blip_fast.train: error: {run} holds a run with other options ({run / 'config.yaml'}: " in err
    assert 'model: "tiny" there, null here; task: "pretrain" there, "captioning" here): resume it with its own' in err
    assert {name: (run / name).read_bytes() for name in saved} == saved


def test_resuming_as_another_model_names_what_differs(pretrained, tmp_path):
    config = checkpointing.read_model_config(pretrained)
    wider = config.replace(vision=dataclasses.replace(config.vision, image_size=2 * config.vision.image_size))
    checkpointing.check_same_model(pretrained, config)
    with pytest.raises(UserError, match=re.escape(f"{pretrained} holds a checkpoint of another model "
                                                  f"({pretrained / 'blip_config.json'}: vision.image_size: "
                                                  f"{config.vision.image_size} there, {wider.vision.image_size} here)")):
        checkpointing.check_same_model(pretrained, wider)


def test_init_from_pretraining_copies_the_task_weights(pretrained):
    """Each tensor of the built trainer against the pre-training checkpoint: captioning takes ViT + decoder;
    retrieval takes everything but the queues (momentum encoders and temperature included), queues start fresh."""
    reference = _consolidated(pretrained, PRETRAIN_STEPS)
    captioner, _ = _build("captioning", pretrained)
    state = _without_position_ids(captioner.model.state_dict())
    assert {key.split(".")[0] for key in state} == {"vision_model", "text_decoder"}
    for key, value in state.items():
        assert torch.equal(value, reference[key]), key

    retrieval, args = _build("retrieval", pretrained)
    from blip_fast.modeling.finetune import BlipRetrievalTrainer

    torch.manual_seed(args.seed)
    fresh = BlipRetrievalTrainer(retrieval.config, args.queue_size, args.momentum)
    queues = {name for name, _ in retrieval.named_buffers() if not name.endswith("position_ids")}
    assert queues == {"image_queue", "text_queue", "idx_queue", "ptr_queue"}
    state = _without_position_ids(retrieval.state_dict())
    assert any(key.startswith("visual_encoder_m.") for key in state) and "temp" in state
    for key, value in state.items():
        expected = fresh.state_dict()[key] if key in queues else reference[key]
        assert torch.equal(value, expected), key
    assert not torch.equal(retrieval.image_queue, reference["image_queue"])  # the pre-training queue is not kept
    assert (retrieval.idx_queue == -100).all() and int(retrieval.ptr_queue) == 0


def test_init_from_hf_dirs(pretrained):
    """From exported HF-layout dirs: the task weights as saved; retrieval's momentum encoders copy the online ones."""
    from blip_fast import BlipForConditionalGeneration, BlipForImageTextRetrieval

    captioner, _ = _build("captioning", pretrained / "export" / "captioning")
    saved = BlipForConditionalGeneration.from_pretrained(pretrained / "export" / "captioning").state_dict()
    for key, value in captioner.model.state_dict().items():
        assert torch.equal(value, saved[key]), key

    retrieval, _ = _build("retrieval", pretrained / "export" / "retrieval")
    saved = BlipForImageTextRetrieval.from_pretrained(pretrained / "export" / "retrieval").state_dict()
    state = retrieval.state_dict()
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    momentum = {"visual_encoder_m": "vision_model", "vision_proj_m": "vision_proj", "text_encoder_m": "text_encoder",
                "text_proj_m": "text_proj"}
    copied = [key for key in state if key.split(".")[0] in momentum]
    assert len(copied) > 100
    for key in copied:
        group, rest = key.split(".", 1)
        assert torch.equal(state[key], saved[f"{momentum[group]}.{rest}"]), key


def test_finetuning_at_another_resolution_resizes_the_position_tables(pretrained):
    """BLIP fine-tunes at a higher resolution than it pre-trains: from a training checkpoint or an HF dir, the
    position tables (the momentum ViT's too) are resized bicubically with the class token kept, as the original's
    interpolate_pos_embed."""
    from blip_fast.modeling.vit import resize_position_embedding

    reference = _consolidated(pretrained, PRETRAIN_STEPS)
    retrieval, _ = _build("retrieval", pretrained, "--image_size", "96")
    assert retrieval.config.vision.image_size == 96
    for key in ("vision_model.embeddings.position_embedding", "visual_encoder_m.embeddings.position_embedding"):
        assert torch.equal(retrieval.state_dict()[key], resize_position_embedding(reference[key], (12, 12))), key
    captioner, _ = _build("captioning", pretrained / "export" / "captioning", "--image_size", "96")
    key = "vision_model.embeddings.position_embedding"
    assert torch.equal(captioner.model.state_dict()[key], resize_position_embedding(reference[key], (12, 12)))
    assert torch.equal(captioner.model.state_dict()["text_decoder.cls.predictions.bias"],
                       reference["text_decoder.cls.predictions.bias"])


def test_init_from_errors_say_what_is_wrong(pretrained, finetuned, tmp_path):
    with pytest.raises(ValueError, match="holds a BlipForImageTextRetrieval; task captioning"):
        _build("captioning", pretrained / "export" / "retrieval")
    with pytest.raises(ValueError, match="holds a BlipForConditionalGeneration; task retrieval"):
        _build("retrieval", pretrained / "export" / "captioning")
    captioning_run, _ = finetuned("captioning")
    with pytest.raises(ValueError, match=r"lacks \['itm_head', 'text_encoder', 'text_proj', 'vision_proj'\]"):
        _build("retrieval", captioning_run)
    with pytest.raises(ValueError, match="model 'base' differs"):
        _build("retrieval", pretrained, "--model", "base")
    with pytest.raises(FileNotFoundError, match="neither an HF-layout model dir"):
        tasks.InitSource(tmp_path)
    (tmp_path / "config.json").write_text((pretrained / "export" / "captioning" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        tasks.InitSource(tmp_path)


# ---------------------------------------------------------------------------------------------------- training runs
@pytest.mark.parametrize("task", FINETUNE_TASKS)
def test_finetuning_learns_and_logs_its_losses(task, finetuned, pretrained):
    output_dir, log = finetuned(task)
    records = _metrics(output_dir)
    assert [record["step"] for record in records] == list(range(1, STEPS + 1))
    losses = [record["loss"] for record in records]
    # Epoch 4 (steps 7-8) against epoch 1 (steps 1-2): the same 16 samples, other crops.
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.2, losses
    names = set(tasks.TASKS[task].loss_names)
    assert names == {"loss"} | ({"loss_itc", "loss_itm"} if task == "retrieval" else set())
    assert all(names <= set(record) for record in records) and "loss_lm" not in records[0]
    assert ("alpha" in records[0]) == (task == "retrieval")
    step_line = next(line for line in log.splitlines() if f"step {STEPS} epoch 3 loss" in line)
    if task == "retrieval":
        assert [record["alpha"] for record in records[:3]] == pytest.approx([0.0, 0.2, 0.4])  # a 1-epoch ramp
        assert f"(itc {records[-1]['loss_itc']:.4f} itm {records[-1]['loss_itm']:.4f})" in step_line
        assert "alpha 0.400" in step_line
    else:
        assert f"loss {records[-1]['loss']:.4f} lr" in step_line and "alpha" not in step_line
    assert records[0]["lr"] == pytest.approx(1e-3) and records[2]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + 2**-0.5))
    # The run inherited the pre-training tokenizer and model config.
    assert (output_dir / "tokenizer" / "vocab.txt").read_text() == (pretrained / "tokenizer" / "vocab.txt").read_text()
    assert checkpointing.read_model_config(output_dir) == checkpointing.read_model_config(pretrained)


@pytest.mark.parametrize("task", FINETUNE_TASKS)
def test_resume_after_kill_is_exact(task, finetuned, pretrained, data, tmp_path):
    """Killed after its step-4 checkpoint (steps past it are lost), resumed to step 8: the uninterrupted run's
    weights, momentum encoders, queues and per-step losses."""
    straight, _ = finetuned(task)
    split = tmp_path / "split"
    port = free_port()
    command = _train_command("python", port, split, *_finetune_flags(task, pretrained, data, "--save_every_steps", "4"),
                             config=_config(task))
    _kill_after_checkpoint(command, split, 4, port, linger=0.2)
    resumed_log = _run([*command, "--resume"], tmp_path / "resumed.log", port)
    assert "at step 4" in resumed_log
    differences = _max_differences(_consolidated(straight, STEPS), _consolidated(split, STEPS))
    worst = max(differences, key=differences.get)
    assert differences[worst] == 0.0, f"{worst} differs by {differences[worst]}"
    records = _metrics(split)
    assert [record["step"] for record in records] == list(range(1, STEPS + 1))
    assert [record["loss"] for record in records] == [record["loss"] for record in _metrics(straight)]


def test_every_export_is_a_complete_dir(pretrained, finetuned):
    """Pre-training and fine-tuning exports alike: tokenizer and preprocessor_config.json (the model's image size)."""
    runs = [(pretrained, "captioning"), (pretrained, "retrieval")] + [(finetuned(task)[0], task)
                                                                      for task in FINETUNE_TASKS]
    for output_dir, task in runs:
        export_dir = output_dir / "export" / task
        assert {path.name for path in export_dir.iterdir()} == EXPORT_FILES, export_dir
        assert BlipImageProcessor.from_pretrained(export_dir) == BlipImageProcessor(size=64)
        assert BlipTokenizer.from_pretrained(export_dir).token_to_id("[ENC]") == len(
            BlipTokenizer.from_pretrained(pretrained / "tokenizer")) - 1


def _images(data: dict, count: int) -> list:
    return [load_image(data["root"] / record["image"]) for record in data["records"][:count]]


def test_exported_captioner_reproduces_the_trainer(finetuned, data, tmp_path, capsys):
    """The export dir loads with Captioner.from_pretrained and gives the trained model's loss and greedy captions;
    `python -m blip_fast.train export` writes the same dir again."""
    from blip_fast import BlipForConditionalGeneration
    from blip_fast.captioning import Captioner
    from blip_fast.modeling.finetune import BlipCaptionTrainer
    from blip_fast.train import main

    output_dir, _ = finetuned("captioning")
    config = checkpointing.read_model_config(output_dir)
    tokenizer = BlipTokenizer.from_pretrained(output_dir / "tokenizer")
    prompt_length = tasks.prompt_length(tokenizer, "a picture of ")
    trainer = BlipCaptionTrainer(BlipForConditionalGeneration(config), prompt_length)
    trainer.load_state_dict(_consolidated(output_dir, STEPS))
    trainer.eval()

    export_dir = output_dir / "export" / "captioning"
    captioner = Captioner.from_pretrained(export_dir)
    assert captioner.processor == BlipImageProcessor(size=config.vision.image_size)
    images = _images(data, 3)
    pixel_values = torch.stack([BlipEvalTransform(config.vision.image_size)(image) for image in images])
    assert_close(captioner.processor(images).pixel_values, pixel_values)
    text = captioner.tokenizer(["a picture of " + record["caption"][0] for record in data["records"][:3]],
                                padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = trainer(pixel_values, text.input_ids, text.attention_mask).loss
        exported = BlipCaptionTrainer(captioner.model, prompt_length)(pixel_values, text.input_ids,
                                                                       text.attention_mask).loss
        prompt = tokenizer(["a picture of "] * 3, return_tensors="pt").input_ids
        generated = trainer.model.generate(pixel_values, input_ids=prompt, max_new_tokens=8)
    assert_close(exported, expected)
    expected_captions = tokenizer.batch_decode(generated[:, prompt.shape[1] - 1 :], skip_special_tokens=True)
    assert captioner.caption(images, max_new_tokens=8) == expected_captions

    assert main(["export", "--checkpoint", str(output_dir), "--out", str(tmp_path / "again")]) == 0
    assert {path.name for path in (tmp_path / "again").iterdir()} == EXPORT_FILES
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(output_dir), "--out", str(tmp_path / "vqa"), "--task", "vqa"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()  # one line, no traceback
    assert line.endswith("error: a captioning checkpoint exports to ['captioning'], not ['vqa']")
    assert not (tmp_path / "vqa").exists()


def test_exported_filter_reproduces_the_trainer(finetuned, data):
    """BlipForImageTextRetrieval + BlipTokenizer + BlipImageProcessor from the export dir give the ITC similarities and
    ITM logits of the trained module's own encoders and heads."""
    from blip_fast import BlipForImageTextRetrieval
    from blip_fast.modeling.finetune import BlipRetrievalTrainer

    output_dir, _ = finetuned("retrieval")
    config = checkpointing.read_model_config(output_dir)
    trainer = BlipRetrievalTrainer(config, queue_size=QUEUE_SIZE)
    trainer.load_state_dict(_consolidated(output_dir, STEPS))
    trainer.eval()

    export_dir = output_dir / "export" / "retrieval"
    model = BlipForImageTextRetrieval.from_pretrained(export_dir)
    tokenizer = BlipTokenizer.from_pretrained(export_dir)
    pixel_values = BlipImageProcessor.from_pretrained(export_dir)(_images(data, 4)).pixel_values
    text = tokenizer([record["caption"][1] for record in data["records"][:4]], padding=True, truncation=True,
                     max_length=35, return_tensors="pt")
    ids, mask = text.input_ids, text.attention_mask
    with torch.no_grad():
        image_embeds = trainer.vision_model(pixel_values).last_hidden_state
        image_feat = F.normalize(trainer.vision_proj(image_embeds[:, 0]), dim=-1)
        text_feat = F.normalize(trainer.text_proj(trainer.text_encoder(ids, mask).last_hidden_state[:, 0]), dim=-1)
        matching_ids = ids.clone()
        matching_ids[:, 0] = config.text.enc_token_id
        itm = trainer.itm_head(trainer.text_encoder(matching_ids, mask, image_embeds).last_hidden_state[:, 0])
        itc_exported = model(ids, pixel_values, use_itm_head=False, attention_mask=mask).itm_score
        itm_exported = model(ids, pixel_values, attention_mask=mask).itm_score
    assert_close(itc_exported, image_feat @ text_feat.t())
    assert_close(itm_exported, itm)


@pytest.mark.slow
def test_retrieval_under_the_deepspeed_launcher(pretrained, data, tmp_path):
    """2 ranks x 4 samples, ITM negatives drawn across ranks; the queue fills with both ranks' image ids."""
    output_dir = tmp_path / "deepspeed"
    log = _train("deepspeed", output_dir, *_finetune_flags("retrieval", pretrained, data, "--micro_batch_size", "4",
                                                           "--negative_all_rank", "--max_steps", "4"),
                 config=_config("retrieval"))
    assert "2 ranks x 4 micro batch" in log and "2 per epoch" in log
    records = _metrics(output_dir)
    assert [record["step"] for record in records] == [1, 2, 3, 4]
    assert all(np.isfinite(record["loss_itc"]) and np.isfinite(record["loss_itm"]) for record in records)
    state = _consolidated(output_dir, 4)
    assert int(state["ptr_queue"]) == 4 * 8 % QUEUE_SIZE
    # the last 2 steps (epoch 1): every caption once, two per image
    assert sorted(state["idx_queue"].tolist()) == sorted(2 * list(range(8)))
    from blip_fast import BlipForImageTextRetrieval

    model = BlipForImageTextRetrieval.from_pretrained(output_dir / "export" / "retrieval")
    assert torch.equal(model.state_dict()["itm_head.weight"], state["itm_head.weight"])
