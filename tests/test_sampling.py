"""The graph-safe sampler (blip_fast/sampling.py, kernels/sampling.py): Philox against Random123's known answers,
the kept set against HuggingFace's TopK/TopP warpers, the draws against the exact distribution (chi-square), and
the Triton kernels (interpreter on CPU) against the torch reference, bit for bit."""

from __future__ import annotations

import pytest
import torch

from blip_fast import sampling
from tests.tiny_models import assert_close

transformers = pytest.importorskip("transformers")
from transformers.generation import logits_process as hf_processors  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _int(value: int) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64)


@pytest.mark.parametrize("counter,key,expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter, key, expected):
    """Random123's Philox-4x32-10 test vectors (kat_vectors)."""
    words = sampling.philox4x32(tuple(map(_int, counter)), tuple(map(_int, key)))
    assert tuple(int(word) for word in words) == expected


def _hf_filtered(scores, top_k, top_p, min_keep):
    """HuggingFace's warpers in its order (TopK then TopP) -> probabilities over the vocabulary."""
    filtered = scores.clone()
    if top_k:
        filtered = hf_processors.TopKLogitsWarper(max(top_k, min_keep), min_tokens_to_keep=min_keep)(None, filtered)
    if top_p < 1.0:
        filtered = hf_processors.TopPLogitsWarper(top_p, min_tokens_to_keep=min_keep)(None, filtered)
    return filtered.softmax(dim=-1)


def _our_filtered(scores, top_k, top_p, min_keep):
    """Our kept set and probabilities, scattered back to the vocabulary: the sampler's ``kept`` and ``probs``."""
    vocab = scores.shape[-1]
    if top_k and top_k < vocab:
        values, indices = scores.topk(min(vocab, max(top_k, min_keep) + sampling.TIE_SLACK), dim=-1)
        k = max(top_k, min_keep)
    else:
        values, indices = scores.sort(dim=-1, descending=True)
        k = vocab
    log_probs = sampling.filtered_log_probs(values, k, top_p, min_keep)
    return torch.zeros_like(scores).scatter_(1, indices, log_probs.exp())


@pytest.mark.parametrize("top_k,top_p,min_keep", [(50, 0.9, 1), (5, 1.0, 1), (5, 0.5, 2), (0, 0.8, 1),
                                                  (3, 0.05, 1), (40, 0.97, 2)])
def test_kept_distribution_equals_huggingface(top_k, top_p, min_keep):
    scores = torch.randn(16, 97) * 3
    scores[0, :10] = scores[0, 20]  # ties with the k-th score survive, as in HuggingFace
    scores[1, 5] = float("-inf")  # a token another processor already removed
    assert_close(_our_filtered(scores, top_k, top_p, min_keep), _hf_filtered(scores, top_k, top_p, min_keep),
                 rtol=0, atol=2e-6)


def test_draws_follow_the_filtered_distribution():
    """Chi-square goodness of fit: 12,000 independent draws (one per row counter) of one row's distribution (the
    least likely kept token is expected ~90 times)."""
    scores = torch.randn(1, 90) * 1.5
    expected = _hf_filtered(scores, 50, 0.9, 1)[0]
    draws = 12_000
    values, indices = scores.expand(draws, -1).topk(50 + sampling.TIE_SLACK, dim=-1)
    tokens = sampling._sample_sorted_reference(values, indices, 50, 0.9, 1, _int(1234), 3)
    counts = torch.bincount(tokens, minlength=90).double()
    support = expected > 0
    assert counts[~support].sum() == 0, "drew a token outside the filtered support"
    expected_counts = expected[support].double() * draws
    statistic = ((counts[support] - expected_counts) ** 2 / expected_counts).sum()
    dof = int(support.sum()) - 1
    p_value = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2).item()
    assert p_value > 1e-4, f"chi-square {statistic.item():.1f} on {dof} dof: p = {p_value:.2e}"


def test_draws_depend_on_seed_step_and_row_only():
    values, indices = (torch.randn(8, 30) * 2).sort(dim=-1, descending=True)
    draw = lambda seed, step: sampling._sample_sorted_reference(values, indices, 20, 0.95, 1, _int(seed), step)  # noqa: E731
    assert torch.equal(draw(5, 2), draw(5, 2))
    assert not torch.equal(draw(5, 2), draw(6, 2)) and not torch.equal(draw(5, 2), draw(5, 3))


def test_seed_from_generator_is_reproducible():
    first = sampling.seed_from(torch.Generator().manual_seed(3), torch.device("cpu"))
    assert torch.equal(first, sampling.seed_from(torch.Generator().manual_seed(3), torch.device("cpu")))
    torch.manual_seed(9)
    global_first = sampling.seed_from(None, torch.device("cpu"))
    torch.manual_seed(9)
    assert torch.equal(global_first, sampling.seed_from(None, torch.device("cpu")))


# -------------------------------------------------------------------------------------------------- kernels
kernels = pytest.importorskip("blip_fast.kernels.sampling")


def test_kernel_uniforms_are_the_reference_bits():
    import triton
    import triton.language as tl

    @triton.jit
    def uniforms(out_ptr, seed_ptr, step, stream, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        tl.store(out_ptr + row * BLOCK + offs, kernels._uniform(tl.load(seed_ptr), offs, row, step, stream))

    seed = torch.tensor(2**40 + 12345, device=DEVICE)
    out = torch.full((3, 64), float("nan"), device=DEVICE)
    uniforms[(3,)](out, seed, 7, 1, BLOCK=64)
    expected = sampling.philox_uniform(seed.cpu(), torch.arange(64)[None, :], torch.arange(3)[:, None], 7, 1)
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("top_k,top_p,min_keep,width", [(50, 0.9, 1, 66), (5, 0.5, 2, 21), (30, 1.0, 1, 30)])
def test_sample_sorted_kernel_draws_the_reference_tokens(top_k, top_p, min_keep, width):
    scores = torch.randn(12, 200, device=DEVICE) * 2
    values, indices = scores.topk(width, dim=-1)
    seed = torch.tensor(77, device=DEVICE)
    expected = sampling._sample_sorted_reference(values, indices, top_k, top_p, min_keep, seed, 4)
    actual = kernels.sample_sorted(values, indices, top_k, top_p, min_keep, seed, 4)
    assert torch.equal(actual, expected)


def test_gumbel_noise_kernel_matches_reference():
    seed = torch.tensor(99, device=DEVICE)
    expected = sampling._gumbel_noise_reference(seed, 3, 70, 5, sampling.BEAM_STREAM)
    actual = kernels.gumbel_noise(seed, 3, 70, 5, sampling.BEAM_STREAM, seed.device)
    assert_close(actual, expected, rtol=1e-6)
