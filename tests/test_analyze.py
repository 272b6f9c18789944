"""`python analyze.py` end to end on the tiny Shapes world: tables, figures, resuming, refusing to
mix settings, bad input, skipped images, and a sweep of two methods as one W&B group."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image
from wandb_offline import run_info

from mmn.analysis import neurons
from mmn.analysis.stats import bootstrap_ci
from mmn.recipes.analyze import ablation_curve_table, analyze
from mmn.config import CONFIG_DIR, compose

REPO = CONFIG_DIR.parent
KS = [0, 2, 8]
SIZES = "[0%,2,3.125%]"  # shares and counts: of the tiny world's 2 x 128 = 256 units, 3.125% is 8


@pytest.fixture(scope="module")
def overrides(analysis_overrides):
    """The tiny world, a fresh projection, 4 images in batches of 2, small ablation sizes."""
    return [*analysis_overrides, "images.n=4", "images.batch_size=2", f"ablation.ks={SIZES}", "top_n=5"]


def run_analysis(overrides, run_dir, *extra):
    return analyze(compose([*overrides, f"paths.output_dir={run_dir}", "logger=none", *extra], config_name="analyze"))


@pytest.fixture(scope="module")
def finished(overrides, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("analysis")
    return run_dir, run_analysis(overrides, run_dir)


def test_tables_hold_every_image_neuron_and_ablation_setting(finished):
    run_dir, summary = finished
    captions = pd.read_parquet(run_dir / "captions.parquet")
    neurons = pd.read_parquet(run_dir / "neurons.parquet")
    ablation = pd.read_parquet(run_dir / "ablation.parquet")
    analysed = captions[~captions["skipped"]]
    assert len(captions) == summary["images"] == 4 and len(analysed) == summary["images_analysed"] >= 1
    assert captions.loc[captions["skipped"], "skip_reason"].notna().all()
    assert (analysed["p_target"].between(0, 1)).all() and (analysed["target_id"] >= 0).all()
    # top 5 (layer, unit, patch) triples per analysed image, best first, decoded to 10 tokens
    assert len(neurons) == 5 * len(analysed)
    for _, image in neurons.groupby("image_id"):
        assert list(image["rank"]) == list(range(5)) and image["score"].is_monotonic_decreasing
    assert neurons["tokens"].map(len).eq(10).all() and neurons["interpretable"].dtype == bool
    assert set(neurons["layer"]) <= {0, 1} and neurons["patch"].between(0, 15).all()  # 64 px / 16 px = 4 x 4 patches
    # 3 arms x 3 sizes per analysed image; nothing ablated changes nothing
    assert len(ablation) == 3 * len(KS) * len(analysed)
    unablated = ablation[ablation["k"] == 0]
    assert unablated["delta_p"].abs().max() < 1e-5
    assert (unablated["caption"] == unablated["original_caption"]).all()
    assert unablated["bertscore"].min() > 0.99
    assert (ablation.loc[ablation["arm"] == "top", "n_ablated"].values == [0, 2, 8] * len(analysed)).all()
    curves = pd.read_parquet(run_dir / "ablation_curves.parquet")
    assert sorted(curves["k"].unique()) == KS and summary["analysed_units"] == 256
    assert curves["share"].tolist() == (curves["k"] / 256).tolist()
    for row in curves.itertuples():  # bootstrap intervals over the images, bootstrap.resamples / seed by default
        images = ablation[(ablation["arm"] == row.arm) & (ablation["k"] == row.k)].sort_values("image_id")
        assert (row.delta_p_low, row.delta_p_high) == pytest.approx(bootstrap_ci(images["delta_p"], 1000, 0),
                                                                    nan_ok=True)
        assert (row.bertscore_low, row.bertscore_high) == pytest.approx(bootstrap_ci(images["bertscore"], 1000, 0),
                                                                        nan_ok=True)
    assert sorted(p.name for p in (run_dir / "figures").iterdir()) == ["ablation_curves.png", "cards",
                                                                         "layer_distribution.png"]
    assert json.loads((run_dir / "summary.json").read_text())["images"] == 4


def test_every_analysed_image_of_the_first_sixteen_has_a_neuron_card(finished):
    run_dir, _ = finished
    captions, neurons = pd.read_parquet(run_dir / "captions.parquet"), pd.read_parquet(run_dir / "neurons.parquet")
    cards = pd.read_parquet(run_dir / "cards.parquet")
    analysed = captions[~captions["skipped"]]
    assert sorted(cards["image_id"].unique()) == sorted(analysed["image_id"])  # cards.images=16 > 4 images
    for image_id, rows in cards.groupby("image_id"):
        assert rows["rank"].tolist() == list(range(5))  # cards.units
        # the card's first unit is the image's best unit: the one of its top (layer, unit, patch) triple
        best = neurons[(neurons["image_id"] == image_id) & (neurons["rank"] == 0)]["neuron"].item()
        assert rows["neuron"].iloc[0] == best
        caption = analysed.set_index("image_id").loc[image_id]
        assert (rows["caption"] == caption["caption"]).all() and (rows["noun"] == caption["noun"]).all()
        card = Image.open(rows["card"].iloc[0])
        assert card.mode == "RGB" and card.size == (2 * 128 + 300, 36 + 5 * 128)
    assert sorted(p.name for p in (run_dir / "figures" / "cards").iterdir()) == sorted(
        f"card_{i}.png" for i in analysed["image_id"])


def test_curves_add_bootstrap_intervals_and_keep_their_means():
    ablation = pd.DataFrame({"image_id": [2, 1, 3, 4] * 2, "arm": ["top"] * 8, "k": [0] * 4 + [8] * 4,
                             "delta_p": [0.0, 0.0, 1.0, 0.0, -0.5, -0.5, -0.5, -0.5],
                             "bertscore": [1.0, 1.0, 1.0, 1.0, 0.2, 0.4, float("nan"), 0.3],
                             "n_ablated": [0] * 4 + [8] * 4})
    curves = ablation_curve_table(ablation, 256, resamples=4000, seed=0).set_index("k")
    assert list(curves.columns) == ["arm", "share", "delta_p_mean", "delta_p_sem", "delta_p_low", "delta_p_high",
                                    "bertscore_mean", "bertscore_sem", "bertscore_low", "bertscore_high",
                                    "n_ablated_mean", "images"]
    assert curves.loc[0, ["delta_p_mean", "delta_p_sem"]].tolist() == pytest.approx([0.25, 0.25])
    # [0, 0, 1, 0]: a resample's mean is Binomial(4, 1/4) / 4, whose 2.5% and 97.5% quantiles are 0 and .75
    assert curves.loc[0, ["delta_p_low", "delta_p_high"]].tolist() == [0.0, 0.75]
    assert curves.loc[8, ["delta_p_low", "delta_p_high"]].tolist() == [-0.5, -0.5]  # every image the same
    assert curves.loc[8, "bertscore_low"] < 0.3 < curves.loc[8, "bertscore_high"]  # NaN dropped: 3 images
    assert ablation_curve_table(ablation, 256)["delta_p_low"].notna().all()  # defaults: 1000 resamples, seed 0


def test_a_rerun_skips_finished_batches_and_recovers_a_lost_one(overrides, finished, tmp_path):
    run_dir, _ = finished
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for path in run_dir.glob("parts/*/*.parquet"):  # as if killed after batch 0 was written
        if path.stem == "000000":
            target = resumed / path.relative_to(run_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    (resumed / "analysis.json").write_bytes((run_dir / "analysis.json").read_bytes())
    (resumed / "parts" / "ablation" / ".000001.parquet.123.tmp").write_bytes(b"half a file")
    first_part = resumed / "parts" / "captions" / "000000.parquet"
    stamp = first_part.stat().st_mtime_ns

    run_analysis(overrides, resumed)
    assert first_part.stat().st_mtime_ns == stamp  # batch 0 was not recomputed
    assert not list(resumed.glob("parts/*/.*.tmp"))
    for table in ("captions", "neurons", "ablation"):
        pd.testing.assert_frame_equal(pd.read_parquet(resumed / f"{table}.parquet"),
                                      pd.read_parquet(run_dir / f"{table}.parquet"))


def test_two_shards_in_two_processes_give_the_tables_of_one(overrides, finished, tmp_path):
    """shard=0/2 and shard=1/2 run at once into one folder; each writes its own batch, the one
    that finishes last merges, and the tables equal one process's."""
    run_dir, summary = finished
    shared = tmp_path / "sharded"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    jobs = [subprocess.Popen([sys.executable, str(REPO / "analyze.py"), *overrides, "logger=none", f"shard={shard}",
                              f"hydra.run.dir={tmp_path / f'job{shard[0]}'}", f"paths.output_dir={shared}"],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for shard in ("0/2", "1/2")]
    for job in jobs:
        output, _ = job.communicate(timeout=600)
        assert job.returncode == 0, output[-3000:]
    assert sorted(p.name for p in (shared / "parts" / "captions").iterdir()) == ["000000.parquet", "000001.parquet"]
    for table in ("captions", "neurons", "ablation"):
        pd.testing.assert_frame_equal(pd.read_parquet(shared / f"{table}.parquet"),
                                      pd.read_parquet(run_dir / f"{table}.parquet"))
    assert json.loads((shared / "summary.json").read_text())["images"] == summary["images"]


def test_a_bad_shard_is_named(overrides, tmp_path):
    with pytest.raises(ValueError, match="shard=2/2: i must be in 0..n-1"):
        run_analysis(overrides, tmp_path, "shard=2/2")
    with pytest.raises(ValueError, match="expected i/n"):
        run_analysis(overrides, tmp_path, "shard=half")


def test_a_different_analysis_never_writes_into_finished_results(overrides, finished):
    run_dir, _ = finished
    before = (run_dir / "neurons.parquet").read_bytes()
    with pytest.raises(ValueError, match="changed: attribution"):
        run_analysis(overrides, run_dir, "attribution=act")
    assert (run_dir / "neurons.parquet").read_bytes() == before


@pytest.mark.parametrize("override, message", [
    ("attribution.method=saliency", "attribution.method='saliency' is unknown"),
    ("layers.stop=9", "not a layer range of this model, which has 2 layers"),
    ("filter.min_words=11", "filter.min_words=11 must be in 0..filter.top_k=10"),
    ("images.n=0", "images.n=0: the image set is empty"),
    ("ablation.mode=shuffle", "ablation.mode='shuffle' is unknown"),
    ("ablation.ks=[]", r"ablation.ks=\[\]: ablation sizes are empty"),
    ("ablation.ks=[0,abc]", "'abc' is neither a unit count nor a share"),
    ("ablation.ks=[-3]", "ablation size -3 must not be negative"),
    ("ablation.ks=[150%]", "'150%' must be a share between 0% and 100%"),
])
def test_bad_settings_fail_with_their_key_before_writing_results(overrides, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        run_analysis(overrides, tmp_path, override)
    assert not (tmp_path / "parts").exists()


def test_an_image_with_non_finite_scores_is_skipped_and_recorded(overrides, tmp_path, monkeypatch):
    real_attribute = neurons.attribute

    def first_image_nan(*args, **kwargs):
        scores = real_attribute(*args, **kwargs)
        scores[0] = float("nan")
        return scores

    monkeypatch.setattr(neurons, "attribute", first_image_nan)
    summary = run_analysis(overrides, tmp_path, "images.n=2")
    captions = pd.read_parquet(tmp_path / "captions.parquet")
    nan_images = captions[captions["skip_reason"] == "non-finite attribution scores"]
    assert len(nan_images) == 1 and summary["skip_reasons"]["non-finite attribution scores"] == 1
    ablation = pd.read_parquet(tmp_path / "ablation.parquet")
    assert nan_images["image_id"].iloc[0] not in set(ablation["image_id"])
    assert ablation["delta_p"].notna().all()


def test_sweep_over_methods_is_one_wandb_group_with_two_result_folders(overrides, tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, str(REPO / "analyze.py"), "-m", "attribution=grad,ig",
                           *overrides, "images.n=2", f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    runs = [run_info(next((sweep / job).glob("wandb/offline-run-*/run-*.wandb"))) for job in ("0", "1")]
    assert runs[0]["group"] == runs[1]["group"] == "sweep"
    assert "attribution=grad" in runs[0]["name"] and "attribution=ig" in runs[1]["name"]
    methods = [json.loads((sweep / job / "summary.json").read_text())["method"] for job in ("0", "1")]
    assert methods == ["grad", "ig"]
    # ig checks its completeness on the first batch (images.batch_size=2: both images), grad does not
    assert not len(pd.read_parquet(sweep / "0" / "completeness.parquet"))
    completeness = pd.read_parquet(sweep / "1" / "completeness.parquet")
    analysed = pd.read_parquet(sweep / "1" / "captions.parquet").query("not skipped")
    assert sorted(completeness["image_id"].unique()) == sorted(analysed["image_id"])
    assert sorted(completeness["layer"].unique()) == [0, 1] and (completeness["gap"] >= 0).all()
    ig_summary = json.loads((sweep / "1" / "summary.json").read_text())
    assert ig_summary["ig_completeness/relative_gap"] == pytest.approx(completeness["relative_gap"].mean())
    assert all((sweep / job / "neurons.parquet").is_file() for job in ("0", "1"))
    # the run files hold the cards: a table with an image column, and each card as an image
    for job, run in zip(("0", "1"), runs):
        logged = {key: value for row in run["history"] for key, value in row.items()}
        cards = pd.read_parquet(sweep / job / "cards.parquet")
        assert logged["cards/_type"] == "table-file" and logged["cards/nrows"] == len(cards) > 0
        for image_id in cards["image_id"].unique():
            assert logged[f"figures/card_{image_id}/_type"] == "image-file"
        table = json.loads(next((sweep / job).glob("wandb/offline-run-*/files/" + logged["cards/path"])).read_text())
        # the card column: W&B 0.31 writes an image cell of an offline table as the word "Image"
        # (wandb/wandb#4611); the images themselves are the run's figures/card_<id> files
        column = table["columns"].index("card")
        assert [row[column] for row in table["data"]] == ["Image"] * len(cards)
        for image_id in cards["image_id"].unique():
            path = logged[f"figures/card_{image_id}/path"]
            assert Image.open(next((sweep / job).glob(f"wandb/offline-run-*/files/{path}"))).mode == "RGB"


def test_a_table_with_card_paths_holds_wandb_images(tmp_path):
    import wandb

    from mmn.recipes.loggers import wandb_table

    Image.new("RGB", (8, 8), "red").save(tmp_path / "card.png")
    table = wandb_table(pd.DataFrame({"neuron": ["L0.u1"], "card": [tmp_path / "card.png"]}))
    assert table.columns == ["neuron", "card"] and isinstance(table.data[0][1], wandb.Image)
    plain = wandb_table(pd.DataFrame({"k": [1, 2]}))  # no Path cell: the DataFrame as it is
    assert plain.columns == ["k"] and [row[0] for row in plain.data] == [1, 2]
