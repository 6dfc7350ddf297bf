"""A gloo process group for tests that spawn ranks themselves (torch.multiprocessing.spawn)."""
import contextlib
from collections.abc import Iterator

import torch.distributed as dist


@contextlib.contextmanager
def gloo_group(rank: int, world_size: int, init_method: str) -> Iterator[None]:
    """Joined for the body; on success every rank meets at a barrier before any tears its connections down (a rank
    destroying the group while its peer still reads from it aborted one CI run with SIGABRT)."""
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
