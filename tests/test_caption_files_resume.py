"""``blip-fast caption`` against a hostile user: last lines without a newline, odd file names, other spellings of
the same paths, other settings on resume, non-image inputs, and options that would be ignored."""

import csv
import io
import json
import os
import shutil

import PIL.Image
import pytest

from blip_fast.caption_files import CsvFile, JsonLines
from blip_fast.cli import main
from blip_fast.errors import InvalidInputError
from tests.tiny_models import save_tiny_captioner


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_captioner(tmp_path_factory.mktemp("captioner"), ["a red square", "a green circle on the left"])


@pytest.fixture
def imgs(tmp_path, monkeypatch):
    """Two small images in ``imgs/`` under the current folder (``tmp_path``): paths as a user types them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    PIL.Image.new("RGB", (40, 30), (200, 30, 10)).save(tmp_path / "imgs" / "x.png")
    PIL.Image.new("RGB", (20, 50), (10, 30, 200)).save(tmp_path / "imgs" / "y.jpg")
    return ["imgs/x.png", "imgs/y.jpg"]


def run(model_dir, inputs, *extra, output="out/c.jsonl"):
    """``blip-fast caption`` in this process: its exit status (``output=None``: captions on stdout)."""
    argv = ["caption", *map(str, inputs), "--model", str(model_dir), "--device", "cpu", "--batch-size", "2",
            "--workers", "0", "--max-length", "10", "--no-progress", *map(str, extra)]
    try:
        return main(argv + ([] if output is None else ["--output", str(output)]))
    except SystemExit as exit_:
        return exit_.code


def one_error_line(capsys, *fragments):
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blip-fast: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the model is resolved or loaded: the mistake must be found before."""
    import blip_fast.hub
    from blip_fast.captioning import Captioner

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(Captioner, "from_pretrained", load)
    monkeypatch.setattr(blip_fast.hub, "resolve", load)


# ---------------------------------------------------------------------------------------------------- item 1
JSONL_COLUMNS, CSV_COLUMNS = ["path", "caption"], ["path", "caption"]
JSONL_A, CSV_A = '{"path": "a.jpg", "caption": "a cat"}\n', "path,caption\nold/a.jpg,a cat\n"


@pytest.mark.parametrize("kind, text, records, after", [
    # a complete last record without its newline (an editor's save): kept, the newline added
    ("jsonl", '{"path": "a.jpg", "caption": "a cat"}\n{"path": "b.jpg", "caption": "a dog"}',
     [("a.jpg", "a cat"), ("b.jpg", "a dog")], "+\n"),
    ("jsonl", '{"path": "b\u2028.jpg", "caption": "a dog"}', [("b\u2028.jpg", "a dog")], "+\n"),
    ("csv", "path,caption\nold/a.jpg,a cat\nold/b.jpg,a dog", [("old/a.jpg", "a cat"), ("old/b.jpg", "a dog")],
     "+\n"),
    ("csv", 'path,caption\r\n"b\nc.jpg","a ""dog"""', [("b\nc.jpg", 'a "dog"')], "+\n"),
    ("csv", "path,caption", [], "+\n"),  # our header alone
    # a torn write (kill -9): cut back to the last whole record
    ("jsonl", '{"path": "a.jpg", "caption": "a cat"}\n{"path": "b.jpg", "capt', [("a.jpg", "a cat")], JSONL_A),
    ("jsonl", '{"path": "a.jpg", "caption": "a cat"}\n{"path": "b.jpg", "caption": "a dog"', [("a.jpg", "a cat")],
     JSONL_A),
    ("jsonl", '{"path": "a.jpg", "caption": "a cat"}\n{"path": "\xe9'.encode()[:-1], [("a.jpg", "a cat")], JSONL_A),
    ("csv", 'path,caption\nold/a.jpg,a cat\n"old/b\n.jpg","a d', [("old/a.jpg", "a cat")], CSV_A),  # quote open
    ("csv", 'path,caption\nold/a.jpg,a cat\n"old/b\n', [("old/a.jpg", "a cat")], CSV_A),  # cut after a quoted \n
    ("csv", "path,caption\nold/a.jpg,a cat\nold/b.jpg", [("old/a.jpg", "a cat")], CSV_A),  # a field missing
    ("csv", "path,capt", [], ""),
])
def test_last_line_without_newline_kept_if_complete_else_cut(tmp_path, kind, text, records, after):
    path = tmp_path / f"c.{kind}"
    data = text if isinstance(text, bytes) else text.encode()
    path.write_bytes(data)
    file = JsonLines(path, JSONL_COLUMNS) if kind == "jsonl" else CsvFile(path, CSV_COLUMNS)
    assert [(record["path"], record["caption"]) for record in file.read()] == records
    expected = data + b"\n" if after == "+\n" else after.encode()
    assert path.read_bytes() == expected
    assert [(record["path"], record["caption"]) for record in file.read()] == records  # and it reads the same again
    assert path.read_bytes() == expected


