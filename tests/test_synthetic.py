"""The synthetic noisy dataset: determinism by (seed, index), exact label noise, captions that match the pixels."""

import json
import random

import numpy as np
import pytest

from blip_fast.data.synthetic import COLORS, COUNT_WORDS, GRID, PLURALS, REGION_CELLS, SyntheticNoisyDataset
from blip_fast.tokenizer import BlipTokenizer, pre_caption


def noun(scene):
    return scene.shape if scene.count == 1 else PLURALS.get(scene.shape, scene.shape + "s")


def object_phrase(scene):
    return f"{scene.color} {noun(scene)}"


def components(mask: np.ndarray) -> list[tuple[float, float]]:
    """Centroids (x, y) of the 8-connected components of a boolean [H, W] mask."""
    seen = np.zeros_like(mask)
    centroids = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, pixels = [start], []
        seen[start] = True
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny in range(max(y - 1, 0), min(y + 2, mask.shape[0])):
                for nx in range(max(x - 1, 0), min(x + 2, mask.shape[1])):
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        ys, xs = zip(*pixels)
        centroids.append((float(np.mean(xs)), float(np.mean(ys))))
    return centroids


@pytest.mark.parametrize("seed", [0, 7])
def test_same_seed_and_index_give_the_same_sample_in_any_order(seed):
    forward = SyntheticNoisyDataset(23, noise_fraction=0.4, seed=seed, image_size=37)
    shuffled = SyntheticNoisyDataset(23, noise_fraction=0.4, seed=seed, image_size=37)
    order = list(range(23))
    random.Random(1).shuffle(order)
    first = {index: (np.asarray(forward.image(index)), forward.record(index)) for index in range(23)}
    for index in order:
        pixels, record = first[index]
        np.testing.assert_array_equal(np.asarray(shuffled.image(index)), pixels)
        assert shuffled.record(index) == record
    # Asking for the same index again, after others, changes nothing either.
    np.testing.assert_array_equal(np.asarray(forward.image(5)), first[5][0])


def test_seeds_give_different_data():
    first, second = SyntheticNoisyDataset(20, seed=0), SyntheticNoisyDataset(20, seed=1)
    assert [first.record(i)["true_caption"] for i in range(20)] != [second.record(i)["true_caption"] for i in range(20)]
    assert not np.array_equal(np.asarray(first.image(0)), np.asarray(second.image(0)))


@pytest.mark.parametrize("image_size", [8, 33, 64, 97])
def test_images_are_rgb_of_the_requested_size(image_size):
    image = SyntheticNoisyDataset(3, image_size=image_size).image(2)
    assert image.mode == "RGB" and image.size == (image_size, image_size)


def test_regions_are_disjoint_cells_with_room_for_every_count():
    cells = [cell for region in REGION_CELLS.values() for cell in region]
    assert len(cells) == len(set(cells)) and all(0 <= row < GRID and 0 <= column < GRID for row, column in cells)
    assert min(len(region) for region in REGION_CELLS.values()) >= max(COUNT_WORDS)


def test_each_shape_sits_alone_on_a_patch_of_its_region_at_one_offset():
    """At the demo's 40 px the tiny ViT's 8 px patches see each shape on a patch of its own, on the cells of the
    scene's region, every shape drawn with the same pixels wherever it sits (one offset from the patch grid)."""
    patch = 8
    size = GRID * patch
    synthetic = SyntheticNoisyDataset(100, noise_fraction=0.0, seed=3, image_size=size)
    footprints: dict[str, set[bytes]] = {}
    for index in range(100):
        scene = synthetic.scene(index)
        mask = (np.asarray(synthetic.image(index)) == np.asarray(COLORS[scene.color])).all(-1)
        patches = mask.reshape(GRID, patch, GRID, patch).transpose(0, 2, 1, 3)
        occupied = {(row, column) for row in range(GRID) for column in range(GRID) if patches[row, column].any()}
        assert len(occupied) == scene.count and occupied <= set(REGION_CELLS[scene.position]), (index, scene)
        for row, column in occupied:
            footprints.setdefault(scene.shape, set()).add(patches[row, column].tobytes())
    assert {shape: len(drawn) for shape, drawn in footprints.items()} == dict.fromkeys(footprints, 1)


@pytest.mark.parametrize(("num_samples", "noise_fraction"), [(1, 0.3), (97, 0.3), (1000, 0.05), (10, 0.0), (13, 1.0)])
def test_noise_fraction_is_exact(num_samples, noise_fraction):
    synthetic = SyntheticNoisyDataset(num_samples, noise_fraction=noise_fraction, seed=3)
    noisy = [synthetic.record(index)["is_noisy"] for index in range(num_samples)]
    assert sum(noisy) == round(noise_fraction * num_samples) == synthetic.num_noisy


