"""The GPU input path's tensor ops (run here on CPU tensors) against the PIL path, and BLIP's RandomAugment.

Bounds (stated in blip_fast/data/tensor_transforms.py): crop boxes, flips and ops are identical by construction (one
``draw_params``); pixels after crop + antialiased bicubic resize differ from PIL's by at most 3 levels and by less than
0.3 on average (fixed- against floating-point passes, and PIL's pass order); each RandomAugment op on tensors equals the numpy
reference up to one level on at most 1% of pixels (float32 vs float64 arithmetic at .5 boundaries). Through
Equalize (a histogram-dependent table) a one-level difference before it can become a larger one after it on the
pixels of that level, so with RandomAugment 99% of pixels stay within 3 levels and the mean within 0.5. nvJPEG's
decode against libjpeg's is a GPU test.
"""

from __future__ import annotations

import io
import json
import random

import numpy as np
import PIL.Image
import pytest
import torch

from blip_fast.data import BlipJsonDataset, BlipTrainTransform, ImageLoadError, sample_rng
from blip_fast.data import randaugment as ra
from blip_fast.data import tensor_transforms as tt
from blip_fast.data.collate import BlipCollator

MEAN, STD = np.array(BlipTrainTransform().mean), np.array(BlipTrainTransform().std)


def _photo(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth, photo-like uint8 image with some edges (random low-frequency colour fields plus a few blocks)."""
    generator = np.random.default_rng(seed)
    coarse = generator.random((height // 16 + 2, width // 16 + 2, 3))
    image = np.asarray(PIL.Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height),
                                                                                      PIL.Image.Resampling.BICUBIC))
    image = image.copy()
    for _ in range(4):
        top, left = generator.integers(0, height - 8), generator.integers(0, width - 8)
        image[top:top + 8 + generator.integers(0, 40), left:left + 8 + generator.integers(0, 40)] = generator.integers(
            0, 256, 3)
    return image


def _jpeg(array: np.ndarray, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).convert(mode).save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def _levels(pixels: torch.Tensor) -> np.ndarray:
    """Normalised ``[3, H, W]`` -> uint8 levels (inverse of the lookup table)."""
    return np.rint((pixels.numpy() * STD[:, None, None] + MEAN[:, None, None]) * 255).astype(np.int64)


@pytest.mark.parametrize("size", [(640, 480), (333, 517), (224, 224), (97, 1001)])
@pytest.mark.parametrize("augment", [False, True])
def test_tensor_path_equals_pil_path(size, augment):
    transform = BlipTrainTransform(image_size=224, random_augment=augment)
    tensor_transform = transform.tensor_transform()
    for seed in range(6):
        data = _jpeg(_photo(*size, seed))
        reference = transform(PIL.Image.open(io.BytesIO(data)), sample_rng(7, 1, seed))
        encoded = transform.encode(data, sample_rng(7, 1, seed), "photo.jpg")
        assert encoded.encoded and encoded.params == transform.draw_params(*size, sample_rng(7, 1, seed))
        decoded = tt.decode_images([encoded], torch.device("cpu"))
        ours = tensor_transform(decoded, [encoded.params])[0]
        difference = np.abs(_levels(ours) - _levels(reference))
        within = np.quantile(difference, 0.99) if augment else difference.max()
        assert within <= 3 and difference.mean() < (0.5 if augment else 0.3), (seed, encoded.params, within,
                                                                               difference.mean())


@pytest.mark.parametrize("op", [("AutoContrast", 0.0), ("Equalize", 0.0), ("Brightness", 0.55), ("Brightness", 1.0),
                                ("Sharpness", 1.9), ("Sharpness", 0.1), ("ShearX", 0.15), ("ShearY", -0.15),
                                ("TranslateX", 5.0), ("TranslateY", -5.0), ("Rotate", 15.0), ("Rotate", -15.0)])
def test_random_augment_ops_on_tensors_equal_the_numpy_reference(op):
    image = _photo(61, 47, seed=3)
    image[..., 1] = 40 + image[..., 1] // 3  # a channel that does not span [0, 255]: autocontrast stretches it
    expected = ra.apply_numpy(image, (op,))
    ours = tt.apply_tensor(torch.from_numpy(image).permute(2, 0, 1).float(), (op,)).permute(1, 2, 0).numpy()
    difference = np.abs(ours.astype(np.int64) - expected)
    assert difference.max() <= 1 and (difference > 0).mean() <= 0.01, (op, difference.max(), (difference > 0).mean())
    if op[0] in ("AutoContrast", "Equalize", "ShearX", "Rotate", "TranslateX"):
        assert not np.array_equal(expected, image), "the op must change this image"


def test_random_augment_reference_by_hand():
    image = np.array([[[10, 0, 5], [20, 255, 5]], [[30, 128, 5], [40, 64, 5]]], dtype=np.uint8)
    stretched = ra.apply_numpy(image, (("AutoContrast", 0.0),))
    assert stretched[..., 0].tolist() == [[0, 85], [170, 255]]  # [10, 40] -> [0, 255]; the original gives 255s
    assert stretched[..., 1].tolist() == image[..., 1].tolist() and stretched[..., 2].tolist() == [[5, 5], [5, 5]]
    shifted = ra.apply_numpy(np.full((3, 4, 3), 200, np.uint8), (("TranslateX", 1.0),))
    assert shifted[:, :3, 0].tolist() == [[200] * 3] * 3 and shifted[:, 3, 0].tolist() == [128] * 3  # fill 128


def test_random_augment_draws_blips_magnitudes_from_the_sample_rng():
    augment = ra.RandomAugment()
    seen = {}
    for seed in range(400):
        ops = augment.draw(random.Random(seed))
        assert len(ops) <= 2 and ops == augment.draw(random.Random(seed))
        for name, value in ops:
            seen.setdefault(name, set()).add(round(value, 6))
    assert seen["Brightness"] == {1.0} and seen["Sharpness"] == {1.0}  # magnitude 5: factor 1.0, no change
    assert seen["ShearX"] == {0.15, -0.15} and seen["TranslateY"] == {5.0, -5.0} and seen["Rotate"] == {15.0, -15.0}
    assert set(seen) == set(ra.BLIP_AUGMENTS)
    with pytest.raises(ValueError, match="Solarize"):
        ra.RandomAugment(augs=("Solarize",))


def test_encoded_dataset_items_resume_exactly_and_skip_corrupt_files(tmp_path):
    """Workers read bytes and draw parameters from (seed, epoch, index): a fresh dataset (a resumed run) gives the same
    items; a truncated JPEG fails in the worker (replaced), not on the GPU; CMYK and PNG are decoded in the worker."""
    records = []
    for index, (name, payload) in enumerate([("a.jpg", _jpeg(_photo(320, 240, 0))),
                                            ("b.jpg", _jpeg(_photo(320, 240, 1))[:3000]),
                                            ("c.jpg", _jpeg(_photo(200, 300, 2), mode="CMYK")),
                                            ("d.png", None)]):
        path = tmp_path / name
        if payload is None:
            PIL.Image.fromarray(_photo(128, 96, 3)).save(path)
        else:
            path.write_bytes(payload)
        records.append({"image": name, "caption": f"caption number {index}"})
    (tmp_path / "data.json").write_text(json.dumps(records))

    def dataset():
        built = BlipJsonDataset(tmp_path / "data.json", tmp_path, BlipTrainTransform(image_size=64,
                                                                                     random_augment=True),
                                seed=5, on_error="replace")
        built.encoded_images = True
        built.set_epoch(2)
        return built

    first, again = [dataset()[index] for index in range(4)], [dataset()[index] for index in range(4)]
    for item, repeat in zip(first, again):
        assert torch.equal(item["image"].data, repeat["image"].data) and item["image"].params == repeat["image"].params
    assert first[0]["image"].encoded and not first[2]["image"].encoded and not first[3]["image"].encoded
    assert first[1]["caption"] == "caption number 2" and first[1]["index"] == 1  # b.jpg is replaced by c.jpg
    with pytest.raises(ImageLoadError, match="b.jpg"):
        BlipTrainTransform().encode((tmp_path / "b.jpg").read_bytes(), random.Random(0), "b.jpg")

    class Words:
        def __call__(self, captions, **kwargs):
            ids = torch.ones(len(captions), 4, dtype=torch.long)
            return {"input_ids": ids, "attention_mask": ids}

    batch = BlipCollator(Words())(first)
    assert "pixel_values" not in batch and len(batch["images"]) == 4
    pixels = dataset().transform.tensor_transform().encoded_batch(batch["images"], "cpu", torch.bfloat16)
    assert pixels.shape == (4, 3, 64, 64) and pixels.dtype == torch.bfloat16


@pytest.mark.gpu
def test_nvjpeg_path_on_cuda_equals_the_pil_path():
    pytest.importorskip("torchvision")
    transform = BlipTrainTransform(image_size=224, random_augment=True)
    images, references = [], []
    for seed in range(8):
        data = _jpeg(_photo(500, 375, seed))
        references.append(transform(PIL.Image.open(io.BytesIO(data)), sample_rng(0, 0, seed)))
        images.append(transform.encode(data, sample_rng(0, 0, seed), "photo.jpg"))
    pixels = transform.tensor_transform().encoded_batch(images, "cuda").cpu()
    for ours, reference in zip(pixels, references):
        difference = np.abs(_levels(ours) - _levels(reference))
        assert difference.max() <= 8 and difference.mean() < 1.0  # nvJPEG's IDCT differs from libjpeg's
