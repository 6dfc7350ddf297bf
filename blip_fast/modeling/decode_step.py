"""The static decode step of the image-grounded decoder: fixed shapes and addresses, few kernels, no host reads.

Everything a CUDA graph of a ``generate`` call touches lives here in preallocated buffers: the self-attention
cache, every layer's cross-attention K/V of a bucket of images, and concatenations of HuggingFace-layout
parameters that the step multiplies by at once (per layer Q|K|V, and the K|V of all layers' cross-attention for
one GEMM over the image states). Those concatenations are derived, never parameters: state-dict keys, loading,
saving and training are untouched, and :meth:`FusedWeights.refresh` copies the current parameter values in at
the start of every call (inside the graph on CUDA), so in-place weight updates between calls are always seen.

One step (:func:`decode_step`) feeds ``L`` tokens per row (the prompt, then one token per step) through
:mod:`blip_fast.decode_ops`: an embedding, eight ops per layer and two for the LM head. Its semantics are the
dynamic path's (``BlipTextLMHeadModel.forward`` with a :class:`~blip_fast.modeling.text.DecoderCache`), which is
its oracle in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from blip_fast import decode_ops, ops


@dataclass
class StaticCache:
    """Decoding state for up to ``images`` images of ``rows_per_image`` rows each, at fixed addresses.

    ``self_kv [2, layers, rows, H, max_length, Dh]``: self-attention keys then values. ``cross_kv [images, N_ctx,
    layers * 2 * D]``: layer ``i``'s cross-attention keys are columns ``2i*D : (2i+1)*D``, its values the next
    ``D`` (one GEMM fills all of them). ``cross_mask [images, 1, 1, N_ctx]`` additive, or None.
    """

    self_kv: Tensor
    cross_kv: Tensor
    cross_mask: Tensor | None
    rows_per_image: int
    num_heads: int

    @property
    def max_length(self) -> int:
        return self.self_kv.shape[4]

    @property
    def rows(self) -> int:
        return self.self_kv.shape[2]

    def cross(self, layer: int) -> tuple[Tensor, Tensor]:
        """Layer ``layer``'s cross-attention key and value ``[images, H, N_ctx, Dh]`` (strided views)."""
        width = self.self_kv.shape[3] * self.self_kv.shape[5]
        keys = self.cross_kv[:, :, 2 * layer * width : (2 * layer + 1) * width]
        values = self.cross_kv[:, :, (2 * layer + 1) * width : (2 * layer + 2) * width]
        return (keys.unflatten(2, (self.num_heads, -1)).transpose(1, 2),
                values.unflatten(2, (self.num_heads, -1)).transpose(1, 2))


