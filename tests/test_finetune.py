"""Fine-tuning objectives: retrieval (multi-positive ITC, id-aware and cross-rank negatives), captioning, VQA."""

import argparse
import socket

import pytest
import torch
import torch.nn.functional as F

from blip_fast import distributed, ops
from blip_fast.modeling import pretrain
from blip_fast.modeling.blip import BlipForConditionalGeneration, BlipForQuestionAnswering
from blip_fast.modeling.finetune import BlipCaptionTrainer, BlipRetrievalTrainer, BlipVQATrainer
from blip_fast.training import tasks
from tests.gloo import gloo_group
from tests.test_pretrain import CONFIG, _batch
from tests.tiny_models import assert_close


def _retrieval(queue_size: int = 8, **kwargs) -> BlipRetrievalTrainer:
    torch.manual_seed(0)
    return BlipRetrievalTrainer(CONFIG, queue_size=queue_size, **kwargs).eval()


def test_retrieval_never_draws_a_caption_of_the_same_image(monkeypatch):
    drawn, sample = [], ops.sample_hard_negatives

    def recording_sampler(*args, **kwargs):
        negatives = sample(*args, **kwargs)
        drawn.append(negatives)
        return negatives

    monkeypatch.setattr(pretrain.ops, "sample_hard_negatives", recording_sampler)  # finetune shares the module
    model = _retrieval()
    image_ids = torch.tensor([0, 0, 1, 1])  # two captions per image
    for seed in range(10):
        out = model(*_batch(4, seed), alpha=0.4, image_ids=image_ids)
        assert torch.isfinite(out.loss)
    for negative_texts, negative_images in drawn:
        assert (image_ids[negative_texts] != image_ids).all() and (image_ids[negative_images] != image_ids).all()


def test_retrieval_itc_uses_every_caption_of_the_image_as_target():
    """Same batch, ids marking pairs 0/1 as one image: the loss differs from diagonal-only targets."""
    model_a, model_b = _retrieval(), _retrieval()
    batch = _batch(4)
    multi = model_a(*batch, alpha=0.0, image_ids=torch.tensor([0, 0, 1, 2])).loss_itc
    single = model_b(*batch, alpha=0.0, image_ids=torch.tensor([0, 1, 2, 3])).loss_itc
    assert not torch.isclose(multi, single)
    assert model_a.idx_queue[:4].tolist() == [0, 0, 1, 2]


def test_caption_loss_ignores_the_prompt():
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(CONFIG).eval()
    trainer = BlipCaptionTrainer(model, prompt_length=4)
    pixel_values, input_ids, attention_mask = _batch(3)
    loss = trainer(pixel_values, input_ids, attention_mask).loss
    decoder_ids = input_ids.clone()
    decoder_ids[:, 0] = CONFIG.text.bos_token_id
    with torch.no_grad():
        logits = model(pixel_values, decoder_ids, attention_mask).logits
    terms = []
    for b in range(3):
        for position in range(4, input_ids.shape[1]):  # targets before position 4 are the prompt
            if attention_mask[b, position]:
                log_probs = logits[b, position - 1].log_softmax(-1)
                terms.append(-0.9 * log_probs[decoder_ids[b, position]] - 0.1 * log_probs.mean())
    assert_close(loss.detach(), torch.stack(terms).mean(), rtol=1e-5)


def test_vqa_loss_weights_answers_per_question():
    torch.manual_seed(0)
    model = BlipForQuestionAnswering(CONFIG.replace(hf_compat=True)).eval()
    trainer = BlipVQATrainer(model)
    pixel_values, questions, question_mask = _batch(2)
    answers = torch.randint(5, 190, (3, 4))
    answer_mask = torch.ones_like(answers)
    answer_mask[2, 3] = 0
    weights, counts = torch.tensor([0.6, 0.4, 1.0]), torch.tensor([2, 1])
    loss = trainer(pixel_values, questions, question_mask, answers, answer_mask, weights, counts).loss
    owner = [0, 0, 1]
    expected = 0.0
    with torch.no_grad():
        for a in range(3):
            b = owner[a]
            answer = answers[a : a + 1].clone()
            answer[:, 0] = CONFIG.text.bos_token_id
            out = model(questions[b : b + 1], pixel_values[b : b + 1], decoder_input_ids=answer,
                        decoder_attention_mask=answer_mask[a : a + 1], attention_mask=question_mask[b : b + 1])
            targets = answer.masked_fill(answer_mask[a : a + 1] == 0, -100)[0, 1:]
            expected += float(weights[a]) * float(
                F.cross_entropy(out.logits[0, :-1], targets, label_smoothing=0.1, reduction="sum")
            )
    assert float(loss.detach()) == pytest.approx(expected / 2, rel=1e-5)


def _all_rank_step(rank: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, 2, f"tcp://127.0.0.1:{port}"):
        # all_gather_with_grad: d/dx_r of sum(w * gather(x)) is the r-th slice of the (all-reduced) w of every rank.
        local = torch.full((2, 3), float(rank), requires_grad=True)
        weights = torch.arange(12.0).view(4, 3) * (rank + 1)
        (distributed.all_gather_with_grad(local) * weights).sum().backward()
        model = _retrieval(queue_size=8, negative_all_rank=True)
        pixel_values, input_ids, attention_mask = _batch(4)
        half = slice(2 * rank, 2 * rank + 2)
        out = model(pixel_values[half], input_ids[half], attention_mask[half], alpha=0.4, image_ids=torch.arange(4)[half])
        out.loss.backward()
        torch.save({"grad": local.grad, "loss": out.loss.detach(), "itm_grad": model.itm_head.weight.grad},
                   f"{out_dir}/rank{rank}.pt")


@pytest.mark.slow
def test_negatives_across_ranks_carry_gradient(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_all_rank_step, args=(port, str(tmp_path)), nprocs=2)
    weights_sum = torch.arange(12.0).view(4, 3) * 3  # rank 0 weights (x1) + rank 1 weights (x2)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(result["grad"], weights_sum[2 * rank : 2 * rank + 2])
        assert torch.isfinite(result["loss"]) and result["itm_grad"].abs().sum() > 0


def test_retrieval_loss_does_not_depend_on_padding_length():
    """The retrieval collator pads to the batch's longest caption (to max_length only when negatives are gathered
    across ranks): padded positions are masked, so the loss equals that of the same batch padded to 30 tokens."""
    pixel_values, input_ids, attention_mask = _batch(4)
    padded_ids = F.pad(input_ids, (0, 30 - input_ids.shape[1]))
    padded_mask = F.pad(attention_mask, (0, 30 - attention_mask.shape[1]))
    image_ids = torch.arange(4)
    losses = []
    for ids, mask in ((input_ids, attention_mask), (padded_ids, padded_mask)):
        torch.manual_seed(1)  # the same hard negatives
        out = _retrieval()(pixel_values, ids, mask, alpha=0.4, image_ids=image_ids)
        losses.append(torch.stack([out.loss_itc, out.loss_itm]))
    assert_close(losses[0], losses[1])
    for all_ranks, padding in ((False, "longest"), (True, "max_length")):
        args = argparse.Namespace(negative_all_rank=all_ranks, compile=False, max_text_length=30)
        assert tasks.TASKS["retrieval"].collator(None, args).padding == padding
