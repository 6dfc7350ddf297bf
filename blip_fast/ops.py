"""The functional API the models call; the single place that picks an implementation.

Every op has a pure-torch *reference* — the oracle for tests and the CPU path. Fast backends (Triton kernels
from ``blip_fast.kernels``, CUDA ops from ``blip_fast._C``, pure-torch algorithms that beat the reference on any
device, e.g. chunked to save memory) register themselves per op; ``BLIP_FAST_BACKEND=reference|torch|triton|cuda|
auto`` forces a choice (``auto``: the fastest available for the device, in the order cuda, triton, torch).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

BACKENDS = ("reference", "torch", "triton", "cuda")

# op name -> backend name -> (implementation, predicate telling whether it can run on a device)
_REGISTRY: dict[str, dict[str, tuple[Callable, Callable[[torch.device], bool]]]] = {}


def register(op: str, backend: str, available: Callable[[torch.device], bool] = lambda device: True):
    """Decorator: make ``fn`` the ``backend`` implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def decorate(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op, {})[backend] = (fn, available)
        return fn

    return decorate


def requested_backend() -> str:
    backend = os.environ.get("BLIP_FAST_BACKEND", "auto")
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"BLIP_FAST_BACKEND={backend!r}; expected one of {BACKENDS + ('auto',)}")
    return backend


def resolve(op: str, device: torch.device, shape: dict | None = None) -> Callable:
    """The implementation of ``op`` to use on ``device`` under the current ``BLIP_FAST_BACKEND``. Under ``auto``, an
    op with a measured-timings table for this GPU (:mod:`blip_fast.backend_table`) runs the backend measured fastest
    at the call's ``shape`` (images, rows, keys, head_dim, dtype); otherwise the fixed preference applies."""
    implementations = _REGISTRY[op]
    backend = requested_backend()
    if backend != "auto":
        if backend not in implementations:
            raise RuntimeError(f"BLIP_FAST_BACKEND={backend}: op {op!r} has no {backend} implementation")
        fn, available = implementations[backend]
        if not available(device):
            raise RuntimeError(f"BLIP_FAST_BACKEND={backend}: op {op!r} cannot run on {device}")
        return fn
    if shape is not None:
        from blip_fast import backend_table

        measured = backend_table.fastest(op, device, **shape)
        if measured in implementations and implementations[measured][1](device):
            return implementations[measured][0]
    for name in ("cuda", "triton", "torch", "reference"):
        if name in implementations and implementations[name][1](device):
            return implementations[name][0]
    raise RuntimeError(f"no implementation of op {op!r} can run on {device}")


def attention_shape(query: torch.Tensor, key: torch.Tensor, rows_per_image: int) -> dict:
    """The decode-attention call shape a measured table is keyed by (:mod:`blip_fast.backend_table`)."""
    return dict(images=key.shape[0], rows=rows_per_image, keys=key.shape[2], head_dim=key.shape[3],
                dtype=query.dtype)


def resolved_backends(device: torch.device | str) -> dict[str, str]:
    """Each op's backend name (``cuda``, ``triton``, ``reference``) on ``device`` under the current
    ``BLIP_FAST_BACKEND``, or why it cannot run: what benchmarks and ``gpu_check.sh`` report as having run."""
    device = torch.device(device)
    names = {}
    for op, implementations in sorted(_REGISTRY.items()):
        try:
            chosen = resolve(op, device)
        except RuntimeError as error:
            names[op] = f"unavailable ({error})"
            continue
        names[op] = next(name for name, (fn, _) in implementations.items() if fn is chosen)
    return names


