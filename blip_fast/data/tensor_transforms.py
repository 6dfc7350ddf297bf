"""BLIP's training augmentation on torch tensors: the GPU input path, checked against the PIL path on CPU tensors.

The PIL path (:class:`blip_fast.data.BlipTrainTransform`) decodes, crops, resizes, flips and augments every image in a
DataLoader worker and ships float32 pixels: ~100-170 images/s per core at 224 px, 4x the bytes of uint8. The GPU
path splits it: workers only read the encoded file, parse its header and draw the augmentation parameters from the
sample's rng (:class:`AugmentParams`, the same draws in the same order as the PIL path, so resume stays exact), then
the batch is decoded on the GPU (nvJPEG through ``torchvision.io.decode_jpeg(device="cuda")``) and cropped,
resized, flipped, augmented and normalised there (:class:`TensorTrainTransform`).

Why torchvision's nvJPEG and not NVIDIA DALI: the work after decoding is ours (BLIP's crop, flip and RandomAugment
with per-sample parameters drawn for exact resume), which DALI would need re-expressed as its own graph with its
own RNG; decode is the one step that needs a library, and torchvision (already beside every CUDA torch) provides it
batched. DALI would add a large CUDA-versioned dependency for that step alone.

Between the two paths: crop boxes, flips and augmentation ops are identical; pixels differ by the resize kernel's
arithmetic (both resize in two one-axis passes rounded to uint8 between them, PIL in fixed point and in an order it
picks: at most 3 levels, 0.3 on average), which Equalize (a histogram table) can widen on a few pixels, and, on the
GPU, by nvJPEG's IDCT against libjpeg's (``tests/test_tensor_transforms.py`` states the bounds). Every stage keeps
uint8-valued pixels, as the PIL path does, and normalises through the same lookup table.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from blip_fast.data import randaugment
from blip_fast.data.randaugment import AFFINE_OPS, FILL, Op

logger = logging.getLogger("blip_fast")


@dataclass(frozen=True)
class AugmentParams:
    """One sample's augmentation: crop box ``(top, left, height, width)`` in the source image, flip, RandomAugment ops."""

    crop: tuple[int, int, int, int]
    flip: bool
    ops: tuple[Op, ...] = ()


@dataclass
class EncodedImage:
    """What a worker ships for the GPU path: the encoded file bytes (uint8 ``[N]``), or the decoded uint8 ``[3, H, W]``
    pixels when the GPU cannot decode it (not a baseline/progressive RGB or greyscale JPEG), and its parameters."""

    data: torch.Tensor
    encoded: bool
    params: AugmentParams


def is_gpu_decodable(image: PIL.Image.Image) -> bool:
    """JPEGs in RGB (YCbCr) or greyscale: what nvJPEG decodes to RGB; CMYK JPEGs and other formats go through PIL."""
    return image.format == "JPEG" and image.mode in ("RGB", "L")


def validate_encoded(image: PIL.Image.Image) -> None:
    """Decode a JPEG at 1/8 scale (its DCT scaling: a few percent of a full decode) so that truncated or corrupt
    files fail in the worker, where the dataset skips or replaces them, not in the training step."""
    image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
    image.load()


# ---------------------------------------------------------------------------------------------------- decode
def decode_images(images: list[EncodedImage], device: torch.device) -> list[torch.Tensor]:
    """uint8 ``[3, H, W]`` on ``device`` for each image: nvJPEG (one batched call) on CUDA when torchvision is there,
    PIL otherwise; pixels the worker already decoded are moved as they are."""
    decoded: list[torch.Tensor | None] = [None if item.encoded else item.data.to(device) for item in images]
    pending = [index for index, tensor in enumerate(decoded) if tensor is None]
    if pending and device.type == "cuda" and nvjpeg_available():
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            for index, tensor in zip(pending, decode_jpeg([images[i].data for i in pending], device=device,
                                                          mode=ImageReadMode.RGB)):
                decoded[index] = tensor
        except RuntimeError as error:  # one bad file fails the batch call: decode the rest one by one below
            logger.warning("batched nvJPEG decode failed (%s); decoding this batch with PIL", error)
    for index, tensor in enumerate(decoded):
        if tensor is None:
            with PIL.Image.open(io.BytesIO(images[index].data.numpy().tobytes())) as image:
                array = np.array(image.convert("RGB"))
            decoded[index] = torch.from_numpy(array).permute(2, 0, 1).contiguous().to(device)
    return decoded


def nvjpeg_available() -> bool:
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:  # torchvision cannot be installed beside every torch build
        return False
    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------------- ops
