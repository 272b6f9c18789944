"""Table 1 (`experiments/neuron_scores.py`): each image's neurons against a random re-pairing of
images and neurons, per-image maxima, and the experiment end to end on a tiny analyze.py run."""

import pandas as pd
import pytest
import torch

from mmn.recipes.analyze import analyze
from mmn.analysis.scoring import neuron_texts, table1
from mmn.recipes.neuron_scores import neuron_scores
from mmn.config import compose


def test_random_pairing_gives_every_image_another_images_neurons():
    neurons = pd.DataFrame({"image_id": [1, 1, 1, 2, 3, 3, 4], "layer": [0, 0, 1, 0, 1, 1, 0],
                            "unit": [5, 5, 7, 9, 2, 3, 4], "interpretable": [True, True, True, True, True, False, True],
                            "tokens": [["a", "b"], ["a", "b"], ["c"], ["d"], ["e"], ["f"], ["g"]]})
    captions = pd.DataFrame({"image_id": [1, 2, 3, 4, 5], "caption": ["one", "two", "three", "four", "five"],
                             "skipped": [False, False, False, False, True]})
    for seed in range(5):
        rows = pd.DataFrame(neuron_texts(neurons, captions, torch.Generator().manual_seed(seed)))
        own = rows[rows["kind"] == "neuron"].groupby("image_id")["text"].apply(tuple)
        assert own.to_dict() == {1: ("a, b", "c"), 2: ("d",), 3: ("e",), 4: ("g",)}  # each unit once, interpretable
        paired = rows[rows["kind"] == "random"].groupby("image_id")["text"].apply(tuple)
        assert sorted(paired.values) == sorted(own.values)  # a permutation of the neuron sets...
        assert all(paired[image] != own[image] for image in own.index)  # ...in which no image keeps its own
        assert rows.loc[rows["kind"] == "caption", "text"].tolist() == ["one", "two", "three", "four"]


def test_table1_takes_each_images_best_neuron_then_the_mean_over_images():
    scores = pd.DataFrame({"kind": ["neuron"] * 3 + ["random"] * 2, "image_id": [1, 1, 2, 1, 2],
                           "clipscore": [10.0, 30.0, 20.0, 5.0, 7.0], "bertscore": [0.2, 0.1, 0.4, 0.3, 0.3]})
    per_image, table = table1(scores)
    assert per_image.set_index(["kind", "image_id"]).loc[("neuron", 1), "clipscore"] == 30.0
    table = table.set_index("kind")
    assert table.loc["neuron", "clipscore_mean"] == pytest.approx(25.0)  # (30 + 20) / 2
    assert table.loc["neuron", "bertscore_mean"] == pytest.approx(0.3)   # (0.2 + 0.4) / 2
    assert list(table.index) == ["random", "neuron"]
    assert list(table.columns) == [f"{metric}_{stat}" for metric in ("clipscore", "bertscore")
                                   for stat in ("mean", "sem", "low", "high")]
    # two images: a resample's mean is the first, their mean or the second (P = 1/4, 1/2, 1/4), so the
    # 95% interval runs from the smaller image score to the larger; equal scores give a zero-width one
    assert table.loc["neuron", ["clipscore_low", "clipscore_high"]].tolist() == [20.0, 30.0]
    assert table.loc["neuron", ["bertscore_low", "bertscore_high"]].tolist() == pytest.approx([0.2, 0.4])
    assert table.loc["random", ["clipscore_low", "clipscore_high"]].tolist() == [5.0, 7.0]
    assert table.loc["random", ["bertscore_low", "bertscore_high"]].tolist() == pytest.approx([0.3, 0.3])
    assert table1(scores, resamples=200, seed=3)[1].equals(table1(scores, resamples=200, seed=3)[1])


def test_experiment_scores_a_finished_analysis(analysis_overrides, tmp_path):
    common = [*analysis_overrides, "images.n=6", "images.batch_size=3", "logger=none"]
    analyze(compose([*common, f"paths.output_dir={tmp_path / 'analysis'}", "ablation.ks=[0]", "top_n=20",
                     "filter.min_words=0"], config_name="analyze"))  # every unit interpretable: a tiny LM's tokens
    summary = neuron_scores(compose([*common, f"paths.output_dir={tmp_path / 'scores'}",
                                     f"analysis={tmp_path / 'analysis'}"], config_name="neuron_scores"))
    scores = pd.read_parquet(tmp_path / "scores" / "scores.parquet")
    analysed = pd.read_parquet(tmp_path / "analysis" / "captions.parquet").query("not skipped")
    assert summary["images"] == len(analysed) >= 2 and set(scores["kind"]) == {"neuron", "random", "caption"}
    assert scores["clipscore"].between(0, 100).all() and scores["bertscore"].notna().all()
    table = pd.read_parquet(tmp_path / "scores" / "table1.parquet")
    assert summary["neuron/clipscore"] == pytest.approx(table.set_index("kind").loc["neuron", "clipscore_mean"])
    assert (table["clipscore_low"] <= table["clipscore_high"]).all()  # bootstrap.resamples / seed from the config
    assert (table["bertscore_low"] <= table["bertscore_high"]).all()
    with pytest.raises(FileNotFoundError, match="no neurons.parquet"):
        neuron_scores(compose([*common, f"paths.output_dir={tmp_path / 'again'}", f"analysis={tmp_path}"],
                              config_name="neuron_scores"))