@register("attention", "reference")
def _attention_reference(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, dropout_p: float
) -> torch.Tensor:
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p)


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Softmax attention, scaled by ``head_dim ** -0.5``.

    query ``[B, H, Lq, Dh]``, key/value ``[B, H, Lk, Dh]``, mask additive and broadcastable to ``[B, H, Lq, Lk]``
    (0 keeps, a large negative value drops). Returns ``[B, H, Lq, Dh]``. The reference is torch SDPA, which
    dispatches to FlashAttention/cuDNN/memory-efficient kernels on CUDA.
    """
    return resolve("attention", query.device)(query, key, value, mask, dropout_p)


@register("decode_attention", "reference")
def _decode_attention_reference(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@register("decode_attention", "triton", available=lambda device: device.type == "cuda")
def _decode_attention_triton(query, key, value, mask):
    if _needs_grad(query, key, value, mask):
        return _decode_attention_reference(query, key, value, mask)  # the kernel is forward-only (decoding)
    from blip_fast.kernels.decode_attention import decode_attention as fused  # lazy: blip_fast never imports triton

    return fused(query, key, value, mask)


@functools.cache
def cuda_extension_loaded() -> bool:
    """Whether the optional CUDA extension ``blip_fast._C`` (csrc/) loads; importing it registers
    ``torch.ops.blip_fast.*``. A missing or mismatched build logs one line and leaves Triton/reference in charge."""
    try:
        import blip_fast._C  # noqa: F401
    except (ImportError, OSError) as error:
        logging.getLogger(__name__).info("blip_fast._C not loaded (%s); using the Triton/reference backends", error)
        return False
    return True


@register("decode_attention", "cuda", available=lambda device: device.type == "cuda" and cuda_extension_loaded())
def _decode_attention_cuda(query, key, value, mask):
    if _needs_grad(query, key, value, mask):
        return _decode_attention_reference(query, key, value, mask)  # the kernel is forward-only (decoding)
    return torch.ops.blip_fast.decode_attention(query, key, value, mask, query.shape[-1] ** -0.5)


def decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Decode-step attention of each image's query rows over its cached context, scaled by ``head_dim ** -0.5``.

    query ``[C, H, Mq, Dh]`` holds the ``Mq = rows_per_image * new_tokens`` rows (beams/samples) of image ``c``;
    key/value ``[C, H, N, Dh]`` are that image's cached cross-attention K/V, stored once and shared by its rows;
    mask is additive and broadcastable to ``[C, 1, 1, N]``, or None. Returns ``[C, H, Mq, Dh]``. The reference is
    SDPA; the CUDA op (``blip_fast._C``, preferred) and the Triton kernel read each image's K/V once for all its rows.
    """
    shape = attention_shape(query, key, query.shape[2])
    return resolve("decode_attention", query.device, shape)(query, key, value, mask)


def additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean/0-1 ``keep`` mask -> additive float mask: 0 where kept, ``finfo(dtype).min`` where dropped.

    The large finite value (not -inf), as HuggingFace's eager BLIP uses, keeps fully masked rows finite.
    """
    zero = torch.zeros((), dtype=dtype, device=keep.device)
    return torch.where(keep.bool(), zero, torch.finfo(dtype).min)


# ---------------------------------------------------------------------------------------------------- losses
def _positive_targets(
    row_ids: torch.Tensor | None, column_ids: torch.Tensor | None, like: torch.Tensor, columns: int
) -> torch.Tensor:
    """``[B, C]`` ground-truth distribution (dtype/device of ``like [B, D]``): the diagonal, or every column with the
    row's id, normalised per row."""
    if row_ids is None:
        return torch.eye(like.shape[0], columns, dtype=like.dtype, device=like.device)
    positives = (row_ids[:, None] == column_ids[None, :]).to(like.dtype)
    return positives / positives.sum(dim=1, keepdim=True)


