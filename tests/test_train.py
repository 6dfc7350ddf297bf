"""The training entry: option resolution, schedules, ds_config checks (fast), and real launcher runs (slow).

The slow tests start `deepspeed --num_gpus 2 --module blip_fast.train` on the CPU accelerator (gloo + DeepSpeed's
shared-memory all-reduce), `torchrun` and a plain `python -m blip_fast.train`, one thread per rank. They share one
ZeRO-2 run of the tiny config (30 steps, checkpoints every 5) that the resume, ZeRO-1/3 and export tests compare
against. The first run on a machine JIT-builds DeepSpeed's shm comm op into TORCH_EXTENSIONS_DIR (default
build/torch_extensions, shared by every launch, ~25 s once).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from blip_fast import errors
from blip_fast.config import BlipConfig
from blip_fast.errors import UserError
from blip_fast.launch import free_port
from blip_fast.training import checkpointing, options, tasks
from blip_fast.training.schedule import alpha_ramp, blip_step_lr, cosine_lr, learning_rate

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TINY = CONFIGS / "tiny-cpu.yaml"
#: Seconds a launch may take; raise it on a shared, loaded machine (the runs take well under a minute on 2 free cores).
LAUNCH_TIMEOUT = int(os.environ.get("BLIP_FAST_TEST_LAUNCH_TIMEOUT", "300"))
QUEUE_KEYS = ("image_queue", "text_queue", "idx_queue", "ptr_queue")


# ==================================================================================================== fast tests
def _write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def test_yaml_defaults_then_cli_overrides(tmp_path, monkeypatch):
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4}))
    # PyYAML reads "3e-4" (no dot) as a string: it must still become a float, as on the command line.
    config = tmp_path / "run.yaml"
    config.write_text("init_lr: 3e-4\nwarmup_steps: 7\ngradient_checkpointing: true\ncrop_scale: [0.5, 1.0]\n"
                      "export_tasks: [vqa]\ndeepspeed_config: ds.json\nmodel: base\n")
    monkeypatch.chdir(ROOT)  # the ds_config is found next to the YAML, not in the working directory
    args = options.parse_args(["--config", str(config), "--warmup_steps", "9", "--no-gradient_checkpointing"])
    assert args.init_lr == pytest.approx(3e-4) and isinstance(args.init_lr, float)
    assert args.warmup_steps == 9  # CLI beats YAML
    assert args.gradient_checkpointing is False
    assert args.crop_scale == [0.5, 1.0] and args.export_tasks == ["vqa"] and args.model == "base"
    assert Path(args.deepspeed_config) == ds_path
    assert args.weight_decay == 0.05 and args.queue_size == 57600  # untouched defaults


def test_yaml_errors_name_the_key(tmp_path):
    base = {"deepspeed_config": str(CONFIGS / "ds_zero2.json")}
    cases = [({"init_lrr": 1e-3}, "init_lrr"), ({"warmup_steps": 2.5}, "warmup_steps"),
             ({"gradient_checkpointing": "yes"}, "gradient_checkpointing"), ({"model": "huge"}, "model"),
             ({"crop_scale": [0.5]}, "crop_scale")]
    for values, key in cases:
        config = _write_yaml(tmp_path / "bad.yaml", {**base, **values})
        with pytest.raises(ValueError, match=key):
            options.parse_args(["--config", str(config)])
    with pytest.raises(ValueError, match="deepspeed_config"):
        options.parse_args([])


@pytest.mark.parametrize("flags,message", [
    (["--noise_fraction", "1.5"], "noise_fraction must lie in [0, 1], got 1.5"),
    (["--alpha", "2"], "alpha must lie in [0, 1], got 2.0"),
    (["--alpha", "-1"], "alpha must lie in [0, 1], got -1.0"),
    (["--drop_path_rate", "1.5"], "drop_path_rate must lie in [0, 1), got 1.5"),
    (["--flip_prob", "2"], "flip_prob must lie in [0, 1], got 2.0"),
    (["--crop_scale", "0.9", "0.1"], "crop_scale must satisfy 0 < low <= high <= 1, got [0.9, 0.1]"),
    (["--crop_scale", "0", "1"], "crop_scale must satisfy 0 < low <= high <= 1, got [0.0, 1.0]"),
    (["--betas", "1.5", "0.9"], "betas must each lie in [0, 1), got [1.5, 0.9]"),
    (["--init_lr", "0"], "init_lr must be > 0, got 0.0"),
    (["--warmup_lr", "-1"], "warmup_lr must be >= 0, got -1.0"),
    (["--min_lr", "1"], "min_lr 1.0 is above init_lr 0.001: the schedule decays from init_lr towards min_lr"),
    (["--lr_decay_rate", "0"], "lr_decay_rate must lie in (0, 1], got 0.0"),
    (["--lr_decay_rate", "2"], "lr_decay_rate must lie in (0, 1], got 2.0"),
    (["--weight_decay", "-1"], "weight_decay must be >= 0, got -1.0"),
    (["--num_samples", "-5"], "num_samples must be > 0, got -5"),
    (["--num_workers", "-1"], "num_workers must be >= 0, got -1"),
    (["--keep_checkpoints", "-1"], "keep_checkpoints must be >= 0, got -1"),
    (["--micro_batch_size", "0"], "micro_batch_size must be > 0, got 0"),
    (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps must be > 0, got 0"),
    (["--max_steps", "0"], "max_steps must be > 0, got 0"),
    (["--max_text_length", "2"], "max_text_length must be >= 3 ([CLS], a token, [SEP]), got 2"),
    (["--seed", "-1"], "seed must lie in [0, 2**31), got -1"),
    (["--image_size", "30"], "image_size 30 does not fit model tiny: vision image_size 30 is not a multiple of "
                             "patch_size 8"),
    (["--image_size", "0"], "image_size must be > 0, got 0"),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_an_option_out_of_its_range_stops_the_run_before_it_writes(tmp_path, capsys, flags, message):
    """Each of these used to start DeepSpeed, write the output folder and then stop with a traceback, or (alpha,
    init_lr 0, min_lr above init_lr, lr_decay_rate, keep_checkpoints) train on without a word."""
    from blip_fast.train import main as train_main

    output_dir = tmp_path / "run"
    code = train_main(["--config", str(TINY), "--output_dir", str(output_dir), *flags])
    assert (code, capsys.readouterr().err.strip()) == (2, f"blip_fast.train: error: {message}")
    assert not output_dir.exists()


@pytest.mark.parametrize("flags,value", [
    ([], False), (["--resume"], True), (["--no-resume"], False), (["--resume", "false"], False),
    (["--resume", "True"], True), (["--resume", "no", "--seed", "3"], False), (["--resume", "1"], True),
])
def test_a_flag_takes_true_or_false_like_its_yaml_key(flags, value):
    assert options.parse_args(["--config", str(TINY), *flags]).resume is value


@pytest.mark.parametrize("flags,message", [
    (["--resume", "maybe"], "--resume: expected true or false, got 'maybe'"),
    (["--no-resume", "false"], "--no-resume takes no value, got 'false'"),
])
def test_a_flag_with_a_value_that_is_no_truth_value_is_one_line(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        options.parse_args(["--config", str(TINY), *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("make,message", [
    (lambda path: path.mkdir(), "config {path} is a folder; give the YAML file"),
    (lambda path: path.write_bytes(b"\xff\xfeinit_lr: 1"), "config {path} is not a YAML text file (not UTF-8: "
                                                             "invalid start byte at byte 0)"),
    (lambda path: path.write_text("init_lr: [1\n"), "config {path} is not valid YAML: while parsing a flow sequence "
                                                     'in "{path}", line 1, column 10 expected'),
], ids=["folder", "not-utf8", "syntax"])
def test_an_unreadable_config_is_one_line(tmp_path, make, message):
    path = tmp_path / "train.yaml"
    make(path)
    with pytest.raises(UserError) as error:
        options.parse_args(["--config", str(path)])
    assert message.format(path=path) in str(error.value) and "\n" not in str(error.value)


def test_shipped_configs_parse_and_resolve(tmp_path):
    tiny = options.parse_args(["--config", str(TINY)])
    assert (tiny.model, tiny.image_size, tiny.queue_size, tiny.data) == ("tiny", 64, 64, "synthetic")
    ds = options.load_ds_config(tiny.deepspeed_config)
    assert ds["train_micro_batch_size_per_gpu"] * 2 * 15 == tiny.num_samples  # 15 steps per epoch on 2 ranks
    assert tiny.queue_size % (ds["train_micro_batch_size_per_gpu"] * 2) == 0

    (tmp_path / "x.json").write_text("[]")
    base = options.parse_args(["--config", str(CONFIGS / "base-224-pretrain.yaml"), "--annotations",
                               str(tmp_path / "x.json")])
    assert (base.model, base.image_size, base.queue_size, base.alpha) == ("base", 224, 57600, 0.4)
    assert (base.init_lr, base.warmup_lr, base.warmup_steps, base.min_lr, base.lr_decay_rate) == (
        3e-4, 1e-6, 3000, 1e-6, 0.9)
    assert (base.weight_decay, base.epochs, base.micro_batch_size) == (0.05, 20, 90)
    assert base.queue_size % (90 * 32) == 0  # the paper's 2880 = 90 x 32 GPUs
    with pytest.raises(ValueError, match="annotations"):
        options.parse_args(["--config", str(CONFIGS / "base-224-pretrain.yaml")])

    for path in sorted(CONFIGS.glob("ds_*.json")):
        ds = options.load_ds_config(path)
        assert ds["zero_optimization"]["stage"] in (1, 2, 3), path


def test_ds_config_auto_is_rejected_by_key(tmp_path):
    config = {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"},
              "bf16": {"enabled": "auto"}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'zero_optimization\.reduce_bucket_size', 'bf16\.enabled' are \"auto\""):
        options.load_ds_config(path)
    with pytest.raises(ValueError, match="'train_micro_batch_size_per_gpu' is \"auto\""):
        options.resolve_ds_config({"train_micro_batch_size_per_gpu": "auto"})
    # The training options' batch overrides replace the ds_config values (and let DeepSpeed derive the total).
    resolved = options.resolve_ds_config({"train_batch_size": 64, "train_micro_batch_size_per_gpu": "auto"},
                                         micro_batch_size=4, gradient_accumulation_steps=2)
    assert resolved == {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}
    with pytest.raises(ValueError, match="optimizer"):
        options.resolve_ds_config({"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW"}})


@pytest.mark.parametrize("change, message", [
    ({"train_micro_batch_size_per_gpu": "eight"}, "train_micro_batch_size_per_gpu must be a positive integer, got "
                                                  "'eight'"),
    ({"train_micro_batch_size_per_gpu": 0}, "train_micro_batch_size_per_gpu must be a positive integer, got 0"),
    ({"train_micro_batch_size_per_gpu": 8.5}, "train_micro_batch_size_per_gpu must be a positive integer, got 8.5"),
    ({"gradient_accumulation_steps": True}, "gradient_accumulation_steps must be a positive integer, got True"),
    ({"zero_optimization": "2"}, "zero_optimization must be a JSON object, got '2'"),
    ({"gradient_clipping": "one"}, "gradient_clipping must be a number >= 0, got 'one'"),
    ({"zero_optimization": {"stage": 5}}, "DeepSpeedZeroConfig: stage: Input should be 0, 1, 2, 3"),
    ({"zero_optimization": {"stage": 2, "bogus_key": 1}}, "DeepSpeedZeroConfig: bogus_key: Extra inputs are not "
                                                          "permitted"),
    ({"train_batch_size": 12}, "train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size"),
    ({"zero_optimisation": {"stage": 2}}, "unknown key 'zero_optimisation' (did you mean 'zero_optimization'?): "
                                          "DeepSpeed would ignore it"),
    ({"fp16": {"enabled": True}}, "fp16 needs a GPU; on a CPU train in bf16"),
])
def test_a_ds_config_value_deepspeed_would_trip_on_is_one_line(tmp_path, change, message):
    """Each failed in a traceback (some at the first optimizer step) after the run had written its files, or (a typo'd
    section name) trained silently without it; now ``load_ds_config`` refuses it before anything is written."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, **change}))
    if "fp16" in change and torch.cuda.is_available():  # fp16 trains on a GPU: there the config is taken as it is
        assert options.load_ds_config(path)["fp16"] == {"enabled": True}
        return
    with pytest.raises(options.ConfigError) as refused:
        options.load_ds_config(path)
    assert str(refused.value).startswith(f"{path}: ") and message in str(refused.value)


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("batch", [{"train_micro_batch_size_per_gpu": 4},
                                   {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 3},
                                   {"train_batch_size": 48},
                                   {"train_batch_size": 48, "gradient_accumulation_steps": 3},
                                   {"train_batch_size": 48, "train_micro_batch_size_per_gpu": 4}])
