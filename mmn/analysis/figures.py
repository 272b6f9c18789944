"""The analysis figures (PNG): ablation curves (paper Figure 6), the layer distribution of top
units (supplement S.6), the score distributions of decoded image prompts (Figure 3) and the
receptive-field IoUs per category (Figure 5)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

ARM_STYLE = {"top": ("multimodal neurons (top units)", "tab:red"),
             "top_interpretable": ("interpretable top units", "tab:orange"),
             "random": ("random units, same layers", "tab:gray")}


def ablation_curves(curves: pd.DataFrame, path: Path, title: str = "") -> Path:
    """curves: one row per (arm, k) with its share of the units and the mean and standard error of
    delta_p and bertscore, and optionally their bootstrap intervals (<column>_low, <column>_high):
    each arm's band is the interval where the table has one, else mean ± standard error."""
    intervals = all(f"{c}_{end}" in curves for c in ("delta_p", "bertscore") for end in ("low", "high"))
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for arm, rows in curves.groupby("arm", sort=False):
        label, color = ARM_STYLE.get(arm, (arm, None))
        rows = rows.sort_values("k")
        for axis, column, scale in ((left, "delta_p", 100.0), (right, "bertscore", 1.0)):
            mean = rows[f"{column}_mean"] * scale
            if intervals:  # no interval (fewer than 2 images): no band
                low, high = rows[f"{column}_low"] * scale, rows[f"{column}_high"] * scale
            else:
                error = rows[f"{column}_sem"].fillna(0) * scale
                low, high = mean - error, mean + error
            axis.plot(rows["k"], mean, marker="o", label=label, color=color)
            axis.fill_between(rows["k"], low, high, alpha=0.2, color=color, linewidth=0)
    ks = sorted(curves["k"].unique())
    for axis in (left, right):
        axis.set_xscale("symlog", linthresh=50)
        shares = curves.drop_duplicates("k").set_index("k")["share"]
        axis.set_xticks(ks, [f"{k}\n{shares[k]:.1%}" for k in ks], rotation=45, fontsize=7)
        axis.minorticks_off()
        axis.set_xlabel("units ablated (k, and share of the analysed units)")
        axis.grid(alpha=0.3)
    band = "bootstrap 95% CI" if intervals else "± s.e."
    left.set_ylabel(f"change in p(c), % (mean, {band})")
    right.set_ylabel(f"BERTScore F1, ablated vs original caption\n(mean, {band})")
    left.axhline(0, color="black", linewidth=0.8)
    left.legend(fontsize=8)
    figure.suptitle(title or "Ablating units ordered by attribution score")
    return save(figure, path)


def layer_distribution(neurons: pd.DataFrame, n_layers: int, path: Path, title: str = "") -> Path:
    """Unique (layer, unit) pairs among every image's top triples, counted per layer."""
    unique = neurons.drop_duplicates(["layer", "unit"])
    counts = unique.groupby("layer").size().reindex(range(n_layers), fill_value=0)
    interpretable = unique[unique["interpretable"]].groupby("layer").size().reindex(range(n_layers), fill_value=0)
    figure, axis = plt.subplots(figsize=(max(4, 0.35 * n_layers + 2), 3.5))
    axis.bar(counts.index, counts.values, color="tab:blue", label="top units")
    axis.bar(interpretable.index, interpretable.values, color="tab:orange", label="interpretable")
    axis.set_xlabel("layer")
    axis.set_ylabel("unique units among top triples")
    axis.set_xticks(range(n_layers))
    axis.legend(fontsize=8)
    axis.set_title(title or "Layer distribution of top units (S.6)")
    return save(figure, path)


KIND_STYLE = {"prompt": ("image prompts, decoded", "tab:blue"), "random": ("random vectors, decoded", "tab:gray"),
              "other_prompt": ("another image's prompts, decoded", "tab:purple"),
              "noun": ("nouns of the human captions", "tab:green"), "caption": ("generated captions", "tab:red")}


