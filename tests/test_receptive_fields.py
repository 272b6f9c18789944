"""Receptive fields: IoU against pycocotools, the upsampling geometry and the strict quantile
threshold on hand-made maps, activation maps against an independent hook-free read on a tiny
captioner, and images without exactly one object skipped with a reason."""

import mmn  # noqa: F401,I001  (torchvision shim before transformers)

import numpy as np
import pycocotools.mask as coco_mask
import pytest
import torch
from PIL import Image

from mmn.analysis.ablation import random_units_like
from mmn.analysis.receptive_fields import (
    mask_iou,
    object_ious,
    receptive_field,
    receptive_field_figure,
    unit_activation_maps,
    upsample_map,
)
from mmn.models.captioner import Captioner
from mmn.models.encoders import load_encoder
from mmn.models.lm import LanguageModel
from mmn.models.projection import Projection


@pytest.fixture(scope="module")
def captioner(tmp_path_factory, save_tiny_captioner_lm, save_tiny_beit, captioner_sizes):
    """GPT-J with 2 layers and d_mlp 64; BEiT on 32 px with 8 px patches: a 4 x 4 grid."""
    root = tmp_path_factory.mktemp("receptive_fields")
    save_tiny_captioner_lm(root / "lm")
    save_tiny_beit(root / "encoder")
    torch.manual_seed(0)
    return Captioner(load_encoder("beit", root / "encoder"), Projection(captioner_sizes.d_enc, captioner_sizes.d_lm),
                     LanguageModel.from_pretrained(root / "lm"))


# ----------------------------------------------------------------------------- IoU

def coco_iou(a: np.ndarray, b: np.ndarray) -> float:
    encode = lambda m: coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))
    return float(coco_mask.iou([encode(a)], [encode(b)], [0])[0, 0])


def test_mask_iou_equals_pycocotools():
    rng = np.random.default_rng(0)
    for density_a, density_b in [(0.5, 0.5), (0.05, 0.3), (0.9, 0.01), (0.0, 0.2), (0.0, 0.0)]:
        a, b = rng.random((37, 53)) < density_a, rng.random((37, 53)) < density_b
        assert mask_iou(a, b) == pytest.approx(coco_iou(a, b), abs=1e-12)
        assert mask_iou(torch.from_numpy(a), torch.from_numpy(b)) == mask_iou(a, b)
    a = rng.random((37, 53)) < 0.3
    assert mask_iou(a, a) == 1.0
    assert mask_iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 0.0  # empty union: 0, as pycocotools


def test_mask_iou_needs_bool_masks_of_one_shape():
    with pytest.raises(ValueError, match="must be bool"):
        mask_iou(np.ones((4, 4)), np.ones((4, 4), bool))
    with pytest.raises(ValueError, match=r"one shape, got \(4, 4\) and \(4, 5\)"):
        mask_iou(np.ones((4, 4), bool), np.ones((4, 5), bool))


# ----------------------------------------------------------------------------- upsampling and threshold

def test_bilinear_upsampling_by_hand():
    # align_corners=False, 2 -> 4: output pixel i reads input (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25,
    # clamped to [0, 1]: weights (1, 0), (.75, .25), (.25, .75), (0, 1) on each axis.
    expected = torch.tensor([[0.0, 0.25, 0.75, 1.0],
                             [0.5, 0.75, 1.25, 1.5],
                             [1.5, 1.75, 2.25, 2.5],
                             [2.0, 2.25, 2.75, 3.0]])
    torch.testing.assert_close(upsample_map(torch.tensor([[0.0, 1.0], [2.0, 3.0]]), (4, 4)), expected,
                               rtol=0, atol=0)


@pytest.mark.parametrize("grid, hot", [((14, 14), (3, 9)), ((7, 14), (5, 2))])
def test_field_of_a_peaked_map_is_centred_on_the_peak_patch_and_covers_five_percent(grid, hot):
    size = (224, 224)
    patch_h, patch_w = size[0] // grid[0], size[1] // grid[1]
    r, c = hot
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    distance = ((patch_h * (rows - r)) ** 2 + (patch_w * (cols - c)) ** 2).float().sqrt()  # between patch centres, px
    activation = -distance + 1e-3 * torch.rand(grid)  # a cone peaked on patch (r, c); the noise breaks ties
    field = receptive_field(activation, size, quantile=0.95)
    assert field.shape == size and field.dtype == torch.bool
    assert field.float().mean().item() == pytest.approx(0.05, abs=1e-4)
    field_rows, field_cols = field.nonzero().float().unbind(1)
    # centred on the patch's pixels [patch_h r, patch_h (r + 1)) x [patch_w c, patch_w (c + 1))
    assert field_rows.mean().item() == pytest.approx(patch_h * r + (patch_h - 1) / 2, abs=0.5)
    assert field_cols.mean().item() == pytest.approx(patch_w * c + (patch_w - 1) / 2, abs=0.5)
    assert field[patch_h * r : patch_h * (r + 1), patch_w * c : patch_w * (c + 1)].all()


