"""BLIP's learning-rate schedules and alpha ramp, as pure functions of the position in training.

The originals (salesforce/BLIP ``utils.py``, ``pretrain.py``) set the LR per iteration in epoch 0 (warmup) and per
epoch afterwards; here the same values are a function of (epoch, step in epoch), so a resumed run needs no
scheduler state. A "step" is one optimizer step (with gradient accumulation, several micro batches).
"""

from __future__ import annotations

import math


def blip_step_lr(epoch: int, step_in_epoch: int, init_lr: float, warmup_lr: float, warmup_steps: int,
                 min_lr: float, lr_decay_rate: float) -> float:
    """BLIP pre-training: ``step_lr_schedule`` each epoch, overridden in epoch 0 by ``warmup_lr_schedule``.

    epoch 0: ``min(init_lr, warmup_lr + (init_lr - warmup_lr) * step_in_epoch / warmup_steps)``;
    epoch e >= 1: ``max(min_lr, init_lr * lr_decay_rate ** e)``. As in BLIP, the warmup lives in epoch 0 only.
    """
    if epoch == 0:
        if warmup_steps == 0:
            return init_lr
        return min(init_lr, warmup_lr + (init_lr - warmup_lr) * step_in_epoch / warmup_steps)
    return max(min_lr, init_lr * lr_decay_rate**epoch)


def cosine_lr(epoch: int, epochs: int, init_lr: float, min_lr: float) -> float:
    """BLIP fine-tuning (``cosine_lr_schedule``): per epoch, from ``init_lr`` at epoch 0 towards ``min_lr``."""
    return (init_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) + min_lr


def learning_rate(args, epoch: int, step_in_epoch: int) -> float:
    """The LR of optimizer step ``step_in_epoch`` of ``epoch`` under the options ``args`` (``lr_schedule`` etc.)."""
    if args.lr_schedule == "cosine":
        return cosine_lr(epoch, args.epochs, args.init_lr, args.min_lr)
    return blip_step_lr(epoch, step_in_epoch, args.init_lr, args.warmup_lr, args.warmup_steps, args.min_lr,
                        args.lr_decay_rate)


def alpha_ramp(alpha: float, epoch: int, step_in_epoch: int, steps_per_epoch: int, ramp_epochs: int = 2) -> float:
    """BLIP's distillation weight, linear from 0 over the first ``ramp_epochs`` epochs:
    ``alpha * min(1, (epoch * steps_per_epoch + step) / (ramp_epochs * steps_per_epoch))``; pre-training ramps over
    2 epochs, retrieval fine-tuning over 1 (``train_retrieval.py``)."""
    return alpha * min(1.0, (epoch * steps_per_epoch + step_in_epoch) / (ramp_epochs * steps_per_epoch))
