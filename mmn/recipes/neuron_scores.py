"""`python experiments/neuron_scores.py` (conf/neuron_scores.yaml): the paper's Table 1 for a
finished analyze.py run (`analysis`: a run folder, or latest). The texts (each image's
interpretable top units, randomly re-paired units, the generated captions; scoring.neuron_texts)
are scored per batch of images (a re-run into the same folder resumes); then the table, the
summary and W&B."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig

from mmn.analysis.bertscore import BertScorer
from mmn.analysis.clipscore import ClipScorer
from mmn.analysis.scoring import neuron_texts, score_texts, table1
from mmn.files import write_parquet
from mmn.recipes.run import Run, check_count, latest_analysis


def neuron_scores(cfg: DictConfig) -> dict:
    check_count("bootstrap.resamples", cfg.bootstrap.resamples)
    run = Run(cfg)
    analysis = latest_analysis(cfg) if cfg.analysis == "latest" else Path(cfg.analysis)
    for name in ("neurons.parquet", "captions.parquet"):
        if not (analysis / name).is_file():
            raise FileNotFoundError(f"analysis={analysis}: no {name}; pass the folder of a finished analyze.py run")
    rows = neuron_texts(pd.read_parquet(analysis / "neurons.parquet"), pd.read_parquet(analysis / "captions.parquet"),
                        torch.Generator().manual_seed(cfg.seed))
    image_ids = list(dict.fromkeys(row["image_id"] for row in rows))
    clip = ClipScorer(cfg.clip.model, cfg.clip.pretrained)
    bertscore = BertScorer(cfg.bertscore.model, cfg.bertscore.num_layers)
    # images: one row per image, skipped (with the reason) when it cannot be read now
    run.results(run.depends_on(("data", "clip", "bertscore"), captioner=False) | {"analysis": str(analysis.resolve())},
                tables=("images", "scores"))

    def work(index: int, indices: list[int]) -> dict[str, pd.DataFrame]:
        items, skipped = run.read_images([run.images.index_of(int(image_ids[i])) for i in indices])
        read = {item["image_id"] for item in items}
        scores = score_texts([r for r in rows if r["image_id"] in read], items, clip, bertscore) if items \
            else pd.DataFrame()
        image_rows = [{"image_id": item["image_id"], "file_name": item["file_name"], "skipped": False,
                       "skip_reason": None} for item in items] + skipped
        return {"scores": scores, "images": pd.DataFrame(image_rows)}

    tables = run.each_batch(len(image_ids), work, desc="neuron scores")
    if tables is None:
        return run.shard_finished()
    per_image, table = table1(tables["scores"], cfg.bootstrap.resamples, cfg.bootstrap.seed)
    write_parquet(per_image, run.dir / "per_image.parquet")
    write_parquet(table, run.dir / "table1.parquet")
    summary = {"analysis": str(analysis), "images": int(per_image["image_id"].nunique()),
               "images_skipped": int(tables["images"]["skipped"].sum()),
               "skip_reasons": tables["images"]["skip_reason"].dropna().value_counts().to_dict()}
    for row in table.itertuples():
        summary |= {f"{row.kind}/clipscore": row.clipscore_mean, f"{row.kind}/bertscore": row.bertscore_mean}
    return run.finish(summary, {"table1": table})
