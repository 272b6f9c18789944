"""The report: finished runs side by side (headline numbers, top-neuron overlap, overlaid figures),
from a sweep folder or a list of runs, on two tiny analyze.py runs."""

import pandas as pd
import pytest

from mmn.analysis.compare import find_runs, top_neuron_overlap, write_report
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
    assert sorted(path.name for path in figures) == ["ablation_curves.png", "layer_distribution.png"]
    assert all(path.is_file() for path in figures)


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
