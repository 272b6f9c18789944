"""Selectivity (supplement S.4): are a category's multimodal neurons most active on its own images?

    python experiments/selectivity.py        # the Shapes world's categories

For images holding one object of a category, each image's `selectivity.top_units` (100)
interpretable top units are found as in the receptive-field experiment
(receptive_fields.TopUnits). Per category, the `selectivity.units` (20) units that are
most often among its images' top units are its units
(chosen on half of its images); their mean activation A over every image-prompt position is then
measured on the other half of every category's images (held out, so the choice does not favour
its own images). Row c of the matrix is category c's units, column d their mean activation on
category d's images; a selective set of units has its largest value on the diagonal.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from mmn.analysis.receptive_fields import TopUnits, single_object_ids, unit_activation_maps


def split_by_category(images, ids: list[int]) -> dict[str, tuple[list[int], list[int]]]:
    """Per category, its single-object image ids split alternately into (choose, measure)."""
    by_category: dict[str, list[int]] = {}
    for image_id in ids:
        (annotation,) = images.instances.imgToAnns[image_id]  # single-object images: one annotation
        by_category.setdefault(images.category_names[annotation["category_id"]], []).append(image_id)
    return {name: (found[0::2], found[1::2]) for name, found in sorted(by_category.items())}


def selectivity_matrix(activations: pd.DataFrame, units: dict[str, list[tuple[int, int]]]) -> pd.DataFrame:
    """activations: one row per (image_id, category, layer, unit, activation) of measured images;
    units: each category's chosen (layer, unit) pairs.  -> [categories x categories]: row c, column d =
    the mean over c's units of their mean activation on d's images."""
    mean = activations.groupby(["layer", "unit", "category"])["activation"].mean()  # per unit and image category
    categories = sorted(units)
    matrix = pd.DataFrame(np.nan, index=categories, columns=sorted(activations["category"].unique()))
    for row in categories:
        for column in matrix.columns:
            values = [mean.get((layer, unit, column), np.nan) for layer, unit in units[row]]
            matrix.loc[row, column] = np.nanmean(values) if values else np.nan
    return matrix


def selectivity_experiment(cfg: DictConfig) -> dict:
    """`python experiments/selectivity.py` (conf/selectivity.yaml): the S.4 matrix and figure."""
    import time

    from tqdm.auto import tqdm

    from mmn.analysis.figures import selectivity_figure
    from mmn.analysis.results import write_json, write_parquet
    from mmn.analysis.run import check_count, check_settings, prepare_run, read_images, resolve_device
    from mmn.models.captioner import Captioner
    from mmn.training.loggers import finish, log_results, make_loggers

    settings = cfg.selectivity
    check_settings(cfg)
    for key in ("units", "top_units"):
        check_count(f"selectivity.{key}", settings[key])
    started = time.perf_counter()
    run_dir, images, _ = prepare_run(cfg)
    split = split_by_category(images, single_object_ids(images, settings.categories, cfg.images.n))
    too_few = [name for name, (choose, measure) in split.items() if not choose or not measure]
    if too_few:
        raise ValueError(f"selectivity needs at least 2 single-object images per category; too few of "
                         f"{', '.join(too_few)} among the first images.n={cfg.images.n}")
    captioner = Captioner.from_config(cfg, device=resolve_device(cfg.device))
    top_units = TopUnits(captioner, cfg)
    batch_size = cfg.images.batch_size
    image_rows = []  # one per image: its category and half, and whether it was skipped (unreadable) and why

    def read(ids: list[int], category: str, half: str) -> list[dict]:
        items, unreadable = read_images(images, [images.index_of(i) for i in ids])
        reasons = {row["image_id"]: row["skip_reason"] for row in unreadable}
        image_rows.extend({"image_id": i, "category": category, "half": half, "skipped": i in reasons,
                           "skip_reason": reasons.get(i)} for i in ids)
        return items

    # 1. each category's units: the most frequent among the top units of its choosing half
    units = {}
    for name, (choose, _) in tqdm(split.items(), desc="selectivity: choose units", unit="category"):
        counter = Counter()
        for start in range(0, len(choose), batch_size):
            items = read(choose[start : start + batch_size], name, "choose")
            for found in top_units(items, settings.top_units):
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
                rows += [{"image_id": item["image_id"], "category": name, "layer": layer, "unit": unit,
                          "activation": float(means[b, j])}
                         for b, item in enumerate(items) for j, (layer, unit) in enumerate(every_unit)]
    activations = pd.DataFrame(rows, columns=["image_id", "category", "layer", "unit", "activation"])
    matrix = selectivity_matrix(activations, {name: pairs for name, pairs in units.items() if pairs})
    write_parquet(activations, run_dir / "activations.parquet")
    write_parquet(pd.DataFrame([{"category": name, "rank": r, "layer": layer, "unit": unit}
                                for name, pairs in units.items() for r, (layer, unit) in enumerate(pairs)]),
                  run_dir / "units.parquet")
    write_parquet(matrix.reset_index(names="units_of"), run_dir / "selectivity.parquet")
    image_table = pd.DataFrame(image_rows, columns=["image_id", "category", "half", "skipped", "skip_reason"])
    write_parquet(image_table, run_dir / "images.parquet")
    diagonal = [row for row in matrix.index if row in matrix.columns]
    own_highest = sum(matrix.loc[row].idxmax() == row for row in diagonal)
    summary = {"images": sum(len(choose) + len(measure) for choose, measure in split.values()),
               "images_skipped": int(image_table["skipped"].sum()),
               "skip_reasons": image_table["skip_reason"].dropna().value_counts().to_dict(),
               "categories": len(split), "units_per_category": settings.units,
               "categories_most_active_on_own": int(own_highest), "seconds": round(time.perf_counter() - started, 1)}
    write_json(summary, run_dir / "summary.json")
    (run_dir / "figures").mkdir(exist_ok=True)
    figure = selectivity_figure(matrix, run_dir / "figures" / "selectivity.png")
    loggers = make_loggers(cfg, run_dir)
    log_results(loggers, summary, {"selectivity": matrix.reset_index(names="units_of")}, [figure])
    finish(loggers)
    return summary
