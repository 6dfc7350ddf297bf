"""Offline compiles of the Triton kernels for real GPUs (sm_90, sm_80), as a launch would compile them, on a CPU.

The interpreter accepts code the compiler rejects and sees no register or shared-memory limits, so each kernel test
also compiles its kernels at their real launch configuration. A real launch specialises every pointer (torch
allocates 16-byte aligned) and every integer argument divisible by 16 with ``tt.divisibility = 16``: that is what
lets Triton vectorise loads and software-pipeline them with ``cp.async``. A compile without those hints describes
a kernel no GPU runs (fp16 ITC loses its pipelining, say) and would let a regression through, so these helpers
always pass them. Compiles run in a fresh process (:func:`run_offline`): under ``TRITON_INTERPRET=1``,
``@triton.jit`` yields interpreter objects that cannot be compiled.

Each compile test runs under the venv's Triton and under every other one ``.ci/run`` installs into
``build/triton-<version>`` (``pip --target``): 3.6 is torch 2.11's and the GPU machine's, and its register
allocation differs (a tile that fits under 3.9 spilled under 3.6).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Shared memory per block: H100/H200 (sm_90) and A100 (sm_80).
SHARED_LIMIT = {90: 232448, 80: 166912}


#: Triton installs to compile under: the venv's (None) and each ``build/triton-<version>`` folder.
TRITON_SITES = [None, *sorted(path.parents[1] for path in ROOT.glob("build/triton-*/triton/__init__.py"))]
#: ``@each_triton``: parametrize a compile test over :data:`TRITON_SITES` (argument ``triton_site``).
each_triton = pytest.mark.parametrize("triton_site", TRITON_SITES,
                                      ids=lambda site: site.name if site else "triton-venv")


def run_offline(script: str, triton_site: Path | None = None, timeout: int = 600) -> None:
    """Run ``script`` (which imports this module's compile helpers) in a fresh interpreter-free process, under the
    Triton installed in ``triton_site`` (a ``pip --target`` folder; default: the venv's)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is what launches use today
    if triton_site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(triton_site), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        version = triton_site.name.removeprefix("triton-")
        script = (f"import triton\nassert triton.__version__.startswith({version + '.'!r}), triton.__file__\n"
                  + script)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                            env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def compile_like_launch(fn, arch: int, args: dict[str, Any], constexprs: dict[str, Any], options: dict[str, int]):
    """Compile ``fn`` for ``sm_<arch>`` as a launch with these arguments would be compiled.

    ``args`` maps each runtime argument to a Triton type for pointers (``"*fp16"``) and floats (``"fp32"``), or to
    its launch value for integers: the value picks ``i32``/``i64`` and, when divisible by 16 and the kernel does not
    opt out (``do_not_specialize``), the divisibility hint. Every pointer gets the hint.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    unspecialised = {names[i] if isinstance(i, int) else i for i in getattr(fn, "do_not_specialize", ())}
    signature, aligned = {}, []
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = args[name]
        if isinstance(value, str):
            signature[name] = value
            if value.startswith("*"):
                aligned.append(name)
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0 and name not in unspecialised:
                aligned.append(name)
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs={(names.index(name),): [["tt.divisibility", 16]] for name in aligned})
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    assert kernel.metadata.shared <= SHARED_LIMIT[arch], (fn.fn.__name__, arch, kernel.metadata.shared)
    return kernel


def resource_usage(kernel) -> dict[str, int]:
    """Registers per thread, stack frame (spills) and shared memory of a compiled kernel, from its cubin
    (``cuobjdump --dump-resource-usage``, the binary Triton ships)."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        report = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", cubin.name],
                                capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", report)
    assert found, report
    return dict(zip(("registers", "stack", "shared", "local"), map(int, found.groups())))


def is_pipelined(kernel) -> bool:
    """Whether the kernel's global loads are software-pipelined through shared memory (``cp.async``)."""
    return "async_copy_global_to_local" in kernel.asm["ttgir"]
