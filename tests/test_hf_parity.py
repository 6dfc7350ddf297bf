"""blip_fast task models vs HuggingFace transformers on tiny random models: logits, losses and generated ids."""

import dataclasses

import pytest
import torch

import blip_fast
from tests.tiny_models import assert_close, tiny_hf_model, to_original_key

transformers = pytest.importorskip("transformers")

# (hidden, text heads, vision heads, image size, patch size): odd head counts, images not 384, non-square grids.
SHAPES = [
    pytest.param(dict(hidden=48, text_heads=3, vision_heads=4, image_size=40, patch_size=8), id="h48-3h-40px"),
    pytest.param(dict(hidden=60, text_heads=5, vision_heads=6, image_size=28, patch_size=7), id="h60-5h-28px"),
    pytest.param(dict(hidden=32, text_heads=1, vision_heads=2, image_size=16, patch_size=16), id="h32-1h-16px"),
]
TASKS = ["BlipForConditionalGeneration", "BlipForImageTextRetrieval", "BlipForQuestionAnswering"]


def _pair(task: str, **shape):
    hf_model = tiny_hf_model(task, **shape)
    return hf_model, getattr(blip_fast, task).from_hf_model(hf_model).eval()


def _inputs(batch: int, image_size: int, length: int = 9):
    pixel_values = torch.randn(batch, 3, image_size, image_size)
    input_ids = torch.randint(6, 90, (batch, length))
    input_ids[:, 0] = 1
    return pixel_values, input_ids


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", [1, 3])
def test_captioning_logits_and_loss(shape, batch):
    hf_model, model = _pair("BlipForConditionalGeneration", **shape)
    pixel_values, input_ids = _inputs(batch, shape["image_size"])
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, 6:] = 0
    with torch.no_grad():
        expected = hf_model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
        actual = model(pixel_values, input_ids, attention_mask, labels=input_ids)
    assert_close(actual.logits, expected.logits)
    assert_close(actual.image_embeds, expected.image_embeds)
    assert_close(actual.loss, expected.loss)
    assert_close(actual[1], expected[1])  # tuple-style access reads the same field as HF


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("use_itm_head", [True, False])
def test_retrieval_itm_and_itc(shape, use_itm_head):
    hf_model, model = _pair("BlipForImageTextRetrieval", **shape)
    pixel_values, input_ids = _inputs(4, shape["image_size"])
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    with torch.no_grad():
        expected = hf_model(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, use_itm_head=use_itm_head
        )
        actual = model(input_ids, pixel_values, use_itm_head=use_itm_head, attention_mask=attention_mask)
    assert_close(actual.itm_score, expected.itm_score)
    assert_close(actual.question_embeds, expected.question_embeds)


@pytest.mark.parametrize("shape", SHAPES)
def test_vqa_loss_and_answer_logits(shape):
    hf_model, model = _pair("BlipForQuestionAnswering", **shape)
    pixel_values, questions = _inputs(3, shape["image_size"])
    answers = torch.randint(6, 90, (3, 4))
    with torch.no_grad():
        expected = hf_model(input_ids=questions, pixel_values=pixel_values, labels=answers)
        actual = model(questions, pixel_values, labels=answers)
        image_embeds = expected.image_embeds
        question = hf_model.text_encoder(
            input_ids=questions, encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long),
        ).last_hidden_state
        expected_logits = hf_model.text_decoder(input_ids=answers, encoder_hidden_states=question).logits
    assert_close(actual.loss, expected.loss)
    assert_close(actual.image_embeds, expected.image_embeds)
    assert_close(actual.logits, expected_logits)


def test_vqa_padded_question_is_masked_in_the_answer_decoder():
    """Padding must not leak into cross-attention: equal to running on the question truncated to its length.

    (transformers 5.x drops this mask in BlipTextAttention, so HF itself is not the oracle here.)
    """
    _, model = _pair("BlipForQuestionAnswering", **SHAPES[0].values[0])
    pixel_values, questions = _inputs(2, 40)
    answers = torch.randint(6, 90, (2, 4))
    mask = torch.ones_like(questions)
    mask[1, 5:] = 0
    with torch.no_grad():
        padded = model(questions, pixel_values, labels=answers, attention_mask=mask).logits[1]
        truncated = model(questions[1:, :5], pixel_values[1:], labels=answers[1:]).logits[0]
    assert_close(padded, truncated)


