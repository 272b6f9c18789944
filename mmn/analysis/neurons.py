"""From images to neurons: caption and attribute a batch (caption_and_attribute, the first step
of every recipe that finds an image's multimodal neurons), then an image's top (layer, unit,
patch) triples, its ranking of units, and each unit's decoding and interpretable flag.

Scores of one image are [n_layers, n_patches, d_mlp] (attribution.py). The paper's "top 100 units
per image" ranks (layer, unit, patch) triples, so a unit may appear at several patches; ablation
ranks units by their best patch (max over patches). Neurons are named as in the paper:
L7.u12134 = layer 7 (0-based), unit 12134.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mmn.analysis.attribution import attribute
from mmn.analysis.captions import CaptionTargets, caption_targets
from mmn.analysis.decoding import decode_units
from mmn.analysis.filter import InterpretableFilter
from mmn.models.captioner import Captioner
from mmn.models.lm import LanguageModel
from mmn.models.targets import FirstNounFinder


def caption_and_attribute(captioner: Captioner, pixels: Tensor, finder: FirstNounFinder, method: str,
                          layers: Sequence[int], max_new_tokens: int = 20, **options) -> tuple[CaptionTargets,
                                                                                             dict[int, Tensor]]:
    """Caption each image greedily, find its target c and p(c) (captions.caption_targets), and
    attribute y^c to every (layer, unit, image patch) with `method` (attribution.attribute, with
    the method's `options`). pixels: [batch, 3, H, W].
    -> (targets, scores): scores[i] is the float32 [n_layers, n_image, d_mlp] of targets.kept[i];
    an image whose scores are not finite is marked skipped in targets.rows and has none."""
    targets = caption_targets(captioner, pixels, finder, max_new_tokens)
    scores = {}
    if targets.kept:
        every = attribute(captioner.lm, method, targets.inputs_embeds, targets.target_positions, targets.target_ids,
                          layers, captioner.image_positions, **options)  # [kept, L, n_image, d_mlp]
        for i, b in enumerate(targets.kept):
            image_scores = every[i].float()
            if torch.isfinite(image_scores).all():
                scores[i] = image_scores
            else:
                targets.rows[b].update(skipped=True, skip_reason="non-finite attribution scores")
    return targets, scores


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
