"""How often the CapFilt synthetic captions that the filter kept, and those it dropped, name each attribute of their
web image right: what the filter checks. From the repository root:
PYTHONPATH=. python <this file> OUT_DIR OUT.json (OUT_DIR: a finished ``blip-fast demo --seeds 3`` folder)."""

import json
import sys
from pathlib import Path

from benchmarks.demo_capfilt_ablation import _web_scenes, background_attributes
from blip_fast import demo

out = Path(sys.argv[1])
scenes = _web_scenes(out, demo.SCALES["full"])
rows = {}
for seed in (0, 1, 2):
    scored = (out / f"seed-{seed}" / "capfilt" / "scored.jsonl").read_text().splitlines()
    groups = {"kept": [], "dropped": []}
    for record in map(json.loads, scored):
        if record["source"] == "web":
            continue
        scene = scenes[record["image"]]
        named = demo.caption_attributes(record["caption"])
        background, pattern = background_attributes(record["caption"])
        groups["kept" if record["kept"] else "dropped"].append({
            "colour": named["colour"] == scene.color, "shape": named["shape"] == scene.shape,
            "count": named["count"] == scene.count, "position": named["position"] == scene.position,
            "background": background == scene.background, "pattern": pattern == scene.pattern})
    rows[seed] = {group: {"captions": len(hits), **{name: round(100 * sum(hit[name] for hit in hits) / len(hits), 1)
                                                    for name in hits[0]}}
                  for group, hits in groups.items()}
json.dump(rows, open(sys.argv[2], "w"), indent=1)
