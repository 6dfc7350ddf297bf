"""BlipPretrainer: parameter sharing, momentum, queues, and each loss against an independent computation."""

import socket

import pytest
import torch
import torch.nn.functional as F

from blip_fast import ops
from blip_fast.config import BlipConfig
from blip_fast.modeling import pretrain
from blip_fast.modeling.pretrain import BlipPretrainer
from tests.gloo import gloo_group
from tests.test_losses import itc_loss_by_loops
from tests.tiny_models import assert_close

CONFIG = BlipConfig.tiny(vocab_size=200, image_size=32)


def _batch(size: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(size, 3, 32, 32, generator=generator)
    input_ids = torch.randint(5, 190, (size, 9), generator=generator)
    input_ids[:, 0] = 2  # [CLS] of this toy vocabulary
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    input_ids[1, 6:] = 0
    return pixel_values, input_ids, attention_mask


def _model(queue_size: int = 8) -> BlipPretrainer:
    torch.manual_seed(0)
    return BlipPretrainer(CONFIG, queue_size=queue_size).eval()  # eval: no dropout, so oracles are exact


def test_encoder_and_decoder_share_all_but_self_attention():
    model = _model()
    encoder, decoder = model.text_encoder, model.text_decoder.bert
    decoder_params = dict(decoder.named_parameters(remove_duplicate=False))
    for name, parameter in encoder.named_parameters():
        if ".attention." in name:
            assert decoder_params[name] is not parameter, f"{name} must stay separate"
        else:
            assert decoder_params[name] is parameter, f"{name} must be shared"
    head = model.text_decoder.cls.predictions
    assert head.decoder.weight is encoder.embeddings.word_embeddings.weight
    assert not any(p.requires_grad for p in model.visual_encoder_m.parameters())


def test_momentum_is_an_ema_updated_before_the_momentum_forward():
    model = _model()
    weight, weight_m = model.vision_proj.weight, model.vision_proj_m.weight
    assert torch.equal(weight, weight_m)
    with torch.no_grad():
        weight.add_(torch.randn_like(weight))
    online, previous = weight.detach().clone(), weight_m.detach().clone()
    model(*_batch(), alpha=0.4)
    assert_close(weight_m, 0.995 * previous + 0.005 * online, rtol=1e-6)


def test_queue_enqueues_at_the_pointer_and_wraps():
    model = _model(queue_size=8)
    before = model.image_queue.clone()
    model(*_batch(4), alpha=0.4, image_ids=torch.tensor([5, 6, 7, 8]))
    assert int(model.ptr_queue) == 4 and torch.equal(model.image_queue[:, 4:], before[:, 4:])
    assert model.idx_queue[:4].tolist() == [5, 6, 7, 8]
    first = model.image_queue[:, :4].clone()
    model(*_batch(4, seed=1), alpha=0.4)
    model(*_batch(4, seed=2), alpha=0.4)
    assert int(model.ptr_queue) == 4 and not torch.equal(model.image_queue[:, :4], first)


def test_queues_keep_blip_shape_in_the_features_dtype_and_kernel_layout():
    """The queues are BLIP's [D, Q] buffers stored column by column (the fused ITC reads ``queue.t()`` in place), in
    the features' dtype; checkpoints hold the [D, Q] values and load into a model of any queue dtype."""
    model = _model()
    dim = CONFIG.image_text_hidden_size
    assert model.image_queue.shape == (dim, 8) and model.text_queue.t().is_contiguous()
    before = model.image_queue.clone()
    model.store_queues_as(torch.bfloat16)  # what the first bf16 step does (DeepSpeed leaves buffers fp32)
    assert model.image_queue.dtype == torch.bfloat16 and model.image_queue.t().is_contiguous()
    fresh = _model()
    fresh.load_state_dict(model.state_dict())
    assert fresh.image_queue.dtype == torch.float32 and fresh.image_queue.t().is_contiguous()
    assert torch.equal(fresh.image_queue, before.bfloat16().float())
    model(*_batch(4), alpha=0.4)  # fp32 features: the queues follow them back, and the batch is enqueued
    assert model.image_queue.dtype == torch.float32 and model.image_queue.t().is_contiguous()
    assert int(model.ptr_queue) == 4 and torch.equal(model.image_queue[:, 4:], before[:, 4:].bfloat16().float())


def test_queue_size_must_be_a_multiple_of_the_global_batch():
    with pytest.raises(ValueError, match="queue_size 10 is not a multiple of the global batch 4"):
        _model(queue_size=10)(*_batch(4), alpha=0.4)


@pytest.mark.parametrize("start, clamped", [(1.0, 0.5), (1e-5, 0.001), (0.2, 0.2)])
def test_temperature_is_clamped_every_step(start, clamped):
    model = _model()
    with torch.no_grad():
        model.temp.fill_(start)
    model(*_batch(), alpha=0.4)
    assert float(model.temp.detach()) == pytest.approx(clamped)


def _recorded_negative_weights(monkeypatch, model, batch, **forward_kwargs):
    """Run one pre-training step, recording the weight matrices ``torch.multinomial`` draws negatives from."""
    recorded = []
    multinomial = torch.multinomial

    def recording(weights, *args, **kwargs):
        recorded.append(weights.detach().clone())
        return multinomial(weights, *args, **kwargs)

    monkeypatch.setenv("BLIP_FAST_BACKEND", "reference")
    monkeypatch.setattr(torch, "multinomial", recording)
    model(*batch, alpha=0.4, **forward_kwargs)
    monkeypatch.setattr(torch, "multinomial", multinomial)
    return recorded


def _perturbed_momentum_model() -> BlipPretrainer:
    """A pre-trainer whose momentum encoders differ from the online ones (as after some training)."""
    model = _model()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in (model.visual_encoder_m, model.vision_proj_m, model.text_encoder_m, model.text_proj_m):
            for parameter in module.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def _features(model, pixel_values, input_ids, attention_mask, momentum: bool):
    vision, vision_proj = (model.visual_encoder_m, model.vision_proj_m) if momentum else (
        model.vision_model, model.vision_proj)
    text, text_proj = (model.text_encoder_m, model.text_proj_m) if momentum else (model.text_encoder, model.text_proj)
    with torch.no_grad():
        image_feat = F.normalize(vision_proj(vision(pixel_values).last_hidden_state[:, 0]), dim=-1)
        text_feat = F.normalize(text_proj(text(input_ids, attention_mask).last_hidden_state[:, 0]), dim=-1)
    return image_feat, text_feat


def test_pretraining_negatives_are_weighted_by_online_x_momentum_similarities(monkeypatch):
    """The original ``blip_pretrain.py``: ``softmax(sim_i2t[:, :bs]) + 1e-4`` with ``sim_i2t = image_feat @
    text_feat_m.T / temp`` (online rows, the batch's momentum columns), diagonal zeroed, and the same for t2i;
    captions sharing an image id are not excluded by default."""
    model = _perturbed_momentum_model()
    batch = _batch(4)
    image_ids = torch.tensor([0, 0, 1, 2])  # ids fill the id queue; pre-training's negatives ignore them
    weights_i2t, weights_t2i = _recorded_negative_weights(monkeypatch, model, batch, image_ids=image_ids)
    # The momentum encoders were updated before their forward; no optimizer step ran, so the modules now hold
    # exactly the weights of that forward.
    image_feat, text_feat = _features(model, *batch, momentum=False)
    image_feat_m, text_feat_m = _features(model, *batch, momentum=True)
    temp = float(model.temp.detach())
    expected_i2t = (image_feat @ text_feat_m.t() / temp).softmax(dim=1) + 1e-4
    expected_t2i = (text_feat @ image_feat_m.t() / temp).softmax(dim=1) + 1e-4
    expected_i2t.fill_diagonal_(0)
    expected_t2i.fill_diagonal_(0)
    assert_close(weights_i2t, expected_i2t, rtol=1e-5, name="weights_i2t")
    assert_close(weights_t2i, expected_t2i, rtol=1e-5, name="weights_t2i")
    online_i2t = (image_feat @ text_feat.t() / temp).softmax(dim=1) + 1e-4
    assert not torch.allclose(online_i2t.fill_diagonal_(0), expected_i2t, rtol=1e-3), "momentum made no difference"


def test_pretraining_can_exclude_captions_of_the_same_image(monkeypatch):
    model = _perturbed_momentum_model()
    model.negatives_by_image_id = True
    image_ids = torch.tensor([0, 0, 1, 2])
    weights_i2t, weights_t2i = _recorded_negative_weights(monkeypatch, model, _batch(4), image_ids=image_ids)
    same_image = image_ids[:, None] == image_ids[None, :]
    for weights in (weights_i2t, weights_t2i):
        assert (weights[same_image] == 0).all() and (weights[~same_image] > 0).all()


@pytest.mark.parametrize("by_image_id", [False, True])
def test_pretraining_by_image_id_makes_every_caption_of_the_image_an_itc_target(by_image_id):
    """BLIP's pre-training ITC has one target per row (another caption of the same image is a negative); with
    ``negatives_by_image_id`` every caption of the image in the batch and the queue is a target, as in retrieval
    fine-tuning. Checked against ITC written out by loops (first step: momentum features equal the online ones)."""
    model = _model()
    model.negatives_by_image_id = by_image_id
    batch, image_ids = _batch(4), torch.tensor([0, 0, 1, 2])
    model.idx_queue[:2] = 1  # two queued features of image 1
    image_queue, text_queue, id_queue = model.image_queue.clone(), model.text_queue.clone(), model.idx_queue.clone()
    image_feat, text_feat = _features(model, *batch, momentum=False)
    with torch.no_grad():
        loss = float(model(*batch, alpha=0.4, image_ids=image_ids).loss_itc)
    ids = (image_ids, id_queue) if by_image_id else ()
    expected = itc_loss_by_loops(image_feat, text_feat, image_feat, text_feat, image_queue, text_queue, 0.07, 0.4, *ids)
    other = itc_loss_by_loops(image_feat, text_feat, image_feat, text_feat, image_queue, text_queue, 0.07, 0.4,
                              *(() if by_image_id else (image_ids, id_queue)))
    assert loss == pytest.approx(expected, rel=1e-5) and loss != pytest.approx(other, rel=1e-3)


def test_retrieval_negatives_stay_online_x_online(monkeypatch):
    """The original ``blip_retrieval.py`` samples from ``image_feat @ text_feat.T`` (no momentum, no smoothing)."""
    from blip_fast.modeling.finetune import BlipRetrievalTrainer

    torch.manual_seed(0)
    model = BlipRetrievalTrainer(CONFIG, queue_size=8).eval()
    with torch.no_grad():
        for parameter in model.text_proj_m.parameters():
            parameter.add_(0.1)
    batch, image_ids = _batch(4), torch.tensor([0, 0, 1, 2])
    weights_i2t, _ = _recorded_negative_weights(monkeypatch, model, batch, image_ids=image_ids)
    image_feat, text_feat = _features(model, *batch, momentum=False)
    expected = (image_feat @ text_feat.t() / float(model.temp.detach())).softmax(dim=1)
    expected[image_ids[:, None] == image_ids[None, :]] = 0
    assert_close(weights_i2t, expected, rtol=1e-5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The pre-trainer's first-step losses, and its captioning/retrieval exports loaded by transformers."""
    transformers = pytest.importorskip("transformers")
    model = _model()
    out = tmp_path_factory.mktemp("export")
    model.export(out / "captioning", "captioning")
    model.export(out / "retrieval", "retrieval")
    queues = model.image_queue.clone(), model.text_queue.clone()
    negatives = torch.tensor([1, 2, 3, 0]), torch.tensor([2, 3, 0, 1])
    original_sampler = ops.sample_hard_negatives
    pretrain.ops.sample_hard_negatives = lambda *args, **kwargs: negatives
    try:
        with torch.no_grad():
            losses = model(*_batch(), alpha=0.4)
    finally:
        pretrain.ops.sample_hard_negatives = original_sampler
    captioner = transformers.BlipForConditionalGeneration.from_pretrained(out / "captioning").eval()
    retrieval = transformers.BlipForImageTextRetrieval.from_pretrained(out / "retrieval").eval()
    return losses, captioner, retrieval, queues, negatives


def test_itc_matches_exported_features(exported):
    losses, _, retrieval, (image_queue, text_queue), _ = exported
    pixel_values, input_ids, attention_mask = _batch()
    with torch.no_grad():
        image_feat = F.normalize(retrieval.vision_proj(retrieval.vision_model(pixel_values).last_hidden_state[:, 0]), dim=-1)
        text_states = retrieval.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        text_feat = F.normalize(retrieval.text_proj(text_states[:, 0]), dim=-1)
    # First step: the momentum encoders are EMAs of identical weights, i.e. the same features.
    expected = itc_loss_by_loops(image_feat, text_feat, image_feat, text_feat, image_queue, text_queue, 0.07, 0.4)
    assert float(losses.loss_itc) == pytest.approx(expected, rel=1e-5)


def test_itm_matches_exported_matching_head(exported):
    losses, _, retrieval, _, (negative_texts, negative_images) = exported
    pixel_values, input_ids, attention_mask = _batch()
    encoder_ids = input_ids.clone()
    encoder_ids[:, 0] = CONFIG.text.enc_token_id  # HF does not write [ENC] itself
    with torch.no_grad():
        logits = retrieval(
            input_ids=torch.cat([encoder_ids, encoder_ids, encoder_ids[negative_texts]]),
            pixel_values=torch.cat([pixel_values, pixel_values[negative_images], pixel_values]),
            attention_mask=torch.cat([attention_mask, attention_mask, attention_mask[negative_texts]]),
        ).itm_score
    labels = torch.tensor([1] * 4 + [0] * 8)
    assert float(losses.loss_itm) == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)


def test_lm_matches_exported_captioner(exported):
    losses, captioner, _, _, _ = exported
    pixel_values, input_ids, attention_mask = _batch()
    decoder_ids = input_ids.clone()
    decoder_ids[:, 0] = CONFIG.text.bos_token_id
    with torch.no_grad():
        logits = captioner(pixel_values=pixel_values, input_ids=decoder_ids, attention_mask=attention_mask).logits
    targets = decoder_ids.masked_fill(attention_mask == 0, -100)[:, 1:]
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), label_smoothing=0.1)
    assert float(losses.loss_lm) == pytest.approx(float(expected), rel=1e-5)
    assert float(losses.loss) == pytest.approx(float(losses.loss_itc + losses.loss_itm + losses.loss_lm))


