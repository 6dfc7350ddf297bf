"""Decode-step attention over a cached per-image context: Triton kernels and their host launcher (forward only).

Semantics are those of ``blip_fast.ops._decode_attention_reference`` (SDPA, the oracle):

    out[c, h] = softmax(q[c, h] @ k[c, h]^T * Dh^-0.5 + mask[c]) @ v[c, h]

with ``q [C, H, Mq, Dh]`` (the ``Mq = rows_per_image * new_tokens`` query rows of image ``c``: beams or samples are
extra query rows, never copies of the context) and ``k``/``v`` ``[C, H, N, Dh]`` (the cross-attention cache, N = 577
image tokens at 384 px). During decoding this K/V is ~94% of the bytes a step reads (DESIGN.md §3), so the kernel
is built around reading it exactly once: one program owns one (image, head, key split) and holds *all* of that
image's query rows in one tile, streaming K/V tiles of BLOCK_N keys through an online softmax (fp32 statistics,
base-2 logits so every exponential is one ``exp2``).

Tiles: ``tl.dot`` needs at least 16 rows, so the 1-5 query rows are padded (masked) to BLOCK_M = 16; the padded
rows cost tensor-core work that is free next to the memory traffic. fp16/bf16 inputs use tensor-core dots with
fp32 accumulation, and P is rounded to the input dtype for the P @ V dot, as FlashAttention does. fp32 inputs use
exact ("ieee") products: fp32 is the CPU/test dtype, and TF32 would cost ~1e-3 relative error; on a GPU this makes
fp32 roughly compute-bound, which is acceptable because decoding runs in fp16/bf16.

Split-K: at batch 1 there are only 12 (image, head) programs for ~132 SMs, so the keys are split into chunks, each
program writes its unnormalised partial (max, sum, acc), and a second small kernel merges the splits in a fixed
order: deterministic, no atomics. With enough programs (batch >= ~32) there is one split and the main kernel writes
the normalised output directly. The key-tile size and the split count come from a small cost model
(:func:`_gpu_launch`): whole waves of programs, and few padded keys in the last tile of 577.

Masks are additive per key (``[C, 1, 1, N]`` after broadcasting), as ``ops.additive_mask`` builds them: 0 keeps,
``finfo(dtype).min`` drops. The mask is clamped to -1e30 before the base-2 conversion so ``finfo(float32).min``
does not overflow to -inf; a split whose keys are all dropped then still has a finite maximum, and its weight in
the merge underflows to exactly 0 whenever another split has a kept key.

Interpreter (CPU, TRITON_INTERPRET=1): fp32 and fp16 run exactly the GPU code path; the interpreter's bf16
arithmetic is wrong (DESIGN.md §4b), so bf16 is checked on GPU only.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Kernels may only read globals that are tl.constexpr (the interpreter does not enforce this; the compiler does).
_LOG2E_K = tl.constexpr(LOG2E)
_MASK_FLOOR = tl.constexpr(-1e30)  # additive masks are clamped here: finite after the * log2(e) conversion


def _output_buffer(shape, dtype, device) -> torch.Tensor:
    """Every kernel output is allocated here, so tests can poison (NaN-fill) what the kernels must overwrite."""
    return torch.empty(shape, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, part_acc_ptr, part_stats_ptr,
    H, M, N, D, tiles_per_split, qk_scale,
    stride_qc, stride_qh, stride_qm,
    stride_kc, stride_kh, stride_kn,
    stride_vc, stride_vh, stride_vn,
    stride_mask_c, stride_mask_n,
    stride_oc, stride_oh, stride_om,
    HAS_MASK: tl.constexpr, WRITE_PARTIAL: tl.constexpr, PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (image * head, row block, key split): online softmax over the split's keys for all query rows.

    WRITE_PARTIAL: store the unnormalised acc [BH, S, M, D] and (max, sum) [2, BH, S, M] (base 2) for the merge
    kernel; otherwise (one split) store ``acc / sum`` to ``out`` in its dtype.
    """
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    image = (pid_bh // H).to(tl.int64)  # image * stride can pass 2**31 for large batches of big caches
    head = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = offs_m < M
    d_valid = offs_d < D

    # Padded rows and dims load as 0: their logits are finite and they are never stored.
    q = tl.load(q_ptr + image * stride_qc + head * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    k_base = k_ptr + image * stride_kc + head * stride_kh
    v_base = v_ptr + image * stride_vc + head * stride_vh

    max_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    sum_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    n_begin = pid_s * tiles_per_split * BLOCK_N
    n_end = tl.minimum(N, n_begin + tiles_per_split * BLOCK_N)
    for start_n in range(n_begin, n_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_valid = offs_n < n_end
        # EVEN_D (Dh == BLOCK_D, e.g. 64): no mask along the contiguous dim, so the loads vectorise and the
        # compiler can pipeline them (cp.async); a per-element Dh mask disables both.
        if EVEN_D:
            tile_mask = key_valid[:, None]
        else:
            tile_mask = key_valid[:, None] & d_valid[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=tile_mask, other=0.0)
        logits = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], base 2
        if HAS_MASK:
            bias = tl.load(mask_ptr + image * stride_mask_c + offs_n * stride_mask_n, mask=key_valid, other=0.0)
            logits += tl.maximum(bias.to(tl.float32), _MASK_FLOOR) * _LOG2E_K
        logits = tl.where(key_valid[None, :], logits, float("-inf"))

        # Online softmax. Every tile holds a valid key (splits are never empty), so the new maximum is finite and
        # exp2(-inf - finite) = 0 handles the first tile.
        new_max = tl.maximum(max_i, tl.max(logits, 1))
        rescale = tl.exp2(max_i - new_max)
        p = tl.exp2(logits - new_max[:, None])
        sum_i = sum_i * rescale + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=tile_mask, other=0.0)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        max_i = new_max

    if WRITE_PARTIAL:
        splits = tl.num_programs(2)
        row = (pid_bh * splits + pid_s) * M + offs_m
        tl.store(part_acc_ptr + row[:, None] * D + offs_d[None, :], acc, mask=row_valid[:, None] & d_valid[None, :])
        tl.store(part_stats_ptr + row, max_i, mask=row_valid)
        tl.store(part_stats_ptr + tl.num_programs(0) * splits * M + row, sum_i, mask=row_valid)
    else:
        out = acc / sum_i[:, None]
        tl.store(out_ptr + image * stride_oc + head * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])


