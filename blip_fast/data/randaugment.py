"""BLIP's ``RandomAugment(2, 5)``: two random ops per image after the crop and flip, each applied with probability 0.5.

The original (``transform/randaugment.py``, from ALBEF) works on uint8 ``[H, W, 3]`` arrays with OpenCV; pre-training
and the fine-tuning tasks use ops ``Identity, AutoContrast, Brightness, Sharpness, Equalize, ShearX, ShearY,
TranslateX, TranslateY, Rotate`` at magnitude 5 of 10: shear 0.15, translation 5 px, rotation 15 degrees (sign drawn
per use), affine fill 128; Brightness and Sharpness get factor ``5 / 10 * 1.8 + 0.1 = 1.0``, i.e. change nothing.

Here the draws come from the sample's own ``rng`` (:func:`blip_fast.data.sample_rng`), in the original's order (the
op names, then per op its coin and its sign), so an image's augmentation is a pure function of (seed, epoch, index)
and resume stays exact; the original drew from numpy's global stream. :meth:`RandomAugment.draw` returns the ops to
apply; :func:`apply_numpy` is the CPU reference (numpy, no OpenCV) and ``blip_fast.data.tensor_transforms`` the
torch version for GPU batches, tested against it.

One deliberate deviation: the original's AutoContrast computes ``-low`` on a uint8 scalar, which wraps, so every
channel whose minimum is above 0 becomes white (255). This implements what its docstring states, PIL's
``ImageOps.autocontrast`` (stretch each channel's [min, max] to [0, 255]).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

#: BLIP's op list for pre-training and fine-tuning (``isPIL=True, augs=[...]`` in its configs).
BLIP_AUGMENTS = ("Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize", "ShearX", "ShearY", "TranslateX",
                 "TranslateY", "Rotate")
AFFINE_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
MAX_LEVEL, TRANSLATE_CONST, FILL = 10, 10, 128

#: One drawn op: its name and argument (enhance factor, shear factor, offset in pixels, degrees; 0 when none).
Op = tuple[str, float]


@dataclass(frozen=True)
class RandomAugment:
    """``num_ops`` ops drawn with replacement from ``augs``, each kept with probability 0.5, at ``magnitude``."""

    num_ops: int = 2
    magnitude: int = 5
    augs: tuple[str, ...] = BLIP_AUGMENTS

    def __post_init__(self) -> None:
        unknown = sorted(set(self.augs) - set(BLIP_AUGMENTS))
        if unknown:
            raise ValueError(f"unsupported RandomAugment ops {unknown}; choose from {list(BLIP_AUGMENTS)}")

    def draw(self, rng: random.Random) -> tuple[Op, ...]:
        """The ops to apply, in order, drawn from ``rng`` like the original draws from numpy."""
        names = [self.augs[int(rng.random() * len(self.augs))] for _ in range(self.num_ops)]
        level = self.magnitude / MAX_LEVEL
        ops = []
        for name in names:
            if rng.random() > 0.5:
                continue
            if name in ("Brightness", "Sharpness"):
                ops.append((name, level * 1.8 + 0.1))
            elif name in ("ShearX", "ShearY", "TranslateX", "TranslateY"):
                value = level * (0.3 if name.startswith("Shear") else float(TRANSLATE_CONST))
                ops.append((name, -value if rng.random() > 0.5 else value))
            elif name == "Rotate":
                ops.append((name, -level * 30 if rng.random() < 0.5 else level * 30))
            else:
                ops.append((name, 0.0))
        return tuple(ops)


def affine_matrix(name: str, value: float, height: int, width: int) -> np.ndarray:
    """The original's forward ``[2, 3]`` map (OpenCV convention: output = M @ (x, y, 1), pixel-index coordinates)."""
    if name == "ShearX":
        return np.array([[1.0, value, 0.0], [0.0, 1.0, 0.0]])
    if name == "ShearY":
        return np.array([[1.0, 0.0, 0.0], [value, 1.0, 0.0]])
    if name == "TranslateX":
        return np.array([[1.0, 0.0, -value], [0.0, 1.0, 0.0]])
    if name == "TranslateY":
        return np.array([[1.0, 0.0, 0.0], [0.0, 1.0, -value]])
    # cv2.getRotationMatrix2D((W / 2, H / 2), degrees, 1): counter-clockwise on screen.
    alpha, beta = math.cos(math.radians(value)), math.sin(math.radians(value))
    cx, cy = width / 2, height / 2
    return np.array([[alpha, beta, (1 - alpha) * cx - beta * cy], [-beta, alpha, beta * cx + (1 - alpha) * cy]])