def _caption_images(count: int = 5) -> torch.Tensor:
    """Fixed inputs, independent of how much randomness model construction consumed."""
    return torch.randn(count, 3, 40, 40, generator=torch.Generator().manual_seed(3))


def _boost_eos(hf_model, model, amount: float) -> None:
    """Make [SEP] likely enough that rows finish at different steps (mixed finish times)."""
    eos = hf_model.config.text_config.sep_token_id
    with torch.no_grad():
        for m in (hf_model, model):
            m.text_decoder.cls.predictions.bias[eos] += amount


GENERATION_CASES = [
    pytest.param(dict(), id="greedy"),
    pytest.param(dict(num_beams=3), id="beam3"),
    pytest.param(dict(num_beams=3, max_length=12, min_length=5), id="beam3-min5-max12"),
    pytest.param(dict(num_beams=3, length_penalty=0.6, repetition_penalty=1.3), id="beam3-penalties"),
    pytest.param(dict(num_beams=4, num_return_sequences=2, early_stopping=True), id="beam4-ret2-early"),
    pytest.param(dict(num_beams=2, early_stopping="never", max_new_tokens=9), id="beam2-never"),
    pytest.param(dict(repetition_penalty=1.5, min_new_tokens=3, max_new_tokens=11), id="greedy-penalty"),
    pytest.param(dict(min_new_tokens=8, max_new_tokens=8), id="greedy-fixed-length"),
    pytest.param(dict(num_beams=3, min_new_tokens=7, max_new_tokens=7), id="beam3-fixed-length"),
]
#: The dynamic engine (model forward + DecoderCache) and the static one (fused step, device-side searches: the
#: code CUDA graphs capture, run uncaptured on CPU).
ENGINES = [pytest.param(dict(cuda_graphs=False), id="dynamic"), pytest.param(dict(cuda_graphs=True), id="static")]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", GENERATION_CASES)
@pytest.mark.parametrize("prompt", [False, True], ids=["no-prompt", "prompt"])
def test_caption_generation_matches_hf(case, prompt, engine):
    hf_model, model = _pair("BlipForConditionalGeneration", **SHAPES[0].values[0])
    _boost_eos(hf_model, model, 1.0)
    pixel_values = _caption_images()
    prompt_ids = torch.tensor([[101, 11, 12, 13, 5]]).repeat(5, 1) if prompt else None
    expected = hf_model.generate(
        pixel_values=pixel_values, input_ids=None if prompt_ids is None else prompt_ids.clone(), **case
    )
    actual = model.generate(pixel_values, input_ids=prompt_ids, **case, **engine)
    assert torch.equal(actual, expected), f"\nours {actual.tolist()}\nhf   {expected.tolist()}"
    if prompt_ids is not None:
        assert prompt_ids[0, 0] == 101, "generate must not overwrite the caller's prompt"


def test_generation_cases_have_mixed_finish_times():
    """Guard for the test above: the boosted-eos model really ends rows at different steps."""
    _, model = _pair("BlipForConditionalGeneration", **SHAPES[0].values[0])
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[5] += 1.0
    pixel_values = _caption_images()
    for ids in (model.generate(pixel_values), model.generate(pixel_values, num_beams=3)):
        ended_at = [row.tolist().index(5) if 5 in row.tolist() else len(row) for row in ids]
        assert min(ended_at) <= 2 and max(ended_at) >= 5, ids


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", [dict(), dict(num_beams=3, max_length=8)], ids=["greedy", "beam3"])
def test_vqa_generation_matches_hf(case, engine):
    hf_model, model = _pair("BlipForQuestionAnswering", **SHAPES[1].values[0])
    _boost_eos(hf_model, model, 1.0)
    pixel_values, questions = _inputs(4, 28)
    expected = hf_model.generate(input_ids=questions, pixel_values=pixel_values, **case)
    actual = model.generate(questions, pixel_values, **case, **engine)
    assert torch.equal(actual, expected), f"\nours {actual.tolist()}\nhf   {expected.tolist()}"


