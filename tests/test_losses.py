"""Reference loss ops vs independently written loops (float64), finite differences, and sampling statistics."""

import math

import pytest
import torch

from blip_fast import ops
from tests.tiny_models import assert_close


def itc_loss_by_loops(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha,
                      image_ids=None, id_queue=None) -> float:
    """BLIP's ITC written out element by element, as a second opinion on ops.itc_loss."""
    rows = len(image_feat)
    image_columns = list(image_feat_m) + list(image_queue.t())
    text_columns = list(text_feat_m) + list(text_queue.t())
    column_ids = None if image_ids is None else list(image_ids) + list(id_queue)

    def direction(row_feats, row_feats_m, columns) -> float:
        total = 0.0
        for i in range(rows):
            if column_ids is None:
                positives = [1.0 if j == i else 0.0 for j in range(len(columns))]
            else:
                positives = [1.0 if column_ids[j] == image_ids[i] else 0.0 for j in range(len(columns))]
            positives = [p / sum(positives) for p in positives]
            logits = [float(row_feats[i] @ c) / float(temp) for c in columns]
            logits_m = [float(row_feats_m[i] @ c) / float(temp) for c in columns]
            log_z, log_z_m = _log_sum_exp(logits), _log_sum_exp(logits_m)
            for j in range(len(columns)):
                target = alpha * math.exp(logits_m[j] - log_z_m) + (1 - alpha) * positives[j]
                total -= target * (logits[j] - log_z)
        return total / rows

    return (direction(image_feat, image_feat_m, text_columns) + direction(text_feat, text_feat_m, image_columns)) / 2


def _log_sum_exp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _features(rows: int, dim: int, queue: int, dtype=torch.float64):
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, dtype=dtype), dim=-1)  # noqa: E731
    return unit(rows, dim), unit(rows, dim), unit(rows, dim), unit(rows, dim), unit(queue, dim).t(), unit(queue, dim).t()


@pytest.mark.parametrize("rows, queue, dim", [(1, 0, 4), (3, 5, 8), (7, 17, 32)])
@pytest.mark.parametrize("alpha", [0.0, 0.4])
@pytest.mark.parametrize("temp", [0.001, 0.07, 0.5])
def test_itc_equals_loops(rows, queue, dim, alpha, temp):
    feats = _features(rows, dim, queue)
    temp = torch.tensor(temp, dtype=torch.float64)
    expected = itc_loss_by_loops(*feats, temp, alpha)
    assert_close(ops.itc_loss(*feats, temp, alpha), torch.tensor(expected, dtype=torch.float64), rtol=1e-9)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_itc_multi_positive_equals_loops(alpha):
    feats = _features(5, 8, 6)
    image_ids = torch.tensor([3, 1, 3, 7, 1])
    id_queue = torch.tensor([3, -100, 7, 9, 1, 3])
    temp = torch.tensor(0.07, dtype=torch.float64)
    expected = itc_loss_by_loops(*feats, temp, alpha, image_ids, id_queue)
    actual = ops.itc_loss(*feats, temp, alpha, image_ids=image_ids, id_queue=id_queue)
    assert_close(actual, torch.tensor(expected, dtype=torch.float64), rtol=1e-9)


def test_itc_hand_computed():
    """One image, one text, no queue, alpha 0: both directions are log(1) = 0 (a single column)..."""
    one = torch.tensor([[1.0, 0.0]])
    empty = torch.zeros(2, 0)
    assert float(ops.itc_loss(one, one, one, one, empty, empty, torch.tensor(0.5), 0.0)) == pytest.approx(0.0)
    # ...and with one queue column at cosine 0 against the positive at cosine 1, temp 0.5: log(1 + e^-2) each way.
    queue = torch.tensor([[0.0], [1.0]])
    loss = ops.itc_loss(one, one, one, one, queue, queue, torch.tensor(0.5), 0.0)
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-6)


