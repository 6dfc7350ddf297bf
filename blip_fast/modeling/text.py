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

from dataclasses import dataclass, field

import torch
from torch import nn

from blip_fast import ops
from blip_fast.config import TextConfig
from blip_fast.modeling.common import activation
from blip_fast.modeling.outputs import CausalLMOutput, TextModelOutput


@dataclass
class DecoderCache:
    """Attention state carried between decoding steps.

    ``self_kv``: ``[2, layers, rows, H, max_length, Dh]`` (keys, then values), filled up to ``length``; one tensor
    so a beam reorder is one gather. ``cross_keys[i]``/``cross_values[i]``: ``[images, H, N_ctx, Dh]``, one copy
    per image; row ``r`` belongs to image ``r // rows_per_image``. ``cross_mask``: additive ``[images, 1, 1, N_ctx]``
    or None.
    """

    self_kv: torch.Tensor
    cross_keys: list[torch.Tensor]
    cross_values: list[torch.Tensor]
    cross_mask: torch.Tensor | None
    rows_per_image: int
    length: int = 0
    #: Flat buffer the size of ``self_kv``, allocated at the first reorder and reused by every later one.
    reorder_scratch: torch.Tensor | None = field(default=None, repr=False)

    @property
    def self_keys(self) -> torch.Tensor:
        """``[layers, rows, H, max_length, Dh]``."""
        return self.self_kv[0]

    @property
    def self_values(self) -> torch.Tensor:
        return self.self_kv[1]

    @property
    def max_length(self) -> int:
        return self.self_kv.shape[4]

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the fed tokens' self-attention K/V ``[R, H, T, Dh]`` at ``length``; return the filled prefix
        ``[R, H, length + T, Dh]`` to attend over."""
        rows = key.shape[0]
        keys, values = self.self_kv[0, layer, :rows], self.self_kv[1, layer, :rows]
        end = self.length + key.shape[2]
        keys[:, :, self.length : end] = key
        values[:, :, self.length : end] = value
        return keys[:, :, :end], values[:, :, :end]

    def cross_context(
        self, layer: int, rows: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The cached cross-attention key, value and mask of the images that ``rows`` fed rows belong to."""
        images = rows // self.rows_per_image
        mask = None if self.cross_mask is None else self.cross_mask[:images]
        return self.cross_keys[layer][:images], self.cross_values[layer][:images], mask

    def reorder(self, rows: torch.Tensor) -> None:
        """Make row ``r`` continue the history of row ``rows[r]`` (beam search); rows must stay within their image.

        Only the filled prefix of the first ``len(rows)`` rows moves, in place: gathered into the reusable scratch and
        copied back, so buffer addresses stay fixed (CUDA graphs read them) and no step allocates.
        """
        filled = self.self_kv[:, :, : rows.shape[0], :, : self.length]  # [2, layers, R, H, length, Dh]
        if self.reorder_scratch is None:
            self.reorder_scratch = torch.empty(
                self.self_kv.numel(), dtype=self.self_kv.dtype, device=self.self_kv.device
            )
        gathered = self.reorder_scratch[: filled.numel()].view(filled.shape)
        torch.index_select(filled, 2, rows, out=gathered)
        filled.copy_(gathered)


@dataclass
class CrossContext:
    """Every layer's cross-attention K/V of a set of contexts (images), projected once and shared by many rows.

    ``keys[i]``/``values[i]``: layer ``i``'s ``[C, H, N_ctx, Dh]``. ``rows`` (LongTensor ``[R]``): the context each
    fed row attends to (ITM's matched and negative pairs index one image's K/V several times); None: row ``r``
    attends to context ``r``. Training passes one wherever it would pass ``encoder_hidden_states``: the gathers are
    differentiable, so each image's K/V gradient is the sum over its rows, as if it had been projected per row.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    rows: torch.Tensor | None = None

    def for_rows(self, rows: torch.Tensor | None) -> CrossContext:
        return CrossContext(self.keys, self.values, rows)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s key and value, one per fed row: ``[R, H, N_ctx, Dh]``."""
        key, value = self.keys[index], self.values[index]
        if self.rows is None:
            return key, value
        return key.index_select(0, self.rows), value.index_select(0, self.rows)

    @property
    def num_rows(self) -> int:
        return self.keys[0].shape[0] if self.rows is None else self.rows.shape[0]


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
        positions = torch.arange(length, device=input_ids.device) + past_length
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


