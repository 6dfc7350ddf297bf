"""The training data path: train transform, datasets (synthetic, BLIP json, webdataset shards), bad inputs,
the resumable distributed sampler and the collator."""

import io
import json
import logging
import math
import random
import tarfile

import numpy as np
import PIL.Image
import pytest
import torch

from blip_fast.data import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    BlipCollator,
    BlipEvalTransform,
    BlipImageProcessor,
    BlipJsonDataset,
    BlipTrainTransform,
    ResumableSampler,
    SyntheticDataset,
    SyntheticNoisyDataset,
    WebDatasetShards,
    expand_urls,
    sample_rng,
)
from blip_fast.errors import InvalidInputError, MissingFileError
from blip_fast.tokenizer import BlipTokenizer, pre_caption


def coordinate_image(width: int, height: int) -> PIL.Image.Image:
    """R = x, G = y, B = 128: every pixel says where it is (width, height <= 256)."""
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    return PIL.Image.fromarray(np.stack([xs, ys, np.full_like(xs, 128)], -1).astype(np.uint8))


def png_bytes(image: PIL.Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def img2dataset_members(synthetic: SyntheticNoisyDataset, indices, format: str = "PNG") -> list[tuple[str, bytes]]:
    """img2dataset's layout: key.<ext>, key.txt (caption), key.json (caption + metadata), keys in order."""
    members = []
    for index in indices:
        key, record = f"{index:09d}", synthetic.record(index)
        extension = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[format]
        metadata = {"key": key, "caption": record["caption"], "url": f"http://example.com/{key}", "status": "success"}
        members += [(f"{key}.{extension}", png_bytes(synthetic.image(index), format)),
                    (f"{key}.txt", record["caption"].encode()),
                    (f"{key}.json", json.dumps(metadata).encode())]
    return members


RAW = dict(mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))  # output = raw 0..255 pixel values


# ==================================================================== train transform
@pytest.mark.parametrize("make_rng", [random.Random, np.random.default_rng], ids=["random", "numpy"])
def test_train_transform_is_reproducible_from_the_rng(make_rng):
    transform = BlipTrainTransform(image_size=24)
    image = SyntheticNoisyDataset(1, image_size=64).image(0)
    first, again = transform(image, make_rng(3)), transform(image, make_rng(3))
    assert first.shape == (3, 24, 24) and first.dtype == torch.float32
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert any(not torch.equal(first, transform(image, make_rng(seed))) for seed in range(4, 8))


@pytest.mark.parametrize("scale", [(0.2, 1.0), (0.5, 1.0), (0.08, 0.3)])
@pytest.mark.parametrize("size", [(240, 160), (97, 211)])
def test_crop_params_follow_torchvision_bounds(scale, size):
    width, height = size
    transform = BlipTrainTransform(image_size=32, scale=scale)
    for seed in range(200):
        top, left, crop_height, crop_width = transform.crop_params(width, height, random.Random(seed))
        assert 0 <= top <= height - crop_height and 0 <= left <= width - crop_width
        # w and h are the rounded sqrt(area * r) and sqrt(area / r): the unrounded box lies within half a pixel.
        area = width * height
        assert (crop_width - 0.5) * (crop_height - 0.5) <= scale[1] * area, (seed, crop_width, crop_height)
        assert (crop_width + 0.5) * (crop_height + 0.5) >= scale[0] * area, (seed, crop_width, crop_height)
        assert (crop_width - 0.5) / (crop_height + 0.5) <= 4 / 3, (seed, crop_width, crop_height)
        assert (crop_width + 0.5) / (crop_height - 0.5) >= 3 / 4, (seed, crop_width, crop_height)


@pytest.mark.parametrize(("size", "expected"), [((1000, 10), (0, 493, 10, 13)), ((10, 1000), (493, 0, 13, 10)),
                                                 ((40, 40), (0, 0, 40, 40))])
def test_crop_falls_back_to_a_centre_crop_clamped_to_the_ratio(size, expected):
    """No random box fits in 10 tries: torchvision's fallback, the centre crop clamped to the ratio range."""
    transform = BlipTrainTransform(image_size=8, scale=(2.0, 3.0))  # areas larger than the image never fit
    assert transform.crop_params(*size, random.Random(0)) == expected


