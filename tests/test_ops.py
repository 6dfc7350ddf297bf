"""blip_fast.ops: backend selection and the reference attention against an explicit softmax formula."""

import math

import pytest
import torch

from blip_fast import ops
from tests.tiny_models import assert_close


@pytest.mark.parametrize("batch, heads, queries, keys, head_dim", [(1, 1, 1, 1, 8), (2, 3, 7, 33, 16), (3, 2, 5, 257, 4)])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_equals_softmax_formula(batch, heads, queries, keys, head_dim, masked):
    query, key, value = (torch.randn(batch, heads, n, head_dim) for n in (queries, keys, keys))
    keep = torch.rand(batch, 1, 1, keys) > 0.3
    keep[..., 0] = True  # at least one visible key per row
    mask = ops.additive_mask(keep, torch.float32) if masked else None
    scores = query @ key.transpose(-1, -2) / math.sqrt(head_dim)
    if masked:
        scores = scores.masked_fill(~keep, -float("inf"))
    assert_close(ops.attention(query, key, value, mask), scores.softmax(-1) @ value)


def test_additive_mask_is_finite_and_dtype_aware():
    mask = ops.additive_mask(torch.tensor([[1, 0, 1]]), torch.float16)
    assert mask.dtype == torch.float16 and torch.isfinite(mask).all()
    assert mask.tolist() == [[0.0, torch.finfo(torch.float16).min, 0.0]]


def test_forced_backend_without_an_implementation_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("BLIP_FAST_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="no cuda implementation"):
        ops.attention(*(torch.randn(1, 1, 2, 4) for _ in range(3)))
    monkeypatch.setenv("BLIP_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="BLIP_FAST_BACKEND"):
        ops.attention(*(torch.randn(1, 1, 2, 4) for _ in range(3)))


def test_auto_prefers_an_available_fast_backend(monkeypatch):
    monkeypatch.setitem(ops._REGISTRY, "toy", {})
    ops.register("toy", "reference")(lambda: "reference")
    ops.register("toy", "triton", available=lambda device: device.type == "cuda")(lambda: "triton")
    assert ops.resolve("toy", torch.device("cpu"))() == "reference"
    assert ops.resolve("toy", torch.device("cuda"))() == "triton"
    monkeypatch.setenv("BLIP_FAST_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="cannot run on cpu"):
        ops.resolve("toy", torch.device("cpu"))
