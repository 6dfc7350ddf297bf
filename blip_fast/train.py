"""BLIP pre-training (ITC + ITM + LM) and fine-tuning of CapFilt's filter (retrieval: ITC + ITM) and captioner
(captioning: LM), and of BLIP's VQA (vqa) and NLVR2 (nlvr) models, with DeepSpeed ZeRO 1/2/3, exact resume, and
export to HF-layout dirs.

Launch it any of three ways (options: ``--help``; configs: ``configs/``)::

    deepspeed --num_gpus 8 --module blip_fast.train --config configs/base-224-pretrain.yaml \\
        --deepspeed_config configs/ds_zero2_bf16.json
    torchrun --nproc_per_node 8 -m blip_fast.train --config configs/base-224-pretrain.yaml ...
    python -m blip_fast.train --config configs/tiny-cpu.yaml          # one process, no launcher

Fine-tune from a pre-training output dir (or an HF-layout task dir); the model config and tokenizer come with it::

    python -m blip_fast.train --config configs/tiny-cpu-captioning.yaml --init_from output/tiny-cpu \\
        --data blip_json --annotations clean.json --image_root images --output_dir output/captioner

What differs per task lives in :mod:`blip_fast.training.tasks`. Add ``--resume`` to continue exactly from
``output_dir/latest`` (same data order, RNG streams, queues, optimizer; see :mod:`blip_fast.training.checkpointing`).
At the end, ``output_dir/export/<task>`` holds each exported task model as a complete HF-layout dir (weights,
config.json, tokenizer, preprocessor_config.json): ``captioning`` and ``retrieval`` after pre-training, the
fine-tuned task's model after fine-tuning. Export any checkpoint later::

    python -m blip_fast.train export --checkpoint output/pretrain --out exported --task captioning retrieval

One step = one optimizer step over ``gradient_accumulation_steps`` micro batches of
``train_micro_batch_size_per_gpu`` per rank; epochs, LR and alpha count these steps (BLIP's iterations).
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import json
import logging
import os
import random
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blip_fast import errors
from blip_fast.build_locks import watch_build_locks
from blip_fast.data.workers import die_with_parent
from blip_fast.determinism import use_deterministic_algorithms
from blip_fast.launch import free_port, sigterm_raises, stop_with_parent
from blip_fast.output_lock import OutputLock, command_line, lock_folder
from blip_fast.training import checkpointing, options, tasks
from blip_fast.training.schedule import alpha_ramp, learning_rate

logger = logging.getLogger("blip_fast")
METRICS_FILE = "metrics.jsonl"


# ---------------------------------------------------------------------------------------------------- process setup
def default_single_process_env() -> None:
    """Rank/world variables for a plain ``python -m blip_fast.train``: without them DeepSpeed looks for MPI."""
    launched = ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
    if any(name in os.environ for name in launched):
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def claim_output_dir(output_dir: Path) -> OutputLock | None:
    """Fail early and clearly unless ``output_dir`` is this run's alone and every rank sees what rank 0 writes there.

    Rank 0 locks the folder (:func:`~blip_fast.output_lock.lock_folder`) and returns the lock, to hold while the run
    lives: a second run into it (the command started twice), a run into a folder of other files (no training run's)
    or one rank 0 cannot create stops on every rank with one line, before anything is written.

    Rank 0 writes the run files, the tokenizer and ``latest``, every rank its shards and RNG/EMA files, and every rank
    reads them back (the tokenizer now, the checkpoint on ``--resume``): on several machines, ``output_dir`` must be on
    a filesystem they share (as DeepSpeed's own checkpointing assumes).
    """
    import torch.distributed as dist

    rank = dist.get_rank()
    lock, refused = None, None
    if rank == 0:
        try:
            lock = lock_folder(output_dir, command_line(), ours=[checkpointing.LATEST_FILE,
                                                                 checkpointing.BLIP_CONFIG_FILE,
                                                                 checkpointing.TOKENIZER_DIR])
        except (errors.UserError, OSError) as error:  # every rank raises it: none waits for rank 0 below
            refused = error
    shared = [uuid.uuid4().hex, refused] if rank == 0 else [None, None]
    dist.broadcast_object_list(shared, src=0)
    token, refused = shared
    if refused is not None:
        raise refused
    marker = output_dir / f".rank0-{token}"
    if rank == 0:
        marker.write_text(socket.gethostname(), encoding="utf-8")
    dist.barrier()
    blind = torch.tensor([0.0 if marker.is_file() else 1.0])
    dist.all_reduce(blind)
    if rank == 0:
        marker.unlink()
    if blind.item():
        if lock is not None:
            lock.release()
        raise RuntimeError(f"{int(blind.item())} rank(s) cannot see {output_dir} as rank 0 ({socket.gethostname()}) "
                           "writes it: on several nodes, output_dir must be on a filesystem every node shares")
    return lock


def _configure_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)


# ---------------------------------------------------------------------------------------------------- data, model
def build_dataset(args: argparse.Namespace, image_size: int):
    """The map-style training dataset of ``args.data`` (items: image tensor, caption, image_id, index)."""
    from blip_fast import data

    transform = tasks.train_transform(args, image_size)
    if args.data == "synthetic":
        synthetic = data.SyntheticNoisyDataset(args.num_samples, args.noise_fraction, seed=args.seed,
                                               image_size=image_size)
        dataset = data.SyntheticDataset(synthetic, transform, seed=args.seed)
    # "replace": an unreadable image is swapped for the next readable one, so every rank keeps its full micro
    # batch (the queues all-gather fixed-size batches).
    elif args.data == "blip_json":
        dataset = data.BlipJsonDataset(args.annotations, args.image_root, transform, seed=args.seed,
                                       on_error="replace")
    else:
        dataset = data.WebDatasetShards(args.shards, transform, seed=args.seed, on_error="replace")
    dataset.encoded_images = args.gpu_decode
    return dataset


def _training_captions(dataset) -> list[str]:
    if hasattr(dataset, "synthetic"):
        return dataset.synthetic.captions() + dataset.synthetic.vocabulary()
    return list(dataset.captions)


def _data_source(args: argparse.Namespace) -> str:
    """How a data error names the training data: its annotation files, else the ``--data`` kind."""
    return " ".join(map(str, args.annotations)) or args.data


def _check_not_empty(dataset: Any, args: argparse.Namespace) -> None:
    """A training set with no usable sample (every record skipped: a wrong --image_root, records without an image)
    is one line saying why, not the sampler's traceback."""
    if not isinstance(dataset, collections.abc.Sized) or len(dataset) > 0:
        return
    skipped = dict(getattr(dataset, "skipped", {}) or {})
    source = _data_source(args)
    if not skipped:
        raise options.ConfigError(f"{source} holds no training sample")
    reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items()))
    raise options.ConfigError(f"{source}: every record was skipped ({reasons}; the warnings above name the first "
                              "ones), so there is nothing to train on" + (
                                  f": are the image paths relative to --image_root {args.image_root!r}?"
                                  if "missing_image" in skipped else ""))


