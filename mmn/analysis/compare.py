"""Side-by-side comparison of finished runs, behind `python experiments/report.py
sweep=multirun/<date>/<time>` or `runs=[dir_a,dir_b]` (the recipe: mmn.recipes.report).

Reads what each run wrote (summary.json, its Hydra overrides, and the tables it has) and writes
into the report folder:
  report.md                 every run's overrides and headline numbers in one table; for runs
                            of analyze.py, the overlap of their top neurons (e.g. grad vs ig)
  figures/ablation_curves.png, figures/layer_distribution.png, figures/iou_per_category.png
                            the runs' curves / bars overlaid, for the runs that have them
It reads files only (offline); with logger=wandb it logs the table and figures as one more run.
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy.stats import spearmanr

from mmn.analysis.figures import plt, save
from mmn.analysis.stats import bootstrap_ci
from mmn.files import write_parquet

HEADLINE_KS = (100, 800)  # the ablation sizes the table shows (every k is in the figure)


def find_runs(sweep: str | Path | None = None, runs=None) -> list[Path]:
    """The run folders of a sweep (its job folders holding summary.json, in job order) or a list."""
    if (sweep is None) == (not runs):
        raise ValueError("report: give either sweep=<multirun folder> or runs=[<run folder>, ...]")
    if sweep is not None:
        sweep = Path(sweep)
        found = sorted((p.parent for p in sweep.glob("*/summary.json")),
                       key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else p.name))
        if not found:
            raise FileNotFoundError(f"sweep={sweep}: no job folder with a summary.json; is the sweep finished?")
        return found
    folders = [Path(run) for run in runs]
    for folder in folders:
        if not (folder / "summary.json").is_file():
            raise FileNotFoundError(f"runs: {folder} holds no summary.json (not a finished run)")
    return folders


def overrides_of(folder: Path) -> list[str]:
    """The run's Hydra overrides, without those that only say where it writes and logs."""
    path = folder / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(path.read_text()) or [] if path.is_file() else []
    return [o for o in overrides if not o.startswith(("hydra.", "paths.", "logger"))]


def run_names(folders: list[Path]) -> list[str]:
    """Each run's overrides that not every run shares ("attribution=ig"), or its folder name when
    it has none; runs alike in all of them are told apart by their folders."""
    overrides = [overrides_of(folder) for folder in folders]
    shared = set.intersection(*map(set, overrides)) if len(folders) > 1 else set()
    names = [",".join(o for o in own if o not in shared) or folder.name for own, folder in zip(overrides, folders)]
    if len(set(names)) < len(names):
        names = [f"{name} ({folder.name})" for name, folder in zip(names, folders)]
    return names


def headline(summary: dict) -> dict:
    """The numbers of a summary worth a column: scalars, with the ablation curve cut to HEADLINE_KS."""
    keep = {}
    for key, value in summary.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or key == "seconds":
            continue
        if key.startswith("ablation/") and not any(key.endswith(f"/k={k}/delta_p") for k in HEADLINE_KS):
            continue
        keep[key] = value
    return keep


def top_neuron_overlap(a: pd.DataFrame, b: pd.DataFrame) -> dict:
    """How much two runs' top neurons agree: the mean over shared images of the Jaccard index of
    their top (layer, unit) sets, and the Jaccard index of all unique units."""
    def units(frame: pd.DataFrame) -> pd.Series:  # image_id -> {(layer, unit)}
        return frame.groupby("image_id").apply(lambda rows: set(zip(rows["layer"], rows["unit"])))

    per_a, per_b = units(a), units(b)
    shared = per_a.index.intersection(per_b.index)
    jaccard = [len(per_a[i] & per_b[i]) / len(per_a[i] | per_b[i]) for i in shared if per_a[i] | per_b[i]]
    all_a, all_b = set().union(*per_a.values), set().union(*per_b.values)
    return {"images": len(shared), "per_image_jaccard": sum(jaccard) / len(jaccard) if jaccard else float("nan"),
            "all_units_jaccard": len(all_a & all_b) / len(all_a | all_b) if all_a | all_b else float("nan")}