def new_static_cache(text_model, images: int, rows_per_image: int, max_length: int, context_length: int,
                     masked_context: bool, dtype: torch.dtype, device: torch.device) -> StaticCache:
    """A zeroed :class:`StaticCache` for ``text_model`` (a :class:`~blip_fast.modeling.text.BlipTextModel`)."""
    config = text_model.config
    layers, heads, width = config.num_hidden_layers, config.num_attention_heads, config.hidden_size
    rows = images * rows_per_image
    return StaticCache(
        self_kv=torch.zeros(2, layers, rows, heads, max_length, width // heads, dtype=dtype, device=device),
        cross_kv=torch.zeros(images, context_length, layers * 2 * width, dtype=dtype, device=device),
        cross_mask=torch.zeros(images, 1, 1, context_length, dtype=dtype, device=device) if masked_context else None,
        rows_per_image=rows_per_image,
        num_heads=heads,
    )


class FusedWeights:
    """Concatenated copies of parameters, kept at fixed addresses (CUDA graphs read them) and refreshed per call.

    ``qkv[i]``: layer ``i``'s self-attention ``(weight [3D, D], bias [3D])``, query | key | value.
    ``cross_kv``: ``(weight [layers * 2D, D_ctx], bias [layers * 2D])``, each layer's key | value in layer order.
    """

    def __init__(self, text_model) -> None:
        self.text_model = text_model
        self.qkv = [self._concatenate(self._qkv_parts(layer)) for layer in text_model.encoder.layer]
        self.cross_kv = self._concatenate(self._cross_kv_parts())

    def _qkv_parts(self, layer) -> list[torch.nn.Linear]:
        attention = layer.attention.self
        return [attention.query, attention.key, attention.value]

    def _cross_kv_parts(self) -> list[torch.nn.Linear]:
        return [linear for layer in self.text_model.encoder.layer
                for linear in (layer.crossattention.self.key, layer.crossattention.self.value)]

    @staticmethod
    def _concatenate(linears: list[torch.nn.Linear]) -> tuple[Tensor, Tensor]:
        return (torch.cat([linear.weight.detach() for linear in linears]),
                torch.cat([linear.bias.detach() for linear in linears]))

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the parameters' current values in (same addresses): one concatenation per fused tensor."""
        layers = self.text_model.encoder.layer
        for (weight, bias), layer in zip(self.qkv, layers):
            parts = self._qkv_parts(layer)
            torch.cat([linear.weight for linear in parts], out=weight)
            torch.cat([linear.bias for linear in parts], out=bias)
        parts = self._cross_kv_parts()
        torch.cat([linear.weight for linear in parts], out=self.cross_kv[0])
        torch.cat([linear.bias for linear in parts], out=self.cross_kv[1])


@torch.no_grad()
def fill_context(cache: StaticCache, weights: FusedWeights, encoder_hidden_states: Tensor,
                 encoder_attention_mask: Tensor | None) -> None:
    """Project every layer's cross-attention K/V of ``encoder_hidden_states [images, N_ctx, D_ctx]`` straight into
    the cache's first ``images`` slots: one GEMM, no intermediate copy. Writes the mask likewise."""
    images, context_length, _ = encoder_hidden_states.shape
    weight, bias = weights.cross_kv
    target = cache.cross_kv[:images].view(images * context_length, -1)
    torch.addmm(bias, encoder_hidden_states.reshape(images * context_length, -1), weight.t(), out=target)
    if cache.cross_mask is not None:
        cache.cross_mask[:images].copy_(ops.additive_mask(encoder_attention_mask[:, None, None, :],
                                                          cache.cross_mask.dtype))


def decode_layers(text_model, input_ids: Tensor, position: Tensor, keep: Tensor, cache: StaticCache,
                  weights: FusedWeights, history: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Feed ``input_ids [R, L]`` at positions ``position ..`` (0-d int64 device tensor) through every layer.

    Returns the last layer's FFN output and its residual ``[R, L, D]``, *before* that layer's final LayerNorm
    (``layer.output.LayerNorm``), which the caller fuses into its next linear layer. ``keep [R, max_length]`` (bool)
    is False at prompt padding; ``history`` (beam search) is :func:`decode_ops.decode_self_attention`'s.
    """
    config = text_model.config
    activation = decode_ops.ACTIVATIONS[config.hidden_act]
    embeddings = text_model.embeddings
    hidden = decode_ops.decode_embed(input_ids, position, embeddings.word_embeddings.weight,
                                     embeddings.position_embeddings.weight)
    residual, norm = None, embeddings.LayerNorm
    for index, layer in enumerate(text_model.encoder.layer):
        residual, qkv = decode_ops.ln_linear(hidden, residual, norm, *weights.qkv[index])
        context = decode_ops.decode_self_attention(qkv, cache.self_kv[0, index], cache.self_kv[1, index], position,
                                                   keep, history, config.num_attention_heads)
        hidden = layer.attention.output.dense(context)
        residual, query = decode_ops.ln_linear(hidden, residual, layer.attention.output.LayerNorm,
                                               layer.crossattention.self.query)
        context = decode_ops.decode_cross_attention(query, *cache.cross(index), cache.cross_mask)
        hidden = layer.crossattention.output.dense(context)
        residual, inner = decode_ops.ln_linear(hidden, residual, layer.crossattention.output.LayerNorm,
                                               layer.intermediate.dense, activation=activation)
        hidden = layer.output.dense(inner)
        norm = layer.output.LayerNorm
    return hidden, residual


def decode_step(lm_model, input_ids: Tensor, position: Tensor, keep: Tensor, cache: StaticCache,
                weights: FusedWeights, history: Tensor | None = None) -> Tensor:
    """Next-token logits ``[R, V]`` (model dtype) after feeding ``input_ids [R, L]`` (see :func:`decode_layers`).

    ``lm_model`` is a :class:`~blip_fast.modeling.text.BlipTextLMHeadModel`; only the last token reaches the head.
    """
    hidden, residual = decode_layers(lm_model.bert, input_ids, position, keep, cache, weights, history)
    head = lm_model.cls.predictions
    final_norm = lm_model.bert.encoder.layer[-1].output.LayerNorm
    _, transformed = decode_ops.ln_linear(hidden[:, -1], residual[:, -1], final_norm, head.transform.dense,
                                          activation=decode_ops.ACTIVATIONS[lm_model.config.hidden_act])
    _, logits = decode_ops.ln_linear(transformed, None, head.transform.LayerNorm, head.decoder)
    return logits
