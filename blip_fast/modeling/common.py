"""Small building blocks shared by the vision and text transformers."""

from __future__ import annotations

import torch
from torch import nn


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
    """The activation HuggingFace's ``ACT2FN[name]`` computes ("gelu" is the exact erf form, as in BERT and ViT)."""
    if name == "gelu":
        return nn.GELU()
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return nn.GELU(approximate="tanh")
    if name == "relu":
        return nn.ReLU()
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"unsupported activation {name!r}")


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample while training, rescaling survivors."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def init_weights(module: nn.Module) -> None:
    """BERT/ViT initialisation for training from scratch (``module.apply(init_weights)``): truncated-normal(0.02)
    linear weights, normal(0.02) embeddings, zero biases, unit LayerNorms. PyTorch's defaults (unit-variance
    embeddings tied to the LM head) would start the LM loss in the tens."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
