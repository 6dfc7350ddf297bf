"""Training checkpoints: DeepSpeed's layout plus what exact resume needs, consolidation, and export.

Layout of ``output_dir`` (DeepSpeed's, with three additions marked +)::

    latest                        tag of the newest *complete* checkpoint ("global_step1000")
    zero_to_fp32.py               DeepSpeed's offline consolidation script
    global_step1000/              model/optimizer shards (module state holds the queues: they are buffers)
        rng_rank{r}.pt          + rank r's RNG streams (python, numpy, torch CPU, CUDA)
        ema_rank{r}.pt          + rank r's fp32 masters of the momentum encoders (bf16/fp16 training, ZeRO-3)
    config.yaml, ds_config.json + the resolved options and ds_config of the run
    blip_config.json, tokenizer/ + the model config and the tokenizer (trained, or copied from --tokenizer_dir or
                                  --init_from), what export and fine-tuning from this dir need

What is saved where, for exact resume:

- DeepSpeed (``engine.save_checkpoint``): weights, optimizer state, and every module buffer, i.e. the ITC queues
  (``image_queue``, ``text_queue``, ``idx_queue``) and their pointer ``ptr_queue``; under ZeRO-1/2 rank 0 writes the
  module state and each rank its optimizer partition, under ZeRO-3 each rank writes its parameter partitions.
- ``client_state`` (identical on every rank, so it does not matter which rank's copy DeepSpeed keeps): the global
  step, epoch, step in epoch, the sampler state ``{"epoch", "step"}`` in micro batches, and the batch geometry
  (world size, micro batch, gradient accumulation) a resume must match.
- ``rng_rank{r}.pt``, one per rank, written by that rank: the RNG streams differ per rank (dropout masks, ITM
  negative sampling), and DeepSpeed keeps one ``client_state`` only; with them the rank's loss sums since the last
  log line (``rank_state``), so the first line after a resume averages the same steps as an uninterrupted run's.
- ``ema_rank{r}.pt``, one per rank, when the momentum encoders' EMA keeps fp32 masters (bf16/fp16 weights, or
  ZeRO-3's persistent weights; :mod:`blip_fast.modeling.momentum`): DeepSpeed saves the rounded momentum weights
  only, and under ZeRO-3 each rank holds the masters of its own partitions.
- Nothing for the LR or alpha: both are pure functions of (epoch, step) (:mod:`blip_fast.training.schedule`).
  Data augmentation draws from (seed, epoch, index) inside the dataset, so it needs no state either.

Write order makes ``latest`` the commit point: every rank writes its RNG file, then ``engine.save_checkpoint(...,
save_latest=False)`` (which ends with a barrier), then a second barrier, then rank 0 replaces ``latest`` atomically.
A job killed at any moment leaves ``latest`` naming a checkpoint whose files are all complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blip_fast.atomic_files import atomic_write, atomic_write_text
from blip_fast.checkpoint import BIN_WEIGHTS, CONFIG_NAME, GENERATION_CONFIG_NAME, SAFE_WEIGHTS
from blip_fast.config import BlipConfig, TextConfig, VisionConfig
from blip_fast.errors import InvalidInputError, MissingFileError, differences

logger = logging.getLogger("blip_fast")

LATEST_FILE = "latest"
BLIP_CONFIG_FILE = "blip_config.json"
TOKENIZER_DIR = "tokenizer"
#: Where a run exports its task models: ``output_dir/export/<task>``.
EXPORT_DIR = "export"
#: Files an export writes (:func:`blip_fast.checkpoint.save_pretrained`, the tokenizer, the image processor).
_EXPORT_FILES = {SAFE_WEIGHTS, BIN_WEIGHTS, CONFIG_NAME, GENERATION_CONFIG_NAME, "preprocessor_config.json",
                 "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "vocab.txt", "README.md"}
RNG_FILE = "rng_rank{rank}.pt"
EMA_FILE = "ema_rank{rank}.pt"
CLIENT_STATE_KEY = "blip_fast"
_TAG = re.compile(r"^global_step(\d+)$")


def tag_for(step: int) -> str:
    return f"global_step{step}"


# ---------------------------------------------------------------------------------------------------- RNG
def capture_rng() -> dict[str, Any]:
    """This process's RNG streams."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------- save / load
