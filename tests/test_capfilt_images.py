"""CapFilt's image input (blip_fast/capfilt_images.py): the device-decode path against the PIL path.

Oracle: transformers' preprocessing as ``BlipImageProcessor`` computes it on the PIL image. Bounds: images decoded in
the workers (PNG, CMYK JPEG, and everything on the PIL path) are bit-identical; JPEGs decoded and resized on the device
differ by at most 4 levels and less than 0.2 on average (fixed- against floating-point resize passes), and on a GPU
by at most 8 levels and 1.0 on average (nvJPEG's IDCT against libjpeg's, the training input's GPU bound). On the CPU
the device path decodes with PIL in the main process: the same code, with PIL standing in for nvJPEG; the nvJPEG
dispatch itself runs against a fake ``torchvision.io`` here and for real in the ``gpu`` test.
"""

from __future__ import annotations

import io
import sys
import tarfile
import types

import numpy as np
import PIL.Image
import pytest
import torch

from blip_fast import capfilt_images
from blip_fast.capfilt_images import BatchPixels, ImageStream, decodes_on_device
from blip_fast.capfilt_io import CapFiltError, CapFiltInput, Item
from blip_fast.data import tensor_transforms
from blip_fast.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, BlipImageProcessor

PROCESSORS = {"captioner": BlipImageProcessor(size=96), "filter": BlipImageProcessor(size=(72, 56))}
MEAN, STD = np.array(OPENAI_CLIP_MEAN)[:, None, None], np.array(OPENAI_CLIP_STD)[:, None, None]