def test_batch_geometry_is_what_deepspeed_derives(monkeypatch, world_size, batch):
    """The micro batch and accumulation known before the model is built equal DeepSpeed's own (its config class, at
    that world size)."""
    import deepspeed.comm
    from deepspeed.runtime.config import DeepSpeedConfig

    monkeypatch.setattr(deepspeed.comm, "get_rank", lambda *args, **kwargs: 0)
    monkeypatch.setattr(deepspeed.comm, "get_world_size", lambda *args, **kwargs: world_size)
    derived = DeepSpeedConfig(dict(batch))
    expected = derived.train_micro_batch_size_per_gpu, derived.gradient_accumulation_steps
    assert options.batch_geometry(batch, world_size) == expected


@pytest.mark.parametrize("given", ["gradient_accumulation_steps", "train_micro_batch_size_per_gpu"])
def test_a_train_batch_that_does_not_split_over_the_ranks_is_one_line(given):
    with pytest.raises(options.ConfigError, match=f"train_batch_size 48 is not a multiple of {given} 5 x 2 ranks"):
        options.batch_geometry({"train_batch_size": 48, given: 5}, 2)


@pytest.mark.parametrize("requested, cuda, stage, expected", [
    (None, True, 2, True), (None, True, 3, False), (None, False, 2, False), (None, True, None, True),
    (False, True, 2, False), (False, True, 3, False), (True, False, 0, True),
])
def test_compile_defaults_to_cuda_except_under_zero3(monkeypatch, requested, cuda, stage, expected):
    """The default on a GPU under ZeRO-3 is eager (it was compile, which then failed after the model was built)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    ds_config = {} if stage is None else {"zero_optimization": {"stage": stage}}
    assert options.resolve_compile(requested, ds_config) is expected


def test_compile_asked_for_under_zero3_is_one_line_before_the_model(tmp_path, capsys):
    from blip_fast.train import main as train_main

    code = train_main(["--config", str(TINY), "--output_dir", str(tmp_path / "out"), "--compile",
                       "--deepspeed_config", str(ROOT / "configs" / "ds_zero3.json")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "trained a WordPiece vocab" not in err
    assert "blip_fast.train: error: --compile works with ZeRO stages 0-2" in err


def test_resolved_config_reloads_to_the_same_options(tmp_path):
    args = options.parse_args(["--config", str(TINY), "--init_lr", "2e-3", "--output_dir", str(tmp_path)])
    ds = options.load_ds_config(args.deepspeed_config)
    options.write_resolved(args, ds, tmp_path)
    again = options.parse_args(["--config", str(tmp_path / options.RESOLVED_CONFIG_FILE)])
    assert options.resolved_options(again) == options.resolved_options(args) | {
        "deepspeed_config": str((tmp_path / options.RESOLVED_DS_CONFIG_FILE).resolve())}
    assert json.loads((tmp_path / options.RESOLVED_DS_CONFIG_FILE).read_text()) == ds


def test_blip_pretrain_lr_schedule_by_hand():
    blip = dict(init_lr=3e-4, warmup_lr=1e-6, warmup_steps=3000, min_lr=1e-6, lr_decay_rate=0.9)
    assert blip_step_lr(0, 0, **blip) == pytest.approx(1e-6)
    assert blip_step_lr(0, 1500, **blip) == pytest.approx(1e-6 + (3e-4 - 1e-6) * 0.5)  # 1.505e-4
    assert blip_step_lr(0, 3000, **blip) == pytest.approx(3e-4)
    assert blip_step_lr(0, 9000, **blip) == pytest.approx(3e-4)  # warmup saturates at init_lr
    assert blip_step_lr(1, 0, **blip) == pytest.approx(2.7e-4)  # epoch 1: 3e-4 * 0.9, whatever the step
    assert blip_step_lr(1, 10, **blip) == pytest.approx(2.7e-4)
    assert blip_step_lr(19, 0, **blip) == pytest.approx(3e-4 * 0.9**19)  # 4.05e-5 in the paper's last epoch
    assert blip_step_lr(5, 0, **{**blip, "lr_decay_rate": 0.1}) == pytest.approx(1e-6)  # floored at min_lr
    assert blip_step_lr(0, 4, **{**blip, "warmup_steps": 0}) == pytest.approx(3e-4)

    assert cosine_lr(0, 10, 1e-5, 0.0) == pytest.approx(1e-5)
    assert cosine_lr(5, 10, 1e-5, 0.0) == pytest.approx(5e-6)
    assert cosine_lr(10, 10, 1e-5, 1e-7) == pytest.approx(1e-7)

    args = argparse.Namespace(lr_schedule="step", epochs=20, **blip)
    assert learning_rate(args, 0, 1500) == pytest.approx(1.505e-4)
    args.lr_schedule = "cosine"
    assert learning_rate(args, 10, 123) == pytest.approx((3e-4 + 1e-6) / 2)


def test_alpha_ramp_over_two_epochs():
    assert alpha_ramp(0.4, 0, 0, 100) == 0.0
    assert alpha_ramp(0.4, 0, 50, 100) == pytest.approx(0.1)
    assert alpha_ramp(0.4, 1, 0, 100) == pytest.approx(0.2)
    assert alpha_ramp(0.4, 1, 50, 100) == pytest.approx(0.3)
    assert alpha_ramp(0.4, 2, 0, 100) == pytest.approx(0.4)
    assert alpha_ramp(0.4, 7, 99, 100) == pytest.approx(0.4)


def test_rng_capture_restore_and_checkpoint_paths(tmp_path):
    state = checkpointing.capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(3)  # move every stream on
    checkpointing.restore_rng(state)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])

    with pytest.raises(FileNotFoundError, match="latest"):
        checkpointing.resolve_checkpoint(tmp_path)
    for step in (5, 10, 15):
        (tmp_path / checkpointing.tag_for(step)).mkdir()
    (tmp_path / "latest").write_text("global_step15\n")
    assert checkpointing.latest_tag(tmp_path) == "global_step15"
    assert checkpointing.resolve_checkpoint(tmp_path) == (tmp_path, "global_step15")
    assert checkpointing.resolve_checkpoint(tmp_path / "global_step5") == (tmp_path, "global_step5")
    checkpointing._remove_old_checkpoints(tmp_path, keep=2, current="global_step15")
    assert sorted(path.name for path in tmp_path.glob("global_step*")) == ["global_step10", "global_step15"]


@pytest.mark.parametrize("target, refused", [
    ("run", "lies in the training run"), ("run/global_step4", "lies in the training run"),
    ("run/tokenizer", "lies in the training run"), ("run/../run/global_step4/x", "lies in the training run"),
    ("run/export", "holds files no export writes"), ("models", r"holds files no export writes \(notes.txt\)"),
    ("project", r"holds files no export writes \(main.py\)"),
    ("hf_model", r"holds files no export writes \(config.json \(another tool's model\)\)"),
    ("other_run/tokenizer", r"holds files no export writes \(tokenizer.json without a blip_fast config.json"),
    ("run/export/captioning", None), ("run/export/new", None), ("earlier_export", None), ("new/deeper", None),
    ("cut_short", None), ("cut_shorter", None),
])
def test_export_targets_that_would_mix_with_other_files_are_refused(tmp_path, target, refused):
    """``python -m blip_fast.train export --out``: not into the run's own folder (the HF files would mix with its
    checkpoints, and --init_from would then see two kinds of folder in one), not into a folder of other files; an
    earlier export, even one a kill cut short, is replaced."""
    for folder in ("run/global_step4", "run/tokenizer", "run/export/captioning", "models", "earlier_export",
                   "project", "hf_model", "other_run/tokenizer"):
        (tmp_path / folder).mkdir(parents=True)
    ours = json.dumps({"model_type": "blip", "blip_fast_hf_compat": True})
    for folder in ("run/export/captioning", "earlier_export"):
        (tmp_path / folder / "config.json").write_text(ours)
        (tmp_path / folder / "vocab.txt").write_text("[PAD]\n")
    (tmp_path / "models" / "notes.txt").write_text("mine")
    (tmp_path / "project" / "config.json").write_text('{"db": "prod"}')  # a user's config.json among their code
    (tmp_path / "project" / "main.py").write_text("print(1)")
    (tmp_path / "hf_model" / "config.json").write_text('{"model_type": "blip"}')  # every name an export's
    (tmp_path / "hf_model" / "model.safetensors").write_bytes(b"")
    for name in ("tokenizer.json", "vocab.txt"):  # another training run's tokenizer folder
        (tmp_path / "other_run" / "tokenizer" / name).write_text("{}")
    for folder, name in (("cut_short", "model.safetensors"), ("cut_shorter", ".model.safetensors.x1y2.tmp")):
        (tmp_path / folder).mkdir()  # an export killed before its config.json (or during its weights)
        (tmp_path / folder / name).write_bytes(b"")
    if refused is None:
        checkpointing.check_export_target(tmp_path / "run", tmp_path / target)
    else:
        with pytest.raises(errors.InvalidInputError, match=refused):
            checkpointing.check_export_target(tmp_path / "run", tmp_path / target)


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "{run}/nope"], "{run}/nope: no such folder (give a blip_fast.train output_dir or one of its "
                                     "global_stepN folders)"),
    (["--checkpoint", "{run}/global_step9"], "{run}/global_step9: no such folder"),
    (["--checkpoint", "{run}", "--tag", "global_step9"], "checkpoint 'global_step9' is not one of {run} (this run "
                                                         "has: global_step2, global_step4)"),
    (["--checkpoint", "{run}", "--tag", ""], "checkpoint '' is not one of {run} (this run has: global_step2, "),
    (["--checkpoint", "{run}", "--tag", "tokenizer"], "checkpoint 'tokenizer' is not one of {run} (this run has: "),
    (["--checkpoint", "{run}"], None),
    (["--checkpoint", "{models}"], "{models} has no `latest` file: not a DeepSpeed checkpoint directory"),
    (["--checkpoint", "{unnamed}"], "{unnamed} has no `latest` file: give one of its checkpoints (global_step2, "
                                    "global_step4), e.g. {unnamed}/global_step4"),
], ids=["missing", "missing-tag-folder", "missing-tag", "empty-tag", "other-folder-tag", "found", "no-latest",
        "checkpoints-without-latest"])
def test_export_of_a_checkpoint_that_is_not_there_is_one_line(tmp_path, capsys, argv, message):
    from blip_fast.train import main

    run, unnamed = tmp_path / "run", tmp_path / "unnamed"
    for folder in (run, unnamed):
        for step in (2, 4):
            (folder / f"global_step{step}").mkdir(parents=True)
            (folder / f"global_step{step}" / "mp_rank_00_model_states.pt").write_bytes(b"")
    (run / "latest").write_text("global_step4")
    (run / "tokenizer").mkdir()
    (tmp_path / "models").mkdir()
    where = {"run": run, "models": tmp_path / "models", "unnamed": unnamed}
    argv = ["export", *[arg.format(**where) for arg in argv], "--out", str(tmp_path / "out")]
    if message is None:  # the checkpoint resolves: the export goes on to read the run (this fake one has no config)
        assert checkpointing.resolve_checkpoint(argv[2]) == (run, "global_step4")
        return
    code = main(argv)
    [line] = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message.format(**where) in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("latest, message", [
    ("global_step8", "names checkpoint global_step8, but {run}/global_step8 is not there"),
    ("global_step6", "names checkpoint global_step6, but {run}/global_step6 holds no model states"),
    ("global_step4", None), ("global_step2", None),
])
def test_a_resume_from_a_checkpoint_that_is_not_there_says_so(tmp_path, latest, message):
    """``latest`` naming a deleted (or emptied) checkpoint folder: one line listing the checkpoints that are there,
    instead of DeepSpeed's bare AssertionError after the model is built."""
    run = tmp_path / "run"
    for tag, files in (("global_step2", ["mp_rank_00_model_states.pt"]), ("global_step6", []),
                       ("global_step4", ["zero_pp_rank_0_mp_rank_00_model_states.pt",
                                         "zero_pp_rank_0_mp_rank_00_optim_states.pt"])):
        (run / tag).mkdir(parents=True)
        for name in files:
            torch.save({}, run / tag / name)
    (run / checkpointing.LATEST_FILE).write_text(latest)
    if message is None:
        checkpointing.check_resumable(run, latest, world_size=1)
        return
    with pytest.raises(options.ConfigError) as refused:
        checkpointing.check_resumable(run, latest, world_size=1)
    assert message.format(run=run) in str(refused.value)
    assert "write the tag of a checkpoint that is there into latest (global_step2, global_step4)" in str(refused.value)


