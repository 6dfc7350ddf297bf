"""Which shape words the small demo's captioners say, and how often the synthetic captions the filter kept name the
shape right: why seed 2's bootstrapped captioner names fewer shapes than its noisy one. From the repository root:
PYTHONPATH=. python <this file> OUT_DIR OUT.json (OUT_DIR: a finished ``blip-fast demo --scale small --seeds 3``
folder; the captioners are decoded again, as the demo decodes them)."""

import json
import sys
from collections import Counter
from pathlib import Path

from benchmarks.demo_capfilt_ablation import _web_scenes
from blip_fast import demo

out = Path(sys.argv[1])
scenes = _web_scenes(out, demo.SCALES["small"])
splits = demo.split_paths(out / "data")
test_shapes = [demo.caption_attributes(record["caption"][0])["shape"]
               for record in json.loads(splits["caption_test"].read_text())]
rows = {}
for seed in (0, 1, 2):
    kept = [record for record in map(json.loads, (out / f"seed-{seed}" / "capfilt" / "scored.jsonl").read_text()
                                     .splitlines()) if record["source"] != "web" and record["kept"]]
    kept_shapes = [(scenes[record["image"]].shape, demo.caption_attributes(record["caption"])["shape"])
                   for record in kept]
    row = {"kept_synthetic": len(kept),
           "kept_synthetic_shape_right": round(100 * sum(true == said for true, said in kept_shapes) / len(kept), 1),
           "kept_synthetic_wrong_shapes": [f"{true} -> {said}: {count}" for (true, said), count in Counter(
               pair for pair in kept_shapes if pair[0] != pair[1]).most_common(5)]}
    for arm in ("captioner", "captioner_bootstrapped"):
        captions = demo.beam_captions(out / f"seed-{seed}" / arm / "export" / "captioning", splits["caption_test"],
                                      out / "data", "cpu")["predictions"]
        said = [demo.caption_attributes(item["caption"])["shape"] for item in captions]
        row[arm] = {"shape_right": round(100 * sum(a == b for a, b in zip(said, test_shapes)) / len(said), 1),
                    "shape_words_said": dict(Counter(str(word) for word in said).most_common())}
    rows[seed] = row
json.dump(rows, open(sys.argv[2], "w"), indent=1)
