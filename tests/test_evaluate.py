"""Evaluation against independent oracles: BLIP's itm_eval loops, the model's full forward on every pair,
pycocoevalcap's BLEU/CIDEr scorers and hand-computed values; then ``blip-fast evaluate`` end to end."""

import json
import math
import os
import random

import numpy as np
import pytest
import torch

from blip_fast import evaluate
from blip_fast.cli import main
from blip_fast.config import BlipConfig
from blip_fast.data.synthetic import SyntheticNoisyDataset
from blip_fast.data.transforms import BlipImageProcessor, load_image
from blip_fast.modeling.blip import BlipForImageTextRetrieval
from blip_fast.tokenizer import BlipTokenizer, pre_caption
from tests.gloo import gloo_group
from tests.tiny_models import assert_close, randomize_, save_tiny_captioner

IMAGE_SIZE = 32


# ==================================================================== recall@K
def blip_itm_eval(scores_i2t, scores_t2i, txt2img, img2txt):
    """BLIP's ``itm_eval`` (train_retrieval.py), loop for loop: argsort each row, find the correct entries."""
    image_ranks = []
    for image, scores in enumerate(np.asarray(scores_i2t)):
        order = np.argsort(scores)[::-1]
        image_ranks.append(min(np.where(order == text)[0][0] for text in img2txt[image]))
    text_ranks = [np.where(np.argsort(scores)[::-1] == txt2img[text])[0][0]
                  for text, scores in enumerate(np.asarray(scores_t2i))]
    result = {}
    for prefix, ranks in (("txt", np.array(image_ranks)), ("img", np.array(text_ranks))):
        for k in (1, 5, 10):
            result[f"{prefix}_r{k}"] = 100.0 * len(np.where(ranks < k)[0]) / len(ranks)
        result[f"{prefix}_r_mean"] = (result[f"{prefix}_r1"] + result[f"{prefix}_r5"] + result[f"{prefix}_r10"]) / 3
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    return result


@pytest.mark.parametrize("num_images,max_captions,seed", [(1, 3, 0), (4, 5, 1), (13, 5, 2), (30, 2, 3), (57, 5, 4)])
def test_recall_at_k_matches_blip_itm_eval(num_images, max_captions, seed):
    rng = np.random.default_rng(seed)
    caption_counts = rng.integers(1, max_captions + 1, num_images)
    txt2img = rng.permutation(np.repeat(np.arange(num_images), caption_counts)).tolist()  # captions interleaved
    img2txt = [[text for text, image in enumerate(txt2img) if image == wanted] for wanted in range(num_images)]
    # Scores leaning towards the truth so every recall level is exercised; continuous, hence no ties.
    truth = torch.zeros(num_images, len(txt2img))
    truth[torch.as_tensor(txt2img), torch.arange(len(txt2img))] = 1.5
    scores_i2t = torch.randn(num_images, len(txt2img), generator=torch.Generator().manual_seed(seed)) + truth
    scores_t2i = torch.randn(len(txt2img), num_images, generator=torch.Generator().manual_seed(seed + 99)) + truth.T
    expected = blip_itm_eval(scores_i2t, scores_t2i, txt2img, img2txt)
    actual = evaluate.recall_at_k(scores_i2t, scores_t2i, txt2img, img2txt)
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name] == pytest.approx(expected[name], abs=1e-9), name


def test_recall_ties_with_the_not_reranked_fill_count_against_the_query():
    """A correct caption left at -100 outside a small top-k must not count as found at R@10."""
    scores_i2t = torch.full((1, 12), evaluate.NOT_RERANKED)
    scores_i2t[0, :2] = torch.tensor([3.0, 2.0])  # two wrong texts reranked; the correct one (11) was not
    metrics = evaluate.recall_at_k(scores_i2t, torch.zeros(12, 1), [0] * 12, [[11]])
    assert metrics["txt_r1"] == metrics["txt_r5"] == metrics["txt_r10"] == 0.0


def test_recall_rejects_inconsistent_inputs():
    with pytest.raises(ValueError, match="shape mismatch"):
        evaluate.recall_at_k(torch.zeros(2, 3), torch.zeros(2, 3), [0, 1, 1], [[0], [1, 2]])
    with pytest.raises(ValueError, match="image 1 has no text"):
        evaluate.recall_at_k(torch.zeros(2, 2), torch.zeros(2, 2), [0, 0], [[0, 1], []])