@pytest.mark.parametrize("damaged", ["mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                     "rng_rank1.pt"])
def test_a_checkpoint_with_a_file_cut_short_is_refused_naming_it(tmp_path, damaged):
    """A disk that filled up, a copy cut short: DeepSpeed's zip reader fails on every rank with a traceback that names
    no file. The files are checked (their zip directory, at the end) before the model is built."""
    run = tmp_path / "run"
    for tag in ("global_step2", "global_step4"):
        (run / tag).mkdir(parents=True)
        for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                     "zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank0.pt", "rng_rank1.pt"):
            torch.save({"weights": torch.zeros(1000)}, run / tag / name)
    (run / checkpointing.LATEST_FILE).write_text("global_step4")
    checkpointing.check_resumable(run, "global_step4", world_size=2)
    path = run / "global_step4" / damaged
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(options.ConfigError) as refused:
        checkpointing.check_resumable(run, "global_step4", world_size=2)
    assert f"{run / 'global_step4'} holds damaged files ({damaged}: not complete torch files): resume from an " \
        f"earlier checkpoint by writing its tag into {run / 'latest'} (global_step2)" in str(refused.value)


def test_damaged_run_files_are_one_line(tmp_path):
    """A `latest` that is no text, a run without its tokenizer (export asked the hub for it, after reading the
    checkpoint), a config.yaml naming no task: one line naming the file, not a traceback."""
    (tmp_path / "global_step2").mkdir()
    torch.save({}, tmp_path / "global_step2" / "mp_rank_00_model_states.pt")
    (tmp_path / checkpointing.LATEST_FILE).write_bytes(b"\x00\xff\xfe")
    with pytest.raises(errors.InvalidInputError, match=rf"{tmp_path / 'latest'} is not a checkpoint tag \(not text\): "
                                                       r"write the tag of a checkpoint that is there into it "
                                                       r"\(global_step2\)"):
        checkpointing.latest_tag(tmp_path)
    (tmp_path / checkpointing.LATEST_FILE).write_text("global_step2")
    checkpointing.write_model_config(tmp_path, BlipConfig.tiny())
    with pytest.raises(errors.MissingFileError, match=rf"no tokenizer/ folder in {tmp_path}: the run's tokenizer"):
        checkpointing.export(tmp_path, {"captioning": tmp_path.parent / "out"})
    (tmp_path / options.RESOLVED_CONFIG_FILE).write_text("task: pretraining\n")
    with pytest.raises(options.ConfigError, match="unknown task 'pretraining' \\(one of pretrain, "):
        tasks.run_task(tmp_path)


@pytest.mark.parametrize("tags, refused", [((), False), (("global_step4",), False),
                                           (("global_step4", "global_step8"), True)])
def test_checkpoints_without_latest(tmp_path, caplog, tags, refused):
    """No ``latest``: nothing was committed. One checkpoint folder is the first one, cut short by a kill (the run
    starts again); several mean ``latest`` was removed, and starting again would overwrite complete checkpoints."""
    for tag in tags:
        (tmp_path / tag).mkdir()
        torch.save({}, tmp_path / tag / "mp_rank_00_model_states.pt")
    if refused:
        with pytest.raises(options.ConfigError, match=rf"{tmp_path} holds checkpoints global_step4, global_step8 but "
                                                      "no `latest` file naming the newest complete one"):
            checkpointing.resume_tag(tmp_path)
        return
    with caplog.at_level("WARNING", logger="blip_fast"):
        assert checkpointing.resume_tag(tmp_path) is None
    assert ("global_step4 was never committed" in caplog.text) == bool(tags)


def test_model_config_round_trip(tmp_path):
    config = BlipConfig.tiny(vocab_size=300, image_size=32)
    config = config.replace(vision=config.vision.__class__(**{**config.vision.__dict__,
                                                               "gradient_checkpointing": True}))
    checkpointing.write_model_config(tmp_path, config)
    assert checkpointing.read_model_config(tmp_path) == config


# ==================================================================================================== launcher runs
def _env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _remove_shm(port: int) -> None:
    """DeepSpeed's CPU all-reduce leaves /dev/shm/deepspeed_*_<addr>_<port>_<rank> (69 MB per rank) behind."""
    shm = Path("/dev/shm")
    if shm.is_dir():
        for path in shm.glob(f"deepspeed_*_{port}_*"):
            path.unlink(missing_ok=True)


def _train_command(launcher: str, port: int, output_dir: Path, *extra: str, config: Path = TINY) -> list[str]:
    if launcher == "deepspeed":
        head = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), "--module", "blip_fast.train"]
    elif launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                "-m", "blip_fast.train"]
    else:
        head = [sys.executable, "-m", "blip_fast.train"]
    return [*head, "--config", str(config), "--output_dir", str(output_dir), "--no-progress_bar", *extra]


