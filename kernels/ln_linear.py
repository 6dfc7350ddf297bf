"""LayerNorm fused into the next linear layer's prologue: one kernel per post-LN sublayer boundary of the decoder.

BERT's sublayers end in ``LayerNorm(sublayer(x) + residual)`` and the next sublayer starts with a linear layer of
that result. In the decode step the rows are few (one token per beam/sample), so each boundary costs launches,
not bandwidth. This kernel computes, for rows ``M`` of width ``K``,

    normed = LayerNorm(x + residual) * ln_weight + ln_bias        (statistics in fp32)
    out    = activation(normed @ weight.T + bias)                   (fp32 accumulation)

and writes both: ``normed`` is the residual stream the following sublayer adds back, ``out`` its input. A
program owns a ``BLOCK_M x BLOCK_N`` tile of ``out``. It first makes one pass over its rows to get their mean and
variance (per-block mean and M2 merged with Chan's formula: one pass, as stable as two), then streams ``K`` in
``BLOCK_K`` slices: load ``x + residual``, normalise, round to the weight dtype (what an eager LayerNorm would
store), and feed the tensor-core dot. The row statistics are recomputed by every column program: a few KiB of
L2 reads per program, cheaper than a second launch. The programs of column block 0 also store ``normed``.

Semantics are ``blip_fast.decode_ops._ln_linear_reference`` (``F.layer_norm`` then ``F.linear``), the oracle.
``x + residual`` is rounded to the input dtype before the statistics, as the eager ``dense(x) + residual`` is.
fp32 uses exact ("ieee") products; fp16/bf16 tensor cores with fp32 accumulation. Interpreter (CPU): fp32 and
fp16 only (DESIGN.md §4b).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Activation names of :func:`ln_linear` (the decoder config's ``hidden_act`` maps onto them).
ACTIVATIONS = {"none": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "quick_gelu": 4}
_SQRT_HALF = tl.constexpr(0.7071067811865476)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)


def _output_buffer(shape, dtype, device) -> torch.Tensor:
    """Every kernel output is allocated here, so tests can poison (NaN-fill) what the kernels must overwrite."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def _activate(y, ACTIVATION: tl.constexpr):
    if ACTIVATION == 1:  # exact (erf) GELU, BERT's
        y = 0.5 * y * (1.0 + tl.math.erf(y * _SQRT_HALF))
    elif ACTIVATION == 2:  # tanh approximation; tanh(u) = 2 sigmoid(2u) - 1
        inner = _SQRT_2_OVER_PI * (y + 0.044715 * y * y * y)
        y = 0.5 * y * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    elif ACTIVATION == 3:
        y = tl.maximum(y, 0.0)
    elif ACTIVATION == 4:
        y = y * tl.sigmoid(1.702 * y)
    return y