@pytest.mark.parametrize("kind, text, message", [
    ("jsonl", '{"path": "a.jpg", "caption": "a cat"}\n{"path": "b.jpg"}', "c.jsonl:2 holds ['path']"),
    ("jsonl", '{"path": "a.jpg", "caption": "a cat"}\n[1, 2]', "c.jsonl:2 is not a record"),
    ("csv", "path,caption\nold/a.jpg,a cat\nold/b.jpg,a dog,extra", "row 3 has 3 fields"),
    ("csv", "path,caption\nold/a.jpg,a cat,extra\n", "row 2 has 3 fields"),
    ("csv", "old/a.jpg,a cat", "is not one this command wrote"),
])
def test_a_complete_last_line_that_is_not_our_record_is_refused_whole(tmp_path, kind, text, message):
    path = tmp_path / f"c.{kind}"
    path.write_text(text)
    file = JsonLines(path, JSONL_COLUMNS) if kind == "jsonl" else CsvFile(path, CSV_COLUMNS)
    with pytest.raises(InvalidInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        file.read()
    assert path.read_text() == text


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_a_hand_fixed_last_caption_saved_without_newline_survives_a_rerun(model_dir, imgs, tmp_path, kind):
    """The probe's repro: edit the last record, save without a final newline, rerun with one more image."""
    output = tmp_path / "out" / f"c.{kind}"
    assert run(model_dir, imgs, output=output) == 0
    if kind == "jsonl":
        lines = output.read_text().split("\n")[:-1]
        lines[-1] = json.dumps({"path": imgs[1], "caption": "my hand-fixed caption"})
        edited = "\n".join(lines)
    else:
        edited = output.read_text().rstrip("\n").rsplit("\n", 1)[0] + f"\n{imgs[1]},my hand-fixed caption"
    output.write_text(edited)
    PIL.Image.new("RGB", (30, 30), (0, 200, 0)).save(tmp_path / "imgs" / "z.png")
    reference = tmp_path / "ref" / f"c.{kind}"
    assert run(model_dir, ["imgs/z.png"], output=reference) == 0
    assert run(model_dir, [*imgs, "imgs/z.png"], output=output) == 0
    new_line = reference.read_text().split("\n", 1)[1] if kind == "csv" else reference.read_text()
    assert output.read_text() == edited + "\n" + new_line


# ---------------------------------------------------------------------------------------------------- item 2
@pytest.mark.parametrize("make, inputs", [
    (lambda root: None, ["imgs/nothere.jpg"]),  # a typo
    (lambda root: (root / "imgs" / "zero.jpg").write_bytes(b""), ["imgs/zero.jpg"]),
    (lambda root: (root / "imgs" / "zero.jpg").write_bytes(b""), ["imgs/x.png", "imgs/zero.jpg"]),
])
def test_output_run_with_unusable_images_exits_1_and_keeps_what_it_wrote(model_dir, imgs, tmp_path, capsys, make,
                                                                          inputs):
    make(tmp_path)
    output = tmp_path / "out" / "c.jsonl"
    assert run(model_dir, inputs, output=output) == 1
    captioned = output.read_text().splitlines() if output.exists() else []
    assert [json.loads(line)["path"] for line in captioned] == inputs[:-1]
    errors_file = tmp_path / "out" / "c.errors.jsonl"
    assert [json.loads(line)["path"] for line in errors_file.read_text().splitlines()] == inputs[-1:]
    stderr = capsys.readouterr().err.strip().splitlines()
    assert stderr[-2] == f"1 of {len(inputs)} images could not be captioned (see {errors_file})"
    assert json.loads(stderr[-1])["failed"] == 1
    assert run(model_dir, inputs, output=output) == 1  # the rerun reports the same state, not success


@pytest.mark.parametrize("name, content", [
    ("config.json", b'{"model_type": "blip"}'),
    ("README.md", b"# a model"),
    ("notes", b"no extension, no image"),
])
def test_a_named_file_that_is_no_image_is_a_user_error(model_dir, imgs, tmp_path, capsys, no_model, name, content):
    (tmp_path / name).write_bytes(content)
    assert run(model_dir, [imgs[0], name]) == 2
    one_error_line(capsys, f"{name} is not an image (by its name or its content)")
    assert not (tmp_path / "out" / "c.jsonl").exists()


def test_a_named_image_without_an_image_extension_is_captioned(model_dir, imgs, tmp_path):
    """Only the content can tell: PIL recognises a PNG named ``photo`` (or ``photo.dat``)."""
    shutil.copy(tmp_path / "imgs" / "x.png", tmp_path / "photo")
    shutil.copy(tmp_path / "imgs" / "x.png", tmp_path / "photo.dat")
    output = tmp_path / "out" / "c.jsonl"
    assert run(model_dir, ["photo", "photo.dat"], output=output) == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [record["path"] for record in records] == ["photo", "photo.dat"]
    assert records[0]["caption"] == records[1]["caption"]


# ---------------------------------------------------------------------------------------------------- item 7
WEIRD = ["a\u2028b.jpg", "c\x85d.jpg", "e\u2029f\x1cg.png", "new\nline.jpg", 'q"uote,comma.png', "plain.jpg"]


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_paths_with_line_separators_round_trip_and_resume(model_dir, tmp_path, monkeypatch, capsys, kind):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "weird").mkdir()
    for index, name in enumerate(WEIRD):
        PIL.Image.new("RGB", (30, 30), (40 * index, 0, 0)).save(tmp_path / "weird" / name)
    output = tmp_path / "out" / f"c.{kind}"
    assert run(model_dir, ["weird"], output=output) == 0
    written = output.read_bytes()
    if kind == "jsonl":
        paths = [json.loads(line)["path"] for line in written.decode().split("\n")[:-1]]
    else:
        paths = [row["path"] for row in csv.DictReader(io.StringIO(written.decode(), newline=""))]
    assert paths == [os.path.join("weird", name) for name in sorted(WEIRD)]
    capsys.readouterr()
    assert run(model_dir, ["weird"], output=output) == 0
    assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["skipped"] == len(WEIRD)
    assert output.read_bytes() == written