def test_itc_reference_passes_gradcheck():
    """Finite differences agree with autograd. BLIP's soft targets are detached, so the temperature is checked at
    alpha 0 (targets then do not depend on it); the features at alpha 0.4 (targets use only momentum features)."""
    image_feat, text_feat, image_m, text_m, image_queue, text_queue = _features(3, 4, 2)
    image_feat.requires_grad_(True)
    text_feat.requires_grad_(True)
    temp = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)

    def loss(image_feat, text_feat, temp, alpha):
        return ops.itc_loss(image_feat, text_feat, image_m, text_m, image_queue, text_queue, temp, alpha)

    assert torch.autograd.gradcheck(lambda i, t: loss(i, t, temp.detach(), 0.4), (image_feat, text_feat))
    assert torch.autograd.gradcheck(lambda tau: loss(image_feat.detach(), text_feat.detach(), tau, 0.0), (temp,))


def _negative_probabilities(image_feat, text_feat, temp, image_ids, smoothing):
    """Independent statement of the sampling distribution, row by row."""
    sim = (image_feat @ text_feat.t() / temp).double()
    rows = len(sim)
    probs_i2t, probs_t2i = torch.zeros(rows, rows, dtype=torch.float64), torch.zeros(rows, rows, dtype=torch.float64)
    for i in range(rows):
        for target, scores in ((probs_i2t, sim[i]), (probs_t2i, sim[:, i])):
            log_z = _log_sum_exp(scores.tolist())
            weights = [math.exp(s - log_z) + smoothing for s in scores.tolist()]
            weights = [0.0 if image_ids[i] == image_ids[j] else w for j, w in enumerate(weights)]
            target[i] = torch.tensor(weights) / sum(weights)
    return probs_i2t, probs_t2i


@pytest.mark.parametrize("use_ids", [False, True])
def test_hard_negative_frequencies_match_probabilities(use_ids):
    rows, draws = 6, 4000
    image_feat, text_feat = torch.nn.functional.normalize(torch.randn(2, rows, 8), dim=-1)
    image_ids = torch.tensor([0, 1, 1, 2, 3, 4]) if use_ids else torch.arange(rows)
    temp = torch.tensor(0.3)
    generator = torch.Generator().manual_seed(5)
    counts_i2t, counts_t2i = torch.zeros(rows, rows), torch.zeros(rows, rows)
    for _ in range(draws):
        texts, images = ops.sample_hard_negatives(
            image_feat, text_feat, temp, image_ids if use_ids else None, 1e-4, generator
        )
        counts_i2t[torch.arange(rows), texts] += 1
        counts_t2i[torch.arange(rows), images] += 1
    expected_i2t, expected_t2i = _negative_probabilities(image_feat, text_feat, temp, image_ids, 1e-4)
    for counts, expected in ((counts_i2t, expected_i2t), (counts_t2i, expected_t2i)):
        same_image = image_ids[:, None] == image_ids[None, :]
        assert counts[same_image].sum() == 0, "a positive (same image) was drawn as a negative"
        # Pearson chi-square per row over the admissible columns; 99.99% quantile of chi2(df<=5) is < 26.
        for row in range(rows):
            admissible = expected[row] > 0
            observed, predicted = counts[row][admissible].double(), draws * expected[row][admissible]
            assert float(((observed - predicted) ** 2 / predicted).sum()) < 26.0, (row, observed, predicted)


def test_hard_negatives_are_reproducible_and_need_two_pairs():
    image_feat, text_feat = torch.randn(2, 9, 4)
    draw = lambda seed: ops.sample_hard_negatives(  # noqa: E731
        image_feat, text_feat, torch.tensor(0.1), generator=torch.Generator().manual_seed(seed)
    )
    assert all(torch.equal(a, b) for a, b in zip(draw(1), draw(1)))
    with pytest.raises(ValueError, match="at least 2"):
        ops.sample_hard_negatives(image_feat[:1], text_feat[:1], torch.tensor(0.1))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_lm_loss_equals_manual_cross_entropy(smoothing):
    logits, labels = torch.randn(3, 6, 11, dtype=torch.float64), torch.randint(0, 11, (3, 6))
    labels[1, 4:] = -100
    per_token = []
    for b in range(3):
        for t in range(5):
            target = int(labels[b, t + 1])
            if target == -100:
                continue
            log_probs = torch.log_softmax(logits[b, t], dim=-1)
            per_token.append(-(1 - smoothing) * log_probs[target] - smoothing * log_probs.mean())
    assert_close(ops.lm_loss(logits, labels, smoothing), torch.stack(per_token).mean(), rtol=1e-9)