def crop_resize(image: torch.Tensor, crop: tuple[int, int, int, int], size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``[3, H, W]`` -> the crop box resized to ``size`` by antialiased bicubic (PIL's filter: a = -0.5, support
    scaled when shrinking), float32 rounded to levels.

    Two one-axis passes with rounding and clamping to uint8 levels between them, as PIL does: one 2-D pass differs
    from PIL by up to ~7 levels where an edge overshoots [0, 255] in PIL's intermediate. The vertical pass goes first
    when it shrinks the image by the larger factor (the order Pillow's results show: the other order costs ~0.1 level
    on average)."""
    top, left, height, width = crop
    region = image[:, top:top + height, left:left + width].float()[None]
    out_height, out_width = size
    vertical_first = out_height < height and out_height / height < out_width / width
    middle = (out_height, width) if vertical_first else (height, out_width)
    for step in (middle, size):
        region = F.interpolate(region, size=step, mode="bicubic", antialias=True, align_corners=False)
        region = region.round().clamp(0, 255)
    return region[0]


def _channel_tables(image: torch.Tensor, table_of) -> torch.Tensor:
    """Apply a per-channel 256-entry table computed by ``table_of(levels [N] long) -> [256]`` to ``[3, H, W]``."""
    levels = image.long()
    tables = torch.stack([table_of(channel.reshape(-1)) for channel in levels])  # [3, 256]
    return tables.gather(1, levels.reshape(3, -1)).reshape(image.shape).to(image.dtype)


def _autocontrast_table(levels: torch.Tensor) -> torch.Tensor:
    low, high = levels.min().double(), levels.max().double()
    identity = torch.arange(256, device=levels.device, dtype=torch.float64)
    scale = torch.full_like(high, 255.0) / (high - low).clamp(min=1)  # a true division (``255 / t`` multiplies by 1/t)
    stretched = (identity * scale - low * scale).clamp(0, 255).floor()
    return torch.where(high > low, stretched, identity)


def _equalize_table(levels: torch.Tensor) -> torch.Tensor:
    hist = torch.bincount(levels, minlength=256)
    nonzero = hist[hist != 0]
    step = nonzero[:-1].sum() // 255
    shifted = torch.cat([(step // 2).reshape(1), hist[:-1]])
    table = (shifted.cumsum(0) // step.clamp(min=1)).clamp(0, 255)
    identity = torch.arange(256, device=levels.device)
    return torch.where(step > 0, table, identity).double()


def _sharpness(image: torch.Tensor, factor: float) -> torch.Tensor:
    if factor == 1.0:
        return image
    kernel = torch.ones(3, 3, device=image.device)
    kernel[1, 1] = 5
    kernel = (kernel / 13).expand(3, 1, 3, 3)
    smooth = (F.conv2d(image[None], kernel, groups=3)[0] + 0.5).floor().clamp(0, 255)
    out = image.clone()
    out[:, 1:-1, 1:-1] = smooth + factor * (image[:, 1:-1, 1:-1] - smooth)
    return out.clamp(0, 255).floor()


def _warp(image: torch.Tensor, name: str, value: float) -> torch.Tensor:
    """Bilinear affine warp with the border filled by ``FILL`` (neighbours outside count as ``FILL``)."""
    height, width = image.shape[-2:]
    inverse = torch.tensor(randaugment.inverse_affine(randaugment.affine_matrix(name, value, height, width)),
                           dtype=torch.float64, device=image.device)
    ys, xs = torch.meshgrid(torch.arange(height, device=image.device, dtype=torch.float64),
                            torch.arange(width, device=image.device, dtype=torch.float64), indexing="ij")
    source_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    source_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    # align_corners=True: -1 and 1 are the centres of the first and last pixels, i.e. pixel-index coordinates.
    grid = torch.stack([2 * source_x / max(width - 1, 1) - 1, 2 * source_y / max(height - 1, 1) - 1], -1)
    shifted = (image - FILL)[None]  # zeros padding of (image - fill) == a constant ``fill`` border
    sampled = F.grid_sample(shifted, grid[None].to(image.dtype), mode="bilinear", padding_mode="zeros",
                            align_corners=True)[0]
    return (sampled + FILL + 0.5).floor().clamp(0, 255)


def apply_tensor(image: torch.Tensor, ops: tuple[Op, ...]) -> torch.Tensor:
    """:func:`blip_fast.data.randaugment.apply_numpy` on a float ``[3, H, W]`` of uint8 levels, on its device."""
    for name, value in ops:
        if name == "AutoContrast":
            image = _channel_tables(image, _autocontrast_table)
        elif name == "Equalize":
            image = _channel_tables(image, _equalize_table)
        elif name == "Brightness":
            table = (torch.arange(256, dtype=torch.float32, device=image.device) * value).clamp(0, 255).floor()
            image = table[image.long()]
        elif name == "Sharpness":
            image = _sharpness(image, value)
        elif name in AFFINE_OPS:
            image = _warp(image, name, value)
    return image


# ---------------------------------------------------------------------------------------------------- batch
@dataclass(frozen=True)
class TensorTrainTransform:
    """The GPU half of the training transform: decoded uint8 images + their :class:`AugmentParams` -> normalised
    ``[B, 3, H, W]`` pixels, equal (within the bounds in the module docstring) to the PIL path's."""

    image_size: tuple[int, int]
    lut: np.ndarray  # [3, 256] float32: the PIL path's uint8 -> normalised value table

    @cached_property
    def _lut(self) -> torch.Tensor:
        return torch.from_numpy(self.lut)

    def __call__(self, images: list[torch.Tensor], params: list[AugmentParams],
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out = []
        for image, sample in zip(images, params, strict=True):
            pixels = crop_resize(image, sample.crop, self.image_size)
            if sample.flip:
                pixels = pixels.flip(-1)
            out.append(apply_tensor(pixels, sample.ops))
        levels = torch.stack(out).long()  # [B, 3, H, W]
        lut = self._lut.to(levels.device)
        normalised = torch.stack([lut[channel][levels[:, channel]] for channel in range(3)], dim=1)
        return normalised.to(dtype)

    def encoded_batch(self, images: list[EncodedImage], device: torch.device | str,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Decode (:func:`decode_images`) and transform a collated batch of :class:`EncodedImage`."""
        decoded = decode_images(images, torch.device(device))
        return self(decoded, [item.params for item in images], dtype)

