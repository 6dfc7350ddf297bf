"""Fused ITM hard-negative mining: one pass over similarity tiles, Gumbel-max sampling, no B x C matrix, no host sync.

BLIP picks, for every image, one negative text drawn with probability ``w_ij / sum_j w_ij`` where
``w_ij = softmax_j(sim_ij) + smoothing`` and ``w_ij = 0`` for every column of the same image (and the same for
texts against images). The original does this with a Python loop of ``torch.multinomial(...).item()`` calls;
``blip_fast.ops`` vectorises it but still builds the ``[B, C]`` weight matrices. This kernel streams column tiles
once per block of rows and keeps a handful of per-row registers instead.

Why one pass is enough, even with smoothing: the weights split exactly into a mixture of two distributions,

    w_ij / W_i = (P_i / W_i) * [exp(sim_ij) / sum_valid exp(sim_ik)] + (smoothing * K_i / W_i) * [1 / K_i]

with ``P_i = sum_valid softmax_ij`` (the softmax mass left after zeroing the positives), ``K_i`` the number of
admissible columns and ``W_i = P_i + smoothing * K_i``. Per row we therefore track, in one sweep:

* the online log-sum-exp pieces ``m`` (running max), ``l_all`` (sum over all columns) and ``l_valid`` (sum over
  admissible columns), so ``P_i = l_valid / l_all`` without the ``1 - p_same`` cancellation;
* a Gumbel-max sample of the renormalised admissible softmax: ``argmax_j sim_ij + G_ij`` with
  ``G = -log(-log(U))`` — the log-sum-exp is a per-row constant, so this needs no second pass;
* a uniform sample over admissible columns: ``argmax_j U_ij`` over the same uniforms (only one of the two samples
  is ever returned, and the choice between them uses an independent coin, so sharing ``U`` is exact);
* ``K_i``.

A final per-row coin picks the softmax sample with probability ``P_i / W_i``. The matmul is computed once (a
two-pass LSE-then-sample scheme would compute it twice), which is where the time goes at D=256. The ITC kernel's
row statistics are not reused: ITC's columns are the momentum features plus the queue, ITM's the online features,
and the single pass does not need a log-sum-exp up front anyway.

Randomness: Philox via ``tl.rand(seed, offsets)``. The uniform of (direction d, row i, column j) has the counter
``offset + (d * B + i) * C + j``; the coins use ``offset + 2 * B * C + d * B + i``. One call consumes
``philox_draws(B, C)`` counters, so a (seed, offset) pair reproduces a step exactly and consecutive steps can
advance ``offset`` instead of reseeding. Uniforms are 31-bit, so the Gumbel noise is bounded to about
[-3.1, 16.6]: a column whose weight is below ~e^-19 of the row's best admissible column is never drawn (the
reference's fp32 softmax flushes such weights to the smoothing floor or to 0 anyway).

No gradient flows through sampled indices, so there is no autograd Function here.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["seed", "offset", "coin_offset"])
def _hard_negatives_kernel(
    image_ptr,  # [B, D] rows of direction 0 (image -> negative text)
    text_ptr,  # [B, D] rows of direction 1 (text -> negative image)
    image_columns_ptr,  # [C, D] candidates of direction 1
    text_columns_ptr,  # [C, D] candidates of direction 0
    row_ids_ptr,  # [B] int64 image ids of the rows (read only with HAS_IDS)
    column_ids_ptr,  # [C] int64 image ids of the columns (read only with HAS_IDS)
    temp_ptr,  # scalar temperature, read on the device so the host never syncs on it
    out_ptr,  # [2, B] int64: out[0] negative text per image, out[1] negative image per text
    B,
    C,
    D,
    smoothing,
    seed,
    offset,  # first Philox counter of the uniforms
    coin_offset,  # first counter of the per-row coins (offset + 2 * B * C, computed on the host: no int32 overflow)
    HAS_IDS: tl.constexpr,
    FP32_DOT: tl.constexpr,  # fp32 inputs: 3xTF32 keeps fp32-level sims (plain TF32 moves logits by up to ~1e-2)
    UPCAST: tl.constexpr,  # the interpreter mishandles bf16 (raw bits): compute in fp32 there
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    block = tl.program_id(0)
    direction = tl.program_id(1)  # both directions in one launch: twice the programs to fill the SMs
    if direction == 0:
        rows_ptr = image_ptr
        columns_ptr = text_columns_ptr
    else:
        rows_ptr = text_ptr
        columns_ptr = image_columns_ptr

    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < B
    rows64 = rows.to(tl.int64)  # B * D and the Philox counters overflow int32 at realistic sizes
    inv_temp = 1.0 / tl.load(temp_ptr).to(tl.float32)
    if HAS_IDS:
        row_ids = tl.load(row_ids_ptr + rows64, mask=row_mask, other=-1)

    neg_inf = float("-inf")
    m = tl.full([BLOCK_M], neg_inf, tl.float32)  # running max of sim over all columns
    l_all = tl.zeros([BLOCK_M], tl.float32)  # sum exp(sim - m) over all columns
    l_valid = tl.zeros([BLOCK_M], tl.float32)  # ... over admissible columns only
    n_valid = tl.zeros([BLOCK_M], tl.float32)
    best_soft = tl.full([BLOCK_M], neg_inf, tl.float32)  # running max of sim + Gumbel over admissible columns
    pick_soft = tl.full([BLOCK_M], -1, tl.int64)
    best_unif = tl.full([BLOCK_M], -1.0, tl.float32)  # running max of U over admissible columns
    pick_unif = tl.full([BLOCK_M], -1, tl.int64)
    counter_base = offset + (direction * B + rows64) * C  # [BLOCK_M] first Philox counter of each row

    for start in range(0, C, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < C
        cols64 = cols.to(tl.int64)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k in range(0, D, BLOCK_D):
            ks = k + tl.arange(0, BLOCK_D)
            k_mask = ks < D
            a = tl.load(rows_ptr + rows64[:, None] * D + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                        other=0.0)  # [BLOCK_M, BLOCK_D]
            b = tl.load(columns_ptr + cols64[None, :] * D + ks[:, None], mask=k_mask[:, None] & col_mask[None, :],
                        other=0.0)  # [BLOCK_D, BLOCK_N]
            if UPCAST:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
            elif FP32_DOT:
                acc = tl.dot(a, b, acc, input_precision="tf32x3")
            else:
                # fp16/bf16 products are exact in the fp32 accumulator: same numbers as upcasting first.
                acc = tl.dot(a, b, acc)
        sim = acc * inv_temp  # [BLOCK_M, BLOCK_N]

        if HAS_IDS:
            column_ids = tl.load(column_ids_ptr + cols64, mask=col_mask, other=-1)
            same_image = row_ids[:, None] == column_ids[None, :]
        else:
            same_image = rows[:, None] == cols[None, :]
        in_range = tl.broadcast_to(col_mask[None, :], (BLOCK_M, BLOCK_N))
        valid = in_range & ~same_image

        # Online log-sum-exp; every tile holds at least one in-range column, so m is finite after the first.
        sim_in = tl.where(in_range, sim, neg_inf)
        m_new = tl.maximum(m, tl.max(sim_in, axis=1))
        rescale = tl.exp(m - m_new)
        p = tl.exp(sim_in - m_new[:, None])
        l_all = l_all * rescale + tl.sum(p, axis=1)
        l_valid = l_valid * rescale + tl.sum(tl.where(valid, p, 0.0), axis=1)
        m = m_new
        n_valid += tl.sum(valid.to(tl.float32), axis=1)

        uniform = tl.rand(seed, counter_base[:, None] + cols64[None, :])
        # U can be exactly 0; 2^-32 keeps log finite and is below the generator's resolution (2^-31).
        gumbel = -tl.log(-tl.log(tl.maximum(uniform, 2.3283064e-10)))
        score = tl.where(valid, sim + gumbel, neg_inf)
        tile_best = tl.max(score, axis=1)
        tile_pick = tl.argmax(score, axis=1).to(tl.int64) + start
        better = tile_best > best_soft  # strict: an all -inf tile never replaces a pick
        best_soft = tl.where(better, tile_best, best_soft)
        pick_soft = tl.where(better, tile_pick, pick_soft)

        score_unif = tl.where(valid, uniform, -1.0)
        tile_best = tl.max(score_unif, axis=1)
        tile_pick = tl.argmax(score_unif, axis=1).to(tl.int64) + start
        better = tile_best > best_unif
        best_unif = tl.where(better, tile_best, best_unif)
        pick_unif = tl.where(better, tile_pick, pick_unif)

    # Mixture weights of the two samples (see the module docstring): softmax mass left on admissible columns vs
    # the smoothing floor. With smoothing 0 the softmax sample is always taken, even if its mass underflowed.
    mass_soft = l_valid / l_all
    mass_unif = smoothing * n_valid
    coin = tl.rand(seed, coin_offset + direction * B + rows64)
    take_soft = (coin * (mass_soft + mass_unif) < mass_soft) | (mass_unif == 0.0)
    negative = tl.where(take_soft, pick_soft, pick_unif)  # -1 only when a row has no admissible column
    tl.store(out_ptr + direction * B + rows64, negative, mask=row_mask)


def philox_draws(rows: int, columns: int) -> int:
    """Philox counters one call consumes for ``rows`` rows and ``columns`` columns (both directions + coins)."""
    return 2 * rows * columns + 2 * rows


# XORed into a CUDA generator's seed: the kernel's Philox key then differs from the key torch's own CUDA random ops
# use with the same state, so our counters can never replay (or be replayed by) a dropout mask's numbers.
_KEY_SALT = 0x2545F491


def seed_and_offset(generator: torch.Generator | None, device: torch.device, draws: int) -> tuple[int, int]:
    """A host-side ``(seed, offset)`` for one call of ``draws`` Philox counters, without a device sync.

    * a CUDA generator, or ``None`` on a CUDA device (then the device's default generator, which the reference's
      ``torch.multinomial`` would consume too, so ``torch.manual_seed`` makes runs reproducible): its Philox state is
      read on the host (``initial_seed`` + ``get_offset``) and its offset advanced past ``draws`` (rounded up to a
      multiple of 4, like torch's own increments). Drawing a number *on* the CUDA generator instead would need an
      ``.item()`` sync to reach the launch arguments.
    * a CPU generator, or ``None`` on CPU: a 31-bit seed drawn from it (a CPU op, no sync) and offset 0 — a fresh
      seed is a fresh Philox key, so any offset would do.
    """
    if generator is None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        generator = torch.cuda.default_generators[index]
    if generator is None or generator.device.type == "cpu":
        return int(torch.randint(2**31 - 1, (1,), generator=generator)), 0
    offset = generator.get_offset()
    generator.set_offset(offset + (draws + 3) // 4 * 4)
    # 31 bits keep the seed an i32 launch argument (one compiled variant).
    return (generator.initial_seed() ^ _KEY_SALT) % (2**31 - 1), offset


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _block_sizes(rows: int, columns: int, dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps). The interpreter pays ~5 ms per program for tl.rand, so it gets few
    programs with large blocks. On the GPU, 64-row tiles give 2 * B / 64 programs (128 at B=4096, one wave); each
    element of a tile carries a 64-bit Philox counter, so 4 warps spill (255 registers, 416 B of stack per thread in
    fp16 on sm_90) while 8 warps do not, and 32-column tiles keep every dtype out of local memory under both Triton
    3.6 (torch 2.11's, the GPU machine's: 64 columns spill 64 B in fp16) and 3.9 (tests/test_itm_negatives_kernel.py
    compiles each for sm_90 under every Triton it finds and checks)."""
    pow2 = triton.next_power_of_2
    if _interpreting():
        return min(max(pow2(rows), 16), 1024), min(max(pow2(columns), 16), 256), min(max(pow2(dim), 16), 256), 4
    return 64, 32, min(max(pow2(dim), 16), 64), 8


def hard_negatives(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    temp: torch.Tensor | float,
    image_ids: torch.Tensor | None = None,
    smoothing: float = 1e-4,
    seed: int = 0,
    offset: int = 0,
    image_columns: torch.Tensor | None = None,
    text_columns: torch.Tensor | None = None,
    column_ids: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocks: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused sampler with an explicit Philox ``(seed, offset)``.

    ``image_feat``/``text_feat`` ``[B, D]`` are the rows; ``image_columns``/``text_columns`` ``[C, D]`` the
    candidates (default: the rows, with the diagonal excluded). With ``image_ids [B]`` (and ``column_ids [C]``,
    default ``image_ids``) every column of the same image is excluded. ``temp`` is a scalar tensor (read on the
    device) or a float. ``out`` (optional ``[2, B]`` int64) receives the result; ``blocks`` (``BLOCK_M, BLOCK_N, BLOCK_D``, powers of
    two >= 16) overrides the tile sizes (tests use it to cross tile boundaries). Returns
    ``(negative_text [B], negative_image [B])`` column indices; a row without any admissible column gets -1.
    """
    if image_columns is None:
        image_columns, text_columns = image_feat, text_feat
        column_ids = image_ids if column_ids is None else column_ids
    elif text_columns is None:
        raise ValueError("image_columns and text_columns go together")
    if image_ids is not None and column_ids is None:
        raise ValueError("explicit columns with image_ids need column_ids")
    rows, dim = image_feat.shape
    columns = image_columns.shape[0]
    if text_feat.shape != (rows, dim) or image_columns.shape != (columns, dim) or text_columns.shape != (columns, dim):
        raise ValueError(f"shape mismatch: rows {tuple(image_feat.shape)}/{tuple(text_feat.shape)}, columns "
                         f"{tuple(image_columns.shape)}/{tuple(text_columns.shape)}")
    device = image_feat.device
    # One element type for all four operands (the kernel selects pointers per direction at run time).
    dtype = torch.promote_types(torch.promote_types(image_feat.dtype, text_feat.dtype),
                                torch.promote_types(image_columns.dtype, text_columns.dtype))
    image_feat, text_feat, image_columns, text_columns = (
        t.detach().to(dtype).contiguous() for t in (image_feat, text_feat, image_columns, text_columns)
    )
    if not torch.is_tensor(temp):
        temp = torch.tensor(float(temp), device=device)
    temp = temp.detach().reshape(())
    has_ids = image_ids is not None
    if has_ids:
        row_ids = image_ids.to(device=device, dtype=torch.int64).contiguous()
        column_ids = column_ids.to(device=device, dtype=torch.int64).contiguous()
    else:
        row_ids = column_ids = image_feat  # never read (HAS_IDS=False); any pointer will do
    if out is None:
        out = torch.empty((2, rows), dtype=torch.int64, device=device)
    block_m, block_n, block_d, num_warps = _block_sizes(rows, columns, dim)
    if blocks is not None:
        block_m, block_n, block_d = blocks
    grid = (triton.cdiv(rows, block_m), 2)
    _hard_negatives_kernel[grid](
        image_feat, text_feat, image_columns, text_columns, row_ids, column_ids, temp, out,
        rows, columns, dim, float(smoothing), int(seed), int(offset), int(offset) + 2 * rows * columns,
        HAS_IDS=has_ids,
        FP32_DOT=dtype == torch.float32,
        UPCAST=dtype == torch.bfloat16 and _interpreting(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out[0], out[1]


def sample_hard_negatives(image_feat, text_feat, temp, image_ids, smoothing, generator, image_columns, text_columns,
                          column_ids):
    """``blip_fast.ops.sample_hard_negatives`` backend: same arguments and result as the reference, sampled by the
    fused kernel. ``generator`` (CPU or CUDA, or None) only supplies the Philox seed/offset (:func:`seed_and_offset`),
    so equal generator states give equal negatives, but not the reference's negatives."""
    columns = image_feat.shape[0] if image_columns is None else image_columns.shape[0]
    seed, offset = seed_and_offset(generator, image_feat.device, philox_draws(image_feat.shape[0], columns))
    return hard_negatives(image_feat, text_feat, temp, image_ids, smoothing, seed, offset, image_columns,
                          text_columns, column_ids)
