"""Decoder self-attention of the static decode step: append the new tokens' K/V to the cache and attend, one kernel.

Inputs are the fused QKV projection of the ``L`` new tokens of each row, ``qkv [R, L, 3 * H * Dh]`` (query, key,
value, each head-major), and one layer's preallocated cache ``key_cache``/``value_cache [R_cache, H, T, Dh]``. The
new tokens sit at positions ``position .. position + L - 1`` (``position`` a 0-d device tensor: the same kernel
serves every step of a CUDA graph). One program owns one (row, head):

1. it stores the new keys/values into the cache at those positions;
2. it attends, with an online softmax, over the cached positions ``t < position`` and then over the new tokens
   (read from ``qkv``, not back from the cache: no ordering between the store and the loads is needed), query
   ``l`` seeing new token ``j`` only when ``j <= l``;
3. it writes the context ``[R, L, H * Dh]`` in the layout the output projection reads.

``keep [R_cache, T]`` (bool) drops prompt padding. With ``history [R_cache, T]`` (beam search), row ``r`` reads its
position-``t`` key from cache row ``history[r, t]`` instead of its own, so reordering beams rewrites that small
table instead of moving the cache; positions ``t >= position`` are always the row's own.

Dropped keys get the logit -1e30 (finite, like the additive ``finfo.min`` masks of the reference): a query whose
every key is dropped (a left-padding position, whose output is never used) gets finite garbage, not NaN, and a
dropped key's weight is exactly 0 next to any kept one. Query blocks are tiny (one token per step), so the scores
are broadcast products, not ``tl.dot`` (which needs 16 rows). Semantics: ``blip_fast.decode_ops``'s reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_LOG2E_K = tl.constexpr(LOG2E)
_DROPPED = tl.constexpr(-1e30)


def _output_buffer(shape, dtype, device) -> torch.Tensor:
    """Every kernel output is allocated here, so tests can poison (NaN-fill) what the kernels must overwrite."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _online_update(logits, values, max_i, sum_i, acc):
    """Fold one block of base-2 logits ``[BL, BT]`` and values ``[BT, BD]`` into the running softmax state."""
    new_max = tl.maximum(max_i, tl.max(logits, 1))
    rescale = tl.exp2(max_i - new_max)
    p = tl.exp2(logits - new_max[:, None])
    sum_i = sum_i * rescale + tl.sum(p, 1)
    acc = acc * rescale[:, None] + tl.sum(p[:, :, None] * values[None, :, :], 1)
    return new_max, sum_i, acc


