"""A distributed batch sampler that resumes mid-epoch exactly and splits global batches by contiguous chunks.

Layout. Let `G = world_size * batch_size` (the global batch) and `perm` the epoch's order:
`torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch))` (or `arange` without
shuffling). Global step `s` covers `perm[s*G : (s+1)*G]`, and rank `r` takes its `r`-th contiguous chunk,
`perm[s*G + r*batch_size : s*G + (r+1)*batch_size]`. So the concatenation over ranks of one step is exactly the
batch a 1-rank run with batch size `G` sees at that step: a 2-rank run of batch B and a 1-rank run of batch 2B train
on the same samples in the same order, which the 2-rank vs 1-rank tests of the training loop rely on.
(torch's DistributedSampler strides instead -- rank r takes perm[r::world_size] -- which breaks that equality.)

Steps per epoch: `num_samples // G` with `drop_last` (the tail is dropped); otherwise `ceil(num_samples / G)`,
the last global batch filled up by wrapping around to the start of `perm` so every rank still gets `batch_size`
indices (ranks must agree on batch shapes for all_gather).

Resume. `state_dict()` is `{"epoch", "step"}`: the epoch and how many steps of it have been yielded.
`load_state_dict` makes the next iteration start at that step of that epoch, without touching any data; once a
pass ends, later passes start at step 0 again. `set_epoch(e)` with the epoch already set keeps a loaded position, so
the usual `sampler.set_epoch(epoch)` at the top of the epoch loop does not undo a resume.
Note: a DataLoader with workers draws batches ahead of the training loop (prefetching), so `step` may run ahead of
the steps actually trained; pass the loop's own count, `state_dict(step=steps_done_this_epoch)`, when saving.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch


class ResumableSampler(torch.utils.data.Sampler[list[int]]):
    """Per-rank batches of dataset indices (use as a DataLoader's `batch_sampler`); layout in the module doc."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size} and {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        if num_samples < 1:
            raise ValueError(f"the dataset is empty (num_samples={num_samples})")
        if drop_last and num_samples < world_size * batch_size:
            raise ValueError(
                f"{num_samples} samples cannot fill one global batch of {world_size} x {batch_size} with drop_last;"
                " lower the batch size or use drop_last=False"
            )
        self.num_samples, self.batch_size, self.world_size, self.rank = num_samples, batch_size, world_size, rank
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = 0
        self.step = 0  # steps of `epoch` yielded so far (or loaded by load_state_dict)
        self._start = 0  # where the next pass begins

    @property
    def global_batch_size(self) -> int:
        return self.world_size * self.batch_size

    def __len__(self) -> int:
        """Steps per epoch (the same on every rank)."""
        if self.drop_last:
            return self.num_samples // self.global_batch_size
        return math.ceil(self.num_samples / self.global_batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation; a new epoch starts at step 0, the current one keeps its position."""
        if epoch != self.epoch:
            self.epoch, self.step, self._start = int(epoch), 0, 0

    def permutation(self, epoch: int | None = None) -> torch.Tensor:
        """The order of all indices in `epoch` (default: the current one), LongTensor [num_samples]."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return torch.arange(self.num_samples)
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))

    def global_batch(self, step: int, epoch: int | None = None) -> list[int]:
        """All ranks' indices of global `step`, rank 0's chunk first (`G` indices)."""
        order = self.permutation(epoch)
        size = self.global_batch_size
        if not self.drop_last and (step + 1) * size > self.num_samples:
            order = order.repeat(math.ceil((step + 1) * size / self.num_samples))
        return order[step * size : (step + 1) * size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        order = self.permutation()
        steps, size = len(self), self.global_batch_size
        if not self.drop_last and steps * size > self.num_samples:
            order = order.repeat(math.ceil(steps * size / self.num_samples))  # wrap-around fill of the last step
        start, self._start = self._start, 0
        self.step = start
        for step in range(start, steps):
            first = step * size + self.rank * self.batch_size
            self.step = step + 1
            yield order[first : first + self.batch_size].tolist()

    def state_dict(self, step: int | None = None) -> dict[str, int]:
        """`{"epoch", "step"}`: steps of `epoch` consumed; `step` overrides the yielded count (see module doc)."""
        return {"epoch": self.epoch, "step": self.step if step is None else int(step)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume: the next pass yields the batches of `state["epoch"]` from step `state["step"]` on."""
        step = int(state["step"])
        if not 0 <= step <= len(self):
            raise ValueError(f"step {step} out of range for an epoch of {len(self)} steps")
        self.epoch, self.step, self._start = int(state["epoch"]), step, step