def _run(command: list[str], log: Path, port: int, status: int = 0) -> str:
    """Run ``command`` to its end; it must exit with ``status`` and (when it trained: status 0) leave none of
    DeepSpeed's shared-memory buffers behind."""
    try:
        with open(log, "w") as handle:
            result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=_env(), cwd=log.parent,
                                    timeout=LAUNCH_TIMEOUT)
        left = sorted(path.name for path in Path("/dev/shm").glob(f"deepspeed_*_{port}_*"))
    finally:
        _remove_shm(port)
    text = log.read_text()
    assert result.returncode == status, f"{' '.join(command)} exited {result.returncode}:\n{text[-6000:]}"
    assert not (status == 0 and left), f"DeepSpeed's buffers were left in /dev/shm: {left}"
    return text


def _train(launcher: str, output_dir: Path, *extra: str, config: Path = TINY) -> str:
    port = free_port()
    return _run(_train_command(launcher, port, output_dir, *extra, config=config),
                output_dir.parent / f"{output_dir.name}.log", port)


def _kill_after_checkpoint(command: list[str], output_dir: Path, step: int, port: int, linger: float) -> None:
    """Start ``command``, SIGKILL its whole process group ``linger`` seconds after its step-``step`` checkpoint is
    committed (the steps trained meanwhile are lost), and check that no later checkpoint was committed."""
    tag = checkpointing.tag_for(step)
    log = output_dir.parent / f"{output_dir.name}-killed.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=_env(), cwd=log.parent,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while checkpointing.latest_tag(output_dir) != tag:
            assert process.poll() is None, f"the run ended before its {tag} checkpoint:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no {tag} checkpoint in time"
            time.sleep(0.05)
        time.sleep(linger)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        _remove_shm(port)
    assert checkpointing.latest_tag(output_dir) == tag, f"the run was not killed between {tag} and the next checkpoint"


