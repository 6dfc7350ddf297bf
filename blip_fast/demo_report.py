"""The bootstrapping demo's report: a markdown page and a bar chart of before/after numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blip_fast.checkpoint import atomic_write, atomic_write_text

# (label, section, key) of the numbers compared before vs after bootstrapping.
COMPARED = (
    ("image->text R@1", "retrieval", "txt_r1"),
    ("image->text R@5", "retrieval", "txt_r5"),
    ("text->image R@1", "retrieval", "img_r1"),
    ("text->image R@5", "retrieval", "img_r5"),
    ("caption names shape+colour (%)", "captions", "object_accuracy"),
    ("caption BLEU-4 (x100)", "captions", "bleu4"),
    ("caption CIDEr (x100)", "captions", "cider"),
)
_PERCENT_SCALED = {"bleu4", "cider"}  # stored as fractions (CIDEr ~0..10): shown x100 like papers


def _value(result: dict[str, Any], section: str, key: str) -> float:
    value = result[section][key]
    return 100.0 * value if key in _PERCENT_SCALED else value


def comparison_rows(results: dict[str, Any]) -> list[tuple[str, float, float]]:
    return [(label, _value(results["before"], section, key), _value(results["after"], section, key))
            for label, section, key in COMPARED]


def write_report(path: Path, results: dict[str, Any]) -> None:
    scale, filter_quality, capfilt = results["scale"], results["filter"], results["capfilt"]
    lines = [
        "# blip_fast bootstrapping demo",
        "",
        f"{scale['web_images']} noisy web images ({100 * scale['noise_fraction']:.0f}% wrong captions), "
        f"{scale['clean_images']} clean images for fine-tuning, {scale['test_images']} test images "
        f"({scale['references_per_image']} references each); tiny BLIP at 64 px. Retrieval: ITC top-"
        f"{scale['k_test']} reranked by ITM + ITC.",
        "",
        "## CapFilt's filter against the injected noise",
        "",
        "| precision | recall | web captions dropped | noisy web captions | synthetic kept |",
        "|---|---|---|---|---|",
        f"| {filter_quality['precision']:.1f}% | {filter_quality['recall']:.1f}% | {filter_quality['web_dropped']} | "
        f"{filter_quality['web_noisy']} | {filter_quality['synthetic_kept']} of {filter_quality['synthetic_total']} |",
        "",
        f"CapFilt ran at {capfilt.get('images_per_s', float('nan')):.1f} images/s.",
        "",
        "## Pre-trained on noisy web data vs on the bootstrapped data (same steps)",
        "",
        "| metric | noisy | bootstrapped |",
        "|---|---|---|",
        *(f"| {label} | {before:.1f} | {after:.1f} |" for label, before, after in comparison_rows(results)),
        "",
        "## Example captions (test images)",
        "",
        "| reference | noisy pre-training | bootstrapped pre-training |",
        "|---|---|---|",
        *(f"| {before['references'][0]} | {before['caption']} | {after['caption']} |"
          for before, after in zip(results["before"]["examples"][:6], results["after"]["examples"][:6])),
        "",
        "## Time per stage (s)",
        "",
        "| " + " | ".join(results["seconds"]) + " |",
        "|" + "---|" * len(results["seconds"]),
        "| " + " | ".join(f"{seconds:.0f}" for seconds in results["seconds"].values()) + " |",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def write_plot(path: Path, results: dict[str, Any]) -> None:
    """Grouped bars: every compared metric before/after, plus the filter's precision and recall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = comparison_rows(results)
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [4, 1]})
    positions = range(len(rows))
    left.bar([p - 0.2 for p in positions], [before for _, before, _ in rows], 0.4, label="noisy web data")
    left.bar([p + 0.2 for p in positions], [after for _, _, after in rows], 0.4, label="bootstrapped (CapFilt)")
    left.set_xticks(list(positions), [label for label, _, _ in rows], rotation=25, ha="right", fontsize=8)
    left.set_title("pre-trained on ...")
    left.legend()
    right.bar(["precision", "recall"], [results["filter"]["precision"], results["filter"]["recall"]],
              color="tab:green")
    right.set_ylim(0, 100)
    right.set_title("filter vs injected noise (%)")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)