def inverse_affine(matrix: np.ndarray) -> np.ndarray:
    """Output pixel -> source position: the inverse of a forward ``[2, 3]`` map (what warpAffine samples with)."""
    full = np.vstack([matrix, [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


# ---------------------------------------------------------------------------------------------------- reference
def _per_channel_table(image: np.ndarray, table_of) -> np.ndarray:
    return np.stack([table_of(image[..., channel])[image[..., channel]] for channel in range(image.shape[-1])], -1)


def autocontrast_table(channel: np.ndarray) -> np.ndarray:
    low, high = int(channel.min()), int(channel.max())
    if high <= low:
        return np.arange(256, dtype=np.uint8)
    scale = 255.0 / (high - low)
    return (np.arange(256) * scale - low * scale).clip(0, 255).astype(np.uint8)


def equalize_table(channel: np.ndarray) -> np.ndarray:
    """PIL's ``ImageOps.equalize`` table, as the original computes it."""
    hist = np.bincount(channel.reshape(-1), minlength=256)
    step = int(hist[hist != 0][:-1].sum()) // 255
    if step == 0:
        return np.arange(256, dtype=np.uint8)
    shifted = np.concatenate([[step // 2], hist[:-1]])
    return (np.cumsum(shifted) // step).clip(0, 255).astype(np.uint8)


def brightness(image: np.ndarray, factor: float) -> np.ndarray:
    table = (np.arange(256, dtype=np.float32) * np.float32(factor)).clip(0, 255).astype(np.uint8)
    return table[image]


def sharpness(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend towards a 3x3 smoothing ([[1,1,1],[1,5,1],[1,1,1]] / 13) in the interior; borders keep the image."""
    if factor == 1.0:
        return image
    pixels = image.astype(np.float32)
    kernel = np.ones((3, 3), np.float32)
    kernel[1, 1] = 5
    kernel /= 13
    height, width = image.shape[:2]
    smooth = sum(kernel[dy, dx] * pixels[dy:height - 2 + dy, dx:width - 2 + dx] for dy in range(3) for dx in range(3))
    smooth = np.floor(smooth + 0.5).clip(0, 255)  # filter2D's uint8 result
    out = pixels.copy()
    out[1:-1, 1:-1] = smooth + np.float32(factor) * (pixels[1:-1, 1:-1] - smooth)
    return out.clip(0, 255).astype(np.uint8)


def warp_affine(image: np.ndarray, matrix: np.ndarray, fill: int = FILL) -> np.ndarray:
    """Bilinear ``warpAffine`` with a constant border: output pixel (x, y) samples the source at the inverse map of
    (x, y); neighbours outside the image count as ``fill``. Rounded to the nearest level."""
    height, width = image.shape[:2]
    inverse = inverse_affine(matrix)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    source_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    source_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    x0, y0 = np.floor(source_x).astype(np.int64), np.floor(source_y).astype(np.int64)
    wx, wy = (source_x - x0)[..., None], (source_y - y0)[..., None]
    padded = np.pad(image.astype(np.float64), ((1, 1), (1, 1), (0, 0)), constant_values=fill)

    def at(y, x):  # a neighbour, ``fill`` outside the image
        return padded[np.clip(y + 1, 0, height + 1), np.clip(x + 1, 0, width + 1)]

    top = at(y0, x0) * (1 - wx) + at(y0, x0 + 1) * wx
    bottom = at(y0 + 1, x0) * (1 - wx) + at(y0 + 1, x0 + 1) * wx
    return np.floor(top * (1 - wy) + bottom * wy + 0.5).clip(0, 255).astype(np.uint8)


def apply_numpy(image: np.ndarray, ops: tuple[Op, ...]) -> np.ndarray:
    """Apply drawn ops to a uint8 ``[H, W, 3]`` image (the CPU reference)."""
    for name, value in ops:
        if name == "AutoContrast":
            image = _per_channel_table(image, autocontrast_table)
        elif name == "Equalize":
            image = _per_channel_table(image, equalize_table)
        elif name == "Brightness":
            image = brightness(image, value)
        elif name == "Sharpness":
            image = sharpness(image, value)
        elif name in AFFINE_OPS:
            image = warp_affine(image, affine_matrix(name, value, *image.shape[:2]))
    return image