def latest_tag(output_dir: str | os.PathLike) -> str | None:
    """The tag ``latest`` names, or None when there is no complete checkpoint."""
    path = Path(output_dir) / LATEST_FILE
    if not path.is_file():
        return None
    try:
        tag = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise InvalidInputError(f"{path} is not a checkpoint tag (not text): write the tag of a checkpoint that is "
                                f"there into it ({', '.join(saved_tags(output_dir)) or 'none is'})") from None
    return tag or None


def resume_tag(output_dir: str | os.PathLike) -> str | None:
    """The checkpoint a run in ``output_dir`` continues from: the tag ``latest`` names, or None when no checkpoint
    was ever committed. Without ``latest``, one checkpoint folder is the first checkpoint, cut short by a kill before
    ``latest`` named it (the run starts again and writes it anew); several mean ``latest`` was removed, and starting
    again would overwrite checkpoints that were complete: refused, naming them."""
    tag = latest_tag(output_dir)
    if tag is not None or not Path(output_dir).is_dir():
        return tag
    tags = saved_tags(output_dir)
    if len(tags) > 1:
        from blip_fast.training.options import ConfigError

        raise ConfigError(
            f"{output_dir} holds checkpoints {', '.join(tags)} but no `{LATEST_FILE}` file naming the newest complete "
            f"one (it was removed): write that tag into {Path(output_dir) / LATEST_FILE} (e.g. {tags[-1]}) and pass "
            "--resume, or start afresh in another output_dir")
    if tags:
        logger.warning("%s/%s was never committed (no `%s` names it): a run killed while writing its first "
                       "checkpoint; this run starts from step 0 and writes it again", output_dir, tags[0], LATEST_FILE)
    return None


def save_checkpoint(engine, output_dir: str | os.PathLike, step: int, client_state: dict[str, Any],
                    keep: int = 0, rank_state: dict[str, Any] | None = None) -> str:
    """Save on every rank (collective); returns the tag. ``keep`` > 0 removes all but the newest ``keep``.
    ``rank_state`` is this rank's own (it goes with its RNG streams; :func:`load_checkpoint` returns it)."""
    import deepspeed.comm as dist

    output_dir = Path(output_dir)
    tag = tag_for(step)
    tag_dir = output_dir / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    rank_file = {**capture_rng(), "rank_state": rank_state or {}}
    atomic_write(tag_dir / RNG_FILE.format(rank=dist.get_rank()), lambda tmp: torch.save(rank_file, tmp))
    ema = getattr(engine.module, "ema", None)
    if ema is not None and ema.state_dict()["masters"]:
        atomic_write(tag_dir / EMA_FILE.format(rank=dist.get_rank()), lambda tmp: torch.save(ema.state_dict(), tmp))
    engine.save_checkpoint(str(output_dir), tag=tag, client_state={CLIENT_STATE_KEY: client_state},
                           save_latest=False)
    dist.barrier()  # every rank's files are closed before `latest` names them
    if dist.get_rank() == 0:
        atomic_write_text(output_dir / LATEST_FILE, tag)
        if keep > 0:
            _remove_old_checkpoints(output_dir, keep, current=tag)
    dist.barrier()
    return tag


def _remove_old_checkpoints(output_dir: Path, keep: int, current: str) -> None:
    tags = sorted((int(match.group(1)), path.name) for path in output_dir.iterdir()
                  if path.is_dir() and (match := _TAG.match(path.name)))
    for _, name in tags[:-keep]:
        if name != current:
            shutil.rmtree(output_dir / name, ignore_errors=True)


_ZERO_PARTITION = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def _holds_model_states(tag_dir: Path) -> bool:
    """Whether ``tag_dir`` is a DeepSpeed checkpoint (``mp_rank_00_model_states.pt``, or ZeRO's per-rank files)."""
    return tag_dir.is_dir() and any(tag_dir.glob("*model_states.pt"))


def saved_tags(output_dir: str | os.PathLike) -> list[str]:
    """The tags of the checkpoints in ``output_dir`` that hold model states, oldest first."""
    return sorted((path.name for path in Path(output_dir).iterdir() if _TAG.match(path.name)
                   and _holds_model_states(path)), key=lambda name: int(_TAG.match(name).group(1)))