def _at_least_fp32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Upcast half-precision inputs (bf16 features meeting fp32 queues under DeepSpeed) so losses accumulate in fp32."""
    return [t.float() if t.is_floating_point() and t.element_size() < 4 else t for t in tensors]


@register("itc_loss", "reference")
def _itc_loss_reference(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha,
                        image_ids, id_queue, enqueue_at=None):
    # enqueue_at needs nothing here: the concatenation below copies the queues.
    image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp = _at_least_fp32(
        image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp
    )
    image_columns = torch.cat([image_feat_m, image_queue.t()], dim=0).detach()  # [B + Q, D]
    text_columns = torch.cat([text_feat_m, text_queue.t()], dim=0).detach()
    column_ids = None if image_ids is None else torch.cat([image_ids, id_queue])
    targets = _positive_targets(image_ids, column_ids, image_feat, image_columns.shape[0])
    with torch.no_grad():
        i2t_targets = alpha * (image_feat_m @ text_columns.t() / temp).softmax(dim=1) + (1 - alpha) * targets
        t2i_targets = alpha * (text_feat_m @ image_columns.t() / temp).softmax(dim=1) + (1 - alpha) * targets
    loss_i2t = -(F.log_softmax(image_feat @ text_columns.t() / temp, dim=1) * i2t_targets).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(text_feat @ image_columns.t() / temp, dim=1) * t2i_targets).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


@register("itc_loss", "triton", available=lambda device: device.type == "cuda")
def _itc_loss_triton(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha,
                     image_ids, id_queue, enqueue_at=None):
    from blip_fast.kernels.itc import itc_loss as fused_itc_loss  # lazy: importing blip_fast never imports triton

    # Queues kept in the features' dtype with contiguous columns (the models' buffers) are read in place; others
    # are copied once per call (kernels.itc.queue_rows).
    return fused_itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha,
                          image_ids, id_queue, enqueue_at=enqueue_at)


def itc_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    temp: torch.Tensor,
    alpha: float,
    image_ids: torch.Tensor | None = None,
    id_queue: torch.Tensor | None = None,
    enqueue_at: tuple[torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """BLIP's image-text contrastive loss with momentum distillation, ``(CE_i2t + CE_t2i) / 2``.

    Rows: ``image_feat``/``text_feat`` ``[B, D]`` (L2-normalised, with gradient). Columns: the momentum features
    ``[B, D]`` followed by the queues ``[D, Q]``, all detached; half-precision inputs are computed in fp32. Targets: ``alpha * softmax(momentum similarities) +
    (1 - alpha) * positives``; positives are the diagonal, or (retrieval fine-tuning, ``image_ids [B]`` with
    ``id_queue [Q]``) every column of the same image, normalised. ``temp`` is the learnable temperature (scalar).
    ``enqueue_at = (pointer, count)`` declares that the caller overwrites queue columns ``[pointer, pointer + count)
    mod Q`` before the backward (BLIP's enqueue): the fused backend then reads the queues in place and copies just
    those columns; without it, writing to the queues before the backward is an error there.
    """
    fn = resolve("itc_loss", image_feat.device)
    return fn(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha, image_ids,
              id_queue, enqueue_at)


@register("sample_hard_negatives", "reference")
def _sample_hard_negatives_reference(image_feat, text_feat, temp, image_ids, smoothing, generator, image_columns,
                                     text_columns, column_ids):
    with torch.no_grad():
        sim_i2t = image_feat @ text_columns.t() / temp  # [B, C]
        sim_t2i = text_feat @ image_columns.t() / temp
        if image_ids is None:
            same_image = torch.eye(*sim_i2t.shape, dtype=torch.bool, device=sim_i2t.device)
        else:
            same_image = image_ids[:, None] == column_ids[None, :]
        weights_i2t = (sim_i2t.softmax(dim=1) + smoothing).masked_fill(same_image, 0)
        weights_t2i = (sim_t2i.softmax(dim=1) + smoothing).masked_fill(same_image, 0)
        negative_texts = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
        negative_images = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
    return negative_texts, negative_images


@register("sample_hard_negatives", "triton", available=lambda device: device.type == "cuda")
def _sample_hard_negatives_triton(image_feat, text_feat, temp, image_ids, smoothing, generator, image_columns,
                                  text_columns, column_ids):
    from blip_fast.kernels import itm_negatives  # lazy: importing blip_fast never imports triton

    return itm_negatives.sample_hard_negatives(image_feat, text_feat, temp, image_ids, smoothing, generator,
                                               image_columns, text_columns, column_ids)


def sample_hard_negatives(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    temp: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    smoothing: float = 1e-4,
    generator: torch.Generator | None = None,
    image_columns: torch.Tensor | None = None,
    text_columns: torch.Tensor | None = None,
    column_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM hard negatives: for each image a text, for each text an image, drawn from ``softmax(sim) + smoothing``.

    Rows are the local ITC features ``image_feat``/``text_feat`` ``[B, D]``; candidates are the columns
    ``image_columns``/``text_columns`` ``[C, D]``, by default the rows themselves. BLIP's pre-training passes the
    batch's momentum features (its ``sim_i2t[:, :bs]``: online rows x momentum columns); retrieval fine-tuning the
    rows themselves, or all ranks' rows for ``negative_all_rank``. ``sim = rows @ columns.T / temp``. Candidates of
    the same image get probability 0: the diagonal (column ``i`` of row ``i``), or equal ids (``image_ids [B]`` vs
    ``column_ids [C]``, both or neither with explicit columns). One vectorised draw per row — no Python loop and no
    host sync (the original loops over rows with ``.item()``). Returns column indices
    ``(negative_text [B], negative_image [B])``. Pre-training smooths by 1e-4, fine-tuning 0.
    """
    if image_columns is None:
        image_columns, text_columns, column_ids = image_feat, text_feat, image_ids
    elif (image_ids is None) != (column_ids is None):
        raise ValueError("sampling negatives from explicit columns takes both image_ids and column_ids, or neither "
                         "(then column i is row i's positive)")
    if image_columns.shape[0] < 2:
        raise ValueError("hard-negative mining needs at least 2 pairs per batch")
    fn = resolve("sample_hard_negatives", image_feat.device)
    return fn(image_feat, text_feat, temp, image_ids, smoothing, generator, image_columns, text_columns, column_ids)


@register("lm_loss", "reference")
def _lm_loss_reference(logits, labels, label_smoothing, reduction):
    (logits,) = _at_least_fp32(logits)
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction=reduction,
        label_smoothing=label_smoothing,
    )
    return loss.view(logits.shape[0], -1).sum(1) if reduction == "none" else loss


def lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, reduction: str = "mean"
) -> torch.Tensor:
    """Next-token cross-entropy: ``logits [B, L, V]`` predict ``labels [B, L]`` shifted by one (-100 ignored).

    ``reduction="none"`` returns the per-sequence sum ``[B]`` (answer ranking, answer-weighted VQA loss).
    """
    return resolve("lm_loss", logits.device)(logits, labels, label_smoothing, reduction)


def _next_token_rows(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ``l`` predicts label ``l + 1``: ``hidden [B, L, D]``, ``labels [B, L]`` -> ``[B(L-1), D]``, ``[B(L-1)]``."""
    return hidden[:, :-1].reshape(-1, hidden.shape[-1]), labels[:, 1:].reshape(-1)


@register("lm_head_loss", "reference")
def _lm_head_loss_reference(hidden, weight, bias, labels, label_smoothing):
    return _lm_loss_reference(F.linear(hidden, weight, bias), labels, label_smoothing, "mean")


@register("lm_head_loss", "torch")
def _lm_head_loss_chunked(hidden, weight, bias, labels, label_smoothing):
    from blip_fast.chunked_lm_loss import chunked_lm_head_loss

    rows, targets = _next_token_rows(hidden, labels)
    return chunked_lm_head_loss(rows, weight, bias, targets, label_smoothing)


@functools.cache
def liger_available() -> bool:
    """Whether Liger-Kernel (optional: ``pip install liger-kernel``) is importable for its fused linear CE."""
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


@register("lm_head_loss", "triton", available=lambda device: device.type == "cuda" and liger_available())
def _lm_head_loss_liger(hidden, weight, bias, labels, label_smoothing):
    # Liger-Kernel's fused linear cross-entropy: the same chunking with one Triton kernel per chunk for loss and
    # logits gradient (tests/test_lm_head_loss.py checks it against the reference, label smoothing and bias included).
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    rows, targets = _next_token_rows(hidden, labels)
    loss = LigerFusedLinearCrossEntropyFunction.apply(rows.contiguous(), weight, targets, bias, None, -100, 0.0,
                                                      float(label_smoothing), "mean")
    return loss[0] if isinstance(loss, tuple) else loss


def lm_head_loss(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """The LM head's projection and :func:`lm_loss` (mean) in one op: ``hidden [B, L, D]`` projected by
    ``weight [V, D]`` and ``bias [V]`` predicts ``labels [B, L]`` shifted by one (-100 ignored), label-smoothed.

    The fast backends never store the ``[B, L, V]`` logits: a chunked pure-torch function (any device,
    :mod:`blip_fast.chunked_lm_loss`) and, on CUDA with Liger-Kernel installed, its fused Triton kernel. Under
    ``torch.autocast`` the inputs are cast to the autocast dtype, as ``F.linear`` would be. Returns fp32.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return resolve("lm_head_loss", hidden.device)(hidden, weight, bias, labels, label_smoothing)
    return resolve("lm_head_loss", hidden.device)(hidden, weight, bias, labels, label_smoothing)


# ---------------------------------------------------------------------------------------------------- fp8_linear
#: float8 e4m3's largest finite value: a per-tensor scale maps a tensor's largest magnitude onto it.
E4M3_MAX = 448.0


def fp8_quantize(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``tensor`` as float8 e4m3 values and a 0-d fp32 scale (``tensor ~= values * scale``): scale = amax / 448,
    values clamped to e4m3's range (a plain cast overflows to NaN)."""
    scale = (tensor.detach().abs().amax().float() / E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (tensor.detach().float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def fp8_gemm_supported(device: torch.device) -> bool:
    """FP8 tensor-core GEMMs (``torch._scaled_mm``): CUDA compute capability 8.9+ (Ada, Hopper, Blackwell)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


@register("fp8_linear", "reference")
def _fp8_linear_reference(inputs, weight_fp8, weight_scale, bias, out_dtype):
    # Emulation: the same float8 rounding of input and weight, multiplied in fp32 (the GPU accumulates in fp32 too).
    values, scale = fp8_quantize(inputs)
    out = (values.float() * scale) @ (weight_fp8.float() * weight_scale).t()
    return out.to(out_dtype) if bias is None else out.to(out_dtype) + bias


@register("fp8_linear", "torch", available=fp8_gemm_supported)
def _fp8_linear_scaled_mm(inputs, weight_fp8, weight_scale, bias, out_dtype):
    values, scale = fp8_quantize(inputs)
    out = torch._scaled_mm(values, weight_fp8.t(), scale_a=scale, scale_b=weight_scale, out_dtype=out_dtype)
    return out if bias is None else out + bias


def fp8_linear(inputs: torch.Tensor, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
               emulate: bool = False) -> torch.Tensor:
    """``F.linear`` in FP8 with per-tensor scales: ``inputs [..., K]`` quantised per call (its own amax),
    ``weight_fp8 [N, K]`` float8 e4m3 with ``weight_scale`` (:func:`fp8_quantize`), fp32 accumulation, the result
    in ``inputs``' dtype plus ``bias [N]``. On GPUs of compute capability 8.9+ one ``torch._scaled_mm`` (K and N
    multiples of 16); ``emulate`` (and the reference backend) rounds the same way and multiplies in fp32."""
    rows = inputs.reshape(-1, inputs.shape[-1])
    backend = _fp8_linear_reference if emulate else resolve("fp8_linear", inputs.device)
    return backend(rows, weight_fp8, weight_scale, bias, inputs.dtype).reshape(*inputs.shape[:-1], -1)