def _metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _summary(log: str) -> dict:
    lines = [line for line in log.splitlines() if line.startswith('{"summary"')]
    return json.loads(lines[-1])["summary"]


def _consolidated(output_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return checkpointing.consolidated_state_dict(output_dir, checkpointing.tag_for(step))


def _max_differences(state_a: dict, state_b: dict) -> dict[str, float]:
    assert state_a.keys() == state_b.keys(), sorted(set(state_a) ^ set(state_b))
    return {key: float((state_a[key].double() - state_b[key].double()).abs().max()) for key in state_a}


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory):
    """2-rank ZeRO-2 run of the tiny config: 30 steps over 2 epochs, a checkpoint every 5, exports at the end."""
    output_dir = tmp_path_factory.mktemp("train") / "zero2"
    started = time.perf_counter()
    log = _train("deepspeed", output_dir, "--deepspeed_config", str(CONFIGS / "ds_zero2.json"),
                 "--save_every_steps", "5", "--log_every_steps", "1", "--export_tasks", "captioning", "retrieval")
    return {"dir": output_dir, "log": log, "seconds": time.perf_counter() - started}


@pytest.mark.slow
def test_deepspeed_zero2_two_ranks_loss_falls(zero2_run, record_property):
    output_dir = zero2_run["dir"]
    records = _metrics(output_dir)
    assert [record["step"] for record in records] == list(range(1, 31))
    assert [record["epoch"] for record in records] == [0] * 15 + [1] * 15  # the 15th step ends epoch 0
    losses = [record["loss"] for record in records]
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < first - 1.0, f"loss did not fall: first 5 {first:.3f}, last 5 {last:.3f}"
    for name in ("loss_itc", "loss_itm", "loss_lm"):
        assert all(np.isfinite(record[name]) for record in records)
    assert records[0]["lr"] == pytest.approx(1e-5) and records[-1]["lr"] == pytest.approx(9e-4)  # epoch 1: x 0.9
    assert records[-1]["alpha"] == pytest.approx(0.4 * 29 / 30)

    # DeepSpeed's checkpoint layout plus the per-rank RNG files and run files.
    assert checkpointing.latest_tag(output_dir) == "global_step30"
    assert sorted(int(path.name.removeprefix("global_step")) for path in output_dir.glob("global_step*")) == [
        5, 10, 15, 20, 25, 30]
    for name in ("zero_to_fp32.py", "config.yaml", "ds_config.json", "blip_config.json", "tokenizer/vocab.txt",
                 "global_step30/rng_rank0.pt", "global_step30/rng_rank1.pt",
                 "global_step30/mp_rank_00_model_states.pt"):
        assert (output_dir / name).exists(), name
    resolved = yaml.safe_load((output_dir / "config.yaml").read_text())
    assert resolved["save_every_steps"] == 5 and resolved["queue_size"] == 64

    samples_per_s = _summary(zero2_run["log"])["samples_per_s"]
    record_property("tiny_cpu_samples_per_s", samples_per_s)
    print(f"\ntiny config, 2 ranks x 1 thread, ZeRO-2 fp32, CPU: {samples_per_s:.1f} samples/s "
          f"(30 steps, whole launch {zero2_run['seconds']:.1f} s)")


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(zero2_run, tmp_path):
    """Run B is SIGKILLed (whole process group) after its step-10 checkpoint, resumed with --resume to step 30, and
    must end where the uninterrupted run A ended: same weights, optimizer-driven updates, momentum encoders, queues."""
    run_a, run_b = zero2_run["dir"], tmp_path / "killed"
    port = free_port()
    # B trains its own vocab (the same as A's: blip_fast.wordpiece is deterministic across processes) and
    # checkpoints every 10 steps, A every 5: saving must not change the trajectory. B logs every 3 steps, so its
    # step-12 line averages steps 10 to 12 across the resume.
    command = _train_command("deepspeed", port, run_b, "--deepspeed_config", str(CONFIGS / "ds_zero2.json"),
                             "--save_every_steps", "10", "--log_every_steps", "3", "--export_tasks")
    _kill_after_checkpoint(command, run_b, 10, port, linger=0.5)  # a few steps past the checkpoint are lost

    resumed_log = _run([*command, "--resume"], tmp_path / "resumed.log", port)
    assert "resumed" in resumed_log and "at step 10" in resumed_log
    assert (run_b / "tokenizer" / "tokenizer.json").read_bytes() == (run_a / "tokenizer" / "tokenizer.json").read_bytes()
    differences = _max_differences(_consolidated(run_a, 30), _consolidated(run_b, 30))
    worst = max(differences, key=differences.get)
    assert differences[worst] <= 1e-6, f"{worst} differs by {differences[worst]}"
    state_a, state_b = _consolidated(run_a, 30), _consolidated(run_b, 30)
    for key in QUEUE_KEYS:
        assert torch.equal(state_a[key], state_b[key]), key
    assert int(state_b["ptr_queue"]) == 30 * 16 % 64
    # The killed run's records past step 10 were dropped on resume; each record is the mean of A's three steps.
    records_b = _metrics(run_b)
    assert [record["step"] for record in records_b] == list(range(3, 31, 3))
    losses_a = [record["loss"] for record in _metrics(run_a)]
    assert [record["loss"] for record in records_b] == pytest.approx(
        [np.mean(losses_a[end - 3 : end]) for end in range(3, 31, 3)], abs=1e-6)


