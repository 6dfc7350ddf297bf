"""CapFilt as a hostile user runs it (issue 11, items 1-5): output over its input, missing and unreadable input,
a failed start, the webdataset round trip of its shards, and kill -9 with DataLoader workers; then input that changes
between a run and its resume, and files that are not what their name or pattern suggests."""

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from blip_fast import capfilt, capfilt_io
from blip_fast.cli import main
from blip_fast.data.datasets import WebDatasetShards
from blip_fast.tokenizer import pre_caption
from tests.test_capfilt import _write_shard, data, model_dirs  # noqa: F401  (module fixtures)

ROOT = Path(__file__).resolve().parents[1]


def run(argv, capsys):
    """``blip-fast ARGV`` in this process: (exit status, stdout, stderr)."""
    try:
        code = main([str(arg) for arg in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def capfilt_args(dirs, source, output, *more):
    captioner, filter_dir = dirs
    return ["capfilt", "--captioner", captioner, "--filter", filter_dir, "--input", source, "--output", output,
            "--batch-size", "4", "--workers", "0", "--device", "cpu", "--no-progress", *more]


def digests(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture
def no_models(monkeypatch):
    """Fail the test if CapFilt gets as far as loading its models."""
    def refuse(options):
        raise AssertionError("CapFilt loaded its models before refusing the run")

    monkeypatch.setattr(capfilt.CapFiltModels, "from_options", refuse)


@pytest.fixture
def shards(tmp_path, data):  # noqa: F811
    """A private copy of the three input shards (00000..00002.tar) that a test may point the output at."""
    folder = tmp_path / "in"
    shutil.copytree(data["shards"], folder)
    return folder


# ---------------------------------------------------------------------------------------------------- item 1
@pytest.mark.parametrize("spec", ["{shards}/{{00001..00002}}.tar", "{shards}", "{shards}/*.tar"])
def test_output_over_the_input_is_refused_and_no_byte_changes(model_dirs, shards, spec, capsys, no_models):  # noqa: F811
    before = digests(shards)
    code, _, err = run(capfilt_args(model_dirs, spec.format(shards=shards), shards), capsys)
    assert code == 2 and f"the output folder {shards} holds the input" in err and "Traceback" not in err
    assert digests(shards) == before


def test_output_folder_with_foreign_files_is_refused(model_dirs, data, shards, tmp_path, capsys, no_models):  # noqa: F811
    """Shards of another dataset (not this run's input) in the output folder are not CapFilt's to overwrite."""
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(shards / "00001.tar", other / "00001.tar")
    before = digests(other)
    code, _, err = run(capfilt_args(model_dirs, shards / "00001.tar", other), capsys)
    assert code == 2 and "holds files CapFilt did not write (00001.tar)" in err
    assert digests(other) == before


def test_output_shards_are_named_after_their_input(model_dirs, shards, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    assert run(capfilt_args(model_dirs, f"{shards}/{{00001..00002}}.tar", out), capsys)[0] == 0
    assert sorted(path.name for path in out.glob("*.tar")) == ["00001.tar", "00002.tar"]
    records = [json.loads(line) for line in (out / "scored.jsonl").read_text().splitlines()]
    with tarfile.open(shards / "00001.tar") as tar:
        first_keys = {member.name.split(".")[0] for member in tar.getmembers()}
    assert {record["shard"] for record in records if record["key"] in first_keys} == {"00001.tar"}


# ---------------------------------------------------------------------------------------------------- item 2
@pytest.mark.parametrize("spec,message", [
    ("{root}/nothing", "--input {root}/nothing: no such file or folder"),
    ("{shards}/{{00001..00004}}.tar", "2 of the 4 input shards do not exist: {shards}/00003.tar, {shards}/00004.tar"),
    ("{shards}/none-*.tar", "matches no file"),
    ("pipe:cat {shards}/00000.tar", "pipe: and URL shard specs are not supported"),
    ("https://example.com/shards/{{00000..00001}}.tar", "pipe: and URL shard specs are not supported"),
    ("{root}/missing.json", "--input {root}/missing.json: no such file"),
])
def test_missing_input_is_an_error_before_any_work(model_dirs, shards, tmp_path, spec, message, capsys,  # noqa: F811
                                                   no_models):
    code, _, err = run(capfilt_args(model_dirs, spec.format(root=tmp_path, shards=shards), tmp_path / "out"), capsys)
    assert code == 2 and message.format(root=tmp_path, shards=shards) in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_folder_of_images_as_input_says_how_to_pair_them_with_captions(model_dirs, tmp_path, capsys,  # noqa: F811
                                                                        no_models):
    (tmp_path / "photos").mkdir()
    for name in ("a.jpg", "b.PNG", "notes.txt"):
        (tmp_path / "photos" / name).write_bytes(b"x")
    code, _, err = run(capfilt_args(model_dirs, tmp_path / "photos", tmp_path / "out"), capsys)
    assert code == 2 and f"--input {tmp_path / 'photos'}: the folder holds no .tar shards but images (2): CapFilt " \
        f"reads image-text pairs, so name the images and their web captions in a BLIP json (--input FILE.json " \
        f"--image-root {tmp_path / 'photos'})" in err


def test_a_truncated_json_input_is_one_line_naming_its_line(model_dirs, tmp_path, capsys, no_models):  # noqa: F811
    (tmp_path / "web.json").write_text('[{"image": "a.png", "caption": "x"},')
    code, _, err = run(capfilt_args(model_dirs, tmp_path / "web.json", tmp_path / "out"), capsys)
    assert code == 2 and "Traceback" not in err
    assert f"--input {tmp_path / 'web.json'}, line 1 column 37: not valid json (Expecting value)" in err
    assert not (tmp_path / "out").exists()


def test_json_without_image_root_is_refused_before_work(model_dirs, data, tmp_path, capsys, no_models):  # noqa: F811
    code, _, err = run(capfilt_args(model_dirs, data["json"], tmp_path / "out"), capsys)
    assert code == 2 and "10 of the first 10 images of" in err and "no --image-root given" in err


def test_error_rate_above_the_threshold_exits_non_zero(model_dirs, shards, tmp_path, capsys):  # noqa: F811
    """Two good shards and a non-tar named .tar: 1 unusable record of 9 (11%) passes the 5% default."""
    (shards / "00002.tar").write_text("this is not a tar file\n" * 40)
    code, out, err = run(capfilt_args(model_dirs, shards, tmp_path / "out"), capsys)
    summary = json.loads(out.strip().splitlines()[-1])
    assert code == 1 and summary["merged"] and summary["unusable"] == 1 and summary["records"] == 9
    assert "1 of 9 input records (11.1%) could not be used, more than --max-error-rate 0.05" in err
    assert run(capfilt_args(model_dirs, shards, tmp_path / "out", "--max-error-rate", "0.2"), capsys)[0] == 0


def test_run_with_no_usable_image_fails(model_dirs, tmp_path, capsys):  # noqa: F811
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "00000.tar").write_text("not a tar\n" * 40)
    code, out, err = run(capfilt_args(model_dirs, tmp_path / "in", tmp_path / "out"), capsys)
    assert code == 1 and json.loads(out.splitlines()[-1])["error_rate"] == 1.0 and "could not be used" in err


# ---------------------------------------------------------------------------------------------------- item 3
def test_corrected_rerun_after_a_failed_start_proceeds(model_dirs, shards, tmp_path, capsys, monkeypatch):  # noqa: F811
    captioner, filter_dir = model_dirs
    out = tmp_path / "out"
    wrong = capfilt_args((filter_dir, filter_dir), shards, out)  # a retrieval model as the captioner
    code, _, err = run(wrong, capsys)
    assert code == 2 and "is a retrieval model" in err and out.is_dir()
    assert run(capfilt_args(model_dirs, f"{shards}/", out), capsys)[0] == 0  # corrected, and a trailing slash
    monkeypatch.chdir(shards.parent)
    code, out_text, _ = run(capfilt_args(model_dirs, "in", out), capsys)  # relative spelling, same input
    assert code == 0 and json.loads(out_text.splitlines()[-1])["images"] == 10
    code, _, err = run(capfilt_args(model_dirs, shards, out, "--seed", "3"), capsys)
    assert code == 2 and "made with other options (seed)" in err


# ---------------------------------------------------------------------------------------------------- item 4
def _img2dataset_shard(path: Path, data) -> dict[str, dict]:  # noqa: F811
    """Four samples as img2dataset writes them (key.jpg? here .png, .txt, .json with its fields) plus a .cls."""
    members, metadata = [], {}
    for index, (key, image, caption) in enumerate(data["samples"][:4]):
        metadata[key] = {"key": key, "url": f"http://example.com/{key}.png", "caption": caption, "width": 64,
                         "height": 64, "original_width": 640, "original_height": 640, "status": "success",
                         "sha256": hashlib.sha256(image).hexdigest(), "error_message": None}
        members += [(f"{key}.png", image), (f"{key}.txt", caption.encode()),
                    (f"{key}.json", json.dumps(metadata[key]).encode()), (f"{key}.cls", str(index).encode())]
    _write_shard(path, members)
    return metadata


def test_shards_round_trip_through_webdataset_and_training_reads_every_kept_caption(model_dirs, data, tmp_path,  # noqa: F811
                                                                                     capsys):
    wds = pytest.importorskip("webdataset")
    metadata = _img2dataset_shard(tmp_path / "in" / "web-00007.tar", data)
    out = tmp_path / "out"
    args = capfilt_args(model_dirs, tmp_path / "in", out, "--num-captions", "2", "--threshold", "0.3")
    assert run(args, capsys)[0] == 0
    scored = [json.loads(line) for line in (out / "scored.jsonl").read_text().splitlines()]
    kept = [record for record in scored if record["kept"]]
    assert {record["source"] for record in kept} == {"web", "synthetic"}, "the fixture should keep both kinds"

    shard = str(out / "web-00007.tar")
    samples = list(wds.WebDataset(shard, shardshuffle=False))
    tuples = list(wds.WebDataset(shard, shardshuffle=False).to_tuple("jpg;png", "txt", "json", "cls"))
    assert len(tuples) == len(samples) == len({record["key"] for record in kept})
    originals = {key: image for key, image, _ in data["samples"]}
    for (image, text, fields, label), sample in zip(tuples, samples):
        fields = json.loads(fields)
        key = sample["__key__"]
        assert image == originals[key] and label == str(list(metadata).index(key)).encode()
        assert {name: fields[name] for name in metadata[key]} == {**metadata[key], "caption": text.decode()}
        assert fields["web_caption"] == metadata[key]["caption"]
        mine = [record for record in kept if record["key"] == key]
        assert [entry["caption"] for entry in fields["captions"]] == [record["caption"] for record in mine]
        assert text.decode() == max(mine, key=lambda record: record["itm_score"])["caption"]

    training = WebDatasetShards(shard, transform=None)
    assert sorted(training.captions) == sorted(pre_caption(record["caption"]) for record in kept)
    assert len(training) == len(kept) > len(samples)  # every kept caption, web and synthetic, is a training pair
    ids = {key: training[index]["image_id"] for index, key in enumerate(training.keys)}
    assert len(set(ids.values())) == len(samples)  # the captions of one image share its id


# ---------------------------------------------------------------------------------------------------- item 5
def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_the_parent(model_dirs, tmp_path):  # noqa: F811
    """kill -9 of CapFilt while its 2 workers push large batches: no worker may survive it. Large payloads matter:
    a worker whose queue feeder is blocked on a full pipe never reaches torch's own parent check."""
    rng = np.random.default_rng(0)
    members = []
    for index in range(24):
        buffer = io.BytesIO()
        PIL.Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buffer, "PNG")
        members += [(f"{index:04d}.png", buffer.getvalue()), (f"{index:04d}.txt", b"a noisy picture")]
    _write_shard(tmp_path / "in" / "00000.tar", members)
    captioner, filter_dir = model_dirs
    argv = capfilt_args(model_dirs, tmp_path / "in", tmp_path / "out", "--batch-size", "8")
    argv[argv.index("--workers") + 1] = "2"
    process = subprocess.Popen([sys.executable, "-m", "blip_fast.cli", *map(str, argv)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while len(_children(process.pid)) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = _children(process.pid)
        assert len(workers) >= 2, "the workers never started"
        time.sleep(3)  # their queues fill while the parent loads the models
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    deadline = time.monotonic() + 15
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in workers if _alive(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"{len(survivors)} of {len(workers)} DataLoader workers outlived their parent"


# ---------------------------------------------------------------------------------------------------- one run per unit
def test_a_second_run_stops_on_the_unit_a_live_run_writes_and_touches_nothing(model_dirs, shards, tmp_path,  # noqa: F811
                                                                              capsys, no_models):
    """The same command started twice (two terminals, a retrying scheduler): the second stops before its models load,
    naming the first, and leaves the unit the first is writing -- its half-written shard included -- alone."""
    out = capfilt_io.prepare_output(tmp_path / "out", [])
    half_written = out / ".00000.tar.partial"
    half_written.write_bytes(b"the live run's first samples")
    with capfilt_io.lock_unit(out, 0):
        code, _, err = run(capfilt_args(model_dirs, shards, out), capsys)
    assert code == 2 and "Traceback" not in err
    assert f"{out} (unit 0) is in use by another run (pid {os.getpid()} on" in err
    assert half_written.read_bytes() == b"the live run's first samples"
    assert not list((out / "manifest").iterdir()) and not list((out / "parts").iterdir())


def test_a_unit_another_run_finished_meanwhile_stops_this_run_and_keeps_its_work(model_dirs, shards, tmp_path,  # noqa: F811
                                                                                 capsys, monkeypatch):
    """Two runs whose units overlap (one resumed with another world size while the first still works): when the
    other finishes a unit this run was about to write, this run stops there with its finished units kept."""
    load = capfilt.CapFiltModels.from_options

    def load_while_another_run_finishes_unit_1(options):
        models = load(options)
        capfilt_io.manifest_path(Path(options.output), 1).write_text('{"written_by": "the other run"}\n')
        return models

    monkeypatch.setattr(capfilt.CapFiltModels, "from_options", load_while_another_run_finishes_unit_1)
    out = tmp_path / "out"
    code, _, err = run(capfilt_args(model_dirs, shards, out), capsys)
    assert code == 2 and f"{out}: unit 1 was finished by another run while this one ran" in err
    assert json.loads((out / "manifest" / "unit-00000.json").read_text())["unit"] == 0  # this run's, kept
    assert (out / "manifest" / "unit-00001.json").read_text() == '{"written_by": "the other run"}\n'
    assert not (out / "00001.tar").exists() and not (out / "summary.json").exists()


# ---------------------------------------------------------------------------------------------------- input that moves
def _grow_json(path: Path) -> None:
    records = json.loads(path.read_text())
    path.write_text(json.dumps(records + [{"image": records[0]["image"], "caption": "a new record"}]))


def _edit_json(path: Path) -> None:
    records = json.loads(path.read_text())
    path.write_text(json.dumps([{**records[0], "caption": "another caption"}, *records[1:]]))


@pytest.mark.parametrize("change, message", [
    (lambda folder: shutil.copy(folder / "00002.tar", folder / "00001.tar"), "shards added: 00001.tar"),
    (lambda folder: (folder / "00000.tar").unlink(), "shards gone: 00000.tar"),
    (lambda folder: (folder / "00002.tar").open("ab").write(b"\0" * 10240), "shards rewritten: 00002.tar"),
])
def test_a_resume_over_another_shard_listing_is_refused_and_keeps_the_output(model_dirs, shards, tmp_path, capsys,  # noqa: F811
                                                                             change, message):
    """Units are positions in the listing: a shard img2dataset adds meanwhile, or one the user deletes, would shift
    every later unit onto another shard's finished work (one shard never captioned, another twice)."""
    (shards / "00001.tar").unlink()
    out = tmp_path / "out"
    assert run(capfilt_args(model_dirs, shards, out), capsys)[0] == 0
    before = digests(out)
    change(shards)
    code, _, err = run(capfilt_args(model_dirs, shards, out), capsys)
    assert code == 2 and "Traceback" not in err
    assert f"--input {shards}: {message} since {out} was started; it resumes the same input only" in err
    assert digests(out) == before


@pytest.mark.parametrize("change, message", [(_grow_json, "the json now holds 11 records (10 then)"),
                                             (_edit_json, "the json's content changed")])
def test_a_resume_over_an_edited_json_is_refused(model_dirs, data, tmp_path, capsys, change, message):  # noqa: F811
    source = tmp_path / "web.json"
    shutil.copy(data["json"], source)
    out = tmp_path / "out"
    args = capfilt_args(model_dirs, source, out, "--image-root", data["image_root"])
    assert run(args, capsys)[0] == 0
    change(source)
    code, _, err = run(args, capsys)
    assert code == 2 and f"--input {source}: {message} since {out} was started" in err


# ---------------------------------------------------------------------------------------------------- not what it seems
def test_a_pattern_over_an_img2dataset_folder_names_the_files_that_are_no_shards(model_dirs, shards, tmp_path,  # noqa: F811
                                                                                 capsys, no_models):
    for name in ("00000.parquet", "00000_stats.json", "00001.parquet"):
        (shards / name).write_text("{}")
    code, _, err = run(capfilt_args(model_dirs, f"{shards}/*", tmp_path / "out"), capsys)
    assert code == 2 and f"--input {shards}/* matches files that are not .tar shards: 00000.parquet, " \
        "00000_stats.json, 00001.parquet; name the shards alone (e.g. '*.tar')" in err
    assert not (tmp_path / "out").exists()
    code, _, err = run(capfilt_args(model_dirs, shards / "00000.parquet", tmp_path / "out"), capsys)
    assert code == 2 and "00000.parquet is neither a BLIP json (.json, .jsonl) nor a .tar shard" in err


def test_an_upper_case_json_name_is_read_as_json(model_dirs, data, tmp_path, capsys, no_models):  # noqa: F811
    source = tmp_path / "WEB.JSON"
    shutil.copy(data["json"], source)
    code, _, err = run(capfilt_args(model_dirs, source, tmp_path / "out"), capsys)
    assert code == 2 and "of the first 10 images of" in err and "no --image-root given" in err


def test_a_repeated_key_is_an_error_record_and_every_output_shard_reads_back(model_dirs, data, tmp_path, capsys):  # noqa: F811
    """webdataset groups a shard's adjacent members by key: a key that comes back later (a shard concatenated with
    part of itself), or a member twice within one sample, would give an output sample webdataset refuses."""
    wds = pytest.importorskip("webdataset")
    (key_a, image_a, caption_a), (key_b, image_b, caption_b), (key_c, image_c, _) = data["samples"][:3]
    _write_shard(tmp_path / "in" / "00000.tar", [
        (f"{key_a}.png", image_a), (f"{key_a}.txt", caption_a.encode()),
        (f"{key_b}.png", image_b), (f"{key_b}.txt", caption_b.encode()),
        (f"{key_c}.png", image_c), (f"{key_c}.txt", b"one caption"), (f"{key_c}.txt", b"and another"),
        (f"{key_a}.png", image_b), (f"{key_a}.txt", b"the first key again"),
    ], ordered=True)
    out = tmp_path / "out"
    args = capfilt_args(model_dirs, tmp_path / "in", out, "--threshold", "0.0", "--max-error-rate", "0.9")
    assert run(args, capsys)[0] == 0
    errors = [(record["key"], record["reason"], record["detail"]) for record in
              map(json.loads, (out / "errors.jsonl").read_text().splitlines())]
    shard = str(tmp_path / "in" / "00000.tar")
    assert errors == [(f"{shard}:{key_c}", "bad_record", f"members repeated: {key_c}.txt"),
                      (f"{shard}:{key_a}", "bad_record", "the key of an earlier sample of the shard again")]
    samples = list(wds.WebDataset(str(out / "00000.tar"), shardshuffle=False))
    assert [sample["__key__"] for sample in samples] == [key_a, key_b]
    assert samples[0]["png"] == image_a and json.loads(samples[0]["json"])["web_caption"] == caption_a


def test_an_input_without_samples_says_so(model_dirs, tmp_path, capsys):  # noqa: F811
    (tmp_path / "empty.json").write_text("[]")
    code, _, err = run(capfilt_args(model_dirs, tmp_path / "empty.json", tmp_path / "out"), capsys)
    assert code == 2 and f"--input {tmp_path / 'empty.json'} holds no records: there is nothing to caption" in err
    assert not (tmp_path / "out").exists()
    _write_shard(tmp_path / "in" / "00000.tar", [])
    code, _, err = run(capfilt_args(model_dirs, tmp_path / "in", tmp_path / "out"), capsys)
    assert code == 1 and f"--input {tmp_path / 'in'} holds no samples: there was nothing to caption" in err


@pytest.mark.parametrize("variable", ["RANK", "WORLD_SIZE", "LOCAL_RANK"])
def test_a_launcher_variable_that_is_no_integer_is_one_line(model_dirs, shards, tmp_path, capsys, monkeypatch,  # noqa: F811
                                                            variable, no_models):
    monkeypatch.setenv(variable, "abc")
    code, _, err = run(capfilt_args(model_dirs, shards, tmp_path / "out"), capsys)
    assert code == 2 and f"environment variable {variable} must be an integer, got 'abc'" in err
    assert "Traceback" not in err
