"""BLIP's image side: load image files safely and turn images into normalised `pixel_values`.

`BlipImageProcessor` reproduces transformers' `BlipImageProcessor` (its PIL backend, `BlipImageProcessorPil`,
which is what transformers uses without torchvision) to <= 1e-6, for PIL images, numpy arrays and torch tensors:
RGB conversion compositing transparency on white, PIL resize, rescale, normalise. It needs only PIL, numpy and
torch. uint8 images (every PIL input after RGB conversion) are rescaled and normalised through a 256-entry
lookup table computed with transformers' exact float64/float32 steps, so the result is bit-identical and cheap.

Training: `BlipTrainTransform` (torchvision's RandomResizedCrop + flip + ToTensor + Normalize, without torchvision)
and `BlipEvalTransform` share the dataset-facing signature `transform(image, rng) -> FloatTensor [3, H, W]`, with
all randomness drawn from the caller's `rng` so augmentation is reproducible per sample.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import numbers
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch

from blip_fast.data.randaugment import RandomAugment, apply_numpy
from blip_fast.data.tensor_transforms import (
    AugmentParams,
    EncodedImage,
    TensorTrainTransform,
    is_gpu_decodable,
    validate_encoded,
)
from blip_fast.errors import InvalidInputError, MissingFileError, is_kind, json_type, read_json_object
from blip_fast.tokenizer import BatchFeature

logger = logging.getLogger("blip_fast")

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_CONFIG_FILE = "preprocessor_config.json"
#: transformers 5 saves a processor's image settings here, under "image_processor" (no preprocessor_config.json).
PROCESSOR_CONFIG_FILE = "processor_config.json"
# preprocessor_config.json keys that map one-to-one onto BlipImageProcessor fields (size is converted).
_CONFIG_KEYS = (
    "image_mean", "image_std", "resample", "do_resize", "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb"
)

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor


class ImageLoadError(InvalidInputError):
    """An image file could not be opened or fully decoded; the message names the path and the reason."""


def load_image(path: str | os.PathLike) -> PIL.Image.Image:
    """Open and fully decode an image file, in its stored mode (the processor converts to RGB).

    Decoding here (`.load()`) makes truncated or corrupt files fail at load time with one error type,
    `ImageLoadError`, instead of later inside a transform; decompression bombs (over 2x PIL's
    `MAX_IMAGE_PIXELS`) are refused the same way. The file is closed on success and on failure.
    """
    return _decode(path, os.fspath(path))


def load_image_bytes(data: bytes, name: str) -> PIL.Image.Image:
    """`load_image` for encoded bytes (a tar member, a download); `name` says where they came from in errors."""
    return _decode(io.BytesIO(data), name)


def read_image_file(path: str | os.PathLike) -> bytes:
    """The encoded bytes of an image file (decoded later, e.g. on the GPU); errors as `load_image` raises them."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise _load_error(error, os.fspath(path)) from error


def _load_error(error: Exception, name: str) -> ImageLoadError:
    """The one wording of every load failure, whichever step (read, header, decode) met it."""
    if isinstance(error, FileNotFoundError):
        return ImageLoadError(f"cannot load image {name!r}: file not found")
    if isinstance(error, (IsADirectoryError, PermissionError)):
        return ImageLoadError(f"cannot load image {name!r}: cannot read it ({error.strerror})")
    if isinstance(error, PIL.UnidentifiedImageError):
        return ImageLoadError(f"cannot load image {name!r}: not a recognised image file")
    if isinstance(error, PIL.Image.DecompressionBombError):
        return ImageLoadError(f"cannot load image {name!r}: possible decompression bomb ({error})")
    # PIL's decoders report corrupt data with many exception types (OSError, SyntaxError, struct.error, ...).
    return ImageLoadError(f"cannot load image {name!r}: corrupt or truncated data ({type(error).__name__}: {error})")


def _decode(source: str | os.PathLike | io.BytesIO, name: str) -> PIL.Image.Image:
    try:
        with PIL.Image.open(source) as image:
            image.load()
    except Exception as error:
        raise _load_error(error, name) from (None if isinstance(error, FileNotFoundError) else error)
    return image