@pytest.mark.parametrize("seed", range(12))
def test_output_pixels_come_from_the_crop_box(seed):
    """On an image whose pixels encode their coordinates, the output spans exactly the drawn crop box."""
    out = 32
    transform = BlipTrainTransform(image_size=out, scale=(0.2, 1.0), flip_prob=0.0, **RAW)
    image = coordinate_image(240, 160)
    top, left, crop_height, crop_width = transform.crop_params(240, 160, random.Random(seed))
    pixels = transform(image, random.Random(seed)).round().numpy()  # [3, out, out] in 0..255
    xs, ys = pixels[0], pixels[1]
    # Bicubic keeps a linear ramp linear; the first/last output pixel centres sit half an output pixel inside.
    assert abs(xs.min() - left) <= crop_width / out / 2 + 1
    assert abs(xs.max() - (left + crop_width - 1)) <= crop_width / out / 2 + 1
    assert abs(ys.min() - top) <= crop_height / out / 2 + 1
    assert abs(ys.max() - (top + crop_height - 1)) <= crop_height / out / 2 + 1
    assert (np.diff(xs, axis=1) >= 0).all() and (np.diff(ys, axis=0) >= 0).all()


def test_flip_mirrors_and_happens_at_the_given_rate():
    image = coordinate_image(50, 50)
    kwargs = dict(image_size=50, scale=(1.0, 1.0), ratio=(1.0, 1.0), **RAW)
    plain = BlipTrainTransform(flip_prob=0.0, **kwargs)(image, random.Random(0))
    flipped = BlipTrainTransform(flip_prob=1.0, **kwargs)(image, random.Random(0))
    torch.testing.assert_close(plain[0], torch.arange(50.0).expand(50, 50), rtol=0, atol=1e-3)
    torch.testing.assert_close(flipped, plain.flip(-1), rtol=0, atol=0)
    transform = BlipTrainTransform(flip_prob=0.5, **kwargs)
    flips = sum(transform(image, random.Random(seed))[0, 0, 0] > 25 for seed in range(400))
    assert 160 < flips < 240


def test_normalisation_is_torchvision_to_tensor_then_normalize():
    colour = (200, 17, 90)
    image = PIL.Image.new("RGB", (30, 20), colour)
    pixels = BlipTrainTransform(image_size=(8, 12))(image, random.Random(0))
    assert pixels.shape == (3, 8, 12)
    for channel in range(3):
        expected = (np.float32(colour[channel]) / np.float32(255) - np.float32(OPENAI_CLIP_MEAN[channel])) / np.float32(
            OPENAI_CLIP_STD[channel])
        assert (pixels[channel] == torch.tensor(expected)).all()


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_train_transform_converts_any_mode_to_rgb(mode):
    image = PIL.Image.new("RGB", (20, 20), (10, 200, 30)).convert(mode)
    assert BlipTrainTransform(image_size=8)(image, random.Random(0)).shape == (3, 8, 8)


@pytest.mark.parametrize("alpha_on_white, expected", [(False, (10, 200, 30)), (True, (255, 255, 255))])
@pytest.mark.parametrize("path", ["pil", "encode"])
def test_train_transform_keeps_the_colour_beneath_transparency_as_blip_trains(alpha_on_white, expected, path):
    """BLIP's training datasets `convert("RGB")` (the colour beneath a transparent pixel); `alpha_on_white` is
    transformers 5.21's processor instead. A fully transparent PNG, through the PIL and the GPU path's worker half."""
    image = PIL.Image.new("RGBA", (20, 20), (10, 200, 30, 0))
    transform = BlipTrainTransform(image_size=8, alpha_on_white=alpha_on_white, **RAW)
    if path == "pil":
        pixels = transform(image, random.Random(0))
    else:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        pixels = transform.encode(buffer.getvalue(), random.Random(0)).data.float()  # decoded uint8, uncropped
    expected = torch.tensor(expected, dtype=torch.float32).view(3, 1, 1).expand_as(pixels)
    torch.testing.assert_close(pixels, expected, atol=1e-3, rtol=0)


def test_train_transform_refuses_a_non_bool_alpha_on_white():
    with pytest.raises(TypeError, match="alpha_on_white must be True or False, got 'false'"):
        BlipTrainTransform(alpha_on_white="false")


def test_eval_transform_equals_the_processor():
    image = SyntheticNoisyDataset(1).image(0)
    expected = BlipImageProcessor(size=24)(image).pixel_values[0]
    torch.testing.assert_close(BlipEvalTransform(24)(image, random.Random(0)), expected, rtol=0, atol=0)


