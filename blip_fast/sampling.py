"""Graph-safe sampling for ``generate``: top-k first, top-p and the draw on the survivors, seeded on the device.

HuggingFace samples by filtering the whole vocabulary (a full sort for top-p) and calling ``torch.multinomial``
with the global RNG. That is exact and reproducible, and blip_fast keeps it as the ``"multinomial"`` sampler (same
draws as HuggingFace under the same seed). Inside a CUDA graph it is neither cheap nor possible as is, so the
``"gumbel"`` sampler draws from the *same filtered distribution* differently:

1. ``torch.topk`` fetches each row's ``top_k + TIE_SLACK`` best scores, sorted (one kernel instead of a sort of
   30,524 entries); the slack keeps HuggingFace's rule that every score equal to the k-th one survives, for up to
   ``TIE_SLACK`` such ties.
2. :func:`sample_sorted` (one Triton kernel per step on CUDA) applies top-p with ``min_tokens_to_keep`` to those
   survivors and draws by an exponential race (Gumbel-max) with Philox noise keyed by a seed in device memory and
   counters (rank, row, step, stream): a captured graph replays with a new seed per call, and a call is
   reproducible from its seed.

Without top-k (``top_k`` 0/None) the rows are fully sorted instead. Beam sampling draws its ``2 * num_beams``
candidates without replacement by Gumbel-top-k over :func:`gumbel_noise`. The references here replicate Triton's
Philox and uniform conversion in torch integer ops, bit for bit: they are the CPU path and the kernels' oracle.
"""

from __future__ import annotations

import torch
from torch import Tensor

from blip_fast import ops

#: Candidates fetched beyond ``top_k``, so that scores tied with the k-th one survive as in HuggingFace.
TIE_SLACK = 16
#: Philox-4x32 constants (Salmon et al. 2011; Triton's ``philox_impl``).
_KEY_A, _KEY_B, _ROUND_A, _ROUND_B = 0x9E3779B9, 0xBB67AE85, 0xD2511F53, 0xCD9E8D57
_LOW32 = 0xFFFFFFFF
#: Triton's ``uint_to_uniform_float`` scale for 32-bit words.
_UNIFORM_SCALE = 4.6566127342e-10
#: Counter streams: the token draw and the beam-sampling noise never share counters.
TOKEN_STREAM, BEAM_STREAM = 0, 1


