"""The CUDA decode attention (csrc/decode_attention.cu, ``torch.ops.blip_fast``) against its oracle, SDPA.

CPU (CI): every csrc/ source is compiled for sm_80 and sm_90 with nvcc (``csrc/nvcc_check.sh``, the same check
.ci/run does), and the backend registration is checked. GPU (``gpu`` marker): the op against SDPA on fresh random
inputs at odd sizes (keys 1..600, rows per image 1..5, head dims 16..128), fp32/fp16/bf16, with and without masks,
the output poisoned with NaN before the kernel writes it (through ``decode_attention_out``); key splits both by the
launch heuristic and forced.

Tolerances (DESIGN.md §4): fp32 — within 1e-5 of the output scale against an fp64 SDPA (the kernel uses plain fp32
FMAs, no TF32); fp16/bf16 — at most twice the error of SDPA fed the same low-precision inputs, against fp32.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blip_fast import ops
from tests.tiny_models import additive, assert_close, decode_attention_inputs, sdpa

ROOT = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------ helpers
make_inputs = functools.partial(decode_attention_inputs, device="cuda")


def cuda_op(query, key, value, mask, splits=0):
    """The op writing into a NaN-poisoned output, so any element it forgets to write fails the comparison."""
    out = torch.full(query.shape, float("nan"), dtype=query.dtype, device=query.device)
    torch.ops.blip_fast.decode_attention_out(query, key, value, mask, query.shape[-1] ** -0.5, splits, out)
    return out


def check(query, key, value, keep, dtype, splits=0):
    """Run the op in ``dtype`` and compare with SDPA under the dtype's tolerance (module docstring)."""
    rounded = [t.to(dtype) for t in (query, key, value)]
    actual = cuda_op(*rounded, additive(keep, dtype), splits)
    assert actual.dtype == dtype
    if dtype == torch.float32:
        expected = sdpa(query, key, value, additive(keep, torch.float64))
        assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
        return
    exact = sdpa(*(t.float() for t in rounded), additive(keep, torch.float32))
    low = sdpa(*rounded, additive(keep, dtype))
    reference_error = (low.double() - exact.double()).abs().max().item()
    floor = 0.25 * torch.finfo(dtype).eps * exact.abs().max().item()  # only matters if SDPA happens to be exact
    assert_close(actual, exact, rtol=0, atol=2 * reference_error + floor)


@pytest.fixture
def extension():
    if not ops.cuda_extension_loaded():
        pytest.skip("blip_fast._C is not built (pip install --no-build-isolation -e . with a CUDA torch)")


