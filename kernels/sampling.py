"""Graph-safe sampling: top-k/top-p filtering and a draw on the k survivors, and Gumbel noise, from a device seed.

``sample_sorted`` takes each row's highest scores already sorted (``torch.topk``: one kernel, no full-vocabulary
sort) and, in one program per row, keeps what HuggingFace's TopK then TopP warpers keep (ties with the k-th value
included, up to the extra candidates the caller fetched), normalises, and draws one token by the exponential race
``argmax_i log p_i - log E_i`` with ``E_i = -log U_i`` (equivalently Gumbel-max): an exact draw from the filtered
distribution without a cumulative-sum search. ``gumbel_noise`` fills a matrix with ``-log(-log U)`` (beam
sampling: Gumbel-top-k draws ``2 * num_beams`` candidates without replacement).

Randomness: Philox-4x32-10 (``triton.language.random.philox``) keyed by a 64-bit seed read from device memory
(so one captured graph replays with a new seed per call), with counters ``(column, row, step, stream)``. The
uniforms are Triton's ``uint_to_uniform_float`` of the first output word. ``blip_fast.sampling`` reproduces both
bit for bit in torch integer ops: the CPU path and the oracle.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.random import philox, uint_to_uniform_float

#: Widest row ``sample_sorted`` takes in one block (a top-k of up to a few thousand candidates).
MAX_WIDTH = 4096


def _output_buffer(shape, dtype, device) -> torch.Tensor:
    """Every kernel output is allocated here, so tests can poison what the kernels must overwrite."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _uniform(seed, column, row, step, stream):
    """Philox uniform in [0, 1) for counters (column, row, step, stream); ``column`` a block, the rest scalars."""
    zero = column * 0
    c0 = column.to(tl.uint32)
    c1 = (zero + row).to(tl.uint32)
    c2 = (zero + step).to(tl.uint32)
    c3 = (zero + stream).to(tl.uint32)
    bits, _, _, _ = philox(seed, c0, c1, c2, c3)
    return uint_to_uniform_float(bits)


@triton.jit(do_not_specialize=["W", "top_k", "min_keep", "step"])
def _sample_sorted_kernel(values_ptr, indices_ptr, out_ptr, seed_ptr, W, top_k, top_p, min_keep, step,
                          stride_vr, stride_ir, BLOCK_W: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_W)
    in_row = offs < W
    values = tl.load(values_ptr + row * stride_vr + offs, mask=in_row, other=float("-inf")).to(tl.float32)
    kth = tl.load(values_ptr + row * stride_vr + top_k - 1).to(tl.float32)
    kept = in_row & (values >= kth)  # HuggingFace's top-k keeps every score equal to the k-th one
    top = tl.max(tl.where(kept, values, float("-inf")), 0)
    weights = tl.where(kept, tl.exp(values - top), 0.0)
    probs = weights / tl.sum(weights, 0)
    # TopP: drop a token when the probability of it and every less likely token is <= 1 - top_p.
    tail = 1.0 - tl.cumsum(probs, 0) + probs
    kept = kept & ((tail > 1.0 - top_p) | (offs < min_keep))
    seed = tl.load(seed_ptr)
    race = tl.log(tl.where(kept, probs, 1.0)) - tl.log(-tl.log(_uniform(seed, offs, row, step, 0)))
    race = tl.where(kept, race, float("-inf"))
    winner = tl.argmax(race, 0)
    tl.store(out_ptr + row, tl.load(indices_ptr + row * stride_ir + winner))


@triton.jit(do_not_specialize=["R", "C", "step", "stream"])
def _gumbel_noise_kernel(out_ptr, seed_ptr, R, C, step, stream, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(seed_ptr)
    noise = -tl.log(-tl.log(_uniform(seed, offs, row, step, stream)))
    tl.store(out_ptr + row.to(tl.int64) * C + offs, noise, mask=offs < C)


def sample_sorted(values: torch.Tensor, indices: torch.Tensor, top_k: int, top_p: float, min_keep: int,
                  seed: torch.Tensor, step: int) -> torch.Tensor:
    """One token per row from sorted candidate scores; see the module docstring. values ``[R, W]`` (descending),
    indices ``[R, W]`` int64, ``top_k <= W``, seed a 0-d int64 device tensor. Returns ``[R]`` int64."""
    rows, width = values.shape
    if not 1 <= top_k <= width <= MAX_WIDTH:
        raise ValueError(f"sample_sorted needs 1 <= top_k ({top_k}) <= width ({width}) <= {MAX_WIDTH}")
    values = values if values.stride(-1) == 1 else values.contiguous()
    indices = indices if indices.stride(-1) == 1 else indices.contiguous()
    out = _output_buffer((rows,), torch.int64, values.device)
    if rows:
        _sample_sorted_kernel[(rows,)](values, indices, out, seed, width, top_k, float(top_p), min_keep, step,
                                       values.stride(0), indices.stride(0), BLOCK_W=triton.next_power_of_2(width))
    return out


def gumbel_noise(seed: torch.Tensor, rows: int, columns: int, step: int, stream: int,
                 device: torch.device) -> torch.Tensor:
    """``[rows, columns]`` fp32 Gumbel(0, 1) noise for counters (column, row, step, stream)."""
    out = _output_buffer((rows, columns), torch.float32, device)
    if rows and columns:
        block = min(1024, triton.next_power_of_2(columns))
        _gumbel_noise_kernel[(rows, triton.cdiv(columns, block))](out, seed, rows, columns, step, stream,
                                                                   BLOCK=block)
    return out
