"""generate() keywords HuggingFace code passes, each against transformers: ``return_dict_in_generate`` with
``scores``/``logits``/``sequences_scores``/``beam_indices``, ``no_repeat_ngram_size``, ``num_return_sequences`` with
sampling, and ``generation_config=``."""

import pytest
import torch

import blip_fast
from blip_fast.generation import GenerationSettings, LogitsProcessor
from blip_fast.interop import sorts_sampled_beams
from tests.tiny_models import assert_close, tiny_hf_model

transformers = pytest.importorskip("transformers")

SHAPE = dict(hidden=48, text_heads=3, vision_heads=4, image_size=40, patch_size=8)
EOS = 5


@pytest.fixture(scope="module")
def captioners():
    """HF and blip_fast captioners with one set of weights; a boosted [SEP] makes rows end at different steps."""
    hf_model = tiny_hf_model("BlipForConditionalGeneration", **SHAPE)
    model = blip_fast.BlipForConditionalGeneration.from_hf_model(hf_model)
    with torch.no_grad():
        for m in (hf_model, model):
            m.text_decoder.cls.predictions.bias[EOS] += 1.0
    return hf_model, model


def _images(count: int = 4) -> torch.Tensor:
    return torch.randn(count, 3, 40, 40, generator=torch.Generator().manual_seed(5))


def assert_scores_equal(actual, expected, name):
    """Per-step score tuples: same length, same -inf pattern, finite values within fp32 tolerance."""
    assert expected is not None and actual is not None, name
    assert len(actual) == len(expected), f"{name}: {len(actual)} steps, HF {len(expected)}"
    for step, (ours, theirs) in enumerate(zip(actual, expected)):
        assert torch.equal(ours.isinf(), theirs.isinf()), f"{name}[{step}]: -inf pattern differs"
        finite = ~theirs.isinf()
        assert_close(ours[finite], theirs[finite], name=f"{name}[{step}]")


def _run_both(hf_model, model, pixel_values, seed=None, **kwargs):
    if seed is not None:
        torch.manual_seed(seed)
    expected = hf_model.generate(pixel_values=pixel_values, **kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    # Beam sampling's candidate order follows the installed transformers (it changed in 5.24).
    actual = model.generate(pixel_values, sort_sampled_beams=sorts_sampled_beams(transformers.__version__), **kwargs)
    return actual, expected


OUTPUT_CASES = [
    pytest.param(dict(), None, id="greedy"),
    pytest.param(dict(min_new_tokens=2, repetition_penalty=1.2), None, id="greedy-processors"),
    pytest.param(dict(do_sample=True, top_p=0.9, num_return_sequences=3), 7, id="nucleus-ret3"),
    pytest.param(dict(num_beams=3), None, id="beam3"),
    pytest.param(dict(num_beams=4, num_return_sequences=2, length_penalty=0.7), None, id="beam4-ret2"),
    pytest.param(dict(num_beams=2, do_sample=True, top_k=10), 3, id="beam-sample"),
]


@pytest.mark.parametrize("case, seed", OUTPUT_CASES)
def test_return_dict_in_generate_matches_hf(captioners, case, seed):
    hf_model, model = captioners
    kwargs = dict(case, max_length=12, return_dict_in_generate=True, output_scores=True, output_logits=True)
    actual, expected = _run_both(hf_model, model, _images(), seed=seed, **kwargs)
    assert type(actual).__name__ == type(expected).__name__
    assert torch.equal(actual.sequences, expected.sequences), f"\nours {actual.sequences}\nhf   {expected.sequences}"
    assert torch.equal(actual[0], expected[0])
    assert_scores_equal(actual.scores, expected.scores, "scores")
    assert_scores_equal(actual.logits, expected.logits, "logits")
    if case.get("num_beams", 1) > 1:
        assert_close(actual.sequences_scores, expected.sequences_scores, name="sequences_scores")
        assert actual.beam_indices.dtype == expected.beam_indices.dtype
        assert torch.equal(actual.beam_indices, expected.beam_indices)
    else:
        assert actual.sequences.shape[0] == 4 * case.get("num_return_sequences", 1)


def test_rows_really_finish_at_different_steps(captioners):
    """Guard for the score comparisons: finished rows keep producing (padding) scores in both engines."""
    _, model = captioners
    ids = model.generate(_images(), max_length=12)
    ended = [row.tolist().index(EOS) if EOS in row.tolist() else len(row) for row in ids]
    assert min(ended) < max(ended), ids


@pytest.mark.parametrize("flags", [dict(), dict(output_scores=True), dict(output_logits=True)])
def test_output_fields_follow_the_flags(captioners, flags):
    hf_model, model = captioners
    for beams in (1, 2):
        actual, expected = _run_both(hf_model, model, _images(2), num_beams=beams, max_length=8,
                                     return_dict_in_generate=True, **flags)
        # HF also returns its own cache object (``cache``; ``past_key_values`` before 5.24); blip_fast's cache is
        # internal and not returned.
        assert list(actual.keys()) == [key for key in expected.keys() if key not in ("cache", "past_key_values")]


@pytest.mark.parametrize("stop_check_interval", [0, 3])
def test_scores_with_the_static_step_and_sparse_stop_checks(captioners, stop_check_interval):
    """The static decode step reuses its logits buffer, and sparse stop checks decode extra steps: neither may leak
    into the returned scores."""
    _, model = captioners
    for beams in (1, 3):
        kwargs = dict(num_beams=beams, max_length=14, return_dict_in_generate=True, output_scores=True)
        reference = model.generate(_images(), **kwargs)
        other = model.generate(_images(), cuda_graphs=True, stop_check_interval=stop_check_interval, **kwargs)
        assert torch.equal(other.sequences, reference.sequences)
        assert_scores_equal(other.scores, reference.scores, f"beams={beams}")


@pytest.mark.parametrize("size", [1, 2, 3])
def test_no_repeat_ngram_processor_equals_hf(size):
    sequences = torch.randint(0, 6, (5, 11))  # a small alphabet: many repeated n-grams
    scores = torch.randn(5, 9)
    expected = transformers.generation.logits_process.NoRepeatNGramLogitsProcessor(size)(sequences, scores.clone())
    processor = LogitsProcessor(GenerationSettings(no_repeat_ngram_size=size), 1, eos_token_id=8,
                                ignore_for_penalty=None)
    actual = processor(scores, sequences)
    assert torch.equal(actual, expected)
    assert actual.isinf().any(), "the case must ban something"


@pytest.mark.parametrize("case", [dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=1, num_beams=3),
                                  dict(no_repeat_ngram_size=3, num_beams=2, length_penalty=0.8)],
                         ids=["greedy-2", "beam3-1", "beam2-3"])
