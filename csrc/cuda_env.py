"""Where the CUDA toolkit is, and which GPU architectures to build for: used by setup.py and gpu_check.sh.

torch's own guess (``torch.utils.cpp_extension.CUDA_HOME``) is ``$CUDA_HOME``/``$CUDA_PATH``, else the parent of
the folder holding the first ``nvcc`` on ``PATH``. When that ``nvcc`` is a wrapper script (``/usr/local/bin/nvcc``
running ``/usr/local/cuda-13.0/bin/nvcc``) the guess is ``/usr/local``: no headers, and the build of
``blip_fast._C`` fails or is skipped while the Triton fallback hides it. So a candidate counts only when it holds
``bin/nvcc``, ``include/cuda_runtime.h`` and ``lib64/`` or ``lib/`` ``libcudart*``; candidates in order: the
environment's, torch's guess, the real path of ``nvcc`` on ``PATH``, NVIDIA's pip packages (``nvidia/*``), then
``/usr/local/cuda``, ``/usr/local/cuda-*`` (newest first) and ``/opt/cuda``. A toolkit whose major version matches
torch's CUDA is preferred (torch refuses to build against another major).

    python3 csrc/cuda_env.py            # shell lines: export CUDA_HOME=...; export TORCH_CUDA_ARCH_LIST=9.0
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path


def toolkit_problem(home: str | os.PathLike) -> str | None:
    """Why ``home`` cannot serve as CUDA_HOME for a build, or None when it can."""
    home = Path(home)
    if not (home / "bin" / "nvcc").is_file():
        return f"{home}: no bin/nvcc"
    if not (home / "include" / "cuda_runtime.h").is_file():
        return f"{home}: no include/cuda_runtime.h"
    if not any(glob.glob(str(home / lib / "libcudart*")) for lib in ("lib64", "lib")):
        return f"{home}: no lib64/libcudart* or lib/libcudart*"
    return None


def toolkit_version(home: str | os.PathLike) -> str | None:
    """The toolkit's version from its ``version.json`` (CUDA >= 11.1), else from ``nvcc --version``."""
    home = Path(home)
    try:
        return json.loads((home / "version.json").read_text())["cuda"]["version"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        banner = subprocess.run([str(home / "bin" / "nvcc"), "--version"], capture_output=True, text=True,
                                timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+\.\d+)", banner)
    return found.group(1) if found else None


def candidates(env: dict[str, str], torch_guess: str | None, site_dirs: list[str]) -> list[str]:
    """Possible toolkit folders, most trusted first, without duplicates."""
    found = [env[name] for name in ("CUDA_HOME", "CUDA_PATH") if env.get(name)]
    if torch_guess:
        found.append(torch_guess)
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    if nvcc:
        found.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    for site in site_dirs:
        found += sorted(glob.glob(os.path.join(site, "nvidia", "*")))
    found.append("/usr/local/cuda")
    versioned = glob.glob("/usr/local/cuda-*")
    found += sorted(versioned, key=lambda path: [int(n) for n in re.findall(r"\d+", path)], reverse=True)
    found.append("/opt/cuda")
    unique: list[str] = []
    for path in found:
        if os.path.realpath(path) not in map(os.path.realpath, unique):
            unique.append(path)
    return unique


def find_cuda_home(env: dict[str, str] | None = None, torch_cuda: str | None = None,
                   torch_guess: str | None = None, site_dirs: list[str] | None = None) -> tuple[str | None, list[str]]:
    """(a usable CUDA_HOME or None, the notes on every candidate looked at). ``torch_cuda`` is torch's CUDA version
    (``torch.version.cuda``): a toolkit of the same major version wins over an earlier candidate."""
    env = dict(os.environ) if env is None else env
    site_dirs = sys.path if site_dirs is None else site_dirs
    notes, usable = [], []
    for home in candidates(env, torch_guess, [d for d in site_dirs if d and os.path.isdir(d)]):
        if not os.path.isdir(home):
            continue
        problem = toolkit_problem(home)
        if problem:
            notes.append(f"rejected {problem}")
            continue
        version = toolkit_version(home)
        notes.append(f"usable {home} (CUDA {version or 'unknown'})")
        usable.append((home, version))
    if not usable:
        return None, notes
    if torch_cuda:
        major = torch_cuda.split(".")[0]
        for home, version in usable:
            if version and version.split(".")[0] == major:
                return home, notes
    return usable[0][0], notes


def arch_list(capabilities: list[tuple[int, int]]) -> str | None:
    """``TORCH_CUDA_ARCH_LIST`` for the visible GPUs (``"9.0"`` on an H100/H200), None without a GPU."""
    return ";".join(sorted({f"{major}.{minor}" for major, minor in capabilities})) or None


def main() -> int:
    """Print shell ``export`` lines (and ``#`` notes) for a build of blip_fast._C on this machine."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as error:
        print(f"# torch not importable ({error}): nothing to build")
        return 0
    home, notes = find_cuda_home(torch_cuda=torch.version.cuda, torch_guess=cpp_extension.CUDA_HOME)
    print(f"# torch {torch.__version__}, CUDA {torch.version.cuda}; torch's own CUDA_HOME guess: "
          f"{cpp_extension.CUDA_HOME}")
    for note in notes:
        print(f"# {note}")
    if home:
        print(f"export CUDA_HOME={home}")
    else:
        print("# no usable CUDA toolkit found: blip_fast._C will not be built")
    capabilities = ([torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
                    if torch.cuda.is_available() else [])
    archs = arch_list(capabilities)
    if archs:
        print(f"export TORCH_CUDA_ARCH_LIST='{archs}'")
    else:
        # An inherited list may name archs this toolkit dropped (CUDA 13: below 7.5): use setup.py's default.
        print("unset TORCH_CUDA_ARCH_LIST  # no GPU visible: setup.py's default targets (sm_80 + sm_90)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