def check_resumable(output_dir: str | os.PathLike, tag: str, world_size: int) -> None:
    """Refuse, before DeepSpeed tries (it fails with a bare assertion), to resume a checkpoint that is not there (its
    folder deleted, ``latest`` edited) or ZeRO optimizer partitions written by another number of ranks (DeepSpeed
    cannot repartition them; without ZeRO a resume on another world size only reseeds the RNG)."""
    from blip_fast.training.options import ConfigError

    tag_dir = Path(output_dir) / tag
    if not _holds_model_states(tag_dir):
        raise ConfigError(
            f"{Path(output_dir) / LATEST_FILE} names checkpoint {tag}, but {tag_dir} "
            f"{'holds no model states' if tag_dir.is_dir() else 'is not there'}: restore it, write the tag of a "
            f"checkpoint that is there into {LATEST_FILE} ({', '.join(saved_tags(output_dir)) or 'none is'}), or "
            "start afresh in another output_dir")
    check_complete(output_dir, tag, f"resume from an earlier checkpoint by writing its tag into "
                   f"{Path(output_dir) / LATEST_FILE} ({{earlier}}), or start afresh in another output_dir", ConfigError)
    saved = {int(match.group(1)) for path in tag_dir.iterdir() if (match := _ZERO_PARTITION.match(path.name))}
    if saved and len(saved) != world_size:
        raise ConfigError(
            f"{tag_dir} holds ZeRO optimizer partitions of {len(saved)} ranks, and this run has {world_size}: resume "
            f"with the launcher and rank count that wrote it (e.g. the same `deepspeed --num_gpus {len(saved)} ...` "
            "command plus --resume); DeepSpeed cannot load ZeRO partitions into another world size"
        )


def check_complete(output_dir: str | os.PathLike, tag: str, remedy: str,
                   error: type[Exception] = InvalidInputError) -> None:
    """Refuse checkpoint ``tag`` when one of its torch files is cut short (a full disk, a copy stopped): DeepSpeed's
    zip reader would fail on it in a traceback naming no file. ``remedy`` says what to do instead; its
    ``{earlier}`` lists the other checkpoints."""
    tag_dir = Path(output_dir) / tag
    damaged = [path.name for path in sorted(tag_dir.glob("*.pt")) if not zipfile.is_zipfile(path)]
    if damaged:  # torch.save's zip ends with its central directory: a file cut short has none
        earlier = ", ".join(name for name in saved_tags(output_dir) if name != tag) or "there is none"
        raise error(f"{tag_dir} holds damaged files ({', '.join(damaged)}: not complete torch files): "
                    + remedy.format(earlier=earlier))


