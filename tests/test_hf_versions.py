"""HuggingFace parity under other transformers versions than the venv's: 5.17 (the GPU machine's) and 4.57 (the
last 4.x).

``.ci/run`` installs each, with the huggingface_hub and tokenizers it needs, into ``build/transformers-<version>``
with ``pip --target``, outside the venv; this runs the parity suites under each in a subprocess. Where no such
folder exists the test skips. The HF behaviours that differ between them are explicit in blip_fast
(``sort_sampled_beams``, ``alpha_on_white``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITES = ["tests/test_hf_parity.py", "tests/test_generation.py", "tests/test_interop.py",
          "tests/test_generate_outputs.py", "tests/test_transforms.py",
          # model folders and hub repos as that version writes them, loaded by blip_fast
          "tests/test_checkpoint.py", "tests/test_hub.py", "tests/test_model_cards.py"]
#: transformers 5 only: the processor saved by transformers 5 (processor_config.json) against ours (transformers 4
#: also orders the processor's output keys differently).
SUITES_5 = ["tests/test_processing.py"]
#: transformers 4 only: its "image-to-text" and "visual-question-answering" pipelines are gone in 5 (the rest of
#: test_pipelines.py runs under the venv's transformers).
SUITES_4 = ["tests/test_pipelines.py::test_image_to_text_pipeline",
            "tests/test_pipelines.py::test_visual_question_answering_pipeline"]
ALTERNATES = sorted(ROOT.glob("build/transformers-*/transformers/__init__.py"))


@pytest.mark.slow
@pytest.mark.parametrize("init", ALTERNATES or [pytest.param(None, marks=pytest.mark.skip(
    reason="no other transformers in build/transformers-* (.ci/run installs them)"))],
    ids=lambda init: init.parents[1].name if init else "none")
def test_parity_suites_under_another_transformers(init):
    site = init.parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    version = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert version.stdout.startswith(site.name.removeprefix("transformers-") + "."), version.stdout + version.stderr
    suites = SUITES + (SUITES_4 if site.name.startswith("transformers-4.") else SUITES_5)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *suites],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