# ==================================================================== ITC top-k + ITM rerank
@pytest.fixture(scope="module")
def retrieval_setup():
    """A tiny random retrieval model, its tokenizer and processor, 5 synthetic images and 10 distinct captions."""
    synthetic = SyntheticNoisyDataset(12, noise_fraction=0.0, seed=3, image_size=IMAGE_SIZE)
    texts = list(dict.fromkeys(pre_caption(caption) for caption in synthetic.captions()))[:10]
    assert len(texts) == 10
    tokenizer = BlipTokenizer.train(synthetic.vocabulary() + texts, vocab_size=200)
    model = randomize_(BlipForImageTextRetrieval(BlipConfig.tiny(image_size=IMAGE_SIZE).for_tokenizer(tokenizer)))
    images = [synthetic.image(index) for index in range(5)]
    return model, tokenizer, BlipImageProcessor(size=IMAGE_SIZE), images, texts


@torch.no_grad()
def brute_force_scores(model, tokenizer, processor, images, texts, k_test):
    """Every pair through the model's full ``forward`` (each text tokenised alone, unpadded), then BLIP's rule."""
    pixel_values = processor(images).pixel_values
    itm, itc = torch.empty(len(images), len(texts)), torch.empty(len(images), len(texts))
    for column, text in enumerate(texts):
        input_ids = tokenizer([text], return_tensors="pt").input_ids
        itm[:, column] = model(input_ids.expand(len(images), -1), pixel_values).itm_score[:, 1]
        itc[:, column] = model(input_ids, pixel_values, use_itm_head=False).itm_score[:, 0]

    def blip_rule(sims, matched):
        top = sims.topk(min(k_test, sims.shape[1]), dim=1).indices
        return torch.full_like(sims, -100.0).scatter(1, top, (matched + sims).gather(1, top))

    return blip_rule(itc, itm), blip_rule(itc.T, itm.T)


@pytest.mark.parametrize("k_test,batch_size,itm_batch_size", [(3, 2, 3), (7, 4, 5), (50, 16, 64), (1, 5, 1)])
def test_rerank_matches_full_forward_on_every_pair(retrieval_setup, k_test, batch_size, itm_batch_size):
    """k_test below both candidate counts (5 images, 10 texts), between them, and above both (full ITM scoring)."""
    model, tokenizer, processor, images, texts = retrieval_setup
    expected_i2t, expected_t2i = brute_force_scores(model, tokenizer, processor, images, texts, k_test)
    scores_i2t, scores_t2i = evaluate.retrieval_scores(
        model, tokenizer, processor, images, texts, k_test=k_test, batch_size=batch_size,
        itm_batch_size=itm_batch_size,
    )
    assert_close(scores_i2t, expected_i2t, rtol=1e-5, atol=1e-5, name="scores_i2t")
    assert_close(scores_t2i, expected_t2i, rtol=1e-5, atol=1e-5, name="scores_t2i")
    assert (scores_i2t > evaluate.NOT_RERANKED).sum(dim=1).tolist() == [min(k_test, len(texts))] * len(images)


def _distributed_scores(rank, world, init_file, model_dir, image_paths, texts, out_dir):
    with gloo_group(rank, world, f"file://{init_file}"):
        model, tokenizer, processor = evaluate.load_retrieval_model(model_dir)
        scores = evaluate.retrieval_scores(model, tokenizer, processor, image_paths, texts, k_test=3, batch_size=2)
        torch.save(scores, f"{out_dir}/{rank}.pt")


@pytest.mark.slow
def test_rows_split_across_ranks_give_the_single_process_scores(cli_setup, tmp_path):
    """Two gloo ranks each rerank a slice of rows (5 images -> 2 + 3); the summed matrices equal one process's."""
    paths = cli_setup
    records = json.loads(paths["annotations"].read_text())
    image_paths = [str(paths["root"] / record["image"]) for record in records]
    texts = [pre_caption(caption) for record in records for caption in record["caption"]]
    torch.multiprocessing.spawn(
        _distributed_scores, nprocs=2,
        args=(2, tmp_path / "init", str(paths["retrieval_model"]), image_paths, texts, str(tmp_path)),
    )
    model, tokenizer, processor = evaluate.load_retrieval_model(paths["retrieval_model"])
    expected = evaluate.retrieval_scores(model, tokenizer, processor, image_paths, texts, k_test=3, batch_size=2)
    for rank in range(2):
        for actual, wanted, name in zip(torch.load(tmp_path / f"{rank}.pt"), expected, ("i2t", "t2i")):
            assert_close(actual, wanted, rtol=1e-5, atol=1e-5, name=f"rank {rank} {name}")