@pytest.mark.parametrize("task", TASKS)
def test_return_dict_false_and_token_type_ids_as_transformers(task):
    """HF code passes ``return_dict=False`` (a tuple of the set fields) and a BERT tokenizer's ``token_type_ids``
    (unused: BLIP's text embeddings have no token types)."""
    hf_model, model = _pair(task, **SHAPES[0].values[0])
    pixel_values, input_ids = _inputs(2, SHAPES[0].values[0]["image_size"])
    inputs = dict(pixel_values=pixel_values, input_ids=input_ids,
                  **({"labels": input_ids} if task != "BlipForImageTextRetrieval" else {}))
    with torch.no_grad():  # transformers 5 takes (and ignores) token_type_ids, 4.x refuses them: not passed there
        expected = hf_model(**inputs, return_dict=False)
        actual = model(**inputs, token_type_ids=torch.ones_like(input_ids), return_dict=False)
    assert isinstance(actual, tuple) and len(actual) == len(expected)
    for ours, theirs in zip(actual, expected):
        assert_close(ours, theirs)


@pytest.mark.parametrize("task", ["BlipForConditionalGeneration", "BlipForQuestionAnswering"])
def test_a_folders_generation_config_steers_neither(tmp_path, task):
    """transformers' BLIP ``generate`` runs its text decoder's own generation config, so decoding settings saved in
    the folder's generation_config.json change nothing there: swapping the import must not change the output."""
    hf_model = tiny_hf_model(task, **SHAPES[0].values[0])
    with torch.no_grad():  # rows end at different steps
        hf_model.text_decoder.cls.predictions.bias[hf_model.config.text_config.sep_token_id] += 1.0
    hf_model.generation_config.update(num_beams=3, max_length=12, min_length=5, repetition_penalty=1.3)
    hf_model.save_pretrained(tmp_path)
    hf_model = getattr(transformers, task).from_pretrained(tmp_path).eval()
    model = getattr(blip_fast, task).from_pretrained(tmp_path)
    assert model.saved_generation_settings["num_beams"] == 3  # read, checked and saved again
    pixel_values, questions = _inputs(3, SHAPES[0].values[0]["image_size"])
    inputs = dict(pixel_values=pixel_values, **({"input_ids": questions} if "Question" in task else {}))
    expected = hf_model.generate(**inputs)
    assert torch.equal(model.generate(**inputs), expected)


def test_original_semantics_write_enc_and_dec_tokens():
    """hf_compat=False (original BLIP): ITM/VQA questions start with [ENC], decoder inputs with [DEC]."""
    shape = SHAPES[0].values[0]
    hf_itm, _ = _pair("BlipForImageTextRetrieval", **shape)
    hf_cap, _ = _pair("BlipForConditionalGeneration", **shape)
    original_itm = blip_fast.BlipForImageTextRetrieval.from_hf_model(hf_itm)
    original_cap = blip_fast.BlipForConditionalGeneration.from_hf_model(hf_cap)
    for model in (original_itm, original_cap):
        model.config = model.config.replace(hf_compat=False)
    pixel_values, input_ids = _inputs(2, 40)
    enc_ids, dec_ids = input_ids.clone(), input_ids.clone()
    enc_ids[:, 0] = original_itm.config.text.enc_token_id  # 98: HF configs have no [ENC]; it follows [DEC]=97
    dec_ids[:, 0] = 97
    with torch.no_grad():
        assert_close(
            original_itm(input_ids, pixel_values).itm_score,
            hf_itm(input_ids=enc_ids, pixel_values=pixel_values).itm_score,
        )
        assert_close(
            original_cap(pixel_values, input_ids).logits, hf_cap(pixel_values=pixel_values, input_ids=dec_ids).logits
        )
    assert input_ids[0, 0] == 1, "forward must not modify the caller's ids"