# ==================================================================== synthetic dataset
def test_synthetic_items_depend_on_seed_epoch_index_only():
    synthetic = SyntheticNoisyDataset(9, noise_fraction=0.5, seed=1, image_size=32)
    dataset = SyntheticDataset(synthetic, BlipTrainTransform(image_size=16), seed=4)
    first = [dataset[index] for index in range(9)]
    for index in (8, 3, 0, 3):  # any order, repeated
        item = dataset[index]
        assert torch.equal(item["image"], first[index]["image"])
        assert item["caption"] == pre_caption(synthetic.record(index)["caption"]) == first[index]["caption"]
        assert item["image_id"] == item["index"] == index
    dataset.set_epoch(1)
    assert all(not torch.equal(dataset[index]["image"], first[index]["image"]) for index in range(3))
    assert dataset[2]["caption"] == first[2]["caption"]
    dataset.set_epoch(0)
    assert torch.equal(dataset[2]["image"], first[2]["image"])
    other_seed = SyntheticDataset(synthetic, BlipTrainTransform(image_size=16), seed=5)
    assert not torch.equal(other_seed[0]["image"], first[0]["image"])


def test_sample_rng_is_a_pure_function():
    assert sample_rng(1, 2, 3).random() == sample_rng(1, 2, 3).random()
    draws = {sample_rng(*key).random() for key in [(1, 2, 3), (1, 3, 2), (2, 1, 3), (0, 0, 0)]}
    assert len(draws) == 4


# ==================================================================== BLIP json
@pytest.fixture(scope="module")
def written_synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    synthetic = SyntheticNoisyDataset(13, noise_fraction=0.3, seed=2, image_size=24)
    return synthetic, root, synthetic.write_images(root)


def test_blip_json_reads_back_what_synthetic_wrote(written_synthetic):
    synthetic, root, annotation = written_synthetic
    dataset = BlipJsonDataset(annotation, root, transform=None)
    assert len(dataset) == 13 and not dataset.skipped
    for index in range(13):
        item = dataset[index]
        np.testing.assert_array_equal(np.asarray(item["image"]), np.asarray(synthetic.image(index)))
        assert item["caption"] == pre_caption(synthetic.record(index)["caption"])
        assert item["image_id"] == item["index"] == index


def test_blip_json_and_synthetic_dataset_give_the_same_tensors(written_synthetic):
    """The same data drawn on the fly or read from files: same augmentation for the same (seed, epoch, index)."""
    synthetic, root, annotation = written_synthetic
    transform = BlipTrainTransform(image_size=16)
    from_files, drawn = BlipJsonDataset(annotation, root, transform, seed=3), SyntheticDataset(synthetic, transform, 3)
    for dataset in (from_files, drawn):
        dataset.set_epoch(2)
    for index in (0, 7, 12):
        assert torch.equal(from_files[index]["image"], drawn[index]["image"])
        assert from_files[index]["caption"] == drawn[index]["caption"]


def test_caption_lists_expand_and_image_ids_follow_distinct_images(tmp_path):
    """COCO-Karpathy style (caption lists, string image_ids) over two files plus a jsonl file."""
    for name in ("a.png", "b.png", "c.png"):
        PIL.Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / name)
    (tmp_path / "one.json").write_text(json.dumps([
        {"image": "a.png", "caption": ["A dog.", "The DOG runs!"], "image_id": "coco_1"},
        {"image": "b.png", "caption": "a cat"},
    ]))
    (tmp_path / "two.json").write_text(json.dumps([{"image": "a.png", "caption": "again a"}]))
    (tmp_path / "three.jsonl").write_text('{"image": "c.png", "caption": "cee"}\n\n{"image": "b.png", "caption": "b2"}\n')
    dataset = BlipJsonDataset([tmp_path / "one.json", tmp_path / "two.json", tmp_path / "three.jsonl"], tmp_path,
                              transform=None)
    items = [dataset[index] for index in range(len(dataset))]
    assert [item["caption"] for item in items] == ["a dog", "the dog runs", "a cat", "again a", "cee", "b2"]
    assert [item["image_id"] for item in items] == [0, 0, 1, 0, 2, 1]


