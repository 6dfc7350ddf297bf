"""BLIP's ViT image encoder, with HuggingFace's module names (``vision_model.*`` state-dict keys).

Pre-norm blocks with a fused qkv projection, SDPA attention through :mod:`blip_fast.ops` (FlashAttention-2/cuDNN
kernels on CUDA), stochastic depth and activation checkpointing for training, and bicubic position-embedding
resizing for other resolutions. Inference can run it through ``torch.compile`` (:func:`vision_states`): static
shapes, one graph per batch size (the decoding engine's buckets), LayerNorm statistics in fp32 under fp16/bf16
as in eager torch, and the result captured inside the decoding engine's CUDA graph.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from blip_fast import ops
from blip_fast.config import VisionConfig
from blip_fast.modeling.common import DropPath, activation
from blip_fast.modeling.fp8 import apply_requested
from blip_fast.modeling.outputs import VisionModelOutput


def resize_position_embedding(position_embedding: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Resize ``[1, 1 + g*g, D]`` position embeddings to a ``grid_hw`` patch grid: ``[1, 1 + h*w, D]``.

    The class-token embedding is kept; the square patch grid is resized bicubically (``align_corners=False``),
    as BLIP's ``interpolate_pos_embed`` and HuggingFace's ``interpolate_pos_encoding`` both do.
    """
    class_pos, patch_pos = position_embedding[:, :1], position_embedding[:, 1:]
    old_grid = int(round(patch_pos.shape[1] ** 0.5))
    if old_grid * old_grid != patch_pos.shape[1]:
        raise ValueError(f"position embedding has {patch_pos.shape[1]} patch tokens, not a square grid")
    dim = patch_pos.shape[-1]
    grid = patch_pos.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=grid_hw, mode="bicubic", align_corners=False).to(patch_pos.dtype)
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, grid_hw[0] * grid_hw[1], dim)
    return torch.cat([class_pos, patch_pos], dim=1)


class BlipVisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, config.hidden_size) * 0.02)
        self.patch_embedding = nn.Conv2d(3, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size)
        self.position_embedding = nn.Parameter(torch.randn(1, config.num_positions, config.hidden_size) * 0.02)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """pixel_values ``[B, 3, H, W]`` -> token embeddings ``[B, 1 + (H/p)*(W/p), D]``."""
        batch, _, height, width = pixel_values.shape
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)  # [B, N_patch, D]
        tokens = torch.cat([self.class_embedding.to(dtype).expand(batch, 1, -1), patches], dim=1)
        position = self.position_embedding
        grid_hw = (height // self.patch_size, width // self.patch_size)
        if interpolate_pos_encoding and (tokens.shape[1] != position.shape[1] or height != width):
            position = resize_position_embedding(position, grid_hw)
        elif tokens.shape[1] != position.shape[1]:
            raise ValueError(
                f"image {height}x{width} gives {tokens.shape[1]} tokens but the model has {position.shape[1]} "
                "position embeddings; pass interpolate_pos_encoding=True or resize the images"
            )
        return tokens + position.to(dtype)


class BlipAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.dropout = config.attention_dropout
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.projection = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, tokens, 3, self.num_heads, width // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, Dh]
        context = ops.attention(query, key, value, dropout_p=self.dropout if self.training else 0.0)
        return self.projection(context.transpose(1, 2).reshape(batch, tokens, width))


class BlipMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation_fn = activation(config.hidden_act)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class BlipEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = BlipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = BlipMLP(config)
        self.drop_path = DropPath(drop_path)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.drop_path(self.self_attn(self.layer_norm1(hidden_states)))
        return hidden_states + self.drop_path(self.mlp(self.layer_norm2(hidden_states)))


class BlipEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        depth = config.num_hidden_layers
        rates = [config.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear, as in BLIP's ViT
        self.layers = nn.ModuleList(BlipEncoderLayer(config, rate) for rate in rates)
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden_states = checkpoint(layer, hidden_states, use_reentrant=False)
            else:
                hidden_states = layer(hidden_states)
        return hidden_states


class BlipVisionModel(nn.Module):
    """ViT: ``pixel_values [B, 3, H, W]`` -> ``last_hidden_state [B, 1 + N_patch, D]`` (normed) and pooler."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BlipVisionEmbeddings(config)
        self.encoder = BlipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> VisionModelOutput:
        hidden_states = self.encoder(self.embeddings(pixel_values, interpolate_pos_encoding))
        last_hidden_state = self.post_layernorm(hidden_states)
        # HuggingFace's pooler applies post_layernorm a second time to the class token; kept for output parity.
        pooled = self.post_layernorm(last_hidden_state[:, 0])
        return VisionModelOutput(last_hidden_state=last_hidden_state, pooler_output=pooled)


def compile_enabled(device: torch.device) -> bool:
    """``torch.compile`` of the inference ViT: ``BLIP_FAST_COMPILE`` (0/1) if set, else on for CUDA only."""
    switch = os.environ.get("BLIP_FAST_COMPILE")
    return device.type == "cuda" if switch is None else switch.strip() != "0"


def _states(vision_model: BlipVisionModel, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> torch.Tensor:
    return vision_model(pixel_values, interpolate_pos_encoding).last_hidden_state


_compiled_states = None  # the torch.compile of _states, made on first use (dynamo guards it per model and shape)
_compile_failed = False


def vision_states(vision_model: BlipVisionModel, pixel_values: torch.Tensor,
                  interpolate_pos_encoding: bool = False) -> torch.Tensor:
    """ViT states ``[B, N, D]`` for inference: compiled where :func:`compile_enabled` (falling back to eager, with
    one log line, if compilation fails), eager when training, with gradients, or compile is off; its GEMMs in FP8
    when ``BLIP_FAST_VIT_FP8`` asks (:mod:`blip_fast.modeling.fp8`)."""
    global _compiled_states, _compile_failed
    apply_requested(vision_model)  # BLIP_FAST_VIT_FP8: FP8 GEMMs in the encoder (off by default)
    if vision_model.training or torch.is_grad_enabled() or _compile_failed or not compile_enabled(pixel_values.device):
        return _states(vision_model, pixel_values, interpolate_pos_encoding)
    if _compiled_states is None:
        # One graph per (model, batch size, resolution): the engine's buckets need more than dynamo's default 8.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _compiled_states = torch.compile(_states, dynamic=False, fullgraph=True)
    try:
        return _compiled_states(vision_model, pixel_values, interpolate_pos_encoding)
    except Exception as error:  # a missing compiler or an unsupported backend must not stop inference
        logging.getLogger(__name__).warning("torch.compile of the ViT failed (%s); running it eagerly", error)
        _compile_failed = True
        return _states(vision_model, pixel_values, interpolate_pos_encoding)