# ==================================================================== caption metrics
def _random_corpus(seed, num_images):
    """Tokenised captions over a 6-word vocabulary (many shared n-grams), 1-5 references each, lengths 0-12 (empty
    captions included: a model can emit one)."""
    rng = random.Random(seed)
    words = "a red dog on the grass".split()

    def sentence():
        return " ".join(rng.choice(words) for _ in range(rng.choice([0, *range(1, 13)])))

    predictions = {f"img{index}": sentence() for index in range(num_images)}
    references = {key: [sentence() for _ in range(rng.randint(1, 5))] for key in predictions}
    return predictions, references


@pytest.mark.parametrize("seed,num_images", [(0, 1), (1, 2), (2, 9), (3, 40)])
def test_bleu_and_cider_match_pycocoevalcap(seed, num_images):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    predictions, references = _random_corpus(seed, num_images)
    results = {key: [caption] for key, caption in predictions.items()}
    expected_bleu, _ = Bleu(4).compute_score(references, results, verbose=0)
    expected_cider, _ = Cider().compute_score(references, results)
    assert evaluate.bleu(predictions, references) == pytest.approx(expected_bleu, rel=1e-9, abs=1e-12)
    assert evaluate.cider_d(predictions, references) == pytest.approx(float(expected_cider), rel=1e-9, abs=1e-12)


def test_caption_metrics_normalise_then_score_like_pycocoevalcap():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    predictions = {1: "A dog, running on the GRASS.", 2: "Two cats sleeping!", 3: "a man riding a horse"}
    references = {
        1: ["A dog runs on the grass.", "a brown dog running on green grass"],
        2: ["Two cats are sleeping on a couch.", "two kittens asleep"],
        3: ["A man rides a horse on a beach.", "a person riding a brown horse", "man on horseback"],
    }
    tokenised_references = {
        key: [evaluate.normalize_caption(text) for text in refs] for key, refs in references.items()
    }
    tokenised_results = {key: [evaluate.normalize_caption(text)] for key, text in predictions.items()}
    metrics = evaluate.caption_metrics(predictions, references)
    assert metrics["bleu4"] == pytest.approx(Bleu(4).compute_score(tokenised_references, tokenised_results, 0)[0][3])
    assert metrics["cider"] == pytest.approx(float(Cider().compute_score(tokenised_references, tokenised_results)[0]))


@pytest.mark.parametrize(
    "predictions,references,expected",
    [
        # p1..p4 = 5/6, 3/5, 2/4, 1/3; equal lengths, no brevity penalty.
        ({0: "the cat sat on the mat"}, {0: ["the cat sat on a mat"]}, (1 / 12) ** 0.25),
        # All n-grams match; 10 words against closest reference lengths 7 + 4: penalty exp(1 - 11/10).
        ({0: "a cat sat on the mat", 1: "a dog runs fast"},
         {0: ["a cat sat on the mat today"], 1: ["a dog runs fast", "one dog runs very fast here"]}, math.exp(-0.1)),
        # Reference lengths 4 and 6 are equally close to 5: the shorter wins, so no penalty; p = 1, 3/4, 2/3, 1/2.
        ({0: "a red ball on grass"}, {0: ["a red ball on", "a red ball on green grass"]}, 0.25**0.25),
    ],
)
def test_bleu4_hand_computed(predictions, references, expected):
    assert evaluate.bleu(predictions, references)[3] == pytest.approx(expected, rel=1e-8)


def test_cider_hand_computed():
    """Disjoint vocabularies, so every reference n-gram has document frequency 1 and weight log(2), which cancels.
    Image 0: clipped cosines sqrt(3)/2, sqrt(2/3), 1/sqrt(2), 0 for n = 1..4, bigram counts 2 vs 3 give the length
    penalty exp(-1/72); image 1 matches its reference exactly: 10."""
    predictions = {0: "a red square", 1: "two blue small circles"}
    references = {0: ["a red square here"], 1: ["two blue small circles"]}
    first = 10 * math.exp(-1 / 72) * (math.sqrt(3) / 2 + math.sqrt(2 / 3) + 1 / math.sqrt(2)) / 4
    assert evaluate.cider_d(predictions, references) == pytest.approx((first + 10) / 2, rel=1e-12)


@pytest.mark.parametrize(
    "raw,normalised",
    [
        ("A Dog, on the GRASS!", "a dog on the grass"),
        ("  two\tcats\n", "two cats"),
        ("it's a t-shirt.", "it s a t shirt"),
    ],
)
def test_normalize_caption(raw, normalised):
    assert evaluate.normalize_caption(raw) == normalised


