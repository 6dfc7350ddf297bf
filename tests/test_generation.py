"""The decoding engine: logits processors vs HuggingFace's, sampling, the shared cross-attention cache, errors."""

import pytest
import torch

import blip_fast
from blip_fast.generation import GenerationSettings, LogitsProcessor, _top_k, _top_p
from blip_fast.interop import sorts_sampled_beams
from tests.tiny_models import assert_close, tiny_hf_model

transformers = pytest.importorskip("transformers")
from transformers.generation import logits_process as hf_processors  # noqa: E402

SHAPE = dict(hidden=48, text_heads=3, vision_heads=4, image_size=40, patch_size=8)


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("keep", [1, 2])
def test_top_p_equals_hf(top_p, keep):
    scores = torch.randn(7, 33) * 3
    expected = hf_processors.TopPLogitsWarper(top_p, min_tokens_to_keep=keep)(None, scores.clone())
    actual = _top_p(scores, top_p, keep) if top_p < 1 else scores
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("top_k", [1, 5, 50])
def test_top_k_equals_hf(top_k):
    scores = torch.randn(7, 33)
    assert torch.equal(_top_k(scores, top_k), hf_processors.TopKLogitsWarper(top_k)(None, scores.clone()))


@pytest.mark.parametrize("penalty", [0.7, 1.3])
def test_repetition_penalty_equals_hf(penalty):
    scores, history = torch.randn(4, 20), torch.randint(0, 20, (4, 6))
    processor = LogitsProcessor(GenerationSettings(repetition_penalty=penalty), 6, eos_token_id=3,
                                ignore_for_penalty=None)
    expected = hf_processors.RepetitionPenaltyLogitsProcessor(penalty)(history, scores.clone())
    assert_close(processor(scores, history), expected)


