"""CapFilt end to end on tiny random models: counts, the kept set against per-pair ITM, captions against the
captioner's own ``generate``, kill-and-resume byte identity, and bad input."""

import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import PIL.Image
import pytest
import torch

from blip_fast.capfilt import ITM_MAX_TOKENS, CapFiltOptions, run_capfilt, unit_seed
from blip_fast.capfilt_io import CapFiltError
from blip_fast.captioning import Captioner
from blip_fast.cli import main
from blip_fast.config import BlipConfig
from blip_fast.data.synthetic import SyntheticNoisyDataset
from blip_fast.data.transforms import BlipImageProcessor, load_image_bytes
from blip_fast.modeling.blip import BlipForImageTextRetrieval
from blip_fast.modeling.vit import vision_states
from blip_fast.tokenizer import BlipTokenizer, pre_caption
from tests.tiny_models import randomize_, save_tiny_captioner

NUM_IMAGES = 10
NUM_CAPTIONS = 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The synthetic noisy set as PNGs + BLIP json, and the same samples as three webdataset shards."""
    root = tmp_path_factory.mktemp("capfilt_data")
    synthetic = SyntheticNoisyDataset(NUM_IMAGES, noise_fraction=0.3, seed=0)
    annotations = synthetic.write_images(root / "json")
    records = json.loads(annotations.read_text())
    samples = [(f"{index:06d}", (root / "json" / r["image"]).read_bytes(), r["caption"]) for index, r in
               enumerate(records)]
    for shard, start in enumerate(range(0, NUM_IMAGES, 4)):
        _write_shard(root / "shards" / f"{shard:05d}.tar",
                     [(f"{key}.png", image) for key, image, _ in samples[start : start + 4]]
                     + [(f"{key}.txt", caption.encode()) for key, _, caption in samples[start : start + 4]])
    return {"json": annotations, "image_root": root / "json", "shards": root / "shards", "records": records,
            "samples": samples}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, data):
    """A tiny random captioner (the demo's) and a tiny random filter sharing its tokenizer."""
    root = tmp_path_factory.mktemp("capfilt_models")
    captioner_dir = save_tiny_captioner(root, [record["caption"] for record in data["records"]])
    tokenizer = BlipTokenizer.from_pretrained(captioner_dir)
    torch.manual_seed(1)
    # Re-drawn weights: the default init's near-zero ITM logits would make every decision a coin toss at 1e-7.
    filter_model = randomize_(BlipForImageTextRetrieval(BlipConfig.tiny(image_size=64).for_tokenizer(tokenizer)))
    with torch.no_grad():  # shift the "matched" margins (0.7..2.8 on this data) so the filter keeps some captions
        filter_model.itm_head.bias[1] -= 1.7  # and drops others at its argmax and at threshold 0.3 alike
    filter_dir = root / "filter"
    filter_model.save_pretrained(filter_dir)
    tokenizer.save_pretrained(filter_dir)
    BlipImageProcessor(size=64).save_pretrained(filter_dir)
    return captioner_dir, filter_dir


def _write_shard(path: Path, members: list[tuple[str, bytes]], ordered: bool = False) -> None:
    """A tar of ``members``, sorted by name unless ``ordered`` (kept as given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, payload in (members if ordered else sorted(members)):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def _options(model_dirs, data, kind, output, **overrides) -> CapFiltOptions:
    captioner_dir, filter_dir = model_dirs
    source = dict(input=data["json"], image_root=data["image_root"]) if kind == "json" else dict(input=data["shards"])
    settings = dict(num_captions=NUM_CAPTIONS, batch_size=3, workers=0, images_per_part=4, progress=False)
    return CapFiltOptions(captioner=captioner_dir, filter=filter_dir, output=output, **source,
                          **{**settings, **overrides})


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _oracle_itm(filter_dir: Path, image: PIL.Image.Image, captions: list[str]) -> torch.Tensor:
    """ITM logits [n, 2] through the model's plain forward: one full (ViT + text) pass per pair."""
    model = BlipForImageTextRetrieval.from_pretrained(filter_dir)
    pixel_values = BlipImageProcessor.from_pretrained(filter_dir)([image]).pixel_values
    tokenizer = BlipTokenizer.from_pretrained(filter_dir)
    rows = []
    with torch.no_grad():
        for caption in captions:
            tokens = tokenizer([caption], max_length=ITM_MAX_TOKENS, return_tensors="pt")
            rows.append(model(tokens.input_ids, pixel_values, use_itm_head=True,
                              attention_mask=tokens.attention_mask).itm_score[0])
    return torch.stack(rows)


NUCLEUS = dict(do_sample=True, top_p=0.9, repetition_penalty=1.1)  # BLIP's CapFilt decoding


def _oracle_synthetic(captioner_dir: Path, images: list[PIL.Image.Image], seed: int, batch_size: int,
                      decoding: dict = NUCLEUS) -> list[list]:
    """Each unit's synthetic captions from the captioner's own generate: the unit's generator, batch by batch."""
    captioner = Captioner.from_pretrained(captioner_dir)
    prompt = captioner.tokenizer(["a picture of "], return_tensors="pt").input_ids
    captions = []
    for unit, start in enumerate(range(0, len(images), 4)):
        generator = torch.Generator().manual_seed(unit_seed(seed, unit))
        unit_images = images[start : start + 4]
        for first in range(0, len(unit_images), batch_size):
            batch = unit_images[first : first + batch_size]
            pixel_values = captioner.processor(batch).pixel_values
            ids = captioner.model.generate(
                pixel_values, input_ids=prompt.expand(len(batch), -1), **decoding,
                num_return_sequences=NUM_CAPTIONS, max_length=20, min_length=5, generator=generator)
            texts = [pre_caption(text) for text in captioner.tokenizer.batch_decode(ids[:, prompt.shape[1] - 1 :], skip_special_tokens=True)]
            captions += [texts[row : row + NUM_CAPTIONS] for row in range(0, len(texts), NUM_CAPTIONS)]
    return captions


def _group_by_image(scored: list[dict], key: str) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for record in scored:
        groups.setdefault(record[key], []).append(record)
    return groups


@pytest.mark.parametrize(
    "kind,batch_size,workers,threshold",
    [("json", 3, 0, None), ("json", 16, 1, 0.3), ("shards", 2, 0, None)],
)
def test_capfilt_matches_generate_and_per_pair_itm(model_dirs, data, tmp_path, kind, batch_size, workers, threshold):
    options = _options(model_dirs, data, kind, tmp_path / "out", batch_size=batch_size, workers=workers,
                       threshold=threshold, seed=7)
    summary = run_capfilt(options)
    scored = _read_jsonl(tmp_path / "out" / "scored.jsonl")
    assert summary["merged"] and summary["images"] == NUM_IMAGES and summary["units"] == 3
    assert summary["errors"] == 0 and (tmp_path / "out" / "errors.jsonl").read_text() == ""

    images = [load_image_bytes(image, key) for key, image, _ in data["samples"]]
    groups = _group_by_image(scored, "image" if kind == "json" else "key")
    assert len(groups) == NUM_IMAGES
    synthetic = _oracle_synthetic(model_dirs[0], images, seed=7, batch_size=batch_size)
    decisions = []
    for (name, records), image, (_, _, web), expected in zip(groups.items(), images, data["samples"], synthetic):
        assert [r["caption"] for r in records if r["source"] == "web"] == [pre_caption(web)]
        assert [r["caption"] for r in records if r["source"] == "synthetic"] == [text for text in expected if text]
        logits = _oracle_itm(model_dirs[1], image, [r["caption"] for r in records])
        p_match = logits.softmax(-1)[:, 1]
        assert [r["itm_score"] for r in records] == pytest.approx(p_match.tolist(), abs=2e-6)
        expected_keep = logits.argmax(-1) == 1 if threshold is None else p_match > threshold
        decided = (logits[:, 1] - logits[:, 0]).abs() > 1e-4 if threshold is None else (p_match - threshold).abs() > 1e-5
        for record, keep, clear in zip(records, expected_keep.tolist(), decided.tolist()):
            assert record["kept"] == keep or not clear, f"{name}: {record}"
            decisions.append(keep)
    assert any(decisions) and not all(decisions), "tiny models should keep some captions and drop others"

    counts = {f"{source}_{'kept' if kept else 'dropped'}": sum(r["source"] == source and r["kept"] == kept
                                                              for r in scored)
              for source in ("web", "synthetic") for kept in (True, False)}
    assert {name: summary[name] for name in counts} == counts
    assert summary["noise_ratio"] == pytest.approx(counts["web_dropped"] / NUM_IMAGES)
    kept = [{k: v for k, v in r.items() if k != "kept"} for r in scored if r["kept"]]
    if kind == "json":
        assert json.loads((tmp_path / "out" / "bootstrapped.json").read_text()) == kept
    else:
        assert _shard_records(tmp_path / "out", data) == kept


def test_capfilt_beam_search_writes_the_captioners_best_beams(model_dirs, data, tmp_path):
    """``num_beams``: each image's synthetic captions are the captioner's own beam search's best ``num_captions``."""
    run_capfilt(_options(model_dirs, data, "json", tmp_path / "out", num_beams=NUM_CAPTIONS + 1))
    scored = _read_jsonl(tmp_path / "out" / "scored.jsonl")
    images = [load_image_bytes(image, key) for key, image, _ in data["samples"]]
    expected = _oracle_synthetic(model_dirs[0], images, seed=0, batch_size=3, decoding=dict(num_beams=NUM_CAPTIONS + 1))
    groups = _group_by_image(scored, "image")
    assert [[r["caption"] for r in records if r["source"] == "synthetic"] for records in groups.values()] == [
        [text for text in texts if text] for texts in expected]
    with pytest.raises(CapFiltError, match="num_beams must be >= num_captions"):
        _options(model_dirs, data, "json", tmp_path / "other", num_beams=NUM_CAPTIONS - 1)


def _shard_records(output: Path, data) -> list[dict]:
    """The kept records as the output shards hold them; the image bytes must be the input's, unchanged."""
    originals = {key: image for key, image, _ in data["samples"]}
    records = []
    for shard in sorted(output.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {member.name: tar.extractfile(member).read() for member in tar.getmembers()}
        for name in sorted(name for name in members if name.endswith(".json")):
            metadata = json.loads(members[name])
            assert members[f"{metadata['key']}.png"] == originals[metadata["key"]]
            assert metadata["caption"] == max(metadata["captions"], key=lambda c: c["itm_score"])["caption"]
            records += [{"key": metadata["key"], "shard": shard.name, **caption} for caption in metadata["captions"]]
    return records


def _cli_args(model_dirs, data, output: Path) -> list[str]:
    captioner_dir, filter_dir = model_dirs
    return ["capfilt", "--captioner", str(captioner_dir), "--filter", str(filter_dir), "--input", str(data["shards"]),
            "--output", str(output), "--num-captions", "3", "--batch-size", "1", "--workers", "0", "--device", "cpu",
            "--dtype", "fp32", "--no-progress"]


def _output_files(output: Path) -> dict[str, bytes]:
    names = ["scored.jsonl", "errors.jsonl", *(p.name for p in output.glob("*.tar")),
             *(f"parts/{p.name}" for p in (output / "parts").iterdir())]
    return {name: (output / name).read_bytes() for name in sorted(names)}


@pytest.mark.slow
def test_kill_and_resume_gives_identical_output(model_dirs, data, tmp_path):
    """SIGKILL once the first unit is done; the rerun skips it, redoes the rest, and matches an uninterrupted run."""
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same float reductions as this process
    process = subprocess.Popen([sys.executable, "-m", "blip_fast.cli", *_cli_args(model_dirs, data, killed)],
                               env=env, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL)
    first_done = killed / "manifest" / "unit-00000.json"
    deadline = time.monotonic() + 120
    while not first_done.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert first_done.exists(), "the subprocess never finished its first unit"
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    first_part = (killed / "parts" / "unit-00000.jsonl").read_bytes()

    assert main(_cli_args(model_dirs, data, killed)) == 0
    assert main(_cli_args(model_dirs, data, tmp_path / "clean")) == 0
    assert (killed / "parts" / "unit-00000.jsonl").read_bytes() == first_part  # skipped, not redone
    assert _output_files(killed) == _output_files(tmp_path / "clean")
    assert not [p for p in killed.rglob(".*") if p.is_file()], "temporaries left behind"
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["images"] == NUM_IMAGES and summary["units"] == 3


def test_resume_with_other_options_is_refused(model_dirs, data, tmp_path):
    run_capfilt(_options(model_dirs, data, "json", tmp_path, images_per_part=100, batch_size=16))
    with pytest.raises(ValueError, match="seed"):
        run_capfilt(_options(model_dirs, data, "json", tmp_path, images_per_part=100, batch_size=16, seed=3))


def _png(width: int, height: int) -> bytes:
    """A 1-bit grey PNG of any size, all black, built by hand: a huge one costs kilobytes and milliseconds."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    rows = (b"\0" + bytes((width + 7) // 8)) * height
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 1)) + chunk(b"IEND", b"")


def _encoded(image: PIL.Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("image_decode,workers", [("workers", 1), ("device", 0)])
def test_bad_records_go_to_the_errors_file(model_dirs, data, tmp_path, image_decode, workers):
    """Each bad record is accounted for the same way whether the workers decode (PIL) or only read bytes for a
    batched decode on the device (on the CPU: PIL in the main process, the GPU path's code)."""
    good = data["samples"][0][1]
    photo = _encoded(load_image_bytes(good, "good").convert("RGB"), "JPEG")
    members = {
        "good.png": good, "good.txt": b"A good caption.",
        "photo.jpg": photo, "photo.txt": b"a jpeg photo",
        "cut.jpg": photo[: len(photo) // 2], "cut.txt": b"a truncated jpeg",
        "corrupt.jpg": b"\xff\xd8\xff\xe0 not really a jpeg", "corrupt.txt": b"corrupt",
        "truncated.png": good[: len(good) // 2], "truncated.txt": b"truncated",
        "gray.png": _encoded(PIL.Image.new("L", (50, 30), 90), "PNG"), "gray.txt": b"a gray picture",
        "cmyk.jpg": _encoded(PIL.Image.new("CMYK", (40, 30), (0, 200, 200, 0)), "JPEG"), "cmyk.txt": b"a red picture",
        "bomb.png": _png(20_000, 10_000), "bomb.txt": b"over twice PIL's pixel limit",  # 200 MP
        "big.png": _png(3_000, 2_000), "big.txt": b"large but allowed",
        "empty.png": good, "empty.txt": b"  ...  ",
        "orphan.txt": b"a caption without an image",
    }
    _write_shard(tmp_path / "in" / "00000.tar", list(members.items()))
    captioner_dir, filter_dir = model_dirs
    summary = run_capfilt(CapFiltOptions(captioner=captioner_dir, filter=filter_dir, input=tmp_path / "in",
                                         output=tmp_path / "out", num_captions=1, workers=workers, progress=False,
                                         image_decode=image_decode))
    errors = {record["key"].rsplit(":", 1)[1]: record["reason"] for record in _read_jsonl(tmp_path / "out/errors.jsonl")}
    assert errors == {"corrupt": "unreadable_image", "truncated": "unreadable_image", "bomb": "unreadable_image",
                      "cut": "unreadable_image", "empty": "empty_caption", "orphan": "missing_image"}
    scored = _group_by_image(_read_jsonl(tmp_path / "out" / "scored.jsonl"), "key")
    assert sorted(scored) == ["big", "cmyk", "empty", "good", "gray", "photo"]  # grey and CMYK converted
    assert [r["source"] for r in scored["empty"]] == ["synthetic"]  # its image is still captioned
    assert [r["caption"] for r in scored["gray"] if r["source"] == "web"] == ["a gray picture"]
    assert summary["images"] == 6 and summary["errors"] == 6


def test_ranks_split_units_and_the_last_one_merges(model_dirs, data, tmp_path):
    """Two ranks (as torchrun would start them) share the units; the output equals a one-process run's."""
    single = run_capfilt(_options(model_dirs, data, "shards", tmp_path / "single"))
    first = run_capfilt(_options(model_dirs, data, "shards", tmp_path / "ranks", rank=1, world_size=2))
    assert first == {"merged": False, "rank": 1, "units_done_here": 1, "units_of_rank": 1}
    assert sorted(p.name for p in (tmp_path / "ranks" / "manifest").iterdir()) == ["unit-00001.json"]
    merged = run_capfilt(_options(model_dirs, data, "shards", tmp_path / "ranks", rank=0, world_size=2))
    assert merged["merged"] and merged["images"] == single["images"] == NUM_IMAGES
    assert _output_files(tmp_path / "ranks") == _output_files(tmp_path / "single")


def test_text_work_runs_on_its_thread_while_the_next_batch_samples(model_dirs, data, tmp_path, monkeypatch):
    """Host text work (decoding the samples, cleaning, the filter's tokenising) runs on the text thread, and batch
    i + 1's sampling is launched before batch i's ITM pass: the device does not wait for it. The values are the
    serial order's (the tests above compare them with generate and per-pair ITM)."""
    import threading

    from blip_fast import capfilt

    events = []

    def spy(name, stage):
        def recorded(*args):
            events.append((name, threading.current_thread().name))
            return stage(*args)
        return recorded

    for name in ("_caption_batch", "_batch_texts", "_score_batch"):
        monkeypatch.setattr(capfilt, name, spy(name.strip("_"), getattr(capfilt, name)))
    summary = run_capfilt(_options(model_dirs, data, "json", tmp_path, images_per_part=100, batch_size=4))
    assert summary["images"] == NUM_IMAGES  # 10 images: batches of 4, 4, 2
    main_thread = [name for name, thread in events if thread == threading.main_thread().name]
    assert main_thread == ["caption_batch", "caption_batch", "score_batch", "caption_batch", "score_batch",
                           "score_batch"]
    texts = [thread for name, thread in events if name == "batch_texts"]
    assert len(texts) == 3 and all(thread.startswith("capfilt-text") for thread in texts)


# ------------------------------------------------------------------------------------------------ compute path
@pytest.fixture(scope="module")
def models(model_dirs):
    captioner_dir, filter_dir = model_dirs
    from blip_fast.capfilt import CapFiltModels

    options = CapFiltOptions(captioner=captioner_dir, filter=filter_dir, input="-", output="-",
                             num_captions=NUM_CAPTIONS)
    return CapFiltModels.from_options(options)


def _pixels(data, count: int) -> torch.Tensor:
    processor = BlipImageProcessor(size=64)
    return processor([load_image_bytes(image, key) for key, image, _ in data["samples"][:count]]).pixel_values


def test_filter_projects_each_images_cross_kv_once(models, data):
    """An image's captions attend to its cross-attention K/V as extra query rows: the projection sees one row per
    image (not per pair), and the logits equal scoring every pair separately. Images with fewer captions (or none)
    than the widest are padded internally and dropped from the result."""
    captions = [["a red circle", "two blue squares", "a green triangle"], [], ["a circle"], ["a", "striped blue"]]
    pixel_values = _pixels(data, len(captions))
    seen = []
    key = models.filter.text_encoder.encoder.layer[0].crossattention.self.key
    handle = key.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    try:
        actual = models.match_logits(pixel_values, captions)
    finally:
        handle.remove()
    assert seen == [3], "one K/V projection per image with captions"
    with torch.no_grad():
        states = models.filter.vision_model(pixel_values).last_hidden_state
        for image, texts in enumerate(captions):
            if not texts:
                assert actual[image].shape == (0, 2)
                continue
            tokens = models.filter_tokenizer(texts, padding=True, truncation=True, max_length=ITM_MAX_TOKENS,
                                             return_tensors="pt")
            expected = models.filter.itm_logits(states[image : image + 1].expand(len(texts), -1, -1),
                                                tokens.input_ids, tokens.attention_mask)
            assert torch.allclose(actual[image], expected, atol=1e-5), (image, actual[image], expected)


def test_filter_flops_per_extra_caption_exclude_the_kv_projection(models, data):
    """The cost metric the issue budgets: an extra caption of an image costs text-encoder FLOPs only, not another
    projection of the image's cross-attention K/V (2 * N * D_vision * 2 * D per layer). Oracle: the same five
    captions scored against five copies of the image pay exactly four more projections."""
    from torch.utils.flop_counter import FlopCounterMode

    captions = ["a red circle on the left"] * 5
    filter_model = models.filter
    tokens = models.filter_tokenizer(captions, padding=True, return_tensors="pt")
    image_embeds = vision_states(filter_model.vision_model, _pixels(data, 1))

    def flops(embeds, texts_per_image):
        with FlopCounterMode(display=False) as counter:
            filter_model.itm_logits(embeds, tokens.input_ids, tokens.attention_mask, texts_per_image=texts_per_image)
        return counter.get_total_flops()

    config = filter_model.config
    projection = 2 * config.vision.num_positions * config.vision.hidden_size * 2 * config.text.hidden_size \
        * config.text.num_hidden_layers
    assert flops(image_embeds.expand(5, -1, -1), 1) - flops(image_embeds, 5) == 4 * projection
    with FlopCounterMode(display=False) as counter:  # match_logits is that shared computation plus one ViT pass
        models.match_logits(_pixels(data, 1), [captions])
    with FlopCounterMode(display=False) as vit:
        vision_states(filter_model.vision_model, _pixels(data, 1))
    assert counter.get_total_flops() == flops(image_embeds, 5) + vit.get_total_flops()


def test_shared_vision_tower_runs_the_vit_once(model_dirs, data):
    """When the filter's vision tower equals the captioner's (and preprocessing matches), a batch runs one ViT
    pass: the captioner decodes from the filter's states, with the same captions as from its own ViT."""
    from blip_fast.capfilt import CapFiltModels

    captioner_dir, filter_dir = model_dirs
    options = CapFiltOptions(captioner=captioner_dir, filter=filter_dir, input="-", output="-",
                             num_captions=NUM_CAPTIONS)
    models = CapFiltModels.from_options(options)
    assert not models.shared_vision
    models.filter.vision_model.load_state_dict(models.captioner.model.vision_model.state_dict())
    models = CapFiltModels(models.captioner, models.filter, models.filter_tokenizer, models.captioner.processor,
                           options)
    assert models.shared_vision
    pixel_values = _pixels(data, 3)
    expected = models.synthetic_captions(pixel_values, torch.Generator().manual_seed(4))
    calls = []
    hooks = [vision.register_forward_hook(lambda *args: calls.append(1))
             for vision in (models.captioner.model.vision_model, models.filter.vision_model)]
    try:
        states = models.filter_states(pixel_values)
        actual = models.synthetic_captions(pixel_values, torch.Generator().manual_seed(4), states)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(calls) == 1 and actual == expected


def test_background_writer_keeps_order_and_raises_on_commit():
    from blip_fast.capfilt import BackgroundWriter

    class Recorder:
        def __init__(self):
            self.calls = []

        def commit(self):
            return {"calls": list(self.calls)}

    writer = BackgroundWriter(Recorder())
    for index in range(20):
        writer.submit(lambda recorder, index: recorder.calls.append(index), index)
    assert writer.commit() == {"calls": list(range(20))}

    failing = BackgroundWriter(Recorder())
    failing.submit(lambda recorder: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        failing.commit()
