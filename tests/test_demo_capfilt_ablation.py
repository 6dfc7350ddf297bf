"""benchmarks/demo_capfilt_ablation.py: its caption reader against the synthetic set's own captions, and the two
ablated bootstrapped sets against hand-built CapFilt rows."""

import dataclasses
import json
import random

import pytest

from benchmarks.demo_capfilt_ablation import (
    ablated_captions,
    background_attributes,
    names_what_it_sees,
    pattern_auc,
)
from blip_fast.data.synthetic import _TEMPLATES, SyntheticNoisyDataset, render_caption


def test_background_is_read_back_from_every_template():
    """Every template, many scenes: the (colour, pattern) read back is the scene's background (the oracle: the
    scene the caption was rendered from)."""
    dataset = SyntheticNoisyDataset(300, 0.0, seed=3)
    captions = []
    for index in range(300):
        scene = dataset.scene(index)
        captions.append(render_caption(scene, random.Random(index)))
        assert background_attributes(captions[-1]) == (scene.background, scene.pattern), captions[-1]
        assert names_what_it_sees(captions[-1], scene)
    # Each template's fixed words turn up (so each template was read).
    for fixed in ({word for word in template.split() if "{" not in word} for template in _TEMPLATES):
        assert any(fixed <= set(caption.split()) for caption in captions), fixed


@pytest.mark.parametrize(("caption", "expected"), [
    ("a picture of three blue stars on the left side, on a striped white background", ("white", "striped")),
    ("two gray diamonds at the top the background is dotted red", ("red", "dotted")),
    ("a checkered purple background with two gray squares in the middle", ("purple", "checkered")),
    ("one yellow hexagon placed on the left side against a yellow backdrop", ("yellow", "plain")),
    ("a picture of a picture of a picture of three", (None, None)),
])
def test_background_of_generated_captions(caption, expected):
    assert background_attributes(caption) == expected


def test_ablated_sets_keep_web_captions_and_only_right_synthetic_ones():
    dataset = SyntheticNoisyDataset(2, 0.0, seed=1)
    scene = dataset.scene(0)
    other_pattern = next(p for p in ("striped", "dotted") if p != scene.pattern)
    wrong = dataclasses.replace(scene, pattern=other_pattern)
    wrong_shape = dataclasses.replace(scene, shape=next(s for s in ("star", "cross") if s != scene.shape))
    rows = [{"image": "a.png", "source": "web", "caption": render_caption(wrong, random.Random(0))},
            {"image": "a.png", "source": "synthetic", "caption": render_caption(scene, random.Random(1))},
            {"image": "a.png", "source": "synthetic", "caption": render_caption(wrong, random.Random(2))},
            {"image": "a.png", "source": "synthetic", "caption": render_caption(wrong_shape, random.Random(3))}]
    scenes = {"a.png": scene}
    assert ablated_captions(rows, scenes, "web-only") == rows[:1]
    assert ablated_captions(rows, scenes, "oracle") == rows[:2]
    with pytest.raises(ValueError, match="unknown variant"):
        ablated_captions(rows, scenes, "beam")


def test_pattern_auc_against_a_hand_count():
    """Right-pattern synthetic captions score 0.9 and 0.4, wrong ones 0.6 and 0.4: of the four (right, wrong) pairs
    the right one wins two (0.9 > 0.6, 0.9 > 0.4), loses one (0.4 < 0.6) and ties one: AUC 2.5 / 4. Web rows do not
    count."""
    scene = SyntheticNoisyDataset(1, 0.0, seed=1).scene(0)
    wrong = dataclasses.replace(scene, pattern=next(p for p in ("striped", "dotted") if p != scene.pattern))
    rows = [{"image": "a.png", "source": source, "itm_score": score, "caption": render_caption(described, random.Random(k))}
            for k, (source, score, described) in enumerate([
                ("synthetic", 0.9, scene), ("synthetic", 0.4, scene), ("synthetic", 0.6, wrong),
                ("synthetic", 0.4, wrong), ("web", 0.0, scene)])]
    assert pattern_auc(rows, {"a.png": scene}) == pytest.approx(2.5 / 4)
    with pytest.raises(ValueError, match="right and with wrong"):
        pattern_auc(rows[:2], {"a.png": scene})


def test_a_folder_that_is_no_finished_demo_is_refused_naming_the_file(tmp_path, capsys):
    """A typo'd or unfinished --out-dir: exit 2 naming the missing results.json, before anything is written."""
    from benchmarks.demo_capfilt_ablation import main

    (tmp_path / "seed-0").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["--out-dir", str(tmp_path), "--seeds", "0"])
    assert exit_info.value.code == 2
    assert f"{tmp_path / 'seed-0'}/results.json: not a finished demo seed" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["seed-0"]


def _finished_seed(out_dir, seed, cpu):
    seed_dir = out_dir / f"seed-{seed}"
    seed_dir.mkdir(parents=True)
    (seed_dir / "results.json").write_text("{}")
    (seed_dir / "run.json").write_text(json.dumps({"seed": seed, **({"cpu": cpu} if cpu else {})}))


@pytest.mark.parametrize("cpus, message", [
    ([None], "seed-0/run.json records no CPU numerics"),
    ([{"aten_capability": "AVX2", "mkl_cbwr": "AVX2", "onednn_max_cpu_isa": "AVX2"},
      {"aten_capability": "AVX512", "mkl_cbwr": None, "onednn_max_cpu_isa": None}], "different CPU numerics"),
    ([{"aten_capability": "ZVECTOR", "mkl_cbwr": None, "onednn_max_cpu_isa": None}],
     "seed-0/run.json: the seeds ran with CPU numerics"),
])
def test_seeds_whose_cpu_numerics_this_process_cannot_match_are_refused(tmp_path, capsys, cpus, message):
    """The arms must run with the seed's CPU numerics: a seed from before they were recorded, seeds that differ, or
    an instruction set this CPU does not give: exit 2, nothing written."""
    from benchmarks.demo_capfilt_ablation import main

    for seed, cpu in enumerate(cpus):
        _finished_seed(tmp_path, seed, cpu)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        main(["--out-dir", str(tmp_path), "--seeds", *map(str, range(len(cpus)))])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert sorted(tmp_path.rglob("*")) == before
