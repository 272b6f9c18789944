"""From attribution scores to neurons: an image's top (layer, unit, patch) triples, its ranking of
units for ablation, and each unit's decoding and interpretable flag.

Scores of one image are [n_layers, n_patches, d_mlp] (attribution.py). The paper's "top 100 units
per image" ranks (layer, unit, patch) triples, so a unit may appear at several patches; ablation
ranks units by their best patch (max over patches). Neurons are named as in the paper:
L7.u12134 = layer 7 (0-based), unit 12134.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mmn.analysis.decoding import decode_units
from mmn.analysis.filter import InterpretableFilter
from mmn.models.lm import LanguageModel


def neuron_name(layer: int, unit: int) -> str:
    return f"L{layer}.u{unit}"


def top_triples(scores: Tensor, layers: Sequence[int], n: int) -> list[dict]:
    """The n highest-scoring (layer, unit, patch) triples of one image, best first.
    scores: [n_layers, n_patches, d_mlp]"""
    n_patches, d_mlp = scores.shape[1:]
    values, flat = scores.flatten().topk(min(n, scores.numel()))
    layer_index, rest = flat // (n_patches * d_mlp), flat % (n_patches * d_mlp)
    return [{"rank": rank, "layer": layers[l], "unit": u, "patch": p, "score": v}
            for rank, (l, p, u, v) in enumerate(zip(layer_index.tolist(), (rest // d_mlp).tolist(),
                                                    (rest % d_mlp).tolist(), values.tolist()))]


def unit_ranking(scores: Tensor, layers: Sequence[int]) -> Tensor:
    """Every unit of `layers` ordered by its best patch score, best first.
    scores [n_layers, n_patches, d_mlp] -> [n_layers * d_mlp, 2] rows of (layer, unit)"""
    d_mlp = scores.shape[-1]
    order = scores.amax(dim=1).flatten().argsort(descending=True, stable=True)  # [n_layers * d_mlp]
    return torch.stack([torch.as_tensor(layers)[order // d_mlp], order % d_mlp], dim=1)


class UnitDecoder:
    """Decodings (top tokens) and interpretable flags of units, each unit decoded once per run."""

    def __init__(self, lm: LanguageModel, interpretable: InterpretableFilter, final_norm: bool = False,
                 chunk: int = 1024):
        self.lm, self.interpretable, self.final_norm, self.chunk = lm, interpretable, final_norm, chunk
        self.known: dict[tuple[int, int], tuple[list[str], bool]] = {}  # (layer, unit) -> (tokens, interpretable)

    def __call__(self, layer: int, unit: int) -> tuple[list[str], bool]:
        self.decode([(layer, unit)])
        return self.known[(layer, unit)]

    def decode(self, units: Sequence[tuple[int, int]]) -> None:
        """Decode the (layer, unit) pairs not decoded yet, a layer and a chunk at a time."""
        by_layer: dict[int, list[int]] = {}
        for layer, unit in dict.fromkeys(units):
            if (layer, unit) not in self.known:
                by_layer.setdefault(layer, []).append(unit)
        for layer, layer_units in by_layer.items():
            for start in range(0, len(layer_units), self.chunk):
                chunk = layer_units[start : start + self.chunk]
                decoded = decode_units(self.lm, layer, chunk, self.interpretable.top_k, self.final_norm)
                for unit, tokens in zip(chunk, decoded):
                    self.known[(layer, unit)] = (tokens, self.interpretable(tokens))

    def interpretable_units(self, ranking: Tensor, needed: int) -> Tensor:
        """The first `needed` interpretable units of a ranking ([n, 2] (layer, unit) rows), decoding
        only as far down the ranking as it takes; fewer when the ranking runs out."""
        found = []
        for start in range(0, len(ranking), self.chunk):
            pairs = [tuple(pair) for pair in ranking[start : start + self.chunk].tolist()]
            self.decode(pairs)
            found += [pair for pair in pairs if self.known[pair][1]]
            if len(found) >= needed:
                break
        return torch.tensor(found[:needed], dtype=torch.long).reshape(-1, 2)