# ---------------------------------------------------------------------------------------------------- item 8
@pytest.mark.parametrize("spelling", [
    lambda root, path: "./" + path,
    lambda root, path: str(root / path),
    lambda root, path: path.replace("imgs/", "imgs//../imgs/"),
    lambda root, path: str(root / "imgs"),  # the folder
])
def test_another_spelling_of_the_same_images_resumes(model_dir, imgs, tmp_path, capsys, spelling):
    output = tmp_path / "out" / "c.jsonl"
    assert run(model_dir, imgs, output=output) == 0
    written = output.read_bytes()
    capsys.readouterr()
    assert run(model_dir, sorted({spelling(tmp_path, path) for path in imgs}), output=output) == 0
    assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["skipped"] == 2
    assert output.read_bytes() == written


def test_resume_from_another_folder(model_dir, imgs, tmp_path, monkeypatch, capsys):
    """Relative paths in the records are relative to the first run's folder (pinned): from elsewhere, the same
    images resume by absolute path; new images by relative path are refused (their records would mix bases)."""
    output = tmp_path / "out" / "c.jsonl"
    assert run(model_dir, imgs[:1], output=output) == 0
    written = output.read_bytes()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert run(model_dir, ["../imgs/x.png"], output=output) == 0
    assert output.read_bytes() == written
    capsys.readouterr()
    assert run(model_dir, ["../imgs/x.png", "../imgs/y.jpg"], output=output) == 2
    one_error_line(capsys, f"the relative paths in {output} are relative to {tmp_path}", "../imgs/y.jpg")
    assert output.read_bytes() == written
    assert run(model_dir, [tmp_path / "imgs" / "x.png", tmp_path / "imgs" / "y.jpg"], output=output) == 0
    assert [json.loads(line)["path"] for line in output.read_text().splitlines()] == [
        "imgs/x.png", str(tmp_path / "imgs" / "y.jpg")]


# ---------------------------------------------------------------------------------------------------- item 9
def test_errors_without_output_is_refused(model_dir, imgs, tmp_path, capsys, no_model):
    assert run(model_dir, imgs, "--errors", "errs.jsonl", output=None) == 2
    one_error_line(capsys, "--errors errs.jsonl needs --output")
    assert not (tmp_path / "errs.jsonl").exists()


# ---------------------------------------------------------------------------------------------------- item 10
@pytest.mark.parametrize("inputs, output, message", [
    (["nothere_dir"], "out/c.jsonl", "nothere_dir: no such file or folder"),
    (["imgs/*.gif"], "out/c.jsonl", "matches no files"),
    (["imgs"], "out/c.txt", "--output out/c.txt: the name must end in .jsonl, .csv, .parquet"),
    (["imgs"], "out/c.jsonl", "the captions and the errors would both go to"),
])
def test_inputs_and_output_are_checked_before_the_model_loads(imgs, tmp_path, capsys, no_model, inputs, output,
                                                              message):
    extra = ["--errors", output] if "both" in message else []
    assert run("nobody/not-a-cached-model", inputs, *extra, output=output) == 2
    one_error_line(capsys, message)


