"""The fused operators of the static decode step (:meth:`BlipTextLMHeadModel.decode_step`).

Each is a torch custom op (``torch.ops.blip_fast.<name>``): one opaque node for ``torch.compile`` and CUDA graphs,
one kernel launch on CUDA (Triton, from ``blip_fast.kernels``; the cross-attention adds a merge kernel when it
splits the keys of a small batch), and a pure-torch reference that is the oracle and the CPU path. Backends are
chosen through :func:`blip_fast.ops.resolve` like every other op (``BLIP_FAST_BACKEND``). The cost benchmark
(``benchmarks/bench_costs.py``) counts each op as one kernel and FlopCounterMode counts their FLOPs through the
formulas :func:`register_flop_formulas` registers (not at import: ``torch.utils.flop_counter`` imports Triton,
which importing blip_fast must not).

A decoder layer of the step is eight ops: QKV projection (``ln_linear``: the previous sublayer's residual add and
LayerNorm fused into its prologue), ``decode_self_attention`` (cache append + attention), output projection
(``addmm``), cross-attention query projection (``ln_linear``), ``decode_cross_attention``, its output projection,
FFN up-projection with GELU (``ln_linear``), FFN down-projection.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from blip_fast import ops

#: Each fused op's FLOP formula (``torch.utils.flop_counter`` signature), registered by :func:`register_flop_formulas`.
_FLOP_FORMULAS: dict = {}


def _flop_formula(op):
    def record(formula):
        _FLOP_FORMULAS[op] = formula
        return formula

    return record


@functools.cache
def register_flop_formulas() -> None:
    """Teach ``FlopCounterMode`` the fused ops' FLOPs (once per process; call before counting)."""
    from torch.utils.flop_counter import register_flop_formula

    for op, formula in _FLOP_FORMULAS.items():
        register_flop_formula(op)(formula)


#: Config ``hidden_act`` -> the fused kernels' activation name.
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
               "quick_gelu": "quick_gelu"}


def _on_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def _activate(x: Tensor, activation: str) -> Tensor:
    """The eager activations of ``modeling.common.activation`` by kernel name."""
    if activation == "none":
        return x
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if activation == "relu":
        return F.relu(x)
    if activation == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    raise ValueError(f"unknown activation {activation!r}")


# ---------------------------------------------------------------------------------------------------- ln_linear
@ops.register("ln_linear", "reference")
def _ln_linear_reference(x, residual, ln_weight, ln_bias, eps, weight, bias, activation):
    summed = x if residual is None else x + residual
    normed = F.layer_norm(summed, (summed.shape[-1],), ln_weight, ln_bias, eps)
    return normed, _activate(F.linear(normed, weight, bias), activation)


@ops.register("ln_linear", "triton", available=_on_cuda)
def _ln_linear_triton(x, residual, ln_weight, ln_bias, eps, weight, bias, activation):
    from blip_fast.kernels.ln_linear import ln_linear as fused  # lazy: importing blip_fast never imports triton

    return fused(x, residual, ln_weight, ln_bias, eps, weight, bias, activation)


@torch.library.custom_op("blip_fast::ln_linear", mutates_args=())
def _ln_linear_op(x: Tensor, residual: Tensor | None, ln_weight: Tensor, ln_bias: Tensor, eps: float, weight: Tensor,
                  bias: Tensor | None, activation: str) -> tuple[Tensor, Tensor]:
    normed, out = ops.resolve("ln_linear", x.device)(x, residual, ln_weight, ln_bias, eps, weight, bias, activation)
    return normed, out


@_ln_linear_op.register_fake
def _(x, residual, ln_weight, ln_bias, eps, weight, bias, activation):
    return x.new_empty(x.shape), x.new_empty((*x.shape[:-1], weight.shape[0]))


@_flop_formula(torch.ops.blip_fast.ln_linear)
def _ln_linear_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
    rows = 1
    for size in x_shape[:-1]:
        rows *= size
    return 2 * rows * x_shape[-1] * out_shape[1][-1]