@triton.jit
def _merge_splits_kernel(
    part_acc_ptr, part_stats_ptr, out_ptr,
    H, M, D, splits, stats_plane,
    stride_oc, stride_oh, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (image * head, row block): merge the key splits' partials in split order (deterministic)."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = offs_m < M
    valid = row_valid[:, None] & (offs_d < D)[None, :]

    # Pass 1: the global maximum per row (every split's maximum is finite, see the module docstring).
    top = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(0, splits):
        row = (pid_bh * splits + s) * M + offs_m
        top = tl.maximum(top, tl.load(part_stats_ptr + row, mask=row_valid, other=0.0))
    # Pass 2: rescale each split's sum and accumulator to the global maximum and add them up.
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in range(0, splits):
        row = (pid_bh * splits + s) * M + offs_m
        weight = tl.exp2(tl.load(part_stats_ptr + row, mask=row_valid, other=0.0) - top)
        # Padded rows read a sum of 1 so their (never stored) quotient stays finite.
        total += weight * tl.load(part_stats_ptr + stats_plane + row, mask=row_valid, other=1.0)
        acc += weight[:, None] * tl.load(part_acc_ptr + row[:, None] * D + offs_d[None, :], mask=valid, other=0.0)

    image = (pid_bh // H).to(tl.int64)
    head = pid_bh % H
    out = acc / total[:, None]
    tl.store(out_ptr + image * stride_oc + head * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=valid)


# ---------------------------------------------------------------------------------------------------- launcher
@functools.cache
def _sm_count(device_index: int) -> int:
    # Cached: the launcher runs once per layer per decode step, where host time is latency at batch 1.
    return torch.cuda.get_device_properties(device_index).multi_processor_count


#: Programs resident per SM (4 warps, ~32-64 KiB of shared memory each): what one "wave" holds per SM.
PROGRAMS_PER_SM = 2
#: Key-tile sizes the GPU launch chooses from, and the cost of a tile beyond its keys (loop, rescale), in keys.
BLOCK_N_CHOICES = (32, 64, 128)
TILE_OVERHEAD_KEYS = 16
#: Splitting costs a second launch (MERGE_COST_KEYS, in keys of the main loop) and writes/reads fp32 partials
#: (SPLIT_PENALTY, a fraction of the main loop): a split must win more than that.
MERGE_COST_KEYS = 64
SPLIT_PENALTY = 0.15


def _gpu_launch(pairs: int, row_blocks: int, keys: int, tile_bytes: int, sm_count: int) -> tuple[int, int]:
    """(BLOCK_N, splits) for the GPU: the key tiling and split count that minimise the modelled time, waves x keys per
    program. Whole waves: 132 SMs x 2 programs; a partly filled wave costs a full one. Keys per program include the
    padding of the last tile (577 keys: 5 tiles of 128 pad 63 keys, 19 of 32 pad 31), plus a per-tile overhead;
    splitting adds the merge kernel. Batch 1 (12 heads) splits the keys finely to fill the GPU; batch 256 does not
    split at all."""
    slots = PROGRAMS_PER_SM * sm_count
    best = None
    for block_n in BLOCK_N_CHOICES:
        if block_n * tile_bytes > 32 * 1024:  # K and V tiles per pipeline stage stay within 64 KiB
            continue
        tiles = triton.cdiv(keys, block_n)
        for splits in range(1, tiles + 1):
            per_split = triton.cdiv(tiles, splits)
            if triton.cdiv(tiles, per_split) != splits:  # an empty split: the same as fewer splits
                continue
            waves = triton.cdiv(pairs * row_blocks * splits, slots)
            cost = waves * per_split * (block_n + TILE_OVERHEAD_KEYS)
            if splits > 1:
                cost = cost * (1 + SPLIT_PENALTY) + MERGE_COST_KEYS
            if best is None or cost < best[0]:
                best = (cost, block_n, splits)
    return best[1], best[2]


def _config(images: int, heads: int, rows: int, keys: int, head_dim: int, dtype: torch.dtype, device: torch.device,
            splits: int | None, sm_count: int | None = None) -> dict:
    """Block sizes, warps, stages and the key split for one launch: a cost model instead of autotuning (autotune with
    several configs needs a GPU, and the interpreter wants few, large programs)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = min(64, max(16, triton.next_power_of_2(rows)))  # tl.dot needs >= 16 rows
    row_blocks = triton.cdiv(rows, block_m)
    if device.type == "cuda":
        # Streaming K/V is the whole cost: 3 stages keep enough loads in flight. Shared memory per stage is
        # 2 * BLOCK_N * BLOCK_D * itemsize (K and V): 32 KiB for fp16 at Dh = 64 and BLOCK_N = 128.
        tile_bytes = block_d * torch.finfo(dtype).bits // 8
        if sm_count is None:
            sm_count = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        block_n, chosen = _gpu_launch(images * heads, row_blocks, keys, tile_bytes, sm_count)
        splits = chosen if splits is None else splits
        num_warps, num_stages = 4, 3
    else:
        block_n, num_warps, num_stages = 128, 4, 1
        splits = 1 if splits is None else splits
    tiles = triton.cdiv(keys, block_n)
    tiles_per_split = triton.cdiv(tiles, max(1, min(splits, tiles)))
    splits = triton.cdiv(tiles, tiles_per_split)  # no empty split: every split sees at least one valid key
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages,
                splits=splits, tiles_per_split=tiles_per_split, row_blocks=row_blocks)


def _precision(dtype: torch.dtype) -> str:
    # fp32: exact products (see the module docstring); fp16/bf16 ignore the setting (tensor cores, fp32 accumulate).
    return "ieee" if dtype == torch.float32 else "tf32"


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None,
                     splits: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of each image's query rows over its cached context, reading K/V once for all rows (forward only).

    query ``[C, H, Mq, Dh]``, key/value ``[C, H, N, Dh]`` (same dtype: fp16, bf16 or fp32), mask additive and
    broadcastable to ``[C, 1, 1, N]`` (boolean: True keeps) or None. Returns ``[C, H, Mq, Dh]`` in the query's dtype,
    scaled by ``Dh ** -0.5``. ``splits`` forces the number of key splits (tests); by default a heuristic picks it.
    ``out`` (query's shape and dtype, any strides with a unit last one) receives the result, e.g. a ``[C, Mq, H,
    Dh]`` buffer viewed as ``[C, H, Mq, Dh]``: the layout the output projection reads, with no transposing copy.
    """
    if query.dim() != 4 or key.shape != value.shape or key.dim() != 4:
        raise ValueError(f"expected query [C, H, Mq, Dh] and key/value [C, H, N, Dh]; got {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")
    images, heads, rows, head_dim = query.shape
    keys = key.shape[2]
    if key.shape[:2] != (images, heads) or key.shape[3] != head_dim or keys == 0:
        raise ValueError(f"key/value {tuple(key.shape)} do not match query {tuple(query.shape)}")
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in (torch.float16, torch.bfloat16,
                                                                             torch.float32):
        raise ValueError(f"query/key/value must share one of fp16/bf16/fp32; got {query.dtype}, {key.dtype}, "
                         f"{value.dtype}")
    # The kernels address the last dim with unit stride and everything else by stride (no copy of the cached K/V).
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    if out is None:
        out = _output_buffer((images, heads, rows, head_dim), query.dtype, query.device)
    elif out.shape != query.shape or out.dtype != query.dtype or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} must match query {tuple(query.shape)} {query.dtype} "
                         "with a unit last stride")
    if rows == 0:
        return out
    has_mask = mask is not None
    if has_mask:
        if mask.dtype == torch.bool:
            mask = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
        mask = torch.broadcast_to(mask, (images, 1, 1, keys))  # a view: broadcast dims get stride 0
        mask_args = (mask, mask.stride(0), mask.stride(3))
    else:
        mask_args = (query, 0, 0)  # never read (HAS_MASK=False)

    cfg = _config(images, heads, rows, keys, head_dim, query.dtype, query.device, splits)
    meta = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"])
    partial = cfg["splits"] > 1
    programs = images * heads
    if partial:
        part_acc = _output_buffer((programs, cfg["splits"], rows, head_dim), torch.float32, query.device)
        part_stats = _output_buffer((2, programs, cfg["splits"], rows), torch.float32, query.device)
    else:
        part_acc = part_stats = out  # never written (WRITE_PARTIAL=False)
    _decode_attention_kernel[(programs, cfg["row_blocks"], cfg["splits"])](
        query, key, value, mask_args[0], out, part_acc, part_stats,
        heads, rows, keys, head_dim, cfg["tiles_per_split"], head_dim**-0.5 * LOG2E,
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        mask_args[1], mask_args[2],
        out.stride(0), out.stride(1), out.stride(2),
        HAS_MASK=has_mask, WRITE_PARTIAL=partial, PRECISION=_precision(query.dtype),
        EVEN_D=head_dim == cfg["BLOCK_D"],
        BLOCK_N=cfg["BLOCK_N"], num_stages=cfg["num_stages"], **meta,
    )
    if partial:
        _merge_splits_kernel[(programs, cfg["row_blocks"])](
            part_acc, part_stats, out, heads, rows, head_dim, cfg["splits"], programs * cfg["splits"] * rows,
            out.stride(0), out.stride(1), out.stride(2), **meta,
        )
    return out
