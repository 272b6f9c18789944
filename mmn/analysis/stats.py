"""Uncertainty the paper does not give: percentile-bootstrap confidence intervals of a mean over
images, for the ablation curves (Figure 6) and Tables 1 and 2.

    low, high = bootstrap_ci(per_image_scores, resamples=1000, seed=0)      # 95% by default
    table = with_intervals(table, per_image, "kind", ["clipscore", "bertscore"], 1000, 0)

What is resampled is the images: each resample draws as many images as there are, with
replacement, and takes their mean; the interval is the (1 - level) / 2 and (1 + level) / 2
quantiles of those means. The generator is numpy's, seeded by `seed` alone, so the same values and
seed give the same interval, and two samples of the same size (the same images in the same order,
e.g. two arms or two rows of a table) are resampled with the same draws of images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd


def bootstrap_ci(values: Sequence[float] | np.ndarray | pd.Series, resamples: int, seed: int,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `values` (one value per image; NaNs dropped):
    `resamples` resamples of the images with replacement, all drawn at once as a
    [resamples, n] index matrix from numpy.random.default_rng(seed). Fewer than 2 values: (nan, nan).
    -> (low, high)"""
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 1:
        raise ValueError(f"bootstrap_ci: resamples={resamples!r} must be a whole number >= 1")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_ci: level={level!r} must be between 0 and 1")
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    if len(x) < 2:
        return math.nan, math.nan
    index = np.random.default_rng(seed).integers(0, len(x), size=(int(resamples), len(x)))  # [resamples, n]
    means = x[index].mean(axis=1)  # [resamples]
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def bootstrap_columns(frame: pd.DataFrame, by: str | list[str], columns: Sequence[str], resamples: int, seed: int,
                      level: float = 0.95) -> pd.DataFrame:
    """bootstrap_ci of each of `columns` within each group of `frame` (its rows: images), every
    group with the same seed. -> one row per group: the `by` columns, then <column>_low and
    <column>_high for each column, in the order groupby gives."""
    by = [by] if isinstance(by, str) else list(by)
    rows = []
    for key, group in frame.groupby(by, sort=False):
        row = dict(zip(by, key))
        for column in columns:
            row[f"{column}_low"], row[f"{column}_high"] = bootstrap_ci(group[column], resamples, seed, level)
        rows.append(row)
    return pd.DataFrame(rows, columns=[*by, *(f"{c}_{end}" for c in columns for end in ("low", "high"))])


def with_intervals(table: pd.DataFrame, rows: pd.DataFrame, by: str | list[str], metrics: Sequence[str],
                   resamples: int, seed: int, level: float = 0.95) -> pd.DataFrame:
    """`table` (one row per group of `rows` by the `by` columns, which it holds, and a <metric>_sem
    column per metric) with each metric's bootstrap interval over the group's rows inserted after
    its _sem column: <metric>_mean, <metric>_sem, <metric>_low, <metric>_high. The other columns,
    their values and the row order are kept."""
    by = [by] if isinstance(by, str) else list(by)
    merged = table.merge(bootstrap_columns(rows, by, metrics, resamples, seed, level), on=by, how="left")
    order = []
    for column in table.columns:
        order.append(column)
        order += [f"{m}_{end}" for m in metrics if column == f"{m}_sem" for end in ("low", "high")]
    return merged[order]
