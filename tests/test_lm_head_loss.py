"""Fused LM head + label-smoothed cross-entropy (``ops.lm_head_loss``) against the reference (logits materialised).

Backends: the chunked pure-torch function (``torch``, every device) and Liger-Kernel's fused linear cross-entropy
(``triton`` on CUDA; here run in Triton's interpreter, fp32 only, when liger-kernel is installed). Every case compares
the loss and the gradients of the states, the weight and the bias, with ignored targets, odd sizes and several chunk
sizes (one row per chunk, a ragged last chunk, everything in one chunk).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from blip_fast import ops
from blip_fast.chunked_lm_loss import chunked_lm_head_loss
from tests.tiny_models import assert_close

SHAPES = [(1, 2, 8, 7), (3, 9, 16, 257), (5, 13, 24, 1001)]  # batch, length, hidden, vocab


def make_inputs(batch, length, hidden, vocab, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, length, hidden, generator=generator, dtype=torch.float64)
    weight = 0.5 * torch.randn(vocab, hidden, generator=generator, dtype=torch.float64)
    bias = 0.5 * torch.randn(vocab, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[:, max(2, length - 2):] = -100  # padding at the end of every row (a 2-token row keeps its one target)
    labels[-1, 1 + length // 2:] = -100
    return [tensor.to(dtype).requires_grad_() for tensor in (states, weight, bias)] + [labels]


def loss_and_grads(fn, states, weight, bias, labels, smoothing):
    loss = fn(states, weight, bias, labels, smoothing)
    return [loss.detach(), *torch.autograd.grad(loss, (states, weight, bias))]


def reference(states, weight, bias, labels, smoothing):
    logits = F.linear(states, weight, bias).double()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           label_smoothing=smoothing)


def chunked(chunk_rows):
    def fn(states, weight, bias, labels, smoothing):
        rows, targets = ops._next_token_rows(states, labels)
        return chunked_lm_head_loss(rows, weight, bias, targets, smoothing, chunk_rows=chunk_rows)

    return fn


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk_rows", [1, 7, None])
def test_chunked_equals_reference_fp32(shape, smoothing, chunk_rows):
    inputs = make_inputs(*shape, dtype=torch.float32)
    expected = loss_and_grads(reference, *inputs, smoothing)
    got = loss_and_grads(chunked(chunk_rows), *inputs, smoothing)
    for name, value, oracle in zip(("loss", "d states", "d weight", "d bias"), got, expected):
        assert value.dtype == (torch.float32 if name != "loss" else value.dtype), name
        assert_close(value.double(), oracle, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_low_precision_error_within_twice_eager(dtype):
    """Our error against the fp64 oracle is at most twice that of the eager low-precision computation (logits in
    the low dtype, CE in fp32, as the reference backend does) plus a rounding floor."""
    exact = make_inputs(5, 13, 24, 1001)
    low = [tensor.detach().to(dtype).requires_grad_() for tensor in exact[:3]] + [exact[3]]
    oracle = loss_and_grads(reference, *exact, 0.1)
    eager = loss_and_grads(ops._lm_head_loss_reference, *low, 0.1)
    ours = loss_and_grads(chunked(7), *low, 0.1)
    floor = 4 * torch.finfo(dtype).eps
    for name, value, base, truth in zip(("loss", "d states", "d weight", "d bias"), ours, eager, oracle):
        ours_error = float((value.double() - truth).abs().max())
        eager_error = float((base.double() - truth).abs().max())
        assert ours_error <= 2 * eager_error + floor * float(truth.abs().max()), (name, ours_error, eager_error)


def test_all_ignored_is_nan_like_cross_entropy_and_no_grad_forward():
    states, weight, bias, labels = make_inputs(2, 5, 8, 11, dtype=torch.float32)
    ignored = torch.full_like(labels, -100)
    assert torch.isnan(chunked(None)(states, weight, bias, ignored, 0.1))
    assert torch.isnan(reference(states, weight, bias, ignored, 0.1))
    with torch.no_grad():
        value = chunked(3)(states, weight, bias, labels, 0.1)
    assert not value.requires_grad
    assert_close(value.double(), reference(states, weight, bias, labels, 0.1).detach(), rtol=1e-5)


def test_op_picks_the_chunked_backend_on_cpu_and_follows_autocast(monkeypatch):
    assert ops.resolve("lm_head_loss", torch.device("cpu")) is ops._lm_head_loss_chunked
    monkeypatch.setenv("BLIP_FAST_BACKEND", "reference")
    assert ops.resolve("lm_head_loss", torch.device("cpu")) is ops._lm_head_loss_reference
    monkeypatch.delenv("BLIP_FAST_BACKEND")
    states, weight, bias, labels = make_inputs(3, 9, 16, 257, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = loss_and_grads(ops.lm_head_loss, states, weight, bias, labels, 0.1)
        plain = loss_and_grads(lambda *args: ops.lm_loss(F.linear(*args[:3]), args[3], args[4]),
                               states, weight, bias, labels, 0.1)
    for value, oracle in zip(fused, plain):
        assert value.dtype == oracle.dtype
        assert_close(value.float(), oracle.float(), rtol=2e-2, atol=2e-3)


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel not installed")
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_liger_fused_linear_cross_entropy_equals_reference(smoothing):
    """Liger-Kernel's kernel (our CUDA backend) reproduces BLIP's LM loss: label smoothing, ignore index, bias, mean
    over valid tokens. Runs in Triton's interpreter on CPU (fp32; small shapes)."""
    inputs = make_inputs(3, 9, 16, 257, dtype=torch.float32)
    expected = loss_and_grads(reference, *inputs, smoothing)
    got = loss_and_grads(ops._lm_head_loss_liger, *inputs, smoothing)
    for value, oracle in zip(got, expected):
        assert_close(value.double(), oracle, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
def test_fused_backends_on_cuda_bf16():
    """On CUDA the op takes Liger's kernel when installed, else the chunked function; both within twice the eager
    bf16 error of the fp64 oracle."""
    exact = [tensor.detach().cuda().requires_grad_() if tensor.is_floating_point() else tensor.cuda()
             for tensor in make_inputs(16, 30, 256, 30524)]
    low = [tensor.detach().bfloat16().requires_grad_() for tensor in exact[:3]] + [exact[3]]
    oracle = loss_and_grads(reference, *exact, 0.1)
    eager = loss_and_grads(ops._lm_head_loss_reference, *low, 0.1)
    ours = loss_and_grads(ops.lm_head_loss, *low, 0.1)
    for value, base, truth in zip(ours, eager, oracle):
        assert float((value.double() - truth).abs().max()) <= 2 * float((base.double() - truth).abs().max()) + 1e-3
