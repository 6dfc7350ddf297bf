"""CapFilt's image input: DataLoader workers read each image and either decode and preprocess it themselves (PIL, the
CPU path) or, for JPEGs headed for a GPU, ship the encoded bytes, which the main process decodes as one batch on
the device (nvJPEG through ``torchvision.io.decode_jpeg(device="cuda")``) and resizes and normalises there.

Why: decoding a web JPEG and resizing it to 384 px with PIL costs milliseconds of CPU per image, so at the
thousands of images per second one GPU captions, the PIL path needs far more worker cores than a GPU machine has
per device. The device path is the training input's (:mod:`blip_fast.data.tensor_transforms`: the same batched
decode and antialiased bicubic resize), with the whole image as the crop box and the processor's own uint8 lookup
table, so it is one code path for both.

``--image-decode``: ``workers`` is the PIL path for every image. ``device`` has the workers read bytes and decode in
the main process on the models' device: nvJPEG on CUDA when torchvision imports, PIL elsewhere (the CPU tests and
benchmarks run it that way). ``auto`` (the default) is ``device`` on CUDA with torchvision, else ``workers``.
Either way, what nvJPEG does not take (PNG, WebP, CMYK JPEGs...) is decoded and preprocessed in the worker as on
the PIL path; and the worker still validates each JPEG by a 1/8-scale decode (its DCT scaling, a few percent of a
full decode), so corrupt, truncated and oversized files are reported by the worker as ``unreadable_image`` with the
PIL path's wording, and a file the device decode still rejects is reported the same way: the error accounting is
the same on both paths.

Pixels: the device path differs from the PIL path (transformers' ``BlipImageProcessor``) by the resize arithmetic
alone (both resize in two passes rounded to uint8 levels, PIL in fixed point): at most 4 levels (of 255) and under
0.2 on average (0.02 typical, over 120 random size pairs); on the GPU nvJPEG's IDCT against libjpeg's adds a little
(``tests/test_capfilt_images.py`` states the bounds). Like the device or the dtype, the choice can move scores in their last digits: it is a runtime option,
resolved the same way on a resume on the same machine.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from blip_fast.capfilt_io import CapFiltError, Item
from blip_fast.data.datasets import read_member
from blip_fast.data.tensor_transforms import AugmentParams, EncodedImage, decode_images, nvjpeg_available
from blip_fast.data.transforms import (
    BlipImageProcessor,
    ImageLoadError,
    load_image,
    load_image_bytes,
    read_image_file,
    read_image_header,
)

logger = logging.getLogger("blip_fast")

IMAGE_DECODE_CHOICES = ("auto", "workers", "device")


def decodes_on_device(choice: str, device: torch.device | str, processors: dict[str, BlipImageProcessor]) -> bool:
    """Whether batches are decoded on the models' device (see the module docstring for ``choice``). ``device`` is
    refused for processor settings the tensor path does not reproduce (no resize, another filter, no RGB)."""
    if choice not in IMAGE_DECODE_CHOICES:
        raise CapFiltError(f"image_decode must be one of {', '.join(IMAGE_DECODE_CHOICES)}, got {choice!r}")
    supported = all(processor.runs_on_device for processor in processors.values())
    if choice == "device" and not supported:
        raise CapFiltError("--image-decode device: the image processor's settings (bicubic resize of the RGB image "
                           "needed) run on the PIL path only; use --image-decode workers")
    on_cuda = torch.device(device).type == "cuda"
    if choice == "device" and on_cuda and not nvjpeg_available():
        logger.warning("--image-decode device without torchvision: JPEGs are decoded with PIL in the main process")
    return choice == "device" or (choice == "auto" and supported and on_cuda and nvjpeg_available())


class ImageStream(torch.utils.data.Dataset):
    """Items -> ``{"pixels": {processor name: FloatTensor [3, H, W]} | None, "encoded": EncodedImage | None,
    "data": bytes | None, "error": str | None}``.

    Runs in DataLoader workers. On the PIL path (and, with ``device_decode``, for images nvJPEG does not take) the
    worker decodes and preprocesses: ``pixels``. With ``device_decode`` a JPEG comes back encoded, its whole frame as
    the crop box: ``encoded``. ``keep_bytes`` returns the file's bytes too (shard output copies them unchanged)."""

    def __init__(self, items: Sequence[Item], processors: dict[str, BlipImageProcessor], keep_bytes: bool,
                 device_decode: bool = False) -> None:
        self.items, self.processors = items, processors
        self.keep_bytes, self.device_decode = keep_bytes, device_decode

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        encoded = None
        try:
            data = self._read(item)
            if self.device_decode:
                name = item.key if data is not None else item.path
                data = read_image_file(item.path) if data is None else data
                width, height, decodable = read_image_header(data, name)
                if decodable:
                    encoded = EncodedImage(torch.frombuffer(bytearray(data), dtype=torch.uint8), True,
                                           AugmentParams((0, 0, height, width), False))
            if encoded is None:
                image = load_image(item.path) if data is None else load_image_bytes(data, item.key)
                pixels = {name: processor([image]).pixel_values[0] for name, processor in self.processors.items()}
        except (ImageLoadError, OSError, ValueError) as error:  # unreadable, or a mode PIL cannot convert
            return {"pixels": None, "encoded": None, "data": None, "error": str(error)}
        return {"pixels": None if encoded is not None else pixels, "encoded": encoded,
                "data": data if self.keep_bytes else None, "error": None}

    def _read(self, item: Item) -> bytes | None:
        """A shard member's bytes; None for a json item's file (``load_image`` opens it itself)."""
        if item.offset < 0:
            return None
        with open(item.path, "rb") as handle:
            data = read_member(handle, item.offset, item.size)
        if len(data) != item.size:
            raise ImageLoadError(f"cannot load image {item.key!r}: shard ends inside it (changed on disk?)")
        return data


