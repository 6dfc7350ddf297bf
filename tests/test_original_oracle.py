"""Our training steps and task models against Salesforce's original BLIP code, on tiny random weights (fp32).

The oracle's outputs are fixtures (``tests/fixtures/original``): ``make_fixtures.py`` there ran the original
``blip/models/*.py`` (PyPI ``blip-ci`` 0.0.5, in its own venv) and saved each model as the original saves it
(``<task>.pth``) with its inputs and outputs (``<task>_io.pt``). Each test loads the ``.pth`` the way a user's
``--init_from`` / ``from_pretrained`` does and must reproduce the original's numbers within 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blip_fast import checkpoint, ops
from blip_fast.errors import UserError
from blip_fast.modeling import pretrain
from blip_fast.modeling.blip import BlipForQuestionAnswering
from blip_fast.modeling.finetune import BlipRetrievalTrainer, BlipVQATrainer
from blip_fast.modeling.pretrain import BlipPretrainer
from blip_fast.tokenizer import BlipTokenizer
from tests.tiny_models import assert_close

FIXTURES = Path(__file__).parent / "fixtures" / "original"


def _io(task: str) -> dict:
    return torch.load(FIXTURES / f"{task}_io.pt", weights_only=True)


def _config(task: str):
    """The config inferred from the ``.pth`` (64-d heads) with the fixture vocabulary's special-token ids."""
    state = checkpoint.read_original(FIXTURES / f"{task}.pth")
    tokenizer = BlipTokenizer.from_pretrained(FIXTURES)
    config = checkpoint.infer_config(state, str(FIXTURES / f"{task}.pth"), tokenizer)
    # The oracle ran without dropout (its tiny med_config), the ViT without drop path.
    text = config.text.__class__(**{**config.text.__dict__, "hidden_dropout_prob": 0.0,
                                    "attention_probs_dropout_prob": 0.0})
    return config.replace(text=text), state


def _trainer(cls, task: str, **kwargs):
    config, state = _config(task)
    model = cls(config, queue_size=8, **kwargs)
    report = checkpoint.load_training_state(model, state, f"{task}.pth")
    return model.train(), report


def _recorded_weights(monkeypatch, model, **inputs):
    """One step on the reference backend; the weight matrices ``torch.multinomial`` sampled negatives from."""
    recorded, multinomial = [], torch.multinomial
    monkeypatch.setenv("BLIP_FAST_BACKEND", "reference")
    monkeypatch.setattr(torch, "multinomial", lambda weights, *a, **k: recorded.append(weights) or multinomial(
        weights, *a, **k))
    model(**inputs)
    monkeypatch.setattr(torch, "multinomial", multinomial)
    return recorded


def _forced_step(monkeypatch, model, io, **inputs):
    """One step with the original's drawn negatives; returns the output after backward."""
    negatives = io["negative_texts"], io["negative_images"]
    monkeypatch.setattr(pretrain.ops, "sample_hard_negatives", lambda *args, **kwargs: negatives)
    output = model(**inputs)
    output.loss.backward()
    monkeypatch.setattr(pretrain.ops, "sample_hard_negatives", ops.sample_hard_negatives)
    return output


def _assert_grads(model, original_grads: dict[str, torch.Tensor], rtol: float = 1e-4) -> None:
    ours = dict(model.named_parameters())
    renamed = checkpoint._rename_original(original_grads)
    assert len(renamed) >= 8
    for name, grad in renamed.items():
        name = name if name in ours else "model." + name
        # Losses agree within 1e-5; a gradient sums rounding errors over the whole backward pass, and a small one
        # (the first decoder layer's query: a causal row 0 attends to itself only) carries those of larger terms.
        atol = max(rtol * float(grad.abs().max()), 1e-6)
        assert_close(ours[name].grad.reshape(grad.shape), grad, rtol=rtol, atol=atol, name=f"grad {name}")


def _contrastive_inputs(io, **extra):
    return dict(pixel_values=io["pixel_values"], input_ids=io["input_ids"], attention_mask=io["attention_mask"],
                alpha=io["alpha"], **extra)


