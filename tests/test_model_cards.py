"""The acceptance test of the drop-in: the code on the HuggingFace model cards of Salesforce/blip-image-captioning-base,
blip-vqa-base and blip-itm-base-coco runs as written with transformers, and again with only the import line changed
to blip_fast, against the same (offline) hub cache -> identical strings, ids and scores.

The cache holds tiny random models saved by transformers under the real repo ids (tests/hub_fixtures.py); the only
other change to the cards' code is that the demo image is read from a file instead of downloaded.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hub_fixtures import fake_hub_cache

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]

# The model cards' code (CPU, fp32 sections), one card after the other; {import} is the only line that changes.
CARDS = '''
from PIL import Image
{import_line}

img_path = IMAGE_PATH
raw_image = Image.open(img_path).convert('RGB')

# Salesforce/blip-image-captioning-base
processor = BlipProcessor.from_pretrained("Salesforce/blip-image-captioning-base")
model = BlipForConditionalGeneration.from_pretrained("Salesforce/blip-image-captioning-base")

# conditional image captioning
text = "a photography of"
inputs = processor(raw_image, text, return_tensors="pt")

out = model.generate(**inputs)
print(processor.decode(out[0], skip_special_tokens=True))
RESULTS["conditional"] = [processor.decode(out[0], skip_special_tokens=True), out.tolist()]

# unconditional image captioning
inputs = processor(raw_image, return_tensors="pt")

out = model.generate(**inputs)
print(processor.decode(out[0], skip_special_tokens=True))
RESULTS["unconditional"] = [processor.decode(out[0], skip_special_tokens=True), out.tolist()]

# batched beam search, as BLIP captions (beam 3, 5-20 tokens)
images = [raw_image, raw_image.rotate(90), raw_image.resize((17, 50))]
inputs = processor(images=images, return_tensors="pt")
out = model.generate(**inputs, num_beams=3, max_length=20, min_length=5)
RESULTS["batched_beam3"] = [processor.batch_decode(out, skip_special_tokens=True), out.tolist()]

# Salesforce/blip-vqa-base
processor = BlipProcessor.from_pretrained("Salesforce/blip-vqa-base")
model = BlipForQuestionAnswering.from_pretrained("Salesforce/blip-vqa-base")

question = "how many dogs are in the picture?"
inputs = processor(raw_image, question, return_tensors="pt")

out = model.generate(**inputs)
print(processor.decode(out[0], skip_special_tokens=True))
RESULTS["vqa"] = [processor.decode(out[0], skip_special_tokens=True), out.tolist()]

# Salesforce/blip-itm-base-coco
processor = BlipProcessor.from_pretrained("Salesforce/blip-itm-base-coco")
model = BlipForImageTextRetrieval.from_pretrained("Salesforce/blip-itm-base-coco")

question = "A woman and a dog sitting together in a beach."
inputs = processor(raw_image, question, return_tensors="pt")

itm_scores = model(**inputs)[0]
cosine_score = model(**inputs, use_itm_head=False)[0]
RESULTS["itm"] = itm_scores.tolist()
RESULTS["cosine"] = cosine_score.tolist()
'''
IMPORTS = {
    "transformers": "from transformers import BlipProcessor, BlipForConditionalGeneration, BlipForQuestionAnswering, "
                    "BlipForImageTextRetrieval",
    "blip_fast": "from blip_fast import BlipProcessor, BlipForConditionalGeneration, BlipForQuestionAnswering, "
                 "BlipForImageTextRetrieval",
}


def _run_cards(library: str, tmp_path: Path, env: dict) -> dict:
    script = tmp_path / f"cards_{library}.py"
    body = CARDS.format(import_line=IMPORTS[library])
    script.write_text("import json, sys\nRESULTS = {}\nIMAGE_PATH = sys.argv[1]\n" + body
                      + "\nprint('RESULTS ' + json.dumps(RESULTS))\n")
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "demo.jpg")], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULTS "))
    return json.loads(line.removeprefix("RESULTS "))


@pytest.mark.slow
def test_model_card_code_gives_transformers_outputs(tmp_path, bert_vocab_dir):
    from tests.test_transforms import random_image

    cache = fake_hub_cache(tmp_path / "hf", bert_vocab_dir / "vocab.txt")
    random_image("RGB", (96, 64)).save(tmp_path / "demo.jpg")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(cache),
           "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("TRANSFORMERS_OFFLINE", None)
    expected = _run_cards("transformers", tmp_path, env)
    actual = _run_cards("blip_fast", tmp_path, env)
    assert actual.keys() == expected.keys()
    for key in ("conditional", "unconditional", "batched_beam3", "vqa"):
        assert actual[key] == expected[key], f"{key}:\nours {actual[key]}\nhf   {expected[key]}"
    assert any(len(ids) > 3 for ids in expected["batched_beam3"][1]), "the captions must have content"
    for key in ("itm", "cosine"):
        ours, theirs = actual[key], expected[key]
        assert len(ours) == len(theirs) and all(
            abs(a - b) <= 1e-5 * max(1.0, abs(b)) for row, other in zip(ours, theirs) for a, b in zip(row, other)
        ), f"{key}: ours {ours}, hf {theirs}"
