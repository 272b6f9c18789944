"""`python experiments/prompt_decoding.py` end to end on the tiny Shapes world: every kind of text
scored for every image, Table 2 and the KS tests from the per-image scores, resuming, bad input."""

import json

import pandas as pd
import pytest

from mmn.analysis.prompts import table2
from mmn.recipes.prompt_decoding import prompt_decoding
from mmn.config import compose

N_IMAGE = 16  # the tiny world: 64 px images, 16 px patches


@pytest.fixture(scope="module")
def overrides(analysis_overrides):
    return [*analysis_overrides, "images.n=4", "images.batch_size=2", "logger=none"]


def run(overrides, run_dir, *extra):
    return prompt_decoding(compose([*overrides, f"paths.output_dir={run_dir}", *extra], config_name="prompt_decoding"))


@pytest.fixture(scope="module")
def finished(overrides, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("prompts")
    return run_dir, run(overrides, run_dir)


def test_every_kind_is_scored_for_every_image(finished):
    run_dir, summary = finished
    scores = pd.read_parquet(run_dir / "scores.parquet")
    counts = scores.groupby(["kind", "image_id"]).size().unstack(0)
    assert len(counts) == summary["images"] == 4
    assert (counts["prompt"] == N_IMAGE).all() and (counts["random"] == N_IMAGE).all()  # one text per image prompt
    assert (counts["other_prompt"] == N_IMAGE).all()
    texts = scores.set_index(["kind", "image_id", "position"])["text"].sort_index()
    first, second = sorted(scores["image_id"].unique())[:2]  # one batch of two: each gets the other's prompts
    assert texts["other_prompt", first].equals(texts["prompt", second])
    assert texts["other_prompt", second].equals(texts["prompt", first])
    assert (counts["caption"] == 1).all() and (counts["noun"] >= 1).all()
    decoded = scores[scores["kind"].isin(["prompt", "random"])]
    assert decoded["text"].str.count(", ").eq(4).all()  # 5 tokens, comma-separated
    assert scores["clipscore"].between(0, 100).all() and scores["bertscore"].between(-1, 1).all()
    table = pd.read_parquet(run_dir / "table2.parquet")
    assert list(table["kind"]) == ["prompt", "random", "other_prompt", "noun", "caption"]
    assert summary["prompt/clipscore"] == pytest.approx(table.loc[0, "clipscore_mean"])
    assert summary["prompt/distinct_texts"] == scores.loc[scores["kind"] == "prompt", "text"].nunique()
    assert 1 <= summary["random/distinct_texts"] <= 4 * N_IMAGE
    for metric in ("clipscore", "bertscore"):  # 4 images: a bootstrap interval of each row's mean
        assert (table[f"{metric}_low"] <= table[f"{metric}_mean"] + 1e-9).all()
        assert (table[f"{metric}_mean"] <= table[f"{metric}_high"] + 1e-9).all()
    for test in ("prompt_vs_random", "prompt_vs_other_prompt"):
        assert 0 <= summary[f"ks/{test}/D"] <= 1 and 0 <= summary[f"ks/{test}/p"] <= 1
    assert (run_dir / "figures" / "prompt_decoding.png").is_file()
    assert json.loads((run_dir / "summary.json").read_text())["images"] == 4


def test_a_rerun_resumes_to_the_same_scores(overrides, finished):
    run_dir, _ = finished
    before = pd.read_parquet(run_dir / "scores.parquet")
    (run_dir / "parts" / "scores" / "000001.parquet").unlink()  # as if killed during the second batch
    run(overrides, run_dir)
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "scores.parquet"), before)


def test_table2_is_the_mean_over_images_of_per_image_means():
    scores = pd.DataFrame({"kind": ["prompt"] * 5 + ["random"] * 4 + ["noun"] * 4,
                           "image_id": [1, 1, 2, 3, 4] + [1, 2, 3, 4] * 2,
                           "clipscore": [10.0, 20.0, 40.0, 50.0, 60.0] + [0.0, 10.0, 20.0, 30.0]
                           + [70.0, 80.0, 90.0, 95.0],
                           "bertscore": [0.1] * 13})
    _, table, tests = table2(pd.concat([scores] * 2))  # repeated rows do not change the means
    assert table.set_index("kind").loc["prompt", "clipscore_mean"] == pytest.approx((15 + 40 + 50 + 60) / 4)
    assert table.set_index("kind").loc["random", "clipscore_mean"] == pytest.approx(15)
    assert tests["prompt_vs_noun"]["statistic"] == 1.0 and tests["prompt_vs_noun"]["n_a"] == 4  # per image, separated
    assert tests["prompt_vs_random"]["statistic"] == pytest.approx(0.75)
    assert tests["noun_vs_random"]["statistic"] == 1.0  # nouns 70-95, random 0-30 per image
    assert "prompt_vs_other_prompt" not in tests  # not scored here
    other = scores[scores["kind"] == "prompt"].assign(kind="other_prompt", clipscore=lambda rows: rows["clipscore"] - 30)
    tests = table2(pd.concat([scores, other]))[2]  # per image 15, 40, 50, 60 against -15, 10, 20, 30
    assert tests["prompt_vs_other_prompt"]["statistic"] == pytest.approx(0.75)
    table = table.set_index("kind")
    low, high = table.loc["prompt", ["clipscore_low", "clipscore_high"]]  # per image: 15, 40, 50, 60
    assert 15 <= low < table.loc["prompt", "clipscore_mean"] < high <= 60
    assert table.loc["noun", ["bertscore_low", "bertscore_high"]].tolist() == pytest.approx([0.1, 0.1])  # constant
    again = table2(scores, resamples=500, seed=1)[1].set_index("kind")
    assert again.equals(table2(scores, resamples=500, seed=1)[1].set_index("kind"))  # seeded
    assert again[["clipscore_mean", "clipscore_sem"]].equals(table[["clipscore_mean", "clipscore_sem"]])
    with pytest.raises(ValueError, match="at least 4 values per sample, got 4 and 2"):
        table2(scores[(scores["kind"] != "noun") | (scores["image_id"] <= 2)])


def test_an_unknown_random_norm_is_named(overrides, tmp_path):
    with pytest.raises(ValueError, match="prompts.random_norm='unit' is unknown"):
        run(overrides, tmp_path, "prompts.random_norm=unit")
    with pytest.raises(ValueError, match="bootstrap.resamples=0 must be a whole number >= 1"):
        run(overrides, tmp_path, "bootstrap.resamples=0")


def test_too_few_images_for_the_ks_tests_fail_before_scoring(overrides, tmp_path):
    with pytest.raises(ValueError, match="images.n=3: the KS tests .* at least 4 images; 3 would be scored"):
        run(overrides, tmp_path, "images.n=3")
    assert not (tmp_path / "scores.parquet").exists() and not (tmp_path / "parts").exists()  # nothing was scored