def _check_queue_fits(args: argparse.Namespace, task: tasks.TrainingTask, micro_batch: int, world_size: int) -> None:
    """The ITC queue's size rule (pre-training, retrieval), checked before the tokenizer and model are built."""
    from blip_fast.modeling.pretrain import queue_misfit

    if task.has_itc_queue and (misfit := queue_misfit(args.queue_size, micro_batch, world_size)):
        raise options.ConfigError(misfit)


def _check_resume_options(args: argparse.Namespace, task: tasks.TrainingTask, output_dir: Path) -> None:
    """Refuse to resume ``output_dir`` as another task, model preset or resolution, or (with an ITC queue) another
    queue length than its saved config.yaml says: the checkpoint holds that module, and DeepSpeed would fail on its
    state dict after this run had replaced the run's config.yaml."""
    path = output_dir / options.RESOLVED_CONFIG_FILE
    if not path.is_file():
        return
    fixed = ("task", "model", "image_size", *(("queue_size",) if task.has_itc_queue else ()))
    saved = options.read_yaml(path)
    if changed := errors.differences({key: saved[key] for key in fixed if key in saved},
                                     {key: getattr(args, key) for key in fixed if key in saved}):
        raise options.ConfigError(f"{output_dir} holds a run with other options ({path}: {'; '.join(changed)}): "
                                  "resume it with its own, or start afresh in another output_dir")


