"""BLIP's mixture-of-encoder-decoder (MED) text transformer, with HuggingFace's module names.

One BERT-style stack serves as unimodal encoder (bidirectional, no cross-attention: ITC), image-grounded
encoder (bidirectional + cross-attention: ITM, VQA questions) and image-grounded decoder (causal +
cross-attention: captions, answers). Every layer has cross-attention between self-attention and the FFN; it runs
only when image (or question) states are given.

Incremental decoding goes through an explicit :class:`DecoderCache`: self-attention K/V preallocated to the
maximum length, cross-attention K/V computed once per image and shared by all rows (beams, samples) of that
image, which attend as extra query rows instead of copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from blip_fast import ops
from blip_fast.config import TextConfig
from blip_fast.modeling.common import activation
from blip_fast.modeling.outputs import CausalLMOutput, TextModelOutput


@dataclass
class DecoderCache:
    """Attention state carried between decoding steps.

    ``self_keys[i]``/``self_values[i]``: ``[rows, H, max_length, Dh]``, filled up to ``length``.
    ``cross_keys[i]``/``cross_values[i]``: ``[images, H, N_ctx, Dh]``, one copy per image; row ``r`` belongs to
    image ``r // rows_per_image``. ``cross_mask``: additive ``[images, 1, 1, N_ctx]`` or None.
    """

    self_keys: list[torch.Tensor]
    self_values: list[torch.Tensor]
    cross_keys: list[torch.Tensor]
    cross_values: list[torch.Tensor]
    cross_mask: torch.Tensor | None
    rows_per_image: int
    length: int = 0

    @property
    def max_length(self) -> int:
        return self.self_keys[0].shape[2]

    def reorder(self, rows: torch.Tensor) -> None:
        """Make row ``r`` continue the history of row ``rows[r]`` (beam search); rows must stay within their image."""
        for cache in (self.self_keys, self.self_values):
            for layer, tensor in enumerate(cache):
                cache[layer] = tensor.index_select(0, rows)


class BlipTextEmbeddings(nn.Module):
    """Word + absolute position embeddings, LayerNorm, dropout (BLIP has no token-type embeddings)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, past_length: int = 0) -> torch.Tensor:
        length = input_ids.shape[1]
        if past_length + length > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"text of {past_length + length} tokens exceeds max_position_embeddings "
                f"{self.position_embeddings.num_embeddings}"
            )
        positions = torch.arange(past_length, past_length + length, device=input_ids.device)
        embeddings = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(embeddings))