def load_checkpoint(engine, output_dir: str | os.PathLike, tag: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load ``tag`` into ``engine`` and this rank's RNG streams. Returns the training client state and this rank's
    ``rank_state`` (see :func:`save_checkpoint`), or None when the RNG streams were not restored (the checkpoint was
    written by another number of ranks). Check it with :func:`check_resumable` first, before the model is built."""
    import deepspeed.comm as dist

    load_path, client_state = engine.load_checkpoint(
        str(output_dir), tag=tag, load_module_strict=True, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {output_dir}")
    if not client_state or CLIENT_STATE_KEY not in client_state:
        raise RuntimeError(f"{output_dir}/{tag} was not written by blip_fast.train (no {CLIENT_STATE_KEY!r} state)")
    state = client_state[CLIENT_STATE_KEY]
    same_ranks = state.get("world_size") == dist.get_world_size()
    _load_ema(engine.module, Path(output_dir) / tag / EMA_FILE.format(rank=dist.get_rank()), same_ranks)
    rng_path = Path(output_dir) / tag / RNG_FILE.format(rank=dist.get_rank())
    if same_ranks and rng_path.is_file():
        rank_file = torch.load(rng_path, map_location="cpu", weights_only=False)
        restore_rng(rank_file)
        return state, rank_file.get("rank_state", {})
    logger.warning("%s: no RNG state for rank %d of %d (checkpoint written by %s ranks): dropout and ITM-negative "
                   "streams are reseeded; the run continues, but not bit-exactly", rng_path, dist.get_rank(),
                   dist.get_world_size(), state.get("world_size"))
    return state, None


def _load_ema(model, path: Path, same_ranks: bool) -> None:
    """Restore the momentum EMA's fp32 masters; without a fitting file they are rebuilt from the loaded weights."""
    ema = getattr(model, "ema", None)
    if ema is None:
        return
    state = torch.load(path, map_location="cpu", weights_only=True) if same_ranks and path.is_file() else {}
    if not ema.load_state_dict(state, model.momentum_parameters):
        logger.warning("%s: no fitting fp32 masters of the momentum encoders for this rank; they restart from the "
                       "checkpoint's rounded momentum weights (the run continues, but not bit-exactly)", path)


# ---------------------------------------------------------------------------------------------------- run files
def config_to_dict(config: BlipConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(data: dict[str, Any]) -> BlipConfig:
    data = dict(data)
    return BlipConfig(vision=VisionConfig(**data.pop("vision")), text=TextConfig(**data.pop("text")), **data)


def check_same_model(output_dir: str | os.PathLike, config: BlipConfig) -> None:
    """Refuse to resume ``output_dir`` as another model than the one its checkpoint holds (another init_from, preset
    or resolution), before this run's config replaces the one saved there: DeepSpeed would fail on the state dict."""
    path = Path(output_dir) / BLIP_CONFIG_FILE
    if not path.is_file():
        return
    if changed := differences(config_to_dict(read_model_config(output_dir)), config_to_dict(config)):
        raise InvalidInputError(f"{output_dir} holds a checkpoint of another model ({path}: {'; '.join(changed)}): "
                                "resume it with the options that started it, or start afresh in another output_dir")


def write_model_config(output_dir: str | os.PathLike, config: BlipConfig) -> None:
    atomic_write_text(Path(output_dir) / BLIP_CONFIG_FILE, json.dumps(config_to_dict(config), indent=2) + "\n")


def read_model_config(output_dir: str | os.PathLike) -> BlipConfig:
    path = Path(output_dir) / BLIP_CONFIG_FILE
    if not path.is_file():
        raise MissingFileError(f"no {BLIP_CONFIG_FILE} in {output_dir}: not an output directory of blip_fast.train")
    return config_from_dict(json.loads(path.read_text(encoding="utf-8")))


# ---------------------------------------------------------------------------------------------------- consolidation
def resolve_checkpoint(path: str | os.PathLike, tag: str | None = None) -> tuple[Path, str]:
    """(output_dir, tag) for an output dir (its ``latest`` unless ``tag``) or a ``global_stepN`` dir itself."""
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"{path}: no such folder (give a blip_fast.train output_dir or one of its "
                               "global_stepN folders)")
    if tag is None and _TAG.match(path.name):
        return path.parent, path.name
    if tag is None:
        tag = latest_tag(path)
        if tag is None:
            tags = saved_tags(path)
            raise MissingFileError(f"{path} has no `{LATEST_FILE}` file: " + (
                f"give one of its checkpoints ({', '.join(tags)}), e.g. {path / tags[-1]}" if tags else
                "not a DeepSpeed checkpoint directory"))
    if not tag or not (path / tag).is_dir() or not _TAG.match(tag):
        raise MissingFileError(f"checkpoint {tag!r} is not one of {path} (this run has: "
                               f"{', '.join(saved_tags(path)) or 'none'})")
    return path, tag


def consolidated_state_dict(checkpoint_dir: str | os.PathLike, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 state dict (parameters, momentum encoders, queues) of a checkpoint, for any ZeRO stage.

    ZeRO-1/2/3: the fp32 master partitions merged by DeepSpeed's ``zero_to_fp32`` (CPU only; buffers and frozen
    parameters come from the model-state files). Without ZeRO: the module state as saved.
    """
    checkpoint_dir = Path(checkpoint_dir)
    tag_dir = checkpoint_dir / tag
    module_file = tag_dir / "mp_rank_00_model_states.pt"
    if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag))
        # ZeRO-1 records no frozen parameters for zero_to_fp32 (the momentum encoders): take them from the module
        # state, which stages 1 and 2 save whole (stage 3 saves empty placeholders there, and records them).
        if module_file.is_file():
            module = torch.load(module_file, map_location="cpu", weights_only=False)["module"]
            state.update({key: value for key, value in module.items() if key not in state and value.numel() > 0})
    else:
        state = torch.load(module_file, map_location="cpu", weights_only=False)["module"]
    return {key: value.detach().float() if value.is_floating_point() else value.detach()
            for key, value in state.items()}


def check_export_target(output_dir: str | os.PathLike, target: str | os.PathLike) -> None:
    """Refuse an export folder whose files would mix with others: the training run's own folder or one inside it
    (a checkpoint, its tokenizer) other than ``output_dir/export/...``, or a folder holding any file an export does
    not write, or another tool's model: an earlier export (only its files, its config.json blip_fast's), even one
    cut short by a crash, is replaced."""
    run, out = Path(output_dir).resolve(), Path(target).resolve()
    if out == run or (run in out.parents and run / EXPORT_DIR not in (out, *out.parents)):
        raise InvalidInputError(f"{target} lies in the training run {output_dir}: the export would mix with its "
                                f"checkpoints; choose a folder outside it, or under {Path(output_dir) / EXPORT_DIR}")
    names = sorted(path.name for path in out.iterdir()) if out.is_dir() else []
    foreign = [name for name in names if not _written_by_export(name)]
    before_config = all(name in (SAFE_WEIGHTS, BIN_WEIGHTS) or _is_temporary(name) for name in names)
    if not foreign and not before_config and not _blip_fast_config(out / CONFIG_NAME):
        foreign = [f"{CONFIG_NAME} (another tool's model)" if (out / CONFIG_NAME).is_file() else
                   f"{names[0]} without a blip_fast {CONFIG_NAME} (another tool's files)"]
    if foreign:
        listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise InvalidInputError(f"{target} holds files no export writes ({listed}): the model would replace or mix "
                                "with them; choose a new or empty folder, or an earlier export")


def _blip_fast_config(path: Path) -> bool:
    """Whether ``path`` is a config.json blip_fast wrote (it always records ``blip_fast_hf_compat``): an export
    writes its weights, then config.json, then the rest, so any other export file comes with one."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(values, dict) and "blip_fast_hf_compat" in values