def _engine_kind(ds_config: dict[str, Any]) -> dict[str, str]:
    """What a checkpoint's files depend on: ZeRO-1 and -2 share one layout, stage 0 and ZeRO-3 have their own, and
    bf16 keeps its optimizer state in other files."""
    stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    precision = next((name for name in ("bf16", "fp16") if (ds_config.get(name) or {}).get("enabled")), "fp32")
    return {"ZeRO stage": {0: "0", 1: "1 or 2", 2: "1 or 2"}.get(stage, str(stage)), "precision": precision}


def _check_resume_engine(ds_config: dict[str, Any], output_dir: Path) -> None:
    """Refuse to resume a checkpoint written under another ZeRO stage or precision (its ``ds_config.json`` says
    which) before the model is built: DeepSpeed fails on it with a bare assertion or a missing file."""
    path = output_dir / options.RESOLVED_DS_CONFIG_FILE
    if not path.is_file():
        return
    saved = json.loads(path.read_text(encoding="utf-8"))
    if changed := errors.differences(_engine_kind(saved), _engine_kind(ds_config)):
        raise options.ConfigError(f"{output_dir} holds checkpoints DeepSpeed cannot load under this ds_config ({path}: "
                                  f"{'; '.join(changed)}): resume with --deepspeed_config {path}, or start afresh in "
                                  "another output_dir")


def _check_fills_a_step(dataset: Any, args: argparse.Namespace, step_samples: int) -> None:
    """Every optimizer step takes ``step_samples`` (a micro batch on every rank, accumulated) and drops an epoch's
    remainder: a smaller training set is one line, not the sampler's traceback."""
    if isinstance(dataset, collections.abc.Sized) and len(dataset) < step_samples:
        raise options.ConfigError(f"{_data_source(args)}: {len(dataset)} training samples do not fill one optimizer step of "
                                  f"{step_samples} (ranks x micro batch x gradient accumulation): lower the batch in "
                                  "the ds_config or train on more data")


def build_tokenizer(args: argparse.Namespace, dataset, output_dir: Path, rank: int, source_dir: str | Path | None):
    """The run's tokenizer, saved to ``output_dir/tokenizer`` by rank 0 and read back by every rank: the one in
    ``source_dir`` (``--tokenizer_dir``, or the ``--init_from`` model's), else one trained on the captions."""
    import deepspeed.comm as dist

    from blip_fast.tokenizer import BlipTokenizer

    saved = output_dir / checkpointing.TOKENIZER_DIR
    if rank == 0 and not (args.resume and saved.is_dir()):
        if source_dir is not None:
            tokenizer = BlipTokenizer.from_pretrained(source_dir)
        else:
            # BLIP cleans captions before tokenising; the trained vocab sees the same cleaned text.
            from blip_fast.tokenizer import pre_caption

            captions = [pre_caption(caption) for caption in _training_captions(dataset)]
            tokenizer = BlipTokenizer.train(captions, vocab_size=args.vocab_size)
            logger.info("trained a WordPiece vocab of %d tokens on %d captions", len(tokenizer), len(captions))
        tokenizer.save_pretrained(saved)
    dist.barrier()
    return BlipTokenizer.from_pretrained(saved)


