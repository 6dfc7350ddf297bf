"""blip_fast.determinism: the switch the demo and ``--deterministic`` training use, and the CPU caps that make its
numbers the same on every x86-64 CPU with AVX2."""

import json
import os
import subprocess
import sys

import pytest
import torch

from blip_fast.determinism import (
    CUBLAS_WORKSPACE,
    PORTABLE_CPU_ENVIRONMENT,
    cpu_vendor,
    cpuinfo,
    portable_cpu_environment,
    use_deterministic_algorithms,
)


def test_switches_torch_to_deterministic_algorithms_with_cublas_workspace(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        use_deterministic_algorithms()
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()  # a long job warns, never stops, on such an op
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


# One computation of each library the tiny BLIP uses on the CPU: oneDNN (the patch embedding's convolution), MKL (a
# linear layer's GEMM) and ATen's vectorized kernels (sum, softmax, layer norm); prints the numerics in use and a
# digest of each result.
_PROBE = """
import hashlib, json, torch
from blip_fast.determinism import cpu_numerics
torch.manual_seed(0)
torch.set_num_threads(1)
with torch.no_grad():
    rows = torch.randn(1024, 1000)
    results = {
        "onednn": torch.nn.Conv2d(3, 128, 8, 8)(torch.randn(64, 3, 32, 32)),
        "mkl": torch.nn.Linear(128, 512)(torch.randn(1024, 128)),
        "aten": torch.stack([rows.sum(1), rows.softmax(1)[:, 0], torch.nn.functional.layer_norm(rows, (1000,))[:, 0]]),
    }
digests = {name: hashlib.sha256(value.contiguous().numpy().tobytes()).hexdigest() for name, value in results.items()}
print(json.dumps({"numerics": cpu_numerics(), "digests": digests}))
"""


def _probe(environment: dict[str, str]) -> dict:
    names = (*PORTABLE_CPU_ENVIRONMENT, "MKL_ENABLE_INSTRUCTIONS")
    clean = {name: value for name, value in os.environ.items() if name not in names}
    output = subprocess.run([sys.executable, "-c", _PROBE], env={**clean, **environment}, capture_output=True,
                            text=True, check=True).stdout
    return json.loads(output.splitlines()[-1])


def _cpu_flags() -> set[str]:
    return set((cpuinfo("flags") or "").split())


@pytest.mark.skipif("avx2" not in _cpu_flags(), reason="needs an x86-64 CPU with AVX2 (Linux)")
def test_portable_numerics_do_not_depend_on_the_instruction_sets_the_cpu_has():
    """Under the portable caps, a CPU whose MKL may use no more than AVX2 (emulated: MKL_ENABLE_INSTRUCTIONS) gives
    the same bits as this one; on an AVX-512 CPU each library's result without its cap differs (what the caps are
    for) -- MKL's only on Intel's: on other vendors' CPUs it runs its AVX2 code uncapped too (measured on an AMD EPYC
    with AVX-512)."""
    portable = _probe(portable_cpu_environment())
    assert portable["numerics"] == {"aten_capability": "AVX2", "mkl_cbwr": "AVX2", "onednn_max_cpu_isa": "AVX2",
                                    "cpu_vendor": cpu_vendor()}
    assert _probe({**portable_cpu_environment(), "MKL_ENABLE_INSTRUCTIONS": "AVX2"}) == portable
    if "avx512f" in _cpu_flags():
        native = _probe({})
        assert native["numerics"]["aten_capability"].startswith("AVX512")
        uses_avx512 = {"onednn", "aten", *(["mkl"] if cpu_vendor() == "GenuineIntel" else [])}
        assert {name for name in portable["digests"] if native["digests"][name] != portable["digests"][name]} == (
            uses_avx512)


@pytest.mark.parametrize("machine, capped", [("x86_64", True), ("AMD64", True), ("aarch64", False), ("arm64", False)])
def test_the_portable_caps_apply_to_x86_64_only(machine, capped):
    assert portable_cpu_environment(machine) == (PORTABLE_CPU_ENVIRONMENT if capped else {})
