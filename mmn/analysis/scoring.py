"""Scoring texts against images (CLIPScore) and their human captions (BERTScore), and the paper's
Table 1: do the decodings of an image's multimodal neurons describe it? The recipe is
mmn.recipes.neuron_scores (`python experiments/neuron_scores.py`).

For each image of a finished `analyze.py` run, the decodings of its interpretable top units (each
unit's 10 tokens as one comma-separated string) are scored against the image and its human
captions; the image's score is the best of its neurons (the paper: "the max CLIPScore and
BERTScore per neuron", then the mean over images). Beside them, the baseline the paper introduces,
"pairings between images and decoded multimodal neurons are randomized" (each image gets another
image's neurons), and the generated captions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from mmn.analysis.decoding import join_tokens
from mmn.analysis.stats import with_intervals

KINDS = ("random", "neuron", "caption")  # the rows of Table 1
METRICS = ("clipscore", "bertscore")  # its columns


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


def neuron_texts(neurons: pd.DataFrame, captions: pd.DataFrame, generator: torch.Generator) -> list[dict]:
    """The texts Table 1 scores, one dict each (kind, image_id, position, text): each analysed
    image's interpretable top units (once per unit) as "token, token, ...", the same for another
    image's units (a random pairing in which no image keeps its own), and its generated caption."""
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


def table1(scores: pd.DataFrame, resamples: int = 1000, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each image's best CLIPScore and BERTScore per kind, then the mean and standard error over
    images, and a 95% bootstrap interval of the mean (<metric>_low, <metric>_high: `resamples`
    resamples of the images, seeded by `seed`; stats.bootstrap_ci).  -> (per_image, table)"""
    per_image = scores.groupby(["kind", "image_id"])[["clipscore", "bertscore"]].max().reset_index()
    table = per_image.groupby("kind")[["clipscore", "bertscore"]].agg(["mean", "sem"])
    table = table.reindex([kind for kind in KINDS if kind in table.index])
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    return per_image, with_intervals(table.reset_index(), per_image, "kind", METRICS, resamples, seed)