def _image_size(args: argparse.Namespace, source: tasks.InitSource | None) -> int:
    """The training resolution: ``image_size`` (an ``--init_from`` model's position tables are resized to it),
    else the ``--init_from`` model's or the preset's."""
    from blip_fast.config import BlipConfig

    if args.image_size is not None:
        return args.image_size
    if source is not None:
        return source.config.vision.image_size
    return BlipConfig.from_name(args.model).vision.image_size


def build_model_config(args: argparse.Namespace, tokenizer, source: tasks.InitSource | None):
    """The preset's config for the tokenizer (pre-training) or the ``--init_from`` model's (fine-tuning), with the
    run's activation checkpointing and drop path."""
    from blip_fast.config import BlipConfig

    if source is None:
        overrides = {} if args.image_size is None else {"image_size": args.image_size}
        config = BlipConfig.from_name(args.model, **overrides).for_tokenizer(tokenizer)
    else:
        config = source.run_config(args, tokenizer)
    vision = dataclasses.replace(config.vision, gradient_checkpointing=args.gradient_checkpointing,
                                 drop_path_rate=args.drop_path_rate)
    config = config.replace(vision=vision)
    if args.max_text_length > config.text.max_position_embeddings:
        raise options.ConfigError(f"max_text_length {args.max_text_length} exceeds the text model's "
                                  f"{config.text.max_position_embeddings} positions")
    return config


def _compute_dtype(engine) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