@pytest.mark.slow
def test_a_refused_resume_leaves_the_run_as_it_was(zero2_run, tmp_path):
    """Resumes DeepSpeed cannot continue (another batch, another ZeRO stage, ``latest`` removed) stop with one line
    and leave the run's config.yaml and ds_config.json as they were, so its own saved config still resumes it."""
    run = tmp_path / "run"
    shutil.copytree(zero2_run["dir"], run, ignore=shutil.ignore_patterns("export"))
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "ds_config.json", "metrics.jsonl")}

    def refused(*extra: str) -> str:
        port = free_port()
        log = _run(_train_command("deepspeed", port, run, "--resume", *extra, config=run / "config.yaml"),
                   tmp_path / "refused.log", port, status=2)
        assert {name: (run / name).read_bytes() for name in before} == before
        return log

    assert f"cannot resume {run}/global_step30 exactly" in refused("--micro_batch_size", "4")
    assert f"{run} holds checkpoints DeepSpeed cannot load under this ds_config ({run / 'ds_config.json'}: ZeRO " \
        'stage: "1 or 2" there, "3" here)' in refused("--deepspeed_config", str(CONFIGS / "ds_zero3.json"))
    (run / checkpointing.LATEST_FILE).unlink()
    assert f"{run} holds checkpoints global_step5, global_step10, global_step15, global_step20, global_step25, " \
        "global_step30 but no `latest` file" in refused()


