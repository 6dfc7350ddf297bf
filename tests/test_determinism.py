"""blip_fast.determinism: the switch the demo and ``--deterministic`` training use."""

import os

import torch

from blip_fast.determinism import CUBLAS_WORKSPACE, use_deterministic_algorithms


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