def test_caption_metrics_need_matching_ids():
    with pytest.raises(ValueError, match="no prediction: \\['2'\\]"):
        evaluate.caption_metrics({1: "a dog"}, {1: ["a dog"], 2: ["a cat"]})


# ==================================================================== blip-fast evaluate
@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    """5 synthetic images on disk, a COCO-style json (two captions per image), tiny retrieval and caption models."""
    root = tmp_path_factory.mktemp("evaluate")
    synthetic = SyntheticNoisyDataset(5, noise_fraction=0.0, seed=1, image_size=IMAGE_SIZE)
    single_caption_json = synthetic.write_images(root)
    records = json.loads(single_caption_json.read_text())
    coco_style = [{"image": record["image"], "caption": [record["caption"], f"A photo: {record['caption']}!"]}
                  for record in records]
    annotations = root / "test.json"
    annotations.write_text(json.dumps(coco_style))

    captions = [caption for record in coco_style for caption in record["caption"]]
    tokenizer = BlipTokenizer.train(synthetic.vocabulary() + captions + ["a picture of"], vocab_size=200)
    model = randomize_(BlipForImageTextRetrieval(BlipConfig.tiny(image_size=IMAGE_SIZE).for_tokenizer(tokenizer)))
    retrieval_model = root / "retrieval"
    model.save_pretrained(retrieval_model)
    tokenizer.save_pretrained(retrieval_model)
    BlipImageProcessor(size=IMAGE_SIZE).save_pretrained(retrieval_model)
    caption_model = save_tiny_captioner(root / "captioner", captions, image_size=IMAGE_SIZE)
    return {"root": root, "annotations": annotations, "single_caption_annotations": single_caption_json,
            "retrieval_model": retrieval_model, "caption_model": caption_model}


def _evaluate_args(task, model, annotations, root, *extra):
    return ["evaluate", "--task", task, "--model", str(model), "--annotations", str(annotations),
            "--image-root", str(root), *extra]


@pytest.mark.slow
def test_cli_retrieval_reports_the_library_metrics(cli_setup, tmp_path, capsys):
    paths = cli_setup
    out = tmp_path / "metrics.json"
    args = _evaluate_args("retrieval", paths["retrieval_model"], paths["annotations"], paths["root"],
                          "--k-test", "3", "--batch-size", "2", "--out", str(out))
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert (report["num_images"], report["num_texts"], report["k_test"]) == (5, 10, 3)

    model, tokenizer, processor = evaluate.load_retrieval_model(paths["retrieval_model"])
    records = json.loads(paths["annotations"].read_text())
    images = [load_image(paths["root"] / record["image"]) for record in records]
    captions = [[pre_caption(caption) for caption in record["caption"]] for record in records]
    expected = evaluate.evaluate_retrieval(model, tokenizer, processor, images, captions, k_test=3)
    assert report["metrics"] == pytest.approx(expected)
    printed = capsys.readouterr().out
    assert all(name in printed for name in expected)


@pytest.mark.slow
def test_cli_caption_reports_the_library_metrics(cli_setup, tmp_path):
    from blip_fast.captioning import Captioner

    paths = cli_setup
    out = tmp_path / "captions.json"
    args = _evaluate_args("caption", paths["caption_model"], paths["single_caption_annotations"], paths["root"],
                          "--beams", "2", "--max-length", "8", "--min-length", "3", "--out", str(out))
    assert main(args) == 0
    report = json.loads(out.read_text())

    records = json.loads(paths["single_caption_annotations"].read_text())
    image_paths = [str(paths["root"] / record["image"]) for record in records]
    captions = Captioner.from_pretrained(paths["caption_model"]).caption(
        [load_image(path) for path in image_paths], num_beams=2, max_length=8, min_length=3
    )
    expected_predictions = [{"image": path, "caption": caption} for path, caption in zip(image_paths, captions)]
    assert report["predictions"] == expected_predictions
    references = {index: [record["caption"]] for index, record in enumerate(records)}
    assert report["metrics"] == pytest.approx(evaluate.caption_metrics(dict(enumerate(captions)), references))


