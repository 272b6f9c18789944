"""Bad input to the analysis recipes (issue 18), on the tiny Shapes world: an image that cannot be
read is a recorded skip in every recipe, and every other image's results are those of a run on the
intact split; a malformed annotation is named where masks are read and costs nothing where they are
not; a bad setting is named with its key and value before any model loads."""

import json
import random
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from mmn.analysis.ablation import mean_activations
from mmn.analysis.selectivity import split_by_category
from mmn.config import compose
from mmn.data.coco import CocoImages, UnusableImage
from mmn.recipes import run as recipe_run
from mmn.recipes.analyze import analyze
from mmn.recipes.neuron_scores import neuron_scores
from mmn.recipes.prompt_decoding import prompt_decoding
from mmn.recipes.receptive_fields import receptive_field_experiment
from mmn.recipes.run import load_captioner
from mmn.recipes.selectivity import selectivity_experiment

UNREADABLE = {"truncated": "unreadable image (OSError: image file is truncated",
              "random bytes": "unreadable image (UnidentifiedImageError: cannot identify image file"}


# ----------------------------------------------------------------------------- helpers

def split_copy(overrides: list[str], tmp_path: Path, config_name: str = "analyze") -> Path:
    """A copy of the tiny world's evaluation split (COCO layout), to damage."""
    root = Path(compose(overrides, config_name=config_name).data.eval.root)
    shutil.copytree(root, tmp_path / "coco")
    return tmp_path / "coco"


def damage_image(root: Path, image_id: int, damage: str) -> Path:
    """Truncate an image file to half its bytes, or replace it by as many random bytes."""
    path = root / "val2017" / f"{image_id:012d}.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else random.Random(0).randbytes(len(data)))
    return path


def damage_annotation(root: Path, image_id: int, points: int) -> int:
    """Make the first annotation of an image a polygon of `points` points; returns its id."""
    path = root / "annotations" / "instances_val2017.json"
    instances = json.loads(path.read_text())
    annotation = next(a for a in instances["annotations"] if a["image_id"] == image_id)
    annotation["segmentation"] = [[10.0, 10.0, 30.0, 12.0][: 2 * points]]
    path.write_text(json.dumps(instances))
    return annotation["id"]


def assert_others_unchanged(run_dir: Path, clean_dir: Path, table: str, image_id: int, **columns) -> None:
    """The rows of every other image equal those of the run on the intact split (to float rounding:
    the image that shared the broken one's batch now runs in a smaller batch). `columns`: only the
    rows whose column holds one of the given values."""
    def rest(folder: Path) -> pd.DataFrame:
        frame = pd.read_parquet(folder / f"{table}.parquet")
        for column, values in columns.items():
            frame = frame[frame[column].isin(values)]
        frame = frame[frame["image_id"] != image_id].reset_index(drop=True)
        # a text column of nulls only (skip_reason when nothing was skipped) reads back as None in an
        # object column, the same column holding some text as NaN in a string column: compare values
        for column in frame.select_dtypes(exclude=["number", "bool"]).columns:
            frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
        return frame

    clean = rest(clean_dir)
    assert len(clean) > 0
    pd.testing.assert_frame_equal(rest(run_dir), clean, check_exact=False, rtol=1e-4, atol=1e-6)