def _photo(width: int, height: int, seed: int) -> PIL.Image.Image:
    """Smooth colour fields with a few sharp-edged blocks: photo-like, so resize rounding is what differs."""
    generator = np.random.default_rng(seed)
    coarse = (generator.random((height // 12 + 2, width // 12 + 2, 3)) * 255).astype(np.uint8)
    image = np.array(PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.Resampling.BICUBIC))
    for _ in range(3):
        top, left = generator.integers(0, max(1, height - 6)), generator.integers(0, max(1, width - 6))
        image[top : top + 6 + generator.integers(0, 20), left : left + 6 + generator.integers(0, 20)] = \
            generator.integers(0, 256, 3)
    return PIL.Image.fromarray(image)


def _encode(image: PIL.Image.Image, fmt: str, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    image.convert(mode).save(buffer, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _huge_jpeg() -> bytes:
    """A small JPEG whose frame header claims 20,000 x 10,000 pixels: over twice PIL's limit, refused at open."""
    data = bytearray(_encode(_photo(16, 16, 0), "JPEG"))
    frame = data.index(b"\xff\xc0") + 5  # SOF0: length (2 bytes), precision (1), then height and width
    data[frame : frame + 4] = (10_000).to_bytes(2, "big") + (20_000).to_bytes(2, "big")
    return bytes(data)


def _items(tmp_path, files: dict[str, bytes | None]) -> list[Item]:
    """json-style items (the image read from its own file); None: a file that does not exist."""
    items = []
    for name, data in files.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        items.append(Item(name, str(tmp_path / name), ("a caption",)))
    return items


def _levels(pixels: torch.Tensor) -> np.ndarray:
    """Normalised ``[3, H, W]`` -> the uint8 levels it was made from."""
    return np.rint((pixels.cpu().double().numpy() * STD + MEAN) * 255).astype(np.int64)


def _expected(data: bytes, name: str) -> torch.Tensor:
    return PROCESSORS[name]([PIL.Image.open(io.BytesIO(data))]).pixel_values[0]


def _assert_within_resize_bounds(actual: torch.Tensor, expected: torch.Tensor, max_levels=4, mean_levels=0.2):
    difference = np.abs(_levels(actual) - _levels(expected))
    assert difference.max() <= max_levels and difference.mean() < mean_levels, (difference.max(), difference.mean())


# ------------------------------------------------------------------------------------------------ dispatch
@pytest.mark.parametrize("choice,device,torchvision,expected", [
    ("auto", "cpu", True, False), ("auto", "cuda", False, False), ("auto", "cuda", True, True),
    ("workers", "cuda", True, False), ("device", "cpu", False, True), ("device", "cuda", False, True),
])
def test_where_images_are_decoded(monkeypatch, choice, device, torchvision, expected):
    monkeypatch.setattr(capfilt_images, "nvjpeg_available", lambda: torchvision)
    assert decodes_on_device(choice, device, PROCESSORS) is expected


def test_settings_the_device_path_cannot_reproduce_stay_on_the_pil_path(monkeypatch):
    monkeypatch.setattr(capfilt_images, "nvjpeg_available", lambda: True)
    for settings in (dict(do_resize=False), dict(resample=PIL.Image.Resampling.BILINEAR), dict(do_convert_rgb=False)):
        processors = {**PROCESSORS, "filter": BlipImageProcessor(size=64, **settings)}
        assert not decodes_on_device("auto", "cuda", processors)
        with pytest.raises(CapFiltError, match="PIL path only"):
            decodes_on_device("device", "cuda", processors)
    with pytest.raises(CapFiltError, match="image_decode must be one of"):
        decodes_on_device("gpu", "cuda", PROCESSORS)


# ------------------------------------------------------------------------------------------------ workers
def test_workers_ship_jpegs_encoded_and_decode_the_rest(tmp_path):
    """With device decoding a worker returns an RGB or greyscale JPEG's bytes, its whole frame as the crop box; a PNG
    or a CMYK JPEG (nvJPEG does not take it) comes back as the PIL path's pixels, bit for bit. Shard members are
    read by offset, and their bytes kept for the output shard."""
    photo = _photo(45, 31, 1)
    files = {"rgb.jpg": _encode(photo, "JPEG"), "grey.jpg": _encode(photo, "JPEG", "L"),
             "cmyk.jpg": _encode(photo, "JPEG", "CMYK"), "photo.png": _encode(photo, "PNG")}
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    items = CapFiltInput(tmp_path / "00000.tar", None, 100).unit(0).items
    assert [item.extension for item in items] == ["jpg", "jpg", "jpg", "png"]
    device_stream = ImageStream(items, PROCESSORS, keep_bytes=True, device_decode=True)
    worker_stream = ImageStream(items, PROCESSORS, keep_bytes=True)
    for index, (name, data) in enumerate(files.items()):
        entry, reference = device_stream[index], worker_stream[index]
        assert entry["error"] is None and entry["data"] == data == reference["data"]
        if name.endswith("png") or name.startswith("cmyk"):
            assert entry["encoded"] is None
            assert all(torch.equal(entry["pixels"][key], reference["pixels"][key]) for key in PROCESSORS)
        else:
            assert entry["pixels"] is None and entry["encoded"].encoded
            assert bytes(entry["encoded"].data.numpy()) == data and entry["encoded"].params.crop == (0, 0, 31, 45)
            assert not entry["encoded"].params.flip and entry["encoded"].params.ops == ()


def test_bad_images_are_reported_as_on_the_pil_path(tmp_path):
    """Corrupt, truncated, oversized and missing files: the byte-reading worker reports each with the PIL path's
    exact message (the 1/8-scale check decodes every JPEG's entropy-coded data)."""
    good = _encode(_photo(64, 48, 2), "JPEG")
    files = {"corrupt.jpg": b"\xff\xd8\xff\xe0 not really a jpeg", "truncated.jpg": good[: len(good) // 2],
             "header_only.jpg": good[:200], "huge.jpg": _huge_jpeg(), "text.jpg": b"plain text", "missing.jpg": None}
    items = _items(tmp_path, files)
    device_stream = ImageStream(items, PROCESSORS, keep_bytes=False, device_decode=True)
    worker_stream = ImageStream(items, PROCESSORS, keep_bytes=False)
    for index, name in enumerate(files):
        entry, reference = device_stream[index], worker_stream[index]
        assert reference["error"] is not None and entry["error"] == reference["error"], name
        assert entry["pixels"] is entry["encoded"] is None
    assert "decompression bomb" in device_stream[3]["error"] and "file not found" in device_stream[5]["error"]


# ------------------------------------------------------------------------------------------------ batches
@pytest.mark.parametrize("size", [(640, 480), (333, 517), (96, 96), (31, 97)])
def test_device_path_pixels_match_the_processor(tmp_path, size):
    """A batch mixing JPEGs (decoded and resized in the main process, on the CPU here) with a PNG (worker pixels)
    and an unreadable file: rows in batch order, every processor's size, the bad one reported."""
    files = {f"{seed}.jpg": _encode(_photo(*size, seed), "JPEG") for seed in range(3)}
    files["photo.png"] = _encode(_photo(*size, 9), "PNG")
    files["bad.jpg"] = b"\xff\xd8\xff\xe0 broken"
    files["last.jpg"] = _encode(_photo(*size, 5), "JPEG", "L")
    items = _items(tmp_path, files)
    stream = ImageStream(items, PROCESSORS, keep_bytes=False, device_decode=True)
    pixels, errors = BatchPixels(PROCESSORS, "cpu")([stream[index] for index in range(len(items))], list(files))
    assert [error is None for error in errors] == [True, True, True, True, False, True]
    good = [name for name, error in zip(files, errors) if error is None]
    for key, processor in PROCESSORS.items():
        assert pixels[key].shape == (5, 3, *processor.size) and pixels[key].dtype == torch.float32
        for row, name in zip(pixels[key], good):
            expected = _expected(files[name], key)
            if name.endswith(".png"):
                assert torch.equal(row, expected)
            else:
                _assert_within_resize_bounds(row, expected)


def test_a_file_the_device_decoder_rejects_is_reported_not_raised(tmp_path, monkeypatch):
    """A JPEG that passes the workers' check but fails the batch decode: the batch is decoded image by image and
    that one alone becomes an error."""
    files = {f"{seed}.jpg": _encode(_photo(40, 30, seed), "JPEG") for seed in range(3)}
    items = _items(tmp_path, files)
    loaded = [ImageStream(items, PROCESSORS, False, device_decode=True)[index] for index in range(3)]
    rejected = loaded[1]["encoded"].data
    real = tensor_transforms.decode_images

    def flaky(images, device):
        if any(image.data is rejected for image in images):
            raise RuntimeError("nvjpegDecodeBatched failed")
        return real(images, device)

    monkeypatch.setattr(capfilt_images, "decode_images", flaky)
    pixels, errors = BatchPixels(PROCESSORS, "cpu")(loaded, list(files))
    assert errors[0] is None and errors[2] is None
    assert errors[1] == "cannot load image '1.jpg': corrupt or truncated data (RuntimeError: nvjpegDecodeBatched failed)"
    assert pixels["captioner"].shape[0] == 2
    _assert_within_resize_bounds(pixels["captioner"][1], _expected(files["2.jpg"], "captioner"))


def test_cuda_batches_take_one_batched_nvjpeg_call(tmp_path, monkeypatch):
    """On CUDA with torchvision the encoded JPEGs of a batch go to ``decode_jpeg`` in one list call in RGB mode
    (a fake ``torchvision.io`` here, decoding with PIL on the CPU; the real one is the gpu test)."""
    calls = []

    def decode_jpeg(data, device, mode):
        calls.append((len(data), str(device), mode))
        return [torch.from_numpy(np.array(PIL.Image.open(io.BytesIO(bytes(item.numpy()))).convert("RGB")))
                .permute(2, 0, 1).contiguous() for item in data]

    fake = types.SimpleNamespace(decode_jpeg=decode_jpeg, ImageReadMode=types.SimpleNamespace(RGB="RGB"))
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setitem(sys.modules, "torchvision.io", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    files = {f"{seed}.jpg": _encode(_photo(50, 40, seed), "JPEG") for seed in range(4)}
    items = _items(tmp_path, files)
    assert decodes_on_device("auto", "cuda", PROCESSORS)
    loaded = [ImageStream(items, PROCESSORS, False, device_decode=True)[index] for index in range(4)]
    pixels, errors = BatchPixels(PROCESSORS, "cuda")(loaded, list(files))
    assert calls == [(4, "cuda", "RGB")] and errors == [None] * 4
    for row, data in zip(pixels["filter"], files.values()):
        _assert_within_resize_bounds(row, _expected(data, "filter"))


@pytest.mark.gpu
def test_nvjpeg_batches_on_cuda_match_the_processor(tmp_path):
    pytest.importorskip("torchvision")
    files = {f"{seed}.jpg": _encode(_photo(500 + seed, 375, seed), "JPEG") for seed in range(6)}
    files["grey.jpg"] = _encode(_photo(300, 200, 7), "JPEG", "L")
    processors = {"captioner": BlipImageProcessor(size=384), "filter": BlipImageProcessor(size=224)}
    assert decodes_on_device("auto", "cuda", processors)
    items = _items(tmp_path, files)
    stream = ImageStream(items, processors, keep_bytes=False, device_decode=True)
    pixels, errors = BatchPixels(processors, "cuda")([stream[index] for index in range(len(items))], list(files))
    assert errors == [None] * len(files)
    for key, processor in processors.items():
        assert pixels[key].device.type == "cuda"
        for row, data in zip(pixels[key], files.values()):
            expected = processor([PIL.Image.open(io.BytesIO(data))]).pixel_values[0]
            _assert_within_resize_bounds(row, expected, max_levels=8, mean_levels=1.0)