@triton.jit
def _decode_self_attention_kernel(
    qkv_ptr, k_cache_ptr, v_cache_ptr, position_ptr, keep_ptr, history_ptr, out_ptr,
    L, H, Dh, D, qk_scale,
    stride_qr, stride_ql,
    stride_cr, stride_ch, stride_ct,
    stride_keep_r, stride_hist_r,
    stride_or, stride_ol,
    HAS_HISTORY: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    position = tl.load(position_ptr)
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    l_valid = offs_l < L
    d_valid = offs_d < Dh
    tile = l_valid[:, None] & d_valid[None, :]

    token = qkv_ptr + row * stride_qr + offs_l[:, None] * stride_ql + head * Dh + offs_d[None, :]
    query = tl.load(token, mask=tile, other=0.0).to(tl.float32)  # [BL, BD]
    new_keys = tl.load(token + D, mask=tile, other=0.0)
    new_values = tl.load(token + 2 * D, mask=tile, other=0.0)
    cache_offset = row * stride_cr + head * stride_ch + (position + offs_l)[:, None] * stride_ct + offs_d[None, :]
    tl.store(k_cache_ptr + cache_offset, new_keys.to(k_cache_ptr.dtype.element_ty), mask=tile)
    tl.store(v_cache_ptr + cache_offset, new_values.to(v_cache_ptr.dtype.element_ty), mask=tile)

    max_i = tl.full([BLOCK_L], _DROPPED, tl.float32)
    sum_i = tl.zeros([BLOCK_L], tl.float32)
    acc = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)
    query = query * qk_scale  # base-2 logits: scale * log2(e) folded into the query

    # Cached positions t < position (rows from the history table under beam search).
    for t0 in range(0, position, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_valid = offs_t < position
        keep = tl.load(keep_ptr + row * stride_keep_r + offs_t, mask=t_valid, other=0) != 0
        if HAS_HISTORY:
            source = tl.load(history_ptr + row * stride_hist_r + offs_t, mask=t_valid, other=0)
        else:
            source = row + offs_t * 0
        kv_offset = source[:, None] * stride_cr + head * stride_ch + offs_t[:, None] * stride_ct + offs_d[None, :]
        kv_mask = t_valid[:, None] & d_valid[None, :]
        keys = tl.load(k_cache_ptr + kv_offset, mask=kv_mask, other=0.0).to(tl.float32)
        values = tl.load(v_cache_ptr + kv_offset, mask=kv_mask, other=0.0).to(tl.float32)
        logits = tl.sum(query[:, None, :] * keys[None, :, :], 2)  # [BL, BT]
        logits = tl.where((keep & t_valid)[None, :], logits, _DROPPED)
        logits = tl.where(t_valid[None, :], logits, float("-inf"))  # padding of the block: no weight at all
        max_i, sum_i, acc = _online_update(logits, values, max_i, sum_i, acc)

    # The new tokens themselves: causal among them.
    offs_j = tl.arange(0, BLOCK_L)
    keep_new = tl.load(keep_ptr + row * stride_keep_r + position + offs_j, mask=offs_j < L, other=0) != 0
    logits = tl.sum(query[:, None, :] * new_keys.to(tl.float32)[None, :, :], 2)  # [BL, BL]
    visible = (offs_j[None, :] <= offs_l[:, None]) & keep_new[None, :]
    logits = tl.where(visible, logits, _DROPPED)
    logits = tl.where((offs_j < L)[None, :], logits, float("-inf"))
    max_i, sum_i, acc = _online_update(logits, new_values.to(tl.float32), max_i, sum_i, acc)

    out = acc / sum_i[:, None]
    tl.store(out_ptr + row * stride_or + offs_l[:, None] * stride_ol + head * Dh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=tile)


def _config(length: int, head_dim: int) -> dict:
    """Blocks of new tokens, cached positions and head dims. The scores are a [BLOCK_L, BLOCK_T, BLOCK_D] broadcast
    product held in registers: ~4K elements per 4 warps compiles without spills for sm_90 (one token per step:
    64 positions per iteration); longer prompts take fewer positions per iteration and more warps."""
    block_l = max(1, triton.next_power_of_2(length))
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_t = max(16, min(128, triton.next_power_of_2(max(1, 4096 // (block_l * block_d)))))
    num_warps = min(16, max(4, block_l * block_t * block_d // 1024))
    return dict(BLOCK_L=block_l, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps)


def decode_self_attention(
    qkv: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, position: torch.Tensor,
    keep: torch.Tensor, history: torch.Tensor | None, num_heads: int,
) -> torch.Tensor:
    """Append the new tokens' K/V to one layer's cache (in place) and return their attention context.

    qkv ``[R, L, 3 * D]`` (rows may be strided), key/value cache ``[R_cache >= R, H, T, Dh]`` (unit last stride),
    position 0-d int64 device tensor, keep ``[R_cache, T]`` bool, history ``[R_cache, T]`` int64 or None. Returns
    ``[R, L, D]`` in qkv's dtype.
    """
    rows, length, width3 = qkv.shape
    width = width3 // 3
    head_dim = width // num_heads
    if key_cache.shape[1] != num_heads or key_cache.shape[3] != head_dim or key_cache.shape != value_cache.shape:
        raise ValueError(f"cache {tuple(key_cache.shape)} does not fit qkv {tuple(qkv.shape)} with {num_heads} heads")
    if qkv.stride(-1) != 1 or qkv.stride(1) != width3:
        qkv = qkv.contiguous()
    out = _output_buffer((rows, length, width), qkv.dtype, qkv.device)
    if rows == 0 or length == 0:
        return out
    cfg = _config(length, head_dim)
    history_args = (history, history.stride(0)) if history is not None else (keep, 0)
    _decode_self_attention_kernel[(rows, num_heads)](
        qkv, key_cache, value_cache, position, keep, history_args[0], out,
        length, num_heads, head_dim, width, head_dim**-0.5 * LOG2E,
        qkv.stride(0), qkv.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        keep.stride(0), history_args[1],
        out.stride(0), out.stride(1),
        HAS_HISTORY=history is not None, **cfg,
    )
    return out