def test_noisy_captions_describe_another_scene_and_keep_the_truth():
    synthetic = SyntheticNoisyDataset(300, noise_fraction=0.3, seed=5)
    noisy_count = 0
    for index in range(300):
        record, scene, wrong = synthetic.record(index), synthetic.scene(index), synthetic.noisy_scene(index)
        assert object_phrase(scene) in record["true_caption"].lower()
        if not record["is_noisy"]:
            assert wrong is None and record["caption"] == record["true_caption"]
            continue
        noisy_count += 1
        assert (wrong.shape, wrong.color) != (scene.shape, scene.color)
        assert record["caption"] != record["true_caption"]
        assert object_phrase(wrong) in record["caption"].lower()
        assert object_phrase(scene) not in record["caption"].lower()
    assert noisy_count == 90


@pytest.mark.parametrize("image_size", [40, 64, 97])
def test_pixels_show_the_captioned_count_colour_and_position(image_size):
    """The shape colour appears in exactly `count` separate blobs, grouped where the caption says."""
    synthetic = SyntheticNoisyDataset(150, noise_fraction=0.0, seed=2, image_size=image_size)
    half = image_size / 2
    for index in range(150):
        scene = synthetic.scene(index)
        pixels = np.asarray(synthetic.image(index)).astype(int)
        blobs = components((pixels == np.asarray(COLORS[scene.color])).all(-1))
        assert len(blobs) == scene.count, (index, scene)
        xs, ys = np.array([x for x, _ in blobs]), np.array([y for _, y in blobs])
        inside = {
            "left": (xs < half).all(), "right": (xs > half).all(), "top": (ys < half).all(),
            "bottom": (ys > half).all(),
            "center": (abs(xs - half) < 0.3 * image_size).all() and (abs(ys - half) < 0.3 * image_size).all(),
        }
        assert inside[scene.position], (index, scene, blobs)
        background = (pixels == np.asarray(COLORS[scene.background])).all(-1)
        if scene.pattern == "plain":
            assert all(background[y, x] for y in (0, -1) for x in (0, -1)), (index, scene)
        else:  # the pattern's second tone covers a good part of the background
            assert 0.2 < background.mean() < 0.9, (index, scene)


def test_captions_are_varied_and_need_cleaning():
    synthetic = SyntheticNoisyDataset(200, noise_fraction=0.0, seed=0)
    captions = synthetic.captions()
    assert len(set(captions)) > 150
    assert any(caption != pre_caption(caption) for caption in captions)  # capitals / full stops
    assert len({caption.split()[0].lower() for caption in captions}) >= 4  # several templates


def test_vocabulary_covers_every_caption_word():
    tokenizer = BlipTokenizer.train(SyntheticNoisyDataset.vocabulary(), vocab_size=400)
    unk = tokenizer.token_to_id("[UNK]")
    captions = SyntheticNoisyDataset(400, noise_fraction=0.5, seed=9).captions()
    ids = tokenizer([pre_caption(caption) for caption in captions], padding=True, return_tensors="pt").input_ids
    assert not (ids == unk).any()


def test_write_blip_json_splits_and_records(tmp_path):
    synthetic = SyntheticNoisyDataset(11, noise_fraction=0.3, seed=4, image_size=16)
    paths = synthetic.write_blip_json(tmp_path, {"train": 7, "val": 3})
    assert set(paths) == {"train", "val"}
    train, val = (json.loads(paths[name].read_text()) for name in ("train", "val"))
    assert [record["image_id"] for record in train] == list(range(7))
    assert [record["image_id"] for record in val] == [7, 8, 9]
    for record in train + val:
        assert record == {"image": f"images/{record['image_id']:06d}.png", **synthetic.record(record["image_id"])}
        assert (tmp_path / record["image"]).is_file()
    with pytest.raises(ValueError, match="split sizes"):
        synthetic.write_blip_json(tmp_path, {"train": 10, "val": 2})


def test_write_images_returns_the_annotation_path(tmp_path):
    path = SyntheticNoisyDataset(4, image_size=16).write_images(tmp_path)
    assert path == tmp_path / "annotations.json" and len(json.loads(path.read_text())) == 4


@pytest.mark.parametrize("kwargs", [dict(num_samples=-1), dict(num_samples=3, noise_fraction=1.5),
                                    dict(num_samples=3, image_size=4)])
def test_invalid_arguments_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SyntheticNoisyDataset(**kwargs)


def test_out_of_range_index_raises():
    synthetic = SyntheticNoisyDataset(3)
    with pytest.raises(IndexError):
        synthetic.record(3)
    assert synthetic.record(-1) == synthetic.record(2)
