"""BlipImageProcessor vs transformers' BlipImageProcessor (its PIL backend here), config files, load_image errors."""

import io
import json

import numpy as np
import PIL.Image
import pytest
import torch

from blip_fast.data import BlipImageProcessor, ImageLoadError, load_image
from blip_fast.interop import composites_alpha

transformers = pytest.importorskip("transformers")
#: Whether the installed transformers composites transparent images onto white (5.21 on); our processor converts
#: as it does.
HF_COMPOSITES = composites_alpha(transformers.__version__)
INSTALLED = dict(alpha_on_white=HF_COMPOSITES)

ATOL = 1e-6
SIZES = [(1, 1), (7, 13), (500, 333)]  # PIL (width, height): a pixel, odd primes, a typical photo
MODES = ["RGB", "L", "RGBA", "LA", "P", "P+transparency", "CMYK", "I;16", "1", "F"]


def random_image(mode: str, size: tuple[int, int], seed: int = 0) -> PIL.Image.Image:
    """A random image of `mode`; alpha spans fully transparent to opaque so compositing matters."""
    rng = np.random.default_rng(seed)
    width, height = size
    bytes_ = lambda channels: rng.integers(0, 256, (height, width, channels), dtype=np.uint8)  # noqa: E731
    if mode in ("RGB", "RGBA"):
        return PIL.Image.fromarray(bytes_(len(mode)))
    if mode == "L":
        return PIL.Image.fromarray(bytes_(1)[..., 0])
    if mode == "LA":
        return PIL.Image.merge("LA", [random_image("L", size, seed + 1), random_image("L", size, seed + 2)])
    if mode.startswith("P"):
        image = random_image("RGB", size, seed).quantize(colors=16)
        if mode == "P+transparency":
            image.info["transparency"] = int(np.asarray(image)[0, 0])
        return image
    if mode == "CMYK":
        return PIL.Image.frombytes("CMYK", size, bytes_(4).tobytes())
    if mode == "I;16":  # values past 255 saturate in PIL's RGB conversion: both sides must agree on that
        return PIL.Image.fromarray(rng.integers(0, 512, (height, width), dtype=np.uint16))
    if mode == "1":
        return random_image("L", size, seed).convert("1")
    if mode == "F":
        return PIL.Image.fromarray(rng.uniform(-20, 300, (height, width)).astype(np.float32))
    raise ValueError(mode)


def hf_processor(**kwargs):
    return transformers.BlipImageProcessor(**kwargs)


def assert_pixels_equal(ours, images, hf, **call_kwargs):
    # PIL images reach transformers' numpy code channels-last: saying so lets transformers 4 read a 1x1 image, whose
    # channel axis it cannot infer.
    pil = all(isinstance(image, PIL.Image.Image) for image in (images if isinstance(images, list) else [images]))
    layout = dict(input_data_format="channels_last") if pil else {}
    expected = hf(images=images, return_tensors="pt", **layout)["pixel_values"]
    actual = ours(images, **call_kwargs)["pixel_values"]
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected.float(), atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def default_pair():
    return BlipImageProcessor(**INSTALLED), hf_processor()


@pytest.mark.parametrize("size", SIZES, ids=lambda size: f"{size[0]}x{size[1]}")
@pytest.mark.parametrize("mode", MODES)
def test_pil_modes_match_hf(default_pair, mode, size):
    ours, hf = default_pair
    image = random_image(mode, size)
    assert_pixels_equal(ours, image, hf)
    assert ours(image)["pixel_values"].shape == (1, 3, 384, 384)


@pytest.mark.parametrize("alpha_on_white, colour", [(True, (1.0, 1.0, 1.0)), (False, (1.0, 0.0, 0.0))])
@pytest.mark.parametrize("kind", ["pil", "array"])
def test_transparent_pixels_by_alpha_on_white(alpha_on_white, colour, kind):
    """transformers 5.21+ (and our default) paint a transparent red pixel white; before 5.21 transformers, like the
    original BLIP's convert("RGB"), kept the red (for arrays too, where it had no RGBA conversion)."""
    ours = BlipImageProcessor(alpha_on_white=alpha_on_white)
    transparent_red = PIL.Image.new("RGBA", (5, 5), (255, 0, 0, 0))
    image = transparent_red if kind == "pil" else np.asarray(transparent_red)
    pixels = ours(image, return_tensors="np")["pixel_values"][0]
    expected = (np.array(colour) - np.array(ours.image_mean)) / np.array(ours.image_std)
    np.testing.assert_allclose(pixels[:, 2, 2], expected, atol=ATOL)
    assert BlipImageProcessor().alpha_on_white