def test_a_finished_run_is_not_redone_and_loads_no_model(model_dir, imgs, tmp_path, monkeypatch, capsys):
    output = tmp_path / "out" / "c.jsonl"
    assert run(model_dir, imgs, output=output) == 0
    from blip_fast.captioning import Captioner

    monkeypatch.setattr(Captioner, "from_pretrained", lambda *args, **kwargs: pytest.fail("model loaded"))
    capsys.readouterr()
    assert run(model_dir, imgs, output=output) == 0
    assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["skipped"] == 2


# ---------------------------------------------------------------------------------------------------- item 11
def test_settings_are_pinned_beside_the_output(model_dir, imgs, tmp_path):
    output = tmp_path / "out" / "c.csv"
    assert run(model_dir, imgs, "--sample", "--top-p", "0.5", "--seed", "7", "--prompt", "a photo of ",
               output=output) == 0
    assert json.loads((tmp_path / "out" / "c.csv.settings.json").read_text()) == {
        "cwd": str(tmp_path),
        "settings": {"model": str(model_dir), "prompt": "a photo of ", "max_length": 10, "min_length": 5,
                     "do_sample": True, "top_p": 0.5, "repetition_penalty": 1.1, "seed": 7},
    }


@pytest.mark.parametrize("other, difference", [
    (["--prompt", "a photo of "], 'prompt: "a picture of " there, "a photo of " here'),
    (["--beams", "2"], "num_beams: 3 there, 2 here"),
    (["--max-length", "12"], "max_length: 10 there, 12 here"),
    (["--min-length", "3"], "min_length: 5 there, 3 here"),
    (["--sample"], "do_sample: null there, true here; num_beams: 3 there, null here; repetition_penalty: null there, "
                   "1.1 here; seed: null there, 0 here; top_p: null there, 0.9 here"),
    (["--model-copy"], 'model: "{model}" there, "{copy}" here'),
])
def test_resume_with_other_settings_is_refused_naming_them(model_dir, imgs, tmp_path, capsys, other, difference):
    output = tmp_path / "out" / "c.jsonl"
    assert run(model_dir, imgs[:1], output=output) == 0
    written = output.read_bytes()
    model = model_dir
    if other == ["--model-copy"]:
        model, other = shutil.copytree(model_dir, tmp_path / "copy"), []
    capsys.readouterr()
    assert run(model, imgs, *other, output=output) == 2
    one_error_line(capsys, f"{output} holds captions made with other settings (",
                   difference.format(model=model_dir, copy=tmp_path / "copy"),
                   "use the same settings to resume, or another output")
    assert output.read_bytes() == written
    assert run(model, imgs[:1], *other, output=tmp_path / "out" / "new.jsonl") == 0  # another output: fine


def test_stale_or_foreign_settings_file(model_dir, imgs, tmp_path, capsys):
    """Settings pinned for files that hold nothing (deleted to start over) give way; a file there that is not
    ours is refused, not overwritten."""
    output = tmp_path / "out" / "c.jsonl"
    assert run(model_dir, imgs, output=output) == 0
    output.unlink()
    (tmp_path / "out" / "c.errors.jsonl").unlink(missing_ok=True)
    assert run(model_dir, imgs, "--beams", "2", output=output) == 0
    pinned = json.loads((tmp_path / "out" / "c.jsonl.settings.json").read_text())
    assert pinned["settings"]["num_beams"] == 2
    (tmp_path / "out" / "c.jsonl.settings.json").write_text("[1]")
    capsys.readouterr()
    assert run(model_dir, imgs, "--beams", "2", output=output) == 2
    one_error_line(capsys, "c.jsonl.settings.json is not the settings file this command pins beside")
    assert (tmp_path / "out" / "c.jsonl.settings.json").read_text() == "[1]"


# ---------------------------------------------------------------------------------------------------- item 12
@pytest.mark.parametrize("extra, named", [
    (["--top-p", "0.5"], "argument --top-p: only with --sample"),
    (["--seed", "7"], "argument --seed: only with --sample"),
    (["--seed", "0", "--top-p", "0.9"], "arguments --top-p and --seed: only with --sample"),
    (["--beams", "2", "--seed", "7"], "argument --seed: only with --sample"),
])
def test_sampling_options_without_sample_are_refused(imgs, capsys, no_model, extra, named):
    assert run("nobody/not-a-cached-model", imgs, *extra, output=None) == 2
    one_error_line(capsys, named)


def test_sampling_options_with_sample_are_taken(model_dir, imgs, capsys):
    for extra in (["--top-p", "0.5"], ["--seed", "7"], ["--seed", "7", "--top-p", "1.0"]):
        assert run(model_dir, imgs, "--sample", *extra, output=None) == 0
        assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == imgs