# ------------------------------------------------------------------------------------------------ CPU: build + wiring
@pytest.mark.slow
def test_sources_compile_for_sm80_and_sm90(tmp_path):
    """nvcc, against the installed torch's headers, for both target architectures (A100, H100/H200)."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    result = subprocess.run(["bash", str(ROOT / "csrc" / "nvcc_check.sh"), str(tmp_path), "80", "90"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    sources = sorted(ROOT.glob("csrc/*.cu")) + sorted(ROOT.glob("csrc/*.cpp"))
    assert sources and all((tmp_path / f"{source.name}.o").stat().st_size > 0 for source in sources)


def test_cuda_backend_registered_and_preferred_under_auto(monkeypatch):
    implementation, available = ops._REGISTRY["decode_attention"]["cuda"]
    assert not available(torch.device("cpu"))
    monkeypatch.setenv("BLIP_FAST_BACKEND", "auto")
    monkeypatch.setattr(ops, "cuda_extension_loaded", lambda: True)
    assert ops.resolve("decode_attention", torch.device("cuda")) is implementation


def test_missing_extension_falls_back_quietly(monkeypatch):
    # As if blip_fast._C were not built (or built for another torch): its import fails, whatever this machine has.
    monkeypatch.setitem(sys.modules, "blip_fast._C", None)
    assert ops.cuda_extension_loaded.__wrapped__() is False
    assert ops.resolve("decode_attention", torch.device("cpu")) is ops._decode_attention_reference


# ------------------------------------------------------------------------------------------------ GPU: numerics
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("keys", [1, 7, 33, 257, 577, 600])
def test_matches_reference(extension, keys, rows, head_dim, masked, dtype):
    """3 images x 2 heads: few blocks, so the launch heuristic splits the keys whenever there are several tiles."""
    check(*make_inputs(3, 2, rows, keys, head_dim, masked), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("images,heads,rows,keys,head_dim", [
    (256, 12, 1, 577, 64), (64, 12, 3, 577, 64),  # BLIP-base decode: one split
    (1, 12, 3, 577, 64),  # batch 1: split keys
    (4, 3, 40, 257, 64),  # a prompt prefill (beams x tokens): more rows than one block holds
    (2, 3, 5, 600, 16), (2, 3, 5, 33, 20), (2, 3, 3, 577, 96), (2, 3, 3, 577, 128),  # padded head dims, Dh=20 scalar
])
def test_decode_shapes_and_head_dims(extension, images, heads, rows, keys, head_dim, dtype):
    check(*make_inputs(images, heads, rows, keys, head_dim, masked=True), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 2, 3, 10])
@pytest.mark.parametrize("keys", [577, 600])
def test_forced_key_splits(extension, keys, splits):
    check(*make_inputs(4, 3, 3, keys, 64, masked=True), torch.float32, splits=splits)


@pytest.mark.gpu
def test_split_with_every_key_dropped_merges_to_zero_weight(extension):
    query, key, value, _ = make_inputs(2, 3, 5, 600, 64)
    keep = torch.zeros(2, 1, 1, 600, dtype=torch.bool, device="cuda")
    keep[0, ..., 300:] = True  # image 0: the first splits are entirely dropped
    keep[1, ..., 7] = True  # image 1: one visible key, in the first split only
    for dtype in DTYPES:
        check(query, key, value, keep, dtype, splits=3)


@pytest.mark.gpu
def test_mask_forms_strided_cache_and_determinism(extension):
    """Bool, [C, 1, 1, N], [1, 1, 1, N] and [N] masks agree; K/V viewed from a [C, N, H, Dh] cache (strided, no
    copy) and a query whose last dim is strided give the same result; repeated calls are bitwise identical."""
    query, _, _, keep = make_inputs(3, 3, 3, 257, 64, masked=True)
    keep[1:] = keep[0]
    key, value = (torch.randn(3, 257, 3, 64, device="cuda", dtype=torch.float64).transpose(1, 2) for _ in range(2))
    expected = sdpa(query, key, value, additive(keep, torch.float64))
    query32, key32, value32 = (t.float() for t in (query, key, value))
    full = additive(keep, torch.float32)
    scale = 64**-0.5
    strided_query = query32.transpose(-1, -2).contiguous().transpose(-1, -2)  # stride(-1) != 1: copied by the op
    for q, mask in ((query32, keep), (query32, full), (query32, full[:1]), (strided_query, full[0, 0, 0])):
        actual = torch.ops.blip_fast.decode_attention(q, key32, value32, mask, scale)
        assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    first = torch.ops.blip_fast.decode_attention(query32, key32, value32, full, scale)
    assert torch.equal(first, torch.ops.blip_fast.decode_attention(query32, key32, value32, full, scale))


@pytest.mark.gpu
def test_rejects_inconsistent_inputs(extension):
    query, key, value, _ = make_inputs(2, 3, 3, 17, 32)
    scale = 32**-0.5
    with pytest.raises(RuntimeError, match="do not match"):
        torch.ops.blip_fast.decode_attention(query.float(), key[:1].float(), value[:1].float(), None, scale)
    with pytest.raises(RuntimeError, match="fp16/bf16/fp32"):
        torch.ops.blip_fast.decode_attention(query.half(), key.float(), value.float(), None, scale)
    with pytest.raises(RuntimeError, match="head dim"):
        wide = torch.randn(1, 1, 2, 160, device="cuda")
        torch.ops.blip_fast.decode_attention(wide, wide, wide, None, 160**-0.5)


# ------------------------------------------------------------------------------------------------ GPU: dispatch
@pytest.mark.gpu
def test_ops_dispatch_to_cuda(extension, monkeypatch):
    monkeypatch.setenv("BLIP_FAST_BACKEND", "cuda")
    assert ops.resolve("decode_attention", torch.device("cuda")) is ops._decode_attention_cuda
    query, key, value, keep = make_inputs(2, 12, 3, 577, 64, masked=True)
    expected = sdpa(query, key, value, additive(keep, torch.float64))
    actual = ops.decode_attention(*(t.float() for t in (query, key, value)), additive(keep, torch.float32))
    assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    assert torch.equal(actual, torch.ops.blip_fast.decode_attention(
        *(t.float() for t in (query, key, value)), additive(keep, torch.float32), 64**-0.5))


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 3])
def test_strided_output_layout(extension, splits):
    """The decode step's cross-attention writes straight into the ``[C, rows, H, Dh]`` buffer its output projection
    reads (``out`` viewed as ``[C, H, rows, Dh]``), single-split and through the merge kernel."""
    query, key, value, keep = make_inputs(3, 12, 5, 577, 64, masked=True)
    expected = sdpa(query, key, value, additive(keep, torch.float64))
    buffer = torch.full((3, 5, 12, 64), float("nan"), device="cuda")
    out = buffer.transpose(1, 2)
    torch.ops.blip_fast.decode_attention_out(*(t.float() for t in (query, key, value)), additive(keep, torch.float32),
                                             64**-0.5, splits, out)
    assert_close(out, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
