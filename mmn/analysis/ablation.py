"""Ablating MLP units: a context manager around any forward or generate call.

A unit k of layer l is ablated by replacing its activation A[..., k] (the input of the MLP's
output projection: act(Z) in GPT-J, GPT-2 and Pythia, act(Z) * up(x) in Llama's gated MLP) with
zero or with the unit's mean activation over a reference image set, at every position and in
every forward pass inside the block (the prompt pass and each generated token):

    with ablate(lm, {5: [12, 907], 9: [3]}):                     # zero ablation
        captions = captioner.caption(images)
    with ablate(lm, units, mode="mean", means={5: mean_5, 9: mean_9}):   # means[l]: [d_mlp]
        ...

`ablate_masks` does the same from boolean masks, one row of masks per row of the batch, so that
the ablation sweep (sweep.py) runs many (arm, k) settings in one batched pass.

Which positions the paper ablates is not stated (see ../shared/reference/procedure-notes.md);
all positions is the choice that also holds during generation with a KV cache, where each new
token arrives alone. For GPT-J, zeroing A is zeroing act(Z) = GELU(Z), the same as setting the
pre-activation Z to zero (GELU(0) = 0).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from mmn.models.lm import LanguageModel

MODES = ("zero", "mean")


def _unit_index(lm: LanguageModel, layer: int, units: Sequence[int] | Tensor) -> Tensor:
    index = torch.as_tensor(units, dtype=torch.long).flatten()
    d_mlp = lm.d_mlp
    bad = index[(index < 0) | (index >= d_mlp)]
    if len(bad):
        raise ValueError(f"ablate: layer {layer} has units 0..{d_mlp - 1}, got {bad.tolist()[:5]}")
    return index


@contextmanager
def ablate(lm: LanguageModel, units: Mapping[int, Sequence[int] | Tensor], mode: str = "zero",
           means: Mapping[int, Tensor] | None = None) -> Iterator[None]:
    """Ablate `units` ({layer: unit indices}) of `lm` inside the block; `means[layer]` is the
    [d_mlp] mean activation for mode="mean". Everything is checked before any hook is set, and
    the hooks are removed on exit, exceptions included."""
    masks = {}
    for layer, layer_units in units.items():
        mask = torch.zeros(lm.d_mlp, dtype=torch.bool)
        mask[_unit_index(lm, layer, layer_units)] = True
        masks[layer] = mask
    with ablate_masks(lm, masks, mode, means):
        yield


@contextmanager
def ablate_masks(lm: LanguageModel, masks: Mapping[int, Tensor], mode: str = "zero",
                 means: Mapping[int, Tensor] | None = None) -> Iterator[None]:
    """Ablate by boolean masks: masks[layer] is [d_mlp] (the same units in every row) or
    [rows, d_mlp] (each row of the batch its own units, so many ablations run in one pass)."""
    if mode not in MODES:
        raise ValueError(f"ablate: unknown mode {mode!r}: use one of {MODES}")
    plan = {}  # module -> (mask [rows or 1, 1, d_mlp], replacement [d_mlp] or None for zero)
    for layer, mask in masks.items():
        if mask.shape[-1] != lm.d_mlp or mask.dim() > 2:
            raise ValueError(f"ablate: the mask of layer {layer} has shape {tuple(mask.shape)}, "
                             f"expected ({lm.d_mlp},) or (rows, {lm.d_mlp})")
        if not mask.any():
            continue
        values = None
        if mode == "mean":
            if means is None or layer not in means:
                raise ValueError(f"ablate: mode='mean' needs the mean activations of layer {layer} (means[{layer}])")
            if means[layer].shape != (lm.d_mlp,):
                raise ValueError(f"ablate: means[{layer}] has shape {tuple(means[layer].shape)}, expected ({lm.d_mlp},)")
            values = means[layer]
        plan[lm.mlp_out(layer)] = (mask.reshape(-1, 1, lm.d_mlp), values)

    def replace(module, args):
        mask, values = plan[module]
        activation = args[0]  # [rows, pos, d_mlp]
        mask = mask.to(activation.device)
        value = torch.zeros((), dtype=activation.dtype, device=activation.device) if values is None \
            else values.to(activation.device, activation.dtype)
        return (torch.where(mask, value, activation), *args[1:])

    handles = [module.register_forward_pre_hook(replace) for module in plan]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
