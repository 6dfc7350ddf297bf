"""blip_fast.optimize(pipe): a transformers BLIP pipeline (captioning, VQA) gives its own outputs, decoded by
blip_fast's engine, with HuggingFace's generate never called.

Tiny random models with the real bert-base-uncased vocab, saved by transformers (tests/hub_fixtures.py). transformers
4 has the "image-to-text" and "visual-question-answering" pipelines; 5 routes "image-to-text" to
"image-text-to-text" and has no VQA pipeline (a VQA model then runs in "image-text-to-text"). Each test runs the
tasks the installed transformers has; tests/test_hf_versions.py runs this file under transformers 4.57 too.
"""

import re

import pytest
import torch

import blip_fast
from blip_fast import generation
from tests.hub_fixtures import tiny_hf_repo
from tests.test_transforms import random_image
from tests.tiny_models import tiny_hf_model

transformers = pytest.importorskip("transformers")
from transformers.pipelines import SUPPORTED_TASKS  # noqa: E402

IMAGES = [random_image("RGB", (40, 50), seed=1), random_image("L", (64, 24), seed=2), random_image("RGBA", (33, 33), seed=3)]
QUESTIONS = ["how many dogs are in the picture?", "what is it?", "is the sky blue today?"]
BEAM = dict(num_beams=3, max_new_tokens=12, min_length=5)  # the tiny models have 64 positions: short answers


def beam(**extra):
    # A fresh dict per call: transformers 4's pipelines add their generation_config to the generate_kwargs passed in.
    return {**BEAM, **extra}


@pytest.fixture(scope="module")
def repos(tmp_path_factory, bert_vocab_dir):
    root = tmp_path_factory.mktemp("pipeline_models")
    vocab = bert_vocab_dir / "vocab.txt"
    return {task: tiny_hf_repo(task, root / task, vocab)
            for task in ("BlipForConditionalGeneration", "BlipForQuestionAnswering")}


def _without_token_type_ids(pipe):
    # transformers 4's image-to-text (with a prompt) and VQA pipelines call the tokenizer directly, whose
    # token_type_ids BLIP's generate refuses (transformers' BlipProcessor asks for none); hub BLIP tokenizers differ.
    if pipe.tokenizer is not None:
        pipe.tokenizer.model_input_names = ["input_ids", "attention_mask"]
    return pipe


@pytest.fixture
def spies(monkeypatch):
    """Counts calls of blip_fast's decoding engine and of HuggingFace's BLIP generate."""
    calls = {"engine": 0, "hf": 0}
    engine = generation.generate

    def counted_engine(*args, **kwargs):
        calls["engine"] += 1
        return engine(*args, **kwargs)

    monkeypatch.setattr(generation, "generate", counted_engine)
    for name in ("BlipForConditionalGeneration", "BlipForQuestionAnswering"):
        cls = getattr(transformers, name)
        hf_generate = cls.generate

        def counted_hf(self, *args, _hf_generate=hf_generate, **kwargs):
            calls["hf"] += 1
            return _hf_generate(self, *args, **kwargs)

        monkeypatch.setattr(cls, "generate", counted_hf)
    return calls


def assert_same_outputs(pipe, calls, spies):
    """Every call gives the same output through ``optimize(pipe)`` as through ``pipe``, decoded by blip_fast only."""
    expected = [call(pipe) for call in calls]
    assert spies["engine"] == 0 and spies["hf"] >= len(calls)
    fast = blip_fast.optimize(pipe)
    hf_calls = spies["hf"]
    actual = [call(fast) for call in calls]
    assert spies["engine"] >= len(calls) and spies["hf"] == hf_calls, spies
    for index, (ours, theirs) in enumerate(zip(actual, expected)):
        assert ours == theirs, f"call {index}:\nours {ours}\nhf   {theirs}"
    assert any(len(str(output)) > 40 for output in expected), "the answers must have content"
    # The pipeline itself is untouched; the copy shares its parameters and stays optimized.
    assert type(pipe.model) is getattr(transformers, type(fast.model).__name__)
    assert isinstance(fast.model, blip_fast.modeling.blip.BlipPreTrainedModel)
    hf_parameters = dict(pipe.model.named_parameters(remove_duplicate=False))
    assert all(p is hf_parameters[n] for n, p in fast.model.named_parameters(remove_duplicate=False))
    assert blip_fast.optimize(fast) is fast
    assert type(fast).__name__ in repr(fast)
    return fast


def test_image_text_to_text_captioning(repos, spies):
    pipe = transformers.pipeline("image-text-to-text", model=str(repos["BlipForConditionalGeneration"]))
    assert_same_outputs(pipe, [
        lambda p: p(IMAGES, text=["a photography of"] * 3, max_new_tokens=20),  # conditional, greedy
        lambda p: p(IMAGES, text=[""] * 3, max_new_tokens=20),  # "" = [CLS][SEP]: unconditional
        lambda p: p(IMAGES[0], text="a picture of", generate_kwargs=beam()),
        lambda p: p(IMAGES[1:], text=["a picture of"] * 2, generate_kwargs=beam(num_return_sequences=2),
                    return_full_text=False),
        lambda p: [row["generated_token_ids"].tolist() for row in
                   p(IMAGES, text=[""] * 3, max_new_tokens=15, return_tensors=True)],
    ], spies)


def test_image_text_to_text_vqa(repos, spies):
    # No pipeline task loads a VQA model in transformers 5: it is passed in, with its processor.
    directory = repos["BlipForQuestionAnswering"]
    pipe = transformers.pipeline("image-text-to-text", model=transformers.BlipForQuestionAnswering.from_pretrained(
        directory), processor=transformers.AutoProcessor.from_pretrained(directory))
    assert_same_outputs(pipe, [
        lambda p: p(IMAGES, text=QUESTIONS, max_new_tokens=20),  # questions of different lengths: padded
        lambda p: p(IMAGES[2], text=QUESTIONS[0], generate_kwargs=beam()),
    ], spies)


