"""Packaging: the optional CUDA extension fails soft, blip_fast.kernels installs, CI runs what the README says."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_module_():
    """setup.py imported as a module: ``setup()`` only runs under ``__main__``, so importing it has no effect."""
    spec = importlib.util.spec_from_file_location("blip_fast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_extension_is_skipped_without_sources(setup_module_, tmp_path):
    build, reason = setup_module_.cuda_extension_decision(env={}, csrc_dir=str(tmp_path))
    assert not build and "no .cu/.cpp sources" in reason


def test_extension_is_skipped_without_cuda_torch(setup_module_, tmp_path):
    (tmp_path / "op.cu").write_text("// kernel\n")
    build, reason = setup_module_.cuda_extension_decision(env={}, csrc_dir=str(tmp_path))
    import torch

    if torch.version.cuda is None:
        assert not build and "CPU build" in reason
    assert reason.startswith("skipping") != build


def test_extension_switches(setup_module_, tmp_path):
    (tmp_path / "op.cu").write_text("// kernel\n")
    assert setup_module_.cuda_extension_decision(env={"BLIP_FAST_BUILD_CUDA": "0"}, csrc_dir=str(tmp_path)) == (
        False,
        "BLIP_FAST_BUILD_CUDA=0",
    )
    # Forcing the build with nothing to build is a loud error, never a silent skip.
    with pytest.raises(RuntimeError, match="BLIP_FAST_BUILD_CUDA=1"):
        setup_module_.cuda_extension_decision(env={"BLIP_FAST_BUILD_CUDA": "1"}, csrc_dir=str(tmp_path / "empty"))


def test_metadata_command_prints_one_skip_line():
    env = {key: value for key, value in os.environ.items() if key != "BLIP_FAST_BUILD_CUDA"}
    result = subprocess.run(
        [sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "0.1.0"
    lines = [line for line in result.stderr.splitlines() if line.startswith("blip_fast setup:")]
    assert len(lines) == 1, result.stderr


def _installed() -> importlib.metadata.Distribution | None:
    """blip_fast's pip-installed distribution, if any (a ``blip_fast.egg-info`` left in the tree by a build, found
    through ``pythonpath = ["."]``, has no INSTALLER file and does not count)."""
    for dist in importlib.metadata.distributions(name="blip_fast"):
        if dist.read_text("INSTALLER") is not None:
            return dist
    return None


def test_kernels_subpackage_is_importable_after_install():
    if _installed() is None:
        pytest.skip("blip_fast is not installed (pip install -e .)")
    import blip_fast.kernels

    assert Path(blip_fast.kernels.__file__).resolve() == (ROOT / "kernels" / "__init__.py").resolve()


def test_console_entry_point_is_declared(setup_module_):
    source = (ROOT / "setup.py").read_text(encoding="utf-8")
    assert '"blip-fast = blip_fast.cli:main"' in source
    dist = _installed()
    if dist is not None:
        scripts = {entry.name: entry.value for entry in dist.entry_points if entry.group == "console_scripts"}
        assert scripts.get("blip-fast") == "blip_fast.cli:main"


def _readme_test_command() -> list[str]:
    """The README's test command (the code block after "Run the tests"), split on ``&&``."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"Run the tests:\s*```bash\n(.+?)\n```", readme, flags=re.S)
    assert match, "README.md has no 'Run the tests:' bash block"
    return [part.strip() for part in match.group(1).strip().split("&&")]


def test_ci_runs_the_readme_test_command():
    parts = _readme_test_command()
    assert parts[-1].startswith("python -m pytest")
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    ci_commands = [line for line in ci_lines if line and not line.startswith("#")]
    for part in parts:
        assert part in ci_commands, f".ci/run does not run the README's {part!r}"
    pytest_lines = [line for line in ci_commands if "pytest" in line and not line.startswith("echo")]
    assert pytest_lines == [parts[-1]], f".ci/run runs {pytest_lines}, the README says {parts[-1]!r}"


def test_ci_script_is_executable_and_strict():
    script = ROOT / ".ci" / "run"
    assert os.access(script, os.X_OK)
    assert "set -euo pipefail" in script.read_text(encoding="utf-8")
