"""The functional API the models call; the single place that picks an implementation.

Every op has a pure-torch *reference* — the oracle for tests and the CPU path. Fast backends (Triton kernels
from ``blip_fast.kernels``, CUDA ops from ``blip_fast._C``) register themselves per op as later issues add them;
``BLIP_FAST_BACKEND=reference|triton|cuda|auto`` forces a choice (``auto``: the fastest available for the device).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

BACKENDS = ("reference", "triton", "cuda")

# op name -> backend name -> (implementation, predicate telling whether it can run on a device)
_REGISTRY: dict[str, dict[str, tuple[Callable, Callable[[torch.device], bool]]]] = {}


def register(op: str, backend: str, available: Callable[[torch.device], bool] = lambda device: True):
    """Decorator: make ``fn`` the ``backend`` implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def decorate(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[backend] = (fn, available)
        return fn

    return decorate


def requested_backend() -> str:
    backend = os.environ.get("BLIP_FAST_BACKEND", "auto")
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"BLIP_FAST_BACKEND={backend!r}; expected one of {BACKENDS + ('auto',)}")
    return backend


def resolve(op: str, device: torch.device) -> Callable:
    """The implementation of ``op`` to use on ``device`` under the current ``BLIP_FAST_BACKEND``."""
    implementations = _REGISTRY[op]
    backend = requested_backend()
    if backend != "auto":
        if backend not in implementations:
            raise RuntimeError(f"BLIP_FAST_BACKEND={backend}: op {op!r} has no {backend} implementation")
        fn, available = implementations[backend]
        if not available(device):
            raise RuntimeError(f"BLIP_FAST_BACKEND={backend}: op {op!r} cannot run on {device}")
        return fn
    for name in ("cuda", "triton", "reference"):
        if name in implementations and implementations[name][1](device):
            return implementations[name][0]
    raise RuntimeError(f"no implementation of op {op!r} can run on {device}")


@register("attention", "reference")
def _attention_reference(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, dropout_p: float
) -> torch.Tensor:
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p)


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Softmax attention, scaled by ``head_dim ** -0.5``.

    query ``[B, H, Lq, Dh]``, key/value ``[B, H, Lk, Dh]``, mask additive and broadcastable to ``[B, H, Lq, Lk]``
    (0 keeps, a large negative value drops). Returns ``[B, H, Lq, Dh]``. The reference is torch SDPA, which
    dispatches to FlashAttention/cuDNN/memory-efficient kernels on CUDA.
    """
    return resolve("attention", query.device)(query, key, value, mask, dropout_p)


def additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean/0-1 ``keep`` mask -> additive float mask: 0 where kept, ``finfo(dtype).min`` where dropped.

    The large finite value (not -inf), as HuggingFace's eager BLIP uses, keeps fully masked rows finite.
    """
    zero = torch.zeros((), dtype=dtype, device=keep.device)
    return torch.where(keep.bool(), zero, torch.finfo(dtype).min)
