"""Measured backend choice: which fast kernel ``auto`` runs for an op, from timings taken on this GPU model.

``benchmarks/bench_decode_attention.py`` times every decode-attention engine per shape and writes JSON lines
(``device`` = the GPU's name, ``dtype``, ``batch`` = images, ``rows`` per image, ``keys``, ``head_dim``, ``engine``,
``median_ms``). Those rows, committed as ``blip_fast/tables/decode_attention.jsonl`` or pointed at by
``BLIP_FAST_BACKEND_TABLE``, make ``BLIP_FAST_BACKEND=auto`` pick the faster of the CUDA and Triton kernels at the
measured shape nearest to each call (same GPU, dtype, key count and head dim; nearest in images and rows on a log
scale). Without a table covering the GPU, ``auto`` keeps its fixed preference (CUDA, Triton, reference).
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import torch

TABLE_ENV = "BLIP_FAST_BACKEND_TABLE"
TABLE_DIR = Path(__file__).parent / "tables"
#: The ops a table covers, and the benchmark file that measures them.
MEASURED_OPS = {"decode_attention": "decode_attention", "decode_cross_attention": "decode_attention"}
#: The engines of a table row that are backends of these ops.
BACKENDS = ("cuda", "triton")


@functools.cache
def _rows(path: str) -> tuple[dict, ...]:
    if not os.path.isfile(path):
        return ()
    with open(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return tuple(row for row in rows if row.get("engine") in BACKENDS and isinstance(row.get("median_ms"), float))


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def _table_path(op: str) -> str:
    return os.environ.get(TABLE_ENV) or str(TABLE_DIR / f"{MEASURED_OPS[op]}.jsonl")


def fastest(op: str, device: torch.device, images: int, rows: int, keys: int, head_dim: int,
            dtype: torch.dtype) -> str | None:
    """The backend measured fastest for this call's nearest measured shape, or None without a covering table."""
    if op not in MEASURED_OPS or device.type != "cuda":
        return None
    name, dtype_name = _device_name(device), str(dtype).removeprefix("torch.")
    timings: dict[tuple[int, int], dict[str, float]] = {}
    for row in _rows(_table_path(op)):
        if (row.get("device"), row.get("dtype"), row.get("keys"), row.get("head_dim")) == (name, dtype_name, keys,
                                                                                            head_dim):
            timings.setdefault((row["batch"], row["rows"]), {})[row["engine"]] = row["median_ms"]
    measured = {shape: times for shape, times in timings.items() if len(times) == len(BACKENDS)}
    if not measured:
        return None
    nearest = min(measured, key=lambda shape: abs(math.log(shape[0] / images)) + abs(math.log(shape[1] / rows)))
    return min(measured[nearest], key=measured[nearest].get)