@pytest.mark.slow
def test_a_rerun_before_the_first_checkpoint_was_committed_starts_over_cleanly(tmp_path):
    """Killed while it wrote its first checkpoint: no ``latest``, a half-written ``global_step2`` and two loss
    records. The rerun starts from step 0, rewrites the checkpoint and logs each step once."""
    run = tmp_path / "run"
    (run / "global_step2").mkdir(parents=True)
    (run / checkpointing.BLIP_CONFIG_FILE).write_text("{}")  # a run's own folder (written before its first step)
    (run / "global_step2" / "mp_rank_00_model_states.pt").write_bytes(b"cut short")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n')
    log = _train("python", run, "--resume", "--max_steps", "2", "--save_every_steps", "2", "--log_every_steps", "1",
                 "--export_tasks")
    assert "global_step2 was never committed" in log
    assert [record["step"] for record in _metrics(run)] == [1, 2] and _metrics(run)[0]["loss"] != 9.0
    assert checkpointing.latest_tag(run) == "global_step2"


@pytest.mark.slow
def test_zero1_and_zero3_train_like_zero2(zero2_run, tmp_path):
    """5 steps of ZeRO-1 and ZeRO-3 against the ZeRO-2 run's step-5 checkpoint and per-step losses.

    ZeRO-1 reduces gradients as ZeRO-2 does: bit-identical. ZeRO-3 reduce-scatters in another order: the losses agree
    to float rounding, and so do the weights, except where Adam normalises pure rounding noise into lr-sized steps
    (the ViT's key bias gets no gradient in exact arithmetic). A stale momentum encoder under ZeRO-3 (EMA written to
    the partitions while a gathered copy is kept, see configs/ds_zero3.json) moves the step-2 loss by ~1e-3."""
    reference = _consolidated(zero2_run["dir"], 5)
    reference_losses = [record["loss"] for record in _metrics(zero2_run["dir"])[:5]]
    common = ["--tokenizer_dir", str(zero2_run["dir"] / "tokenizer"), "--max_steps", "5", "--log_every_steps", "1"]
    _train("deepspeed", tmp_path / "zero1", "--deepspeed_config", str(CONFIGS / "ds_zero1.json"), *common,
           "--export_tasks")
    differences = _max_differences(reference, _consolidated(tmp_path / "zero1", 5))
    assert max(differences.values()) <= 1e-6, max(differences.items(), key=lambda item: item[1])
    assert [record["loss"] for record in _metrics(tmp_path / "zero1")] == pytest.approx(reference_losses, abs=1e-6)

    _train("deepspeed", tmp_path / "zero3", "--deepspeed_config", str(CONFIGS / "ds_zero3.json"), *common,
           "--export_tasks")
    assert [record["loss"] for record in _metrics(tmp_path / "zero3")] == pytest.approx(reference_losses, rel=1e-5)
    differences = _max_differences(reference, _consolidated(tmp_path / "zero3", 5))
    assert max(differences.values()) <= 2e-4, max(differences.items(), key=lambda item: item[1])
    momentum = {key: value for key, value in differences.items() if key.endswith("_m") or "_m." in key}
    assert momentum and max(momentum.values()) <= 1e-5
    assert differences["image_queue"] <= 1e-4 and differences["text_queue"] <= 1e-4
    assert differences["ptr_queue"] == 0 and differences["idx_queue"] == 0


@pytest.mark.slow
def test_zero3_bf16_stop_and_resume_is_exact(zero2_run, tmp_path):
    """bf16 ZeRO-3 (bf16 weights, momentum encoders and queues; fp32 master weights): 3 steps in one go equal
    1 step, a stop, and --resume for 2 more; the bf16 run trains and its checkpoint exports."""
    common = ["--deepspeed_config", str(CONFIGS / "ds_zero3_bf16.json"), "--tokenizer_dir",
              str(zero2_run["dir"] / "tokenizer"), "--log_every_steps", "1", "--save_every_steps", "1"]
    _train("deepspeed", tmp_path / "straight", *common, "--max_steps", "3", "--export_tasks", "captioning")
    _train("deepspeed", tmp_path / "split", *common, "--max_steps", "1", "--export_tasks")
    _train("deepspeed", tmp_path / "split", *common, "--max_steps", "3", "--export_tasks", "--resume")
    straight, split = _consolidated(tmp_path / "straight", 3), _consolidated(tmp_path / "split", 3)
    differences = _max_differences(straight, split)
    assert max(differences.values()) == 0.0, max(differences.items(), key=lambda item: item[1])
    losses = [record["loss"] for record in _metrics(tmp_path / "straight")]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert losses == pytest.approx([record["loss"] for record in _metrics(tmp_path / "split")], abs=0)
    # bf16 follows the fp32 run's first loss closely (same data, same initial weights).
    assert losses[0] == pytest.approx(_metrics(zero2_run["dir"])[0]["loss"], rel=1e-2)

    from blip_fast import BlipForConditionalGeneration

    model = BlipForConditionalGeneration.from_pretrained(tmp_path / "straight" / "export" / "captioning")
    assert torch.equal(model.state_dict()["vision_model.embeddings.patch_embedding.weight"],
                       straight["vision_model.embeddings.patch_embedding.weight"])