class BlipTextTwinOutput(nn.Module):
    """The two cross-attention outputs of NLVR2's twin layer, each projected (``dense0``/``dense1``), then averaged
    or, with ``merge``, mixed by ``merge_layer`` over their concatenation; dropout, residual, post-LayerNorm."""

    def __init__(self, config: TextConfig, merge: bool) -> None:
        super().__init__()
        width = config.hidden_size
        self.dense0, self.dense1 = nn.Linear(width, width), nn.Linear(width, width)
        self.merge_layer = nn.Linear(2 * width, width) if merge else None
        self.LayerNorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, contexts: tuple[torch.Tensor, torch.Tensor], residual: torch.Tensor) -> torch.Tensor:
        first, second = self.dense0(contexts[0]), self.dense1(contexts[1])
        if self.merge_layer is None:
            mixed = (first + second) / 2
        else:
            mixed = self.merge_layer(torch.cat([first, second], dim=-1))
        return self.LayerNorm(self.dropout(mixed) + residual)


class BlipTextTwinCrossAttention(nn.Module):
    """NLVR2's cross-attention over an image pair (the original ``nlvr_encoder.py``): one query/key/value set per
    image (``self0``/``self1``) and the :class:`BlipTextTwinOutput` that combines them."""

    def __init__(self, config: TextConfig, context_width: int, merge: bool) -> None:
        super().__init__()
        self.self0 = BlipTextSelfAttention(config, context_width)
        self.self1 = BlipTextSelfAttention(config, context_width)
        self.output = BlipTextTwinOutput(config, merge)

    def forward(self, hidden_states: torch.Tensor, contexts: tuple[torch.Tensor, torch.Tensor],
                masks: tuple[torch.Tensor | None, torch.Tensor | None]) -> torch.Tensor:
        attended = []
        for attention, context, mask in zip((self.self0, self.self1), contexts, masks, strict=True):
            key, value = attention.project_kv(context)
            attended.append(attention(hidden_states, key, value, mask))
        return self.output(tuple(attended), hidden_states)


class BlipTextLayer(nn.Module):
    """Self-attention, cross-attention (or NLVR2's twin cross-attention, ``twin``/``merge``), FFN."""

    def __init__(self, config: TextConfig, encoder_width: int, twin: bool = False, merge: bool = False) -> None:
        super().__init__()
        self.attention = BlipTextAttention(config, config.hidden_size)
        if twin:
            self.crossattention = BlipTextTwinCrossAttention(config, encoder_width, merge)
        else:
            self.crossattention = BlipTextAttention(config, encoder_width)
        self.intermediate = BlipTextIntermediate(config)
        self.output = BlipTextSelfOutput(config, config.intermediate_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        self_mask: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor | CrossContext | None,
        cross_mask: torch.Tensor | None,
        cache: DecoderCache | None,
        layer_index: int,
        rows_per_context: int = 1,
    ) -> torch.Tensor:
        """``rows_per_context``: consecutive rows sharing one context (image) of ``encoder_hidden_states``."""
        if cache is None:
            if isinstance(self.crossattention, BlipTextTwinCrossAttention):
                return self.block(hidden_states, self_mask, None, cross_mask, image_pair=encoder_hidden_states)
            cross_kv = None
            if isinstance(encoder_hidden_states, CrossContext):
                cross_kv = encoder_hidden_states.layer(layer_index)
            elif encoder_hidden_states is not None:
                cross_kv = self.crossattention.self.project_kv(encoder_hidden_states)
            return self.block(hidden_states, self_mask, cross_kv, cross_mask, rows_per_context=rows_per_context)

        attention = self.attention.self
        key, value = cache.append(layer_index, *attention.project_kv(hidden_states))
        context = attention(hidden_states, key, value, self_mask)
        hidden_states = self.attention.output(context, hidden_states)
        key, value, cached_mask = cache.cross_context(layer_index, hidden_states.shape[0])
        context = self.crossattention.self(
            hidden_states, key, value, cached_mask, cache.rows_per_image, cached_context=True
        )
        hidden_states = self.crossattention.output(context, hidden_states)
        return self.output(self.intermediate(hidden_states), hidden_states)

    def block(
        self,
        hidden_states: torch.Tensor,
        self_mask: torch.Tensor | None,
        cross_kv: tuple[torch.Tensor, torch.Tensor] | None,
        cross_mask: torch.Tensor | tuple | None,
        image_pair: tuple[torch.Tensor, torch.Tensor] | None = None,
        rows_per_context: int = 1,
    ) -> torch.Tensor:
        """The layer without a decoding cache: self-attention, cross-attention over ``cross_kv`` (key, value
        ``[B, H, N_ctx, Dh]``) when given, FFN. Tensors in, tensor out: the region :func:`compile_layers` compiles
        (one graph serves every layer). ``image_pair`` (NLVR2): the twin cross-attention reads the two images'
        states instead."""
        attention = self.attention.self
        context = attention(hidden_states, *attention.project_kv(hidden_states), self_mask)
        hidden_states = self.attention.output(context, hidden_states)
        if image_pair is not None:
            hidden_states = self.crossattention(hidden_states, image_pair, cross_mask)
        elif cross_kv is not None:
            context = self.crossattention.self(hidden_states, *cross_kv, cross_mask, rows_per_context)
            hidden_states = self.crossattention.output(context, hidden_states)
        return self.output(self.intermediate(hidden_states), hidden_states)


