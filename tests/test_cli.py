"""The ``blip-fast`` commands as a user runs them: caption (with bad files), convert."""

import pytest
import torch

from blip_fast import checkpoint
from blip_fast.cli import main
from blip_fast.data.synthetic import SyntheticNoisyDataset
from tests.tiny_models import save_tiny_captioner, to_original_key


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    synthetic = SyntheticNoisyDataset(3, noise_fraction=0.0, seed=0)
    paths, captions = [], []
    for index in range(3):
        synthetic.image(index).save(out / f"{index}.png")
        paths.append(out / f"{index}.png")
        captions.append(synthetic.record(index)["caption"])
    return save_tiny_captioner(out, captions), paths


@pytest.mark.parametrize("mode", [[], ["--sample"], ["--beams", "2", "--prompt", ""]])
def test_caption_prints_one_line_per_image(demo_model, mode, capsys):
    model_dir, paths = demo_model
    assert main(["caption", *map(str, paths), "--model", str(model_dir), "--batch-size", "2", *mode]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(path) for path in paths]
    assert all(line.split("\t")[1].strip() for line in lines)


def test_caption_matches_model_generate(demo_model, capsys):
    """The CLI's caption is the decoded continuation of the prompt under the model's own beam search."""
    from blip_fast.captioning import Captioner
    from blip_fast.data.transforms import load_image

    model_dir, paths = demo_model
    main(["caption", str(paths[0]), "--model", str(model_dir)])
    printed = capsys.readouterr().out.strip().split("\t")[1]
    captioner = Captioner.from_pretrained(model_dir)
    pixel_values = captioner.processor([load_image(paths[0])]).pixel_values
    prompt = captioner.tokenizer(["a picture of "], return_tensors="pt").input_ids
    ids = captioner.model.generate(pixel_values, input_ids=prompt, num_beams=3, max_length=20, min_length=5)
    assert printed == captioner.tokenizer.decode(ids[0, prompt.shape[1] - 1 :], skip_special_tokens=True)


def test_unreadable_image_is_reported_and_the_rest_captioned(demo_model, tmp_path, capsys):
    model_dir, paths = demo_model
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    missing = tmp_path / "missing.png"
    code = main(["caption", str(paths[0]), str(broken), str(missing), "--model", str(model_dir)])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out.count("\n") == 1 and captured.out.startswith(str(paths[0]))
    assert str(broken) in captured.err and str(missing) in captured.err
    assert "2 of 3 images could not be captioned" in captured.err


def test_missing_tokenizer_is_a_clear_error(demo_model, tmp_path, capsys):
    from blip_fast.modeling.blip import BlipForConditionalGeneration

    model_dir, paths = demo_model
    BlipForConditionalGeneration.from_pretrained(model_dir).save_pretrained(tmp_path)
    assert main(["caption", str(paths[0]), "--model", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"blip-fast: error: no tokenizer in '{tmp_path}'") and error.count("\n") == 1


def test_convert_original_checkpoint_then_caption(demo_model, tmp_path, capsys):
    """An original-format .pth (HF keys renamed back) converts to a directory that captions like the source."""
    from blip_fast.modeling.blip import BlipForConditionalGeneration

    model_dir, paths = demo_model
    source = BlipForConditionalGeneration.from_pretrained(model_dir)
    original = {to_original_key(key): value for key, value in source.state_dict().items()}
    torch.save({"model": original}, tmp_path / "model_base_capfilt.pth")

    out_dir = tmp_path / "converted"
    pth = str(tmp_path / "model_base_capfilt.pth")
    assert main(["convert", pth, str(out_dir), "--tokenizer", str(model_dir), "--config", str(model_dir)]) == 0
    converted = checkpoint.load_pretrained(BlipForConditionalGeneration, out_dir)
    for key, value in source.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
    capsys.readouterr()
    main(["caption", str(paths[1]), "--model", str(out_dir)])
    from_converted = capsys.readouterr().out
    main(["caption", str(paths[1]), "--model", str(model_dir)])
    assert from_converted == capsys.readouterr().out