def test_pretraining_step_equals_the_original(monkeypatch):
    io = _io("pretrain")
    model, report = _trainer(BlipPretrainer, "pretrain")
    assert not report["copied"] and {"image_queue", "idx_queue"} >= set(report["fresh"])
    assert any(entry.startswith("visual_encoder_m") for entry in report["loaded"])
    weights_t2i_or_i2t = _recorded_weights(monkeypatch, model, **_contrastive_inputs(io))
    assert_close(weights_t2i_or_i2t[0], io["weights_i2t"], rtol=1e-5, name="weights_i2t")
    assert_close(weights_t2i_or_i2t[1], io["weights_t2i"], rtol=1e-5, name="weights_t2i")

    model, _ = _trainer(BlipPretrainer, "pretrain")
    output = _forced_step(monkeypatch, model, io, **_contrastive_inputs(io))
    for name in ("loss_itc", "loss_itm", "loss_lm"):
        assert_close(output[name], io[name], rtol=1e-5, name=name)
    _assert_grads(model, io["grads"])
    assert_close(model.image_queue, io["image_queue"], rtol=1e-5)
    assert_close(model.text_queue, io["text_queue"], rtol=1e-5)
    assert int(model.ptr_queue) == int(io["queue_ptr"])
    for name, value in checkpoint._rename_original(io["momentum_after"]).items():
        assert_close(model.state_dict()[name], value, rtol=1e-6, name=name)


def test_retrieval_step_equals_the_original(monkeypatch):
    io = _io("retrieval")
    inputs = _contrastive_inputs(io, image_ids=io["image_ids"])
    model, report = _trainer(BlipRetrievalTrainer, "retrieval")
    assert "idx_queue" not in report["fresh"] and not report["copied"]
    weights = _recorded_weights(monkeypatch, model, **inputs)
    assert_close(weights[0], io["weights_i2t"], rtol=1e-5, name="weights_i2t")
    assert_close(weights[1], io["weights_t2i"], rtol=1e-5, name="weights_t2i")
    model, _ = _trainer(BlipRetrievalTrainer, "retrieval")
    output = _forced_step(monkeypatch, model, io, **inputs)
    assert_close(output.loss_itc, io["loss_itc"], rtol=1e-5, name="loss_itc")
    assert_close(output.loss_itm, io["loss_itm"], rtol=1e-5, name="loss_itm")
    _assert_grads(model, io["grads"])


@pytest.fixture()
def vqa_model():
    tokenizer = BlipTokenizer.from_pretrained(FIXTURES)
    return checkpoint.load_pretrained(BlipForQuestionAnswering, FIXTURES / "vqa.pth", tokenizer=tokenizer)


def test_vqa_answer_weighted_loss_equals_the_original(vqa_model):
    io = _io("vqa")
    trainer = BlipVQATrainer(vqa_model)
    loss = trainer(io["pixel_values"], io["question_ids"], io["question_mask"], io["answer_ids"], io["answer_mask"],
                   io["answer_weights"], io["answers_per_question"]).loss
    loss.backward()
    assert_close(loss, io["loss"], rtol=1e-5, name="loss")
    _assert_grads(trainer, io["grads"])


def test_vqa_answer_ranking_equals_the_original(vqa_model):
    io = _io("vqa")
    ranked = vqa_model.rank_answers(io["question_ids"], io["pixel_values"], io["candidate_ids"], io["candidate_mask"],
                                    attention_mask=io["question_mask"], k=io["k"])
    assert ranked.tolist() == io["ranked"].tolist()


@pytest.mark.parametrize("task", ["captioning", "retrieval", "vqa"])
def test_task_models_load_the_original_pretraining_checkpoint(task):
    """``model_base.pth`` carries ``queue_ptr`` (the retrieval model's ``ptr_queue``), momentum encoders and queues:
    a task model keeps what it uses and drops the rest."""
    tokenizer = BlipTokenizer.from_pretrained(FIXTURES)
    model = checkpoint.load_pretrained(checkpoint.task_class(task), FIXTURES / "pretrain.pth", tokenizer=tokenizer)
    original = checkpoint.read_original(FIXTURES / "pretrain.pth")
    for key, value in model.state_dict().items():
        if key in original:
            assert torch.equal(value, original[key]), key


