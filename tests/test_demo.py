"""``blip-fast demo``: BLIP's bootstrapping loop reproduces the paper's direction at CI size, and its pieces."""

import json

import pytest

from blip_fast.data.synthetic import SyntheticNoisyDataset
from blip_fast.demo import SCALES, SEED, Stages, named_objects, object_accuracy, reference_captions, write_datasets


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("Two red circles on the left of a striped blue background.", ("circle", "red")),
        ("a picture of three green crosses in the middle", ("cross", "green")),
        ("An orange star at the top. The background is white.", ("star", "orange")),
        ("A green background with two white diamonds on the left", ("diamond", "white")),
        ("a dotted gray background", (None, None)),
        ("circles", ("circle", None)),
        ("", (None, None)),
    ],
)
def test_named_objects_reads_the_objects_not_the_background(caption, expected):
    assert named_objects(caption) == expected


def test_object_accuracy_counts_shape_and_colour_together():
    references = [["two red circles on the left"], ["a blue star"], ["three green squares"]]
    predictions = ["red circles", "a blue square", "three green squares at the top"]
    assert object_accuracy(predictions, references) == pytest.approx(200 / 3)


def test_reference_captions_describe_the_true_scene():
    dataset = SyntheticNoisyDataset(20, noise_fraction=0.5, seed=3)
    noisy = next(index for index in range(20) if dataset.is_noisy(index))
    references = reference_captions(dataset, noisy, 4)
    assert references[0] == dataset.record(noisy)["true_caption"] != dataset.record(noisy)["caption"]
    scene = dataset.scene(noisy)
    assert all(named_objects(caption) == (scene.shape, scene.color) for caption in references)
    assert len(set(references)) == 4  # worded differently


def test_datasets_split_noise_and_clean_captions(tmp_path):
    scale = SCALES["small"]
    paths = write_datasets(tmp_path, scale)
    web, clean, test = (json.loads(paths[name].read_text()) for name in ("web", "clean", "test"))
    assert (len(web), len(clean), len(test)) == (scale.web_images, scale.clean_images, scale.test_images)
    noisy_share = sum(record["is_noisy"] for record in web) / len(web)
    assert noisy_share == pytest.approx(scale.noise_fraction, abs=0.08)
    truth = SyntheticNoisyDataset(len(web) + len(clean) + len(test), scale.noise_fraction, seed=SEED)
    assert all(record["caption"] == truth.record(record["image_id"])["true_caption"] for record in clean)
    assert not any("is_noisy" in record for record in clean + test)
    assert all(len(record["caption"]) == scale.references_per_image for record in test)
    images = {record["image"] for split in (web, clean, test) for record in split}
    assert len(images) == len(web) + len(clean) + len(test)
    assert all((tmp_path / image).is_file() for image in list(images)[:20])


def test_stages_run_once_and_replay_their_result(tmp_path):
    calls = []

    def work():
        calls.append(1)
        return {"value": len(calls)}

    first = Stages(tmp_path, log=lambda line: None).run("stage", work)
    again = Stages(tmp_path, log=lambda line: None).run("stage", work)
    assert first["value"] == again["value"] == 1 and len(calls) == 1


@pytest.mark.slow
def test_small_demo_reproduces_the_papers_direction(tmp_path):
    """The filter finds the injected noise, and pre-training on the bootstrapped data retrieves better."""
    from blip_fast.demo import run_demo

    results = run_demo(tmp_path, "small", log=lambda line: None)
    assert results["filter"]["precision"] >= 80.0 and results["filter"]["recall"] >= 80.0, results["filter"]
    before, after = results["before"]["retrieval"], results["after"]["retrieval"]
    assert after["txt_r1"] + after["img_r1"] > before["txt_r1"] + before["img_r1"], (before, after)
    for name in ("report.md", "results.json", "results.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["after"] == results["after"]
