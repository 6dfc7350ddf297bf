"""The Triton decode attention (kernels/decode_attention.py) against its oracle, SDPA (``ops.decode_attention``'s
reference).

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), in fp32 and fp16 only;
bf16 and dispatch are checked by the ``gpu`` tests. Every case uses fresh random inputs at odd sizes (keys 1..600,
rows per image 1..5 times 1-2 query steps, heads 1/3/12, Dh 16/64), and kernel outputs (including the split
partials) poisoned with NaN before the kernels write them.

Tolerances (DESIGN.md §4): fp32 — within 1e-5 of the output scale against an fp64 SDPA; fp16 — at most twice the
error of SDPA fed the same fp16 inputs, against the fp32 reference (measured: ours is 0.9-1.0x SDPA's).
The kernels are also compiled (not run) for sm_90 (fp16, bf16) and sm_80 (fp32), which the interpreter cannot stand
in for.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest
import torch

from blip_fast import ops
from tests.tiny_models import additive, assert_close, decode_attention_inputs, poison_kernel_outputs, sdpa
from tests.triton_compile import each_triton, run_offline

kernel = pytest.importorskip("blip_fast.kernels.decode_attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    poison_kernel_outputs(monkeypatch, kernel)


# ------------------------------------------------------------------------------------------------ helpers
make_inputs = functools.partial(decode_attention_inputs, device=DEVICE)


def check_fp32(query, key, value, keep, **kwargs):
    expected = sdpa(query, key, value, additive(keep, torch.float64))
    cast = [t.float() for t in (query, key, value)]
    actual = kernel.decode_attention(*cast, additive(keep, torch.float32), **kwargs)
    assert actual.dtype == torch.float32
    assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def check_low_precision(query, key, value, keep, dtype, **kwargs):
    """Our error vs the fp32 reference <= 2x SDPA's own error on the same low-precision inputs. The small floor (a
    quarter of a rounding step at the output's scale) only matters if SDPA happens to be exact."""
    rounded = [t.to(dtype) for t in (query, key, value)]
    exact = sdpa(*(t.float() for t in rounded), additive(keep, torch.float32))
    low = sdpa(*rounded, additive(keep, dtype))
    actual = kernel.decode_attention(*rounded, additive(keep, dtype), **kwargs)
    assert actual.dtype == dtype
    reference_error = (low.double() - exact.double()).abs().max().item()
    floor = 0.25 * torch.finfo(dtype).eps * exact.abs().max().item()
    assert_close(actual, exact, rtol=0, atol=2 * reference_error + floor)


# ------------------------------------------------------------------------------------------------ fp32 cases
# (images, heads, rows_per_image, steps, keys, head_dim): a representative subset of the full grid, every key count
# and rows-per-image value appearing with both head dims; 577 is BLIP's 384 px context, 600 a non-multiple above it.
SHAPES = [
    (1, 12, 1, 1, 577, 64), (1, 12, 3, 1, 577, 64), (4, 3, 5, 2, 577, 64), (4, 1, 3, 2, 600, 16),
    (1, 3, 5, 1, 600, 64), (4, 3, 1, 2, 17, 16), (1, 12, 5, 2, 17, 64), (4, 3, 3, 1, 1, 16), (1, 1, 1, 1, 1, 64),
    (4, 3, 3, 1, 257, 24),  # Dh below its block (24 of 32): the masked-Dh path
]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("images,heads,rows_per_image,steps,keys,head_dim", SHAPES)
def test_matches_reference(images, heads, rows_per_image, steps, keys, head_dim, masked):
    check_fp32(*make_inputs(images, heads, rows_per_image * steps, keys, head_dim, masked))


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("keys", [577, 600])
def test_key_splits_merge(keys, splits, masked):
    """Forced key splits: partial (max, sum, acc) per split, merged by the second kernel."""
    check_fp32(*make_inputs(4, 3, 3, keys, 64, masked), splits=splits)


def test_split_with_every_key_dropped_merges_to_zero_weight():
    """A split whose keys are all masked (finfo.min, clamped in the kernel) must not leak into the merge."""
    query, key, value, _ = make_inputs(2, 3, 5, 600, 64)
    keep = torch.zeros(2, 1, 1, 600, dtype=torch.bool, device=DEVICE)
    keep[0, ..., 300:] = True  # image 0: the first split (keys 0..255) is entirely dropped
    keep[1, ..., 7] = True  # image 1: one visible key, in the first split only
    check_fp32(query, key, value, keep, splits=3)