def rank_agreement(a: pd.DataFrame, b: pd.DataFrame) -> float:
    """Mean over shared images of the Spearman correlation between two runs' rankings of the units
    in either run's top list (neurons.parquet: each unit at its best patch score); a unit missing
    from one run's list takes that run's last rank there (tied below every listed unit)."""
    def best(frame: pd.DataFrame) -> pd.Series:  # (image_id, layer, unit) -> best score
        return frame.groupby(["image_id", "layer", "unit"])["score"].max()

    best_a, best_b = best(a), best(b)
    correlations = []
    for image_id in best_a.index.get_level_values(0).unique().intersection(best_b.index.get_level_values(0)):
        pair = pd.concat([best_a.loc[image_id], best_b.loc[image_id]], axis=1, keys=["a", "b"])
        ranks = pair.rank(ascending=False, na_option="bottom")  # [units in either list, 2]
        if len(ranks) >= 2 and ranks["a"].nunique() > 1 and ranks["b"].nunique() > 1:
            correlations.append(spearmanr(ranks["a"], ranks["b"]).statistic)
    return float(np.mean(correlations)) if correlations else float("nan")


def ablation_area(ablation: pd.DataFrame, n_units: int, arm: str = "top") -> pd.Series:
    """Per image, the area under its delta p(c) curve over the share of units ablated (trapezoids
    over k / n_units, divided by the largest share: the mean delta p(c) over the range). The more
    negative, the more of p(c) the method's top units carry. -> image_id -> area"""
    rows = ablation[ablation["arm"] == arm]

    def area(image: pd.DataFrame) -> float:
        image = image.sort_values("k")
        share = image["k"].to_numpy() / n_units
        return float(np.trapezoid(image["delta_p"].to_numpy(), share) / share[-1]) if share[-1] > 0 else float("nan")

    return rows.groupby("image_id")[["k", "delta_p"]].apply(area)