def read_image_header(data: bytes, name: str) -> tuple[int, int, bool]:
    """``(width, height, gpu_decodable)`` of encoded image bytes. A JPEG is also decoded at 1/8 scale, so that a
    truncated or corrupt file raises `ImageLoadError` now (the GPU decodes it in full later), worded as
    `load_image_bytes` words it."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            width, height, decodable = image.width, image.height, is_gpu_decodable(image)
            if image.format == "JPEG":
                validate_encoded(image)
    except Exception as error:
        raise _load_error(error, name) from error
    return width, height, decodable


def _pil_to_rgb(image: PIL.Image.Image, alpha_on_white: bool = True) -> PIL.Image.Image:
    """RGB the way transformers does it. With `alpha_on_white` (transformers 5.21 and later) any transparency (an
    alpha band, or a palette/L `transparency` entry) is composited onto white; without it (transformers up to 5.20,
    and the original BLIP) PIL's `convert("RGB")` drops the alpha and keeps the colour beneath, as it converts every
    other mode (L, P, CMYK, I;16, ...)."""
    if alpha_on_white and ("A" in image.getbands() or image.info.get("transparency") is not None):
        white = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _require_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):  # "false" would otherwise read as true
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _array_to_hwc(array: np.ndarray) -> np.ndarray:
    """[C, H, W] or [H, W, C] with C in (1, 3, 4) -> [H, W, C]; channels-first wins when both fit (as HF)."""
    if array.ndim != 3:
        raise ValueError(f"an image array must have 3 dims ([C, H, W] or [H, W, C]), got shape {array.shape}")
    if array.shape[0] in (1, 3, 4):
        return np.moveaxis(array, 0, -1)
    if array.shape[-1] in (1, 3, 4):
        return array
    raise ValueError(f"cannot find the channel dim (1, 3 or 4 channels) of an image with shape {array.shape}")


def _array_to_rgb(hwc: np.ndarray, alpha_on_white: bool = True) -> np.ndarray:
    """[H, W, C] -> [H, W, 3] like transformers' numpy path: grey repeated, RGBA composited onto white (or, without
    `alpha_on_white`, its alpha dropped as PIL drops it: transformers before 5.21 refused RGBA arrays)."""
    if hwc.shape[-1] == 1:
        return np.repeat(hwc, 3, axis=-1)
    if hwc.shape[-1] != 4:
        return hwc
    if not alpha_on_white:
        return hwc[..., :3]
    if np.issubdtype(hwc.dtype, np.floating) and (hwc.min() < 0.0 or hwc.max() > 1.0):
        raise ValueError(f"a float RGBA image must lie in [0, 1], got [{hwc.min()}, {hwc.max()}]")
    white = 255 if np.issubdtype(hwc.dtype, np.integer) else 1.0
    alpha = hwc[..., 3:4] / white
    composite = alpha * hwc[..., :3] + (1 - alpha) * white
    return (np.round(composite) if white == 255 else composite).astype(hwc.dtype)


def _pil_resize(hwc: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """Resize [H, W, C] to [h, w, C] with PIL on uint8, like transformers' `resize`.

    Non-uint8 input goes through uint8: integer-valued arrays in [0, 255] are cast, [0, 1] floats are scaled
    by 255 and truncated, and the result is scaled back to [0, 1] (float32).
    """
    scaled = False
    if hwc.dtype != np.uint8:
        if np.allclose(hwc, hwc.astype(int)):
            if hwc.min() < 0 or hwc.max() > 255:
                raise ValueError(f"an integer-valued image must lie in [0, 255], got [{hwc.min()}, {hwc.max()}]")
        elif hwc.min() >= 0 and hwc.max() <= 1:
            scaled = True
            hwc = (hwc.astype(np.float64) * 255).astype(np.float32)
        else:
            raise ValueError(f"a float image must lie in [0, 1] or be integer-valued, got [{hwc.min()}, {hwc.max()}]")
        hwc = hwc.astype(np.uint8)
    pil_image = PIL.Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc)
    height, width = size
    resized = np.asarray(pil_image.resize((width, height), resample=resample))
    resized = resized[..., None] if resized.ndim == 2 else resized
    return (resized.astype(np.float64) * (1 / 255)).astype(np.float32) if scaled else resized


def saved_config(directory: Path) -> tuple[dict[str, Any] | None, Path | None]:
    """The image-processor settings saved in `directory` and their file: `preprocessor_config.json` first (what
    transformers 4 and the hub repos hold, and what transformers 5 also reads first), else `processor_config.json`'s
    "image_processor" entry; (None, None) when neither holds them. A file that cannot be read, is no JSON object,
    or whose "image_processor" is not an object (null included) is an `InvalidInputError` naming it."""
    for name, key in ((PREPROCESSOR_CONFIG_FILE, None), (PROCESSOR_CONFIG_FILE, "image_processor")):
        path = directory / name
        if not path.is_file():
            continue
        config = read_json_object(path)
        if key is not None:
            if key not in config:
                continue
            config = config[key]
            if not isinstance(config, dict):
                raise InvalidInputError(f"{path}: {key} is a JSON {json_type(config)}, not an object of "
                                        "image-processor settings: correct it, or remove the entry to use BLIP's "
                                        "preprocessing")
        return config, path
    return None, None


def _size_setting(size: Any) -> int | tuple[int, int]:
    """transformers' `size` (`{height, width}` or an int) as a BlipImageProcessor size."""
    if isinstance(size, dict):
        if {key for key, value in size.items() if value is not None} != {"height", "width"}:
            raise ValueError(f"size must be {{height, width}} or an int, got {size}")
        return (size["height"], size["width"])
    return size


