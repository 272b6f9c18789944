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
import torch
import torch.nn.functional as F
from scipy.stats import ks_2samp
from torch import Tensor

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
