"""Input throughput: the PIL path (decode + augment in DataLoader workers, float32 to the device) against the
GPU path (workers read the encoded file and draw the augmentation; decode (nvJPEG) + augment on the device), for
training (``--task train``) or CapFilt's resize without augmentation (``--task capfilt``).

Samples/s per path and worker count at the median batch time (the batch times' 20/80 quantiles beside it), from the
DataLoader to normalised pixels on the device (synchronised per batch), with BLIP's pre-training augmentation
(RandomResizedCrop 0.2-1, flip, RandomAugment(2, 5)), and the bytes each sample ships to the device. Without CUDA the GPU path's ops run on CPU tensors (PIL decodes): that row measures the
worker-side cost, not a GPU.

    python -m benchmarks.bench_input --device cuda --workers 2,4,8 --batch 96 --out results/h100
    python -m benchmarks.bench_input --device cpu --workers 0,1,2 --images 64            # CPU
    python -m benchmarks.bench_input --task capfilt --image-size 384 --device cuda --workers 2,4 --batch 256
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import PIL.Image
import torch

from benchmarks import harness
from blip_fast.data import BlipJsonDataset, BlipTrainTransform

COLUMNS = ["task", "path", "device", "workers", "batch", "samples_per_s", "median_ms", "p20_ms", "p80_ms", "first_call_ms",
           "bytes_per_sample", "batches", "error"]


def write_photos(folder: Path, count: int, width: int, height: int) -> Path:
    """``count`` photo-like JPEGs (smooth colour fields, quality 90) and a BLIP json naming them."""
    generator = np.random.default_rng(0)
    records = []
    for index in range(count):
        coarse = (generator.random((height // 24 + 2, width // 24 + 2, 3)) * 255).astype(np.uint8)
        image = PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        (folder / f"{index:05d}.jpg").write_bytes(buffer.getvalue())
        records.append({"image": f"{index:05d}.jpg", "caption": f"a photo number {index}"})
    annotations = folder / "annotations.json"
    annotations.write_text(json.dumps(records))
    return annotations


def _images_only(records: list[dict[str, Any]]) -> list[Any]:
    return [record["image"] for record in records if record is not None]


def measure(dataset: BlipJsonDataset, gpu_path: bool, workers: int, batch: int, batches: int,
            device: torch.device) -> dict[str, Any]:
    dataset.encoded_images = gpu_path
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                         collate_fn=_images_only, drop_last=True, persistent_workers=workers > 0,
                                         pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0))
    pixels_on_device = dataset.transform.tensor_transform()

    def to_device(images: list[Any]) -> tuple[torch.Tensor, int]:
        if gpu_path:
            shipped = sum(item.data.numel() for item in images)
            return pixels_on_device.encoded_batch(images, device, torch.bfloat16), shipped
        stacked = torch.stack(images)
        return stacked.to(device, non_blocking=True).to(torch.bfloat16), stacked.numel() * stacked.element_size()

    return _time_batches(loader, to_device, batch, batches, device)


def measure_capfilt(folder: Path, gpu_path: bool, workers: int, batch: int, batches: int, image_size: int,
                    device: torch.device) -> dict[str, Any]:
    """CapFilt's input (:mod:`blip_fast.capfilt_images`): workers decode + resize with PIL, or read bytes for a
    batched decode + resize on the device; one processor at ``image_size`` (captioner and filter sharing it)."""
    from blip_fast.capfilt_images import BatchPixels, ImageStream
    from blip_fast.capfilt_io import Item
    from blip_fast.data.transforms import BlipImageProcessor

    records = json.loads((folder / "annotations.json").read_text())
    items = [Item(record["image"], str(folder / record["image"]), (record["caption"],)) for record in records]
    processors = {"captioner": BlipImageProcessor(size=image_size)}
    stream = ImageStream(items, processors, keep_bytes=False, device_decode=gpu_path)
    loader = torch.utils.data.DataLoader(stream, batch_size=batch, shuffle=True, num_workers=workers,
                                         collate_fn=_as_list, drop_last=True, persistent_workers=workers > 0,
                                         pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0))
    to_pixels = BatchPixels(processors, device)

    def to_device(loaded: list[dict[str, Any]]) -> tuple[torch.Tensor, int]:
        shipped = sum(entry["encoded"].data.numel() if entry["encoded"] is not None else
                      sum(pixels.numel() * pixels.element_size() for pixels in entry["pixels"].values())
                      for entry in loaded)
        pixels, errors = to_pixels(loaded, [str(index) for index in range(len(loaded))])
        if any(errors):
            raise RuntimeError(f"unreadable benchmark images: {[error for error in errors if error]}")
        return pixels["captioner"].to(torch.bfloat16), shipped

    return _time_batches(loader, to_device, batch, batches, device)


def _as_list(entries: list[Any]) -> list[Any]:
    return entries


def _time_batches(loader: torch.utils.data.DataLoader, to_device, batch: int, batches: int,
                  device: torch.device) -> dict[str, Any]:
    """Per batch: the DataLoader's next batch to normalised pixels on the device (synchronised)."""
    iterator, shipped, batch_ms = iter(loader), 0, []
    start = time.perf_counter()
    to_device(next(iterator))  # start-up: workers, first decode
    harness.synchronize(device)
    first_batch_ms = (time.perf_counter() - start) * 1e3
    while len(batch_ms) < batches:
        begin = time.perf_counter()
        try:
            images = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            continue
        _, size = to_device(images)
        harness.synchronize(device)
        batch_ms.append((time.perf_counter() - begin) * 1e3)
        shipped += size
    timing = harness.timing_of(batch_ms, first_batch_ms)
    # Samples/s at the median batch time; the 20/80 quantiles of the batch times give its spread.
    return {"samples_per_s": batch / (timing.median_ms / 1e3), "median_ms": timing.median_ms,
            "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms, "first_call_ms": timing.first_call_ms,
            "bytes_per_sample": shipped / (len(batch_ms) * batch), "batches": len(batch_ms)}


