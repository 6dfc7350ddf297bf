"""The bootstrapping demo's results over seeds: mean, standard deviation and per-seed values of every metric, a
markdown report and a bar chart with error bars."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from blip_fast.atomic_files import atomic_write, atomic_write_text
from blip_fast.demo import CAPTION_ATTRIBUTES

# (label, section, key) of the numbers compared before vs after bootstrapping.
COMPARED = (
    ("image->text R@1", "retrieval", "txt_r1"),
    ("image->text R@5", "retrieval", "txt_r5"),
    ("text->image R@1", "retrieval", "img_r1"),
    ("text->image R@5", "retrieval", "img_r5"),
    ("caption names colour (%)", "captions", "names_colour"),  # what the tiny model sees
    ("caption names shape+colour (%)", "captions", "object_accuracy"),
    ("caption BLEU-4 (x100)", "captions", "bleu4"),
    ("caption CIDEr (x100)", "captions", "cider"),
)
_PERCENT_SCALED = {"bleu4", "cider"}  # stored as fractions (CIDEr ~0..10): shown x100 like papers
#: The filter's numbers summarised over seeds (see ``demo._filter_quality``).
FILTER_KEYS = ("precision", "recall", "web_dropped", "web_noisy", "synthetic_kept", "synthetic_total")
EXAMPLES_SHOWN = 6


def _value(result: dict[str, Any], section: str, key: str) -> float:
    value = result[section][key]
    return 100.0 * value if key in _PERCENT_SCALED else value


def spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (None for one value) and the values themselves."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "per_seed": values}


def summarize(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """What ``results.json`` holds, from each seed's results (``demo.run_seed``): every compared metric before,
    after and their difference (paired by seed) with its spread, and whether the gain is clear (mean > 2 std; None
    for one seed); how often the captions name each attribute right; the filter's precision and recall likewise;
    the first seed's example captions."""
    first = per_seed[0]
    compared = []
    for label, section, key in COMPARED:
        noisy = [_value(result["before"], section, key) for result in per_seed]
        bootstrapped = [_value(result["after"], section, key) for result in per_seed]
        gain = spread([after - before for before, after in zip(noisy, bootstrapped)])
        compared.append({"metric": label, "noisy": spread(noisy), "bootstrapped": spread(bootstrapped), "gain": gain,
                         "clear_gain": None if gain["std"] is None else gain["mean"] > 2 * gain["std"]})
    named = [{"attribute": attribute, **{model: spread([result[when]["captions"][f"names_{attribute}"]
                                                         for result in per_seed])
                                          for model, when in (("noisy", "before"), ("bootstrapped", "after"))},
              "synthetic": spread([result["filter"]["synthetic_names"][attribute] for result in per_seed])}
             for attribute in CAPTION_ATTRIBUTES]
    return {
        "seeds": [result["seed"] for result in per_seed], "threads": first["threads"], "cpu": first["cpu"],
        "torch": first["torch"], "scale": first["scale"],
        "vision_init": {label: spread([result["vision_init"]["held_out_accuracy"][label] for result in per_seed])
                        for label in first["vision_init"]["held_out_accuracy"]},
        "compared": compared, "caption_attributes": named,
        "filter": {key: spread([result["filter"][key] for result in per_seed]) for key in FILTER_KEYS},
        "examples": [{"references": before["references"], "noisy": before["caption"], "bootstrapped": after["caption"]}
                     for before, after in zip(first["before"]["examples"], first["after"]["examples"])],
    }


def _show(stats: dict[str, Any], digits: int = 1, sign: bool = False) -> str:
    text = f"{stats['mean']:{'+' if sign else ''}.{digits}f}"
    return text if stats["std"] is None else f"{text} ± {stats['std']:.{digits}f}"


def vision_init_sentence(images: int, accuracies: dict[str, str]) -> str:
    """How a demo's ViT started, for its report: ``accuracies`` maps each classifier label to its held-out accuracy,
    formatted."""
    return (f"its ViT started from a classifier trained on {images} labelled scenes of its own (BLIP's: ImageNet), "
            "which names the " + " and the ".join(f"{label} of {accuracy}%" for label, accuracy in accuracies.items())
            + " of held-out scenes")


def _numerics(cpu: dict[str, Any]) -> str:
    """How the CPU libraries ran (``determinism.cpu_numerics``), in words."""
    vendor = f", on a {cpu['cpu_vendor']} CPU" if cpu.get("cpu_vendor") else ""
    if cpu["mkl_cbwr"] or cpu["onednn_max_cpu_isa"]:
        return (f"CPU libraries capped at {cpu['aten_capability']} (ATen), {cpu['mkl_cbwr'] or 'uncapped'} (MKL), "
                f"{cpu['onednn_max_cpu_isa'] or 'uncapped'} (oneDNN){vendor}")
    return f"CPU libraries uncapped (ATen {cpu['aten_capability']}: numbers of this instruction set){vendor}"


