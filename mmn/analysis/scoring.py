"""Scoring texts against images (CLIPScore) and their human captions (BERTScore), and the paper's
Table 1: do the decodings of an image's multimodal neurons describe it?

    python experiments/neuron_scores.py          # scores the newest analyze.py run, or analysis=<folder>

For each image of a finished `analyze.py` run, the decodings of its interpretable top units (each
unit's 10 tokens as one comma-separated string) are scored against the image and its human
captions; the image's score is the best of its neurons (the paper: "the max CLIPScore and
BERTScore per neuron", then the mean over images). Beside them, the baseline the paper introduces,
"pairings between images and decoded multimodal neurons are randomized" (each image gets another
image's neurons), and the generated captions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

KINDS = ("random", "neuron", "caption")  # the rows of Table 1


def score_texts(rows: list[dict], items: Sequence[dict], clip, bertscore) -> pd.DataFrame:
    """CLIPScore of each row's text against its image and BERTScore F1 against the image's human
    captions (the mean over them); each distinct (image, text) is scored once."""
    by_id = {item["image_id"]: item for item in items}
    distinct = sorted({(row["image_id"], row["text"]) for row in rows})
    clip_scores = clip.score([by_id[image_id]["image"] for image_id, _ in distinct], [text for _, text in distinct])
    pairs = [(text, reference) for image_id, text in distinct for reference in by_id[image_id]["captions"]]
    f1 = iter(bertscore([text for text, _ in pairs], [reference for _, reference in pairs]))
    scores = {}
    for (image_id, text), clip_score in zip(distinct, clip_scores.tolist()):
        references = by_id[image_id]["captions"]
        scores[image_id, text] = (clip_score, float(np.mean([next(f1) for _ in references])) if references else np.nan)
    frame = pd.DataFrame(rows)
    frame[["clipscore", "bertscore"]] = [scores[key] for key in zip(frame["image_id"], frame["text"])]
    return frame


def latest_analysis(cfg: DictConfig) -> Path:
    """The newest analyze.py run (a folder holding neurons.parquet) under outputs/ or multirun/
    that analysed this config's evaluation images."""
    root = Path(cfg.paths.root_dir)
    wanted = OmegaConf.to_container(cfg.data.eval, resolve=True)
    found = [path.parent for folder in ("outputs", "multirun") for path in (root / folder).glob("**/neurons.parquet")
             if (path.parent / "analysis.json").is_file()
             and json.loads((path.parent / "analysis.json").read_text()).get("data", {}).get("eval") == wanted]
    if not found:
        raise FileNotFoundError(f"analysis=latest: no analyze.py run of {cfg.data.eval.root} under {root}/outputs or "
                                f"{root}/multirun; run `python analyze.py` first, or pass analysis=<run folder>")
    return max(found, key=lambda path: (path / "neurons.parquet").stat().st_mtime)


def neuron_texts(neurons: pd.DataFrame, captions: pd.DataFrame, generator: torch.Generator) -> list[dict]:
    """The texts Table 1 scores, one dict each (kind, image_id, position, text): each analysed
    image's interpretable top units (once per unit) as "token, token, ...", the same for another
    image's units (a random pairing in which no image keeps its own), and its generated caption."""
    from mmn.analysis.clipscore import join_tokens

    interpretable = neurons[neurons["interpretable"]].drop_duplicates(["image_id", "layer", "unit"])
    texts = {image_id: [join_tokens(tokens) for tokens in rows["tokens"]]
             for image_id, rows in interpretable.groupby("image_id", sort=False)}
    image_ids = list(texts)
    if len(image_ids) < 2:
        raise ValueError(f"Table 1 needs at least 2 images with interpretable top units (for the random pairing), "
                         f"got {len(image_ids)}")
    shift = 1 + int(torch.randint(len(image_ids) - 1, (1,), generator=generator))  # 1..n-1: nobody keeps its own
    order = torch.randperm(len(image_ids), generator=generator).tolist()
    partner = {image_ids[order[i]]: image_ids[order[(i + shift) % len(order)]] for i in range(len(order))}
    rows = []
    for image_id in image_ids:
        rows += [{"kind": "neuron", "image_id": image_id, "position": j, "text": t}
                 for j, t in enumerate(texts[image_id])]
        rows += [{"kind": "random", "image_id": image_id, "position": j, "text": t}
                 for j, t in enumerate(texts[partner[image_id]])]
    analysed = captions[~captions["skipped"] & captions["image_id"].isin(image_ids)]
    rows += [{"kind": "caption", "image_id": r.image_id, "position": 0, "text": r.caption}
             for r in analysed.itertuples()]
    return rows