class BlipTextEncoder(nn.Module):
    def __init__(self, config: TextConfig, encoder_width: int, twin_merge_from: int | None = None) -> None:
        super().__init__()
        twin = twin_merge_from is not None
        self.layer = nn.ModuleList(
            BlipTextLayer(config, encoder_width, twin, merge=twin and index >= twin_merge_from)
            for index in range(config.num_hidden_layers)
        )


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
    causal. With a ``cache`` (decoding), cross-attention reads the cached per-image K/V instead; with a
    :class:`CrossContext` (training, from :meth:`project_context`), K/V projected once and gathered per row.
    ``twin_merge_from`` (NLVR2) gives every layer a twin cross-attention over a pair of images, passed as a pair of
    ``encoder_hidden_states`` (and masks); layers from that index on merge the pair with a linear layer.
    ``rows_per_context`` > 1: ``encoder_hidden_states [C, N_ctx, D_ctx]`` holds one context per ``rows_per_context``
    consecutive rows (an image's captions, CapFilt's filter): each context's K/V are projected once and its rows
    attend as extra query rows, instead of one projection per row.
    """

    def __init__(self, config: TextConfig, encoder_width: int, add_pooling_layer: bool = False,
                 twin_merge_from: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BlipTextEmbeddings(config)
        self.encoder = BlipTextEncoder(config, encoder_width, twin_merge_from)
        self.pooler = BlipTextPooler(config) if add_pooling_layer else None

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | CrossContext | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        is_decoder: bool = False,
        cache: DecoderCache | None = None,
        rows_per_context: int = 1,
    ) -> TextModelOutput:
        past_length = cache.length if cache is not None else 0
        hidden_states = self.embeddings(input_ids, past_length)
        dtype, device = hidden_states.dtype, hidden_states.device
        self_mask = self_attention_mask(
            attention_mask, input_ids.shape[1], past_length, causal=is_decoder or cache is not None, dtype=dtype,
            device=device,
        )
        cross_mask = None
        if isinstance(encoder_hidden_states, (tuple, list)):  # NLVR2's image pair
            masks = encoder_attention_mask or (None, None)
            cross_mask = tuple(context_attention_mask(mask, dtype) for mask in masks)
        elif isinstance(encoder_hidden_states, CrossContext):
            # No mask means every context position is attended (a ones mask adds zeros; SDPA's fastest kernels
            # take no mask).
            cross_mask = context_attention_mask(encoder_attention_mask, dtype)
        elif encoder_hidden_states is not None and cache is None:
            if encoder_attention_mask is None:
                encoder_attention_mask = torch.ones(encoder_hidden_states.shape[:2], device=device)
            cross_mask = context_attention_mask(encoder_attention_mask, dtype)
        for index, layer in enumerate(self.encoder.layer):
            hidden_states = layer(hidden_states, self_mask, encoder_hidden_states, cross_mask, cache, index,
                                  rows_per_context)
        if cache is not None:
            cache.length += input_ids.shape[1]
        pooled = self.pooler(hidden_states) if self.pooler is not None else None
        return TextModelOutput(last_hidden_state=hidden_states, pooler_output=pooled)

    def _self_kv_buffer(self, rows: int, max_length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        heads = self.config.num_attention_heads
        shape = (2, len(self.encoder.layer), rows, heads, max_length, self.config.hidden_size // heads)
        return torch.zeros(shape, dtype=dtype, device=device)

    def project_context(self, encoder_hidden_states: torch.Tensor) -> CrossContext:
        """Every layer's cross-attention K/V of ``[C, N_ctx, D_ctx]`` context states, once, for many rows (training:
        ITM's pairs and the decoder share them; see :class:`CrossContext`). Keeps the autograd graph."""
        keys, values = zip(*self._cross_kv(encoder_hidden_states))
        return CrossContext(list(keys), list(values))

    def _cross_kv(self, encoder_hidden_states: torch.Tensor):
        """Each layer's cross-attention (key, value) ``[images, H, N_ctx, Dh]`` of ``[images, N_ctx, D_ctx]``."""
        return (layer.crossattention.self.project_kv(encoder_hidden_states) for layer in self.encoder.layer)

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
        dtype, device = encoder_hidden_states.dtype, encoder_hidden_states.device
        cross = list(self._cross_kv(encoder_hidden_states))
        return DecoderCache(
            self_kv=self._self_kv_buffer(images * rows_per_image, max_length, dtype, device),
            cross_keys=[key for key, _ in cross],
            cross_values=[value for _, value in cross],
            cross_mask=context_attention_mask(encoder_attention_mask, dtype),
            rows_per_image=rows_per_image,
        )


