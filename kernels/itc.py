"""Fused BLIP image-text contrastive (ITC) loss: Triton kernels, host launchers and one autograd Function.

Semantics are those of ``blip_fast.ops._itc_loss_reference`` (the oracle). Per direction (i2t: image rows against
text columns; t2i: text rows against image columns), with rows ``r_i`` (online features, with gradient), momentum
rows ``rm_i`` and columns ``c_j`` (the in-batch momentum features followed by the queue, detached):

    s_ij = r_i . c_j / temp            m_ij = rm_i . c_j / temp
    t_ij = alpha * softmax_j(m_i)_j + (1 - alpha) * pos_ij / npos_i
    loss = mean_i ( LSE_j(s_ij) - sum_j t_ij s_ij ),  total = (loss_i2t + loss_t2i) / 2

``pos_ij`` is the diagonal ``j == i + positive_offset`` or, with ids, ``row_id_i == column_id_j``. Since the targets
sum to one per row, ``sum_j t_ij s_ij = alpha * sum_j e^(m_ij - max) s_ij / sum_j e^(m_ij - max) + (1 - alpha) *
sum_j pos_ij s_ij / npos_i``: the forward needs only per-row running sums, kept with an online log-sum-exp for both
``s`` and ``m`` while streaming column tiles. The ``B x (B + Q)`` matrix is never stored: the backward recomputes
the tiles from the saved per-row statistics (LSE of s, LSE of m, npos), like FlashAttention.

All logits are kept in base 2 (``s * log2(e)``) inside the kernels so every exponential is one ``exp2``; the loss
is linear in the logits, so it is converted back with one ``ln 2`` factor on the host.

Tiles: each program holds a block of online rows and the same momentum rows stacked into one operand
(:func:`_stacked_rows`), so one ``tl.dot`` per column tile yields both logit tiles and each column tile is read once.
Columns are read where they live, never concatenated: the in-batch columns, then the queue ``[Q, D]`` (the pre-trainer
stores its ``[D, Q]`` buffers column by column in the features' dtype, so this is a view), then, when the caller
declares its enqueue (``enqueue_at``), a copy of just the queue rows that the enqueue overwrites before the backward.

Parallelism: one program per (row block, column split). At B = 4096 a grid over row blocks alone is ~64 programs,
half of an H100, so the columns are split (:func:`wave_splits`: whole waves of the SMs) and the per-split statistics
(forward) or partial gradients (backward) are combined on the host in fixed order: deterministic, no atomics. On
CUDA the column tile, warps and stages are autotuned per shape and dtype; the interpreter runs one config.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Kernels may only read globals that are tl.constexpr (the interpreter does not enforce this; the compiler does).
_LOG2E_K = tl.constexpr(LOG2E)
_LN2_K = tl.constexpr(LN2)
_STATS = 7  # max_s, sum_s, max_m, sum_m, cross (sum e^m s), positive sum of s, positive count


# ---------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _positives(offs_m, offs_n, row_valid, col_valid, row_ids_ptr, column_ids_ptr, positive_offset,
               HAS_IDS: tl.constexpr):
    """[BLOCK_M, BLOCK_N] mask of positive pairs (ids equal, or the shifted diagonal), padding excluded."""
    if HAS_IDS:
        row_id = tl.load(row_ids_ptr + offs_m, mask=row_valid, other=0)
        col_id = tl.load(column_ids_ptr + offs_n, mask=col_valid, other=0)
        positive = row_id[:, None] == col_id[None, :]
    else:
        positive = offs_n[None, :] == offs_m[:, None] + positive_offset
    return positive & row_valid[:, None] & col_valid[None, :]


@triton.jit
def _stacked_rows(rows_ptr, rows_m_ptr, row_start, M, D, stride_r, stride_rm,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """One ``[2 * BLOCK_M, BLOCK_D]`` operand holding online rows ``row_start + i`` and the same momentum rows, so
    that a single ``tl.dot`` per column tile yields both logit tiles and the column tile is read once. Interleaved
    by 8: stacked row ``16 j + 8 h + k`` is row ``8 j + k`` of half ``h`` (0 online, 1 momentum), because an MMA
    accumulator gives each thread rows ``r`` and ``r + 8``: the split into halves stays in registers. Padded rows
    and dims load as 0: their logits are finite and never stored."""
    stacked = tl.arange(0, 2 * BLOCK_M)
    momentum = (stacked // 8) % 2 == 1
    offs_m = row_start + (stacked // 16) * 8 + stacked % 8
    offs_d = tl.arange(0, BLOCK_D)
    base = tl.where(momentum, rows_m_ptr + offs_m * stride_rm, rows_ptr + offs_m * stride_r)
    return tl.load(base[:, None] + offs_d[None, :], mask=(offs_m < M)[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def _halves(stacked, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``[2 * BLOCK_M, BLOCK_N]`` products of :func:`_stacked_rows` -> the online and momentum ``[BLOCK_M, BLOCK_N]``
    tiles."""
    stacked = tl.reshape(stacked, (BLOCK_M // 8, 2, 8, BLOCK_N))
    return tl.split(tl.reshape(tl.permute(stacked, (0, 2, 3, 1)), (BLOCK_M, BLOCK_N, 2)))


@triton.jit
def _segment(segment: tl.constexpr, batch_ptr, queue_ptr, patch_ptr, pid_s, columns_per_split, NB, Q, D,
             patch_start, patch_len, stride_b, stride_q):
    """Where this split's columns live, one source per (unrolled) segment, each read through one base pointer so the
    loads vectorise and pipeline (a per-column pointer select defeats both): 0 the in-batch columns, 1 the queue rows
    (column ``NB + q``), 2 and 3 the patch rows standing in for queue rows ``patch_start + p`` unwrapped and wrapped
    (mod Q). Returns (base, row stride, first and end row, column index of row 0)."""
    n_begin = pid_s * columns_per_split
    n_end = tl.minimum(NB + Q, n_begin + columns_per_split)
    if segment == 0:
        return batch_ptr, stride_b, n_begin, tl.minimum(n_end, NB), 0
    q_begin = tl.maximum(n_begin - NB, 0)
    q_end = tl.maximum(n_end - NB, 0)
    if segment == 1:
        return queue_ptr, stride_q, q_begin, q_end, NB
    wrap = (segment - 2) * Q
    p_begin = tl.maximum(q_begin - patch_start + wrap, 0)
    p_end = tl.minimum(q_end - patch_start + wrap, patch_len)
    return patch_ptr, D, p_begin, p_end, NB + patch_start - wrap


@triton.jit
def _columns_valid(offs, end, segment: tl.constexpr, patch_start, patch_len, Q, HAS_PATCH: tl.constexpr):
    """Rows of a segment's tile to use: before its end, and (queue segment) not replaced by the patch."""
    valid = offs < end
    if HAS_PATCH and segment == 1:
        k = offs - patch_start
        valid = valid & (tl.where(k < 0, k + Q, k) >= patch_len)
    return valid


@triton.jit
def _load_tile(ptr, offs, stride, valid, offs_d, d_valid):
    """``[BLOCK_N, BLOCK_D]`` rows ``offs`` of one column source."""
    return tl.load(ptr + offs[:, None] * stride + offs_d[None, :], mask=valid[:, None] & d_valid[None, :], other=0.0)


@triton.jit
def _forward_tile(max_s, sum_s, max_m, sum_m, cross, pos_sum, npos, rows, c, scale, offs_m, offs_n, row_valid,
                  col_valid, row_ids_ptr, column_ids_ptr, positive_offset,
                  HAS_IDS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Fold one column tile into the per-row online statistics."""
    # fp16/bf16 tensor-core dots with fp32 accumulation; fp32 inputs use exact ("ieee") products because TF32
    # error is multiplied by 1/temp (up to 1000) in the logits.
    s, m = _halves(tl.dot(rows, tl.trans(c), input_precision=PRECISION) * scale, BLOCK_M, BLOCK_N)
    # Invalid columns: -inf for the LSEs, 0 for the weighted sums (0 * -inf would be NaN).
    s_lse = tl.where(col_valid[None, :], s, float("-inf"))
    s = tl.where(col_valid[None, :], s, 0.0)
    m = tl.where(col_valid[None, :], m, float("-inf"))
    # Online LSE: rescale the running sums whenever a row's maximum grows. A tile may have no valid column (queue
    # rows all patched): its maxima stay -inf, and the exponents are then taken against 0 instead (-inf - -inf).
    new_max_s = tl.maximum(max_s, tl.max(s_lse, 1))
    shift_s = tl.where(new_max_s == float("-inf"), 0.0, new_max_s)
    sum_s = sum_s * tl.exp2(max_s - shift_s) + tl.sum(tl.exp2(s_lse - shift_s[:, None]), 1)
    new_max_m = tl.maximum(max_m, tl.max(m, 1))
    shift_m = tl.where(new_max_m == float("-inf"), 0.0, new_max_m)
    rescale_m = tl.exp2(max_m - shift_m)
    e_m = tl.exp2(m - shift_m[:, None])
    sum_m = sum_m * rescale_m + tl.sum(e_m, 1)
    cross = cross * rescale_m + tl.sum(e_m * s, 1)
    positive = _positives(offs_m, offs_n, row_valid, col_valid, row_ids_ptr, column_ids_ptr, positive_offset,
                          HAS_IDS)
    pos_sum += tl.sum(tl.where(positive, s, 0.0), 1)
    npos += tl.sum(positive.to(tl.float32), 1)
    return new_max_s, sum_s, new_max_m, sum_m, cross, pos_sum, npos


@triton.jit
def _itc_forward_kernel(
    rows_ptr, rows_m_ptr, batch_ptr, queue_ptr, patch_ptr, patch_start_ptr, temp_ptr, row_ids_ptr, column_ids_ptr,
    stats_ptr,
    M, NB, Q, D, patch_len, columns_per_split, positive_offset,
    stride_r, stride_rm, stride_b, stride_q,
    HAS_IDS: tl.constexpr, HAS_PATCH: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per-row statistics of one column split: stats[k, split, row] for the _STATS quantities (base-2 logits).
    The split's columns are read where they live: in-batch columns, then queue rows (the patched ones masked),
    then the patch rows that stand in for them."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = _stacked_rows(rows_ptr, rows_m_ptr, pid_m * BLOCK_M, M, D, stride_r, stride_rm, BLOCK_M, BLOCK_D)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = offs_m < M
    d_valid = offs_d < D
    # Read the temperature (and the enqueue pointer) on the device: no host sync per step.
    scale = _LOG2E_K / tl.load(temp_ptr).to(tl.float32)
    patch_start = tl.load(patch_start_ptr).to(tl.int32) if HAS_PATCH else 0
    state = (tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32),
             tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32),
             tl.zeros([BLOCK_M], tl.float32), tl.zeros([BLOCK_M], tl.float32), tl.zeros([BLOCK_M], tl.float32))
    for segment in tl.static_range(4 if HAS_PATCH else 2):
        base, stride, begin, end, column0 = _segment(segment, batch_ptr, queue_ptr, patch_ptr, pid_s, columns_per_split,
                                                     NB, Q, D, patch_start, patch_len, stride_b, stride_q)
        for start in range(begin, end, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            col_valid = _columns_valid(offs, end, segment, patch_start, patch_len, Q, HAS_PATCH)
            c = _load_tile(base, offs, stride, col_valid, offs_d, d_valid)
            state = _forward_tile(*state, rows, c, scale, offs_m, column0 + offs, row_valid, col_valid, row_ids_ptr,
                                  column_ids_ptr, positive_offset, HAS_IDS, PRECISION, BLOCK_M, BLOCK_N)

    out = stats_ptr + pid_s * M + offs_m
    plane = tl.num_programs(1) * M
    for k in tl.static_range(7):
        tl.store(out + k * plane, state[k], mask=row_valid)


@triton.jit
def _logit_grad(s, m, offs_m, offs_n, row_valid, col_valid, lse_s_ptr, lse_m_ptr, npos_ptr, row_ids_ptr,
                column_ids_ptr, positive_offset, alpha, HAS_IDS: tl.constexpr):
    """One recomputed tile's ``(p - t)`` (zero on invalid entries) and base-2 logits ``s`` (zero there too), from
    the base-2 online and momentum logits ``s``, ``m`` [BLOCK_M, BLOCK_N]."""
    lse_s = tl.load(lse_s_ptr + offs_m, mask=row_valid, other=0.0)
    lse_m = tl.load(lse_m_ptr + offs_m, mask=row_valid, other=0.0)
    npos = tl.load(npos_ptr + offs_m, mask=row_valid, other=1.0)
    positive = _positives(offs_m, offs_n, row_valid, col_valid, row_ids_ptr, column_ids_ptr, positive_offset,
                          HAS_IDS)
    p = tl.exp2(s - lse_s[:, None])
    t = alpha * tl.exp2(m - lse_m[:, None]) + tl.where(positive, (1.0 - alpha) / tl.maximum(npos, 1.0)[:, None], 0.0)
    valid = row_valid[:, None] & col_valid[None, :]
    return tl.where(valid, p - t, 0.0), tl.where(valid, s, 0.0)


@triton.jit
def _rows_grad_tile(grad_r, grad_s_dot_s, rows, c, scale, offs_m, offs_n, row_valid, col_valid, lse_s_ptr, lse_m_ptr,
                    npos_ptr, row_ids_ptr, column_ids_ptr, positive_offset, alpha,
                    HAS_IDS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Fold one recomputed column tile into d rows (fp32, unscaled) and sum_j g_ij s_ij."""
    s, m = _halves(tl.dot(rows, tl.trans(c), input_precision=PRECISION) * scale, BLOCK_M, BLOCK_N)
    g, s = _logit_grad(s, m, offs_m, offs_n, row_valid, col_valid, lse_s_ptr, lse_m_ptr, npos_ptr, row_ids_ptr,
                       column_ids_ptr, positive_offset, alpha, HAS_IDS)
    # (p - t) lies in [-1, 1], so it survives the cast to the input dtype; the 1/(2M) factor is applied after the
    # fp32 accumulation, where it cannot underflow fp16.
    grad_r += tl.dot(g.to(c.dtype), c, input_precision=PRECISION)
    return grad_r, grad_s_dot_s + tl.sum(g * s, 1)


@triton.jit
def _itc_backward_rows_kernel(
    rows_ptr, rows_m_ptr, batch_ptr, queue_ptr, patch_ptr, patch_start_ptr, temp_ptr, grad_out_ptr, row_ids_ptr,
    column_ids_ptr, lse_s_ptr, lse_m_ptr, npos_ptr, grad_rows_ptr, grad_temp_ptr,
    M, NB, Q, D, patch_len, columns_per_split, positive_offset, alpha,
    stride_r, stride_rm, stride_b, stride_q,
    HAS_IDS: tl.constexpr, HAS_PATCH: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Partial d rows [split, M, D] (fp32) and partial d temp [split, row block] of one column split (columns read
    as in the forward kernel)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = _stacked_rows(rows_ptr, rows_m_ptr, pid_m * BLOCK_M, M, D, stride_r, stride_rm, BLOCK_M, BLOCK_D)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = offs_m < M
    d_valid = offs_d < D
    inv_temp = 1.0 / tl.load(temp_ptr).to(tl.float32)
    scale = inv_temp * _LOG2E_K
    patch_start = tl.load(patch_start_ptr).to(tl.int32) if HAS_PATCH else 0
    # d loss / d s_ij = (p_ij - t_ij) * grad_out / (2 M): mean over this direction's rows, half of the two-way sum.
    grad_scale = tl.load(grad_out_ptr).to(tl.float32) / (2.0 * M)

    grad = (tl.zeros([BLOCK_M, BLOCK_D], tl.float32), tl.zeros([BLOCK_M], tl.float32))
    for segment in tl.static_range(4 if HAS_PATCH else 2):
        base, stride, begin, end, column0 = _segment(segment, batch_ptr, queue_ptr, patch_ptr, pid_s, columns_per_split,
                                                     NB, Q, D, patch_start, patch_len, stride_b, stride_q)
        for start in range(begin, end, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            col_valid = _columns_valid(offs, end, segment, patch_start, patch_len, Q, HAS_PATCH)
            c = _load_tile(base, offs, stride, col_valid, offs_d, d_valid)
            grad = _rows_grad_tile(*grad, rows, c, scale, offs_m, column0 + offs, row_valid, col_valid, lse_s_ptr,
                                   lse_m_ptr, npos_ptr, row_ids_ptr, column_ids_ptr, positive_offset, alpha, HAS_IDS,
                                   PRECISION, BLOCK_M, BLOCK_N)

    grad_r, grad_s_dot_s = grad
    grad_r = grad_r * (grad_scale * inv_temp)
    out = grad_rows_ptr + (pid_s * M + offs_m[:, None]) * D + offs_d[None, :]
    tl.store(out, grad_r, mask=row_valid[:, None] & d_valid[None, :])
    # d loss / d temp = -sum_ij g_ij s_ij / temp, with s = s2 * ln 2 (targets are detached, as in BLIP).
    grad_temp = -tl.sum(grad_s_dot_s, 0) * grad_scale * inv_temp * _LN2_K
    tl.store(grad_temp_ptr + pid_s * tl.num_programs(0) + pid_m, grad_temp)


@triton.jit
def _itc_backward_columns_kernel(
    rows_ptr, rows_m_ptr, batch_ptr, temp_ptr, grad_out_ptr, row_ids_ptr, column_ids_ptr,
    lse_s_ptr, lse_m_ptr, npos_ptr, grad_columns_ptr,
    M, NG, D, rows_per_split, positive_offset, alpha,
    stride_r, stride_rm, stride_b,
    HAS_IDS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Partial d columns [split, NG, D] (fp32) for the first NG in-batch columns, summed over one split of the rows
    (column-gradient mode only, off BLIP's path: two dots per tile, the rows' product needs the online tile alone)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_valid = offs_n < NG
    d_valid = offs_d < D
    c = tl.load(batch_ptr + offs_n[:, None] * stride_b + offs_d[None, :],
                mask=col_valid[:, None] & d_valid[None, :], other=0.0)
    inv_temp = 1.0 / tl.load(temp_ptr).to(tl.float32)
    scale = inv_temp * _LOG2E_K
    grad_scale = tl.load(grad_out_ptr).to(tl.float32) / (2.0 * M)

    grad_c = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    m_begin = pid_s * rows_per_split
    m_end = tl.minimum(M, m_begin + rows_per_split)
    for start_m in range(m_begin, m_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_valid = offs_m < M
        r = tl.load(rows_ptr + offs_m[:, None] * stride_r + offs_d[None, :],
                    mask=row_valid[:, None] & d_valid[None, :], other=0.0)
        rm = tl.load(rows_m_ptr + offs_m[:, None] * stride_rm + offs_d[None, :],
                     mask=row_valid[:, None] & d_valid[None, :], other=0.0)
        s = tl.dot(r, tl.trans(c), input_precision=PRECISION) * scale
        m = tl.dot(rm, tl.trans(c), input_precision=PRECISION) * scale
        g, s = _logit_grad(s, m, offs_m, offs_n, row_valid, col_valid, lse_s_ptr, lse_m_ptr, npos_ptr, row_ids_ptr,
                           column_ids_ptr, positive_offset, alpha, HAS_IDS)
        grad_c += tl.dot(tl.trans(g.to(r.dtype)), r, input_precision=PRECISION)

    grad_c = grad_c * (grad_scale * inv_temp)
    out = grad_columns_ptr + (pid_s * NG + offs_n[:, None]) * D + offs_d[None, :]
    tl.store(out, grad_c, mask=col_valid[:, None] & d_valid[None, :])


# ---------------------------------------------------------------------------------------------------- launchers
#: Column splits span whole multiples of this many columns (the widest column tile of any config), so every config
#: tiles a split exactly and the split count, hence every output shape, does not depend on the autotuned config.
_SPLIT_QUANTUM = 128
#: Autotuned on CUDA per (M, NB, Q, D, dtypes), among the configs that fit (:func:`_fitting_configs`).
_CONFIGS = [triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
            for block_n, warps, stages in ((64, 4, 2), (128, 4, 2), (64, 8, 2), (64, 8, 3), (128, 8, 2))]
#: The one config of the CPU interpreter, where autotuning would multiply the (slow) interpreted runs.
_INTERPRETER_META = dict(BLOCK_N=_SPLIT_QUANTUM, num_warps=4, num_stages=2)


def _output_buffer(shape, dtype, device) -> torch.Tensor:
    """Every kernel output is allocated here, so tests can poison (NaN-fill) what the kernels must overwrite."""
    return torch.empty(shape, dtype=dtype, device=device)


def _fitting_configs(configs, named_args, **kwargs) -> list[triton.Config]:
    """The configs that compile for sm_90 without spilling (tests/test_itc_kernel.py compiles them): at D > 128
    (BLIP's 256) the stacked ``[2 * 64, 256]`` row tile needs 8 warps and 64-column tiles; fp32 keeps 64-column
    tiles at any D (shared memory); wider column tiles (half the loop trips and online-LSE rescales) elsewhere."""
    arguments = {**named_args, **kwargs}  # the launchers pass everything by keyword: Triton's named_args is then empty
    wide = arguments["BLOCK_D"] > 128
    fp32 = arguments["rows_ptr"].dtype == torch.float32
    return [config for config in configs
            if not (wide and (config.num_warps < 8 or config.kwargs["BLOCK_N"] > 64))
            and not (fp32 and config.kwargs["BLOCK_N"] > 64)]


@functools.cache
def _autotuned(kernel):
    return triton.autotune(configs=_CONFIGS, key=["M", "NB", "Q", "D"],
                           prune_configs_by={"early_config_prune": _fitting_configs})(kernel)


def _launcher(kernel, device: torch.device, grid: tuple[int, int]):
    """``kernel[grid]`` with its meta-parameters bound: autotuned on CUDA, the interpreter's config elsewhere."""
    if device.type == "cuda":
        return functools.partial(_autotuned(kernel)[grid])
    return functools.partial(kernel[grid], **_INTERPRETER_META)


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def wave_splits(row_blocks: int, quanta: int, slots: int) -> int:
    """Column splits for ``row_blocks`` row blocks over ``quanta`` column quanta on ``slots`` concurrent programs
    (SMs): the count whose grid finishes first, in whole waves of ``per-split quanta + 1`` (the 1 stands for a
    program's fixed work: its row tile, statistics and merge, about one quantum's loads); among equals the fewest
    splits. A full wave plus a sliver costs two waves, so this prefers grids that fill whole waves."""
    best = None
    for per_split in range(1, quanta + 1):
        splits = triton.cdiv(quanta, per_split)
        makespan = triton.cdiv(row_blocks * splits, slots) * (per_split + 1)
        if best is None or (makespan, splits) < best:
            best = (makespan, splits)
    return best[1]


def _shape(rows: int, columns: int, dim: int, dtype: torch.dtype, device: torch.device, splits: int | None) -> dict:
    """Row block, dim block, grid and column split of one direction (independent of the autotuned config)."""
    block_d = max(16, triton.next_power_of_2(dim))
    if device.type == "cuda":
        # fp32 stacked [2 x 32, 256] row tiles plus fp32 column tiles fit an A100's 163 KiB of shared memory.
        block_m = 32 if dtype == torch.float32 and block_d > 128 else 64
    else:
        block_m = min(64, max(16, triton.next_power_of_2(rows)))
    row_blocks = triton.cdiv(rows, block_m)
    quanta = max(1, triton.cdiv(columns, _SPLIT_QUANTUM))
    if splits is None:
        # One program per SM: at D = 256 a program's tiles take most of an SM's shared memory.
        splits = wave_splits(row_blocks, quanta, _sm_count(device.index) if device.type == "cuda" else 1)
    per_split = triton.cdiv(quanta, max(1, min(splits, quanta)))
    return dict(BLOCK_M=block_m, BLOCK_D=block_d, row_blocks=row_blocks, splits=triton.cdiv(quanta, per_split),
                columns_per_split=per_split * _SPLIT_QUANTUM)


def _streamed_rows(device: torch.device, block_d: int) -> int:
    """Row tile of the column-gradient kernel: divides the split quantum; 32 at D > 128 on a GPU, where its two
    pipelined row tiles would not fit shared memory at 64."""
    if device.type != "cuda":
        return _SPLIT_QUANTUM
    return 32 if block_d > 128 else 64


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


class _QueuePatch(NamedTuple):
    """The queue columns the caller overwrites before the backward: from ``start`` (int64 [1], on the device),
    ``rows [count, D]`` of them (mod Q), copied at forward time."""

    start: torch.Tensor
    image_rows: torch.Tensor
    text_rows: torch.Tensor


def _take_patch(image_queue: torch.Tensor, text_queue: torch.Tensor, enqueue_at) -> _QueuePatch | None:
    if enqueue_at is None or image_queue.shape[0] == 0:
        return None
    pointer, count = enqueue_at
    queue_size = image_queue.shape[0]
    start = torch.as_tensor(pointer, device=image_queue.device).reshape(1).to(torch.int64).remainder(queue_size)
    positions = (start + torch.arange(min(int(count), queue_size), device=start.device)) % queue_size
    return _QueuePatch(start, image_queue.index_select(0, positions), text_queue.index_select(0, positions))


def _columns_args(batch: torch.Tensor, queue: torch.Tensor, patch_rows: torch.Tensor | None,
                  patch: _QueuePatch | None) -> dict:
    """Kernel arguments of the columns ``[batch | queue]``; unused pointers alias one that is never read through."""
    queue_ptr = queue if queue.shape[0] else batch
    return dict(batch_ptr=batch, queue_ptr=queue_ptr,
                patch_ptr=queue_ptr if patch is None else patch_rows,
                patch_start_ptr=queue_ptr if patch is None else patch.start,
                NB=batch.shape[0], Q=queue.shape[0], patch_len=0 if patch is None else patch_rows.shape[0],
                stride_b=batch.stride(0), stride_q=queue.stride(0), HAS_PATCH=patch is not None)


def _forward_direction(rows, rows_m, batch, queue, patch_rows, patch, temp, alpha, row_ids, column_ids,
                       positive_offset, splits=None):
    """One direction: (row losses [M] in nats, log2-sum-exp2 of s and m [M], positive counts [M])."""
    M, D = rows.shape
    shape = _shape(M, batch.shape[0] + queue.shape[0], D, rows.dtype, rows.device, splits)
    stats = _output_buffer((_STATS, shape["splits"], M), torch.float32, rows.device)
    has_ids = row_ids is not None
    _launcher(_itc_forward_kernel, rows.device, (shape["row_blocks"], shape["splits"]))(
        rows_ptr=rows, rows_m_ptr=rows_m, temp_ptr=temp, row_ids_ptr=row_ids if has_ids else rows,
        column_ids_ptr=column_ids if has_ids else rows, stats_ptr=stats,
        M=M, D=D, columns_per_split=shape["columns_per_split"], positive_offset=positive_offset,
        stride_r=rows.stride(0), stride_rm=rows_m.stride(0), **_columns_args(batch, queue, patch_rows, patch),
        HAS_IDS=has_ids, PRECISION=_precision(rows.dtype), BLOCK_M=shape["BLOCK_M"], BLOCK_D=shape["BLOCK_D"],
    )
    max_s, sum_s, max_m, sum_m, cross, pos_sum, npos = stats.unbind(0)  # each [splits, M]
    # Merge the splits' online statistics (a no-op rescale when there is one split).
    top_s = max_s.amax(0)
    lse_s = top_s + torch.log2((sum_s * torch.exp2(max_s - top_s)).sum(0))
    top_m = max_m.amax(0)
    weight_m = torch.exp2(max_m - top_m)
    lse_m = top_m + torch.log2((sum_m * weight_m).sum(0))
    soft = (cross * weight_m).sum(0) / (sum_m * weight_m).sum(0)
    npos = npos.sum(0)
    hard = pos_sum.sum(0) / npos.clamp(min=1.0)
    row_loss = (lse_s - alpha * soft - (1.0 - alpha) * hard) * LN2
    return row_loss, lse_s.contiguous(), lse_m.contiguous(), npos.contiguous()


def _backward_direction(rows, rows_m, batch, queue, patch_rows, lse_s, lse_m, npos, *, patch, temp, grad_out, alpha,
                        row_ids, column_ids, positive_offset, grad_columns: int, splits=None):
    """One direction's gradients: (d rows [M, D] fp32, d temp [] fp32, d first ``grad_columns`` columns or None)."""
    M, D = rows.shape
    has_ids = row_ids is not None
    common = dict(rows_ptr=rows, rows_m_ptr=rows_m, temp_ptr=temp, grad_out_ptr=grad_out,
                  row_ids_ptr=row_ids if has_ids else rows, column_ids_ptr=column_ids if has_ids else rows,
                  lse_s_ptr=lse_s, lse_m_ptr=lse_m, npos_ptr=npos, M=M, D=D, positive_offset=positive_offset,
                  alpha=alpha, stride_r=rows.stride(0), stride_rm=rows_m.stride(0), HAS_IDS=has_ids,
                  PRECISION=_precision(rows.dtype))
    shape = _shape(M, batch.shape[0] + queue.shape[0], D, rows.dtype, rows.device, splits)
    grad_rows = _output_buffer((shape["splits"], M, D), torch.float32, rows.device)
    grad_temp = _output_buffer((shape["splits"], shape["row_blocks"]), torch.float32, rows.device)
    _launcher(_itc_backward_rows_kernel, rows.device, (shape["row_blocks"], shape["splits"]))(
        grad_rows_ptr=grad_rows, grad_temp_ptr=grad_temp, columns_per_split=shape["columns_per_split"],
        **_columns_args(batch, queue, patch_rows, patch), **common, BLOCK_M=shape["BLOCK_M"],
        BLOCK_D=shape["BLOCK_D"],
    )
    grad_cols = None
    if grad_columns:
        # Transposed problem (column-gradient mode only): programs own column blocks and stream (and split) the rows;
        # one heuristic config, as before autotuning.
        cshape = _shape(grad_columns, M, D, rows.dtype, rows.device, splits)
        grad_cols = _output_buffer((cshape["splits"], grad_columns, D), torch.float32, rows.device)
        _itc_backward_columns_kernel[(cshape["row_blocks"], cshape["splits"])](
            batch_ptr=batch, grad_columns_ptr=grad_cols, NG=grad_columns, rows_per_split=cshape["columns_per_split"],
            stride_b=batch.stride(0), **common, BLOCK_M=_streamed_rows(rows.device, cshape["BLOCK_D"]),
            BLOCK_N=cshape["BLOCK_M"], BLOCK_D=cshape["BLOCK_D"],
            num_warps=4 if cshape["BLOCK_D"] <= 64 else 8, num_stages=2,
        )
        grad_cols = grad_cols.sum(0)
    return grad_rows.sum(0), grad_temp.sum(), grad_cols


# ---------------------------------------------------------------------------------------------------- autograd
class ItcLossFunction(torch.autograd.Function):
    """Both directions of the fused ITC loss. Inputs must already share one dtype and be row-contiguous; the
    in-batch columns ``[B_cols, D]`` receive a gradient only when ``column_grad`` (the queues ``[Q, D]`` never).

    The queues are read in place, never concatenated. Without ``enqueue_at`` they are saved for the backward as
    they are, so any write to them before the backward is refused by autograd's version check. With ``enqueue_at =
    (pointer, count)`` the caller declares BLIP's enqueue (queue rows ``[pointer, pointer + count) mod Q`` rewritten
    between the loss and its backward): only those ``count x D`` values are copied, the kernels read them from the
    copy, and the backward refuses queues written more than once."""

    @staticmethod
    def forward(ctx, image_feat, text_feat, image_feat_m, text_feat_m, image_batch_columns, text_batch_columns,
                image_queue, text_queue, temp, alpha, row_ids, column_ids, positive_offset, column_grad, splits,
                enqueue_at):
        ctx.set_materialize_grads(False)
        patch = _take_patch(image_queue, text_queue, enqueue_at)
        shared = dict(patch=patch, temp=temp, alpha=alpha, row_ids=row_ids, column_ids=column_ids,
                      positive_offset=positive_offset, splits=splits)
        i2t = _forward_direction(image_feat, image_feat_m, text_batch_columns, text_queue,
                                 patch and patch.text_rows, **shared)
        t2i = _forward_direction(text_feat, text_feat_m, image_batch_columns, image_queue,
                                 patch and patch.image_rows, **shared)
        saved = (image_feat, text_feat, image_feat_m, text_feat_m, image_batch_columns, text_batch_columns, temp,
                 row_ids, column_ids, *i2t[1:], *t2i[1:])
        if patch is None:
            ctx.save_for_backward(*saved, image_queue, text_queue)
        else:
            ctx.save_for_backward(*saved, *patch)
            # Held outside autograd's version check, which the declared enqueue would trip; checked by hand instead.
            ctx.queues = (image_queue, text_queue)
            ctx.versions = (image_queue._version, text_queue._version)
        ctx.has_patch = patch is not None
        ctx.alpha, ctx.positive_offset, ctx.splits = alpha, positive_offset, splits
        ctx.grad_columns = image_batch_columns.shape[0] if column_grad else 0
        return (i2t[0].mean() + t2i[0].mean()) / 2

    @staticmethod
    def backward(ctx, grad_out):
        if grad_out is None:
            return (None,) * 16
        (image_feat, text_feat, image_feat_m, text_feat_m, image_batch_columns, text_batch_columns, temp, row_ids,
         column_ids, *rest) = ctx.saved_tensors
        stats, rest = rest[:6], rest[6:]
        if ctx.has_patch:
            patch = _QueuePatch(*rest)
            image_queue, text_queue = ctx.queues
            if any(queue._version > version + 1 for queue, version in zip(ctx.queues, ctx.versions, strict=True)):
                raise RuntimeError("fused ITC: the queues were written more than once (more than the declared enqueue) "
                                   "between the loss and its backward; run the backward before the next step")
        else:
            patch, (image_queue, text_queue) = None, rest
        grad_out = grad_out.float().contiguous()
        shared = dict(patch=patch, temp=temp, grad_out=grad_out, alpha=ctx.alpha, row_ids=row_ids,
                      column_ids=column_ids, positive_offset=ctx.positive_offset, grad_columns=ctx.grad_columns,
                      splits=ctx.splits)
        d_image, d_temp_i2t, d_text_cols = _backward_direction(
            image_feat, image_feat_m, text_batch_columns, text_queue, patch and patch.text_rows, *stats[:3], **shared)
        d_text, d_temp_t2i, d_image_cols = _backward_direction(
            text_feat, text_feat_m, image_batch_columns, image_queue, patch and patch.image_rows, *stats[3:], **shared)
        d_temp = (d_temp_i2t + d_temp_t2i).reshape(temp.shape).to(temp.dtype)
        return (d_image.to(image_feat.dtype), d_text.to(text_feat.dtype), None, None,
                None if d_image_cols is None else d_image_cols.to(image_batch_columns.dtype),
                None if d_text_cols is None else d_text_cols.to(text_batch_columns.dtype),
                None, None, d_temp, None, None, None, None, None, None, None)


# ---------------------------------------------------------------------------------------------------- public API
def queue_rows(queue: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A BLIP queue ``[D, Q]`` as the kernels' ``[Q, D]`` rows: a free view when the queue is stored in ``dtype``
    with its columns contiguous (how :class:`~blip_fast.modeling.pretrain.MomentumContrastiveModel` keeps it),
    otherwise one copy."""
    rows = queue.detach().t()
    if rows.dtype != dtype or rows.stride(-1) != 1:
        rows = torch.empty(rows.shape, dtype=dtype, device=rows.device).copy_(rows)  # one copy, cast included
    return rows


def itc_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    temp: torch.Tensor,
    alpha: float,
    image_ids: torch.Tensor | None = None,
    id_queue: torch.Tensor | None = None,
    *,
    image_columns: torch.Tensor | None = None,
    text_columns: torch.Tensor | None = None,
    column_ids: torch.Tensor | None = None,
    positive_offset: int = 0,
    column_grad: bool = False,
    splits: int | None = None,
    enqueue_at: tuple[torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """Fused BLIP ITC loss, ``(CE_i2t + CE_t2i) / 2``, same semantics as ``blip_fast.ops.itc_loss``.

    Rows: ``image_feat``/``text_feat`` ``[B, D]`` with gradient, momentum rows ``image_feat_m``/``text_feat_m``
    ``[B, D]`` (targets, detached). Columns: ``image_columns``/``text_columns`` ``[B_cols, D]`` (default: the
    momentum features; pass all-gathered ones to score local rows against every rank) followed by the queues
    ``[D, Q]`` (read in place when stored in the features' dtype with contiguous columns: :func:`queue_rows`).
    Positives: the diagonal ``column == row + positive_offset`` (the rank's offset into gathered columns), or with
    ``image_ids [B]`` every column whose id (``column_ids [B_cols]``, default ``image_ids``, then ``id_queue [Q]``)
    equals the row's. ``temp``: 0-dim or ``[1]`` tensor, read on the device. ``column_grad``: also back-propagate
    into ``image_columns``/``text_columns`` (CLIP-style gather-with-grad); BLIP keeps them detached. ``splits``
    forces the number of column splits (tests). ``enqueue_at = (pointer, count)``: the caller overwrites queue
    columns ``[pointer, pointer + count) mod Q`` before the backward (BLIP's enqueue; ``pointer`` a device tensor);
    only those columns are copied. Inputs fp32/fp16/bf16; mixed dtypes are promoted to the widest; accumulation is
    fp32. Returns a 0-dim fp32 tensor.
    """
    image_columns = image_feat_m if image_columns is None else image_columns
    text_columns = text_feat_m if text_columns is None else text_columns
    dtype = image_feat.dtype
    for tensor in (text_feat, image_feat_m, text_feat_m, image_columns, text_columns, image_queue, text_queue):
        dtype = torch.promote_types(dtype, tensor.dtype)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"fused ITC supports fp32/fp16/bf16 features, got {dtype}")
    rows, dim = image_feat.shape
    for name, tensor in (("text_feat", text_feat), ("image_feat_m", image_feat_m), ("text_feat_m", text_feat_m)):
        if tensor.shape != (rows, dim):
            raise ValueError(f"{name} is {tuple(tensor.shape)}, expected [B, D] = {(rows, dim)}")
    if image_columns.shape[1:] != (dim,) or text_columns.shape != image_columns.shape:
        raise ValueError("image_columns/text_columns must both be [B_cols, D]")
    if image_queue.shape[0] != dim or text_queue.shape != image_queue.shape:
        raise ValueError("queues must be [D, Q] like BLIP's buffers")

    def prepare(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(dtype).contiguous()

    row_ids = all_column_ids = None
    if image_ids is not None:
        batch_ids = image_ids if column_ids is None else column_ids
        if batch_ids.shape != (image_columns.shape[0],):
            raise ValueError("column_ids must hold one id per in-batch column (pass it with gathered columns)")
        queue_ids = id_queue if id_queue is not None else image_ids.new_empty(0)
        if queue_ids.numel() != image_queue.shape[1]:
            raise ValueError("id_queue must hold one id per queue column")
        row_ids = image_ids.to(torch.int64).contiguous()
        # One int64 per column (retrieval fine-tuning only): a fresh copy, so the enqueue may rewrite id_queue.
        all_column_ids = torch.cat([batch_ids, queue_ids]).to(torch.int64).contiguous()
    temp_tensor = torch.as_tensor(temp, device=image_feat.device)
    if not temp_tensor.is_floating_point():
        temp_tensor = temp_tensor.float()
    return ItcLossFunction.apply(
        prepare(image_feat), prepare(text_feat), prepare(image_feat_m.detach()), prepare(text_feat_m.detach()),
        prepare(image_columns if column_grad else image_columns.detach()),
        prepare(text_columns if column_grad else text_columns.detach()),
        queue_rows(image_queue, dtype), queue_rows(text_queue, dtype),
        temp_tensor.contiguous(), float(alpha), row_ids, all_column_ids, int(positive_offset), bool(column_grad),
        splits, enqueue_at,
    )


def flop_count(rows: int, columns: int, dim: int, column_grad: bool = False) -> int:
    """Matmul FLOPs of one fused forward + backward (both directions): forward s and m, backward recomputes s and
    m and multiplies by the columns (plus recompute and the row product for the column gradient)."""
    per_matmul = 2 * rows * columns * dim
    forward = 2 * 2 * per_matmul
    backward = 2 * 3 * per_matmul
    if column_grad:
        backward += 2 * 3 * 2 * rows * rows * dim
    return forward + backward


__all__ = ["ItcLossFunction", "flop_count", "itc_loss", "queue_rows", "wave_splits"]
