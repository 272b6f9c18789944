"""Selectivity (supplement S.4): the category-by-category matrix from unit activations, and the
experiment end to end on the tiny Shapes world."""

import numpy as np
import pandas as pd
import pytest
import torch

from mmn.analysis.selectivity import object_means, own_highest, patch_cover, selectivity_matrix
from mmn.recipes.selectivity import selectivity_experiment
from mmn.config import compose


def test_matrix_row_is_a_categorys_units_column_their_mean_on_a_category():
    activations = pd.DataFrame(
        [{"image_id": i, "category": category, "layer": 0, "unit": unit, "activation": value}
         for i, category, values in [(1, "circle", {7: 2.0, 9: 0.0}), (2, "circle", {7: 4.0, 9: 1.0}),
                                     (3, "star", {7: 1.0, 9: 5.0})]
         for unit, value in values.items()])
    matrix = selectivity_matrix(activations, {"circle": [(0, 7)], "star": [(0, 9), (0, 7)]})
    assert matrix.loc["circle", "circle"] == 3.0 and matrix.loc["circle", "star"] == 1.0
    assert matrix.loc["star", "circle"] == pytest.approx((0.5 + 3.0) / 2)  # units 9 and 7 on circles
    assert matrix.loc["star", "star"] == pytest.approx((5.0 + 1.0) / 2)
    assert np.array_equal(matrix.index, ["circle", "star"])


def test_own_highest_counts_rows_whose_maximum_is_their_own_column():
    matrix = pd.DataFrame([[3.0, 1.0], [2.0, 1.0]], index=["circle", "star"], columns=["circle", "star"])
    assert own_highest(matrix) == 1  # circle's units peak on circles, star's units on circles too


def test_patch_cover_is_the_share_of_each_patch_the_mask_covers():
    mask = np.zeros((4, 6), dtype=bool)  # a 2 x 3 grid of 2 x 2 patches
    mask[:2, :2] = True  # all of patch (0, 0)
    mask[2, 4:] = True  # half of patch (1, 2)
    assert torch.equal(patch_cover(mask, (2, 3)), torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.5]]))


def test_object_means_weight_each_patch_by_its_cover():
    maps = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).expand(1, 2, 2, 2).clone()  # [batch 1, 2 units, 2, 2]
    maps[0, 1] *= 10
    covers = torch.tensor([[[1.0, 0.0], [0.5, 0.0]]])
    assert torch.allclose(object_means(maps, covers), torch.tensor([[2.5 / 1.5, 25 / 1.5]]))
    assert object_means(maps, torch.zeros(1, 2, 2)).isnan().all()  # no object: no value, not a zero


@pytest.fixture(scope="module")
def overrides(analysis_overrides):
    return [*analysis_overrides, "images.batch_size=2", "logger=none", "selectivity.top_units=5", "selectivity.units=3",
            "filter.min_words=0"]


def test_experiment_writes_the_matrix(overrides, tmp_path):
    # a tiny world with more evaluation images, so that every shape has single-object images to split
    summary = selectivity_experiment(compose([*overrides, "world.n_eval=64", f"paths.output_dir={tmp_path}"],
                                             config_name="selectivity"))
    matrix = pd.read_parquet(tmp_path / "selectivity.parquet").set_index("units_of")
    units = pd.read_parquet(tmp_path / "units.parquet")
    assert summary["categories"] == len(matrix.columns) >= 2 and len(matrix) >= 1
    assert units.groupby("category").size().le(3).all() and matrix.notna().all().all()
    activations = pd.read_parquet(tmp_path / "activations.parquet")
    first = units.iloc[0]  # the matrix entry is the mean of the category's units' per-category means
    mine = units[units["category"] == first["category"]]
    on = activations[activations["category"] == matrix.columns[0]].groupby(["layer", "unit"])["activation"].mean()
    expected = np.mean([on[(r.layer, r.unit)] for r in mine.itertuples()])
    assert matrix.loc[first["category"], matrix.columns[0]] == pytest.approx(expected)
    assert (tmp_path / "figures" / "selectivity.png").is_file()
    # beside the paper's statistic, the same units over the object's patches only
    at_object = pd.read_parquet(tmp_path / "selectivity_object.parquet").set_index("units_of")
    on = activations[activations["category"] == matrix.columns[0]].groupby(["layer", "unit"])["activation_object"].mean()
    assert at_object.loc[first["category"], matrix.columns[0]] == pytest.approx(
        np.mean([on[(r.layer, r.unit)] for r in mine.itertuples()]))
    assert activations["activation_object"].notna().all()
    # the world's objects cover a few of the 49 patches, so the two statistics differ
    assert not np.allclose(activations["activation_object"], activations["activation"])
    assert summary["categories_most_active_on_own_object"] == own_highest(at_object)
    assert (tmp_path / "figures" / "selectivity_object.png").is_file()


def test_too_few_images_per_category_is_named(overrides, tmp_path):
    with pytest.raises(ValueError, match="at least 2 single-object images per category"):
        selectivity_experiment(compose([*overrides, f"paths.output_dir={tmp_path}", "images.n=1"],
                                       config_name="selectivity"))
