"""The fused decode-step ops (blip_fast/decode_ops.py): references against independent fp64 oracles, and the
Triton kernels (kernels/ln_linear.py, decode_self_attention.py, decode_attention.py with a strided output,
decode_embed.py) against those references.

On CPU the kernels run in Triton's interpreter (fp32 and fp16; bf16 is checked on GPU). Kernel outputs are NaN-
poisoned before the kernels write them. Tolerances (DESIGN.md §4): fp32 within ~1e-5 of the output scale of an
fp64 oracle; fp16 at most twice the error of the eager fp16 computation against the fp32 one.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from blip_fast import decode_ops, ops
from tests.tiny_models import assert_close, poison_kernel_outputs
from tests.triton_compile import each_triton, run_offline

triton = pytest.importorskip("triton")
from blip_fast.kernels import decode_attention as cross_kernel  # noqa: E402
from blip_fast.kernels import decode_embed as embed_kernel  # noqa: E402
from blip_fast.kernels import decode_self_attention as self_kernel  # noqa: E402
from blip_fast.kernels import ln_linear as ln_kernel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    for module in (cross_kernel, embed_kernel, self_kernel, ln_kernel):
        poison_kernel_outputs(monkeypatch, module)


def _low_precision_bound(actual, exact, eager):
    """2x the eager low-precision error against the exact result, plus a quarter rounding step at the output scale."""
    reference_error = (eager.double() - exact.double()).abs().max().item()
    floor = 0.25 * torch.finfo(actual.dtype).eps * exact.abs().max().item()
    assert_close(actual, exact, rtol=0, atol=2 * reference_error + floor)


# ----------------------------------------------------------------------------------------------------- ln_linear
def _ln_linear_oracle(x, residual, ln_weight, ln_bias, eps, weight, bias, activation):
    """fp64 modules: nn.LayerNorm, nn.Linear, and the activation modules the eager model uses."""
    from blip_fast.modeling.common import activation as activation_module

    summed = (x if residual is None else x + residual).double()
    norm = torch.nn.LayerNorm(summed.shape[-1], eps=eps).double()
    with torch.no_grad():
        norm.weight.copy_(ln_weight)
        norm.bias.copy_(ln_bias)
        normed = norm(summed)
        out = F.linear(normed, weight.double(), None if bias is None else bias.double())
    names = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "quick_gelu": "quick_gelu"}
    return normed, out if activation == "none" else activation_module(names[activation])(out)


def _ln_linear_inputs(rows, in_features, out_features, residual=True, bias=True):
    x = torch.randn(rows, in_features, dtype=torch.float64, device=DEVICE) * 2 + 0.5
    res = torch.randn(rows, in_features, dtype=torch.float64, device=DEVICE) if residual else None
    ln_weight = 1 + 0.2 * torch.randn(in_features, dtype=torch.float64, device=DEVICE)
    ln_bias = 0.2 * torch.randn(in_features, dtype=torch.float64, device=DEVICE)
    weight = torch.randn(out_features, in_features, dtype=torch.float64, device=DEVICE) / math.sqrt(in_features)
    b = torch.randn(out_features, dtype=torch.float64, device=DEVICE) if bias else None
    return x, res, ln_weight, ln_bias, 1e-12, weight, b


@pytest.mark.parametrize("activation", ["none", "gelu", "gelu_tanh", "relu", "quick_gelu"])
def test_ln_linear_reference_equals_modules(activation):
    inputs = _ln_linear_inputs(7, 48, 33)
    expected = _ln_linear_oracle(*inputs, activation)
    actual = decode_ops._ln_linear_reference(*[t.float() if torch.is_tensor(t) else t for t in inputs], activation)
    for got, want, name in zip(actual, expected, ("normed", "out")):
        assert_close(got, want, rtol=1e-5, name=name)


# (rows, in, out): 1 row, primes, widths not multiples of the blocks; 130 > one column block.
LN_SHAPES = [(1, 48, 40), (7, 96, 130), (33, 33, 17), (5, 160, 64)]


@pytest.mark.parametrize("rows,in_features,out_features", LN_SHAPES)
@pytest.mark.parametrize("residual,bias,activation", [(True, True, "none"), (False, True, "gelu"),
                                                      (True, False, "quick_gelu"), (True, True, "gelu_tanh")])
def test_ln_linear_kernel_fp32(rows, in_features, out_features, residual, bias, activation):
    inputs = _ln_linear_inputs(rows, in_features, out_features, residual, bias)
    expected = _ln_linear_oracle(*inputs, activation)
    cast = [t.float() if torch.is_tensor(t) else t for t in inputs]
    actual = ln_kernel.ln_linear(*cast, activation)
    for got, want, name in zip(actual, expected, ("normed", "out")):
        assert got.dtype == torch.float32
        assert_close(got, want, rtol=0, atol=2e-5 * want.abs().max().item(), name=name)


def test_ln_linear_kernel_strided_rows_and_leading_dims():
    """The head reads the last token of ``[R, L, D]`` states: rows with a stride, and 3-d inputs keep their shape."""
    inputs = list(_ln_linear_inputs(12, 48, 40))
    x, res = inputs[0].view(4, 3, 48).float(), inputs[1].view(4, 3, 48).float()
    last_x, last_res = x[:, -1:], res[:, -1:]
    cast = [t.float() if torch.is_tensor(t) else t for t in inputs[2:]]
    normed, out = ln_kernel.ln_linear(last_x, last_res, *cast, "none")
    expected = decode_ops._ln_linear_reference(last_x, last_res, *cast, "none")
    assert normed.shape == (4, 1, 48) and out.shape == (4, 1, 40)
    assert_close(out, expected[1], rtol=0, atol=2e-5 * expected[1].abs().max().item())


@pytest.mark.parametrize("rows,in_features,out_features", [(3, 96, 130), (17, 48, 40)])
def test_ln_linear_kernel_fp16(rows, in_features, out_features):
    inputs = _ln_linear_inputs(rows, in_features, out_features)
    half = [t.half() if torch.is_tensor(t) else t for t in inputs]
    exact = decode_ops._ln_linear_reference(*[t.float() if torch.is_tensor(t) else t for t in half], "gelu")
    eager = decode_ops._ln_linear_reference(*half, "gelu") if DEVICE == "cuda" else \
        [t.half() for t in decode_ops._ln_linear_reference(*[t.float() if torch.is_tensor(t) else t for t in half],
                                                           "gelu")]
    actual = ln_kernel.ln_linear(*half, "gelu")
    for got, want, low in zip(actual, exact, eager):
        assert got.dtype == torch.float16
        _low_precision_bound(got, want, low)


# ------------------------------------------------------------------------------------------------ self-attention
def _self_attention_oracle(qkv, key_cache, value_cache, position, keep, history, num_heads):
    """Row by row, query by query, in fp64: gather the visible keys explicitly and softmax them."""
    rows, length, width3 = qkv.shape
    width = width3 // 3
    head_dim = width // num_heads
    split = qkv.double().view(rows, length, 3, num_heads, head_dim)
    out = torch.zeros(rows, length, num_heads, head_dim, dtype=torch.float64)
    for r in range(rows):
        for l in range(length):
            keys, values = [], []
            for t in range(position + l + 1):
                if not keep[r, t]:
                    continue
                if t >= position:
                    keys.append(split[r, t - position, 1])
                    values.append(split[r, t - position, 2])
                else:
                    source = r if history is None else int(history[r, t])
                    keys.append(key_cache[source, :, t].double())
                    values.append(value_cache[source, :, t].double())
            k, v = torch.stack(keys, 1), torch.stack(values, 1)  # [H, n, Dh]
            weights = (torch.einsum("hd,hnd->hn", split[r, l, 0], k) / math.sqrt(head_dim)).softmax(-1)
            out[r, l] = torch.einsum("hn,hnd->hd", weights, v)
    return out.reshape(rows, length, width)


def _self_attention_inputs(rows, cache_rows, length, heads, head_dim, max_length, position, beams, dtype):
    qkv = torch.randn(rows, length, 3 * heads * head_dim, device=DEVICE, dtype=dtype)
    key_cache = torch.randn(cache_rows, heads, max_length, head_dim, device=DEVICE, dtype=dtype)
    value_cache = torch.randn_like(key_cache)
    keep = torch.rand(cache_rows, max_length, device=DEVICE) > 0.25
    keep[:, position : position + length] = True  # every query sees at least itself (padded queries are unused)
    history = None
    if beams:  # each row continues a random row of its own group, per position; the row's own from `position`
        group = torch.arange(cache_rows, device=DEVICE) // beams * beams
        history = group[:, None] + torch.randint(0, beams, (cache_rows, max_length), device=DEVICE)
        history[:, position:] = torch.arange(cache_rows, device=DEVICE)[:, None]
    return qkv, key_cache, value_cache, torch.tensor(position, device=DEVICE), keep, history


# (rows, cache rows, new tokens, heads, Dh, max length, position, beams)
SELF_SHAPES = [
    (1, 1, 1, 1, 16, 7, 0, 0), (3, 4, 1, 3, 16, 21, 9, 0), (6, 6, 1, 2, 24, 40, 37, 3), (2, 5, 5, 3, 16, 17, 0, 0),
    (4, 4, 3, 2, 16, 150, 131, 2), (5, 5, 1, 1, 64, 33, 20, 5),
]


@pytest.mark.parametrize("rows,cache_rows,length,heads,head_dim,max_length,position,beams", SELF_SHAPES)
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_self_attention_fp32(rows, cache_rows, length, heads, head_dim, max_length, position, beams, impl):
    qkv, key_cache, value_cache, pos, keep, history = _self_attention_inputs(
        rows, cache_rows, length, heads, head_dim, max_length, position, beams, torch.float32)
    before_k, before_v = key_cache.clone(), value_cache.clone()
    expected = _self_attention_oracle(qkv, before_k, before_v, position, keep, history, heads)
    fn = decode_ops._self_attention_reference if impl == "reference" else self_kernel.decode_self_attention
    actual = fn(qkv, key_cache, value_cache, pos, keep, history, heads)
    assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    # The new tokens' K/V landed at their positions of their own rows; nothing else in the cache changed.
    new = qkv.view(rows, length, 3, heads, head_dim)
    expected_k, expected_v = before_k.clone(), before_v.clone()
    expected_k[:rows, :, position : position + length] = new[:, :, 1].transpose(1, 2)
    expected_v[:rows, :, position : position + length] = new[:, :, 2].transpose(1, 2)
    assert torch.equal(key_cache, expected_k) and torch.equal(value_cache, expected_v)


def test_self_attention_fully_dropped_query_stays_finite():
    """A left-padding position sees no key at all: its (unused) output must be finite, never NaN."""
    qkv, key_cache, value_cache, pos, keep, _ = _self_attention_inputs(2, 2, 3, 2, 16, 9, 0, 0, torch.float32)
    keep[0, :3] = False
    for fn in (decode_ops._self_attention_reference, self_kernel.decode_self_attention):
        assert fn(qkv, key_cache.clone(), value_cache.clone(), pos, keep, None, 2).isfinite().all()


def test_self_attention_fp16():
    qkv, key_cache, value_cache, pos, keep, history = _self_attention_inputs(6, 6, 2, 3, 64, 40, 21, 3,
                                                                             torch.float16)
    exact = _self_attention_oracle(qkv, key_cache, value_cache, 21, keep, history, 3)
    eager = decode_ops._self_attention_reference(qkv.float(), key_cache.float(), value_cache.float(), pos, keep,
                                                 history, 3).half()
    actual = self_kernel.decode_self_attention(qkv, key_cache, value_cache, pos, keep, history, 3)
    _low_precision_bound(actual, exact, eager)


# ----------------------------------------------------------------------------------------------- cross-attention
@pytest.mark.parametrize("images,rows_per_image,length,heads,keys,masked", [
    (1, 1, 1, 3, 17, False), (3, 3, 1, 2, 33, True), (2, 5, 4, 3, 600, True), (4, 1, 2, 1, 1, False),
])
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_cross_attention_fp32(images, rows_per_image, length, heads, keys, masked, impl):
    head_dim = 16
    rows = images * rows_per_image
    query = torch.randn(rows, length, heads * head_dim, device=DEVICE)
    # K/V as the static cache stores them: [C, N, layers * 2 * D] rows, one layer's slice viewed per head.
    store = torch.randn(images, keys, 3 * 2 * heads * head_dim, device=DEVICE)
    key = store[:, :, 2 * heads * head_dim : 3 * heads * head_dim].unflatten(2, (heads, head_dim)).transpose(1, 2)
    value = store[:, :, 3 * heads * head_dim : 4 * heads * head_dim].unflatten(2, (heads, head_dim)).transpose(1, 2)
    mask = None
    if masked:
        keep = torch.rand(images, 1, 1, keys, device=DEVICE) > 0.3
        keep[..., 0] = True
        mask = ops.additive_mask(keep, torch.float32)
    # Oracle: every row gets its own copy of its image's K/V (what HF does), fp64 SDPA.
    expanded = [t.double().repeat_interleave(rows_per_image, 0) for t in (key, value)]
    oracle_mask = None if mask is None else mask.double().repeat_interleave(rows_per_image, 0)
    expected = F.scaled_dot_product_attention(
        query.double().view(rows, length, heads, head_dim).transpose(1, 2), *expanded, attn_mask=oracle_mask,
    ).transpose(1, 2).reshape(rows, length, heads * head_dim)
    if impl == "reference":
        actual = decode_ops._cross_attention_reference(query, key, value, mask)
    else:
        actual = decode_ops._cross_attention_fused(
            query, key, value, mask, lambda q, k, v, m, out: cross_kernel.decode_attention(q, k, v, m, out=out))
    assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_cross_attention_kernel_rejects_bad_out():
    query = torch.randn(2, 3, 4, 16, device=DEVICE)
    key = torch.randn(2, 3, 9, 16, device=DEVICE)
    with pytest.raises(ValueError, match="unit last stride"):
        cross_kernel.decode_attention(query, key, key, out=torch.empty(2, 3, 16, 4, device=DEVICE).transpose(2, 3))


# ---------------------------------------------------------------------------------------------------- embedding
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_embed_kernel(dtype):
    words = torch.randn(50, 40, device=DEVICE, dtype=dtype)
    positions = torch.randn(30, 40, device=DEVICE, dtype=dtype)
    ids = torch.randint(0, 50, (3, 4), device=DEVICE)
    expected = words[ids] + positions[7:11]
    position = torch.tensor(7, device=DEVICE)
    assert torch.equal(decode_ops._embed_reference(ids, position, words, positions), expected)
    assert torch.equal(embed_kernel.decode_embed(ids, position, words, positions), expected)


# ------------------------------------------------------------------------------------------------------- wiring
@pytest.mark.parametrize("op", ["ln_linear", "decode_self_attention", "decode_cross_attention", "decode_embed"])
def test_fused_ops_registered_for_cuda_and_reference_on_cpu(op):
    implementations = ops._REGISTRY[op]
    assert implementations["triton"][1](torch.device("cuda")) and not implementations["triton"][1](
        torch.device("cpu"))
    assert ops.resolve(op, torch.device("cpu")) is implementations["reference"][0]


def test_custom_ops_are_single_opaque_nodes_with_flops():
    """The dispatcher sees one op per fused call (what the cost benchmark counts) and FlopCounterMode its FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    decode_ops.register_flop_formulas()
    decode_ops.register_flop_formulas()  # idempotent
    x = torch.randn(4, 2, 48)
    norm, linear = torch.nn.LayerNorm(48), torch.nn.Linear(48, 30)
    with FlopCounterMode(display=False) as flops:
        decode_ops.ln_linear(x, None, norm, linear)
    assert flops.get_total_flops() == 2 * 8 * 48 * 30