@pytest.mark.parametrize("name, content, message", [
    ("train.json", b'[{"image": "a.png", "caption": "x"},', ", line 1 column 37: not valid json (Expecting value)"),
    ("train.json", b'{"image": "a.png"}\n{"image": "b.png"}\n',
     ", line 2 column 1: not valid json (Extra data) (one record per line is JSON Lines: name the file .jsonl)"),
    ("train.jsonl", b'{"image": "a.png"}\n\n{bad\n',
     ", line 3: not valid json (Expecting property name enclosed in double quotes)"),
    ("train.json", b"\xff\xfe[]", ": not UTF-8 text (byte 0), so no json annotation file"),
    ("train.json", b'{"images": []}', ": a BLIP annotation file holds a json list of records, got dict"),
])
def test_an_annotation_file_that_is_no_record_list_names_itself_and_the_line(tmp_path, name, content, message):
    """json's own errors name neither the file nor, for JSON Lines, the line; a tired user's truncated or mislabelled
    file must say both (the line numbers count blank lines, as an editor does)."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InvalidInputError) as error:
        BlipJsonDataset([path], tmp_path, transform=None)
    assert str(error.value) == f"{path}{message}"


def test_captions_are_cleaned_and_cut_to_max_words(tmp_path):
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    long_caption = "Word " * 40 + "END."
    (tmp_path / "ann.json").write_text(json.dumps([{"image": "x.png", "caption": long_caption}]))
    for max_words in (30, 7):
        caption = BlipJsonDataset(tmp_path / "ann.json", tmp_path, None, max_words=max_words)[0]["caption"]
        assert caption == pre_caption(long_caption, max_words) == " ".join(["word"] * max_words)


@pytest.fixture
def messy_json(tmp_path):
    """Five good records and one of each kind of bad one."""
    synthetic = SyntheticNoisyDataset(5, image_size=16)
    records = []
    for index in range(5):
        synthetic.image(index).save(tmp_path / f"good{index}.png")
        records.append({"image": f"good{index}.png", "caption": f"good caption {index}"})
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (tmp_path / "truncated.jpg").write_bytes(png_bytes(synthetic.image(0).resize((64, 64)), "JPEG")[:300])
    records[2:2] = [{"image": "corrupt.jpg", "caption": "corrupt one"}, {"image": "missing.png", "caption": "gone"},
                    {"image": "good0.png", "caption": " ... "}, {"caption": "no image key"},
                    {"image": "truncated.jpg", "caption": "cut jpeg"}, {"image": "good1.png", "caption": ""}]
    (tmp_path / "ann.json").write_text(json.dumps(records))
    return tmp_path


def test_bad_json_records_are_skipped_counted_and_named(messy_json, caplog):
    caplog.set_level(logging.WARNING, logger="blip_fast")
    dataset = BlipJsonDataset(messy_json / "ann.json", messy_json, BlipTrainTransform(image_size=8))
    assert dataset.skipped == {"missing_image": 1, "empty_caption": 2, "bad_record": 1}
    assert len(dataset) == 7  # 5 good + corrupt + truncated (only decoding can tell)
    assert "missing.png" in caplog.text and "ann.json[" in caplog.text and "skipped 4" in caplog.text

    caplog.clear()
    items = [dataset[index] for index in range(len(dataset))]
    bad = [index for index, item in enumerate(items) if item is None]
    assert [dataset.image_paths[dataset.image_ids[index]].rsplit("/", 1)[1] for index in bad] == [
        "corrupt.jpg", "truncated.jpg"]
    assert dataset.skipped["unreadable_image"] == 2
    assert "corrupt.jpg" in caplog.text and "truncated.jpg" in caplog.text

    collator = BlipCollator(_tokenizer(), max_length=12)
    batch = collator(items)
    assert batch["pixel_values"].shape[0] == 5 and collator.dropped == 2
    assert sorted(batch["indices"].tolist()) == sorted(set(range(7)) - set(bad))


def test_replace_policy_keeps_the_batch_full(messy_json):
    dataset = BlipJsonDataset(messy_json / "ann.json", messy_json, None, on_error="replace")
    corrupt = next(index for index in range(len(dataset)) if dataset._name(index).endswith("corrupt.jpg"))
    item = dataset[corrupt]
    assert item is not None and item["index"] == corrupt
    # corrupt.jpg is followed by truncated.jpg, also unreadable: the next readable sample stands in.
    assert dataset._name(corrupt + 1).endswith("truncated.jpg")
    assert item["caption"] == dataset.captions[corrupt + 2] == "good caption 2"
    assert dataset.skipped["unreadable_image"] == 2


@pytest.mark.parametrize("bad_run", [17, 40])
def test_replace_policy_steps_over_any_run_of_unreadable_images(tmp_path, bad_run):
    """A folder whose download failed: more unreadable files in a row than any fixed number of tries. The next
    readable sample (wrapping around) stands in; only a set with no readable image gives None."""
    good = SyntheticNoisyDataset(1, image_size=16).image(0)
    good.save(tmp_path / "good.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    records = [{"image": "bad.jpg", "caption": f"bad {index}"} for index in range(bad_run)]
    (tmp_path / "ann.json").write_text(json.dumps([*records, {"image": "good.png", "caption": "the good one"}]))
    dataset = BlipJsonDataset(tmp_path / "ann.json", tmp_path, None, on_error="replace")
    assert dataset[0]["caption"] == "the good one" and dataset[0]["index"] == 0
    (tmp_path / "ann.json").write_text(json.dumps(records))
    assert BlipJsonDataset(tmp_path / "ann.json", tmp_path, None, on_error="replace")[3] is None


def test_unchecked_missing_files_fail_soft_at_load_time(messy_json):
    dataset = BlipJsonDataset(messy_json / "ann.json", messy_json, None, check_files=False)
    assert "missing_image" not in dataset.skipped and len(dataset) == 8
    assert sum(dataset[index] is None for index in range(len(dataset))) == 3
    assert dataset.skipped["unreadable_image"] == 3


# ==================================================================== webdataset shards
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three img2dataset shards of 7, 5 and 1 samples (png, jpg, webp); returns (synthetic, directory)."""
    directory = tmp_path_factory.mktemp("shards")
    synthetic = SyntheticNoisyDataset(13, noise_fraction=0.3, seed=6, image_size=24)
    layout = [(range(0, 7), "PNG"), (range(7, 12), "JPEG"), (range(12, 13), "WEBP")]
    for shard, (indices, format) in enumerate(layout):
        write_tar(directory / f"{shard:05d}.tar", img2dataset_members(synthetic, indices, format))
    return synthetic, directory


