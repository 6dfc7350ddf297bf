"""Bulk captioning: folders/globs/lists, bad images to the errors file, output formats, resume after kill -9."""

import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import PIL.Image
import pytest

from blip_fast.caption_files import find_images
from blip_fast.cli import main
from blip_fast.errors import MissingFileError
from tests.tiny_models import save_tiny_captioner


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` (a decompression bomb by size) and holds no pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(
        b"IEND", b"")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Good images (RGB, CMYK, RGBA, 1x1, large) in nested folders, and bad ones (corrupt, truncated, bomb)."""
    root = tmp_path_factory.mktemp("images")
    (root / "sub" / "deeper").mkdir(parents=True)
    good = {
        "a.png": PIL.Image.new("RGB", (40, 30), (200, 30, 10)),
        "sub/b.jpg": PIL.Image.new("RGB", (64, 64), (10, 200, 30)),
        "sub/deeper/c.png": PIL.Image.new("L", (17, 50), 90),
        "cmyk.jpg": PIL.Image.new("CMYK", (32, 32), (10, 20, 200, 0)),
        "rgba.png": PIL.Image.new("RGBA", (20, 20), (0, 0, 255, 100)),
        "one.png": PIL.Image.new("RGB", (1, 1), (5, 5, 5)),
        "large.png": PIL.Image.new("RGB", (3000, 2000), (120, 120, 0)),
    }
    for name, image in good.items():
        image.save(root / name)
    jpeg = io.BytesIO()
    PIL.Image.new("RGB", (64, 64), (1, 2, 3)).save(jpeg, "JPEG")
    (root / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "corrupt.jpg").write_bytes(os.urandom(300))
    (root / "sub" / "bomb.png").write_bytes(_png_header_only(20000, 20000))
    (root / "notes.md").write_text("not an image")
    return root, sorted(good), ["corrupt.jpg", "sub/bomb.png", "truncated.jpg"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_captioner(tmp_path_factory.mktemp("captioner"), ["a red square", "a green circle on the left"])


def _caption(model_dir, inputs, output, *extra):
    return main(["caption", *map(str, inputs), "--model", str(model_dir), "--output", str(output), "--device", "cpu",
                 "--batch-size", "2", "--workers", "0", "--max-length", "10", *extra])


def test_find_images_folders_globs_lists_once(images, tmp_path):
    root, good, bad = images
    listing = tmp_path / "list.txt"
    listing.write_text(f"# images\n{root / 'a.png'}\n\n{os.path.relpath(root / 'one.png', tmp_path)}\nmissing.jpg\n")
    found = find_images([root / "sub", str(root / "*.png"), listing, root / "a.png"])
    assert found == [str(root / "sub" / "b.jpg"), str(root / "sub" / "bomb.png"), str(root / "sub" / "deeper/c.png"),
                     str(root / "a.png"), str(root / "large.png"), str(root / "one.png"), str(root / "rgba.png"),
                     str(tmp_path / "missing.jpg")]
    assert len(find_images([root])) == len(good) + len(bad)
    for wrong, message in [(root / "nope", "no such file or folder"), (str(root / "*.gif"), "matches no files")]:
        with pytest.raises(MissingFileError, match=message):
            find_images([wrong])


def test_folder_with_good_and_bad_images(images, model_dir, tmp_path, capsys):
    root, good, bad = images
    output = tmp_path / "out" / "captions.jsonl"
    assert _caption(model_dir, [root], output) == 1  # bad images fail the run, as on stdout
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(os.path.relpath(record["path"], root) for record in records) == good
    assert all(record["caption"].strip() for record in records)
    failures = [json.loads(line) for line in (tmp_path / "out" / "captions.errors.jsonl").read_text().splitlines()]
    assert sorted(os.path.relpath(record["path"], root) for record in failures) == bad
    assert any("decompression bomb" in record["reason"] for record in failures)
    stderr = capsys.readouterr().err.strip().splitlines()
    assert json.loads(stderr[-1]) == {"output": str(output), "images": 10, "captioned": 7, "failed": 3, "skipped": 0,
                                      "failed_earlier": 0}
    assert stderr[-2] == f"3 of 10 images could not be captioned (see {tmp_path / 'out' / 'captions.errors.jsonl'})"
    assert _caption(model_dir, [root], output) == 1  # a rerun has nothing left to do, and says so the same way
    stderr = capsys.readouterr().err.strip().splitlines()
    assert json.loads(stderr[-1]) == {"output": str(output), "images": 10, "captioned": 0, "failed": 0, "skipped": 10,
                                      "failed_earlier": 3}
    assert stderr[-2].startswith("3 of 10 images could not be captioned, 3 of them in earlier runs (see ")
    assert len(output.read_text().splitlines()) == len(good)


def test_a_second_run_on_a_live_runs_output_touches_nothing(images, model_dir, tmp_path, capsys):
    """While one run appends to the output (its last line still torn), the same command again stops with one line
    naming it, and does not cut that line as a crashed run's."""
    from blip_fast.output_lock import lock_output_file

    root, _, _ = images
    output = tmp_path / "captions.jsonl"
    in_progress = '{"path": "a.png", "caption": "a red square"}\n{"path": "b.png", "capt'
    output.write_text(in_progress)
    with lock_output_file(output, "blip-fast caption (the first run)"):
        assert _caption(model_dir, [root], output) == 2
    assert output.read_text() == in_progress
    error = capsys.readouterr().err
    assert f"{output} is in use by another run (pid {os.getpid()} on " in error and "(the first run)" in error
    assert _caption(model_dir, [root], output) == 1  # once that run is gone, this one resumes it (bad images: 1)


@pytest.mark.parametrize("name, text", [
    ("mine.jsonl", '{"id": 1, "text": "first"}\n{"id": 2, "text": "my last line, no newline"}'),
    ("mine.jsonl", '{"id": 1, "text": "only line, no newline"}'),
    ("mine.csv", "name,score\nx,1\ny,2"),
    ("mine.csv", "just one line"),
])
def test_someone_elses_file_is_refused_whole(images, model_dir, tmp_path, capsys, name, text):
    """An --output that is another tool's file, its last line without a newline: refused, and not a byte cut (that
    line used to be cut off as this command's torn write before the file was found to be someone else's)."""
    root, _, _ = images
    output = tmp_path / name
    output.write_text(text)
    assert _caption(model_dir, [root], output) == 2
    assert output.read_text() == text
    assert "another output" in capsys.readouterr().err


def test_torn_line_and_partly_written_chunk_resume_identically(images, model_dir, tmp_path):
    """What kill -9 leaves (a half-written line; a chunk whose records are partly on disk) is repaired."""
    root, good, _ = images
    reference = tmp_path / "reference.jsonl"
    _caption(model_dir, [root], reference, "--sample")
    resumed = tmp_path / "resumed.jsonl"
    lines = reference.read_bytes().splitlines(keepends=True)
    resumed.write_bytes(b"".join(lines[:3]) + lines[3][:10])  # chunk 2 partly written, then a torn line
    shutil.copy(tmp_path / "reference.errors.jsonl", tmp_path / "resumed.errors.jsonl")
    _caption(model_dir, [root], resumed, "--sample")
    assert resumed.read_bytes() == reference.read_bytes()


def test_csv_with_scores_and_bad_outputs(images, model_dir, tmp_path, capsys):
    import csv

    from blip_fast.captioning import Captioner
    from blip_fast.data.transforms import load_image

    root, good, _ = images
    output = tmp_path / "captions.csv"
    assert _caption(model_dir, [root / "a.png", root / "one.png"], output, "--score") == 0
    rows = list(csv.DictReader(output.read_text().splitlines()))
    assert [row["path"] for row in rows] == [str(root / "a.png"), str(root / "one.png")]
    captioner = Captioner.from_pretrained(model_dir)
    pixels = captioner.processor([load_image(root / "a.png")]).pixel_values
    prompt = captioner.tokenizer(["a picture of "], return_tensors="pt").input_ids
    beams = captioner.model.generate(pixels, input_ids=prompt, num_beams=3, max_length=10, min_length=5,
                                     return_dict_in_generate=True, output_scores=True)
    assert float(rows[0]["score"]) == pytest.approx(beams.sequences_scores[0].item(), rel=1e-5)
    assert _caption(model_dir, [root / "a.png"], output) == 2  # the file holds scores: the same --score, please
    assert "--score" in capsys.readouterr().err
    assert _caption(model_dir, [root / "a.png"], tmp_path / "captions.txt") == 2
    assert _caption(model_dir, [root / "a.png"], output, "--errors", str(output), "--score") == 2


def test_greedy_score_is_the_mean_token_log_probability(model_dir):
    """Oracle: the teacher-forced log-probabilities of the generated tokens under the model's forward."""
    import torch

    from blip_fast.captioning import Captioner, mean_token_log_prob

    captioner = Captioner.from_pretrained(model_dir)
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prompt = captioner.tokenizer(["a picture of "] * 3, return_tensors="pt").input_ids
    out = captioner.model.generate(pixels, input_ids=prompt, max_length=12, return_dict_in_generate=True,
                                   output_scores=True)
    fed, eos = prompt.shape[1] - 1, captioner.model.config.text.sep_token_id
    scores = mean_token_log_prob(out.sequences, out.scores, fed, eos)
    with torch.no_grad():
        logits = captioner.model(pixels, out.sequences).logits.log_softmax(dim=-1)
    for row, sequence in enumerate(out.sequences.tolist()):
        generated = sequence[fed:]
        end = generated.index(eos) + 1 if eos in generated else len(generated)
        expected = sum(logits[row, fed + t - 1, generated[t]].item() for t in range(end)) / end
        assert scores[row].item() == pytest.approx(expected, rel=1e-4)


def test_parquet_needs_pyarrow_or_round_trips(images, model_dir, tmp_path, capsys):
    root, _, _ = images
    output = tmp_path / "captions.parquet"
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        assert _caption(model_dir, [root / "a.png"], output) == 2
        assert "pyarrow" in capsys.readouterr().err and not output.exists()
        return
    assert _caption(model_dir, [root / "a.png", root / "corrupt.jpg"], output) == 1
    assert _caption(model_dir, [root / "a.png", root / "one.png"], output) == 0  # extends the finished file
    assert parquet.read_table(output).column("path").to_pylist() == [str(root / "a.png"), str(root / "one.png")]
    assert not (tmp_path / "captions.parquet.partial.jsonl").exists()


@pytest.mark.slow
def test_kill_9_midway_then_rerun_equals_an_uninterrupted_run(images, model_dir, tmp_path):
    root, good, bad = images
    command = [sys.executable, "-m", "blip_fast.cli", "caption", str(root), "--model", str(model_dir), "--device",
               "cpu", "--batch-size", "1", "--workers", "0", "--sample", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference, killed = tmp_path / "reference.jsonl", tmp_path / "killed.jsonl"
    finished = subprocess.run([*command, "--output", str(reference)], env=env, timeout=600, capture_output=True)
    assert finished.returncode == 1, finished.stderr  # the bad images
    process = subprocess.Popen([*command, "--output", str(killed)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if killed.exists() and killed.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert killed.read_bytes().count(b"\n") < len(good), "the kill must land midway"
    resumed = subprocess.run([*command, "--output", str(killed)], env=env, timeout=600, capture_output=True)
    assert resumed.returncode == 1, resumed.stderr
    assert killed.read_bytes() == reference.read_bytes()
    assert (tmp_path / "killed.errors.jsonl").read_bytes() == (tmp_path / "reference.errors.jsonl").read_bytes()
