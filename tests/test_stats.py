"""Bootstrap intervals of a mean over images (mmn.analysis.stats): against intervals worked out by
hand from the exact bootstrap distribution of small samples, seeding, NaNs, degenerate samples,
widths, and the table columns they add."""

import math

import numpy as np
import pandas as pd
import pytest

from mmn.analysis.stats import bootstrap_ci, bootstrap_columns, with_intervals


def test_small_samples_give_the_quantiles_of_their_exact_bootstrap_distribution():
    # [0, 0, 0, 1]: a resample's mean is Binomial(4, 1/4) / 4, P = .316, .422, .211, .047, .004 for
    # 0, .25, .5, .75, 1; P(mean <= .5) = .949 < .975 < P(mean <= .75) = .996, P(0) = .316 > .025
    assert bootstrap_ci([0.0, 0.0, 0.0, 1.0], 4000, seed=0) == (0.0, 0.75)
    # [0, 1]: the mean is 0, .5 or 1 with P = 1/4, 1/2, 1/4; the 30% and 70% quantiles are both .5
    assert bootstrap_ci([0.0, 1.0], 1000, seed=0) == (0.0, 1.0)
    assert bootstrap_ci([0.0, 1.0], 1000, seed=0, level=0.4) == (0.5, 0.5)


def test_a_large_sample_matches_the_normal_interval():
    values = np.random.default_rng(1).normal(2.0, 3.0, size=400)
    half = 1.96 * values.std() / math.sqrt(len(values))  # 0.29
    low, high = bootstrap_ci(values, 4000, seed=0)
    assert low == pytest.approx(values.mean() - half, abs=0.03)
    assert high == pytest.approx(values.mean() + half, abs=0.03)


def test_the_same_seed_gives_the_same_interval_and_it_holds_the_mean():
    values = np.random.default_rng(2).exponential(size=30)
    low, high = bootstrap_ci(values, 1000, seed=7)
    assert (low, high) == bootstrap_ci(list(values), 1000, seed=7)
    assert bootstrap_ci(values, 1000, seed=8) != (low, high)
    assert low < values.mean() < high


def test_constant_samples_have_zero_width_and_more_images_narrow_the_interval():
    low, high = bootstrap_ci([0.1] * 7, 500, seed=0)
    assert low == high == pytest.approx(0.1)
    rng = np.random.default_rng(3)
    widths = [np.subtract(*bootstrap_ci(rng.normal(size=n), 1000, seed=0)[::-1]) for n in (10, 100, 1000)]
    assert widths[0] > widths[1] > widths[2] > 0


def test_nans_are_dropped_and_fewer_than_two_values_give_no_interval():
    assert bootstrap_ci([0.0, np.nan, 0.0, 0.0, 1.0], 4000, seed=0) == (0.0, 0.75)
    for values in ([], [3.0], [3.0, np.nan]):
        assert all(math.isnan(end) for end in bootstrap_ci(values, 100, seed=0))
    with pytest.raises(ValueError, match="resamples=0 must be a whole number >= 1"):
        bootstrap_ci([1.0, 2.0], 0, seed=0)
    with pytest.raises(ValueError, match="level=1.5"):
        bootstrap_ci([1.0, 2.0], 10, seed=0, level=1.5)


def test_interval_columns_go_beside_each_metrics_standard_error():
    rows = pd.DataFrame({"kind": ["a"] * 4 + ["b"] * 2, "x": [0.0, 0.0, 0.0, 1.0, 5.0, 5.0],
                         "y": [0.0, 1.0, 0.0, 1.0, 1.0, np.nan]})
    table = pd.DataFrame({"kind": ["b", "a"], "x_mean": [5.0, 0.25], "x_sem": [0.0, 0.25], "y_mean": [1.0, 0.5],
                          "y_sem": [np.nan, 0.29], "images": [2, 4]})
    out = with_intervals(table, rows, "kind", ["x", "y"], 4000, seed=0)
    assert list(out.columns) == ["kind", "x_mean", "x_sem", "x_low", "x_high", "y_mean", "y_sem", "y_low", "y_high",
                                 "images"]
    pd.testing.assert_frame_equal(out[table.columns], table)  # the table's own columns and rows unchanged
    assert out.set_index("kind").loc["a", ["x_low", "x_high"]].tolist() == [0.0, 0.75]
    assert out.set_index("kind").loc["b", ["x_low", "x_high"]].tolist() == [5.0, 5.0]
    assert out.set_index("kind").loc["b", ["y_low", "y_high"]].isna().all()  # one image with a score
    grouped = bootstrap_columns(rows, ["kind"], ["x"], 4000, seed=0)
    assert grouped.columns.tolist() == ["kind", "x_low", "x_high"] and grouped["kind"].tolist() == ["a", "b"]