def test_shards_read_back_exactly_what_was_written(shards):
    synthetic, directory = shards
    dataset = WebDatasetShards(str(directory / "{00000..00002}.tar"), transform=None)
    assert len(dataset) == 13 and not dataset.skipped
    for index in range(13):
        item = dataset[index]
        expected = synthetic.image(index)
        if index >= 7:  # jpeg/webp are lossy: compare with decoding the same encoded bytes
            expected = PIL.Image.open(io.BytesIO(png_bytes(expected, "JPEG" if index < 12 else "WEBP")))
        np.testing.assert_array_equal(np.asarray(item["image"].convert("RGB")), np.asarray(expected.convert("RGB")))
        assert item["caption"] == pre_caption(synthetic.record(index)["caption"])
        assert item["image_id"] == item["index"] == index
    assert dataset.keys[:2] == ["000000000", "000000001"]


def test_shard_lists_braces_and_globs_agree(shards):
    _, directory = shards
    expected = [str(directory / f"{shard:05d}.tar") for shard in range(3)]
    assert expand_urls(str(directory / "{00000..00002}.tar")) == expected
    assert expand_urls(str(directory / "*.tar")) == expected
    assert expand_urls([directory / "00000.tar", str(directory / "0000{1,2}.tar")]) == expected
    with pytest.raises(MissingFileError, match="no webdataset shards match"):  # a user error: exit 2, one line
        WebDatasetShards(str(directory / "nothing*.tar"), None)
    with pytest.raises(InvalidInputError, match=rf"{directory} is a folder, not a webdataset shard: name its .tar "
                                                 r"files \(e\.g\. '.*\*\.tar'\)"):
        WebDatasetShards(str(directory), None)


@pytest.mark.parametrize("spec", ["pipe:cat a.tar", "https://example.com/{00000..00002}.tar", "s3://bucket/a.tar"])
def test_streaming_shard_specs_are_refused_by_name(spec):
    """Shards are indexed by byte offset; webdataset's streaming openers cannot be (issue 11, item 2)."""
    with pytest.raises(ValueError, match="pipe: and URL shard specs are not supported"):
        WebDatasetShards(spec, None)


