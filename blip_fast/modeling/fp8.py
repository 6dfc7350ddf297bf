"""Optional FP8 GEMMs for the inference ViT (off by default): ``BLIP_FAST_VIT_FP8=1``, or :func:`enable_vit_fp8`.

Every Linear of the ViT's encoder blocks (qkv, attention output, MLP fc1 and fc2: nearly all of its FLOPs) runs as
:func:`blip_fast.ops.fp8_linear`: float8 e4m3 operands with per-tensor scales (the weight quantised once, each input
per call), fp32 accumulation on the FP8 tensor cores (``torch._scaled_mm``), the output in the model's dtype. Patch
embedding, LayerNorms and attention stay in the model's dtype. FP8 GEMMs need compute capability 8.9+ (Ada, Hopper,
Blackwell): anywhere else enabling is refused with the device named. ``BLIP_FAST_VIT_FP8=emulate`` (``emulate=True``)
rounds through the same float8 dtype and multiplies in fp32 instead, on any device: how the accuracy effect is
measured without such a GPU (``benchmarks/bench_fp8_vit.py``).

The modules stay ``nn.Linear`` (state dicts and checkpoints unchanged): the FP8 weight is a non-persistent buffer
made when enabled (enable again after changing the weights; re-made if a dtype cast touched it), and training or a
forward with gradients takes the ordinary path.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from blip_fast import ops

#: ``BLIP_FAST_VIT_FP8`` values: off, FP8 GEMMs (refused on GPUs without them), or their emulation (any device).
MODES = {"": None, "0": None, "off": None, "1": "fp8", "on": "fp8", "emulate": "emulate"}


def requested_mode() -> str | None:
    """``"fp8"``, ``"emulate"`` or None (off, the default), from ``BLIP_FAST_VIT_FP8``."""
    value = os.environ.get("BLIP_FAST_VIT_FP8", "").strip().lower()
    if value not in MODES:
        raise ValueError(f"BLIP_FAST_VIT_FP8={value!r}; expected 0, 1 or emulate")
    return MODES[value]


def check_fp8_device(device: torch.device) -> None:
    """Refuse FP8 GEMMs where the hardware has none, naming the device and the way to measure the effect anyway."""
    if ops.fp8_gemm_supported(device):
        return
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        found = f"{torch.cuda.get_device_name(device)} ({device}) has compute capability {major}.{minor}"
    else:
        found = f"the ViT is on {device}"
    raise RuntimeError(f"FP8 ViT GEMMs need a CUDA GPU of compute capability 8.9+ (Ada, Hopper); {found}. Unset "
                       "BLIP_FAST_VIT_FP8, or set it to 'emulate' to measure FP8's accuracy effect without one")


def enable_vit_fp8(vision_model: nn.Module, emulate: bool = False) -> int:
    """Run the Linear layers of ``vision_model``'s encoder in FP8 at inference (see the module docstring); returns
    how many. Call after moving the model to its device and dtype."""
    linears = [module for module in vision_model.encoder.modules() if isinstance(module, nn.Linear)]
    device = linears[0].weight.device
    if not emulate:
        check_fp8_device(device)
        odd = [f"{m.in_features}x{m.out_features}" for m in linears if m.in_features % 16 or m.out_features % 16]
        if odd:
            raise ValueError(f"FP8 GEMMs need widths that are multiples of 16; this ViT has Linear layers {odd}")
    for module in linears:
        _quantize_weight(module)
        module.forward = functools.partial(_fp8_forward, module, emulate)
    vision_model.fp8_mode = "emulate" if emulate else "fp8"
    return len(linears)


def _quantize_weight(module: nn.Linear) -> None:
    values, scale = ops.fp8_quantize(module.weight)
    module.register_buffer("weight_fp8", values, persistent=False)
    module.register_buffer("weight_scale", scale, persistent=False)


def _fp8_forward(module: nn.Linear, emulate: bool, inputs: torch.Tensor) -> torch.Tensor:
    if module.training or torch.is_grad_enabled():
        return F.linear(inputs, module.weight, module.bias)
    if module.weight_fp8.dtype != torch.float8_e4m3fn:  # a model.half() / .to(dtype) after enabling cast it
        _quantize_weight(module)
    return ops.fp8_linear(inputs, module.weight_fp8, module.weight_scale, module.bias, emulate)


def apply_requested(vision_model: nn.Module) -> None:
    """Enable FP8 on ``vision_model`` once, when ``BLIP_FAST_VIT_FP8`` asks for it, at an inference call (not in
    training, nor under gradient mode: the static engine's shape trace runs there, on fake tensors)."""
    mode = requested_mode()
    if mode is None or vision_model.training or torch.is_grad_enabled():
        return
    if getattr(vision_model, "fp8_mode", None) != mode:
        enable_vit_fp8(vision_model, emulate=mode == "emulate")
