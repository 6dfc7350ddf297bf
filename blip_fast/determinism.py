"""Deterministic torch for reproducible runs: the same seed, ranks and thread count give the same numbers.

On CPU torch's kernels are deterministic for a fixed thread count already; the switch matters on CUDA, where it
picks deterministic (often slower) kernels and needs cuBLAS's fixed workspace. An op without a deterministic
implementation warns and runs rather than stopping a long job.
"""

from __future__ import annotations

import os

import torch

#: cuBLAS's setting for deterministic results (read at its first use, so set before any CUDA work).
CUBLAS_WORKSPACE = ":4096:8"


def use_deterministic_algorithms() -> None:
    """Switch this process to deterministic algorithms (call before any CUDA work)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)