@pytest.mark.parametrize("in_place", [False, True])
def test_repetition_penalty_is_gather_scatter_over_the_generated_ids(in_place):
    """Cost: the penalty (and the min-length mask) create no ``[R, V]`` tensor when the caller hands its scores
    over, only ``[R, T]`` ones (O(rows * length), not O(rows * vocab)); out of place they copy the scores once, as
    HuggingFace does. Both equal HuggingFace's processor, repeated ids and negative scores included."""
    from torch.utils._python_dispatch import TorchDispatchMode

    rows, vocab, length = 5, 1009, 7
    scores, history = torch.randn(rows, vocab) * 3, torch.randint(0, 12, (rows, length))  # ids repeat
    expected = hf_processors.RepetitionPenaltyLogitsProcessor(1.3)(history, scores.clone())
    expected[:, 3] = -float("inf")  # min_length 9 > 7: EOS (id 3) blocked too
    processor = LogitsProcessor(GenerationSettings(repetition_penalty=1.3, min_length=9), 1, eos_token_id=3,
                                ignore_for_penalty=None)

    class NewTensors(TorchDispatchMode):
        sizes: list[tuple[str, int]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func._schema.name.endswith("_") and isinstance(out, torch.Tensor):  # in-place ops return self
                self.sizes.append((func._schema.name, out.numel()))
            return out

    given = scores.clone()
    with NewTensors() as mode:
        actual = processor(given, history, in_place=in_place)
    assert torch.equal(actual, expected) and (actual is given) == in_place
    largest = max(numel for _, numel in mode.sizes)
    assert largest == (rows * length if in_place else rows * vocab), mode.sizes


def test_min_length_blocks_eos_until_reached():
    processor = LogitsProcessor(GenerationSettings(min_length=4), 1, eos_token_id=3, ignore_for_penalty=None)
    scores = torch.zeros(2, 10)
    assert processor(scores, torch.zeros(2, 3, dtype=torch.long))[:, 3].eq(-float("inf")).all()
    assert processor(scores, torch.zeros(2, 4, dtype=torch.long))[:, 3].eq(0).all()


@pytest.fixture(scope="module")
def captioner():
    hf_model = tiny_hf_model("BlipForConditionalGeneration", **SHAPE)
    model = blip_fast.BlipForConditionalGeneration.from_hf_model(hf_model)
    with torch.no_grad():
        for m in (hf_model, model):
            m.text_decoder.cls.predictions.bias[5] += 1.0
    return hf_model, model


def test_nucleus_sampling_is_seeded_and_varied(captioner):
    _, model = captioner
    pixel_values = torch.randn(2, 3, 40, 40)
    kwargs = dict(do_sample=True, top_p=0.9, num_return_sequences=4, max_length=12)
    first = model.generate(pixel_values, generator=torch.Generator().manual_seed(7), **kwargs)
    again = model.generate(pixel_values, generator=torch.Generator().manual_seed(7), **kwargs)
    other = model.generate(pixel_values, generator=torch.Generator().manual_seed(8), **kwargs)
    assert first.shape[0] == 8 and torch.equal(first, again)
    assert not torch.equal(first, other)
    assert len({tuple(row.tolist()) for row in first}) > 1, "samples of one image should differ"


@pytest.mark.parametrize("case", [dict(top_p=0.9), dict(top_k=5, temperature=0.7), dict(top_p=0.8, num_beams=2)])
def test_sampling_matches_hf_under_the_same_seed(captioner, case):
    """Same processors, same draws from the global RNG: identical ids to HF's sampling."""
    hf_model, model = captioner
    pixel_values = torch.randn(3, 3, 40, 40)
    torch.manual_seed(11)
    expected = hf_model.generate(pixel_values=pixel_values, do_sample=True, max_length=12, **case)
    torch.manual_seed(11)
    # Beam sampling's candidate order is the one behaviour that differs between transformers versions.
    order = dict(sort_sampled_beams=sorts_sampled_beams(transformers.__version__)) if "num_beams" in case else {}
    actual = model.generate(pixel_values, do_sample=True, max_length=12, **case, **order)
    assert torch.equal(actual, expected), f"\nours {actual.tolist()}\nhf   {expected.tolist()}"


@pytest.mark.parametrize("version, sorts", [("4.46.3", False), ("4.57.6", False), ("5.17.0", False),
                                            ("5.23.0", False), ("5.24.0", True), ("5.24.0.dev0", True),
                                            ("6.1.0", True)])
def test_beam_sampling_candidate_order_by_transformers_version(version, sorts):
    """transformers 5.24 started ranking beam sampling's drawn candidates by score (read off the released wheels'
    ``_get_top_k_continuations``); before, they stayed in draw order."""
    assert sorts_sampled_beams(version) is sorts


def test_optimize_follows_the_installed_transformers_beam_sampling(captioner):
    hf_model, _ = captioner
    fast = blip_fast.optimize(hf_model)
    assert fast.generation_defaults["sort_sampled_beams"] is sorts_sampled_beams(transformers.__version__)
    pixel_values = torch.randn(2, 3, 40, 40)
    torch.manual_seed(3)
    expected = hf_model.generate(pixel_values=pixel_values, do_sample=True, num_beams=2, max_length=10)
    torch.manual_seed(3)
    assert torch.equal(fast.generate(pixel_values, do_sample=True, num_beams=2, max_length=10), expected)


@pytest.mark.parametrize("rows_per_image", [1, 3])
def test_incremental_decoding_equals_full_forward(captioner, rows_per_image):
    """Token-by-token decoding through the cache (shared cross K/V) gives the logits of one causal forward."""
    _, model = captioner
    decoder = model.text_decoder
    image_embeds = torch.randn(2, 26, 48)
    tokens = torch.randint(6, 90, (2 * rows_per_image, 7))
    full = decoder(tokens, None, image_embeds.repeat_interleave(rows_per_image, 0)).logits
    cache = decoder.bert.new_cache(image_embeds, None, rows_per_image, max_length=10)
    stepped = [decoder(tokens[:, :3], cache=cache).logits]
    stepped += [decoder(tokens[:, i : i + 1], cache=cache).logits for i in range(3, 7)]
    assert cache.length == 7
    assert_close(torch.cat(stepped, dim=1), full)
    assert all(key.shape[0] == 2 for key in cache.cross_keys), "cross K/V must be stored once per image"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_return_sequences=2), "greedy"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(streamer=object()), "unsupported generate"),
        (dict(typical_p=0.5), "typical_p=0.5, which blip_fast does not implement"),
        (dict(generation_config=dict(num_beams=2, bad_words_ids=[[7]])), "generation_config sets bad_words_ids"),
        (dict(generation_config=3), "GenerationConfig or a dict"),
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
        (dict(max_length=1), "no room"),
    ],
)
def test_bad_generation_arguments_raise_clearly(captioner, kwargs, message):
    _, model = captioner
    with pytest.raises((ValueError, TypeError), match=message):
        model.generate(torch.randn(1, 3, 40, 40), **kwargs)


def test_decoding_reads_cached_image_kv_through_decode_attention(captioner, monkeypatch):
    """Every cached cross-attention call goes through ops.decode_attention (the fused kernel's entry on CUDA),
    with one K/V per image and all of that image's beams as query rows."""
    from blip_fast import ops

    _, model = captioner
    calls, decode_attention = [], ops.decode_attention

    def recording(query, key, value, mask=None):
        calls.append((query.shape, key.shape))
        return decode_attention(query, key, value, mask)

    monkeypatch.setattr(ops, "decode_attention", recording)
    pixel_values = torch.randn(2, 3, 40, 40)
    model.generate(pixel_values, num_beams=3, max_length=6)
    layers = len(model.text_decoder.bert.encoder.layer)
    assert len(calls) >= layers and len(calls) % layers == 0
    (query_shape, key_shape) = calls[-1]
    assert key_shape[0] == 2 and query_shape[0] == 2 and query_shape[2] == 3  # 2 images, 3 beam rows each
