"""The momentum encoders' EMA, accumulated in fp32 under every precision and ZeRO stage.

BLIP updates its momentum encoders by ``m = momentum * m + (1 - momentum) * online`` with momentum 0.995, in fp32.
Under DeepSpeed's bf16 (or fp16) the momentum weights are low-precision copies, and an update of 0.5% of the gap to
the online weights is below bf16's resolution (2^-8 relative) until that gap exceeds ~100 ulp: the momentum
encoders stall. :class:`MomentumEMA` keeps an fp32 accumulator ("master") for each momentum weight it cannot update
in place, updates the master and writes it back, rounded, to the weight the momentum forward reads. The online
weights it averages are the ones the step computes with (bf16 under bf16): their rounding is at most half an ulp,
never accumulates, and so the masters track the fp32 EMA to bf16 resolution.

Where each weight lives (``Slot``):

- ``full``: a plain tensor (no ZeRO, ZeRO-1/2): the whole weight on every rank.
- ``partition``: a ZeRO-3 weight. Each rank updates its own flat partition (``ds_tensor``) from the online weight's
  partition, which has the same geometry (same numel): no gather, no broadcast. DeepSpeed gathers the updated
  partitions when the momentum forward fetches the module. The EMA runs before DeepSpeed's own forward hooks (it is
  a forward pre-hook registered before ``deepspeed.initialize``), when such weights are released.
- ``replicated``: a ZeRO-3 *persistent* weight (numel under ``stage3_param_persistence_threshold``: biases,
  LayerNorms), which DeepSpeed keeps gathered between steps. Its full copy is the truth here: an fp32 full master,
  updated from the online weight's full copy (persistent too, re-gathered by DeepSpeed after every optimizer step),
  written to the full copy and sliced into this rank's partition (DeepSpeed's layout: partition ``r`` holds
  elements ``[r * size, (r + 1) * size)`` of the flattened weight), so that DeepSpeed's next gather of the partitions
  reproduces it. Only a process's first step gathers (read-only) what DeepSpeed has not gathered yet.

The masters are state a resume needs (:meth:`state_dict`): :mod:`blip_fast.training.checkpointing` writes them per
rank beside the RNG streams. fp32 weights need no master: they are updated in place with the same arithmetic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: ``(momentum weight name, online weight, momentum weight)``.
Triple = tuple[str, nn.Parameter, nn.Parameter]


def _is_zero3(parameter: torch.Tensor) -> bool:
    return hasattr(parameter, "ds_tensor")


def _released(parameter: torch.Tensor) -> bool:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return parameter.ds_status == ZeroParamStatus.NOT_AVAILABLE


def _gathered(parameters: list[torch.Tensor]):
    """Read-only gather of ZeRO-3 weights (re-partitioned on exit); nothing to do for none."""
    if not parameters:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(parameters)


def _partition_bounds(parameter: torch.Tensor) -> tuple[int, int]:
    """``(start, length)`` of this rank's partition within the flattened ZeRO-3 weight (DeepSpeed's layout)."""
    import deepspeed.comm as dist

    size = parameter.ds_tensor.numel()
    start = size * dist.get_rank(group=parameter.ds_process_group)
    return start, max(0, min(size, parameter.ds_numel - start))


@dataclass
class Slot:
    """One momentum weight: where it lives (``kind``) and its fp32 master (None: updated in place)."""

    name: str
    online: nn.Parameter
    momentum: nn.Parameter
    kind: str  # "full" | "partition" | "replicated"
    master: torch.Tensor | None = None
    #: dtype and device the weight had when the slot was built: a cast or move (DeepSpeed's, ``model.to``) rebuilds.
    storage: tuple[torch.dtype, torch.device] | None = None

    def stored(self) -> torch.Tensor:
        return self.momentum.ds_tensor if _is_zero3(self.momentum) else self.momentum.data

    def target(self) -> torch.Tensor:
        """The tensor the update writes (or, without a master, updates in place)."""
        return self.momentum.ds_tensor if self.kind == "partition" else self.momentum.data

    def source(self) -> torch.Tensor:
        return self.online.ds_tensor if self.kind == "partition" else self.online.data

    def finish(self) -> None:
        """Replicated weights: put this rank's slice of the updated full weight into its partition."""
        if self.kind != "replicated":
            return
        full = (self.master if self.master is not None else self.momentum.data).reshape(-1)
        start, length = _partition_bounds(self.momentum)
        self.momentum.ds_tensor[:length].copy_(full[start : start + length])