def run(args: argparse.Namespace, report: harness.Report) -> int:
    device = torch.device(args.device or harness.default_device())
    failures = 0
    with tempfile.TemporaryDirectory() as folder:
        annotations = write_photos(Path(folder), args.images, args.width, args.height)
        transform = BlipTrainTransform(image_size=args.image_size, scale=(0.2, 1.0), random_augment=True)
        dataset = BlipJsonDataset(annotations, folder, transform, seed=0, on_error="replace")
        for path in args.paths.split(","):
            for workers in (int(count) for count in args.workers.split(",")):
                row: dict[str, Any] = {"bench": "input", "task": args.task, "path": path, "workers": workers,
                                       "batch": args.batch, "image_size": args.image_size,
                                       **harness.environment(device)}
                try:
                    if args.task == "capfilt":
                        row.update(measure_capfilt(Path(folder), path == "gpu", workers, args.batch, args.batches,
                                                   args.image_size, device))
                    else:
                        row.update(measure(dataset, path == "gpu", workers, args.batch, args.batches, device))
                except Exception as error:  # report, do not hide the row
                    row["error"] = f"{type(error).__name__}: {error}"
                    failures += 1
                report.add(row)
    return failures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["train", "capfilt"], default="train",
                        help="train: BLIP's augmentation; capfilt: CapFilt's resize to --image-size (no augmentation)")
    parser.add_argument("--paths", default="pil,gpu", help="comma-separated subset of pil,gpu")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per row (after one untimed)")
    parser.add_argument("--images", type=int, default=128, help="distinct JPEGs written to a temporary folder")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default=None)
    parser.add_argument("--name", default="input")
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = harness.Report(args.out, args.name, COLUMNS, lambda first: (
        f"{args.name}: {args.task} input, {args.width}x{args.height} JPEGs -> {args.image_size} px"
        + (", BLIP augmentation" if args.task == "train" else ", CapFilt's resize")))
    failures = run(args, report)
    print(report.text())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
