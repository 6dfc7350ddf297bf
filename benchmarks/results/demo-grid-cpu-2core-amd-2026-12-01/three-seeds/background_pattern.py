"""How often the three seeds' CapFilt synthetic captions and both captioners (beam 3, caption test set) name the
background colour and pattern right. From the repository root: PYTHONPATH=. python <this file> OUT_DIR OUT.json
(OUT_DIR: a finished ``blip-fast demo --seeds 3`` folder)."""

import json
import sys
from pathlib import Path

from benchmarks.demo_capfilt_ablation import attribute_report, background_attributes
from blip_fast import demo
from blip_fast.data.synthetic import SyntheticNoisyDataset

out, scale = Path(sys.argv[1]), demo.SCALES["full"]
web = SyntheticNoisyDataset(scale.web_images, 0.0, seed=demo.DATA_SEED, image_size=scale.image_size)
rows = {}
for seed in (0, 1, 2):
    seed_dir = out / f"seed-{seed}"
    scored = [json.loads(line) for line in (seed_dir / "capfilt" / "scored.jsonl").read_text().splitlines()]
    synthetic = [record for record in scored if record["source"] != "web"]
    hits = {"background": 0, "pattern": 0}
    for record in synthetic:
        scene = web.scene(int(Path(record["image"]).stem))
        background, pattern = background_attributes(record["caption"])
        hits["background"] += background == scene.background
        hits["pattern"] += pattern == scene.pattern
    rows[seed] = {"synthetic": {key: 100 * value / len(synthetic) for key, value in hits.items()},
                  **{arm: attribute_report(seed_dir / name, out / "data", scale)
                     for arm, name in (("noisy", "captioner"), ("bootstrapped", "captioner_bootstrapped"))}}
json.dump(rows, open(sys.argv[2], "w"), indent=1)