@pytest.mark.slow
def test_exports_load_in_blip_fast_and_transformers(zero2_run, tmp_path):
    import transformers

    import blip_fast

    export_dir = zero2_run["dir"] / "export"
    final = _consolidated(zero2_run["dir"], 30)
    pixel_values = torch.randn(2, 3, 64, 64)
    tokenizer = blip_fast.BlipTokenizer.from_pretrained(export_dir / "captioning")
    text = tokenizer(["a red circle", "two blue squares on the left"], padding=True, return_tensors="pt")

    ours = blip_fast.BlipForConditionalGeneration.from_pretrained(export_dir / "captioning")
    theirs, info = transformers.BlipForConditionalGeneration.from_pretrained(export_dir / "captioning",
                                                                             output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert torch.equal(ours.state_dict()["text_decoder.bert.encoder.layer.0.attention.self.query.weight"],
                       final["text_decoder.bert.encoder.layer.0.attention.self.query.weight"])
    with torch.no_grad():
        vision_ours = ours.vision_model(pixel_values).last_hidden_state
        vision_theirs = theirs.eval().vision_model(pixel_values).last_hidden_state
    torch.testing.assert_close(vision_ours, vision_theirs, rtol=1e-5, atol=1e-5)

    retrieval = blip_fast.BlipForImageTextRetrieval.from_pretrained(export_dir / "retrieval")
    theirs, info = transformers.BlipForImageTextRetrieval.from_pretrained(export_dir / "retrieval",
                                                                          output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        itc_ours = retrieval(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                             pixel_values=pixel_values, use_itm_head=False)
        itc_theirs = theirs.eval()(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                                   pixel_values=pixel_values, use_itm_head=False)
    torch.testing.assert_close(itc_ours[0], itc_theirs[0], rtol=1e-5, atol=1e-5)

    # The export subcommand, from a mid-run checkpoint, to a task the run did not export.
    from blip_fast.train import main

    assert main(["export", "--checkpoint", str(zero2_run["dir"] / "global_step10"), "--out",
                 str(tmp_path / "vqa"), "--task", "vqa"]) == 0
    vqa = blip_fast.BlipForQuestionAnswering.from_pretrained(tmp_path / "vqa")
    step10 = _consolidated(zero2_run["dir"], 10)
    assert torch.equal(vqa.state_dict()["text_encoder.embeddings.word_embeddings.weight"],
                       step10["text_encoder.embeddings.word_embeddings.weight"])
    # Not into the run's own folder: one line, exit 2, nothing written there.
    assert main(["export", "--checkpoint", str(zero2_run["dir"]), "--out", str(zero2_run["dir"])]) == 2
    assert not (zero2_run["dir"] / "config.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_single_process_and_torchrun_launch(launcher, tmp_path):
    """`python -m blip_fast.train` (no launcher env: the script sets RANK/WORLD_SIZE/MASTER_* itself) and torchrun,
    with the ds_config named in the YAML (resolved next to it) and a vocab trained on the captions. The single
    process reads BLIP json annotations and runs gradient accumulation (2 micro batches of 4 per step, overriding
    the ds_config's 8 x 1)."""
    output_dir = tmp_path / launcher
    ranks, micro, accumulation = (1, 4, 2) if launcher == "python" else (2, 8, 1)
    extra = []
    if launcher == "python":
        from blip_fast.data import SyntheticNoisyDataset

        annotations = SyntheticNoisyDataset(64, seed=1).write_images(tmp_path / "json_data")
        extra = ["--micro_batch_size", "4", "--gradient_accumulation_steps", "2", "--data", "blip_json",
                 "--annotations", str(annotations), "--image_root", str(tmp_path / "json_data")]
    log = _train(launcher, output_dir, "--max_steps", "3", "--log_every_steps", "1", "--export_tasks", *extra)
    assert checkpointing.latest_tag(output_dir) == "global_step3"
    assert sorted(path.name for path in (output_dir / "global_step3").glob("rng_rank*.pt")) == [
        f"rng_rank{rank}.pt" for rank in range(ranks)]
    assert f"{ranks} ranks x {micro} micro batch x {accumulation} accumulation" in log
    assert f"{8 if launcher == 'python' else 15} per epoch" in log  # 64 json samples / 8, or 240 synthetic / 16
    records = _metrics(output_dir)
    assert [record["step"] for record in records] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in records)
    ds_config = json.loads((output_dir / options.RESOLVED_DS_CONFIG_FILE).read_text())
    assert (ds_config["train_micro_batch_size_per_gpu"], ds_config["gradient_accumulation_steps"]) == (
        micro, accumulation)
    # A second start without --resume refuses to overwrite the checkpoints.
    port = free_port()
    command = _train_command(launcher, port, output_dir, "--max_steps", "3")
    result = subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=tmp_path,
                            timeout=LAUNCH_TIMEOUT)
    _remove_shm(port)
    assert result.returncode != 0 and "pass --resume" in result.stdout + result.stderr
    if launcher == "python":  # a finished run resumed with fewer steps trains nothing, and says so
        port = free_port()
        log = _run(_train_command(launcher, port, output_dir, "--resume", "--max_steps", "2", *extra),
                   tmp_path / "again.log", port)
        assert "the checkpoint is at step 3, the run has 2 steps: nothing to train" in log
        assert checkpointing.latest_tag(output_dir) == "global_step3" and len(_metrics(output_dir)) == 3


@pytest.mark.slow
def test_a_second_run_into_a_busy_output_dir_is_refused(tmp_path):
    """The command started twice (a second terminal, a retrying scheduler): the second run stops with one line naming
    the first, before writing anything, and the first trains on; once the first is gone, the folder is free."""
    from blip_fast.output_lock import lock_folder

    output_dir, port = tmp_path / "run", free_port()
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(_train_command("python", port, output_dir, "--max_steps", "500"), stdout=log,
                                 stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while not (output_dir / options.RESOLVED_CONFIG_FILE).is_file():
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the first run never started"
            time.sleep(0.1)
        resolved = (output_dir / options.RESOLVED_CONFIG_FILE).read_bytes()
        second_port = free_port()
        second = subprocess.run(_train_command("python", second_port, output_dir, "--resume", "--max_steps", "3"),
                                capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=LAUNCH_TIMEOUT)
        _remove_shm(second_port)
        assert second.returncode == 2, second.stdout + second.stderr
        [line] = [line for line in second.stderr.splitlines() if "error" in line]
        assert f"{output_dir} is in use by another run (pid {first.pid} on " in line
        assert first.poll() is None and (output_dir / options.RESOLVED_CONFIG_FILE).read_bytes() == resolved
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        _remove_shm(port)
    lock_folder(output_dir, "the next run", ours=[checkpointing.BLIP_CONFIG_FILE]).release()  # no stale lock


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_run_stopped_while_it_builds_deepspeeds_op_leaves_no_build_lock(tmp_path, stop):
    """A first run stopped (kill, Ctrl-C, a stopped demo) while DeepSpeed JIT-builds its CPU comm op: the build's
    lock file goes with it. Left behind, every later run on the machine would wait on it forever."""
    extensions, port = tmp_path / "torch_extensions", free_port()
    lock = extensions / "deepspeed_shm_comm" / "lock"
    with open(tmp_path / "run.log", "w") as log:
        process = subprocess.Popen(_train_command("python", port, tmp_path / "run"), stdout=log,
                                   stderr=subprocess.STDOUT, env={**_env(), "TORCH_EXTENSIONS_DIR": str(extensions)},
                                   cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while not lock.exists():
            assert process.poll() is None, (tmp_path / "run.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the build never started"
            time.sleep(0.02)
        process.send_signal(stop)
        returncode = process.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):  # its group may be gone already
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        _remove_shm(port)
    assert returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[stop], (tmp_path / "run.log").read_text()[-4000:]
    assert not lock.exists(), "the stopped build left its lock"