def ln_linear(x: Tensor, residual: Tensor | None, norm: torch.nn.LayerNorm, linear: torch.nn.Linear | Tensor,
              bias: Tensor | None = None, activation: str = "none") -> tuple[Tensor, Tensor]:
    """``normed = norm(x + residual)`` and ``activation(linear(normed))``, one kernel on CUDA.

    x/residual ``[..., K]``; ``linear`` an ``nn.Linear`` (K -> N) or a weight ``[N, K]`` with ``bias``. Returns
    ``(normed [..., K], out [..., N])``: ``normed`` is the residual stream of the next sublayer.
    """
    if isinstance(linear, torch.nn.Linear):
        linear, bias = linear.weight, linear.bias
    return torch.ops.blip_fast.ln_linear(x, residual, norm.weight, norm.bias, norm.eps, linear, bias, activation)


# ---------------------------------------------------------------------------------------------- self-attention
@ops.register("decode_self_attention", "reference")
def _self_attention_reference(qkv, key_cache, value_cache, position, keep, history, num_heads):
    rows, length, width3 = qkv.shape
    head_dim = width3 // 3 // num_heads
    max_length = key_cache.shape[2]
    query, key, value = qkv.view(rows, length, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    positions = position + torch.arange(length, device=qkv.device)  # [L]
    key_cache[:rows].index_copy_(2, positions, key)
    value_cache[:rows].index_copy_(2, positions, value)
    keys, values = key_cache[:rows], value_cache[:rows]  # [R, H, T, Dh]
    if history is not None:  # row r's position-t entry lives in cache row history[r, t]
        steps = torch.arange(max_length, device=qkv.device)
        keys = key_cache.transpose(1, 2)[history[:rows], steps].transpose(1, 2)
        values = value_cache.transpose(1, 2)[history[:rows], steps].transpose(1, 2)
    visible = torch.arange(max_length, device=qkv.device)[None, :] <= positions[:, None]  # [L, T]
    visible = visible[None, None] & keep[:rows, None, None, :]  # [R, 1, L, T]
    context = F.scaled_dot_product_attention(query, keys, values, attn_mask=ops.additive_mask(visible, qkv.dtype))
    return context.transpose(1, 2).reshape(rows, length, num_heads * head_dim)


@ops.register("decode_self_attention", "triton", available=_on_cuda)
def _self_attention_triton(qkv, key_cache, value_cache, position, keep, history, num_heads):
    from blip_fast.kernels.decode_self_attention import decode_self_attention as fused

    return fused(qkv, key_cache, value_cache, position, keep, history, num_heads)


@torch.library.custom_op("blip_fast::decode_self_attention", mutates_args=("key_cache", "value_cache"))
def _self_attention_op(qkv: Tensor, key_cache: Tensor, value_cache: Tensor, position: Tensor, keep: Tensor,
                       history: Tensor | None, num_heads: int) -> Tensor:
    return ops.resolve("decode_self_attention", qkv.device)(qkv, key_cache, value_cache, position, keep, history,
                                                             num_heads)


@_self_attention_op.register_fake
def _(qkv, key_cache, value_cache, position, keep, history, num_heads):
    return qkv.new_empty((*qkv.shape[:2], qkv.shape[2] // 3))


@_flop_formula(torch.ops.blip_fast.decode_self_attention)
def _self_attention_flops(qkv_shape, key_cache_shape, *args, out_shape=None, **kwargs) -> int:
    rows, length, width3 = qkv_shape
    return 4 * rows * length * key_cache_shape[2] * (width3 // 3)  # QK^T and PV over the whole static cache


def decode_self_attention(qkv: Tensor, key_cache: Tensor, value_cache: Tensor, position: Tensor, keep: Tensor,
                          history: Tensor | None, num_heads: int) -> Tensor:
    """Write the new tokens' keys/values into one layer's cache and attend over the cache, one kernel on CUDA.

    qkv ``[R, L, 3D]`` (query | key | value of ``L`` new tokens per row, head-major), key/value cache ``[R_cache, H,
    T, Dh]`` (written at positions ``position .. position + L - 1`` of rows ``< R``), position a 0-d int64 device
    tensor, keep ``[R_cache, T]`` bool (False at prompt padding). ``history [R_cache, T]`` (beam search, or None):
    row ``r`` reads position ``t < position`` from cache row ``history[r, t]``; the caller keeps
    ``history[r, t] == r`` for ``t >= position``. Token ``l`` attends to positions ``<= position + l``. Returns the
    context ``[R, L, D]``.
    """
    return torch.ops.blip_fast.decode_self_attention(qkv, key_cache, value_cache, position, keep, history, num_heads)


# --------------------------------------------------------------------------------------------- cross-attention
def _fold_rows(query: Tensor, images: int, num_heads: int) -> Tensor:
    """``[R, L, D]`` -> ``[C, H, (R / C) * L, Dh]``, a view: an image's rows are extra query rows."""
    rows, length, width = query.shape
    return query.view(images, rows // images * length, num_heads, width // num_heads).transpose(1, 2)


@ops.register("decode_cross_attention", "reference")
def _cross_attention_reference(query, key, value, mask):
    images, heads = key.shape[:2]
    context = F.scaled_dot_product_attention(_fold_rows(query, images, heads), key, value, attn_mask=mask)
    return context.transpose(1, 2).reshape(query.shape)


def _cross_attention_fused(query, key, value, mask, kernel):
    images, heads = key.shape[:2]
    out = torch.empty_like(query)  # [R, L, D]: the fused kernels write it through a [C, H, rL, Dh] view
    kernel(_fold_rows(query, images, heads), key, value, mask, _fold_rows(out, images, heads))
    return out


@ops.register("decode_cross_attention", "triton", available=_on_cuda)
def _cross_attention_triton(query, key, value, mask):
    from blip_fast.kernels.decode_attention import decode_attention as fused

    return _cross_attention_fused(query, key, value, mask, lambda q, k, v, m, out: fused(q, k, v, m, out=out))


@ops.register("decode_cross_attention", "cuda",
              available=lambda device: device.type == "cuda" and ops.cuda_extension_loaded())
def _cross_attention_cuda(query, key, value, mask):
    def kernel(q, k, v, m, out):
        torch.ops.blip_fast.decode_attention_out(q, k, v, m, q.shape[-1] ** -0.5, 0, out)

    return _cross_attention_fused(query, key, value, mask, kernel)


@torch.library.custom_op("blip_fast::decode_cross_attention", mutates_args=())
def _cross_attention_op(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> Tensor:
    shape = ops.attention_shape(query, key, query.shape[0] // key.shape[0] * query.shape[1])
    return ops.resolve("decode_cross_attention", query.device, shape)(query, key, value, mask)


@_cross_attention_op.register_fake
def _(query, key, value, mask):
    return query.new_empty(query.shape)


@_flop_formula(torch.ops.blip_fast.decode_cross_attention)
def _cross_attention_flops(query_shape, key_shape, *args, out_shape=None, **kwargs) -> int:
    rows, length, width = query_shape
    return 4 * rows * length * key_shape[2] * width


def decode_cross_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> Tensor:
    """Cross-attention of decode rows over their image's cached K/V, read once per image for all its rows.

    query ``[R, L, D]`` with ``R = C * rows_per_image`` (an image's rows consecutive), key/value ``[C, H, N, Dh]``
    (any strides with a unit last one), mask additive broadcastable to ``[C, 1, 1, N]`` or None. Returns
    ``[R, L, D]``. The kernels behind :func:`blip_fast.ops.decode_attention`, writing the projection's layout.
    """
    return torch.ops.blip_fast.decode_cross_attention(query, key, value, mask)


# ---------------------------------------------------------------------------------------------------- embedding
@ops.register("decode_embed", "reference")
def _embed_reference(input_ids, position, word_embeddings, position_embeddings):
    positions = position + torch.arange(input_ids.shape[1], device=input_ids.device)
    return F.embedding(input_ids, word_embeddings) + F.embedding(positions, position_embeddings)


@ops.register("decode_embed", "triton", available=_on_cuda)
def _embed_triton(input_ids, position, word_embeddings, position_embeddings):
    from blip_fast.kernels.decode_embed import decode_embed as fused

    return fused(input_ids, position, word_embeddings, position_embeddings)


@torch.library.custom_op("blip_fast::decode_embed", mutates_args=())
def _embed_op(input_ids: Tensor, position: Tensor, word_embeddings: Tensor, position_embeddings: Tensor) -> Tensor:
    return ops.resolve("decode_embed", input_ids.device)(input_ids, position, word_embeddings, position_embeddings)


@_embed_op.register_fake
def _(input_ids, position, word_embeddings, position_embeddings):
    return word_embeddings.new_empty((*input_ids.shape, word_embeddings.shape[1]))


def decode_embed(input_ids: Tensor, position: Tensor, word_embeddings: Tensor, position_embeddings: Tensor) -> Tensor:
    """``word_embeddings[input_ids] + position_embeddings[position + l]`` for ids ``[R, L]``: ``[R, L, D]``."""
    return torch.ops.blip_fast.decode_embed(input_ids, position, word_embeddings, position_embeddings)