def test_shards_agree_with_the_pinned_webdataset_package(shards):
    wds = pytest.importorskip("webdataset")
    assert wds.__version__.startswith("0.2.")
    _, directory = shards
    urls = expand_urls(str(directory / "*.tar"))
    theirs = [(sample["__key__"], pre_caption(sample["txt"].decode())) for sample in
              wds.WebDataset(urls, shardshuffle=False)]
    ours = WebDatasetShards(urls, None)
    assert list(zip(ours.keys, ours.captions)) == theirs


def test_caption_from_json_when_there_is_no_txt(tmp_path):
    image = png_bytes(PIL.Image.new("RGB", (8, 8), (9, 9, 9)))
    write_tar(tmp_path / "s.tar", [("a.jpg", image), ("a.json", b'{"caption": "From JSON."}'),
                                   ("b.PNG", image), ("b.txt", b"txt wins"), ("b.json", b'{"caption": "json loses"}'),
                                   ("__index__", b"metadata member")])
    dataset = WebDatasetShards(str(tmp_path / "s.tar"), None)
    assert dataset.captions == ["from json", "txt wins"] and not dataset.skipped


def test_bad_shard_samples_are_skipped_counted_and_named(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="blip_fast")
    synthetic = SyntheticNoisyDataset(4, image_size=16)
    good = img2dataset_members(synthetic, range(4))
    members = good[:6] + [
        ("corrupt.jpg", b"\xff\xd8\xff not an image"), ("corrupt.txt", b"corrupt image"),
        ("nocaption.png", good[0][1]), ("nocaption.txt", b"  .  "),
        ("noimage.txt", b"caption without image"),
        ("badjson.png", good[0][1]), ("badjson.json", b"{not json"),
    ] + good[6:]
    write_tar(tmp_path / "00000.tar", members)
    dataset = WebDatasetShards(str(tmp_path / "00000.tar"), BlipTrainTransform(image_size=8))
    assert dataset.skipped == {"empty_caption": 1, "missing_image": 1, "bad_record": 1}
    assert dataset.keys == ["000000000", "000000001", "corrupt", "000000002", "000000003"]
    for key in ("nocaption", "noimage", "badjson"):
        assert f"00000.tar:{key}" in caplog.text
    items = [dataset[index] for index in range(len(dataset))]
    assert items[2] is None and dataset.skipped["unreadable_image"] == 1 and "00000.tar:corrupt" in caplog.text
    assert all(item["image"].shape == (3, 8, 8) for item in items if item is not None)


def _cut_points(path):
    with tarfile.open(path) as tar:
        return {info.name: (info.offset, info.offset_data, info.size) for info in tar.getmembers()}


@pytest.mark.parametrize(("cut", "kept", "skipped"), [
    ("inside-image", 2, {"truncated_shard": 1, "truncated_sample": 1}),  # 000000002.png cut in half
    ("inside-caption", 2, {"truncated_shard": 1, "truncated_sample": 1}),  # 000000002.txt cut: no caption left
    ("between-members", 3, {"truncated_shard": 1}),  # cut right after 000000002.json: no end marker
    ("inside-header", 3, {"truncated_shard": 1}),  # half of 000000003.png's header block
    ("empty-file", 0, {"truncated_shard": 1}),
])
def test_truncated_shards_keep_their_complete_samples(tmp_path, caplog, cut, kept, skipped):
    caplog.set_level(logging.WARNING, logger="blip_fast")
    synthetic = SyntheticNoisyDataset(5, image_size=16)
    write_tar(tmp_path / "00000.tar", img2dataset_members(synthetic, range(5)))
    write_tar(tmp_path / "00001.tar", img2dataset_members(synthetic, range(5)))
    points = _cut_points(tmp_path / "00001.tar")
    offset = {
        "inside-image": points["000000002.png"][1] + points["000000002.png"][2] // 2,
        "inside-caption": points["000000002.txt"][1] + 2,
        "between-members": points["000000003.png"][0],
        "inside-header": points["000000003.png"][0] + 256,
        "empty-file": 0,
    }[cut]
    data = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(data[:offset])
    dataset = WebDatasetShards(str(tmp_path / "0000{0,1}.tar"), BlipTrainTransform(image_size=8))
    assert len(dataset) == 5 + kept
    assert dataset.skipped == skipped
    assert "00001.tar" in caplog.text and "truncated_shard" in caplog.text
    assert all(dataset[index] is not None for index in range(len(dataset)))
    assert dataset.captions[5:] == [pre_caption(synthetic.record(index)["caption"]) for index in range(kept)]


