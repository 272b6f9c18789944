"""`python experiments/receptive_fields.py` (conf/receptive_fields.yaml): the paper's section 3.2
and Figure 5. For images holding one annotated object of `receptive_fields.categories`, the IoU of
each top unit's receptive field with the object's mask, beside as many random units from the same
layers; per-category means, the bars, and heatmaps of the best unit of the first images."""

from __future__ import annotations

import pandas as pd
from omegaconf import DictConfig

from mmn.analysis.ablation import random_units_like
from mmn.analysis.figures import iou_bars
from mmn.analysis.neurons import neuron_name
from mmn.analysis.receptive_fields import object_ious, receptive_field_figure, single_object_ids, unit_activation_maps
from mmn.files import write_parquet
from mmn.recipes.run import Run, TopUnits, check_analysis_settings, check_count, seeded

IOU_ARMS = ("top", "random")  # an image's top units, and as many random units from the same layers


def receptive_field_experiment(cfg: DictConfig) -> dict:
    settings = cfg.receptive_fields
    check_analysis_settings(cfg)
    if not isinstance(settings.quantile, (int, float)) or not 0.0 <= settings.quantile < 1.0:
        raise ValueError(f"receptive_fields.quantile={settings.quantile!r} must be in [0, 1)")
    check_count("receptive_fields.units", settings.units)
    check_count("receptive_fields.heatmaps", settings.heatmaps, minimum=0)
    run = Run(cfg, masks=True)
    images = run.images
    ids = single_object_ids(images, settings.categories, cfg.images.n)
    captioner = run.captioner()
    top_units = TopUnits(captioner, cfg)
    run.results(run.depends_on(("attribution", "layers", "filter", "receptive_fields")), tables=("ious", "images"))

    def work(index: int, indices: list[int]) -> dict[str, pd.DataFrame]:
        items, unreadable = run.read_images([images.index_of(ids[i]) for i in indices])
        found = top_units(items, settings.units, settings.interpretable)
        kept = [(item, f) for item, f in zip(items, found) if f["units"] is not None]
        rows, skipped = [], []
        for arm in IOU_ARMS:
            units = [f["units"] if arm == "top" else
                     random_units_like(f["units"], captioner.lm.d_mlp, seeded(cfg.seed, item["image_id"]))
                     for item, f in kept]
            arm_rows, skipped = object_ious(captioner, [item for item, _ in kept], units, settings.quantile)
            rows += [{"arm": arm, **row, "neuron": neuron_name(row["layer"], row["unit"])} for row in arm_rows]
        reasons = {s["image_id"]: s["reason"] for s in skipped} | {f["image_id"]: f["skip_reason"] for f in found
                                                                     if f["units"] is None}
        image_rows = [{"image_id": f["image_id"], "noun": f["noun"], "skipped": f["image_id"] in reasons,
                       "skip_reason": reasons.get(f["image_id"])} for f in found]
        image_rows += [{"image_id": u["image_id"], "noun": None, "skipped": True, "skip_reason": u["skip_reason"]}
                       for u in unreadable]
        image_rows.sort(key=lambda row: row["image_id"])  # image order, as the ids are
        return {"ious": pd.DataFrame(rows), "images": pd.DataFrame(image_rows)}

    tables = run.each_batch(len(ids), work, desc="receptive fields")
    if tables is None:
        return run.shard_finished()
    ious = tables["ious"]
    per_category = (ious.groupby(["category", "arm"])["iou"].agg(["mean", "sem", "count"]).reset_index()
                    if len(ious) else pd.DataFrame(columns=["category", "arm", "mean", "sem", "count"]))
    write_parquet(per_category, run.dir / "iou_per_category.parquet")
    means = per_category.pivot(index="category", columns="arm", values="mean") if len(per_category) else None
    # images without exactly one annotated object (none, or several) are never chosen; count them
    summary = {"images": len(tables["images"]), "images_skipped": int(tables["images"]["skipped"].sum()),
               "skip_reasons": tables["images"]["skip_reason"].dropna().value_counts().to_dict(),
               "images_not_single_object": len(images) - len(images.single_object_ids())}
    if means is not None:
        summary |= {"iou/top": float(ious.loc[ious["arm"] == "top", "iou"].mean()),
                    "iou/random": float(ious.loc[ious["arm"] == "random", "iou"].mean()),
                    "categories": len(means),
                    "categories_top_above_random": int((means["top"] > means["random"]).sum())}
    figures = [iou_bars(per_category, run.figure("iou_per_category.png"))] if len(per_category) else []
    for image_id, rows in list(ious[ious["arm"] == "top"].groupby("image_id", sort=False))[: settings.heatmaps]:
        best = rows.loc[rows["iou"].idxmax()]
        item = images[images.index_of(int(image_id))]
        maps = unit_activation_maps(captioner, captioner.preprocess([item["image"]]), [(best["layer"], best["unit"])])
        figures.append(receptive_field_figure(item["image"], maps[0, 0], run.figure(f"heatmap_{image_id}.png"),
                                              settings.quantile, f"image {image_id}: {best['neuron']} on the "
                                              f"{best['category']}, IoU {best['iou']:.2f}"))
    return run.finish(summary, {"iou_per_category": per_category}, figures)