@pytest.mark.parametrize("value", ["false", 0, None])
def test_alpha_on_white_takes_a_bool_only(tmp_path, value):
    BlipImageProcessor().save_pretrained(tmp_path)
    for make in (lambda: BlipImageProcessor(alpha_on_white=value),
                 lambda: BlipImageProcessor.from_pretrained(tmp_path, alpha_on_white=value)):
        with pytest.raises(TypeError, match=f"alpha_on_white must be True or False, got {value!r}"):
            make()


@pytest.mark.parametrize("version, composites", [("4.57.6", False), ("5.20.0", False), ("5.21.0", True),
                                                   ("5.24.1.dev0", True)])
def test_composites_alpha_from_5_21(version, composites):
    assert composites_alpha(version) is composites


def test_batch_of_mixed_images_matches_hf(default_pair):
    ours, hf = default_pair
    images = [random_image(mode, size, seed) for seed, (mode, size) in enumerate(zip(MODES, SIZES * 4))]
    assert_pixels_equal(ours, images, hf)


def array_input(kind: str) -> np.ndarray | torch.Tensor:
    rng = np.random.default_rng(1)
    hwc = rng.integers(0, 256, (13, 7, 3), dtype=np.uint8)
    return {
        "hwc_uint8": hwc,
        "chw_uint8": hwc.transpose(2, 0, 1).copy(),
        "chw_torch": torch.from_numpy(hwc.transpose(2, 0, 1).copy()),
        "batch_torch": torch.from_numpy(rng.integers(0, 256, (2, 3, 11, 5), dtype=np.uint8)),
        "rgba_uint8": rng.integers(0, 256, (13, 7, 4), dtype=np.uint8),
        "grey_chw": rng.integers(0, 256, (1, 13, 7), dtype=np.uint8),
        "float_unit": rng.random((3, 13, 7)).astype(np.float32),
        "float_rgba": rng.random((13, 7, 4)).astype(np.float32),
        "float_integer_valued": rng.integers(0, 256, (3, 13, 7)).astype(np.float64),
    }[kind]


#: Arrays transformers converts to RGB from 5.21 on (grey repeated, RGBA composited) and refused before: compared
#: where the installed version reads them (alpha dropped instead: test_transparent_pixels_by_alpha_on_white).
CONVERTED_ARRAYS = ["rgba_uint8", "grey_chw", "float_rgba"]


@pytest.mark.parametrize(
    "kind",
    [kind for kind in ["hwc_uint8", "chw_uint8", "chw_torch", "batch_torch", "rgba_uint8", "grey_chw", "float_unit",
                       "float_rgba", "float_integer_valued"] if HF_COMPOSITES or kind not in CONVERTED_ARRAYS],
)
def test_array_inputs_match_hf(default_pair, kind):
    ours, hf = default_pair
    assert_pixels_equal(ours, array_input(kind), hf)


@pytest.mark.parametrize(
    "ours_kwargs, hf_kwargs",
    [
        (dict(size=(224, 160)), dict(size={"height": 224, "width": 160})),
        (dict(size=97, resample=PIL.Image.Resampling.BILINEAR), dict(size=97, resample=2)),
        (dict(image_mean=0.5, image_std=0.25), dict(image_mean=0.5, image_std=0.25)),
        (dict(do_resize=False), dict(do_resize=False)),
        (dict(do_rescale=False), dict(do_rescale=False)),
        (dict(do_normalize=False), dict(do_normalize=False)),
        (dict(rescale_factor=1 / 127.5), dict(rescale_factor=1 / 127.5)),
    ],
    ids=["size_hw", "size_int_bilinear", "scalar_mean_std", "no_resize", "no_rescale", "no_normalize", "factor"],
)
@pytest.mark.parametrize("kind", ["pil_rgba", "float_unit"])
def test_settings_match_hf(ours_kwargs, hf_kwargs, kind):
    image = random_image("RGBA", (23, 17)) if kind == "pil_rgba" else array_input(kind)
    assert_pixels_equal(BlipImageProcessor(**INSTALLED, **ours_kwargs), image, hf_processor(**hf_kwargs))


def test_output_container_and_formats(default_pair):
    ours, _ = default_pair
    image = random_image("RGB", (7, 13))
    pt = ours([image, image])
    assert pt.pixel_values is pt["pixel_values"]
    assert pt.pixel_values.shape == (2, 3, 384, 384)
    np_values = ours(image, return_tensors="np")["pixel_values"]
    assert isinstance(np_values, np.ndarray)
    np.testing.assert_array_equal(np_values, pt.pixel_values[:1].numpy())
    listed = ours([image, image], return_tensors=None)["pixel_values"]  # transformers' form without return_tensors
    assert isinstance(listed, list) and len(listed) == 2 and listed[0].shape == (3, 384, 384)
    np.testing.assert_array_equal(listed[1], pt.pixel_values[1].numpy())
    assert pt.to(dtype=torch.float16).pixel_values.dtype == torch.float16


