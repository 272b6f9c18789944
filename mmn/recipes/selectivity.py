"""`python experiments/selectivity.py` (conf/selectivity.yaml): supplement S.4, the selectivity
matrix and its figure. Each category's units are the most frequent among the top units of half
of its images (TopUnits); their mean activation is measured on the other half of every
category's images (mmn.analysis.selectivity), over every image position (the paper's statistic)
and over the object's patches (reported beside it)."""

from __future__ import annotations

import logging
from collections import Counter

import pandas as pd
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from mmn.analysis.figures import selectivity_figure
from mmn.analysis.receptive_fields import single_object_ids, unit_activation_maps
from mmn.analysis.selectivity import object_means, own_highest, patch_cover, selectivity_matrix, split_by_category
from mmn.files import write_parquet
from mmn.recipes.run import Run, TopUnits, check_analysis_settings, check_count

log = logging.getLogger(__name__)


def selectivity_experiment(cfg: DictConfig) -> dict:
    settings = cfg.selectivity
    check_analysis_settings(cfg)
    for key in ("units", "top_units"):
        check_count(f"selectivity.{key}", settings[key])
    run = Run(cfg, masks=True)
    images = run.images
    split = split_by_category(images, single_object_ids(images, settings.categories, cfg.images.n))
    too_few = [name for name, (choose, measure) in split.items() if not choose or not measure]
    if too_few:
        raise ValueError(f"selectivity needs at least 2 single-object images per category; too few of "
                         f"{', '.join(too_few)} among the first images.n={cfg.images.n}")
    captioner = run.captioner()
    # the object's patches are only where the pixels are when the encoder squashes the whole image
    at_object = captioner.encoder.resize_mode == "squash"
    if not at_object:
        log.warning("selectivity: the encoder uses resize_mode=%r, so its patches are not the image's; only the "
                    "paper's statistic (every image position) is measured", captioner.encoder.resize_mode)
    top_units = TopUnits(captioner, cfg)
    batch_size = cfg.images.batch_size
    image_rows = []  # one per image: its category and half, and whether it was skipped (unreadable) and why

    def read(ids: list[int], category: str, half: str) -> list[dict]:
        items, unreadable = run.read_images([images.index_of(i) for i in ids])
        reasons = {row["image_id"]: row["skip_reason"] for row in unreadable}
        image_rows.extend({"image_id": i, "category": category, "half": half, "skipped": i in reasons,
                           "skip_reason": reasons.get(i)} for i in ids)
        return items

    # 1. each category's units: the most frequent among the top units of its choosing half
    units = {}
    for name, (choose, _) in tqdm(split.items(), desc="selectivity: choose units", unit="category"):
        counter = Counter()
        for start in range(0, len(choose), batch_size):
            for found in top_units(read(choose[start : start + batch_size], name, "choose"), settings.top_units):
                if found["units"] is not None:
                    counter.update(map(tuple, found["units"].tolist()))
        units[name] = [pair for pair, _ in counter.most_common(settings.units)]
    # 2. their mean activation on the measuring half of every category
    every_unit = sorted({pair for pairs in units.values() for pair in pairs})
    rows = []
    if every_unit:
        for name, (_, measure) in tqdm(split.items(), desc="selectivity: measure", unit="category"):
            for start in range(0, len(measure), batch_size):
                items = read(measure[start : start + batch_size], name, "measure")
                if not items:
                    continue
                maps = unit_activation_maps(captioner, captioner.preprocess([item["image"] for item in items]),
                                            every_unit)  # [batch, units, gh, gw]
                means = maps.flatten(2).mean(dim=2)  # [batch, units]: over every image-prompt position
                at = torch.full_like(means, float("nan"))  # [batch, units]: over the object's patches
                if at_object:
                    # single-object images: each item's masks hold its one object
                    covers = torch.stack([patch_cover(next(iter(item["masks"].values()))[0], maps.shape[2:])
                                          for item in items])  # [batch, gh, gw]
                    at = object_means(maps, covers)
                rows += [{"image_id": item["image_id"], "category": name, "layer": layer, "unit": unit,
                          "activation": float(means[b, j]), "activation_object": float(at[b, j])}
                         for b, item in enumerate(items) for j, (layer, unit) in enumerate(every_unit)]
    activations = pd.DataFrame(rows, columns=["image_id", "category", "layer", "unit", "activation",
                                              "activation_object"])
    chosen = {name: pairs for name, pairs in units.items() if pairs}
    matrix = selectivity_matrix(activations, chosen)
    write_parquet(activations, run.dir / "activations.parquet")
    write_parquet(pd.DataFrame([{"category": name, "rank": r, "layer": layer, "unit": unit}
                                for name, pairs in units.items() for r, (layer, unit) in enumerate(pairs)]),
                  run.dir / "units.parquet")
    write_parquet(matrix.reset_index(names="units_of"), run.dir / "selectivity.parquet")
    image_table = pd.DataFrame(image_rows, columns=["image_id", "category", "half", "skipped", "skip_reason"])
    write_parquet(image_table, run.dir / "images.parquet")
    summary = {"images": sum(len(choose) + len(measure) for choose, measure in split.values()),
               "images_skipped": int(image_table["skipped"].sum()),
               "skip_reasons": image_table["skip_reason"].dropna().value_counts().to_dict(),
               "categories": len(split), "units_per_category": settings.units,
               "categories_most_active_on_own": own_highest(matrix),
               "categories_most_active_on_own_object": None}
    figures = [selectivity_figure(matrix, run.figure("selectivity.png"))]
    tables = {"selectivity": matrix.reset_index(names="units_of")}
    if at_object:
        matrix_object = selectivity_matrix(activations, chosen, "activation_object")
        write_parquet(matrix_object.reset_index(names="units_of"), run.dir / "selectivity_object.parquet")
        summary["categories_most_active_on_own_object"] = own_highest(matrix_object)
        figures.append(selectivity_figure(matrix_object, run.figure("selectivity_object.png"),
                                          "The same units over the object's patches only (mmn's addition)"))
        tables["selectivity_object"] = matrix_object.reset_index(names="units_of")
    return run.finish(summary, tables, figures)