def compare_methods(neurons: dict[str, pd.DataFrame], ablation: dict[str, pd.DataFrame], n_units: dict[str, int],
                    resamples: int = 1000, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """How far analysis runs (e.g. a sweep over attribution methods, on the same images) agree on
    what they rank first, and what their top units cause.
    -> (jaccard [runs x runs], spearman [runs x runs], faithfulness: per run the mean ablation area
    of its top units and of random units, each with its bootstrap 95% interval over images)"""
    names = list(neurons)
    jaccard = pd.DataFrame(1.0, index=names, columns=names)
    spearman = pd.DataFrame(1.0, index=names, columns=names)
    for a, b in combinations(names, 2):
        jaccard.loc[a, b] = jaccard.loc[b, a] = top_neuron_overlap(neurons[a], neurons[b])["per_image_jaccard"]
        spearman.loc[a, b] = spearman.loc[b, a] = rank_agreement(neurons[a], neurons[b])
    rows = []
    for name in ablation:
        row = {"run": name}
        for arm in ("top", "random"):
            areas = ablation_area(ablation[name], n_units[name], arm).dropna()
            low, high = bootstrap_ci(areas.to_numpy(), resamples, seed)
            row |= {f"{arm}_area": float(areas.mean()), f"{arm}_area_low": low, f"{arm}_area_high": high}
        rows.append(row | {"images": int(ablation[name]["image_id"].nunique())})
    faithfulness = pd.DataFrame(rows).sort_values("top_area") if rows else pd.DataFrame()
    return jaccard, spearman, faithfulness


def agreement_matrices(jaccard: pd.DataFrame, spearman: pd.DataFrame, path: Path) -> Path:
    """The two agreement matrices side by side, each cell printed."""
    figure, axes = plt.subplots(1, 2, figsize=(2 * (1.1 * len(jaccard) + 2.5), 0.9 * len(jaccard) + 2))
    for axis, (title, matrix) in zip(axes, (("top-unit Jaccard, per image", jaccard),
                                            ("Spearman of unit rankings, per image", spearman))):
        image = axis.imshow(matrix.to_numpy(dtype=float), vmin=0 if matrix is jaccard else -1, vmax=1, cmap="viridis")
        axis.set_xticks(range(len(matrix)), matrix.columns, rotation=30, ha="right", fontsize=7)
        axis.set_yticks(range(len(matrix)), matrix.index, fontsize=7)
        for (i, j), value in np.ndenumerate(matrix.to_numpy(dtype=float)):
            axis.text(j, i, f"{value:.2f}", ha="center", va="center", color="white", fontsize=8)
        axis.set_title(title, fontsize=9)
        figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    return save(figure, path)


def markdown_table(frame: pd.DataFrame) -> str:
    cells = frame.map(lambda v: f"{v:.4g}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)])


def overlaid_ablation_curves(curves: dict[str, pd.DataFrame], path: Path) -> Path:
    """The runs' top and random curves in one axis, each top curve with its bootstrap 95% band
    where the run's table has one (ablation_curves.parquet's delta_p_low / delta_p_high)."""
    figure, axis = plt.subplots(figsize=(7, 4))
    for (name, frame), color in zip(curves.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10):
        for arm, style in (("top", "-"), ("random", ":")):
            rows = frame[frame["arm"] == arm].sort_values("k")
            axis.plot(rows["k"], 100 * rows["delta_p_mean"], style, marker="o", color=color, label=f"{name}: {arm}")
            if arm == "top" and {"delta_p_low", "delta_p_high"} <= set(rows.columns):
                axis.fill_between(rows["k"], 100 * rows["delta_p_low"], 100 * rows["delta_p_high"], color=color,
                                  alpha=0.15, linewidth=0)
    axis.set_xscale("symlog", linthresh=50)
    axis.set_xlabel("units ablated (k)")
    axis.set_ylabel("change in p(c), % (top units: bootstrap 95% band)")
    axis.axhline(0, color="black", linewidth=0.8)
    axis.legend(fontsize=7)
    axis.set_title("Ablation curves, runs overlaid (top units solid, random dotted)")
    return save(figure, path)


def overlaid_layer_distributions(neurons: dict[str, pd.DataFrame], path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(7, 3.5))
    for name, frame in neurons.items():
        counts = frame.drop_duplicates(["layer", "unit"]).groupby("layer").size()
        axis.plot(counts.index, counts.values, marker="o", label=name)
    axis.set_xlabel("layer")
    axis.set_ylabel("unique units among top triples")
    axis.legend(fontsize=7)
    axis.set_title("Layer distribution of top units, runs overlaid")
    return save(figure, path)


def overlaid_iou_bars(per_category: dict[str, pd.DataFrame], path: Path) -> Path:
    table = pd.concat([frame.assign(run=name) for name, frame in per_category.items()])
    top = table[table["arm"] == "top"].pivot(index="category", columns="run", values="mean")
    random = table[table["arm"] == "random"].pivot(index="category", columns="run", values="mean")
    figure, axis = plt.subplots(figsize=(max(6, 0.9 * len(top) + 2), 3.8))
    width = 0.8 / (len(top.columns) + 1)
    for j, run in enumerate(top.columns):
        axis.bar([i + j * width for i in range(len(top))], top[run], width, label=f"{run}: top")
    axis.bar([i + len(top.columns) * width for i in range(len(top))], random.mean(axis=1), width, color="tab:gray",
             label="random units (mean over runs)")
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(top))], top.index, rotation=45, ha="right")
    axis.set_ylabel("IoU with the object mask")
    axis.legend(fontsize=7)
    axis.set_title("Receptive fields, runs side by side")
    return save(figure, path)