def test_momentum_encoders_absent_from_the_file_start_as_copies(caplog):
    """A retrieval run from a task-model file (no momentum encoders, no queues): copied and fresh, reported."""
    config, state = _config("retrieval")
    online_only = {k: v for k, v in state.items() if k.split(".")[0] not in checkpoint.MOMENTUM_OF
                   and k not in ("image_queue", "text_queue", "idx_queue", "ptr_queue")}
    model = BlipRetrievalTrainer(config, queue_size=8)
    with caplog.at_level("INFO", logger="blip_fast"):
        report = checkpoint.load_training_state(model, online_only, "online.pth")
    assert sorted(report["copied"]) == sorted(f"{m} <- {o}" for m, o in checkpoint.MOMENTUM_OF.items())
    assert report["fresh"] == ["image_queue", "text_queue", "idx_queue", "ptr_queue"]
    assert torch.equal(model.visual_encoder_m.encoder.layers[1].self_attn.qkv.weight,
                       model.vision_model.encoder.layers[1].self_attn.qkv.weight)
    assert "copied: " in caplog.text and "fresh: " in caplog.text


def test_another_image_size_resizes_both_position_tables_and_another_queue_length_starts_fresh():
    config, state = _config("pretrain")
    vision = config.vision.__class__(**{**config.vision.__dict__, "image_size": 48})
    model = BlipPretrainer(config.replace(vision=vision), queue_size=12)
    report = checkpoint.load_training_state(model, state, "pretrain.pth")
    assert len(report["resized"]) == 2 and model.vision_model.embeddings.position_embedding.shape[1] == 37
    assert {"image_queue", "text_queue", "ptr_queue"} <= set(report["fresh"])
    assert any(entry.startswith("image_queue [32, 8]") for entry in report["dropped"])


def test_mismatched_shapes_are_one_clear_error():
    config, state = _config("pretrain")
    text = config.text.__class__(**{**config.text.__dict__, "intermediate_size": 80})
    model = BlipPretrainer(config.replace(text=text), queue_size=8)
    with pytest.raises(checkpoint.CheckpointError, match=r"pretrain.pth does not fit BlipPretrainer \(\d+ problems\)"
                       r"(.|\n)*shape: text_encoder.encoder.layer.0.intermediate.dense.weight is \[96, 64\]"):
        checkpoint.load_training_state(model, state, "pretrain.pth")


def _build_from_original(task: str, pth: str, *flags: str):
    """The training module ``blip_fast.train`` builds for ``--task task --init_from pth`` (no DeepSpeed)."""
    from blip_fast.training import options, tasks

    # The fine-tuning YAMLs leave the architecture to init_from (tiny-cpu.yaml's model preset would clash with it).
    configs = Path(__file__).parents[1] / "configs"
    config_file = {"pretrain": configs / "tiny-cpu-retrieval.yaml", "vqa": configs / "base-vqa.yaml",
                   "nlvr": configs / "base-nlvr.yaml"}.get(task, configs / f"tiny-cpu-{task}.yaml")
    if task in ("vqa", "nlvr"):
        flags = (*flags, "--annotations", str(FIXTURES / pth))  # must exist, is never read
    args = options.parse_args(["--config", str(config_file), "--task", task, "--init_from", str(FIXTURES / pth),
                               "--tokenizer_dir", str(FIXTURES), "--queue_size", "8", *flags])
    source = tasks.InitSource(args.init_from, args.tokenizer_dir)
    tokenizer = BlipTokenizer.from_pretrained(source.tokenizer_dir)
    return tasks.TASKS[task].build_model(source.run_config(args, tokenizer), args, source, tokenizer)


@pytest.mark.parametrize("task, pth", [("pretrain", "pretrain.pth"), ("retrieval", "pretrain.pth"),
                                       ("retrieval", "retrieval.pth"), ("captioning", "pretrain.pth"),
                                       ("vqa", "pretrain.pth"), ("vqa", "vqa.pth"), ("nlvr", "nlvr.pth")])
def test_init_from_an_original_pth_for_every_task(task, pth, caplog):
    with caplog.at_level("INFO", logger="blip_fast"):
        trainer = _build_from_original(task, pth, "--image_size", "48")
    original = checkpoint.read_original(FIXTURES / pth)
    state = trainer.state_dict()
    prefix = "model." if task in ("captioning", "vqa") else ""
    checked = [key for key in original if prefix + key in state and "position_embedding" not in key
               and key not in ("idx_queue", "ptr_queue", "image_queue", "text_queue")]
    assert len(checked) > 50
    for key in checked:
        assert torch.equal(state[prefix + key], original[key]), key
    assert state[prefix + "vision_model.embeddings.position_embedding"].shape[1] == 37  # resized 32 -> 48 px
    if task in ("pretrain", "retrieval"):
        assert "loaded: " in caplog.text and "visual_encoder_m" in caplog.text
    if task == "vqa":  # question encoder and answer decoder both come from the file
        assert {key.split(".")[0] for key in checked} == {"vision_model", "text_encoder", "text_decoder"}


