"""The report: finished runs side by side (headline numbers, top-neuron overlap, overlaid figures),
from a sweep folder or a list of runs, on two tiny analyze.py runs."""

import pandas as pd
import pytest

from mmn.analysis.compare import ablation_area, compare_methods, find_runs, rank_agreement, top_neuron_overlap, write_report
from mmn.recipes.analyze import analyze
from mmn.config import compose


def test_overlap_is_the_jaccard_index_per_image_and_overall():
    a = pd.DataFrame({"image_id": [1, 1, 2], "layer": [0, 1, 0], "unit": [5, 6, 7]})
    b = pd.DataFrame({"image_id": [1, 1, 2, 3], "layer": [0, 1, 1, 0], "unit": [5, 9, 7, 5]})
    overlap = top_neuron_overlap(a, b)
    assert overlap["images"] == 2
    assert overlap["per_image_jaccard"] == pytest.approx((1 / 3 + 0) / 2)  # image 1: {(0,5)} of 3; image 2: none
    assert overlap["all_units_jaccard"] == pytest.approx(1 / 5)  # {(0,5)} of (0,5),(1,6),(0,7),(1,9),(1,7)


@pytest.fixture(scope="module")
def sweep(analysis_overrides, tmp_path_factory):
    """Two finished analyses (grad and act) as the job folders 0 and 1 of a sweep folder."""
    sweep = tmp_path_factory.mktemp("sweep")
    for job, method in enumerate(["grad", "act"]):
        analyze(compose([*analysis_overrides, "images.n=3", "ablation.ks=[0,4]", "top_n=5", "logger=none",
                         f"attribution={method}",
                         f"paths.output_dir={sweep / str(job)}"], config_name="analyze"))
    return sweep


def test_report_compares_the_runs_of_a_sweep(sweep, tmp_path):
    folders = find_runs(sweep=sweep)
    assert folders == [sweep / "0", sweep / "1"]
    markdown, table, figures = write_report(folders, tmp_path)
    assert (tmp_path / "report.md").read_text() == markdown
    assert len(table) == 2 and "p_target_mean" in table and "ablation/top/k=100/delta_p" not in table  # k=100 not run
    summary_p = [pd.read_parquet(folder / "captions.parquet").query("not skipped")["p_target"].mean()
                 for folder in folders]
    assert table["p_target_mean"].tolist() == pytest.approx(summary_p)
    overlap = markdown.split("## Overlap of top neurons")[1].split("## Figures")[0]
    assert "| 0 | 1 |" in overlap  # the one pair of runs
    assert sorted(path.name for path in figures) == ["ablation_curves.png", "layer_distribution.png",
                                                     "method_agreement.png"]
    assert all(path.is_file() for path in figures)
    faithfulness = pd.read_parquet(tmp_path / "faithfulness.parquet")
    assert sorted(faithfulness["run"]) == ["0", "1"] and (faithfulness["images"] >= 1).all()
    assert faithfulness["top_area"].is_monotonic_increasing  # best (most negative) first
    for arm in ("top", "random"):
        inside = faithfulness[f"{arm}_area_low"] <= faithfulness[f"{arm}_area"]
        assert (inside | faithfulness[f"{arm}_area_low"].isna()).all()
    assert "## Methods compared: what their top units cause" in markdown


def test_rank_agreement_is_spearman_over_the_union_of_top_lists():
    a = pd.DataFrame({"image_id": [1] * 4, "layer": [0] * 4, "unit": [1, 2, 3, 4], "score": [4.0, 3.0, 2.0, 1.0]})
    assert rank_agreement(a, a) == pytest.approx(1.0)
    assert rank_agreement(a, a.assign(score=-a["score"])) == pytest.approx(-1.0)
    # b lists units 1 and 2 only: 3 and 4 tie last in b's ranking (ranks 1, 2, 3.5, 3.5 against 1, 2, 3, 4)
    b = a.iloc[:2]
    assert rank_agreement(a, b) == pytest.approx(pd.Series([1, 2, 3, 4]).corr(pd.Series([1, 2, 3.5, 3.5]),
                                                                               method="spearman"))