class BatchPixels:
    """A loaded batch (:class:`ImageStream` entries) -> each processor's ``[B_ok, 3, H, W]`` float32 pixels on
    ``device`` for the readable images, in batch order, and every entry's error (None when readable).

    Encoded entries are decoded together on ``device`` (one batched nvJPEG call on CUDA) and resized and normalised
    there; pixels the workers made are moved as they are."""

    def __init__(self, processors: dict[str, BlipImageProcessor], device: torch.device | str) -> None:
        self.device, self.names = torch.device(device), list(processors)
        self.transforms = {name: processor.tensor_transform() for name, processor in processors.items()
                           if processor.runs_on_device}

    def __call__(self, loaded: Sequence[dict[str, Any]], names: Sequence[str]) -> tuple[dict[str, torch.Tensor],
                                                                                          list[str | None]]:
        errors = [entry["error"] for entry in loaded]
        encoded = [index for index, entry in enumerate(loaded) if entry["encoded"] is not None]
        decoded = self._decode([loaded[index]["encoded"] for index in encoded], [names[i] for i in encoded])
        on_device = {}  # batch index -> (decoded image, its parameters)
        for index, image in zip(encoded, decoded):
            if isinstance(image, ImageLoadError):
                errors[index] = str(image)
            else:
                on_device[index] = (image, loaded[index]["encoded"].params)
        good = [index for index, error in enumerate(errors) if error is None]
        if not good:
            return {}, errors
        pixels = {}
        for name in self.names:
            pixels[name] = self._stack(name, [loaded[index] for index in good],
                                       [on_device.get(index) for index in good])
        return pixels, errors

    def _stack(self, name: str, entries: list[dict[str, Any]], decoded: list[tuple | None]) -> torch.Tensor:
        from_workers = [entry["pixels"][name] for entry, image in zip(entries, decoded) if image is None]
        rows = [image for image in decoded if image is not None]
        if not rows:
            return torch.stack(from_workers).to(self.device, non_blocking=True)
        resized = self.transforms[name]([image for image, _ in rows], [params for _, params in rows])
        if not from_workers:
            return resized
        # Rows placed by index lists known on the host (a boolean mask would sync with the device to count them).
        on_device = [row for row, image in enumerate(decoded) if image is not None]
        in_workers = [row for row, image in enumerate(decoded) if image is None]
        out = resized.new_empty(len(entries), *resized.shape[1:])
        out.index_copy_(0, torch.tensor(on_device, device=out.device), resized)
        out.index_copy_(0, torch.tensor(in_workers, device=out.device),
                        torch.stack(from_workers).to(out.device, non_blocking=True))
        return out

    def _decode(self, images: list[EncodedImage], names: list[str]) -> list[torch.Tensor | ImageLoadError]:
        """uint8 ``[3, H, W]`` per image on the device, or the error of an image that neither nvJPEG nor PIL decodes
        (the workers' 1/8-scale check lets few through): found by decoding the batch's images one by one."""
        if not images:
            return []
        try:
            return decode_images(images, self.device)
        except Exception:  # noqa: BLE001 - PIL's decoders raise many types; the image is reported below
            results: list[torch.Tensor | ImageLoadError] = []
            for image, name in zip(images, names):
                try:
                    results.append(decode_images([image], self.device)[0])
                except Exception as error:  # noqa: BLE001
                    results.append(ImageLoadError(f"cannot load image {name!r}: corrupt or truncated data "
                                                  f"({type(error).__name__}: {error})"))
            return results