def _size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    height, width = size
    return (int(height), int(width))


def _processor_size(size: Any) -> tuple[int, int]:
    """`_size_pair` of a processor's `size`, which must be a positive int or two (a `ValueError` naming it)."""
    pair = [size] * 2 if isinstance(size, int) else list(size) if isinstance(size, (list, tuple)) else []
    if len(pair) != 2 or not all(is_kind(side, int) and side > 0 for side in pair):
        raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
    return (pair[0], pair[1])


def _channel_triple(value: float | Sequence[float], name: str = "image_mean/image_std") -> tuple[float, float, float]:
    """`value` (one number, or one per channel) as three floats; a `ValueError` naming `name` otherwise."""
    if isinstance(value, numbers.Real):
        items = [value] * 3
    elif isinstance(value, (str, dict)) or not hasattr(value, "__iter__"):  # a string iterates into characters
        items = []
    else:
        items = list(value)
    if len(items) != 3 or not all(_is_number(item) for item in items):
        raise ValueError(f"{name} needs one value or three (R, G, B), got {value!r}")
    return tuple(float(item) for item in items)


def _is_number(value: Any) -> bool:
    return is_kind(value, numbers.Real) and math.isfinite(value)


#: The filters PIL's `resize` takes (transformers' `PILImageResampling`), by value.
_RESIZE_FILTERS = tuple(sorted(PIL.Image.Resampling(value) for value in range(6)))


def _resample_filter(value: Any) -> int:
    if is_kind(value, int) and value in _RESIZE_FILTERS:
        return int(value)
    filters = ", ".join(f"{int(item)} {item.name.lower()}" for item in _RESIZE_FILTERS)
    raise ValueError(f"resample must be a PIL resampling filter ({filters}), got {value!r}")


