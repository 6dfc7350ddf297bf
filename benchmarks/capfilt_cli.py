"""The real ``blip-fast capfilt`` command on a few small shards: the GPU check's end-to-end run of CapFilt.

The benchmark (``bench_capfilt``) times the models on tensors; this runs what users run: the CLI in its own process,
reading img2dataset-layout ``.tar`` shards (read with ``tarfile``: webdataset is not needed) through DataLoader
workers with pinned memory, captioning with CUDA graphs captured lazily while those workers run, filtering,
writing output shards and merging. It checks each run's output (every image scored, no errors, output shards holding
only kept captions) and reports one row. The first run is timed apart (it fills the Triton and compile caches, as a
user's first run does); ``--repeats`` more runs, each a fresh process into a fresh folder, give the median wall time
with its 20/80 quantiles and the median images/s as the command's summary counts it. ``same_kept`` says whether
every run (the command is seeded) kept the same captions.

    python3 -m benchmarks.capfilt_cli --config tiny --repeats 0 --out OUT    # gpu_check.sh: the path, tiny models
    python3 -m benchmarks.capfilt_cli --config base --out OUT        # base-size random models, 384 px
    python3 -m benchmarks.capfilt_cli --config tiny --device cpu     # CPU smoke run (gpu_check.sh's DRY mode)
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_capfilt, harness
from blip_fast import errors

COLUMNS = ["case", "images", "shards", "workers", "first_wall_s", "wall_s", "wall_p20_s", "wall_p80_s", "repeats",
           "img_per_s", "web_kept", "synthetic_kept", "same_kept", "errors", "output_shards", "error"]


def write_shards(out_dir: Path, shards: int, per_shard: int, image_size: int) -> int:
    """``shards`` tars of ``per_shard`` synthetic PNG + caption pairs (img2dataset's ``key.png``/``key.txt``)."""
    from blip_fast.data.synthetic import SyntheticNoisyDataset

    dataset = SyntheticNoisyDataset(shards * per_shard, noise_fraction=0.3, seed=0, image_size=image_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        with tarfile.open(out_dir / f"{shard:05d}.tar", "w") as tar:
            for index in range(shard * per_shard, (shard + 1) * per_shard):
                png = io.BytesIO()
                dataset.image(index).save(png, format="PNG")
                caption = dataset.record(index)["caption"].encode()
                for suffix, payload in (("png", png.getvalue()), ("txt", caption)):
                    info = tarfile.TarInfo(f"{index:06d}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return shards * per_shard


def check_output(output: Path, images: int) -> dict[str, Any]:
    """The command's merged summary, after checking that every image was scored and the output shards exist."""
    summary = json.loads((output / "summary.json").read_text())
    scored = [json.loads(line) for line in (output / "scored.jsonl").read_text().splitlines()]
    problems = []
    if summary["images"] != images:
        problems.append(f"summary counts {summary['images']} images, {images} went in")
    if len({record["key"] for record in scored}) != images:
        problems.append(f"scored.jsonl covers {len({record['key'] for record in scored})} of {images} images")
    if summary["errors"]:
        problems.append(f"{summary['errors']} records in errors.jsonl: {summary['errors_by_reason']}")
    kept = sum(record["kept"] for record in scored)
    if kept != summary["web_kept"] + summary["synthetic_kept"]:
        problems.append(f"scored.jsonl keeps {kept} captions, the summary {summary['web_kept']} + "
                        f"{summary['synthetic_kept']}")
    if problems:
        raise AssertionError("; ".join(problems))
    return summary


def kept_decisions(output: Path) -> list[tuple[str, str, bool]]:
    """Every scored caption's (key, source, kept), sorted: what two runs of the seeded command must agree on."""
    records = (json.loads(line) for line in (output / "scored.jsonl").read_text().splitlines())
    return sorted((record["key"], record["source"], record["kept"]) for record in records)


def run_command(command: list[str], output: Path, images: int) -> tuple[float, dict[str, Any]]:
    """One run of the CLI into ``output``: its wall time in seconds and its checked summary."""
    print("running:", " ".join(command), flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, text=True, capture_output=True)
    wall_s = time.perf_counter() - start
    print(result.stdout[-4000:], result.stderr[-8000:], sep="\n", flush=True)
    if result.returncode != 0:
        raise RuntimeError(f"blip-fast capfilt exited {result.returncode}: {result.stderr.strip()[-500:]}")
    return wall_s, check_output(output, images)


def run(args: argparse.Namespace, report: harness.Report) -> int:
    device = args.device or harness.default_device()
    row: dict[str, Any] = {"bench": "capfilt_cli", "case": f"{args.config}-{args.shards}x{args.per_shard}",
                           "shards": args.shards, "workers": args.workers, "repeats": args.repeats,
                           **harness.environment(device)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        captioner, filter_dir = bench_capfilt.save_models(args.config, root / "models", args.image_size)
        row["images"] = write_shards(root / "shards", args.shards, args.per_shard, args.source_size)
        walls, summaries, decisions = [], [], []
        try:
            for attempt in range(1 + args.repeats):
                output = root / f"out-{attempt}"
                command = [sys.executable, "-m", "blip_fast.cli", "capfilt", "--captioner", str(captioner),
                           "--filter", str(filter_dir), "--input", str(root / "shards"), "--output", str(output),
                           "--workers", str(args.workers), "--batch-size", str(args.batch_size), "--device", device,
                           "--no-progress"]
                wall_s, summary = run_command(command, output, row["images"])
                walls.append(wall_s)
                summaries.append(summary)
                decisions.append(kept_decisions(output))
        except Exception as error:
            row["error"] = f"{type(error).__name__}: {error}"
            report.add(row)
            return 1
        first, timed = summaries[0], summaries[1:] or summaries[:1]
        row.update(first_wall_s=walls[0], web_kept=first["web_kept"], synthetic_kept=first["synthetic_kept"],
                   errors=first["errors"], output_shards=len(list((root / "out-0").glob("*.tar"))),
                   same_kept=all(decision == decisions[0] for decision in decisions),
                   img_per_s=statistics.median(summary["images_per_s"] for summary in timed))
        if args.repeats:
            timing = harness.timing_of([1e3 * wall for wall in walls[1:]], 1e3 * walls[0])
            row.update(wall_s=timing.median_ms / 1e3, wall_p20_s=timing.p20_ms / 1e3, wall_p80_s=timing.p80_ms / 1e3)
    report.add(row)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="base", choices=["base", "large", "tiny"])
    parser.add_argument("--image-size", type=int, default=None, help="model input size (default: the preset's)")
    parser.add_argument("--source-size", type=int, default=256, help="side of the synthetic PNGs in the shards")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--repeats", type=errors.non_negative_int, default=3,
                        help="timed runs after the first (0: the first run alone, img/s its own)")
    parser.add_argument("--name", default="capfilt_cli")
    parser.add_argument("--out", default=None, help="folder for <name>.jsonl (appended) and <name>.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = harness.Report(args.out, args.name, COLUMNS, "blip-fast capfilt (the CLI, end to end) on tar shards")
    failures = run(args, report)
    print(report.text())
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
