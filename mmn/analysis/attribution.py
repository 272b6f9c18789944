"""Attributing the logit of a caption's target token c to MLP units (paper eq. 2).

    g[l, p, k] = Z[l, p, k] * d y^c / d Z[l, p, k]

Z is the pre-activation of layer l's MLP (the output of its first projection, before the
activation), p an image-patch position, k a unit, and y^c the logit of c at the position that
predicts it. All layers come from one forward and one backward pass: a zero tensor that requires
grad is added to each hooked Z, so the gradient it receives is dy^c/dZ with every path through the
layers above intact, and the backward pass stops at the lowest hooked layer (the frozen LM has no
parameter gradients). Only the logits of the target positions are computed, never the whole
[batch, pos, vocab] tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from mmn.models.lm import LanguageModel


def target_logits(lm: LanguageModel, inputs_embeds: Tensor, target_positions: Tensor, target_ids: Tensor) -> Tensor:
    """y^c: the logit of target_ids[b] at position target_positions[b].  -> [batch]

    inputs_embeds [batch, pos, d_model]; rows may be right-padded beyond their target position
    (causal attention never lets a position see what follows it)."""
    hidden = lm.model.base_model(inputs_embeds=inputs_embeds).last_hidden_state  # [batch, pos, d_model], final norm applied
    rows = torch.arange(len(inputs_embeds), device=hidden.device)
    logits = lm.unembed(hidden[rows, target_positions])  # [batch, vocab]
    return logits[rows, target_ids]


def grad_attribution(lm: LanguageModel, inputs_embeds: Tensor, target_positions: Tensor, target_ids: Tensor,
                     layers: Sequence[int], positions: Tensor | slice) -> Tensor:
    """Z * dy^c/dZ for every unit of `layers` at `positions` (the image patches).
    -> [batch, len(layers), n_positions, d_mlp]"""
    if not layers:
        raise ValueError("grad_attribution: no layers given")
    modules = [lm.mlp_in(layer) for layer in layers]  # raises on a layer outside the model
    pre_activations, probes = {}, {}

    def add_probe(module, args, output):
        probe = torch.zeros_like(output, requires_grad=True)  # [batch, pos, d_mlp]
        pre_activations[module], probes[module] = output.detach(), probe
        return output + probe

    handles = [module.register_forward_hook(add_probe) for module in modules]
    try:
        with torch.enable_grad():
            logit = target_logits(lm, inputs_embeds.detach(), target_positions, target_ids)
            gradients = torch.autograd.grad(logit.sum(), [probes[module] for module in modules])
    finally:
        for handle in handles:
            handle.remove()
    scores = [pre_activations[module][:, positions] * gradient[:, positions]
              for module, gradient in zip(modules, gradients)]
    return torch.stack(scores, dim=1)