@pytest.mark.skipif("image-to-text" not in SUPPORTED_TASKS, reason="transformers 5 routes it to image-text-to-text")
def test_image_to_text_pipeline(repos, spies):
    pipe = _without_token_type_ids(
        transformers.pipeline("image-to-text", model=str(repos["BlipForConditionalGeneration"])))
    assert_same_outputs(pipe, [
        lambda p: p(IMAGES, max_new_tokens=20),
        lambda p: p(IMAGES, max_new_tokens=20, batch_size=2),
        lambda p: p(IMAGES, generate_kwargs=beam()),
        lambda p: p(IMAGES[0], prompt="a photography of", max_new_tokens=20),
    ], spies)


@pytest.mark.skipif("visual-question-answering" not in SUPPORTED_TASKS, reason="removed in transformers 5")
@pytest.mark.parametrize("generate_kwargs", [dict(max_new_tokens=20), beam()], ids=["greedy", "beam3"])
def test_visual_question_answering_pipeline(repos, spies, generate_kwargs):
    # This pipeline takes generation settings when it is built (its calls ignore them) and top_k, which a
    # generating model answers with one answer per question.
    pipe = _without_token_type_ids(transformers.pipeline(
        "visual-question-answering", model=str(repos["BlipForQuestionAnswering"]), **generate_kwargs))
    assert_same_outputs(pipe, [
        lambda p: p(image=IMAGES, question=QUESTIONS[0], top_k=2),
        lambda p: p(image=IMAGES[1], question=QUESTIONS),
        lambda p: p([{"image": image, "question": question} for image, question in zip(IMAGES, QUESTIONS)],
                    batch_size=2),
    ], spies)


def test_import_swap_builds_an_optimized_pipeline(repos, spies):
    # `from blip_fast import pipeline` in place of transformers': the same call builds the optimized pipeline.
    directory = str(repos["BlipForConditionalGeneration"])
    ours = blip_fast.pipeline("image-text-to-text", model=directory)
    assert isinstance(ours.model, blip_fast.modeling.blip.BlipPreTrainedModel)
    theirs = transformers.pipeline("image-text-to-text", model=directory)
    texts = ["a picture of"] * 3
    assert ours(IMAGES, text=texts, max_new_tokens=20) == theirs(IMAGES, text=texts, max_new_tokens=20)
    assert spies["engine"] >= 1 and spies["hf"] >= 1


@pytest.mark.parametrize("build", [
    lambda *args, **kwargs: blip_fast.optimize(transformers.pipeline(*args, **kwargs)),
    blip_fast.pipeline,
], ids=["optimize", "import_swap"])
def test_pipeline_of_another_model_is_refused(build):
    config = transformers.ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                                    image_size=16, patch_size=8)
    with pytest.raises(TypeError, match=r"image-classification.*ViTForImageClassification"):
        build("image-classification", model=transformers.ViTForImageClassification(config),
              image_processor=transformers.ViTImageProcessor(size={"height": 16, "width": 16}))


@pytest.mark.parametrize("build", [
    lambda *args, **kwargs: blip_fast.optimize(transformers.pipeline(*args, **kwargs)),
    blip_fast.pipeline,
], ids=["optimize", "import_swap"])
@pytest.mark.parametrize("checkpoint, hint", [
    ("BlipForImageTextRetrieval", "give it a BlipForConditionalGeneration checkpoint"),
    ("BlipForQuestionAnswering", "or pass model=BlipForQuestionAnswering.from_pretrained(...) and its processor"),
])
def test_a_pipeline_that_loaded_another_tasks_checkpoint_is_refused(repos, tmp_path, bert_vocab_dir, build,
                                                                    checkpoint, hint):
    """transformers loads a retrieval (or VQA) checkpoint into its captioning model with a load report and runs the
    layers the checkpoint lacks at their random values; the optimized pipeline refuses instead."""
    directory = repos.get(checkpoint) or tiny_hf_repo(checkpoint, tmp_path / checkpoint, bert_vocab_dir / "vocab.txt")
    with pytest.raises(TypeError, match=rf"loaded a {checkpoint} checkpoint into a BlipForConditionalGeneration, "
                                        rf"whose weights it lacks are random .*{re.escape(hint)}"):
        build("image-text-to-text", model=str(directory))


def test_retrieval_pipeline_points_to_the_model():
    # No transformers pipeline generates with an ITM model; the error says what to optimize instead.
    hf_model = tiny_hf_model("BlipForImageTextRetrieval")
    pipe = transformers.pipeline("image-feature-extraction", model=hf_model,
                                 image_processor=transformers.BlipImageProcessor())
    with pytest.raises(TypeError, match=r"BlipForImageTextRetrieval: pass the model itself"):
        blip_fast.optimize(pipe)


def test_bare_models_still_optimize_to_models(repos):
    hf_model = transformers.BlipForConditionalGeneration.from_pretrained(repos["BlipForConditionalGeneration"])
    fast = blip_fast.optimize(hf_model)
    assert type(fast) is blip_fast.BlipForConditionalGeneration and fast.can_generate()
    assert not blip_fast.BlipForImageTextRetrieval.can_generate() and fast.config.model_type == "blip"
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fast.generate(pixel_values, max_new_tokens=10),
                       hf_model.generate(pixel_values=pixel_values, max_new_tokens=10))