def _rank_step(rank: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, 2, f"tcp://127.0.0.1:{port}"):
        pixel_values, input_ids, attention_mask = _batch(4)
        half = slice(2 * rank, 2 * rank + 2)
        model = _model(queue_size=8)
        with torch.no_grad():
            losses = model(pixel_values[half], input_ids[half], attention_mask[half], alpha=0.4,
                           image_ids=torch.arange(4)[half])
        torch.save({"queue": model.image_queue, "text_queue": model.text_queue, "ids": model.idx_queue,
                    "ptr": model.ptr_queue, "loss_itc": losses.loss_itc}, f"{out_dir}/rank{rank}.pt")


@pytest.mark.slow
def test_two_ranks_agree_with_one_process(tmp_path):
    """Queues hold the all-gathered momentum features in rank order, exactly as one process on the concatenated
    batch; each rank's ITC (local rows vs local momentum features + queue) equals one process on its half."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_rank_step, args=(port, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    pixel_values, input_ids, attention_mask = _batch(4)
    single = _model(queue_size=8)
    with torch.no_grad():
        single(pixel_values, input_ids, attention_mask, alpha=0.4, image_ids=torch.arange(4))
    for result in ranks:
        assert_close(result["queue"], single.image_queue, rtol=1e-5)
        assert_close(result["text_queue"], single.text_queue, rtol=1e-5)
        assert torch.equal(result["ids"], single.idx_queue) and torch.equal(result["ptr"], single.ptr_queue)
    for rank, result in enumerate(ranks):
        half = slice(2 * rank, 2 * rank + 2)
        with torch.no_grad():
            local = _model(queue_size=8)(pixel_values[half], input_ids[half], attention_mask[half], alpha=0.4)
        assert_close(result["loss_itc"], local.loss_itc, rtol=1e-5)


@pytest.mark.gpu
def test_fused_step_matches_the_reference_step_on_cuda(monkeypatch):
    """On CUDA the pre-trainer takes the fused ITC kernel by default; its losses and gradients equal the reference's.
    Negatives are fixed so that both runs score the same ITM pairs (the samplers draw differently)."""
    negatives = torch.tensor([1, 2, 3, 0], device="cuda"), torch.tensor([2, 3, 0, 1], device="cuda")
    monkeypatch.setattr(pretrain.ops, "sample_hard_negatives", lambda *args, **kwargs: negatives)
    runs = {}
    for backend in ("reference", "auto"):
        monkeypatch.setenv("BLIP_FAST_BACKEND", backend)
        model = _model().cuda()
        losses = model(*(tensor.cuda() for tensor in _batch()), alpha=0.4)
        losses.loss.backward()
        runs[backend] = losses, model.vision_proj.weight.grad, model.temp.grad
    assert ops.resolve("itc_loss", torch.device("cuda")).__name__ == "_itc_loss_triton"
    (reference, ref_proj, ref_temp), (fused, fused_proj, fused_temp) = runs["reference"], runs["auto"]
    for name in ("loss_itc", "loss_itm", "loss_lm"):
        assert_close(fused[name].detach(), reference[name].detach(), rtol=1e-4)
    assert_close(fused_proj, ref_proj, rtol=1e-4)
    assert_close(fused_temp, ref_temp, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ shared cross K/V
def _losses_and_gradients(model, inputs, negatives, monkeypatch):
    monkeypatch.setattr(pretrain.ops, "sample_hard_negatives", lambda *args, **kwargs: negatives)
    losses = model(*inputs, alpha=0.4)
    losses.loss.backward()
    gradients = {name: parameter.grad.clone() for name, parameter in model.named_parameters()
                 if parameter.grad is not None}
    return {name: losses[name].detach() for name in ("loss_itc", "loss_itm", "loss_lm")}, gradients


def test_shared_cross_kv_step_equals_the_reference_step(monkeypatch):
    """Each image's cross-attention K/V projected once (ITM pairs and decoder gather it) gives the reference step's
    losses and every gradient (fp32). 5 pairs, one padded caption, an image drawn as negative by two texts."""
    inputs = _batch(5, seed=3)
    negatives = torch.tensor([1, 2, 3, 4, 0]), torch.tensor([2, 2, 0, 1, 3])
    runs = []
    for share in (False, True):
        torch.manual_seed(0)
        model = BlipPretrainer(CONFIG, queue_size=10, share_cross_kv=share).eval()
        runs.append(_losses_and_gradients(model, inputs, negatives, monkeypatch))
    (reference_losses, reference_grads), (shared_losses, shared_grads) = runs
    for name, value in reference_losses.items():
        assert_close(shared_losses[name], value, rtol=1e-5, atol=1e-6)
    assert shared_grads.keys() == reference_grads.keys()
    crossattention = [name for name in reference_grads if ".crossattention.self.key." in name]
    assert crossattention, "the cross-attention K/V projections must receive gradients"
    for name, gradient in reference_grads.items():
        assert_close(shared_grads[name], gradient, rtol=1e-4, atol=1e-6)


def test_shared_cross_kv_with_negatives_from_other_ranks():
    """ITM with candidates gathered across ranks (retrieval's negative_all_rank): local images and the drawn
    negatives are projected once each; loss and gradients (parameters, local and gathered image states) match."""
    torch.manual_seed(1)
    _, input_ids, attention_mask = _batch(3, seed=4)
    image_states = torch.randn(3, 17, CONFIG.vision.hidden_size)
    pool_states = torch.randn(6, 17, CONFIG.vision.hidden_size)
    pool_ids, pool_mask = torch.cat([input_ids, input_ids.flip(0)]), torch.cat([attention_mask, attention_mask])
    negative_texts, negative_images = torch.tensor([4, 0, 5]), torch.tensor([5, 5, 1])
    results = []
    for share in (False, True):
        torch.manual_seed(0)
        model = BlipPretrainer(CONFIG, queue_size=12, share_cross_kv=share).eval()
        local, pool = image_states.clone().requires_grad_(), pool_states.clone().requires_grad_()
        loss = model.matching(local, input_ids, attention_mask, negative_texts, negative_images,
                              candidates=(pool, pool_ids, pool_mask))
        loss.backward()
        results.append((loss.detach(), local.grad, pool.grad, model.text_encoder.encoder.layer[0].crossattention
                        .self.value.weight.grad))
    for reference, shared in zip(*results):
        assert_close(shared, reference, rtol=1e-4, atol=1e-6)