def test_field_of_one_hot_patch_is_where_its_bilinear_weight_is_positive():
    # patch (r, c) of a 14 x 14 map has its centre at pixel coordinate 16 r + 8 of 224; bilinear weight
    # 1 - |y + 0.5 - (16 r + 8)| / 16 > 0 on pixel rows [16 r - 8, 16 r + 24). More than 95% of the map is
    # 0, so its 0.95 quantile is 0 and the field is exactly that 32 x 32 square (">=" would take everything).
    r, c = 3, 9
    activation = torch.zeros(14, 14)
    activation[r, c] = 1.0
    expected = torch.zeros(224, 224, dtype=torch.bool)
    expected[16 * r - 8 : 16 * r + 24, 16 * c - 8 : 16 * c + 24] = True
    assert torch.equal(receptive_field(activation, (224, 224)), expected)


def test_threshold_is_strictly_above_the_quantile():
    # the 0.5 quantile of (0, 0, 0, 1) is 0: ">" keeps the one pixel above it, ">=" would keep all four
    field = receptive_field(torch.tensor([[0.0, 0.0], [0.0, 1.0]]), (2, 2), quantile=0.5)
    assert field.tolist() == [[False, False], [False, True]]
    assert not receptive_field(torch.zeros(14, 14), (224, 224)).any()  # a flat map has no field
    with pytest.raises(ValueError, match=r"quantile must be in \[0, 1\), got 1.0"):
        receptive_field(torch.zeros(2, 2), (4, 4), quantile=1.0)


# ----------------------------------------------------------------------------- activation maps

def activations_without_hooks(captioner, pixels) -> list[torch.Tensor]:
    """A of every layer, [batch, pos, d_mlp], recomputed from each GPT-J block's input as
    act(fc_in(ln_1(h))) (GPT-J's MLP reads the same normed input as its attention)."""
    lm = captioner.lm
    with torch.no_grad():
        hidden = lm.model(inputs_embeds=captioner.input_embeddings(pixels), output_hidden_states=True).hidden_states
        return [lm.mlp_act(layer)(lm.mlp_in(layer)(lm.block(layer).ln_1(hidden[layer])))
                for layer in range(lm.n_layers)]


def test_activation_maps_equal_an_independent_read_in_patch_order(captioner):
    pixels = torch.randn(2, 3, 32, 32)
    units = [(1, 5), (0, 7), (1, 60)]
    maps = unit_activation_maps(captioner, pixels, units)
    assert maps.shape == (2, 3, 4, 4)
    reference = activations_without_hooks(captioner, pixels)
    for b in range(2):
        for i, (layer, unit) in enumerate(units):
            for r in range(4):
                for c in range(4):  # image prompt r * cols + c is patch (r, c)
                    assert maps[b, i, r, c].item() == pytest.approx(reference[layer][b, 4 * r + c, unit].item(),
                                                                    rel=1e-5, abs=1e-6)
    assert not any(module._forward_pre_hooks for module in captioner.modules())  # hooks removed


def test_activation_maps_need_one_prompt_per_patch_and_real_units(captioner, captioner_sizes):
    pooled = Captioner(captioner.encoder, Projection(captioner_sizes.d_enc, captioner_sizes.d_lm, kind="pooled",
                                                     n_out_tokens=2), captioner.lm)
    with pytest.raises(ValueError, match="writes 2 image prompts, not one per patch of the 4 x 4 grid"):
        unit_activation_maps(pooled, torch.randn(1, 3, 32, 32), [(0, 1)])
    with pytest.raises(ValueError, match=r"layers 0..1 and units 0..63, got \(layer, unit\) \[\[2, 1\], \[0, 64\]\]"):
        unit_activation_maps(captioner, torch.randn(1, 3, 32, 32), [(2, 1), (0, 64), (1, 3)])


# ----------------------------------------------------------------------------- IoU with object masks

def item(image_id, masks):
    pixels = np.random.default_rng(image_id).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return {"image_id": image_id, "image": Image.fromarray(pixels), "masks": masks}


def test_object_ious_skip_images_without_exactly_one_object(captioner):
    square = np.zeros((32, 32), bool)
    square[8:20, 4:16] = True
    items = [item(1, {"circle": [square]}), item(2, {}), item(3, {"circle": [square], "star": [~square]}),
             item(4, {"star": [square, ~square]}), item(5, {"star": [np.zeros((32, 32), bool)]}),
             item(6, {"star": [~square]})]
    units = [[(0, 3), (1, 9)], [(0, 1)], [(0, 1)], [(0, 1)], [(0, 1)], [(1, 9)]]
    rows, skipped = object_ious(captioner, items, units)
    assert skipped == [{"image_id": 2, "reason": "no annotated object"},
                       {"image_id": 3, "reason": "2 annotated objects (circle, star)"},
                       {"image_id": 4, "reason": "2 annotated objects (star)"},
                       {"image_id": 5, "reason": "the star mask is empty at image size"}]
    assert [(r["image_id"], r["category"], r["layer"], r["unit"]) for r in rows] == [
        (1, "circle", 0, 3), (1, "circle", 1, 9), (6, "star", 1, 9)]
    maps = unit_activation_maps(captioner, captioner.preprocess([items[0]["image"], items[5]["image"]]),
                                [(0, 3), (1, 9)])
    expected = [mask_iou(receptive_field(maps[0, 0], (32, 32)), square),
                mask_iou(receptive_field(maps[0, 1], (32, 32)), square),
                mask_iou(receptive_field(maps[1, 1], (32, 32)), ~square)]
    assert [r["iou"] for r in rows] == pytest.approx(expected)
    assert all(isinstance(r["iou"], float) for r in rows)
    assert object_ious(captioner, items[1:2], units[1:2]) == ([], skipped[:1])