@pytest.mark.parametrize("task", ["retrieval", "caption"])
@pytest.mark.parametrize("problem", ["missing", "corrupt", "bad_record", "empty_caption"])
def test_cli_bad_input_names_the_file(cli_setup, tmp_path, capsys, task, problem):
    paths = cli_setup
    records = json.loads(paths["annotations"].read_text())
    bad = tmp_path / "bad.png"
    if problem == "corrupt":
        bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    records[2] = {"image": str(bad), "caption": 7} if problem == "bad_record" else {"image": str(bad), "caption": "x"}
    if problem == "empty_caption":  # a real image, its second reference blank
        records[2] = {"image": records[1]["image"], "caption": ["a thing", " "]}
    annotations = tmp_path / "test.json"
    annotations.write_text(json.dumps(records))
    model = paths["retrieval_model" if task == "retrieval" else "caption_model"]
    assert main(_evaluate_args(task, model, annotations, paths["root"], "--max-length", "6")) == 2
    error = capsys.readouterr().err
    expected = {"bad_record": f"{annotations}[2]", "empty_caption": f"{annotations}[2]: caption 2 is empty"}
    assert expected.get(problem, str(bad)) in error


def test_a_caption_empty_after_cleaning_is_named_by_its_text_and_image(cli_setup, tmp_path, capsys):
    """Records of one image are merged before cleaning: the error names the caption and its image, not the merged
    image's position (which is another record's)."""
    paths = cli_setup
    records = json.loads(paths["single_caption_annotations"].read_text())
    annotations = tmp_path / "test.json"
    annotations.write_text(json.dumps(records + [{"image": records[3]["image"], "caption": "!!!"}]))
    assert main(_evaluate_args("retrieval", paths["retrieval_model"], annotations, paths["root"])) == 2
    line, = capsys.readouterr().err.strip().splitlines()
    image = os.path.normpath(paths["root"] / records[3]["image"])
    assert f"{annotations}: the caption '!!!' of {image} is empty after cleaning" in line


@pytest.mark.parametrize("lengths, message", [
    (["--max-length", "1"], "max_length 1 leaves no room for a caption after the prompt"),
    (["--max-length", "600"], "max_length 600 exceeds the"),
    (["--min-length", "30", "--max-length", "5"], "min_length 30 is above max_length 5"),
])
def test_caption_lengths_the_model_cannot_decode_are_refused_before_any_image(cli_setup, tmp_path, capsys,
                                                                               monkeypatch, lengths, message):
    monkeypatch.setattr(evaluate, "caption_images", lambda *args, **kwargs: pytest.fail("images were captioned"))
    paths = cli_setup
    args = _evaluate_args("caption", paths["caption_model"], paths["annotations"], paths["root"], *lengths)
    assert main(args) == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert message in line


def test_records_repeating_an_image_are_one_image_with_all_its_captions(cli_setup, tmp_path):
    """A training-style json (one record per caption, BLIP's train files and CapFilt's output) evaluates as the
    COCO-style json of the same pairs: scored apart, each copy of an image would count its other captions wrong."""
    paths = cli_setup
    grouped = json.loads(paths["annotations"].read_text())
    per_caption = [{"image": ("./" if turn else "") + record["image"], "caption": record["caption"][turn]}
                   for turn in range(2) for record in grouped]
    per_caption_json = tmp_path / "train_style.json"
    per_caption_json.write_text(json.dumps(per_caption))
    image_paths, captions = evaluate.read_annotations(per_caption_json, paths["root"])
    assert (image_paths, captions) == evaluate.read_annotations(paths["annotations"], paths["root"])
    assert image_paths == [os.path.join(paths["root"], record["image"]) for record in grouped]
    assert captions == [record["caption"] for record in grouped]

    reports = []
    for annotations in (paths["annotations"], per_caption_json):
        out = tmp_path / f"{annotations.stem}.metrics.json"
        args = _evaluate_args("retrieval", paths["retrieval_model"], annotations, paths["root"], "--k-test", "3",
                              "--out", str(out))
        assert main(args) == 0
        reports.append(json.loads(out.read_text()))
    assert [(report["num_images"], report["num_texts"]) for report in reports] == [(5, 10), (5, 10)]
    assert reports[1]["metrics"] == reports[0]["metrics"]


def test_json_lines_annotations_are_named_as_such(cli_setup, tmp_path, capsys):
    paths = cli_setup
    lines = tmp_path / "test.jsonl"
    lines.write_text("".join(json.dumps(record) + "\n" for record in json.loads(paths["annotations"].read_text())))
    assert main(_evaluate_args("caption", paths["caption_model"], lines, paths["root"])) == 2
    error = capsys.readouterr().err
    assert str(lines) in error and "not JSON Lines" in error and len(error.strip().splitlines()) == 1