@pytest.mark.parametrize("prompt", [False, True], ids=["no-prompt", "prompt"])
def test_no_repeat_ngram_generation_matches_hf(captioners, case, prompt):
    hf_model, model = captioners
    prompt_ids = torch.tensor([[101, 11, 12, 11, 12, EOS]]).repeat(4, 1) if prompt else None
    expected = hf_model.generate(pixel_values=_images(), input_ids=None if prompt_ids is None else prompt_ids.clone(),
                                 max_length=16, **case)
    actual = model.generate(_images(), input_ids=prompt_ids, max_length=16, **case)
    assert torch.equal(actual, expected), f"\nours {actual.tolist()}\nhf   {expected.tolist()}"
    if not prompt:  # guard: without the constraint this model repeats n-grams
        assert not torch.equal(model.generate(_images(), max_length=16, **{**case, "no_repeat_ngram_size": 0}), actual)


def test_sampled_return_sequences_match_hf(captioners):
    hf_model, model = captioners
    actual, expected = _run_both(hf_model, model, _images(3), seed=21, do_sample=True, num_return_sequences=4,
                                 top_k=20, temperature=0.8, max_length=12)
    assert actual.shape[0] == 12 and torch.equal(actual, expected)
    assert len({tuple(row.tolist()) for row in actual[:4]}) > 1, "one image's samples should differ"


@pytest.mark.parametrize("overrides", [dict(), dict(num_beams=2)], ids=["config-only", "keyword-wins"])
def test_generation_config_matches_hf(captioners, overrides):
    hf_model, model = captioners
    config = transformers.GenerationConfig(num_beams=3, max_length=11, no_repeat_ngram_size=2, length_penalty=0.5)
    expected = hf_model.generate(pixel_values=_images(), generation_config=config, **overrides)
    actual = model.generate(_images(), generation_config=config, **overrides)
    assert torch.equal(actual, expected), f"\nours {actual.tolist()}\nhf   {expected.tolist()}"
    as_dict = model.generate(_images(), generation_config=config.to_dict(), **overrides)
    assert torch.equal(as_dict, expected)


def test_generation_config_saved_by_transformers_is_accepted(captioners, tmp_path):
    """A config loaded from a transformers save carries token ids, metadata and neutral settings: all accepted."""
    hf_model, model = captioners
    hf_model.generation_config.save_pretrained(tmp_path)
    config = transformers.GenerationConfig.from_pretrained(tmp_path, num_beams=2)
    expected = hf_model.generate(pixel_values=_images(2), generation_config=config, max_length=9)
    assert torch.equal(model.generate(_images(2), generation_config=config, max_length=9), expected)


def test_empty_processor_and_criteria_lists_are_neutral(captioners):
    """HF code that builds its lists and adds nothing (a common pattern) passes them empty: they change nothing."""
    hf_model, model = captioners
    lists = dict(logits_processor=transformers.LogitsProcessorList(), stopping_criteria=transformers.StoppingCriteriaList())
    expected = hf_model.generate(pixel_values=_images(2), num_beams=2, max_length=9, **lists)
    assert torch.equal(model.generate(_images(2), num_beams=2, max_length=9, **lists), expected)
    with pytest.raises(ValueError, match="logits_processor="):
        model.generate(_images(2), logits_processor=transformers.LogitsProcessorList(
            [transformers.TemperatureLogitsWarper(0.5)]))


def test_vqa_return_dict_matches_hf():
    hf_model = tiny_hf_model("BlipForQuestionAnswering", **SHAPE)
    model = blip_fast.BlipForQuestionAnswering.from_hf_model(hf_model)
    questions = torch.randint(6, 90, (3, 7))
    pixel_values = _images(3)
    kwargs = dict(num_beams=2, max_length=8, return_dict_in_generate=True, output_scores=True)
    expected = hf_model.generate(input_ids=questions, pixel_values=pixel_values, **kwargs)
    actual = model.generate(questions, pixel_values, **kwargs)
    assert torch.equal(actual.sequences, expected.sequences)
    assert_close(actual.sequences_scores, expected.sequences_scores)
    assert_scores_equal(actual.scores, expected.scores, "scores")