def write_report(path: Path, results: dict[str, Any], timing: dict[str, Any]) -> None:
    scale, filter_quality, seeds = results["scale"], results["filter"], results["seeds"]
    several = len(seeds) > 1
    over = (f"mean ± standard deviation over seeds {', '.join(map(str, seeds))} (per-seed values in results.json)"
            if several else f"seed {seeds[0]}")
    gain_header, gain_rule = (" | clear (> 2 std) |", "---|") if several else (" |", "")
    lines = [
        "# blip_fast bootstrapping demo",
        "",
        f"{scale['web_images']} noisy web images ({100 * scale['noise_fraction']:.0f}% wrong captions), "
        f"{scale['clean_images']} clean images for fine-tuning, {scale['test_images']} retrieval and "
        f"{scale['caption_test_images']} caption test images ({scale['references_per_image']} references each); "
        f"tiny BLIP at {scale['image_size']} px, "
        + vision_init_sentence(scale["vision_init_images"],
                               {label: _show(accuracy) for label, accuracy in results["vision_init"].items()})
        + ". "
        f"Retrieval: ITC top-{scale['k_test']} reranked by ITM + ITC. Numbers: {over}; "
        f"{results['threads']} torch thread(s) per run, torch {results['torch']}, {_numerics(results['cpu'])}.",
        "",
        "## CapFilt's filter against the injected noise",
        "",
        "| precision (%) | recall (%) | web captions dropped | noisy web captions | synthetic kept |",
        "|---|---|---|---|---|",
        "| " + " | ".join(_show(filter_quality[key], digits) for key, digits in
                         (("precision", 1), ("recall", 1), ("web_dropped", 0), ("web_noisy", 0), ("synthetic_kept", 0)))
        + f" of {filter_quality['synthetic_total']['mean']:.0f} |",
        "",
        "## Pre-trained on noisy web data vs on the bootstrapped data (same steps)",
        "",
        "| metric | noisy | bootstrapped | gain" + gain_header,
        "|---|---|---|---|" + gain_rule,
        *(f"| {row['metric']} | {_show(row['noisy'])} | {_show(row['bootstrapped'])} | {_show(row['gain'], sign=True)}"
          + (f" | {'yes' if row['clear_gain'] else 'no'} |" if several else " |") for row in results["compared"]),
        "",
        "What the captions name right (% of caption test images; a uniform guess: "
        + ", ".join(f"{attribute} {chance:.1f}" for attribute, chance in CAPTION_ATTRIBUTES.items()) + "):",
        "",
        "| attribute | noisy | bootstrapped | CapFilt's synthetic captions (of the web images) |",
        "|---|---|---|---|",
        *(f"| {row['attribute']} | {_show(row['noisy'])} | {_show(row['bootstrapped'])} | {_show(row['synthetic'])} |"
          for row in results["caption_attributes"]),
        "",
        f"## Example captions (caption test images, seed {seeds[0]})",
        "",
        "| reference | noisy pre-training | bootstrapped pre-training |",
        "|---|---|---|",
        *(f"| {example['references'][0]} | {example['noisy']} | {example['bootstrapped']} |"
          for example in results["examples"][:EXAMPLES_SHOWN]),
        "",
        *_timing_lines(timing),
    ]
    atomic_write_text(path, "\n".join(lines))


def _stage_time(times: dict[str, float]) -> str:
    return f"{times['seconds']:.0f} / {times['cpu_seconds']:.0f}"


def _timing_lines(timing: dict[str, Any]) -> list[str]:
    per_seed = timing["per_seed"]
    stages = list(next(iter(per_seed.values()))["stages"])
    load_start, load_end = (", ".join(f"{value:.1f}" for value in timing[key])
                            for key in ("load_average_start", "load_average_end"))
    return [
        "## Time",
        "",
        f"{timing['wall_seconds'] / 60:.1f} min wall for {len(per_seed)} seed(s), {timing['jobs']} at a time with "
        f"{timing['threads']} torch thread(s) each, on {timing['cores']} cores ({timing['cpu_seconds'] / 60:.1f} CPU "
        f"min). Load average (1, 5, 15 min) {load_start} at the start, {load_end} at the end: other work on the "
        "machine stretches wall time. Per seed and stage, wall / CPU seconds (a stage finished by an earlier "
        "invocation keeps that invocation's times):",
        "",
        "| seed | " + " | ".join(stages) + " |",
        "|---|" + "---|" * len(stages),
        *(f"| {seed} | " + " | ".join(_stage_time(times["stages"][stage]) for stage in stages) + " |"
          for seed, times in per_seed.items()),
        "",
    ]


def write_plot(path: Path, results: dict[str, Any]) -> None:
    """Grouped bars (mean, error bar = standard deviation, dots = seeds) of every compared metric before/after,
    plus the filter's precision and recall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["compared"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [4, 1]})

    def bars(axis, positions, stats_list, label, color):
        means = [stats["mean"] for stats in stats_list]
        errors = [stats["std"] or 0.0 for stats in stats_list]
        axis.bar(positions, means, 0.4, yerr=errors, capsize=3, label=label, color=color)
        for position, stats in zip(positions, stats_list):
            axis.scatter([position] * len(stats["per_seed"]), stats["per_seed"], s=8, color="black", zorder=3)

    positions = range(len(rows))
    bars(left, [p - 0.2 for p in positions], [row["noisy"] for row in rows], "noisy web data", "tab:blue")
    bars(left, [p + 0.2 for p in positions], [row["bootstrapped"] for row in rows], "bootstrapped (CapFilt)",
         "tab:orange")
    left.set_xticks(list(positions), [row["metric"] for row in rows], rotation=25, ha="right", fontsize=8)
    seeds = results["seeds"]
    left.set_title(f"pre-trained on ... ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}: mean, std, per seed)")
    left.legend()
    bars(right, [0, 1], [results["filter"]["precision"], results["filter"]["recall"]], None, "tab:green")
    right.set_xticks([0, 1], ["precision", "recall"])
    right.set_ylim(0, 100)
    right.set_title("filter vs injected noise (%)")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)
