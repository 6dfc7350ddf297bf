"""Token + position embedding of the static decode step, one kernel (forward only).

``out[r, l] = word_embeddings[input_ids[r, l]] + position_embeddings[position + l]`` with ``position`` a 0-d device
tensor, so the same launch serves every step of a CUDA graph. Semantics: ``blip_fast.decode_ops``'s reference (the
eager ``word_embeddings(ids) + position_embeddings(positions)``, added in the table dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _output_buffer(shape, dtype, device) -> torch.Tensor:
    """Every kernel output is allocated here, so tests can poison (NaN-fill) what the kernels must overwrite."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _decode_embed_kernel(ids_ptr, position_ptr, word_ptr, pos_ptr, out_ptr, L, D, stride_ids_r, stride_word,
                         stride_pos, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    token = tl.program_id(1)
    token_id = tl.load(ids_ptr + row * stride_ids_r + token).to(tl.int64)
    position = tl.load(position_ptr) + token
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        valid = offs < D
        word = tl.load(word_ptr + token_id * stride_word + offs, mask=valid, other=0.0)
        pos = tl.load(pos_ptr + position * stride_pos + offs, mask=valid, other=0.0)
        tl.store(out_ptr + (row * L + token) * D + offs, word + pos, mask=valid)


def decode_embed(input_ids: torch.Tensor, position: torch.Tensor, word_embeddings: torch.Tensor,
                 position_embeddings: torch.Tensor) -> torch.Tensor:
    """ids ``[R, L]`` (int64), position 0-d int64 device tensor, tables ``[V, D]``/``[P, D]`` -> ``[R, L, D]``."""
    rows, length = input_ids.shape
    width = word_embeddings.shape[1]
    if input_ids.stride(-1) != 1:
        input_ids = input_ids.contiguous()
    out = _output_buffer((rows, length, width), word_embeddings.dtype, word_embeddings.device)
    if rows and length:
        _decode_embed_kernel[(rows, length)](
            input_ids, position, word_embeddings, position_embeddings, out, length, width, input_ids.stride(0),
            word_embeddings.stride(0), position_embeddings.stride(0),
            BLOCK_D=min(1024, triton.next_power_of_2(width)),
        )
    return out