@pytest.mark.parametrize("task, pth, found", [("captioning", "vqa.pth", "vqa"), ("vqa", "nlvr.pth", "nlvr"),
                                              ("nlvr", "vqa.pth", "vqa"), ("vqa", "retrieval.pth", "retrieval")])
def test_init_from_an_original_pth_of_another_task_is_refused(task, pth, found):
    """A VQA model's weights would fit a captioner (which would then write answers as captions): a .pth of another
    task is a user error naming what it is, before any tensor is loaded."""
    with pytest.raises(UserError, match=rf"{pth} is a {found} model \(by its weights\), not a {task} model"):
        _build_from_original(task, pth)


def test_init_nlvr_from_an_original_pretraining_pth(caplog):
    """NLVR2 from ``model_base.pth``, as the original fine-tunes it: each twin from the one cross-attention, the
    head and merge layers fresh (the fixture's 2 text layers are all averaging ones)."""
    with caplog.at_level("INFO", logger="blip_fast"):
        model = _build_from_original("nlvr", "pretrain.pth", "--image_size", "48")
    original = checkpoint.read_original(FIXTURES / "pretrain.pth")
    state, checked = model.state_dict(), 0
    for key, value in original.items():
        if key.startswith("text_encoder.") and ".crossattention.self." in key:
            for twin in ("self0", "self1"):
                assert torch.equal(state[key.replace(".self.", f".{twin}.")], value), key
        elif key.startswith("text_encoder.") and key in state and ".crossattention.output.dense." not in key:
            assert torch.equal(state[key], value), key
        checked += key.startswith("text_encoder.")
    assert checked > 30
    assert state["vision_model.embeddings.position_embedding"].shape[1] == 37
    assert "freshly initialised: cls_head" in caplog.text


def _nlvr_model(pth: str = "nlvr.pth"):
    from blip_fast.modeling.blip import BlipForNLVR

    config, _ = _config(pth.removesuffix(".pth"))  # without dropout, as the oracle ran
    return checkpoint.load_pretrained(BlipForNLVR, FIXTURES / pth, config=config)


def _nlvr_inputs(io) -> dict:
    pairs = io["pixel_values"].unflatten(0, (2, -1)).transpose(0, 1)  # the original's [image0s; image1s] -> [B, 2]
    return dict(input_ids=io["input_ids"], pixel_values=pairs, attention_mask=io["attention_mask"])


def test_nlvr_equals_the_original():
    """Twin cross-attention in all 7 text layers: averaged in 0-5, merged by a linear layer in 6 (the original's
    fixed split); loss, logits and gradients of the ``model_base_nlvr.pth`` layout."""
    io = _io("nlvr")
    model = _nlvr_model()
    assert [layer.crossattention.output.merge_layer is not None for layer in model.text_encoder.encoder.layer] == [
        False] * 6 + [True]
    with torch.no_grad():
        assert_close(model(**_nlvr_inputs(io)).logits, io["logits"], rtol=1e-5, name="logits")
    output = model.train()(**_nlvr_inputs(io), labels=io["targets"])
    output.loss.backward()
    assert_close(output.loss, io["loss"], rtol=1e-5, name="loss")
    # Seven layers of strong random cross-attention: the ViT's gradients carry ~1e-4 of rounding (checked: 1.6e-4).
    _assert_grads(model, io["grads"], rtol=5e-4)


def test_nlvr_starts_from_a_pretraining_checkpoint_as_the_original():
    """Both halves of each twin start as the pre-trained cross-attention; the merge layers start fresh."""
    model = _nlvr_model("pretrain.pth")
    original = checkpoint.read_original(FIXTURES / "pretrain.pth")
    layer = model.text_encoder.encoder.layer[1].crossattention
    prefix = "text_encoder.encoder.layer.1.crossattention."
    for twin in (layer.self0, layer.self1):
        assert torch.equal(twin.key.weight, original[prefix + "self.key.weight"])
    assert torch.equal(layer.output.dense1.bias, original[prefix + "output.dense.bias"])
    assert torch.equal(layer.output.LayerNorm.weight, original[prefix + "output.LayerNorm.weight"])
