"""Package metadata and the optional CUDA extension ``blip_fast._C`` (built from ``csrc/``).

The extension is never required: every op has a Triton and a pure-torch path. It is built only when all hold:
``csrc/`` has ``.cu``/``.cpp`` sources, torch is importable in the build environment and is a CUDA build, and a
usable CUDA toolkit is found (``csrc/cuda_env.py``: headers, runtime and nvcc checked, torch's guess from a wrapper
``nvcc`` corrected). ``BLIP_FAST_BUILD_CUDA=0`` skips it, ``BLIP_FAST_BUILD_CUDA=1`` makes any missing piece an error.

pip builds in an isolated environment without torch, so a plain ``pip install -e .`` never builds the extension.
On a GPU machine with a CUDA torch installed, use ``pip install --no-build-isolation -e .``.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
# sm_80 = A100, sm_90 = H100/H200 (DESIGN.md §2b); TORCH_CUDA_ARCH_LIST overrides when set.
CUDA_ARCH_FLAGS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]


def csrc_sources(csrc_dir: str = CSRC) -> list[str]:
    """The extension's sources, relative to the project root (setuptools wants relative paths)."""
    found = glob.glob(os.path.join(csrc_dir, "*.cu")) + glob.glob(os.path.join(csrc_dir, "*.cpp"))
    return sorted(os.path.relpath(path, ROOT) for path in found)


def cuda_extension_decision(env: dict | None = None, csrc_dir: str = CSRC) -> tuple[bool, str]:
    """Whether to build ``blip_fast._C``, and a one-line reason.

    Raises ``RuntimeError`` when ``BLIP_FAST_BUILD_CUDA=1`` asks for the build and it cannot be done.
    """
    env = os.environ if env is None else env
    mode = env.get("BLIP_FAST_BUILD_CUDA", "").strip()
    if mode == "0":
        return False, "BLIP_FAST_BUILD_CUDA=0"
    problem = None
    if not csrc_sources(csrc_dir):
        problem = "csrc/ has no .cu/.cpp sources"
    else:
        try:
            import torch
        except ImportError:
            torch = None
        if torch is None:
            problem = "torch is not importable in the build environment (GPU builds: pip install --no-build-isolation)"
        elif torch.version.cuda is None:
            problem = f"torch {torch.__version__} is a CPU build"
        else:
            problem = use_cuda_toolkit(torch.version.cuda)
    if problem is None:
        return True, f"building blip_fast._C from {len(csrc_sources(csrc_dir))} source files in csrc/"
    if mode == "1":
        raise RuntimeError(f"BLIP_FAST_BUILD_CUDA=1 but the CUDA extension cannot be built: {problem}")
    return False, f"skipping the optional CUDA extension blip_fast._C: {problem}"


def use_cuda_toolkit(torch_cuda: str) -> str | None:
    """Point the build (``CUDA_HOME`` and torch's cached guess) at a usable toolkit; the problem when none is."""
    from torch.utils import cpp_extension

    sys.path.insert(0, CSRC)
    try:
        import cuda_env
    finally:
        sys.path.remove(CSRC)
    home, notes = cuda_env.find_cuda_home(torch_cuda=torch_cuda, torch_guess=cpp_extension.CUDA_HOME)
    if home is None:
        return "no usable CUDA toolkit found (set CUDA_HOME): " + "; ".join(notes or ["no candidates"])
    # cpp_extension computed CUDA_HOME at import; BuildExtension reads the module global, nvcc subprocesses the env.
    os.environ["CUDA_HOME"] = cpp_extension.CUDA_HOME = home
    return None


def extension_kwargs() -> dict:
    """``ext_modules``/``cmdclass`` for ``setup()``; empty when the extension is skipped."""
    build, reason = cuda_extension_decision()
    # stderr: stdout of metadata commands (``python setup.py --version``) must stay machine-readable.
    print(f"blip_fast setup: {reason}", file=sys.stderr)
    if not build:
        return {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # No -std flag: BuildExtension picks the C++ standard that the installed torch's headers need.
    # --threads: the two architectures compile in parallel (gpu_check.sh's install step has a time budget).
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "--threads", os.environ.get("NVCC_THREADS", "2")]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        nvcc_flags += CUDA_ARCH_FLAGS
    extension = CUDAExtension(
        name="blip_fast._C",
        sources=csrc_sources(),
        include_dirs=[CSRC],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


def read_readme() -> str:
    path = os.path.join(ROOT, "README.md")
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as handle:
        return handle.read()


# webdataset 1.x changed tar_file_expander defaults (DESIGN.md §2b): the tested 0.2 line is pinned.
TRAIN_REQUIRES = ["deepspeed>=0.19,<0.20", "webdataset>=0.2.100,<0.3", "pyyaml"]
TRITON = 'triton; platform_system == "Linux"'
# Liger-Kernel's fused linear cross-entropy is the LM loss's CUDA kernel (pure Python on Triton; verified against our
# reference in tests/test_lm_head_loss.py); without it a chunked pure-torch function runs.
LIGER = 'liger-kernel>=0.8.5,<0.9; platform_system == "Linux"'

# "blip_fast" is listed explicitly so an editable install maps it even before its __init__.py exists.
PACKAGES = ["blip_fast", *find_packages(include=["blip_fast.*"], exclude=["blip_fast.kernels"]), "blip_fast.kernels"]

if __name__ == "__main__":  # setuptools' PEP 517 backend runs this file as __main__; tests import it.
    setup(
        name="blip_fast",
        version="0.1.0",
        description="A fast, faithful BLIP vision-language engine (drop-in for HuggingFace BLIP)",
        long_description=read_readme(),
        long_description_content_type="text/markdown",
        python_requires=">=3.10",
        packages=PACKAGES,
        package_dir={"blip_fast.kernels": "kernels"},
        # Measured backend timings per GPU (blip_fast/backend_table.py), committed from gpu_check.sh runs.
        package_data={"blip_fast": ["tables/*.jsonl"]},
        install_requires=[
            "torch>=2.4",
            "safetensors",
            "tokenizers",
            "pillow",
            "numpy",
            "tqdm",
            # hub ids in from_pretrained and the CLI, resolved like transformers resolves them
            "huggingface_hub",
        ],
        extras_require={
            # Triton (~1 GB) runs only on CUDA devices, and Linux CUDA torch wheels already depend on it: a CPU-only
            # install does without it. The tests need it (its CPU interpreter runs the kernels).
            "triton": [TRITON, LIGER],
            "train": TRAIN_REQUIRES,
            # blip-fast demo: trains (subprocesses of blip_fast.train) and plots its results.
            "demo": [*TRAIN_REQUIRES, "matplotlib"],
            # blip-fast caption --output captions.parquet
            "parquet": ["pyarrow"],
            # The venv's tested transformers range; CI also runs the parity suites under 4.57 and 5.17.
            "test": ["pytest", "pytest-benchmark", "transformers>=5.17,<5.25", "ruff", TRITON, LIGER],
        },
        entry_points={"console_scripts": ["blip-fast = blip_fast.cli:main"]},
        zip_safe=False,
        **extension_kwargs(),
    )
