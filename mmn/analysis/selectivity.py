"""Selectivity (supplement S.4): are a category's multimodal neurons most active on its own images?
The recipe is mmn.recipes.selectivity (`python experiments/selectivity.py`).

For images holding one object of a category, each image's `selectivity.top_units` (100)
interpretable top units are found as analyze.py finds them (mmn.recipes.run.TopUnits). Per
category, the `selectivity.units` (20) units that are most often among its images' top units are
its units (chosen on half of its images); their mean activation A over every image-prompt position is then
measured on the other half of every category's images (held out, so the choice does not favour
its own images). Row c of the matrix is category c's units, column d their mean activation on
category d's images; a selective set of units has its largest value on the diagonal.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def split_by_category(images, ids: list[int]) -> dict[str, tuple[list[int], list[int]]]:
    """Per category, its single-object image ids split alternately into (choose, measure)."""
    by_category: dict[str, list[int]] = {}
    for image_id in ids:
        (annotation,) = images.instances.imgToAnns[image_id]  # single-object images: one annotation
        by_category.setdefault(images.category_names[annotation["category_id"]], []).append(image_id)
    return {name: (found[0::2], found[1::2]) for name, found in sorted(by_category.items())}


def selectivity_matrix(activations: pd.DataFrame, units: dict[str, list[tuple[int, int]]]) -> pd.DataFrame:
    """activations: one row per (image_id, category, layer, unit, activation) of measured images;
    units: each category's chosen (layer, unit) pairs.  -> [categories x categories]: row c, column d =
    the mean over c's units of their mean activation on d's images."""
    mean = activations.groupby(["layer", "unit", "category"])["activation"].mean()  # per unit and image category
    categories = sorted(units)
    matrix = pd.DataFrame(np.nan, index=categories, columns=sorted(activations["category"].unique()))
    for row in categories:
        for column in matrix.columns:
            values = [mean.get((layer, unit, column), np.nan) for layer, unit in units[row]]
            matrix.loc[row, column] = np.nanmean(values) if values else np.nan
    return matrix