class BlipTextSelfAttention(nn.Module):
    """Query/key/value projections and attention; keys/values read ``context_width``-wide states."""

    def __init__(self, config: TextConfig, context_width: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.dropout = config.attention_probs_dropout_prob
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(context_width, config.hidden_size)
        self.value = nn.Linear(context_width, config.hidden_size)

    def split_heads(self, states: torch.Tensor) -> torch.Tensor:
        """``[B, L, H*Dh]`` -> ``[B, H, L, Dh]``."""
        return states.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split_heads(self.key(context)), self.split_heads(self.value(context))

    def forward(
        self,
        hidden_states: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        rows_per_context: int = 1,
        cached_context: bool = False,
    ) -> torch.Tensor:
        """hidden_states ``[R, L, D]`` attend to key/value ``[R / rows_per_context, H, Lk, Dh]``.

        With ``rows_per_context`` > 1 the queries of consecutive rows sharing one key/value are folded into the
        query-length axis, so the shared keys are read once instead of being copied per row. ``cached_context``
        (decoding against cached image K/V) routes through :func:`blip_fast.ops.decode_attention`, whose fused
        kernel streams each image's K/V once for all its rows.
        """
        rows, length, width = hidden_states.shape
        query = self.split_heads(self.query(hidden_states))  # [R, H, L, Dh]
        if rows_per_context > 1:
            query = query.unflatten(0, (-1, rows_per_context)).transpose(1, 2).flatten(2, 3)  # [C, H, r*L, Dh]
        if cached_context:
            context = ops.decode_attention(query, key, value, mask)
        else:
            context = ops.attention(query, key, value, mask, self.dropout if self.training else 0.0)
        if rows_per_context > 1:
            context = context.unflatten(2, (rows_per_context, length)).transpose(1, 2).flatten(0, 1)  # [R, H, L, Dh]
        return context.transpose(1, 2).reshape(rows, length, width)


class BlipTextSelfOutput(nn.Module):
    """Output projection, dropout, residual, post-LayerNorm (BERT)."""

    def __init__(self, config: TextConfig, input_width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(input_width, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class BlipTextAttention(nn.Module):
    def __init__(self, config: TextConfig, context_width: int) -> None:
        super().__init__()
        self.self = BlipTextSelfAttention(config, context_width)
        self.output = BlipTextSelfOutput(config, config.hidden_size)


class BlipTextIntermediate(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = activation(config.hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class BlipTextLayer(nn.Module):
    def __init__(self, config: TextConfig, encoder_width: int) -> None:
        super().__init__()
        self.attention = BlipTextAttention(config, config.hidden_size)
        self.crossattention = BlipTextAttention(config, encoder_width)
        self.intermediate = BlipTextIntermediate(config)
        self.output = BlipTextSelfOutput(config, config.intermediate_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        self_mask: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor | None,
        cross_mask: torch.Tensor | None,
        cache: DecoderCache | None,
        layer_index: int,
    ) -> torch.Tensor:
        attention = self.attention.self
        key, value = attention.project_kv(hidden_states)
        if cache is not None:
            end = cache.length + hidden_states.shape[1]
            cache.self_keys[layer_index][:, :, cache.length : end] = key
            cache.self_values[layer_index][:, :, cache.length : end] = value
            key = cache.self_keys[layer_index][:, :, :end]
            value = cache.self_values[layer_index][:, :, :end]
        context = attention(hidden_states, key, value, self_mask)
        hidden_states = self.attention.output(context, hidden_states)

        if cache is not None:
            key, value = cache.cross_keys[layer_index], cache.cross_values[layer_index]
            context = self.crossattention.self(
                hidden_states, key, value, cache.cross_mask, cache.rows_per_image, cached_context=True
            )
            hidden_states = self.crossattention.output(context, hidden_states)
        elif encoder_hidden_states is not None:
            key, value = self.crossattention.self.project_kv(encoder_hidden_states)
            context = self.crossattention.self(hidden_states, key, value, cross_mask)
            hidden_states = self.crossattention.output(context, hidden_states)

        return self.output(self.intermediate(hidden_states), hidden_states)


class BlipTextEncoder(nn.Module):
    def __init__(self, config: TextConfig, encoder_width: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BlipTextLayer(config, encoder_width) for _ in range(config.num_hidden_layers))


class BlipTextPooler(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


def self_attention_mask(
    attention_mask: torch.Tensor | None, query_length: int, past_length: int, causal: bool, dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """Additive self-attention mask ``[B or 1, 1, L_q, L_past + L_q]`` from a ``[B, L_past + L_q]`` 0/1 mask."""
    total = past_length + query_length
    keep = None
    if causal:
        query_positions = torch.arange(past_length, total, device=device)[:, None]
        keep = (torch.arange(total, device=device)[None, :] <= query_positions)[None, None]  # [1, 1, Lq, Lk]
    if attention_mask is not None:
        padding = attention_mask[:, None, None, :total].bool()  # [B, 1, 1, Lk]
        keep = padding if keep is None else keep & padding
    return None if keep is None else ops.additive_mask(keep, dtype)


def context_attention_mask(encoder_attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``[B, N_ctx]`` 0/1 mask over image (or question) states -> additive ``[B, 1, 1, N_ctx]``."""
    if encoder_attention_mask is None:
        return None
    return ops.additive_mask(encoder_attention_mask[:, None, None, :], dtype)


class BlipTextModel(nn.Module):
    """The MED stack: ``input_ids [B, L]`` -> ``last_hidden_state [B, L, D]``.

    ``encoder_hidden_states [B, N_ctx, D_ctx]`` switches on cross-attention; ``is_decoder`` makes self-attention
    causal. With a ``cache`` (decoding), cross-attention reads the cached per-image K/V instead.
    """

    def __init__(self, config: TextConfig, encoder_width: int, add_pooling_layer: bool = False) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BlipTextEmbeddings(config)
        self.encoder = BlipTextEncoder(config, encoder_width)
        self.pooler = BlipTextPooler(config) if add_pooling_layer else None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        is_decoder: bool = False,
        cache: DecoderCache | None = None,
    ) -> TextModelOutput:
        past_length = cache.length if cache is not None else 0
        hidden_states = self.embeddings(input_ids, past_length)
        dtype, device = hidden_states.dtype, hidden_states.device
        self_mask = self_attention_mask(
            attention_mask, input_ids.shape[1], past_length, causal=is_decoder or cache is not None, dtype=dtype,
            device=device,
        )
        cross_mask = None
        if encoder_hidden_states is not None and cache is None:
            if encoder_attention_mask is None:
                encoder_attention_mask = torch.ones(encoder_hidden_states.shape[:2], device=device)
            cross_mask = context_attention_mask(encoder_attention_mask, dtype)
        for index, layer in enumerate(self.encoder.layer):
            hidden_states = layer(hidden_states, self_mask, encoder_hidden_states, cross_mask, cache, index)
        if cache is not None:
            cache.length += input_ids.shape[1]
        pooled = self.pooler(hidden_states) if self.pooler is not None else None
        return TextModelOutput(last_hidden_state=hidden_states, pooler_output=pooled)

    def new_cache(
        self,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        rows_per_image: int,
        max_length: int,
    ) -> DecoderCache:
        """Preallocate a decoding cache and compute every layer's cross-attention K/V once per image.

        encoder_hidden_states ``[images, N_ctx, D_ctx]``; the cache serves ``images * rows_per_image`` rows.
        """
        images = encoder_hidden_states.shape[0]
        rows = images * rows_per_image
        heads = self.config.num_attention_heads
        head_dim = self.config.hidden_size // heads
        layers = self.encoder.layer
        shape = (rows, heads, max_length, head_dim)
        dtype, device = encoder_hidden_states.dtype, encoder_hidden_states.device
        cross = [layer.crossattention.self.project_kv(encoder_hidden_states) for layer in layers]
        return DecoderCache(
            self_keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in layers],
            self_values=[torch.zeros(shape, dtype=dtype, device=device) for _ in layers],
            cross_keys=[key for key, _ in cross],
            cross_values=[value for _, value in cross],
            cross_mask=context_attention_mask(encoder_attention_mask, dtype),
            rows_per_image=rows_per_image,
        )


class BlipTextPredictionHeadTransform(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = activation(config.hidden_act)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class BlipTextLMPredictionHead(nn.Module):
    """Transform + vocabulary projection; ``decoder.weight`` is tied to the word embeddings by the owner."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.transform = BlipTextPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states))


class BlipTextOnlyMLMHead(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.predictions = BlipTextLMPredictionHead(config)


class BlipTextLMHeadModel(nn.Module):
    """The image-grounded decoder: MED stack (causal) + LM head tied to the word embeddings."""

    def __init__(self, config: TextConfig, encoder_width: int) -> None:
        super().__init__()
        self.config = config
        self.bert = BlipTextModel(config, encoder_width, add_pooling_layer=False)
        self.cls = BlipTextOnlyMLMHead(config)
        self.tie_weights()

    def tie_weights(self) -> None:
        """LM head = word embeddings; the output bias also answers to ``cls.predictions.bias`` like HuggingFace."""
        predictions = self.cls.predictions
        predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        predictions.bias = predictions.decoder.bias

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        reduction: str = "mean",
        is_decoder: bool = True,
        cache: DecoderCache | None = None,
        label_smoothing: float | None = None,
    ) -> CausalLMOutput:
        """Logits ``[B, L, V]``; with ``labels [B, L]`` (-100 ignored) also the next-token loss.

        ``reduction="none"`` returns the per-sequence summed loss ``[B]`` (used to rank VQA answers).
        ``label_smoothing`` defaults to the config's.
        """
        hidden_states = self.bert(
            input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask, is_decoder, cache
        ).last_hidden_state
        logits = self.cls.predictions(hidden_states)
        loss = None
        if labels is not None:
            smoothing = self.config.label_smoothing if label_smoothing is None else label_smoothing
            loss = ops.lm_loss(logits, labels, smoothing, reduction)
        return CausalLMOutput(loss=loss, logits=logits)