def test_missing_shards_in_a_brace_range_are_skipped(shards, caplog):
    caplog.set_level(logging.WARNING, logger="blip_fast")
    _, directory = shards
    dataset = WebDatasetShards(str(directory / "{00000..00004}.tar"), None)
    assert len(dataset) == 13 and dataset.skipped == {"missing_shard": 2}
    assert "00004.tar" in caplog.text


def test_a_shard_that_is_not_a_tar_is_skipped(shards, tmp_path):
    _, directory = shards
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar archive" * 40)
    dataset = WebDatasetShards([str(directory / "00002.tar"), str(tmp_path / "junk.tar")], None)
    assert len(dataset) == 1 and dataset.skipped == {"truncated_shard": 1}


# ==================================================================== sampler
SAMPLER_CASES = [(37, 4, 1), (37, 4, 3), (100, 7, 2), (13, 1, 5), (64, 8, 4)]


def run_epoch(num_samples, batch_size, world_size, epoch=0, **kwargs):
    """Per step, the list of every rank's batch."""
    samplers = [ResumableSampler(num_samples, batch_size, world_size, rank, **kwargs) for rank in range(world_size)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    return [list(step) for step in zip(*[list(sampler) for sampler in samplers])]


@pytest.mark.parametrize(("num_samples", "batch_size", "world_size"), SAMPLER_CASES)
def test_sampler_covers_each_epoch_disjointly(num_samples, batch_size, world_size):
    steps = run_epoch(num_samples, batch_size, world_size, seed=3)
    flat = [index for step in steps for batch in step for index in batch]
    assert len(steps) == len(ResumableSampler(num_samples, batch_size, world_size, seed=3))
    assert len(steps) == num_samples // (batch_size * world_size)
    assert all(len(batch) == batch_size for step in steps for batch in step)
    assert len(set(flat)) == len(flat) == len(steps) * batch_size * world_size
    assert set(flat) <= set(range(num_samples))


@pytest.mark.parametrize(("num_samples", "batch_size", "world_size"), SAMPLER_CASES)
def test_sampler_without_drop_last_covers_everything(num_samples, batch_size, world_size):
    steps = run_epoch(num_samples, batch_size, world_size, seed=3, drop_last=False)
    flat = [index for step in steps for batch in step for index in batch]
    assert len(steps) == math.ceil(num_samples / (batch_size * world_size))
    assert all(len(batch) == batch_size for step in steps for batch in step)
    assert set(flat) == set(range(num_samples))
    permutation = ResumableSampler(num_samples, batch_size, seed=3).permutation().tolist()
    assert flat[num_samples:] == permutation[: len(flat) - num_samples]  # the fill wraps around


@pytest.mark.parametrize(("num_samples", "batch_size", "world_size"), [(37, 4, 2), (100, 3, 4), (50, 5, 2)])
@pytest.mark.parametrize("drop_last", [True, False])
def test_rank_chunks_concatenate_to_the_single_rank_batch(num_samples, batch_size, world_size, drop_last):
    for epoch in (0, 3):
        many = run_epoch(num_samples, batch_size, world_size, epoch, seed=11, drop_last=drop_last)
        single = run_epoch(num_samples, batch_size * world_size, 1, epoch, seed=11, drop_last=drop_last)
        assert [sum(step, []) for step in many] == [step[0] for step in single]
        reference = ResumableSampler(num_samples, batch_size, world_size, seed=11, drop_last=drop_last)
        assert [sum(step, []) for step in many] == [reference.global_batch(s, epoch) for s in range(len(many))]


@pytest.mark.parametrize("consumed", [0, 1, 5, 9])
@pytest.mark.parametrize("rank", [0, 2])
def test_resume_from_state_dict_reproduces_the_remaining_batches(consumed, rank):
    def make():
        return ResumableSampler(100, 3, world_size=3, rank=rank, seed=7)

    uninterrupted = make()
    uninterrupted.set_epoch(4)
    expected = list(uninterrupted)
    interrupted = make()
    interrupted.set_epoch(4)
    iterator = iter(interrupted)
    taken = [next(iterator) for _ in range(consumed)]
    state = interrupted.state_dict()
    assert state == {"epoch": 4, "step": consumed}

    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a checkpoint round trip
    resumed.set_epoch(4)  # the epoch loop's usual call must not undo the resume
    assert taken + list(resumed) == expected
    assert resumed.state_dict() == {"epoch": 4, "step": len(expected)}
    resumed.set_epoch(5)
    fresh = make()
    fresh.set_epoch(5)
    assert list(resumed) == list(fresh)
    assert list(resumed) == list(fresh)  # a second pass over the same epoch starts at step 0 again


def test_state_dict_takes_the_loops_own_step_count():
    sampler = ResumableSampler(40, 4)
    iterator = iter(sampler)
    for _ in range(4):  # a DataLoader prefetching ahead of the loop
        next(iterator)
    assert sampler.state_dict(step=2) == {"epoch": 0, "step": 2}
    with pytest.raises(ValueError, match="out of range"):
        sampler.load_state_dict({"epoch": 0, "step": 11})


def test_epochs_and_seeds_change_the_order():
    def order(epoch, seed):
        return run_epoch(50, 5, 2, epoch, seed=seed)

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(1, 0) and order(0, 0) != order(0, 1)
    assert sum(run_epoch(10, 5, 1, shuffle=False), []) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


@pytest.mark.parametrize("kwargs", [dict(num_samples=7, batch_size=4, world_size=2), dict(num_samples=8, batch_size=0),
                                    dict(num_samples=8, batch_size=2, world_size=2, rank=2),
                                    dict(num_samples=0, batch_size=1, drop_last=False)])
def test_sampler_rejects_impossible_settings(kwargs):
    with pytest.raises(ValueError):
        ResumableSampler(**kwargs)


# ==================================================================== collator + DataLoader
def _tokenizer():
    return BlipTokenizer.train(SyntheticNoisyDataset.vocabulary() + ["good caption corrupt one cut jpeg"], 300)


@pytest.mark.parametrize("max_length", [5, 12, 35])
def test_collator_shapes_padding_and_truncation(max_length):
    tokenizer = _tokenizer()
    captions = ["a red circle", "two blue squares on the left of a striped yellow background", "a"]
    records = [{"image": torch.full((3, 4, 4), float(index)), "caption": caption, "image_id": 10 + index,
                "index": 20 + index} for index, caption in enumerate(captions)]
    batch = BlipCollator(tokenizer, max_length=max_length)(records)
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "image_ids", "indices"}
    assert batch["pixel_values"].shape == (3, 3, 4, 4) and batch["pixel_values"][2].eq(2).all()
    lengths = [min(len(tokenizer(caption).input_ids), max_length) for caption in captions]
    assert batch["input_ids"].shape == (3, max(lengths)) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, length in zip(batch["input_ids"], lengths):
        assert row[0] == tokenizer.cls_token_id and row[length - 1] == tokenizer.sep_token_id
        assert (row[length:] == tokenizer.pad_token_id).all()
    assert batch["image_ids"].tolist() == [10, 11, 12] and batch["indices"].tolist() == [20, 21, 22]
    assert batch["image_ids"].dtype == batch["indices"].dtype == torch.long
    static = BlipCollator(tokenizer, max_length=max_length, padding="max_length")(records)
    assert static["input_ids"].shape == (3, max_length)