def _written_by_export(name: str) -> bool:
    """Whether an export writes a file of this name (or its temporary file, which ``kill -9`` can leave)."""
    return name in _EXPORT_FILES or _is_temporary(name)


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def export(checkpoint: str | os.PathLike, targets: dict[str, str | os.PathLike], tag: str | None = None,
           state_prefix: str = "") -> list[str]:
    """Write one complete HuggingFace-layout directory per ``{task: out_dir}`` of ``targets`` from a training
    checkpoint (an output dir, its ``latest`` unless ``tag``, or a ``global_stepN`` dir): the task model, the run's
    tokenizer and a ``preprocessor_config.json`` for the model's image size. ``state_prefix``: where the task model's
    weights sit in the training module (``"model."`` for a captioning run); use
    :func:`blip_fast.training.tasks.export_checkpoint`, which knows it per task."""
    from blip_fast.data import BlipImageProcessor
    from blip_fast.modeling.pretrain import export_state_dict
    from blip_fast.tokenizer import BlipTokenizer

    output_dir, tag = resolve_checkpoint(checkpoint, tag)
    check_complete(output_dir, tag, "export an earlier checkpoint with --tag ({earlier})")
    for target in targets.values():
        check_export_target(output_dir, target)
    config = read_model_config(output_dir)
    if not (output_dir / TOKENIZER_DIR).is_dir():  # before the checkpoint is read (and never a hub look-up)
        raise MissingFileError(f"no {TOKENIZER_DIR}/ folder in {output_dir}: the run's tokenizer is gone; copy it "
                               "back (the --tokenizer_dir or --init_from model it came from), then export")
    state = {key.removeprefix(state_prefix): value
             for key, value in consolidated_state_dict(output_dir, tag).items() if key.startswith(state_prefix)}
    tokenizer = BlipTokenizer.from_pretrained(output_dir / TOKENIZER_DIR)
    processor = BlipImageProcessor(size=config.vision.image_size)
    written = []
    for task, target in targets.items():
        export_state_dict(state, config, target, task)
        tokenizer.save_pretrained(target)
        processor.save_pretrained(target)
        logger.info("exported %s/%s as %s -> %s", output_dir, tag, task, target)
        written.append(str(target))
    return written
