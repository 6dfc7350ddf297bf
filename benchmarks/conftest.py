"""pytest-benchmark configuration for ``python -m pytest benchmarks --benchmark-only`` (tiny CPU variants).

The plain ``python -m pytest`` never collects this folder (``testpaths = ["tests"]``). Timings here are data, never
assertions; the full GPU comparison is ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import random

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def bench_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