# ----------------------------------------------------------------------------- random units, figure

def test_random_units_keep_the_count_per_layer():
    units = torch.tensor([[7, 3], [2, 10], [7, 400], [7, 5]])
    drawn = random_units_like(units, d_mlp=512, generator=torch.Generator().manual_seed(0))
    assert drawn[:, 0].tolist() == [2, 7, 7, 7]
    assert ((drawn[:, 1] >= 0) & (drawn[:, 1] < 512)).all() and len(set(drawn[1:, 1].tolist())) == 3
    again = random_units_like(units, d_mlp=512, generator=torch.Generator().manual_seed(0))
    assert torch.equal(drawn, again)


def test_figure_is_written(tmp_path):
    activation = torch.zeros(4, 4)
    activation[1, 2] = 1.0
    image = Image.new("RGB", (32, 32), (200, 120, 40))
    path = receptive_field_figure(image, activation, tmp_path / "field.png", title="L0.u3")
    assert path == tmp_path / "field.png" and path.stat().st_size > 0


# ----------------------------------------------------------------------------- the experiment

@pytest.fixture(scope="module")
def experiment_overrides(analysis_overrides):
    return [*analysis_overrides, "images.n=4", "images.batch_size=1", "logger=none", "receptive_fields.units=3",
            "receptive_fields.interpretable=false", "receptive_fields.heatmaps=2"]


def run_experiment(overrides, run_dir, *extra):
    from mmn.recipes.receptive_fields import receptive_field_experiment
    from mmn.config import compose

    return receptive_field_experiment(compose([*overrides, f"paths.output_dir={run_dir}", *extra],
                                              config_name="receptive_fields"))


def test_experiment_scores_top_and_random_units_of_single_object_images(experiment_overrides, tmp_path):
    import pandas as pd

    from mmn.config import compose
    from mmn.data.coco import CocoImages

    summary = run_experiment(experiment_overrides, tmp_path)
    ious, images = pd.read_parquet(tmp_path / "ious.parquet"), pd.read_parquet(tmp_path / "images.parquet")
    data = compose(experiment_overrides, config_name="receptive_fields").data.eval
    single = CocoImages(data.root, data.split, image_size=None).single_object_ids()[:4]
    assert list(images["image_id"]) == single and summary["images"] == len(single) >= 2
    every = CocoImages(data.root, data.split, image_size=None)
    assert summary["images_not_single_object"] == len(every) - len(every.single_object_ids()) > 0
    assert images.loc[images["skipped"], "skip_reason"].notna().all()
    analysed = images.loc[~images["skipped"], "image_id"]
    assert len(analysed) >= 1
    for arm in ("top", "random"):
        rows = ious[ious["arm"] == arm]
        assert sorted(rows["image_id"].unique()) == sorted(analysed)
        assert rows.groupby("image_id").size().eq(3).all() and rows["iou"].between(0, 1).all()
    for (image_id, arm), rows in ious.groupby(["image_id", "arm"]):  # random units: as many per layer as the top
        top = ious[(ious["image_id"] == image_id) & (ious["arm"] == "top")]
        assert sorted(rows["layer"]) == sorted(top["layer"])
    per_category = pd.read_parquet(tmp_path / "iou_per_category.parquet")
    assert set(per_category["arm"]) == {"top", "random"} and per_category["count"].sum() == len(ious)
    figures = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert "iou_per_category.png" in figures and sum(name.startswith("heatmap_") for name in figures) == 2
    # a re-run with one batch lost recomputes it to the same rows
    (tmp_path / "parts" / "images" / "000001.parquet").unlink()
    run_experiment(experiment_overrides, tmp_path)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "ious.parquet"), ious)


def test_experiment_names_an_unknown_category(experiment_overrides, tmp_path):
    with pytest.raises(ValueError, match=r"unknown COCO category name\(s\) \['zebra'\]"):
        run_experiment(experiment_overrides, tmp_path, "receptive_fields.categories=[zebra]")


def test_experiment_in_two_shards_equals_one_run(experiment_overrides, tmp_path):
    import pandas as pd

    run_experiment(experiment_overrides, tmp_path / "one")
    first = run_experiment(experiment_overrides, tmp_path / "sharded", "shard=0/2")
    assert first["batches_done"] < first["batches"] and not (tmp_path / "sharded" / "ious.parquet").exists()
    run_experiment(experiment_overrides, tmp_path / "sharded", "shard=1/2")  # the last shard merges
    for table in ("ious", "images", "iou_per_category"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "sharded" / f"{table}.parquet"),
                                      pd.read_parquet(tmp_path / "one" / f"{table}.parquet"))