def table1(scores: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each image's best CLIPScore and BERTScore per kind, then the mean and standard error over
    images.  -> (per_image, table)"""
    per_image = scores.groupby(["kind", "image_id"])[["clipscore", "bertscore"]].max().reset_index()
    table = per_image.groupby("kind")[["clipscore", "bertscore"]].agg(["mean", "sem"])
    table = table.reindex([kind for kind in KINDS if kind in table.index])
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    return per_image, table.reset_index()


def neuron_scores(cfg: DictConfig) -> dict:
    """`python experiments/neuron_scores.py` (conf/neuron_scores.yaml): Table 1 for a finished
    analyze.py run (`analysis`: a run folder, or latest). Scores are written per batch of images
    (a re-run into the same folder resumes); then the table, summary and W&B."""
    import time

    from tqdm.auto import tqdm

    from mmn.analysis.bertscore import BertScorer
    from mmn.analysis.clipscore import ClipScorer
    from mmn.analysis.results import ResultStore, write_json, write_parquet
    from mmn.analysis.run import depends_on, image_batches, prepare_run, read_images, shard_finished
    from mmn.training.loggers import finish, log_results, make_loggers

    started = time.perf_counter()
    run_dir, images, _ = prepare_run(cfg)
    analysis = latest_analysis(cfg) if cfg.analysis == "latest" else Path(cfg.analysis)
    for name in ("neurons.parquet", "captions.parquet"):
        if not (analysis / name).is_file():
            raise FileNotFoundError(f"analysis={analysis}: no {name}; pass the folder of a finished analyze.py run")
    rows = neuron_texts(pd.read_parquet(analysis / "neurons.parquet"), pd.read_parquet(analysis / "captions.parquet"),
                        torch.Generator().manual_seed(cfg.seed))
    image_ids = list(dict.fromkeys(row["image_id"] for row in rows))
    clip = ClipScorer(cfg.scoring.clip_model, cfg.scoring.clip_pretrained)
    bertscore = BertScorer(cfg.bertscore.model, cfg.bertscore.num_layers)
    record = depends_on(cfg, ("data", "scoring", "bertscore"), captioner=False) | {"analysis": str(analysis.resolve())}
    # images: one row per image, skipped (with the reason) when it cannot be read now
    store = ResultStore(run_dir, record, tables=("images", "scores"))
    batches = image_batches(len(image_ids), cfg.images.batch_size)
    for index in tqdm(store.todo(len(batches), cfg.shard), desc="neuron scores", unit="batch"):
        items, skipped = read_images(images, [images.index_of(int(image_ids[i])) for i in batches[index]])
        read = {item["image_id"] for item in items}
        scores = score_texts([r for r in rows if r["image_id"] in read], items, clip, bertscore) if items \
            else pd.DataFrame()
        image_rows = [{"image_id": item["image_id"], "file_name": item["file_name"], "skipped": False,
                       "skip_reason": None} for item in items] + skipped
        store.write_batch(index, {"scores": scores, "images": pd.DataFrame(image_rows)})
    if not store.complete(len(batches)):
        return shard_finished(cfg, store, len(batches))
    tables = store.merge()
    per_image, table = table1(tables["scores"])
    write_parquet(per_image, run_dir / "per_image.parquet")
    write_parquet(table, run_dir / "table1.parquet")
    summary = {"analysis": str(analysis), "images": int(per_image["image_id"].nunique()),
               "images_skipped": int(tables["images"]["skipped"].sum()),
               "skip_reasons": tables["images"]["skip_reason"].dropna().value_counts().to_dict(),
               "seconds": round(time.perf_counter() - started, 1)}
    for row in table.itertuples():
        summary |= {f"{row.kind}/clipscore": row.clipscore_mean, f"{row.kind}/bertscore": row.bertscore_mean}
    write_json(summary, run_dir / "summary.json")
    loggers = make_loggers(cfg, run_dir)
    log_results(loggers, summary, {"table1": table})
    finish(loggers)
    return summary