def test_the_ablation_area_is_the_mean_delta_p_over_the_shares():
    ablation = pd.DataFrame({"image_id": [7, 7, 7, 7, 7, 7], "arm": ["top"] * 3 + ["random"] * 3,
                             "k": [0, 4, 8] * 2, "delta_p": [0.0, -0.5, -1.0, 0.0, 0.0, 0.1]})
    # shares 0, 0.5, 1: trapezoids (0 - 0.5) / 2 * 0.5 + (-0.5 - 1) / 2 * 0.5 = -0.5
    assert ablation_area(ablation, n_units=8).loc[7] == pytest.approx(-0.5)
    assert ablation_area(ablation, n_units=8, arm="random").loc[7] == pytest.approx(0.025)
    neurons = pd.DataFrame({"image_id": [7], "layer": [0], "unit": [1], "score": [1.0]})
    more = ablation.assign(image_id=8, delta_p=ablation["delta_p"] / 2)
    jaccard, spearman, faithfulness = compare_methods({"a": neurons, "b": neurons},
                                                      {"a": ablation, "b": pd.concat([ablation, more])},
                                                      {"a": 8, "b": 8}, resamples=200, seed=0)
    assert jaccard.loc["a", "b"] == 1.0 and spearman.loc["a", "a"] == 1.0
    assert faithfulness["run"].tolist() == ["a", "b"]  # a's top units remove more of p(c): -0.5 against -0.375
    assert faithfulness.set_index("run").loc["b", "top_area"] == pytest.approx(-0.375)
    low, high = faithfulness.set_index("run").loc["b", ["top_area_low", "top_area_high"]]
    assert low == pytest.approx(-0.5) and high == pytest.approx(-0.25)  # two images: the interval spans them


def test_runs_are_named_and_checked(sweep, tmp_path):
    assert find_runs(runs=[sweep / "1", sweep / "0"]) == [sweep / "1", sweep / "0"]
    with pytest.raises(ValueError, match="either sweep=<multirun folder> or runs="):
        find_runs()
    with pytest.raises(ValueError, match="either sweep"):
        find_runs(sweep=sweep, runs=[sweep / "0"])
    with pytest.raises(FileNotFoundError, match="holds no summary.json"):
        find_runs(runs=[tmp_path])
    with pytest.raises(FileNotFoundError, match="no job folder with a summary.json"):
        find_runs(sweep=tmp_path)


def test_the_report_shows_igs_completeness_gap(sweep, tmp_path):
    import json
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(sweep, runs)
    record = json.loads((runs / "1" / "analysis.json").read_text())
    (runs / "1" / "analysis.json").write_text(json.dumps({**record, "attribution": {"method": "ig", "steps": 7}}))
    pd.DataFrame({"image_id": [1, 1, 2, 2], "layer": [0, 1, 0, 1], "scores_sum": [1.0] * 4,
                  "logit_change": [1.0] * 4, "gap": [0.1, 0.3, 0.1, 0.5],
                  "relative_gap": [0.1, 0.3, 0.1, 0.5]}).to_parquet(runs / "1" / "completeness.parquet")
    markdown, _, _ = write_report(find_runs(sweep=runs), tmp_path / "report")
    section = markdown.split("## Integrated gradients: do the steps suffice?")[1].split("##")[0]
    assert "| 1 | 7 | 2 | 0.25 | 0.1 | 0.4 |" in section  # run, steps, images, mean gap, layer 0, layer 1


def test_runs_are_named_by_the_overrides_they_do_not_share(tmp_path):
    from mmn.analysis.compare import run_names

    folders = []
    for job, method in enumerate(["grad", "ig"]):
        folder = tmp_path / str(job)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(
            f"- attribution={method}\n- projection.checkpoint=/p\n- hydra.sweep.dir=x\n")
        folders.append(folder)
    assert run_names(folders) == ["attribution=grad", "attribution=ig"]
    assert run_names(folders[:1]) == ["attribution=grad,projection.checkpoint=/p"]
    (tmp_path / "2").mkdir()
    assert run_names([tmp_path / "2", tmp_path / "2"]) == ["2 (2)", "2 (2)"]


def test_the_report_of_a_sweep_is_one_more_run_in_its_wandb_group(sweep, tmp_path):
    from wandb_offline import run_info

    from mmn.recipes.report import report

    out = tmp_path / "report"
    report(compose([f"sweep={sweep}", "logger=wandb", "logger.mode=offline", f"paths.output_dir={out}"],
                   config_name="report"))
    info = run_info(next(out.glob("wandb/offline-run-*/run-*.wandb")))
    assert info["group"] == sweep.name
    logged = {key for row in info["history"] for key in row}
    assert {"runs/_type", "figures/method_agreement/_type", "figures/ablation_curves/_type"} <= logged