# ---------------------------------------------------------------------------------------------------- logging
class _Meter:
    """Loss sums over micro batches between log lines, reduced over ranks only when a line is written."""

    def __init__(self, loss_names: tuple[str, ...]) -> None:
        self.loss_names = loss_names
        self.sums: torch.Tensor | None = None
        self.count = 0

    def add(self, output) -> None:
        values = torch.stack([output[name].detach().float() for name in self.loss_names])
        self.sums = values if self.sums is None else self.sums.to(values.device) + values  # restored on the CPU
        self.count += 1

    def state_dict(self) -> dict[str, Any]:
        return {"sums": None if self.sums is None else self.sums.cpu(), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums, self.count = state["sums"], state["count"]

    def mean_over_ranks(self) -> dict[str, float]:
        import torch.distributed as dist

        sums = self.sums.clone()
        dist.all_reduce(sums)
        means = (sums / (self.count * dist.get_world_size())).tolist()
        self.sums, self.count = None, 0
        return dict(zip(self.loss_names, means))


# ---------------------------------------------------------------------------------------------------- training
def _on_device(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Images in the compute dtype; token ids, labels and loss weights (VQA's, float32) as they are."""
    return {name: tensor.to(device, dtype if name == "pixel_values" else None, non_blocking=True)
            for name, tensor in batch.items()}


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume) the configured task; every rank calls this. Returns rank 0's summary."""
    import deepspeed
    import deepspeed.comm as dist
    from tqdm.auto import tqdm

    from blip_fast.data import ResumableSampler

    task = tasks.TASKS[args.task]
    export_tasks = task.exports(args.export_tasks)
    if args.deterministic:
        use_deterministic_algorithms()
    default_single_process_env()
    # The first init builds DeepSpeed's CPU comm op. A build that SIGTERM kills outright leaves its lock, on which
    # every later run would wait: SIGTERM unwinds instead (torch's build removes the lock), and a wait on a lock that
    # SIGKILL left is named.
    with sigterm_raises(), watch_build_locks():
        deepspeed.init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    _configure_logging(rank)
    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world_size)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    ds_config = options.load_ds_config(args.deepspeed_config, args.micro_batch_size, args.gradient_accumulation_steps)
    args.compile = options.resolve_compile(args.compile, ds_config)
    output_dir = Path(args.output_dir)
    output_lock = claim_output_dir(output_dir)  # held until training returns (or the process ends)
    tag = checkpointing.resume_tag(output_dir)
    if tag is not None and not args.resume:
        raise options.ConfigError(f"{output_dir} already holds checkpoint {tag}: pass --resume to continue it, "
                                  "or choose another output_dir")
    if tag is not None:  # before the model is built: a checkpoint not there, or of another world size, fails in seconds
        checkpointing.check_resumable(output_dir, tag, world_size)
        _check_resume_options(args, task, output_dir)
        _check_resume_engine(ds_config, output_dir)

    _seed_all(args.seed)  # the same on every rank: identical initial weights and queues
    source = None if args.init_from is None else tasks.InitSource(
        args.init_from, args.tokenizer_dir if os.path.isfile(args.init_from) else None)
    dataset = (task.dataset or build_dataset)(args, _image_size(args, source))
    _check_not_empty(dataset, args)
    micro_batch, accumulation = options.batch_geometry(ds_config, world_size)
    _check_queue_fits(args, task, micro_batch, world_size)
    _check_fills_a_step(dataset, args, micro_batch * world_size * accumulation)
    tokenizer = build_tokenizer(args, dataset, output_dir, rank,
                                args.tokenizer_dir if source is None else source.tokenizer_dir)
    config = build_model_config(args, tokenizer, source)
    if tag is not None:
        checkpointing.check_same_model(output_dir, config)
    if rank == 0:
        checkpointing.write_model_config(output_dir, config)
    model = task.build_model(config, args, source, tokenizer)
    if args.compile:
        from blip_fast.modeling.compile import compile_layers

        logger.info("compiled %d layers (torch.compile, regional)", compile_layers(model))
    # BLIP: AdamW with weight decay on every trainable parameter (the momentum encoders are frozen). The fused
    # kernel updates all tensors in one pass: the tiny model's step takes 6 ms instead of 27 on one CPU thread.
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=args.init_lr, weight_decay=args.weight_decay, betas=tuple(args.betas),
                                  fused=True)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    engine.train()

    micro_batch, accumulation = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    global_batch = micro_batch * world_size
    sampler = ResumableSampler(len(dataset), micro_batch, world_size, rank, seed=args.seed, shuffle=True,
                               drop_last=True)
    steps_per_epoch = len(sampler) // accumulation
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    geometry = {"world_size": world_size, "micro_batch_size": micro_batch, "gradient_accumulation_steps": accumulation,
                "steps_per_epoch": steps_per_epoch}

    step, rank_state = 0, None
    meter, metrics_path = _Meter(task.loss_names), output_dir / METRICS_FILE
    if args.resume and tag is not None:
        state, rank_state = checkpointing.load_checkpoint(engine, output_dir, tag)
        if (state["micro_batch_size"] * state["world_size"], state["gradient_accumulation_steps"],
                state["steps_per_epoch"]) != (global_batch, accumulation, steps_per_epoch):
            raise options.ConfigError(f"cannot resume {output_dir}/{tag} exactly: it ran with {state}, this run has "
                                      f"{geometry} (global micro batch, accumulation and dataset size must match)")
        step = state["global_step"]
        logger.info("resumed %s/%s at step %d (epoch %d)", output_dir, tag, step, state["epoch"])
    elif args.resume:
        logger.info("--resume: no checkpoint in %s yet, starting from step 0", output_dir)
    if rank == 0:  # only now, once every check passed: a refused resume leaves the run's files as they were
        options.write_resolved(args, ds_config, output_dir)
        _truncate_metrics(metrics_path, step)  # what a killed run logged past its checkpoint
    if rank_state is None:
        # Per-rank dropout and negative-sampling streams, as BLIP seeds each rank (seed + rank).
        _seed_all(args.seed + rank + 1_000_003 * step)
    elif "meter" in rank_state:  # the loss sums since the last log line, which the next line averages
        meter.load_state_dict(rank_state["meter"])

    collator = task.collator(tokenizer, args)
    dtype, device = _compute_dtype(engine), engine.device
    # The GPU input path: batches carry encoded images and their drawn augmentation; pixels are made on the device.
    pixels_on_device = dataset.transform.tensor_transform() if args.gpu_decode else None
    progress = tqdm(total=total_steps, initial=step, disable=rank != 0 or not args.progress_bar,
                    desc=task.name, dynamic_ncols=True)
    interval_start, interval_steps, throughput = time.perf_counter(), 0, []
    if step >= total_steps:  # a finished run started again (or with fewer steps): its exports are written again
        logger.info("the checkpoint is at step %d, the run has %d steps: nothing to train", step, total_steps)
    else:
        logger.info("training steps %d..%d of %d per epoch: %d ranks x %d micro batch x %d accumulation, %s",
                    step, total_steps, steps_per_epoch, world_size, micro_batch, accumulation, dtype)

    while step < total_steps:
        epoch, first = divmod(step, steps_per_epoch)
        dataset.set_epoch(epoch)
        sampler.load_state_dict({"epoch": epoch, "step": first * accumulation})
        # A private generator: creating the iterator must not draw from the global torch RNG (exact resume).
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collator, num_workers=args.num_workers,
            pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(args.seed * 1009 + epoch),
            worker_init_fn=die_with_parent if args.num_workers else None,
        )
        batches = iter(loader)
        for step_in_epoch in range(first, steps_per_epoch):
            if step >= total_steps:
                break
            lr = learning_rate(args, epoch, step_in_epoch)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            alpha = None
            if task.alpha_ramp_epochs is not None:
                alpha = alpha_ramp(args.alpha, epoch, step_in_epoch, steps_per_epoch, task.alpha_ramp_epochs)
            for _ in range(accumulation):
                batch = next(batches)
                if batch is None or len(batch["pixel_values"]) != micro_batch:  # "replace" found no readable image
                    raise options.ConfigError(f"{_data_source(args)}: no image of the training set can be read (the "
                                              "warnings above name the files)")
                if pixels_on_device is not None:
                    batch["pixel_values"] = pixels_on_device.encoded_batch(batch.pop("images"), device, dtype)
                output = engine(**task.forward_inputs(_on_device(batch, device, dtype), alpha))
                engine.backward(output["loss"])
                engine.step()
                meter.add(output)
            step += 1
            interval_steps += 1
            progress.update(1)

            if step % args.log_every_steps == 0 or step == total_steps:
                losses = meter.mean_over_ranks()
                elapsed = time.perf_counter() - interval_start
                samples_per_s = interval_steps * global_batch * accumulation / elapsed
                throughput.append((interval_steps, elapsed))
                record = {"step": step, "epoch": epoch, **losses, "lr": lr, "samples_per_s": samples_per_s}
                if alpha is not None:
                    record["alpha"] = alpha
                if torch.cuda.is_available():
                    record["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                    torch.cuda.reset_peak_memory_stats()
                if rank == 0:
                    _log_record(record, task.loss_names, progress, metrics_path)
                    if engine.monitor.enabled:
                        engine.monitor.write_events([(f"Train/Samples/{name}", losses[name], engine.global_samples)
                                                     for name in task.loss_names])
                interval_start, interval_steps = time.perf_counter(), 0

            if step % args.save_every_steps == 0 or step == total_steps:
                client_state = {"global_step": step, "epoch": step // steps_per_epoch,
                                "step_in_epoch": step % steps_per_epoch,
                                "sampler": {"epoch": step // steps_per_epoch,
                                            "step": step % steps_per_epoch * accumulation},
                                "seed": args.seed, **geometry}
                saved = checkpointing.save_checkpoint(engine, output_dir, step, client_state, args.keep_checkpoints,
                                                      rank_state={"meter": meter.state_dict()})
                logger.info("saved %s", output_dir / saved)
        del batches, loader
    progress.close()

    summary = {"final_step": step, "output_dir": str(output_dir), **_throughput(throughput, global_batch * accumulation)}
    if export_tasks and rank == 0 and step > 0:
        targets = {name: output_dir / checkpointing.EXPORT_DIR / name for name in export_tasks}
        summary["exports"] = tasks.export_checkpoint(output_dir, targets)
    dist.barrier()
    if output_lock is not None:
        output_lock.release()
    return summary


def _throughput(intervals: list[tuple[int, float]], samples_per_step: int) -> dict[str, float]:
    """Samples/s over all log intervals but the first (it holds start-up and warm-up)."""
    steady = intervals[1:] or intervals
    steps, seconds = sum(steps for steps, _ in steady), sum(seconds for _, seconds in steady)
    return {"samples_per_s": steps * samples_per_step / seconds} if seconds > 0 else {}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the records a killed run logged after the checkpoint it is resumed from (they are trained again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a line cut short by the kill
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _log_record(record: dict[str, Any], loss_names: tuple[str, ...], progress, metrics_path: Path) -> None:
    """One log line (the total loss, then its terms) and one metrics.jsonl record."""
    line = f"step {record['step']} epoch {record['epoch']} loss {record['loss']:.4f}"
    if len(loss_names) > 1:
        terms = " ".join(f"{name.removeprefix('loss_')} {record[name]:.4f}" for name in loss_names[1:])
        line += f" ({terms})"
    line += f" lr {record['lr']:.3g}"
    if "alpha" in record:
        line += f" alpha {record['alpha']:.3f}"
    line += f" {record['samples_per_s']:.1f} samples/s"
    if "max_memory_gib" in record:
        line += f" mem {record['max_memory_gib']:.2f} GiB"
    if progress.disable:
        logger.info(line)
    else:
        progress.write(line)
    with open(metrics_path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------------- export
def export_main(argv: list[str]) -> list[str]:
    parser = errors.ArgumentParser(prog="python -m blip_fast.train export",
                                     description="Export a training checkpoint as HuggingFace-layout task models.")
    parser.add_argument("--checkpoint", required=True, help="output_dir (uses `latest`) or a global_stepN dir")
    parser.add_argument("--tag", default=None, help="checkpoint tag inside --checkpoint (default: latest)")
    parser.add_argument("--out", required=True, type=errors.output_dir,
                        help="target dir (one task) or parent of one dir per task")
    parser.add_argument("--task", nargs="+", default=None, choices=options.EXPORT_TASKS,
                        help="task models to write (default: the run's first: captioning after pre-training, the "
                             "fine-tuned task's model after fine-tuning)")
    errors.add_debug_flag(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    output_dir, tag = checkpointing.resolve_checkpoint(args.checkpoint, args.tag)
    names = args.task or tasks.run_task(output_dir).export_tasks[:1]
    if len(names) == 1:
        targets = {names[0]: Path(args.out)}
    else:
        targets = {name: Path(args.out) / name for name in names}
    written = tasks.export_checkpoint(output_dir, targets, tag=tag)
    for path in written:
        print(path)
    return written


def _main(argv: list[str]) -> int:
    stop_with_parent()  # a rank started by launch.run_ranks (the demo's stages) must not outlive its starter
    if argv and argv[0] == "export":
        export_main(argv[1:])
        return 0
    args = options.parse_args(argv)
    summary = train(args)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({"summary": summary}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Train (or export); user errors are one line on stderr and exit status 2, with no ``[rankN]:`` tracebacks.
    Under a launcher each node's first rank prints the line and the others wait before they do
    (:func:`blip_fast.errors.report_delay`), so an error every rank hits shows once per node."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return errors.run_main(_main, argv, "blip_fast.train", delay_s=errors.report_delay())
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            _remove_shm_buffer()


def _remove_shm_buffer() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer (``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_
    <rank>``, 69 MB), which DeepSpeed leaves behind until reboot. Every rank mapped every buffer when the process group
    started, so the others keep theirs until they exit."""
    names = ("MASTER_ADDR", "MASTER_PORT", "RANK")
    if all(name in os.environ for name in names):
        address, port, rank = (os.environ[name] for name in names)
        Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{rank}").unlink(missing_ok=True)


if __name__ == "__main__":
    status = main()
    # Every checkpoint is closed and the process group destroyed by now; the interpreter's teardown of torch, Dynamo
    # and DeepSpeed modules would take another ~2 s per rank and training stage on a CPU.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