# Compile (not run) the decode-step kernels for sm_90 as a real launch specialises them (tests/triton_compile.py): the
# interpreter accepts code the compiler rejects and cannot see shared-memory overflows, spills or a lost pipeline.
_COMPILE_SCRIPT = """
import torch
from blip_fast.kernels import decode_embed, decode_self_attention, ln_linear, sampling
from tests.triton_compile import compile_like_launch, is_pipelined, resource_usage

def compile_sm90(fn, args, constexprs, options):
    kernel = compile_like_launch(fn, 90, args, constexprs, options)
    usage = resource_usage(kernel)
    assert usage["stack"] == 0, (fn.fn.__name__, constexprs, usage)  # no spills
    return kernel

for dtype in ("fp16", "bf16"):
    # ln_linear at batch 256 (greedy) and batch 3: K = 768 (EVEN_K), the weight/activation loads pipelined.
    for rows in (256, 3):
        cfg = ln_linear._config(rows, 2304, 768, torch.device("cuda"))
        options = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
        fn = ln_linear._ln_linear_kernel
        args = {a: "*" + dtype for a in fn.arg_names if a.endswith("_ptr")}
        args.update(M=rows, N=2304, K=768, eps="fp32", stride_xm=768, stride_rm=768, stride_wn=768, stride_nm=768,
                    stride_om=2304)
        kernel = compile_sm90(fn, args, dict(HAS_RESIDUAL=True, HAS_BIAS=True, ACTIVATION=1, PRECISION="tf32",
                                             EVEN_K=True, **cfg), options)
        assert is_pipelined(kernel), ("ln_linear not pipelined", dtype, rows)
    # Self-attention: one new token per step, and an 8-token prompt prefill; Dh = 64, 12 heads, 40 positions.
    fn = decode_self_attention._decode_self_attention_kernel
    args = {a: "*" + dtype for a in ("qkv_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr")}
    args.update(position_ptr="*i64", keep_ptr="*i1", history_ptr="*i64", qk_scale="fp32", L=1, H=12, Dh=64, D=768,
                stride_qr=2304, stride_ql=2304, stride_cr=12 * 40 * 64, stride_ch=40 * 64, stride_ct=64,
                stride_keep_r=40, stride_hist_r=40, stride_or=768, stride_ol=768)
    for length in (1, 8):
        cfg = decode_self_attention._config(length, 64)
        options = dict(num_warps=cfg.pop("num_warps"), num_stages=1)
        compile_sm90(fn, {**args, "L": length}, dict(HAS_HISTORY=True, **cfg), options)
    compile_sm90(decode_embed._decode_embed_kernel,
                 dict(ids_ptr="*i64", position_ptr="*i64", word_ptr="*" + dtype, pos_ptr="*" + dtype,
                      out_ptr="*" + dtype, L=1, D=768, stride_ids_r=1, stride_word=768, stride_pos=768),
                 dict(BLOCK_D=1024), dict(num_warps=4, num_stages=1))
compile_sm90(sampling._sample_sorted_kernel,
             dict(values_ptr="*fp32", indices_ptr="*i64", out_ptr="*i64", seed_ptr="*i64", W=66, top_k=50,
                  top_p="fp32", min_keep=1, step=5, stride_vr=66, stride_ir=66),
             dict(BLOCK_W=128), dict(num_warps=4, num_stages=1))
compile_sm90(sampling._gumbel_noise_kernel, dict(out_ptr="*fp32", seed_ptr="*i64", R=64, C=3 * 30524, step=5,
                                                  stream=1), dict(BLOCK=1024), dict(num_warps=4, num_stages=1))
"""


@each_triton
def test_kernels_compile_for_sm90(triton_site):
    pytest.importorskip("triton.backends.nvidia")
    run_offline(_COMPILE_SCRIPT, triton_site)