def test_collator_drops_none_and_returns_none_for_an_empty_batch():
    collator = BlipCollator(_tokenizer())
    record = {"image": torch.zeros(3, 2, 2), "caption": "a red circle", "image_id": 0, "index": 0}
    assert collator([None, record, None])["pixel_values"].shape[0] == 1
    assert collator([None]) is None and collator.dropped == 3


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_batches_do_not_depend_on_workers(num_workers):
    synthetic = SyntheticNoisyDataset(24, noise_fraction=0.3, seed=1, image_size=32)
    dataset = SyntheticDataset(synthetic, BlipTrainTransform(image_size=16), seed=2)
    sampler = ResumableSampler(len(dataset), batch_size=5, world_size=2, rank=1, seed=2)
    collator = BlipCollator(_tokenizer(), max_length=30)
    dataset.set_epoch(1)
    sampler.set_epoch(1)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=num_workers)
    batches = list(loader)
    assert len(batches) == len(sampler) == 2
    for batch, indices in zip(batches, _epoch_batches(sampler)):
        assert batch["indices"].tolist() == indices
        expected = collator([dataset[index] for index in indices])
        for key, value in expected.items():
            assert torch.equal(batch[key], value), key


def _epoch_batches(sampler):
    copy = ResumableSampler(sampler.num_samples, sampler.batch_size, sampler.world_size, sampler.rank, sampler.seed)
    copy.set_epoch(sampler.epoch)
    return list(copy)
