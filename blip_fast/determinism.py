"""Deterministic torch for reproducible runs: the same seed, ranks and thread count give the same numbers.

On CPU torch's kernels are deterministic for a fixed thread count already; the switch matters on CUDA, where it
picks deterministic (often slower) kernels and needs cuBLAS's fixed workspace. An op without a deterministic
implementation warns and runs rather than stopping a long job.

Across CPUs, the same run is not the same numbers: ATen's vectorized kernels, MKL's GEMMs and oneDNN's convolutions
each pick code for the widest instruction set the CPU has, and AVX-512 code sums in another order than AVX2 code
(the demo's weights differed with each library's choice alone). :func:`portable_cpu_environment` caps all three at
AVX2, which nearly every x86-64 CPU since 2013 has, so the same run gives the same numbers on Intel CPUs with AVX2.
Not across vendors: MKL honours its reproducibility branches on Intel CPUs only (on an AMD EPYC, ``MKL_VERBOSE``
reports ``CNR:AUTO`` under ``MKL_CBWR=AVX2``, and the demo's numbers differed from an Intel Xeon's), so the vendor is
part of :func:`cpu_numerics`.
"""

from __future__ import annotations

import os
import platform

import torch

#: cuBLAS's setting for deterministic results (read at its first use, so set before any CUDA work).
CUBLAS_WORKSPACE = ":4096:8"


def use_deterministic_algorithms() -> None:
    """Switch this process to deterministic algorithms (call before any CUDA work)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)


#: Each CPU library's instruction-set cap (read at its first use: set in a child's environment, or before any
#: computation). MKL's is its Conditional Numerical Reproducibility mode, which also fixes its choice of kernels
#: between CPU models of one instruction set.
PORTABLE_CPU_ENVIRONMENT = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def portable_cpu_environment(machine: str | None = None) -> dict[str, str]:
    """The variables that make CPU numerics the same on every x86-64 CPU with AVX2 of one vendor (none on other
    architectures, whose kernels differ anyway)."""
    machine = (machine or platform.machine()).lower()
    return dict(PORTABLE_CPU_ENVIRONMENT) if machine in ("x86_64", "amd64") else {}


def cpuinfo(field: str) -> str | None:
    """The value of the first ``field`` line of ``/proc/cpuinfo`` (its first CPU's), None where it does not say."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return next((line.split(":", 1)[1].strip() for line in handle if line.startswith(field)), None)
    except OSError:
        return None


def cpu_vendor() -> str | None:
    """The CPU's vendor id (``GenuineIntel``, ``AuthenticAMD``), None where ``/proc/cpuinfo`` does not say."""
    return cpuinfo("vendor_id")


def cpu_numerics() -> dict[str, str | None]:
    """What decides this process's CPU numerics beside the thread count: ATen's instruction set in use, the MKL and
    oneDNN caps it runs under (None: uncapped) and the CPU vendor (MKL's cap holds on Intel CPUs only). Recorded
    beside results that must reproduce."""
    return {"aten_capability": torch.backends.cpu.get_cpu_capability(),
            **{name.lower(): os.environ.get(name) for name in ("MKL_CBWR", "ONEDNN_MAX_CPU_ISA")},
            "cpu_vendor": cpu_vendor()}
