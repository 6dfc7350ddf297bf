"""What the GPU check ran on, and what it built: the environment section of ``gpu_check.sh``'s summary.

``--stage machine`` (before the build): the card (nvidia-smi), versions of Python, torch, CUDA, Triton,
transformers and the optional packages, and where the CUDA toolkit is (``csrc/cuda_env.py``). ``--stage build``
(after it): which ``blip_fast`` is imported, whether ``blip_fast._C`` loads (and why not), and which backend each
``blip_fast.ops`` op resolves to on the device. Each stage merges into ``<out>/environment.json`` and rewrites
``<out>/environment.md``.

    python3 -m benchmarks.gpu_env --stage machine --out OUT
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Distributions whose versions are reported (read from their metadata: importing deepspeed alone takes seconds).
PACKAGES = ("triton", "transformers", "numpy", "tokenizers", "safetensors", "pytest", "pytest-xdist", "deepspeed",
            "webdataset", "liger-kernel", "flash-attn", "xformers", "timm")


def _version(distribution: str) -> str:
    if distribution in sys.modules and sys.modules[distribution] is None:
        return "hidden (gpu_check's dry run: the GPU machine lacks it)"
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _nvidia_smi() -> str:
    query = "name,driver_version,memory.total,clocks.max.sm,clocks.sm,power.limit"
    try:
        result = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        return f"unavailable ({type(error).__name__})"
    return result.stdout.strip() or result.stderr.strip() or f"exit {result.returncode}"


def machine() -> dict[str, Any]:
    import platform

    import torch

    facts: dict[str, Any] = {
        "python": f"{platform.python_version()} ({sys.executable})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        **{name: _version(name) for name in PACKAGES},
        "nvidia_smi": _nvidia_smi(),
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        facts["gpu"] = (f"{properties.name}, sm_{properties.major}{properties.minor}, "
                        f"{properties.multi_processor_count} SMs, {properties.total_memory / 2**30:.0f} GiB")
    else:
        facts["gpu"] = "none visible"
    facts["cuda_toolkit"] = _cuda_toolkit(torch.version.cuda)
    return facts


def _cuda_toolkit(torch_cuda: str | None) -> list[str]:
    """``csrc/cuda_env.py``'s verdict: the CUDA_HOME a build would use, and why each other candidate was not."""
    spec = importlib.util.spec_from_file_location("cuda_env", REPO_ROOT / "csrc" / "cuda_env.py")
    cuda_env = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cuda_env)
    from torch.utils import cpp_extension

    home, notes = cuda_env.find_cuda_home(torch_cuda=torch_cuda, torch_guess=cpp_extension.CUDA_HOME)
    return [f"chosen: {home}", *notes]


def build() -> dict[str, Any]:
    import torch

    import blip_fast
    from blip_fast import ops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    facts: dict[str, Any] = {"blip_fast_imported_from": str(Path(blip_fast.__file__).parent),
                             "build_env": {name: os.environ.get(name) for name in
                                           ("CUDA_HOME", "TORCH_CUDA_ARCH_LIST", "BLIP_FAST_BACKEND")}}
    try:
        import blip_fast._C as extension

        facts["blip_fast_C"] = f"built ({extension.__file__})"
    except Exception as error:  # the reason is the point: a wrong toolkit, a missing build, an ABI mismatch
        facts["blip_fast_C"] = f"NOT built: {type(error).__name__}: {error}"
    facts["cuda_extension_loaded"] = ops.cuda_extension_loaded()
    facts[f"backends_on_{device}"] = ops.resolved_backends(device)
    return facts


def markdown(facts: dict[str, Any]) -> str:
    lines = ["### Environment", ""]
    for name, value in facts.items():
        if isinstance(value, dict):
            value = ", ".join(f"{key}={item}" for key, item in value.items())
        elif isinstance(value, list):
            value = "<br>".join(value)
        lines.append(f"- **{name}**: {value}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["machine", "build"], required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--expect-extension", action="store_true", help="exit 1 when blip_fast._C does not load")
    args = parser.parse_args(argv)
    path = args.out / "environment.json"
    facts = json.loads(path.read_text()) if path.is_file() else {}
    facts.update(machine() if args.stage == "machine" else build())
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(facts, indent=2, default=str) + "\n")
    (args.out / "environment.md").write_text(markdown(facts))
    print(markdown(facts))
    return 1 if args.stage == "build" and args.expect_extension and not facts["cuda_extension_loaded"] else 0


if __name__ == "__main__":
    sys.exit(main())