@dataclass(frozen=True)
class BlipImageProcessor:
    """Images -> `pixel_values` FloatTensor [B, 3, H, W], numerically equal to transformers' BlipImageProcessor.

    Defaults are BLIP's: 384x384 bicubic, rescale 1/255, OpenAI CLIP mean/std. `size` is (height, width) or an
    int for a square; `resample` a PIL resampling filter (3 = bicubic). `alpha_on_white` picks the RGB conversion of
    transparent images, which transformers changed in 5.21: composited onto white (True, 5.21 on) or the alpha
    dropped, keeping the colour beneath (False: up to 5.20, and the original BLIP's `convert("RGB")`). It is a
    library behaviour, not a saved setting (:func:`blip_fast.interop.composites_alpha` gives a version's).
    """

    size: tuple[int, int] | int = (384, 384)
    image_mean: tuple[float, ...] | float = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] | float = OPENAI_CLIP_STD
    resample: int = PIL.Image.Resampling.BICUBIC
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    do_convert_rgb: bool = True
    alpha_on_white: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", _processor_size(self.size))
        object.__setattr__(self, "image_mean", _channel_triple(self.image_mean, "image_mean"))
        object.__setattr__(self, "image_std", _channel_triple(self.image_std, "image_std"))
        object.__setattr__(self, "resample", _resample_filter(self.resample))
        if not _is_number(self.rescale_factor):
            raise ValueError(f"rescale_factor must be a number, got {self.rescale_factor!r}")
        for name in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb", "alpha_on_white"):
            _require_bool(name, getattr(self, name))

    # ---------------------------------------------------------------- config files
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> BlipImageProcessor:
        """Read the settings a transformers version saved: `preprocessor_config.json` (transformers 4, the hub's
        BLIP repos, our saves) or the `image_processor` entry of `processor_config.json` (transformers 5).

        Takes a directory or a hub id with transformers' download keywords (`cache_dir`, `revision`,
        `local_files_only`, `token`, `force_download`), and `alpha_on_white`; missing (or null) keys take
        transformers' defaults.
        """
        from blip_fast.hub import HubOptions, resolve

        options = HubOptions.pop_from(kwargs)
        alpha_on_white = kwargs.pop("alpha_on_white", True)
        if kwargs:
            raise TypeError(f"BlipImageProcessor.from_pretrained got unsupported arguments {sorted(kwargs)}")
        directory = Path(resolve(pretrained_model_name_or_path, options, files="image_processor"))
        config, path = saved_config(directory)
        if config is None:
            holds = " (its processor_config.json has no image_processor entry)" if (
                directory / PROCESSOR_CONFIG_FILE).is_file() else ""
            raise MissingFileError(f"no {PREPROCESSOR_CONFIG_FILE} or {PROCESSOR_CONFIG_FILE} in "
                                   f"{os.fspath(directory)!r}{holds}")
        return cls.from_dict(config, where=str(path)).with_settings(alpha_on_white=alpha_on_white)

    @classmethod
    def from_dict(cls, config: dict[str, Any], where: str = "image processor config") -> BlipImageProcessor:
        """The settings of a transformers image-processor config dict; a setting it cannot take is an
        `InvalidInputError` naming `where` (the file) and the key."""
        config = {key: value for key, value in config.items() if value is not None}
        for unsupported in ("do_center_crop", "do_pad"):
            if config.get(unsupported):
                raise InvalidInputError(f"{where}: {unsupported}=true is not part of BLIP's preprocessing and not "
                                        "supported")
        try:
            return cls(size=_size_setting(config.get("size", 384)),
                       **{name: config[name] for name in _CONFIG_KEYS if name in config})
        except (TypeError, ValueError) as error:  # each names its key
            raise InvalidInputError(f"{where}: {error}") from None

    def with_settings(self, **settings: Any) -> BlipImageProcessor:
        """A copy with some settings replaced (transformers' per-call keywords; `size` may be `{height, width}`)."""
        if "size" in settings:
            settings["size"] = _size_setting(settings["size"])
        return dataclasses.replace(self, **settings) if settings else self

    @classmethod
    def for_model_dir(cls, directory: str | os.PathLike, image_size: int) -> BlipImageProcessor:
        """The one loader of a model directory's image processor: its saved settings (either transformers
        layout), else BLIP's preprocessing at the model's `image_size` (original checkpoints and bare weight dirs
        carry none), which is logged: a model trained with other settings would be fed wrong pixels. Saved settings
        that resize to another size than `image_size` are an `InvalidInputError`: the model's position table would
        not fit its input."""
        config, path = saved_config(Path(directory))
        if config is not None:
            processor = cls.from_dict(config, where=str(path))
            if processor.do_resize and processor.size != (image_size, image_size):
                raise InvalidInputError(f"{path} resizes images to {processor.size[0]}x{processor.size[1]}, but the "
                                        f"model in {os.fspath(directory)} takes {image_size}x{image_size}: correct "
                                        "its size, or remove it to use BLIP's preprocessing at the model's size")
            return processor
        logger.warning("%s has no %s or %s: using BLIP's preprocessing (%dx%d bicubic, CLIP mean/std)",
                       os.fspath(directory), PREPROCESSOR_CONFIG_FILE, PROCESSOR_CONFIG_FILE, image_size, image_size)
        return cls(size=image_size)

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Write `preprocessor_config.json` that transformers' BlipImageProcessor loads to the same settings."""
        height, width = self.size
        config = {
            "image_processor_type": "BlipImageProcessor",
            "do_convert_rgb": self.do_convert_rgb,
            "do_normalize": self.do_normalize,
            "do_rescale": self.do_rescale,
            "do_resize": self.do_resize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
            "size": {"height": height, "width": width},
        }
        path = Path(directory) / PREPROCESSOR_CONFIG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return str(path)

    # ---------------------------------------------------------------- processing
    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput],
        return_tensors: Literal["pt", "np"] | None = "pt",
    ) -> BatchFeature:
        """PIL images, [C, H, W]/[H, W, C] arrays or tensors, [B, ...] batches, or a list of them ->
        `{"pixel_values": [B, 3, H, W] float32}`: a torch tensor for "pt" (the default here; transformers' default
        is None), a numpy array for "np", a list of [3, H, W] numpy arrays for None (as transformers returns)."""
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        arrays = [self._process_one(image) for image in _flatten(images)]  # each [3, H, W]
        if return_tensors is None:
            return BatchFeature(pixel_values=arrays)
        pixel_values = np.stack(arrays)  # [B, 3, H, W]
        if return_tensors == "pt":
            pixel_values = torch.from_numpy(pixel_values)
        return BatchFeature(pixel_values=pixel_values)

    def _process_one(self, image: ImageInput) -> np.ndarray:
        """One image -> float32 [C, H, W]."""
        if isinstance(image, PIL.Image.Image):
            hwc = np.asarray(_pil_to_rgb(image, self.alpha_on_white) if self.do_convert_rgb else image)
            hwc = hwc[..., None] if hwc.ndim == 2 else hwc
        else:
            array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
            hwc = _array_to_hwc(array)
            hwc = _array_to_rgb(hwc, self.alpha_on_white) if self.do_convert_rgb else hwc
        if self.do_resize:
            hwc = _pil_resize(hwc, self.size, self.resample)
        if self.do_normalize and hwc.shape[-1] != len(self.image_mean):
            raise ValueError(f"cannot normalise a {hwc.shape[-1]}-channel image with {len(self.image_mean)} means")
        chw = np.moveaxis(hwc, -1, 0)
        if chw.dtype == np.uint8 and chw.shape[0] == 3:
            # Fancy indexing by uint8 values: ~4x faster than np.take, ~8x faster than the float64 arithmetic.
            return np.stack([self._uint8_lut[channel][chw[channel]] for channel in range(3)])
        return self._rescale_normalize(chw).astype(np.float32)

    def _rescale_normalize(self, chw: np.ndarray) -> np.ndarray:
        """transformers' rescale (float64 multiply, float32 result) then normalise in the image's float dtype."""
        if self.do_rescale:
            chw = (chw.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            chw = chw if np.issubdtype(chw.dtype, np.floating) else chw.astype(np.float32)
            mean = np.asarray(self.image_mean, dtype=chw.dtype)[:, None, None]
            std = np.asarray(self.image_std, dtype=chw.dtype)[:, None, None]
            chw = (chw - mean) / std
        return chw

    @property
    def runs_on_device(self) -> bool:
        """Whether `tensor_transform` reproduces these settings (within its resize bounds): a bicubic resize of the
        RGB image. Others (no resize, another filter, no RGB conversion) have the PIL path only."""
        return self.do_resize and self.do_convert_rgb and self.resample == PIL.Image.Resampling.BICUBIC

    def tensor_transform(self) -> TensorTrainTransform:
        """This processing on decoded uint8 ``[3, H, W]`` tensors, on their device (the GPU input path of
        `blip_fast.data.tensor_transforms`): with the whole image as the crop box and no flip, the image resized
        to `size` (antialiased bicubic, PIL's filter) and normalised through this processor's uint8 table."""
        return TensorTrainTransform(self.size, self._uint8_lut)

    @cached_property
    def _uint8_lut(self) -> np.ndarray:
        """[3, 256] float32: `_rescale_normalize` of every uint8 value per channel (exact, computed once)."""
        values = np.broadcast_to(np.arange(256, dtype=np.uint8), (3, 1, 256))
        return np.ascontiguousarray(self._rescale_normalize(values)[:, 0, :], dtype=np.float32)


def _flatten(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """A single image, a [B, ...] batch, or a list of images/batches -> a flat list of single images."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    flat: list[ImageInput] = []
    for item in items:
        if isinstance(item, PIL.Image.Image):
            flat.append(item)
        elif isinstance(item, (np.ndarray, torch.Tensor)):
            flat.extend(list(item) if item.ndim == 4 else [item])
        else:
            raise TypeError(f"expected PIL images, numpy arrays or torch tensors, got {type(item).__name__}")
    if not flat:
        raise ValueError("no images given")
    return flat


# ==================================================================== training-time transforms
Rng = random.Random | np.random.Generator


def _uniform(rng: Rng, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _randint(rng: Rng, low: int, high: int) -> int:
    """An integer in [low, high], both ends included."""
    return rng.randint(low, high) if isinstance(rng, random.Random) else int(rng.integers(low, high + 1))


def _uint8_normalize_lut(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[3, 256] float32: torchvision's `ToTensor` (x / 255 in float32) then `Normalize` ((x - mean) / std, float32)."""
    values = np.arange(256, dtype=np.float32) / np.float32(255)
    mean32, std32 = np.asarray(mean, np.float32)[:, None], np.asarray(std, np.float32)[:, None]
    return np.ascontiguousarray((values[None, :] - mean32) / std32, dtype=np.float32)


@dataclass(frozen=True)
class BlipTrainTransform:
    """BLIP's training transform in PIL/numpy: RandomResizedCrop (bicubic) -> horizontal flip -> tensor -> normalise.

    `transform(image, rng) -> FloatTensor [3, image_size, image_size]`. All randomness comes from `rng` (a
    `random.Random` or a numpy `Generator`), so a sample's augmentation is fixed by the rng the dataset derives from
    (seed, epoch, index), whatever worker draws it: exact resume depends on this. `rng=None` uses a fresh,
    unseeded `random.Random` (not reproducible).

    Semantics are torchvision's (`RandomResizedCrop.get_params`): up to 10 tries of an area fraction uniform in
    `scale` and a log-uniform aspect ratio in `ratio`; a box that fits is placed uniformly; otherwise a centre crop
    of the whole image clamped to `ratio`. The crop is cut then resized with PIL bicubic; the flip happens with
    probability `flip_prob`; `ToTensor` + `Normalize` in float32. Images of any mode are converted to RGB first, as
    BLIP's training datasets do (`convert("RGB")`: a transparent pixel keeps the colour beneath its alpha);
    `alpha_on_white=True` composites transparency on white instead, as transformers' processor does from 5.21 on.

    `scale` defaults to BLIP's pre-training (0.2, 1.0) (`configs/pretrain.yaml: min_scale 0.2`); BLIP's fine-tuning
    configs (captioning, retrieval, VQA) use (0.5, 1.0). `random_augment=True` adds BLIP's `RandomAugment(2, 5)`
    (autocontrast, equalize, shear, translate, rotate, ...; `blip_fast.data.randaugment`) after the flip, as BLIP's
    pre-training and fine-tuning transforms do. `encode` is the GPU path's worker half (the same draws; decoding and
    pixels on the GPU, `blip_fast.data.tensor_transforms`). Horizontal flips swap "left" and "right" in
    the scene without touching the caption; set `flip_prob=0` where captions name sides (the synthetic set).
    """

    image_size: int | tuple[int, int] = 224
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    random_augment: bool = False
    alpha_on_white: bool = False

    def __post_init__(self) -> None:
        _require_bool("alpha_on_white", self.alpha_on_white)
        object.__setattr__(self, "image_size", _size_pair(self.image_size))
        object.__setattr__(self, "mean", _channel_triple(self.mean))
        object.__setattr__(self, "std", _channel_triple(self.std))
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must satisfy 0 < low <= high, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {self.ratio}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must lie in [0, 1], got {self.flip_prob}")

    def crop_params(self, width: int, height: int, rng: Rng) -> tuple[int, int, int, int]:
        """torchvision's `RandomResizedCrop.get_params`: (top, left, crop_height, crop_width) for an image of
        `width` x `height`, drawing from `rng`."""
        area = width * height
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * _uniform(rng, self.scale[0], self.scale[1])
            aspect = math.exp(_uniform(rng, log_low, log_high))
            crop_width = int(round(math.sqrt(target_area * aspect)))
            crop_height = int(round(math.sqrt(target_area / aspect)))
            if 0 < crop_width <= width and 0 < crop_height <= height:
                top = _randint(rng, 0, height - crop_height)
                left = _randint(rng, 0, width - crop_width)
                return top, left, crop_height, crop_width
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            crop_width, crop_height = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            crop_width, crop_height = int(round(height * max(self.ratio))), height
        else:
            crop_width, crop_height = width, height
        return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width

    def draw_params(self, width: int, height: int, rng: Rng) -> AugmentParams:
        """The augmentation of one `width` x `height` image, drawn from `rng`: crop box, then flip (torchvision draws
        it after the crop, `torch.rand(1) < p`), then the RandomAugment ops. Both paths draw through here."""
        crop = self.crop_params(width, height, rng)
        flip = _uniform(rng, 0.0, 1.0) < self.flip_prob
        return AugmentParams(crop, flip, RandomAugment().draw(rng) if self.random_augment else ())

    def __call__(self, image: PIL.Image.Image, rng: Rng | None = None) -> torch.Tensor:
        """PIL image -> normalised FloatTensor [3, H, W] (H, W = `image_size`)."""
        if not isinstance(image, PIL.Image.Image):
            raise TypeError(f"BlipTrainTransform takes PIL images, got {type(image).__name__}")
        rng = random.Random() if rng is None else rng
        image = _pil_to_rgb(image, self.alpha_on_white)
        params = self.draw_params(image.width, image.height, rng)
        top, left, crop_height, crop_width = params.crop
        height, width = self.image_size
        image = image.crop((left, top, left + crop_width, top + crop_height))
        image = image.resize((width, height), resample=PIL.Image.Resampling.BICUBIC)
        if params.flip:
            image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
        chw = apply_numpy(np.asarray(image), params.ops).transpose(2, 0, 1)  # [3, H, W] uint8
        return torch.from_numpy(np.stack([self._lut[channel][chw[channel]] for channel in range(3)]))

    def encode(self, source: bytes | PIL.Image.Image, rng: Rng, name: str = "image") -> EncodedImage:
        """The GPU path's worker half: the encoded bytes (or, for what the GPU cannot decode, the decoded uint8
        pixels) and the parameters `__call__` would draw. Corrupt data raises `ImageLoadError` here, as `load_image`."""
        encoded = False
        if isinstance(source, PIL.Image.Image):
            image = _pil_to_rgb(source, self.alpha_on_white)
        else:
            width, height, encoded = read_image_header(source, name)
            if not encoded:
                image = _pil_to_rgb(_decode(io.BytesIO(source), name), self.alpha_on_white)
        if encoded:
            params = self.draw_params(width, height, rng)
            return EncodedImage(torch.frombuffer(bytearray(source), dtype=torch.uint8), True, params)
        params = self.draw_params(image.width, image.height, rng)
        return EncodedImage(torch.from_numpy(np.asarray(image)).permute(2, 0, 1).contiguous(), False, params)

    @cached_property
    def _lut(self) -> np.ndarray:
        return _uint8_normalize_lut(self.mean, self.std)

    def tensor_transform(self) -> TensorTrainTransform:
        """The GPU half of the `encode` path: decoded images + drawn parameters -> the pixels `__call__` gives."""
        return TensorTrainTransform(self.image_size, self._lut)


@dataclass(frozen=True)
class BlipEvalTransform:
    """The eval transform with the training transforms' call signature: `transform(image, rng=None) ->
    FloatTensor [3, H, W]`, equal to `BlipImageProcessor(size=image_size, ...)` (HF's processing) on one image.
    `rng` is ignored; it exists so datasets can take either transform."""

    image_size: int | tuple[int, int] = 384
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD

    def __call__(self, image: PIL.Image.Image, rng: Rng | None = None) -> torch.Tensor:
        return self._processor(image).pixel_values[0]

    @cached_property
    def _processor(self) -> BlipImageProcessor:
        return BlipImageProcessor(size=self.image_size, image_mean=self.mean, image_std=self.std)