def decoder_inputs_and_targets(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, bos_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's LM training pair from tokenized ``[CLS] text [SEP]`` rows: ``[DEC]`` written over ``[CLS]``, and the
    same ids as targets with padding set to -100 (the loss shifts them by one)."""
    decoder_ids = input_ids.clone()
    decoder_ids[:, 0] = bos_token_id
    return decoder_ids, decoder_ids.masked_fill(attention_mask == 0, -100)


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
        encoder_hidden_states: torch.Tensor | CrossContext | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        reduction: str = "mean",
        is_decoder: bool = True,
        cache: DecoderCache | None = None,
        label_smoothing: float | None = None,
        return_logits: bool = True,
    ) -> CausalLMOutput:
        """Logits ``[B, L, V]``; with ``labels [B, L]`` (-100 ignored) also the next-token loss.

        ``reduction="none"`` returns the per-sequence summed loss ``[B]`` (used to rank VQA answers).
        ``label_smoothing`` defaults to the config's. ``return_logits=False`` (training, mean loss): the loss only,
        through :func:`blip_fast.ops.lm_head_loss`, whose fast backends never store the logits.
        """
        hidden_states = self.bert(
            input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask, is_decoder, cache
        ).last_hidden_state
        smoothing = self.config.label_smoothing if label_smoothing is None else label_smoothing
        predictions = self.cls.predictions
        if not return_logits and labels is not None and reduction == "mean":
            loss = ops.lm_head_loss(predictions.transform(hidden_states), predictions.decoder.weight,
                                    predictions.decoder.bias, labels, smoothing)
            return CausalLMOutput(loss=loss, logits=None)
        logits = predictions(hidden_states)
        loss = None if labels is None else ops.lm_loss(logits, labels, smoothing, reduction)
        return CausalLMOutput(loss=loss, logits=logits)

    def decode_step(self, input_ids: torch.Tensor, position: torch.Tensor, keep: torch.Tensor, cache, weights,
                    history: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits ``[R, V]`` (model dtype) of the static step: :func:`blip_fast.modeling.decode_step.
        decode_step` (fixed shapes and addresses, the code CUDA graphs capture)."""
        from blip_fast.modeling import decode_step

        return decode_step.decode_step(self, input_ids, position, keep, cache, weights, history)