def _mul_hi_lo(a: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of ``a * b`` for 32-bit ``a`` (int64 tensor) and ``b``, without int64 overflow."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    low_low, low_high, high_low = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo
    middle = (low_low >> 16) + (low_high & 0xFFFF) + (high_low & 0xFFFF)
    low = ((middle & 0xFFFF) << 16) | (low_low & 0xFFFF)
    high = (a_hi * b_hi + (low_high >> 16) + (high_low >> 16) + (middle >> 16)) & _LOW32
    return high, low


def philox4x32(counter: tuple[Tensor, Tensor, Tensor, Tensor], key: tuple[Tensor, Tensor]) -> tuple[Tensor, ...]:
    """Philox-4x32-10 of 32-bit words held in int64 tensors (Random123's, as Triton's ``philox_impl`` computes it)."""
    c0, c1, c2, c3 = counter
    key0, key1 = key
    for _ in range(10):
        high_b, low_b = _mul_hi_lo(c2, _ROUND_B)
        high_a, low_a = _mul_hi_lo(c0, _ROUND_A)
        c0, c1, c2, c3 = high_b ^ c1 ^ key0, low_b, high_a ^ c3 ^ key1, low_a
        key0, key1 = (key0 + _KEY_A) & _LOW32, (key1 + _KEY_B) & _LOW32
    return c0, c1, c2, c3


def philox_uniform(seed: Tensor, columns: Tensor, rows: Tensor, step: int, stream: int) -> Tensor:
    """Triton's ``uint_to_uniform_float(philox(seed, column, row, step, stream)[0])`` in torch: fp32 in [0, 1).

    seed a 0-d int64 tensor (its 64 bits are the key), columns/rows int64 tensors broadcasting together."""
    zero = torch.zeros(torch.broadcast_shapes(columns.shape, rows.shape), dtype=torch.int64, device=columns.device)
    counter = ((columns & _LOW32) + zero, (rows & _LOW32) + zero, zero + (step & _LOW32), zero + (stream & _LOW32))
    word = philox4x32(counter, (seed & _LOW32, (seed >> 32) & _LOW32))[0]
    signed = torch.where(word >= 2**31, word - 2**32, word)
    magnitude = torch.where(signed < 0, -signed - 1, signed)
    return magnitude.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


# ------------------------------------------------------------------------------------------- sample_sorted
def filtered_log_probs(values: Tensor, top_k: int, top_p: float, min_keep: int) -> Tensor:
    """Log-probabilities ``[R, W]`` of sorted scores ``values`` (descending) after HuggingFace's TopK (``top_k``,
    ties with the k-th score kept) and TopP (``top_p``, ``min_keep``) warpers, renormalised; -inf where removed."""
    values = values.float()
    kept = values >= values[:, top_k - 1 : top_k]
    top = torch.where(kept, values, -float("inf")).amax(dim=1, keepdim=True)
    weights = torch.where(kept, torch.exp(values - top), 0.0)
    probs = weights / weights.sum(dim=1, keepdim=True)
    tail = 1.0 - probs.cumsum(dim=1) + probs  # probability of this token and every less likely one
    ranks = torch.arange(values.shape[1], device=values.device)
    kept &= (tail > 1.0 - top_p) | (ranks < min_keep)
    log_probs = torch.where(kept, torch.log(probs), -float("inf"))
    return log_probs - log_probs.logsumexp(dim=1, keepdim=True)  # renormalised over the survivors


@ops.register("sample_sorted", "reference")
def _sample_sorted_reference(values, indices, top_k, top_p, min_keep, seed, step):
    rows, width = values.shape
    uniform = philox_uniform(seed, torch.arange(width, device=values.device)[None, :],
                             torch.arange(rows, device=values.device)[:, None], step, TOKEN_STREAM)
    race = filtered_log_probs(values, top_k, top_p, min_keep) - torch.log(-torch.log(uniform))
    return indices.gather(1, race.argmax(dim=1, keepdim=True)).squeeze(1)


@ops.register("sample_sorted", "triton", available=lambda device: device.type == "cuda")
def _sample_sorted_triton(values, indices, top_k, top_p, min_keep, seed, step):
    from blip_fast.kernels import sampling

    if values.shape[1] > sampling.MAX_WIDTH:  # no top-k: a fully sorted row, beyond one program's block
        return _sample_sorted_reference(values, indices, top_k, top_p, min_keep, seed, step)
    return sampling.sample_sorted(values, indices, top_k, top_p, min_keep, seed, step)


@torch.library.custom_op("blip_fast::sample_sorted", mutates_args=())
def _sample_sorted_op(values: Tensor, indices: Tensor, top_k: int, top_p: float, min_keep: int, seed: Tensor,
                      step: int) -> Tensor:
    return ops.resolve("sample_sorted", values.device)(values, indices, top_k, top_p, min_keep, seed, step)


@_sample_sorted_op.register_fake
def _(values, indices, top_k, top_p, min_keep, seed, step):
    return indices.new_empty(values.shape[:1])


def sample_sorted(values: Tensor, indices: Tensor, top_k: int, top_p: float, min_keep: int, seed: Tensor,
                  step: int) -> Tensor:
    """One token id per row, drawn from the top-k (ties kept) then top-p filtered softmax of sorted scores.

    values ``[R, W]`` fp32, descending; indices ``[R, W]`` their token ids; ``top_k <= W``; seed 0-d int64 device
    tensor; ``step`` a counter that differs between the draws of one call. Returns ``[R]`` int64.
    """
    return torch.ops.blip_fast.sample_sorted(values, indices, top_k, top_p, min_keep, seed, step)


def sample(scores: Tensor, top_k: int | None, top_p: float, temperature: float, min_keep: int, seed: Tensor,
           step: int) -> Tensor:
    """HuggingFace's temperature -> top-k -> top-p -> draw on processed scores ``[R, V]`` (fp32), graph-safe."""
    if temperature != 1.0:
        scores = scores / temperature
    vocab = scores.shape[-1]
    if top_k and top_k < vocab:
        top_k = max(top_k, min_keep)
        values, indices = scores.topk(min(vocab, top_k + TIE_SLACK), dim=-1)
    else:
        top_k = vocab
        values, indices = scores.sort(dim=-1, descending=True)
    return sample_sorted(values, indices, min(top_k, values.shape[1]), top_p, min_keep, seed, step)


# -------------------------------------------------------------------------------------------- gumbel_noise
@ops.register("gumbel_noise", "reference")
def _gumbel_noise_reference(seed, rows, columns, step, stream):
    device = seed.device
    uniform = philox_uniform(seed, torch.arange(columns, device=device)[None, :],
                             torch.arange(rows, device=device)[:, None], step, stream)
    return -torch.log(-torch.log(uniform))


@ops.register("gumbel_noise", "triton", available=lambda device: device.type == "cuda")
def _gumbel_noise_triton(seed, rows, columns, step, stream):
    from blip_fast.kernels import sampling

    return sampling.gumbel_noise(seed, rows, columns, step, stream, seed.device)


@torch.library.custom_op("blip_fast::gumbel_noise", mutates_args=())
def _gumbel_noise_op(seed: Tensor, rows: int, columns: int, step: int, stream: int) -> Tensor:
    return ops.resolve("gumbel_noise", seed.device)(seed, rows, columns, step, stream)


@_gumbel_noise_op.register_fake
def _(seed, rows, columns, step, stream):
    return seed.new_empty((rows, columns), dtype=torch.float32)


def gumbel_noise(seed: Tensor, rows: int, columns: int, step: int, stream: int = BEAM_STREAM) -> Tensor:
    """``[rows, columns]`` Gumbel(0, 1) noise (fp32) for counters (column, row, step, stream)."""
    return torch.ops.blip_fast.gumbel_noise(seed, rows, columns, step, stream)


def seed_from(generator: torch.Generator | None, device: torch.device) -> Tensor:
    """A fresh 63-bit seed drawn from ``generator`` (or torch's default one for its device), as a 0-d int64
    tensor on ``device``: reproducible under ``torch.manual_seed``/a seeded generator, advancing it per call."""
    source = generator.device if generator is not None else device
    seed = torch.randint(0, 2**62, (), generator=generator, device=source, dtype=torch.int64)
    return seed.to(device, non_blocking=True)
