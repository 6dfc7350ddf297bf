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

Parallelism: one program per (row block, column split). At B = 4096 a grid over row blocks alone is ~64 programs,
half of an H100, so the columns are split and the per-split statistics (forward) or partial gradients (backward)
are combined on the host in fixed order: deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Kernels may only read globals that are tl.constexpr (the interpreter does not enforce this; the compiler does).
_LOG2E_K = tl.constexpr(LOG2E)
_LN2_K = tl.constexpr(LN2)
_STATS = 7  # max_s, sum_s, max_m, sum_m, cross (sum e^m s), positive sum of s, positive count


def _output_buffer(shape, dtype, device) -> torch.Tensor:
    """Every kernel output is allocated here, so tests can poison (NaN-fill) what the kernels must overwrite."""
    return torch.empty(shape, dtype=dtype, device=device)


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
def _row_tile(rows_ptr, rows_m_ptr, pid_m, M, D, stride_r, stride_rm, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Offsets, validity masks and the online/momentum row tiles of row block ``pid_m``. Padded rows and dims load as
    0: their logits are finite and never stored."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_valid = offs_m < M
    d_valid = offs_d < D
    mask = row_valid[:, None] & d_valid[None, :]
    r = tl.load(rows_ptr + offs_m[:, None] * stride_r + offs_d[None, :], mask=mask, other=0.0)
    rm = tl.load(rows_m_ptr + offs_m[:, None] * stride_rm + offs_d[None, :], mask=mask, other=0.0)
    return offs_m, offs_d, row_valid, d_valid, r, rm


@triton.jit
def _itc_forward_kernel(
    rows_ptr, rows_m_ptr, columns_ptr, temp_ptr, row_ids_ptr, column_ids_ptr, stats_ptr,
    M, N, D, tiles_per_split, positive_offset,
    stride_r, stride_rm, stride_c,
    HAS_IDS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per-row statistics of one column split: stats[k, split, row] for the _STATS quantities (base-2 logits)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m, offs_d, row_valid, d_valid, r, rm = _row_tile(rows_ptr, rows_m_ptr, pid_m, M, D, stride_r, stride_rm,
                                                          BLOCK_M, BLOCK_D)
    # Read the temperature on the device: no host sync per step.
    scale = _LOG2E_K / tl.load(temp_ptr).to(tl.float32)

    max_s = tl.full([BLOCK_M], float("-inf"), tl.float32)
    sum_s = tl.zeros([BLOCK_M], tl.float32)
    max_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    sum_m = tl.zeros([BLOCK_M], tl.float32)
    cross = tl.zeros([BLOCK_M], tl.float32)
    pos_sum = tl.zeros([BLOCK_M], tl.float32)
    npos = tl.zeros([BLOCK_M], tl.float32)

    n_begin = pid_s * tiles_per_split * BLOCK_N
    n_end = tl.minimum(N, n_begin + tiles_per_split * BLOCK_N)
    for start_n in range(n_begin, n_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_valid = offs_n < N
        c = tl.load(columns_ptr + offs_n[:, None] * stride_c + offs_d[None, :],
                    mask=col_valid[:, None] & d_valid[None, :], other=0.0)
        # fp16/bf16 tensor-core dots with fp32 accumulation; fp32 inputs use exact ("ieee") products because TF32
        # error is multiplied by 1/temp (up to 1000) in the logits.
        s = tl.dot(r, tl.trans(c), input_precision=PRECISION) * scale  # [BLOCK_M, BLOCK_N]
        m = tl.dot(rm, tl.trans(c), input_precision=PRECISION) * scale
        # Padded columns: -inf for the LSEs, 0 for the weighted sums (0 * -inf would be NaN).
        s_lse = tl.where(col_valid[None, :], s, float("-inf"))
        s = tl.where(col_valid[None, :], s, 0.0)
        m = tl.where(col_valid[None, :], m, float("-inf"))

        # Online LSE: rescale the running sums whenever a row's maximum grows. Every tile has a valid column, so
        # the new maxima are finite and exp2(-inf - finite) = 0 handles the first tile.
        new_max_s = tl.maximum(max_s, tl.max(s_lse, 1))
        sum_s = sum_s * tl.exp2(max_s - new_max_s) + tl.sum(tl.exp2(s_lse - new_max_s[:, None]), 1)
        max_s = new_max_s
        new_max_m = tl.maximum(max_m, tl.max(m, 1))
        rescale_m = tl.exp2(max_m - new_max_m)
        e_m = tl.exp2(m - new_max_m[:, None])
        sum_m = sum_m * rescale_m + tl.sum(e_m, 1)
        cross = cross * rescale_m + tl.sum(e_m * s, 1)
        max_m = new_max_m

        positive = _positives(offs_m, offs_n, row_valid, col_valid, row_ids_ptr, column_ids_ptr, positive_offset,
                              HAS_IDS)
        pos_sum += tl.sum(tl.where(positive, s, 0.0), 1)
        npos += tl.sum(positive.to(tl.float32), 1)

    out = stats_ptr + pid_s * M + offs_m
    plane = tl.num_programs(1) * M
    tl.store(out, max_s, mask=row_valid)
    tl.store(out + plane, sum_s, mask=row_valid)
    tl.store(out + 2 * plane, max_m, mask=row_valid)
    tl.store(out + 3 * plane, sum_m, mask=row_valid)
    tl.store(out + 4 * plane, cross, mask=row_valid)
    tl.store(out + 5 * plane, pos_sum, mask=row_valid)
    tl.store(out + 6 * plane, npos, mask=row_valid)


@triton.jit
def _logit_grad(r, rm, c, offs_m, offs_n, row_valid, col_valid, lse_s_ptr, lse_m_ptr, npos_ptr, row_ids_ptr,
                column_ids_ptr, positive_offset, scale, alpha,
                HAS_IDS: tl.constexpr, PRECISION: tl.constexpr):
    """Recompute one tile: ``(p - t)`` (zero on padding) and the base-2 logits ``s``, both [BLOCK_M, BLOCK_N]."""
    s = tl.dot(r, tl.trans(c), input_precision=PRECISION) * scale
    m = tl.dot(rm, tl.trans(c), input_precision=PRECISION) * scale
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
def _itc_backward_rows_kernel(
    rows_ptr, rows_m_ptr, columns_ptr, temp_ptr, grad_out_ptr, row_ids_ptr, column_ids_ptr,
    lse_s_ptr, lse_m_ptr, npos_ptr, grad_rows_ptr, grad_temp_ptr,
    M, N, D, tiles_per_split, positive_offset, alpha,
    stride_r, stride_rm, stride_c,
    HAS_IDS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Partial d rows [split, M, D] (fp32) and partial d temp [split, row block] of one column split."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m, offs_d, row_valid, d_valid, r, rm = _row_tile(rows_ptr, rows_m_ptr, pid_m, M, D, stride_r, stride_rm,
                                                          BLOCK_M, BLOCK_D)
    inv_temp = 1.0 / tl.load(temp_ptr).to(tl.float32)
    scale = inv_temp * _LOG2E_K
    # d loss / d s_ij = (p_ij - t_ij) * grad_out / (2 M): mean over this direction's rows, half of the two-way sum.
    grad_scale = tl.load(grad_out_ptr).to(tl.float32) / (2.0 * M)

    grad_r = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    grad_s_dot_s = tl.zeros([BLOCK_M], tl.float32)
    n_begin = pid_s * tiles_per_split * BLOCK_N
    n_end = tl.minimum(N, n_begin + tiles_per_split * BLOCK_N)
    for start_n in range(n_begin, n_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_valid = offs_n < N
        c = tl.load(columns_ptr + offs_n[:, None] * stride_c + offs_d[None, :],
                    mask=col_valid[:, None] & d_valid[None, :], other=0.0)
        g, s = _logit_grad(r, rm, c, offs_m, offs_n, row_valid, col_valid, lse_s_ptr, lse_m_ptr, npos_ptr,
                           row_ids_ptr, column_ids_ptr, positive_offset, scale, alpha, HAS_IDS, PRECISION)
        # (p - t) lies in [-1, 1], so it survives the cast to the input dtype; the 1/(2M) factor is applied after
        # the fp32 accumulation, where it cannot underflow fp16.
        grad_r += tl.dot(g.to(c.dtype), c, input_precision=PRECISION)
        grad_s_dot_s += tl.sum(g * s, 1)

    grad_r = grad_r * (grad_scale * inv_temp)
    out = grad_rows_ptr + (pid_s * M + offs_m[:, None]) * D + offs_d[None, :]
    tl.store(out, grad_r, mask=row_valid[:, None] & d_valid[None, :])
    # d loss / d temp = -sum_ij g_ij s_ij / temp, with s = s2 * ln 2 (targets are detached, as in BLIP).
    grad_temp = -tl.sum(grad_s_dot_s, 0) * grad_scale * inv_temp * _LN2_K
    tl.store(grad_temp_ptr + pid_s * tl.num_programs(0) + pid_m, grad_temp)


@triton.jit
def _itc_backward_columns_kernel(
    rows_ptr, rows_m_ptr, columns_ptr, temp_ptr, grad_out_ptr, row_ids_ptr, column_ids_ptr,
    lse_s_ptr, lse_m_ptr, npos_ptr, grad_columns_ptr,
    M, NG, D, tiles_per_split, positive_offset, alpha,
    stride_r, stride_rm, stride_c,
    HAS_IDS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Partial d columns [split, NG, D] (fp32) for the first NG columns, summed over one split of the rows."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_valid = offs_n < NG
    d_valid = offs_d < D
    c = tl.load(columns_ptr + offs_n[:, None] * stride_c + offs_d[None, :],
                mask=col_valid[:, None] & d_valid[None, :], other=0.0)
    inv_temp = 1.0 / tl.load(temp_ptr).to(tl.float32)
    scale = inv_temp * _LOG2E_K
    grad_scale = tl.load(grad_out_ptr).to(tl.float32) / (2.0 * M)

    grad_c = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    m_begin = pid_s * tiles_per_split * BLOCK_M
    m_end = tl.minimum(M, m_begin + tiles_per_split * BLOCK_M)
    for start_m in range(m_begin, m_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_valid = offs_m < M
        r = tl.load(rows_ptr + offs_m[:, None] * stride_r + offs_d[None, :],
                    mask=row_valid[:, None] & d_valid[None, :], other=0.0)
        rm = tl.load(rows_m_ptr + offs_m[:, None] * stride_rm + offs_d[None, :],
                     mask=row_valid[:, None] & d_valid[None, :], other=0.0)
        g, s = _logit_grad(r, rm, c, offs_m, offs_n, row_valid, col_valid, lse_s_ptr, lse_m_ptr, npos_ptr,
                           row_ids_ptr, column_ids_ptr, positive_offset, scale, alpha, HAS_IDS, PRECISION)
        grad_c += tl.dot(tl.trans(g.to(r.dtype)), r, input_precision=PRECISION)

    grad_c = grad_c * (grad_scale * inv_temp)
    out = grad_columns_ptr + (pid_s * NG + offs_n[:, None]) * D + offs_d[None, :]
    tl.store(out, grad_c, mask=col_valid[:, None] & d_valid[None, :])


# ---------------------------------------------------------------------------------------------------- launchers
def _config(rows: int, columns: int, dim: int, dtype: torch.dtype, device: torch.device, splits: int | None,
            sm_count: int | None = None) -> dict:
    """Block sizes, warps, stages and the column split for one launch: a small heuristic instead of autotuning
    (autotune with several configs needs a GPU, and the interpreter wants few, large programs)."""
    block_d = max(16, triton.next_power_of_2(dim))
    if device.type == "cuda":
        block_m, block_n = 64, 64 if block_d <= 128 else 32
        if dtype == torch.float32 and block_d > 128:
            block_m = 32  # fp32 tiles at D=256 would exceed an A100's 163 KiB of shared memory
        num_warps = 4 if block_d <= 64 else 8
        if sm_count is None:
            sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        # Aim for ~2 programs per SM: split the columns when the row blocks alone cannot fill the GPU.
        target = 2 * sm_count
    else:
        block_m, block_n, num_warps = min(64, max(16, triton.next_power_of_2(rows))), 128, 4
        target = 1
    row_blocks = triton.cdiv(rows, block_m)
    tiles = triton.cdiv(columns, block_n)
    if splits is None:
        splits = max(1, min(triton.cdiv(target, row_blocks), triton.cdiv(tiles, 4)))
    tiles_per_split = triton.cdiv(tiles, max(1, min(splits, tiles)))
    splits = triton.cdiv(tiles, tiles_per_split)  # no empty split: every split sees at least one valid column
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps, num_stages=2,
                splits=splits, tiles_per_split=tiles_per_split, row_blocks=row_blocks)


def _meta(cfg: dict, transposed: bool = False) -> dict:
    """Launch meta-parameters of a config; ``transposed`` swaps the row and column block sizes (column kernel)."""
    block_m, block_n = (cfg["BLOCK_N"], cfg["BLOCK_M"]) if transposed else (cfg["BLOCK_M"], cfg["BLOCK_N"])
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"])


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _forward_direction(rows, rows_m, columns, temp, alpha, row_ids, column_ids, positive_offset, splits=None):
    """One direction: (row losses [M] in nats, log2-sum-exp2 of s and m [M], positive counts [M])."""
    M, D = rows.shape
    N = columns.shape[0]
    cfg = _config(M, N, D, rows.dtype, rows.device, splits)
    stats = _output_buffer((_STATS, cfg["splits"], M), torch.float32, rows.device)
    has_ids = row_ids is not None
    _itc_forward_kernel[(cfg["row_blocks"], cfg["splits"])](
        rows, rows_m, columns, temp, row_ids if has_ids else rows, column_ids if has_ids else rows, stats,
        M, N, D, cfg["tiles_per_split"], positive_offset,
        rows.stride(0), rows_m.stride(0), columns.stride(0),
        HAS_IDS=has_ids, PRECISION=_precision(rows.dtype),
        **_meta(cfg),
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


def _backward_direction(rows, rows_m, columns, temp, grad_out, lse_s, lse_m, npos, alpha, row_ids, column_ids,
                        positive_offset, grad_columns: int, splits=None):
    """One direction's gradients: (d rows [M, D] fp32, d temp [] fp32, d first ``grad_columns`` columns or None)."""
    M, D = rows.shape
    N = columns.shape[0]
    has_ids = row_ids is not None
    ids = (row_ids, column_ids) if has_ids else (rows, rows)
    common = dict(HAS_IDS=has_ids, PRECISION=_precision(rows.dtype))
    cfg = _config(M, N, D, rows.dtype, rows.device, splits)
    grad_rows = _output_buffer((cfg["splits"], M, D), torch.float32, rows.device)
    grad_temp = _output_buffer((cfg["splits"], cfg["row_blocks"]), torch.float32, rows.device)
    _itc_backward_rows_kernel[(cfg["row_blocks"], cfg["splits"])](
        rows, rows_m, columns, temp, grad_out, *ids, lse_s, lse_m, npos, grad_rows, grad_temp,
        M, N, D, cfg["tiles_per_split"], positive_offset, alpha,
        rows.stride(0), rows_m.stride(0), columns.stride(0),
        **_meta(cfg), **common,
    )
    grad_cols = None
    if grad_columns:
        # Transposed problem: programs own column blocks and stream (and split) the rows.
        ccfg = _config(grad_columns, M, D, rows.dtype, rows.device, splits)
        grad_cols = _output_buffer((ccfg["splits"], grad_columns, D), torch.float32, rows.device)
        _itc_backward_columns_kernel[(ccfg["row_blocks"], ccfg["splits"])](
            rows, rows_m, columns, temp, grad_out, *ids, lse_s, lse_m, npos, grad_cols,
            M, grad_columns, D, ccfg["tiles_per_split"], positive_offset, alpha,
            rows.stride(0), rows_m.stride(0), columns.stride(0),
            **_meta(ccfg, transposed=True), **common,
        )
        grad_cols = grad_cols.sum(0)
    return grad_rows.sum(0), grad_temp.sum(), grad_cols


# ---------------------------------------------------------------------------------------------------- autograd
class ItcLossFunction(torch.autograd.Function):
    """Both directions of the fused ITC loss. Inputs must already share one dtype and be row-contiguous; the
    in-batch columns ``[B_cols, D]`` receive a gradient only when ``column_grad`` (the queues ``[Q, D]`` never)."""

    @staticmethod
    def forward(ctx, image_feat, text_feat, image_feat_m, text_feat_m, image_batch_columns, text_batch_columns,
                image_queue_columns, text_queue_columns, temp, alpha, row_ids, column_ids, positive_offset,
                column_grad, splits):
        ctx.set_materialize_grads(False)
        # [C, D] = in-batch (possibly all-gathered) momentum features, then the queue: one copy, O((B + Q) D).
        image_columns = torch.cat([image_batch_columns, image_queue_columns], dim=0)
        text_columns = torch.cat([text_batch_columns, text_queue_columns], dim=0)
        i2t = _forward_direction(image_feat, image_feat_m, text_columns, temp, alpha, row_ids, column_ids,
                                 positive_offset, splits)
        t2i = _forward_direction(text_feat, text_feat_m, image_columns, temp, alpha, row_ids, column_ids,
                                 positive_offset, splits)
        ctx.save_for_backward(image_feat, text_feat, image_feat_m, text_feat_m, image_columns, text_columns, temp,
                              row_ids, column_ids, *i2t[1:], *t2i[1:])
        ctx.alpha, ctx.positive_offset, ctx.splits = alpha, positive_offset, splits
        ctx.grad_columns = image_batch_columns.shape[0] if column_grad else 0
        return (i2t[0].mean() + t2i[0].mean()) / 2

    @staticmethod
    def backward(ctx, grad_out):
        if grad_out is None:
            return (None,) * 15
        (image_feat, text_feat, image_feat_m, text_feat_m, image_columns, text_columns, temp, row_ids, column_ids,
         *stats) = ctx.saved_tensors
        grad_out = grad_out.float().contiguous()
        shared = dict(alpha=ctx.alpha, row_ids=row_ids, column_ids=column_ids, positive_offset=ctx.positive_offset,
                      grad_columns=ctx.grad_columns, splits=ctx.splits)
        d_image, d_temp_i2t, d_text_cols = _backward_direction(image_feat, image_feat_m, text_columns, temp,
                                                               grad_out, *stats[:3], **shared)
        d_text, d_temp_t2i, d_image_cols = _backward_direction(text_feat, text_feat_m, image_columns, temp,
                                                               grad_out, *stats[3:], **shared)
        d_temp = (d_temp_i2t + d_temp_t2i).reshape(temp.shape).to(temp.dtype)
        return (d_image.to(image_feat.dtype), d_text.to(text_feat.dtype), None, None,
                None if d_image_cols is None else d_image_cols.to(image_columns.dtype),
                None if d_text_cols is None else d_text_cols.to(text_columns.dtype),
                None, None, d_temp, None, None, None, None, None, None)


# ---------------------------------------------------------------------------------------------------- public API
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
) -> torch.Tensor:
    """Fused BLIP ITC loss, ``(CE_i2t + CE_t2i) / 2``, same semantics as ``blip_fast.ops.itc_loss``.

    Rows: ``image_feat``/``text_feat`` ``[B, D]`` with gradient, momentum rows ``image_feat_m``/``text_feat_m``
    ``[B, D]`` (targets, detached). Columns: ``image_columns``/``text_columns`` ``[B_cols, D]`` (default: the
    momentum features; pass all-gathered ones to score local rows against every rank) followed by the queues
    ``[D, Q]``. Positives: the diagonal ``column == row + positive_offset`` (the rank's offset into gathered
    columns), or with ``image_ids [B]`` every column whose id (``column_ids [B_cols]``, default ``image_ids``, then
    ``id_queue [Q]``) equals the row's. ``temp``: 0-dim or ``[1]`` tensor, read on the device. ``column_grad``:
    also back-propagate into ``image_columns``/``text_columns`` (CLIP-style gather-with-grad); BLIP keeps them
    detached. ``splits`` forces the number of column splits (tests). Inputs fp32/fp16/bf16; mixed dtypes are
    promoted to the widest; accumulation is fp32. Returns a 0-dim fp32 tensor.
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
        all_column_ids = torch.cat([batch_ids, queue_ids]).to(torch.int64).contiguous()
    temp_tensor = torch.as_tensor(temp, device=image_feat.device)
    if not temp_tensor.is_floating_point():
        temp_tensor = temp_tensor.float()
    return ItcLossFunction.apply(
        prepare(image_feat), prepare(text_feat), prepare(image_feat_m.detach()), prepare(text_feat_m.detach()),
        prepare(image_columns if column_grad else image_columns.detach()),
        prepare(text_columns if column_grad else text_columns.detach()),
        # Transposed views: the cat in forward writes the [Q, D] rows directly, no intermediate contiguous copy.
        image_queue.detach().t().to(dtype), text_queue.detach().t().to(dtype),
        temp_tensor.contiguous(), float(alpha), row_ids, all_column_ids, int(positive_offset), bool(column_grad),
        splits,
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


__all__ = ["ItcLossFunction", "flop_count", "itc_loss"]
