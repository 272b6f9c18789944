"""Decoding a unit: the tokens its output weights promote, as the paper decodes multimodal neurons.

    decoder(W_out^k) = W_out^k @ W_U        W_out^k [d_model]: what unit k writes per unit of
                                            activation; W_U [d_model, vocab]: the unembedding

The top tokens of that product are the unit's decoding. By default the direction goes straight
into the unembedding's weights, as the paper describes (no bias, no final norm);
`final_norm=True` passes it through the LM's final norm first, as the residual stream would be.
Only the tokenizer's real tokens are ranked (LiMBeR's GPT-J has unembedding rows beyond them).
The paper scores a decoding (a unit's, or an image prompt's nearest tokens) as one string: join_tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mmn.models.lm import LanguageModel


@torch.no_grad()
def unit_token_scores(lm: LanguageModel, layer: int, units: Sequence[int] | Tensor, final_norm: bool = False) -> Tensor:
    """W_out^k @ W_U for each unit k of `layer`.  -> [n_units, vocab_size]"""
    directions = lm.unit_out_directions(layer)[torch.as_tensor(units, dtype=torch.long)]  # [n_units, d_model]
    if final_norm:
        directions = lm.final_norm(directions)
    return directions @ lm.unembed.weight[: lm.vocab_size].T


def join_tokens(tokens: Sequence[str]) -> str:
    """A decoded token list as the paper scores it: [" red", " circle"] -> "red, circle"."""
    return ", ".join(token.strip() for token in tokens)


def decode_units(lm: LanguageModel, layer: int, units: Sequence[int] | Tensor, top_k: int = 10,
                 final_norm: bool = False) -> list[list[str]]:
    """The top_k tokens (as text, leading spaces kept) that each unit of `layer` promotes."""
    if not 1 <= top_k <= lm.vocab_size:
        raise ValueError(f"decode_units: top_k={top_k} must be in 1..{lm.vocab_size}")
    top = unit_token_scores(lm, layer, units, final_norm).topk(top_k, dim=-1).indices  # [n_units, top_k]
    return [[lm.tokenizer.decode([token]) for token in row] for row in top.tolist()]