def test_mask_broadcast_forms_and_boolean():
    """[C, 1, 1, N], [1, 1, 1, N], [N] additive masks and a boolean keep mask all mean the same thing."""
    query, key, value, keep = make_inputs(3, 3, 3, 33, 16, masked=True)
    keep[1:] = keep[0]  # one pattern for all images, so the [1, 1, 1, N] and [N] forms are comparable
    expected = sdpa(query, key, value, additive(keep, torch.float64))
    cast = [t.float() for t in (query, key, value)]
    full = additive(keep, torch.float32)
    for mask in (full, full[:1], full[0, 0, 0], keep):
        assert_close(kernel.decode_attention(*cast, mask), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_strided_cache_and_many_rows():
    """K/V viewed from a [C, N, H, Dh] cache (strided heads, no copy) and more query rows than one row block (a
    prompt prefill: 3 beams x 30 tokens)."""
    query, _, _, keep = make_inputs(2, 3, 90, 257, 64, masked=True)
    key, value = (torch.randn(2, 257, 3, 64, device=DEVICE, dtype=torch.float64).transpose(1, 2) for _ in range(2))
    check_fp32(query, key, value, keep)


def test_rejects_inconsistent_inputs():
    query, key, value, _ = make_inputs(2, 3, 3, 17, 16)
    with pytest.raises(ValueError, match="do not match"):
        kernel.decode_attention(query.float(), key[:1].float(), value[:1].float())
    with pytest.raises(ValueError, match="fp16/bf16/fp32"):
        kernel.decode_attention(query.half(), key.float(), value.float())


# ------------------------------------------------------------------------------------------------ fp16
@pytest.mark.parametrize("images,heads,rows,keys,head_dim,masked,splits", [
    (1, 12, 3, 577, 64, True, None), (4, 3, 10, 600, 64, True, 3), (4, 3, 5, 17, 16, False, None),
    (1, 3, 1, 600, 64, False, 2),
])
def test_fp16_within_twice_reference_error(images, heads, rows, keys, head_dim, masked, splits):
    check_low_precision(*make_inputs(images, heads, rows, keys, head_dim, masked), torch.float16, splits=splits)


# ------------------------------------------------------------------------------------------------ wiring
def test_registered_as_triton_backend_for_cuda_only():
    implementation, available = ops._REGISTRY["decode_attention"]["triton"]
    assert available(torch.device("cuda")) and not available(torch.device("cpu"))


def test_ops_reference_is_sdpa():
    query, key, value, keep = (t.float() if t is not None else t for t in make_inputs(2, 3, 3, 33, 16, True))
    mask = additive(keep, torch.float32)
    assert torch.equal(ops._decode_attention_reference(query, key, value, mask), sdpa(query, key, value, mask))
    if DEVICE == "cpu":
        assert_close(ops.decode_attention(query, key, value, mask), sdpa(query, key, value, mask), rtol=0, atol=0.0)


def test_importing_blip_fast_does_not_import_triton():
    code = "import sys, blip_fast, blip_fast.ops; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# Compile (not run) both kernels for real GPUs at the decode shapes (batch 256 beams-3: one split; batch 1: split
# keys): the interpreter accepts code the compiler rejects (non-constexpr globals, dot shapes) and cannot see
# shared-memory overflows. A fresh process, because under TRITON_INTERPRET=1 @triton.jit yields interpreter objects.
_COMPILE_SCRIPT = """
import os
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from blip_fast.kernels import decode_attention as da

names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
cases = ((90, torch.float16, 232448), (90, torch.bfloat16, 232448), (80, torch.float32, 166912))
for arch, dtype, shared_limit in cases:
    name = names[dtype]
    for images, head_dim in ((256, 64), (1, 64), (1, 128)):
        cfg = da._config(images, 12, 3, 577, head_dim, dtype, torch.device("cuda"), None, sm_count=132)
        assert (cfg["splits"] > 1) == (images == 1), cfg
        blocks = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D")}
        options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        for fn, constexprs in (
            (da._decode_attention_kernel, dict(HAS_MASK=True, WRITE_PARTIAL=cfg["splits"] > 1, EVEN_D=True,
                                               PRECISION=da._precision(dtype), **blocks)),
            (da._merge_splits_kernel, dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"])),
        ):
            signature = {}
            for arg in fn.arg_names:
                if arg in constexprs:
                    signature[arg] = "constexpr"
                elif arg in ("q_ptr", "k_ptr", "v_ptr", "mask_ptr", "out_ptr"):
                    signature[arg] = "*" + name
                elif arg == "qk_scale":
                    signature[arg] = "fp32"
                else:
                    signature[arg] = "*fp32" if arg.endswith("_ptr") else "i32"
            # What a real launch specialises on: 16-divisible pointers and strides (the mask's key stride is 1).
            aligned = [a for a in fn.arg_names if a not in constexprs and a != "stride_mask_n"
                       and (a.endswith("_ptr") or a.startswith("stride"))]
            source = ASTSource(fn=fn, signature=signature,
                               constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                               attrs={(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned})
            kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
            assert kernel.metadata.shared <= shared_limit, (arch, name, fn.fn.__name__, kernel.metadata.shared)
            if fn is da._decode_attention_kernel:
                # The K/V stream must be software-pipelined (async copies); an unaligned or per-element-masked
                # load along Dh silently turns it into scalar loads.
                assert "async_copy_global_to_local" in kernel.asm["ttgir"], (arch, name, images, head_dim)
"""


@each_triton
def test_kernels_compile_for_sm90_and_sm80(triton_site):
    pytest.importorskip("triton.backends.nvidia")
    run_offline(_COMPILE_SCRIPT, triton_site, timeout=300)


# ------------------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("images,heads,rows,keys,head_dim,masked", [
    (1, 12, 3, 577, 64, True), (256, 12, 1, 577, 64, True), (64, 12, 3, 577, 64, False), (8, 3, 10, 600, 16, True),
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_on_gpu(images, heads, rows, keys, head_dim, masked, dtype):
    """Real bf16 (wrong in the interpreter) and fp16 at decode shapes, with the GPU's own split heuristic."""
    check_low_precision(*make_inputs(images, heads, rows, keys, head_dim, masked), dtype)


@pytest.mark.gpu
def test_ops_dispatch_to_triton(monkeypatch):
    monkeypatch.setenv("BLIP_FAST_BACKEND", "triton")
    assert ops.resolve("decode_attention", torch.device("cuda")) is ops._REGISTRY["decode_attention"]["triton"][0]
    query, key, value, keep = make_inputs(2, 12, 3, 577, 64, masked=True)
    expected = sdpa(query, key, value, additive(keep, torch.float64))
    cast = [t.float() for t in (query, key, value)]
    # fp32 on GPU: the kernel uses exact (non-TF32) products for fp32, so the fp32 tolerance holds.
    actual = ops.decode_attention(*cast, additive(keep, torch.float32))
    assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


# ------------------------------------------------------------------------------------------------ launch choice
@pytest.mark.parametrize("images", [1, 2, 8, 64, 256])
def test_gpu_launch_fills_waves_and_splits_only_small_batches(images):
    """The cost model: at batch 1 the keys split until the 12 (image, head) pairs fill most of a wave of 132 SMs;
    from batch 16 on a single split already fills whole waves; the last key tile of 577 pads little."""
    cfg = kernel._config(images, 12, 3, 577, 64, torch.float16, torch.device("cuda"), None, sm_count=132)
    programs = images * 12 * cfg["row_blocks"] * cfg["splits"]
    padded = -(-577 // cfg["BLOCK_N"]) * cfg["BLOCK_N"] - 577
    if images == 1:
        assert cfg["splits"] > 1 and programs >= 132 and padded < 64, cfg
    if images >= 16:
        assert cfg["splits"] == 1, cfg
    assert cfg["splits"] * cfg["tiles_per_split"] * cfg["BLOCK_N"] >= 577


def test_auto_backend_follows_a_measured_table(tmp_path, monkeypatch):
    """With a table of timings for this GPU (benchmarks/bench_decode_attention.py rows), ``auto`` runs the backend
    measured fastest at the nearest shape; without one, the fixed preference."""
    from blip_fast import backend_table

    rows = [dict(device="Fake H200", dtype="float16", batch=batch, rows=3, keys=577, head_dim=64, engine=engine,
                 median_ms=ms) for batch, engine, ms in
            [(1, "cuda", 0.01), (1, "triton", 0.02), (256, "cuda", 0.9), (256, "triton", 0.8), (256, "sdpa", 0.5)]]
    table = tmp_path / "decode_attention.jsonl"
    table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    monkeypatch.setenv(backend_table.TABLE_ENV, str(table))
    monkeypatch.setattr(backend_table, "_device_name", lambda device: "Fake H200")
    for backend in ("cuda", "triton"):
        implementation = ops._REGISTRY["decode_attention"][backend][0]
        monkeypatch.setitem(ops._REGISTRY["decode_attention"], backend, (implementation, lambda device: True))
    cuda = torch.device("cuda")
    shape = lambda images: dict(images=images, rows=3, keys=577, head_dim=64, dtype=torch.float16)  # noqa: E731
    registry = ops._REGISTRY["decode_attention"]
    assert ops.resolve("decode_attention", cuda, shape(2)) is registry["cuda"][0]
    assert ops.resolve("decode_attention", cuda, shape(200)) is registry["triton"][0]
    assert ops.resolve("decode_attention", cuda, {**shape(200), "dtype": torch.bfloat16}) is registry["cuda"][0]
    assert ops.resolve("decode_attention", cuda) is registry["cuda"][0]