def score_distributions(per_image: pd.DataFrame, path: Path, title: str = "", table: pd.DataFrame | None = None
                        ) -> Path:
    """Histograms per kind of text of the per-image mean CLIPScore and BERTScore, and of the best
    CLIPScore per image (Figure 3 shows the mean over patches and the max per image). With `table`
    (Table 2: kind, <metric>_mean and, optionally, <metric>_low / <metric>_high), each kind's mean
    over images is marked above its histogram, with its interval as a horizontal error bar."""
    panels = (("clipscore", "CLIPScore, mean per image"), ("clipscore_max", "CLIPScore, max per image"),
              ("bertscore", "BERTScore F1 vs human captions, mean per image"))
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for axis, (column, label) in zip(axes, panels):
        for kind, rows in per_image.groupby("kind", sort=False):
            name, color = KIND_STYLE.get(kind, (kind, None))
            axis.hist(rows[column].dropna(), bins=20, alpha=0.5, color=color, label=name)
        if table is not None and f"{column}_mean" in table:
            mean_markers(axis, table, column)
        axis.set_xlabel(label)
        axis.set_ylabel("images")
    axes[0].legend(fontsize=8)
    figure.suptitle(title or "Decoded image prompts (Figure 3)")
    return save(figure, path)


def mean_markers(axis, table: pd.DataFrame, column: str) -> None:
    """Each row's (kind's) mean of `column` as a point above the histograms, one height per kind,
    with <column>_low .. <column>_high as its horizontal error bar where the table has them."""
    top, intervals = axis.get_ylim()[1], False
    for j, row in enumerate(table.to_dict("records")):
        mean, low, high = row[f"{column}_mean"], row.get(f"{column}_low"), row.get(f"{column}_high")
        if not np.isfinite(mean):
            continue
        error = None
        if low is not None and high is not None and np.isfinite(low) and np.isfinite(high):
            error, intervals = [[max(mean - low, 0.0)], [max(high - mean, 0.0)]], True
        axis.errorbar([mean], [top * (1.04 + 0.05 * j)], xerr=error, fmt="o", markersize=4, capsize=3,
                      color=KIND_STYLE.get(row["kind"], (None, None))[1])
    axis.set_ylim(top=top * (1.08 + 0.05 * len(table)))
    axis.set_title("points: mean over images" + (", bars: bootstrap 95% CI" if intervals else ""), fontsize=8)


def iou_bars(per_category: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Mean IoU (± s.e.) of receptive fields with the object mask per category, top units beside
    random units from the same layers (Figure 5). per_category: category, arm, mean, sem."""
    means = per_category.pivot(index="category", columns="arm", values="mean")
    errors = per_category.pivot(index="category", columns="arm", values="sem").fillna(0)
    figure, axis = plt.subplots(figsize=(max(5, 0.7 * len(means) + 2), 3.8))
    width = 0.4
    for offset, arm in ((-width / 2, "top"), (width / 2, "random")):
        if arm in means:
            label, color = ARM_STYLE[arm]
            axis.bar([i + offset for i in range(len(means))], means[arm], width, yerr=errors[arm], color=color,
                     label=label, capsize=2)
    axis.set_xticks(range(len(means)), means.index, rotation=45, ha="right")
    axis.set_ylabel("IoU with the object mask")
    axis.legend(fontsize=8)
    axis.set_title(title or "Receptive fields vs object masks (Figure 5)")
    return save(figure, path)


def selectivity_figure(matrix: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Row c: category c's units; column d: their mean activation on category d's images (S.4)."""
    figure, axis = plt.subplots(figsize=(0.6 * len(matrix.columns) + 3, 0.5 * len(matrix) + 2))
    image = axis.imshow(matrix.to_numpy(dtype=float), cmap="viridis")
    axis.set_xticks(range(len(matrix.columns)), matrix.columns, rotation=45, ha="right")
    axis.set_yticks(range(len(matrix)), matrix.index)
    axis.set_xlabel("images of category")
    axis.set_ylabel("units of category")
    for (row, column), value in np.ndenumerate(matrix.to_numpy(dtype=float)):
        if np.isfinite(value):
            axis.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white")
    figure.colorbar(image, ax=axis, label="mean activation A")
    axis.set_title(title or "Selectivity of each category's multimodal neurons (S.4)")
    return save(figure, path)


def save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
