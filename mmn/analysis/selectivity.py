"""Selectivity (supplement S.4): are a category's multimodal neurons most active on its own images?
The recipe is mmn.recipes.selectivity (`python experiments/selectivity.py`).

For images holding one object of a category, each image's `selectivity.top_units` (100)
interpretable top units are found as analyze.py finds them (mmn.recipes.run.TopUnits). Per
category, the `selectivity.units` (20) units that are most often among its images' top units are
its units (chosen on half of its images); their mean activation A over every image-prompt position is then
measured on the other half of every category's images (held out, so the choice does not favour
its own images). Row c of the matrix is category c's units, column d their mean activation on
category d's images; a selective set of units has its largest value on the diagonal.

Beside the paper's statistic, the recipe reports a unit's mean over the object's own patches
(`object_means`: each patch weighted by the share of it the object's mask covers). Where the
object fills a small part of the image, the paper's mean is mostly the background's, so the two
tell apart units that are selective at the object from units that are selective at all.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.nn import functional as F


def split_by_category(images, ids: list[int]) -> dict[str, tuple[list[int], list[int]]]:
    """Per category, its single-object image ids split alternately into (choose, measure)."""
    by_category: dict[str, list[int]] = {}
    for image_id in ids:
        (annotation,) = images.instances.imgToAnns[image_id]  # single-object images: one annotation
        by_category.setdefault(images.category_names[annotation["category_id"]], []).append(image_id)
    return {name: (found[0::2], found[1::2]) for name, found in sorted(by_category.items())}


def patch_cover(mask, grid: tuple[int, int]) -> Tensor:
    """The share of each patch that a bool [H, W] mask covers: -> [grid_h, grid_w] float32. Patch
    (r, c) is the pixel rectangle of mmn.analysis.receptive_fields' squash geometry."""
    mask = torch.as_tensor(np.asarray(mask, dtype=np.float32))
    return F.adaptive_avg_pool2d(mask[None, None], grid)[0, 0]


def object_means(maps: Tensor, covers: Tensor) -> Tensor:
    """Each unit's mean activation over the object's patches, each patch weighted by its cover:
    maps [batch, n_units, gh, gw], covers [batch, gh, gw] -> [batch, n_units] (NaN where a cover is empty)."""
    weights = covers.flatten(1) / covers.flatten(1).sum(dim=1, keepdim=True)  # [batch, gh * gw]; NaN rows if empty
    return torch.einsum("bup,bp->bu", maps.flatten(2), weights)


def selectivity_matrix(activations: pd.DataFrame, units: dict[str, list[tuple[int, int]]],
                       value: str = "activation") -> pd.DataFrame:
    """activations: one row per (image_id, category, layer, unit) of measured images with the
    statistic `value` (the paper's "activation", or "activation_object"); units: each category's
    chosen (layer, unit) pairs.  -> [categories x categories]: row c, column d = the mean over c's
    units of their mean `value` on d's images."""
    mean = activations.groupby(["layer", "unit", "category"])[value].mean()  # per unit and image category
    categories = sorted(units)
    matrix = pd.DataFrame(np.nan, index=categories, columns=sorted(activations["category"].unique()))
    for row in categories:
        for column in matrix.columns:
            values = [mean.get((layer, unit, column), np.nan) for layer, unit in units[row]]
            matrix.loc[row, column] = np.nanmean(values) if values else np.nan
    return matrix


def own_highest(matrix: pd.DataFrame) -> int:
    """How many categories' units are most active on their own category's images."""
    return int(sum(matrix.loc[row].idxmax() == row for row in matrix.index
                   if row in matrix.columns and matrix.loc[row].notna().any()))