@triton.jit
def _load_sum(x_ptr, res_ptr, rows, cols, row_valid, col_valid, stride_xm, stride_rm, HAS_RESIDUAL: tl.constexpr,
              EVEN_K: tl.constexpr):
    """``x + residual`` of a [rows, cols] tile, added in the input dtype (eager rounding), returned in fp32.
    EVEN_K (K a multiple of BLOCK_K, e.g. 768): no mask along the contiguous dim, so loads vectorise."""
    if EVEN_K:
        valid = row_valid[:, None]
    else:
        valid = row_valid[:, None] & col_valid[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=valid, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(res_ptr + rows[:, None] * stride_rm + cols[None, :], mask=valid, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _ln_linear_kernel(
    x_ptr, res_ptr, ln_w_ptr, ln_b_ptr, w_ptr, b_ptr, normed_ptr, out_ptr,
    M, N, K, eps,
    stride_xm, stride_rm, stride_wn, stride_nm, stride_om,
    HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_valid = rows < M
    offs_k = tl.arange(0, BLOCK_K)

    # Pass 1: row mean and M2 (sum of squared deviations), block by block, merged with Chan's update.
    mean = tl.zeros([BLOCK_M], tl.float32)
    m2 = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs_k
        col_valid = cols < K
        a = _load_sum(x_ptr, res_ptr, rows, cols, row_valid, col_valid, stride_xm, stride_rm, HAS_RESIDUAL, EVEN_K)
        count = tl.minimum(K - k0, BLOCK_K).to(tl.float32)
        block_mean = tl.sum(a, 1) / count
        centred = tl.where(col_valid[None, :], a - block_mean[:, None], 0.0)
        block_m2 = tl.sum(centred * centred, 1)
        seen = k0 * 1.0  # fp32 (a plain int in the interpreter)
        total = seen + count
        delta = block_mean - mean
        mean += delta * (count / total)
        m2 += block_m2 + delta * delta * (seen * count / total)
    rstd = 1.0 / tl.sqrt(m2 / K + eps)

    # Pass 2: normalise each K slice and multiply it into the output tile.
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs_k
        col_valid = cols < K
        a = _load_sum(x_ptr, res_ptr, rows, cols, row_valid, col_valid, stride_xm, stride_rm, HAS_RESIDUAL, EVEN_K)
        gamma = tl.load(ln_w_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)
        beta = tl.load(ln_b_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)
        normed = ((a - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]).to(normed_ptr.dtype.element_ty)
        if pid_n == 0:
            tl.store(normed_ptr + rows[:, None] * stride_nm + cols[None, :], normed,
                     mask=row_valid[:, None] & col_valid[None, :])
        if EVEN_K:
            w_mask = n_valid[None, :]
        else:
            w_mask = col_valid[:, None] & n_valid[None, :]
        w = tl.load(w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + cols[:, None], mask=w_mask,
                    other=0.0)  # [BLOCK_K, BLOCK_N] of weight.T
        acc += tl.dot(normed.to(w.dtype), w, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_valid, other=0.0).to(tl.float32)[None, :]
    acc = _activate(acc, ACTIVATION)
    tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_valid[:, None] & n_valid[None, :])


def _config(rows: int, out_features: int, in_features: int, device: torch.device) -> dict:
    """Tile sizes: a heuristic for skinny decode GEMMs (tl.dot needs >= 16 rows; the interpreter wants few,
    large programs)."""
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    if device.type == "cuda":
        block_n = 64 if rows <= 64 else 128
        block_k = 64
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=3)
    block_n = min(128, max(16, triton.next_power_of_2(out_features)))
    block_k = min(128, max(16, triton.next_power_of_2(in_features)))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=1)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., K]`` -> ``[M, K]`` with unit last stride (a view whenever the layout allows)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def ln_linear(
    x: torch.Tensor, residual: torch.Tensor | None, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
    weight: torch.Tensor, bias: torch.Tensor | None, activation: str = "none",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(LayerNorm(x + residual), activation(LayerNorm(x + residual) @ weight.T + bias))`` in one kernel.

    x/residual ``[..., K]`` (rows may be strided), ln_weight/ln_bias ``[K]``, weight ``[N, K]`` (nn.Linear's),
    bias ``[N]`` or None. Returns normed ``[..., K]`` and out ``[..., N]`` in x's dtype.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
    in_features, out_features = x.shape[-1], weight.shape[0]
    if weight.shape[1] != in_features or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"ln_linear: x {tuple(x.shape)}, residual {None if residual is None else tuple(residual.shape)}"
                         f" and weight {tuple(weight.shape)} do not fit")
    lead = x.shape[:-1]
    x2 = _rows(x)
    res2 = _rows(residual) if residual is not None else x2
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    rows = x2.shape[0]
    normed = _output_buffer((rows, in_features), x.dtype, x.device)
    out = _output_buffer((rows, out_features), x.dtype, x.device)
    if rows:
        cfg = _config(rows, out_features, in_features, x.device)
        grid = (triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(out_features, cfg["BLOCK_N"]))
        _ln_linear_kernel[grid](
            x2, res2, ln_weight, ln_bias, weight, bias if bias is not None else weight, normed, out,
            rows, out_features, in_features, float(eps),
            x2.stride(0), res2.stride(0), weight.stride(0), normed.stride(0), out.stride(0),
            HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, ACTIVATION=ACTIVATIONS[activation],
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32", EVEN_K=in_features % cfg["BLOCK_K"] == 0,
            **cfg,
        )
    return normed.view(*lead, in_features), out.view(*lead, out_features)
