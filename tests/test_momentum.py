"""The momentum encoders' EMA under low-precision training: fp32 masters track an fp32 reference; bf16 alone stalls.

The ZeRO-3 partition path (each rank updates its own partitions, persistent weights through their full copy) runs
for real in a 2-rank DeepSpeed bf16 run (slow) against a reference EMA of the gathered online weights.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from blip_fast.launch import free_port
from blip_fast.modeling.pretrain import BlipPretrainer
from tests.tiny_models import micro_config

ROOT = Path(__file__).resolve().parents[1]
# Small enough that 1,000 EMA steps take a second or two on a loaded 2-core CPU.
CONFIG = micro_config(layers=1)


def _model() -> BlipPretrainer:
    torch.manual_seed(0)
    return BlipPretrainer(CONFIG, queue_size=8)


def _drift(parameters: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """A per-step change of each online weight like an optimizer's: a fixed direction, 3e-4 of the weight scale."""
    generator = torch.Generator().manual_seed(seed)
    return [3e-4 * (parameter.abs().mean() + 1e-3) * torch.randn(parameter.shape, generator=generator)
            for parameter in parameters]


def _track(model: BlipPretrainer, steps: int, ema_step) -> tuple[list[torch.Tensor], list[torch.Tensor], list]:
    """Run ``steps`` EMA steps while the fp32 online master weights drift and the model holds their bf16 rounding;
    return the fp32 reference EMA, the starting momentum weights and the model's momentum weights (as fp32)."""
    triples = model.momentum_parameters()
    online_fp32 = [online.detach().float().clone() for _, online, _ in triples]
    reference = [momentum.detach().float().clone() for _, _, momentum in triples]
    start = [tensor.clone() for tensor in reference]
    drift = _drift(online_fp32, seed=1)
    for _ in range(steps):
        torch._foreach_add_(online_fp32, drift)
        with torch.no_grad():
            torch._foreach_copy_([online.data for _, online, _ in triples], online_fp32)  # bf16 rounding
        ema_step()
        torch._foreach_mul_(reference, 0.995)
        torch._foreach_add_(reference, online_fp32, alpha=0.005)
    return reference, start, [momentum.detach().float() for _, _, momentum in triples]


def _tracking_error(reference, start, momentum) -> tuple[float, float]:
    """(worst relative error of the momentum weights' displacement, worst error in bf16 ulps of the weights).

    The bound of the second: the weight's own rounding (half an ulp) plus the EMA of the online weights' rounding
    (at most half an ulp of the largest online weight it averaged, ~ the weight, which moved by ~25%)."""
    moved = max(float((m - ref).norm() / (ref - s).norm().clamp(min=1e-12))
                for ref, s, m in zip(reference, start, momentum))
    ulp = torch.finfo(torch.bfloat16).eps
    ulps = max(float(((m - ref).abs() / (ulp * (ref.abs() + s.abs()).clamp(min=1e-6))).max())
               for ref, s, m in zip(reference, start, momentum))
    return moved, ulps


def test_bf16_ema_tracks_fp32_for_1000_steps():
    model = _model().to(torch.bfloat16)  # what DeepSpeed's bf16 does to the parameters
    reference, start, momentum = _track(model, 1000, model.momentum_update)
    moved, ulps = _tracking_error(reference, start, momentum)
    # The momentum weights moved by ~25% of their scale; what the forward reads is rounded to bf16 (2^-9), ~1% of
    # that. Without fp32 masters: 100% (the weights never move) and ~60 ulps.
    assert moved <= 0.02, f"momentum displacement off by {moved:.1%}"
    assert ulps <= 1.0, f"momentum weight off by {ulps:.2f} bf16 ulps"
    assert all(master.dtype == torch.float32 for master in model.ema.state_dict()["masters"].values())


def test_bf16_ema_without_masters_stalls():
    """The oracle can fail: the same loop with the EMA computed in the weights' own bf16 (the pre-fix code) stalls."""
    model = _model().to(torch.bfloat16)
    targets = [momentum.data for _, _, momentum in model.momentum_parameters()]
    sources = [online.data for _, online, _ in model.momentum_parameters()]

    def bf16_ema():
        torch._foreach_mul_(targets, 0.995)
        torch._foreach_add_(targets, sources, alpha=0.005)

    moved, _ = _tracking_error(*_track(model, 1000, bf16_ema))
    assert moved > 0.5, f"bf16 EMA unexpectedly tracked (displacement error {moved:.1%})"


def test_fp32_ema_is_in_place_and_exact():
    model = _model()
    triples = model.momentum_parameters()
    with torch.no_grad():
        for _, online, _ in triples:
            online.add_(torch.randn_like(online))
    expected = [0.995 * momentum.detach().clone() + 0.005 * online.detach() for _, online, momentum in triples]
    model.momentum_update()
    assert model.ema.state_dict()["masters"] == {}  # fp32 weights need no master
    for (name, _, momentum), value in zip(triples, expected):
        assert torch.allclose(momentum, value, rtol=1e-6, atol=1e-7), name
    names = [name for name, _, _ in triples]
    assert names[0].startswith("visual_encoder_m.") and len(set(names)) == len(names)


def test_masters_round_trip_and_rebuild():
    model, twin = _model().to(torch.bfloat16), _model().to(torch.bfloat16)
    reference, _, _ = _track(model, 20, model.momentum_update)
    twin.load_state_dict(model.state_dict())
    assert twin.ema.load_state_dict(model.ema.state_dict(), twin.momentum_parameters)
    for ema_owner in (model, twin):
        ema_owner.momentum_update()
    for (_, _, a), (_, _, b) in zip(model.momentum_parameters(), twin.momentum_parameters()):
        assert torch.equal(a, b)
    masters = model.ema.state_dict()["masters"]
    # Loading weights drops the masters; a cast rebuilds them; masters of another layout are refused.
    model.load_state_dict(twin.state_dict())
    assert model.ema.slots is None
    model.momentum_update()
    model.to(torch.float16)
    model.momentum_update()
    assert all(master.dtype == torch.float32 for master in model.ema.state_dict()["masters"].values())
    assert not twin.ema.load_state_dict({"masters": dict(list(masters.items())[:3])}, twin.momentum_parameters)
    assert len(reference) == len(masters)


# ---------------------------------------------------------------------------------------------------- ZeRO-3 run
@pytest.mark.slow
def test_zero3_bf16_partitions_track_a_gathered_reference(tmp_path):
    """2 ranks, ZeRO-3 bf16, a persistence threshold that leaves some weights persistent and some partitioned: after
    6 training steps every momentum weight equals (to one bf16 rounding) the fp32 EMA of the gathered online weights."""
    port = free_port()
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions"))
    command = ["deepspeed", "--num_gpus", "2", "--master_port", str(port), str(ROOT / "tests" / "zero3_ema_worker.py"),
               str(tmp_path)]
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    finally:
        for path in Path("/dev/shm").glob(f"deepspeed_*_{port}_*"):
            path.unlink(missing_ok=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["kinds"]["partition"] > 0 and report["kinds"]["replicated"] > 0, report["kinds"]
    assert report["moved"] > 1e-4, "the momentum weights did not move: nothing was tested"
    assert report["worst_ulps"] <= 1.0, report
    assert report["worst_master_error"] <= 1e-6, report