def skipped_in(run_dir: Path, table: str, image_id: int) -> bool:
    """Whether a run's table records the image as skipped (for a reason of its own, in the intact runs)."""
    return bool(pd.read_parquet(run_dir / f"{table}.parquet").set_index("image_id").loc[image_id, "skipped"])


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if a model starts loading: the errors under test must come first."""
    from mmn.analysis.bertscore import BertScorer
    from mmn.analysis.clipscore import ClipScorer

    def loading(*args, **kwargs):
        raise AssertionError("a model started loading before the bad setting was named")

    monkeypatch.setattr(recipe_run, "load_captioner", loading)
    monkeypatch.setattr(BertScorer, "__init__", loading)
    monkeypatch.setattr(ClipScorer, "__init__", loading)


# ----------------------------------------------------------------------------- analyze.py

@pytest.fixture(scope="module")
def overrides(analysis_overrides):
    """analyze.py on 4 images in batches of 2, as tests/test_analyze.py runs it."""
    return [*analysis_overrides, "images.n=4", "images.batch_size=2", "ablation.ks=[0,2,8]", "top_n=5",
            "logger=none"]


def run_analysis(overrides, run_dir, *extra):
    return analyze(compose([*overrides, f"paths.output_dir={run_dir}", *extra], config_name="analyze"))


@pytest.fixture(scope="module")
def clean(overrides, tmp_path_factory):
    """analyze.py on the intact split."""
    run_dir = tmp_path_factory.mktemp("clean")
    return run_dir, run_analysis(overrides, run_dir)


@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_an_unreadable_image_is_a_recorded_skip_and_the_others_are_complete(overrides, clean, tmp_path, damage):
    clean_dir, clean_summary = clean
    root = split_copy(overrides, tmp_path)
    path = damage_image(root, 2, damage)  # the second image, in the first batch
    summary = run_analysis(overrides, tmp_path / "run", f"data.eval.root={root}")

    captions = pd.read_parquet(tmp_path / "run" / "captions.parquet")
    assert captions["image_id"].tolist() == [1, 2, 3, 4]
    broken = captions.set_index("image_id").loc[2]
    assert broken["skipped"] and broken["skip_reason"].startswith(f"{path}: {UNREADABLE[damage]}")
    assert broken["file_name"] == path.name and broken["target_id"] == -1 and broken["batch"] == 0
    assert summary["images"] == 4 and summary["images_skipped"] == clean_summary["images_skipped"] + 1
    assert summary["skip_reasons"][broken["skip_reason"]] == 1
    assert summary["images_analysed"] == clean_summary["images_analysed"] - (not skipped_in(clean_dir, "captions", 2))
    for table in ("captions", "neurons", "ablation"):
        assert_others_unchanged(tmp_path / "run", clean_dir, table, image_id=2)


def test_a_batch_of_unreadable_images_is_written_as_done_and_a_rerun_changes_nothing(overrides, clean, tmp_path):
    clean_dir, _ = clean
    root = split_copy(overrides, tmp_path)
    for image_id in (1, 2):  # the whole first batch
        damage_image(root, image_id, "random bytes")
    run_analysis(overrides, tmp_path / "run", f"data.eval.root={root}")
    first = pd.read_parquet(tmp_path / "run" / "parts" / "captions" / "000000.parquet")
    assert first["image_id"].tolist() == [1, 2] and first["skipped"].all()
    assert first["skip_reason"].str.contains("unreadable image").all()
    stamp = (tmp_path / "run" / "parts" / "captions" / "000000.parquet").stat().st_mtime_ns
    before = pd.read_parquet(tmp_path / "run" / "captions.parquet")
    run_analysis(overrides, tmp_path / "run", f"data.eval.root={root}")
    assert (tmp_path / "run" / "parts" / "captions" / "000000.parquet").stat().st_mtime_ns == stamp
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "run" / "captions.parquet"), before)
    assert_others_unchanged(tmp_path / "run", clean_dir, "captions", image_id=-1, batch=[1])  # the second batch


def test_mean_ablation_takes_its_means_over_the_readable_reference_images(overrides, tmp_path):
    root = split_copy(overrides, tmp_path)
    path = damage_image(root, 3, "truncated")
    extra = [f"data.eval.root={root}", "ablation=mean", "ablation.reference_images=4"]
    summary = run_analysis(overrides, tmp_path / "run", *extra)
    assert summary["ablation_mode"] == "mean" and skipped_in(tmp_path / "run", "captions", 3)
    assert [reason for reason in summary["skip_reasons"] if str(path) in reason] == [
        f"{path}: unreadable image (OSError: image file is truncated)"]
    cfg = compose([*overrides, *extra], config_name="analyze")
    cached = max(Path(cfg.paths.cache_dir).glob("means/*.safetensors"), key=lambda path: path.stat().st_mtime)
    captioner = load_captioner(cfg)
    readable = CocoImages(root, image_size=None, masks=False)
    pixels = captioner.preprocess([readable[i]["image"] for i in (0, 1, 3)])  # images 1, 2 and 4
    expected = mean_activations(captioner, [pixels])
    for layer, tensor in load_file(str(cached)).items():
        torch.testing.assert_close(tensor, expected[int(layer)], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- malformed annotations

@pytest.mark.parametrize("points", [1, 2])
def test_a_polygon_of_fewer_than_three_points_is_named_with_its_annotation_and_file(overrides, tmp_path, points):
    root = split_copy(overrides, tmp_path)
    annotation = damage_annotation(root, 3, points)
    images = CocoImages(root, image_size=None)
    with pytest.raises(UnusableImage) as raised:
        images[images.index_of(3)]
    assert str(raised.value) == (f"{root / 'val2017' / '000000000003.png'}: annotation {annotation} ("
                                 f"{images.category_names[images.instances.anns[annotation]['category_id']]}) "
                                 f"cannot be made a mask: a polygon of fewer than 3 points ({2 * points} "
                                 f"coordinates); a polygon needs at least 3 (x, y) points")
    assert (raised.value.image_id, raised.value.file_name) == (3, "000000000003.png")
    # without masks the image reads as before: its pixels and captions do not depend on the annotation
    item = CocoImages(root, image_size=None, masks=False)[images.index_of(3)]
    assert "masks" not in item and item["image"].size == (64, 64) and item["captions"]


def test_analyze_never_reads_masks_so_a_malformed_annotation_costs_no_image(overrides, clean, tmp_path):
    clean_dir, clean_summary = clean
    root = split_copy(overrides, tmp_path)
    damage_annotation(root, 2, points=2)
    summary = run_analysis(overrides, tmp_path / "run", f"data.eval.root={root}")
    assert summary["images_skipped"] == clean_summary["images_skipped"]
    for table in ("captions", "neurons", "ablation"):
        assert_others_unchanged(tmp_path / "run", clean_dir, table, image_id=-1)  # -1: every image


@pytest.fixture(scope="module")
def field_overrides(analysis_overrides):
    return [*analysis_overrides, "images.n=4", "images.batch_size=2", "logger=none", "receptive_fields.units=3",
            "receptive_fields.interpretable=false", "receptive_fields.heatmaps=0"]


def run_fields(overrides, run_dir, *extra):
    return receptive_field_experiment(compose([*overrides, f"paths.output_dir={run_dir}", *extra],
                                              config_name="receptive_fields"))


@pytest.fixture(scope="module")
def clean_fields(field_overrides, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("clean_fields")
    return run_dir, run_fields(field_overrides, run_dir)


def single_object_ids(root: Path) -> list[int]:
    return CocoImages(root, image_size=None).single_object_ids()


def test_receptive_fields_skip_an_image_whose_mask_cannot_be_made(field_overrides, clean_fields, tmp_path):
    clean_dir, clean_summary = clean_fields
    root = split_copy(field_overrides, tmp_path, "receptive_fields")
    image_id = single_object_ids(root)[1]  # the second image of the run, in its first batch
    annotation = damage_annotation(root, image_id, points=2)
    summary = run_fields(field_overrides, tmp_path / "run", f"data.eval.root={root}")
    images = pd.read_parquet(tmp_path / "run" / "images.parquet").set_index("image_id")
    path = root / "val2017" / f"{image_id:012d}.png"
    reason = images.loc[image_id, "skip_reason"]
    assert images.loc[image_id, "skipped"] and reason.startswith(f"{path}: annotation {annotation} (")
    assert reason.endswith("cannot be made a mask: a polygon of fewer than 3 points (4 coordinates); a polygon "
                           "needs at least 3 (x, y) points")
    assert summary["skip_reasons"][reason] == 1 and summary["images"] == clean_summary["images"]
    assert summary["images_skipped"] == clean_summary["images_skipped"] + (not skipped_in(clean_dir, "images", image_id))
    assert_others_unchanged(tmp_path / "run", clean_dir, "ious", image_id)
    assert_others_unchanged(tmp_path / "run", clean_dir, "images", image_id)


def test_receptive_fields_skip_an_unreadable_image(field_overrides, clean_fields, tmp_path):
    clean_dir, clean_summary = clean_fields
    root = split_copy(field_overrides, tmp_path, "receptive_fields")
    image_id = single_object_ids(root)[0]
    path = damage_image(root, image_id, "truncated")
    summary = run_fields(field_overrides, tmp_path / "run", f"data.eval.root={root}")
    images = pd.read_parquet(tmp_path / "run" / "images.parquet").set_index("image_id")
    assert images.loc[image_id, "skipped"]
    assert images.loc[image_id, "skip_reason"].startswith(f"{path}: {UNREADABLE['truncated']}")
    assert summary["images_skipped"] == clean_summary["images_skipped"] + (not skipped_in(clean_dir, "images", image_id))
    assert_others_unchanged(tmp_path / "run", clean_dir, "ious", image_id)


# ----------------------------------------------------------------------------- the other recipes

def test_prompt_decoding_skips_an_unreadable_image(overrides, tmp_path):
    def run(run_dir, *extra):  # 5 images: 4 are left for the KS tests, which need 4 per sample
        return prompt_decoding(compose([*overrides, f"paths.output_dir={run_dir}", "images.n=5", *extra],
                                       config_name="prompt_decoding"))

    clean_summary = run(tmp_path / "clean")
    root = split_copy(overrides, tmp_path)
    path = damage_image(root, 2, "random bytes")
    summary = run(tmp_path / "run", f"data.eval.root={root}")
    images = pd.read_parquet(tmp_path / "run" / "images.parquet")
    assert images["image_id"].tolist() == [1, 2, 3, 4, 5]
    assert images["skipped"].tolist() == [False, True, False, False, False]
    assert images.set_index("image_id").loc[2, "skip_reason"].startswith(f"{path}: {UNREADABLE['random bytes']}")
    assert summary["images"] == clean_summary["images"] - 1 == 4 and summary["images_skipped"] == 1
    scores = pd.read_parquet(tmp_path / "run" / "scores.parquet")
    kinds = scores.groupby("image_id")["kind"].apply(set)
    assert 2 not in kinds and all(kinds[i] >= {"prompt", "random", "noun", "caption"} for i in kinds.index)
    # batches of two: image 1, alone in its batch once 2 is skipped, has no other image's prompts to score
    assert [i for i in kinds.index if "other_prompt" in kinds[i]] == [3, 4]
    # the random vectors are drawn per batch, so only the other kinds must equal the intact run's
    assert_others_unchanged(tmp_path / "run", tmp_path / "clean", "scores", 2, kind=["prompt", "noun", "caption"])


def test_neuron_scores_skip_an_image_that_cannot_be_read_any_more(analysis_overrides, tmp_path):
    common = [*analysis_overrides, "images.n=6", "images.batch_size=3", "logger=none"]
    analyze(compose([*common, f"paths.output_dir={tmp_path / 'analysis'}", "ablation.ks=[0]", "top_n=20",
                     "filter.min_words=0"], config_name="analyze"))

    def run(run_dir, *extra):
        return neuron_scores(compose([*common, f"paths.output_dir={run_dir}", f"analysis={tmp_path / 'analysis'}",
                                      *extra], config_name="neuron_scores"))

    clean_summary = run(tmp_path / "clean")
    scored = sorted(pd.read_parquet(tmp_path / "clean" / "scores.parquet")["image_id"].unique())
    root = split_copy(common, tmp_path)
    path = damage_image(root, scored[0], "truncated")
    summary = run(tmp_path / "run", f"data.eval.root={root}")
    images = pd.read_parquet(tmp_path / "run" / "images.parquet").set_index("image_id")
    assert images.loc[scored[0], "skipped"] and images["skipped"].sum() == 1
    assert images.loc[scored[0], "skip_reason"].startswith(f"{path}: {UNREADABLE['truncated']}")
    assert summary["images"] == clean_summary["images"] - 1 and summary["images_skipped"] == 1
    assert_others_unchanged(tmp_path / "run", tmp_path / "clean", "scores", scored[0])


def test_selectivity_skips_an_unreadable_image(analysis_overrides, tmp_path):
    # as tests/test_selectivity.py: a tiny world with enough images for every shape's two halves
    common = [*analysis_overrides, "images.batch_size=2", "logger=none", "selectivity.top_units=5",
              "selectivity.units=3", "filter.min_words=0", "world.n_eval=64"]

    def run(run_dir, *extra):
        return selectivity_experiment(compose([*common, f"paths.output_dir={run_dir}", *extra],
                                              config_name="selectivity"))

    clean_summary = run(tmp_path / "clean")
    root = split_copy(common, tmp_path, "selectivity")
    images = CocoImages(root, image_size=None)
    category, (_, measure) = next(iter(split_by_category(images, images.single_object_ids()).items()))
    image_id = measure[0]  # measured, not choosing: the units stay those of the intact run
    path = damage_image(root, image_id, "random bytes")
    summary = run(tmp_path / "run", f"data.eval.root={root}")
    table = pd.read_parquet(tmp_path / "run" / "images.parquet").set_index("image_id")
    assert table.loc[image_id, "skipped"] and table["skipped"].sum() == 1 == summary["images_skipped"]
    assert table.loc[image_id, "skip_reason"].startswith(f"{path}: {UNREADABLE['random bytes']}")
    assert (table.loc[image_id, "category"], table.loc[image_id, "half"]) == (category, "measure")
    assert summary["images"] == clean_summary["images"] and len(table) == summary["images"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "run" / "units.parquet"),
                                  pd.read_parquet(tmp_path / "clean" / "units.parquet"))
    assert_others_unchanged(tmp_path / "run", tmp_path / "clean", "activations", image_id)


# ----------------------------------------------------------------------------- bad settings

@pytest.mark.parametrize("override, message", [
    ("images.batch_size=0", "images.batch_size=0 must be a whole number >= 1"),
    ("ablation.rows_per_pass=0", "ablation.rows_per_pass=0 must be a whole number >= 1"),
    ("ablation.ks=[]", r"ablation.ks=\[\]: ablation sizes are empty: give at least one count or share"),
    ("ablation.ks=abc", r"ablation.ks='abc' must be a list of unit counts or shares, e.g. ablation.ks=\[0,100,1.5%\]"),
    ("ablation.ks=[0,abc]", "ablation size 'abc' is neither a unit count nor a share like '1.5%'"),
])
def test_a_bad_setting_is_named_before_any_model_loads(overrides, tmp_path, no_model_loads, override, message):
    with pytest.raises(ValueError, match=message):
        run_analysis(overrides, tmp_path, override)
    assert not (tmp_path / "parts").exists()


@pytest.mark.parametrize("recipe, config_name", [(prompt_decoding, "prompt_decoding"),
                                                  (receptive_field_experiment, "receptive_fields"),
                                                  (selectivity_experiment, "selectivity"),
                                                  (neuron_scores, "neuron_scores")])
def test_every_recipe_names_a_zero_batch_size_before_any_model_loads(overrides, tmp_path, no_model_loads, recipe,
                                                                     config_name):
    with pytest.raises(ValueError, match="images.batch_size=0 must be a whole number >= 1"):
        recipe(compose([*overrides, f"paths.output_dir={tmp_path}", "images.batch_size=0"], config_name=config_name))


def test_a_device_this_machine_lacks_is_named_with_those_it_has(overrides, tmp_path, no_model_loads, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without CUDA
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda' is not available on this machine; available: auto, cpu$"):
        run_analysis(overrides, tmp_path, "device=cuda")


def test_a_missing_projection_checkpoint_is_named_before_any_model_loads(overrides, tmp_path, no_model_loads):
    missing = tmp_path / "projection"
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(f'projection.checkpoint={missing}: no such folder')}"):
        run_analysis(overrides, tmp_path / "run", f"projection.checkpoint={missing}")


@pytest.mark.parametrize("group, problem", [("lm", "no such folder"),
                                            ("encoder", "the folder holds no config.json, so it is not a saved "
                                                        "beit encoder")])
def test_a_local_model_folder_that_is_none_is_named_before_the_projection_look_up(
        overrides, tmp_path, no_model_loads, monkeypatch, group, problem):
    def look_up(cfg):
        raise AssertionError("the projection was looked up before the model paths were checked")

    monkeypatch.setattr(recipe_run, "latest_projection", look_up)
    folder = tmp_path / "nonexistent" if group == "lm" else tmp_path  # the encoder: a folder without a model
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(f'{group}.name_or_path={folder}: {problem}')}$"):
        run_analysis(overrides, tmp_path / "run", f"{group}.name_or_path={folder}", "projection.checkpoint=latest")