@pytest.mark.parametrize(
    "images, error",
    [([], ValueError), ("image.jpg", TypeError), (np.zeros((5, 5), np.uint8), ValueError),
     (np.zeros((5, 5, 2), np.uint8), ValueError)],
    ids=["empty", "path", "2d_array", "two_channels"],
)
def test_bad_inputs_raise(default_pair, images, error):
    with pytest.raises(error):
        default_pair[0](images)


def test_mean_std_need_three_channels():
    with pytest.raises(ValueError, match="three"):
        BlipImageProcessor(image_mean=(0.5, 0.5))


def test_bad_return_tensors_raises(default_pair):
    with pytest.raises(ValueError, match="return_tensors"):
        default_pair[0](random_image("RGB", (3, 3)), return_tensors="tf")


# ---------------------------------------------------------------------------- config files
NON_DEFAULT = dict(size=(224, 160), image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.3, 0.25), resample=2,
                   rescale_factor=1 / 127.5, do_convert_rgb=True)


def test_save_pretrained_loads_in_transformers(tmp_path):
    ours = BlipImageProcessor(**NON_DEFAULT)
    ours.save_pretrained(tmp_path)
    hf = transformers.BlipImageProcessor.from_pretrained(tmp_path)
    assert dict(hf.size) == {"height": 224, "width": 160}
    assert tuple(hf.image_mean) == ours.image_mean and tuple(hf.image_std) == ours.image_std
    assert int(hf.resample) == 2 and hf.rescale_factor == ours.rescale_factor
    assert_pixels_equal(ours.with_settings(**INSTALLED), random_image("RGBA", (31, 9)), hf)
    assert BlipImageProcessor.from_pretrained(tmp_path) == ours
    assert BlipImageProcessor.from_pretrained(tmp_path, alpha_on_white=False) == ours.with_settings(alpha_on_white=False)


def test_from_pretrained_reads_transformers_save(tmp_path):
    hf = hf_processor(size={"height": 200, "width": 96}, image_mean=[0.1, 0.2, 0.3], image_std=[0.3, 0.2, 0.1],
                      resample=1, do_normalize=False)
    hf.save_pretrained(tmp_path)
    ours = BlipImageProcessor.from_pretrained(tmp_path)
    assert ours == BlipImageProcessor(size=(200, 96), image_mean=(0.1, 0.2, 0.3), image_std=(0.3, 0.2, 0.1),
                                      resample=1, do_normalize=False)
    assert_pixels_equal(ours, random_image("P", (40, 30)), hf)


def test_from_pretrained_defaults_and_int_size(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": 224, "image_std": None}))
    assert BlipImageProcessor.from_pretrained(tmp_path) == BlipImageProcessor(size=224)


@pytest.mark.parametrize(
    "config, match",
    [({"size": {"shortest_edge": 384}}, "size"), ({"do_center_crop": True}, "do_center_crop")],
)
def test_from_pretrained_rejects_unsupported_settings(tmp_path, config, match):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        BlipImageProcessor.from_pretrained(tmp_path)


def test_from_pretrained_without_config_names_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        BlipImageProcessor.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------- load_image
def encoded(image: PIL.Image.Image, format_: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format_)
    return buffer.getvalue()


def test_load_image_decodes_fully(tmp_path):
    image = random_image("RGBA", (17, 11))
    path = tmp_path / "image.png"
    path.write_bytes(encoded(image, "PNG"))
    loaded = load_image(path)
    path.write_bytes(b"overwritten")  # a lazily decoded image would now read garbage
    assert loaded.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(image))


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("missing.jpg", None, "not found"),
        ("truncated.jpg", "truncated_jpeg", "truncated"),
        ("notes.jpg", b"this is a text file, not an image\n", "not a recognised image"),
        ("directory", "directory", "cannot read it"),
    ],
)
def test_load_image_errors_name_path_and_reason(tmp_path, name, content, reason):
    path = tmp_path / name
    if content == "truncated_jpeg":
        data = encoded(random_image("RGB", (64, 48)), "JPEG")
        path.write_bytes(data[: len(data) // 2])
    elif content == "directory":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=reason) as info:
        load_image(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_load_image_refuses_decompression_bombs(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(encoded(random_image("L", (50, 50)), "PNG"))
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)  # PIL errors above 2x this
    with pytest.raises(ImageLoadError, match="decompression bomb") as info:
        load_image(path)
    assert str(path) in str(info.value)