def write_report(folders: list[Path], out: Path, resamples: int = 1000, seed: int = 0
                 ) -> tuple[str, pd.DataFrame, list[Path]]:
    """The comparison of `folders` written to out/report.md and out/figures/ (and, for analysis
    runs, out/faithfulness.parquet); bootstrap intervals with `resamples` resamples from `seed`.
    -> (the markdown, the headline table, the figures)"""
    names = run_names(folders)
    summaries = [json.loads((folder / "summary.json").read_text()) for folder in folders]
    table = pd.DataFrame([{"run": name, **headline(summary)} for name, summary in zip(names, summaries)])
    lines = [f"# Comparison of {len(folders)} runs", "",
             *[f"- `{name}`: `{folder}`" for name, folder in zip(names, folders)], "", "## Headline numbers", "",
             markdown_table(table.set_index("run").T.reset_index(names="metric")), ""]

    def tables(file: str) -> dict[str, pd.DataFrame]:  # run name -> its table, for the runs that have it
        return {name: pd.read_parquet(folder / file) for name, folder in zip(names, folders)
                if (folder / file).is_file()}

    neurons, curves = tables("neurons.parquet"), tables("ablation_curves.parquet")
    ious, ablation = tables("iou_per_category.parquet"), tables("ablation.parquet")
    figures_dir = out / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    if len(neurons) >= 2:
        overlap = pd.DataFrame([{"run a": a, "run b": b, **top_neuron_overlap(neurons[a], neurons[b])}
                                for a, b in combinations(neurons, 2)])
        units = {name: summary["analysed_units"] for name, summary in zip(names, summaries) if name in ablation}
        jaccard, spearman, faithfulness = compare_methods(neurons, ablation, units, resamples, seed)
        figures.append(agreement_matrices(jaccard, spearman, figures_dir / "method_agreement.png"))
        write_parquet(faithfulness, out / "faithfulness.parquet")
        lines += ["## Overlap of top neurons", "",
                  ("Jaccard index of the top (layer, unit) sets: per image (mean over the images both runs "
                   "analysed) and of all unique top units."), "", markdown_table(overlap), "",
                  "## Methods compared: what they rank first", "",
                  ("Per image, the Jaccard index of the top (layer, unit) sets and the Spearman correlation of "
                   "the rankings of the units in either top list (a unit missing from one list ranks last "
                   "there); means over the shared images."), "",
                  markdown_table(jaccard.reset_index(names="jaccard")), "",
                  markdown_table(spearman.reset_index(names="spearman")), "",
                  "## Methods compared: what their top units cause", "",
                  ("Area under each image's delta p(c) curve over the share of units ablated, divided by the "
                   "largest share (the mean delta p(c) over the range; more negative: the top units carry "
                   f"more of p(c)), mean over images with its bootstrap 95% interval ({resamples} resamples); "
                   "random units from the same layers beside it. Best first."), "",
                  markdown_table(faithfulness), ""]
    if curves:
        figures.append(overlaid_ablation_curves(curves, figures_dir / "ablation_curves.png"))
    if neurons:
        figures.append(overlaid_layer_distributions(neurons, figures_dir / "layer_distribution.png"))
    if ious:
        figures.append(overlaid_iou_bars(ious, figures_dir / "iou_per_category.png"))
    completeness = tables("completeness.parquet")
    if any(len(frame) for frame in completeness.values()):
        steps = {name: json.loads((folder / "analysis.json").read_text()).get("attribution", {}).get("steps")
                 for name, folder in zip(names, folders) if (folder / "analysis.json").is_file()}
        gaps = pd.DataFrame([{"run": name, "steps": steps.get(name), "images": int(frame["image_id"].nunique()),
                              "relative_gap": float(frame["relative_gap"].mean()),
                              **{f"layer {layer}": float(gap) for layer, gap in
                                 frame.groupby("layer")["relative_gap"].mean().items()}}
                             for name, frame in completeness.items() if len(frame)])
        lines += ["## Integrated gradients: do the steps suffice?", "",
                  ("Completeness: per image and layer, |sum of the scores over every position and unit - "
                   "(y^c(Z) - y^c(0))| / |y^c(Z) - y^c(0)|, on the first batch's images; it shrinks as "
                   "attribution.steps grows (sweep it: -m attribution=ig attribution.steps=5,10,20,50)."), "",
                  markdown_table(gaps), ""]
    if figures:
        lines += ["## Figures", "", *[f"![{path.stem}](figures/{path.name})" for path in figures], ""]
    markdown = "\n".join(lines)
    (out / "report.md").write_text(markdown)
    return markdown, table, figures