def test_rank_answers_equals_brute_force_likelihood():
    """With k = all candidates, the pick is the candidate with the lowest smoothed answer loss, computed per pair."""
    hf_model, model = _pair("BlipForQuestionAnswering", **SHAPES[0].values[0])
    pixel_values, questions = _inputs(3, 40)
    answers = torch.randint(6, 90, (6, 4))
    answers[:, 0] = 97
    answers[:, -1] = 5
    answer_mask = torch.ones_like(answers)
    answers[2, 2:], answer_mask[2, 2:] = 0, 0
    picked = model.rank_answers(questions, pixel_values, answers, answer_mask, k=6)

    with torch.no_grad():
        image_embeds = hf_model.vision_model(pixel_values).last_hidden_state
        question = hf_model.text_encoder(input_ids=questions, encoder_hidden_states=image_embeds).last_hidden_state
        losses = torch.empty(3, 6)
        for q in range(3):
            for a in range(6):
                logits = hf_model.text_decoder(
                    input_ids=answers[a : a + 1], attention_mask=answer_mask[a : a + 1],
                    encoder_hidden_states=question[q : q + 1],
                ).logits[0, :-1]
                targets = answers[a, 1:].masked_fill(answers[a, 1:] == 0, -100)
                losses[q, a] = torch.nn.functional.cross_entropy(
                    logits, targets, label_smoothing=0.1, reduction="sum"
                )
    assert torch.equal(picked, losses.argmin(dim=1))


def test_original_pth_at_another_resolution_matches_hf_interpolation(tmp_path):
    """An original-format .pth trained at 40px (5x5 grid), loaded for 56px images (7x7): its position table is
    resized at load time, and the outputs equal HF running the 40px model with ``interpolate_pos_encoding``."""
    hf_model = tiny_hf_model("BlipForConditionalGeneration")
    original = {to_original_key(key): value.clone() for key, value in hf_model.state_dict().items()}
    torch.save({"model": original}, tmp_path / "model_large_caption.pth")
    base = blip_fast.BlipConfig.from_hf(hf_model.config.to_dict())
    config = base.replace(vision=dataclasses.replace(base.vision, image_size=56))
    model = blip_fast.BlipForConditionalGeneration.from_pretrained(tmp_path / "model_large_caption.pth", config=config)
    assert model.vision_model.embeddings.position_embedding.shape[1] == 50
    pixel_values, input_ids = _inputs(2, 56)
    with torch.no_grad():
        expected = hf_model(pixel_values=pixel_values, input_ids=input_ids, interpolate_pos_encoding=True).logits
        actual = model(pixel_values, input_ids).logits
    assert_close(actual, expected)


def test_config_api_that_hf_code_reads(tmp_path):
    """``model.config.text_config`` / ``vision_config``, ``BlipConfig.from_pretrained`` and a transformers config
    passed to ``from_pretrained(config=...)`` give the values transformers gives."""
    hf_model = tiny_hf_model("BlipForConditionalGeneration", **SHAPES[1].values[0])
    hf_model.save_pretrained(tmp_path)
    hf_config = transformers.BlipConfig.from_pretrained(tmp_path)
    config = blip_fast.BlipConfig.from_pretrained(tmp_path)
    for name in ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers"):
        assert getattr(config.text_config, name) == getattr(hf_config.text_config, name), name
    for name in ("image_size", "patch_size", "hidden_size", "num_attention_heads"):
        assert getattr(config.vision_config, name) == getattr(hf_config.vision_config, name), name
    model = blip_fast.BlipForConditionalGeneration.from_pretrained(tmp_path, config=hf_config)
    assert model.config == config
    with pytest.raises(TypeError, match="config must be a blip_fast or transformers BlipConfig, got dict"):
        blip_fast.BlipForConditionalGeneration.from_pretrained(tmp_path, config={"text_config": {}})
