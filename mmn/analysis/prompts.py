"""Image-prompt decoding (paper section 3.1, Table 2, Figure 3): do the projected image prompts
already sit near the tokens that name what the image shows?

    tokens = decode_prompts(lm, prompts)                      # prompts [n, d_model] -> 5 tokens each
    baseline = decode_prompts(lm, random_prompts(1000, lm.d_model, generator))
    ks_test(clip_scores_of_prompts, clip_scores_of_baseline)  # the paper: D = .037, p > .5

Each prompt maps to the top_k tokens whose INPUT embeddings have the highest cosine similarity to
it; the scores of those tokens (CLIPScore, BERTScore against the human captions) are then compared
with the same procedure run on random vectors. The paper finds no difference: the prompts do not
decode to words about the image, though the model captions it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.stats import ks_2samp
from torch import Tensor

from mmn.analysis.decoding import join_tokens
from mmn.analysis.stats import with_intervals
from mmn.models.lm import LanguageModel

# With at least 4 values in each sample, two completely separated samples reach p < .05 whatever
# the sizes (exact test: p = 2 / C(n_a + n_b, n_a) = .029 at 4 and 4); at 3 and 3 the smallest
# possible p is .1, so no result could ever be significant.
MIN_KS_VALUES = 4


@torch.no_grad()
def decode_prompts(lm: LanguageModel, prompts: Tensor, top_k: int = 5, chunk: int = 1024) -> list[list[str]]:
    """The top_k tokens (as text, leading spaces kept) whose input embeddings have the highest
    cosine similarity to each prompt, best first. prompts: [n, d_model].

    Only the tokenizer's real tokens are ranked (LiMBeR's GPT-J has embedding rows beyond them).
    Cosine similarity ignores the prompts' norm, and is computed in float32, `chunk` prompts at a
    time, so that a bfloat16 model and a 50400-token vocabulary stay exact and in memory.
    """
    if prompts.ndim != 2 or prompts.shape[1] != lm.d_model:
        raise ValueError(f"decode_prompts: prompts must be [n, d_model={lm.d_model}], got {tuple(prompts.shape)}")
    if not 1 <= top_k <= lm.vocab_size:
        raise ValueError(f"decode_prompts: top_k={top_k} must be in 1..{lm.vocab_size}")
    embeddings = F.normalize(lm.embedding.weight[: lm.vocab_size].float(), dim=-1)  # [vocab, d_model]
    top = []
    for start in range(0, len(prompts), chunk):
        rows = F.normalize(prompts[start : start + chunk].to(embeddings), dim=-1)  # [chunk, d_model]
        top += (rows @ embeddings.T).topk(top_k, dim=-1).indices.tolist()  # [chunk, top_k]
    return [[lm.tokenizer.decode([token]) for token in row] for row in top]


def random_prompts(n: int, d_model: int, generator: torch.Generator, norm: float | Tensor | None = None) -> Tensor:
    """The baseline: n standard normal vectors [n, d_model] (the paper does not say which
    distribution), rescaled to `norm` (one value, or one per row [n]) when it is given.

    decode_prompts is norm-invariant, so the norm does not change the decodings. It matters for
    anything that feeds these vectors into the model: LiMBeR's image prompts have about 80 times the
    norm of GPT-J's token embeddings, while a standard normal vector has a norm of about
    sqrt(d_model). To match real prompts row by row pass `norm=prompts.norm(dim=-1)`.
    """
    vectors = torch.randn(n, d_model, generator=generator)  # [n, d_model]
    if norm is None:
        return vectors
    norm = torch.as_tensor(norm, dtype=vectors.dtype)
    if norm.ndim > 1 or (norm.ndim == 1 and len(norm) != n):
        raise ValueError(f"random_prompts: norm must be one value or one per prompt [{n}], got {tuple(norm.shape)}")
    return vectors * (norm.reshape(-1, 1) / vectors.norm(dim=-1, keepdim=True))


def ks_test(a: Sequence[float] | Tensor | np.ndarray, b: Sequence[float] | Tensor | np.ndarray) -> dict:
    """Two-sided two-sample Kolmogorov-Smirnov test (scipy.stats.ks_2samp) between two 1-d samples,
    e.g. the CLIPScores of image prompts and of random prompts.
    -> {"statistic": D, "pvalue": p, "n_a": len(a), "n_b": len(b)}"""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"KS test needs two 1-d samples, got shapes {a.shape} and {b.shape}")
    if min(len(a), len(b)) < MIN_KS_VALUES:
        raise ValueError(f"KS test needs at least {MIN_KS_VALUES} values per sample, got {len(a)} and {len(b)}")
    result = ks_2samp(a, b, alternative="two-sided")
    return {"statistic": float(result.statistic), "pvalue": float(result.pvalue), "n_a": len(a), "n_b": len(b)}


# ----------------------------------------------------------------------------- Table 2

KINDS = ("prompt", "random", "other_prompt", "noun", "caption")  # the rows of Table 2


@torch.no_grad()
def texts_to_score(captioner, items: Sequence[dict], finder, generator: torch.Generator, top_k: int = 5,
                   norm_matched: bool = True, max_new_tokens: int = 20) -> list[dict]:
    """The texts Table 2 scores for a batch of images (CocoImages items), one dict each with
    kind, image_id, position and text:
      prompt   each image prompt's top_k nearest tokens, as the comma-separated string the paper scores
      random   the same for as many random vectors, each with its prompt's norm (norm_matched) or N(0, I)
      other_prompt  the next image's prompts in the batch, as decoded for that image: a control beside the
               paper's rows. Against random vectors, prompts differ both in which texts they decode to and
               in what those texts say about the image; against another image's prompts only the second
               is left (none for a batch of one image)
      noun     the first noun of each human caption (the paper's "COCO nouns")
      caption  the captioner's greedy caption"""
    pixels = captioner.preprocess([item["image"] for item in items])
    prompts = captioner.image_prompts(pixels).float()  # [batch, n_image, d_lm]
    batch, n_image, d_lm = prompts.shape
    norms = prompts.norm(dim=-1).flatten() if norm_matched else None  # [batch * n_image]
    decoded = {"prompt": decode_prompts(captioner.lm, prompts.flatten(0, 1), top_k),
               "random": decode_prompts(captioner.lm, random_prompts(batch * n_image, d_lm, generator, norms), top_k)}
    captions = captioner.tokenizer.batch_decode(captioner.generate(pixels, max_new_tokens), skip_special_tokens=True)
    rows = []
    for i, item in enumerate(items):
        sources = {"prompt": ("prompt", i), "random": ("random", i)}
        if batch > 1:
            sources["other_prompt"] = ("prompt", (i + 1) % batch)
        for kind, (decoding, image) in sources.items():
            rows += [{"kind": kind, "image_id": item["image_id"], "position": p,
                      "text": join_tokens(decoded[decoding][image * n_image + p])} for p in range(n_image)]
        nouns = [noun.word for noun in map(finder, item["captions"]) if noun is not None]
        rows += [{"kind": "noun", "image_id": item["image_id"], "position": j, "text": noun}
                 for j, noun in enumerate(nouns)]
        rows.append({"kind": "caption", "image_id": item["image_id"], "position": 0, "text": captions[i].strip()})
    return rows


def table2(scores: pd.DataFrame, resamples: int = 1000, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Per-image means of each kind (and the best CLIPScore of each image, which Figure 3 also
    shows), then the mean and standard error over images (Table 2) with a 95% bootstrap interval
    of the mean (<metric>_low, <metric>_high: `resamples` resamples of the images, seeded by
    `seed`; stats.bootstrap_ci), and two-sample KS tests on the per-image mean CLIPScores: prompts
    vs random vectors, prompts vs nouns, nouns vs random vectors (how far a scorer puts the image's
    own words from the baseline) and, where at least MIN_KS_VALUES images have them, prompts vs
    another image's prompts (do they score higher on their own image?).
    -> (per_image, table, {"prompt_vs_random": ks, "prompt_vs_noun": ks, "noun_vs_random": ks,
        "prompt_vs_other_prompt": ks})"""
    per_image = (scores.groupby(["kind", "image_id"])
                 .agg(clipscore=("clipscore", "mean"), bertscore=("bertscore", "mean"),
                      clipscore_max=("clipscore", "max")).reset_index())
    table = (per_image.groupby("kind")[["clipscore", "bertscore"]].agg(["mean", "sem"])
             .reindex([kind for kind in KINDS if kind in set(per_image["kind"])]))
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    clip_of = {kind: rows["clipscore"].to_numpy() for kind, rows in per_image.groupby("kind")}
    tests = {f"{a}_vs_{b}": ks_test(clip_of[a], clip_of[b])
             for a, b in (("prompt", "random"), ("prompt", "noun"), ("noun", "random"))}
    if len(clip_of.get("other_prompt", ())) >= MIN_KS_VALUES:  # a control: batches of one image have none
        tests["prompt_vs_other_prompt"] = ks_test(clip_of["prompt"], clip_of["other_prompt"])
    table = with_intervals(table.reset_index(), per_image, "kind", ("clipscore", "bertscore"), resamples, seed)
    return per_image, table, tests