class MomentumEMA:
    """``m = momentum * m + (1 - momentum) * online`` over named (online, momentum) parameter pairs, in fp32.

    Built lazily on the first :meth:`step` (after DeepSpeed has cast and partitioned the weights); ``reset`` drops
    the masters (after weights are loaded from elsewhere), :meth:`state_dict` / :meth:`load_state_dict` carry them.
    """

    def __init__(self, momentum: float) -> None:
        self.momentum = momentum
        self.slots: list[Slot] | None = None

    def reset(self) -> None:
        self.slots = None

    @torch.no_grad()
    def step(self, pairs: Callable[[], Sequence[Triple]]) -> None:
        """One EMA step over the ``(name, online, momentum)`` triples ``pairs()`` lists (called only to build)."""
        if self.slots is None or any((slot.stored().dtype, slot.stored().device) != slot.storage
                                     for slot in self.slots):
            self.slots = self._build(pairs())
        for slot in self.slots:
            if slot.kind == "partition" and not _released(slot.momentum):
                raise RuntimeError(
                    f"ZeRO-3 momentum weight {slot.name} is gathered when its EMA runs; the partitions would be "
                    "updated under a stale full copy. The EMA must run before DeepSpeed fetches the momentum encoders "
                    "(the pre-trainer's forward pre-hook does this)"
                )
        # A process's first step: the persistent online weights DeepSpeed has not gathered yet are read here.
        with _gathered([slot.online for slot in self.slots if slot.kind == "replicated" and _released(slot.online)]):
            self._update()
        for slot in self.slots:
            slot.finish()

    def _update(self) -> None:
        with_master = [slot for slot in self.slots if slot.master is not None]
        in_place = [slot for slot in self.slots if slot.master is None]
        for group, targets in ((with_master, [slot.master for slot in with_master]),
                               (in_place, [slot.target() for slot in in_place])):
            if group:
                torch._foreach_mul_(targets, self.momentum)
                torch._foreach_add_(targets, [slot.source().view_as(target) for slot, target in zip(group, targets)],
                                    alpha=1 - self.momentum)
        # A replicated weight not gathered yet has no full copy to write: finish() fills its partition.
        written = [slot for slot in with_master if slot.kind != "replicated" or not _released(slot.momentum)]
        if written:
            torch._foreach_copy_([slot.target() for slot in written],
                                 [slot.master.view_as(slot.target()) for slot in written])

    def _build(self, pairs: Sequence[Triple]) -> list[Slot]:
        slots = []
        for name, online, momentum in pairs:
            if online.shape != momentum.shape or online.dtype != momentum.dtype:
                raise ValueError(f"momentum weight {name}: {tuple(momentum.shape)} {momentum.dtype} does not mirror "
                                 f"its online weight ({tuple(online.shape)} {online.dtype})")
            kind = "full"
            if _is_zero3(momentum):
                if getattr(momentum, "ds_secondary_tensor", None) is not None or hasattr(
                        momentum.ds_tensor, "ds_quant_scale"):
                    raise NotImplementedError(f"{name}: ZeRO++ secondary or quantized partitions of the momentum "
                                              "encoders are not supported (zero_hpz_partition_size, "
                                              "zero_quantized_nontrainable_weights)")
                kind = "replicated" if momentum.ds_persist else "partition"
            slot = Slot(name, online, momentum, kind)
            slot.storage = (slot.stored().dtype, slot.stored().device)
            slots.append(slot)
        with _gathered([slot.momentum for slot in slots if slot.kind == "replicated" and _released(slot.momentum)]):
            for slot in slots:
                current = slot.target()
                # Replicated weights always get a full master: at a process's first step they are not gathered.
                if slot.kind == "replicated" or current.dtype != torch.float32:
                    slot.master = current.detach().float().clone()
        return slots

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """This rank's masters by weight name (empty when none are needed, e.g. fp32 without persistent ZeRO-3)."""
        if self.slots is None:
            return {"masters": {}}
        return {"masters": {slot.name: slot.master for slot in self.slots if slot.master is not None},
                "kinds": {slot.name: slot.kind for slot in self.slots}}

    def load_state_dict(self, state: dict[str, Any], pairs: Callable[[], Sequence[Triple]]) -> bool:
        """Adopt saved masters; returns False (masters rebuilt from the weights) when they do not fit this run."""
        self.slots = self._build(pairs())
        masters = state.get("masters", {})
        expected = {slot.name: slot.master for slot in self.slots if slot.master is not None}
        fits = masters.keys() == expected.keys() and all(
            masters[name].shape == tensor.shape for name, tensor in expected.items())
        if not fits:
            return False
        for slot in self.slots:
            if slot.master is not None:
                slot.master.copy_(masters[slot.name])
        return True
