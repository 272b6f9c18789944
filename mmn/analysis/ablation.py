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
`ablation_sweep` below runs many (image, arm, k) settings in one batched pass.

Which positions the paper ablates is not stated. All positions (the default) is the choice that
also holds during generation with a KV cache, where each new token arrives alone;
`positions=captioner.image_positions` ablates the image prompts only (positions 0..n-1 in LiMBeR's
layout, inside the chat prompt for LLaVA). For GPT-J, zeroing A is zeroing act(Z) = GELU(Z), the
same as setting the pre-activation Z to zero (GELU(0) = 0).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from functools import partial

import torch
from torch import Tensor

from mmn.analysis.attribution import logits_at, target_probabilities
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
                 means: Mapping[int, Tensor] | None = None, positions: slice | None = None) -> Iterator[None]:
    """Ablate by boolean masks: masks[layer] is [d_mlp] (the same units in every row) or
    [rows, d_mlp] (each row of the batch its own units, so many ablations run in one pass).
    `positions` (a slice of the sequence, e.g. Captioner.image_positions) ablates those positions
    only. A pass that continues a KV cache starts where the cache ends, so its positions are
    counted from there: the teacher-forced caption and the single-token steps of cached
    generation come after the image prompts and are left alone."""
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
        # on the model's device once, not in every pass of every layer
        values = None if values is None else values.to(lm.device, lm.dtype)
        plan[lm.mlp_out(layer)] = (mask.reshape(-1, 1, lm.d_mlp).to(lm.device), values)

    if positions is not None and (positions.step not in (None, 1) or positions.start is None
                                  or positions.stop is None):
        raise ValueError(f"ablate: positions must be a slice start:stop of the sequence, got {positions}")

    def replace(module, args):
        mask, values = plan[module]
        activation = args[0]  # [rows, pos, d_mlp]
        if positions is not None:
            sequence = torch.arange(activation.shape[1], device=activation.device) + pass_start()  # [pos]
            inside = (sequence >= positions.start) & (sequence < positions.stop)  # [pos]
            if not inside.any():
                return None  # e.g. a cached generation step, after the ablated positions
            mask = mask & inside[:, None]  # [rows or 1, pos, d_mlp]
        value = torch.zeros((), dtype=activation.dtype, device=activation.device) if values is None else values
        return (torch.where(mask, value, activation), *args[1:])

    # where each pass starts is only read for `positions`: no extra hook on every forward otherwise
    with (lm.pass_start() if positions is not None else nullcontext()) as pass_start, \
            lm.hooks(pre=[(module, replace) for module in plan]):
        yield


# ----------------------------------------------------------------------------- mean activations

@torch.no_grad()
def mean_activations(captioner, pixel_batches: Iterable[Tensor]) -> dict[int, Tensor]:
    """Each unit's mean activation A over every position of the captioning prompt (image prompts
    and "A picture of") of a reference image set: {layer: [d_mlp]}, for mode="mean"."""
    lm = captioner.lm
    sums = {layer: torch.zeros(lm.d_mlp, dtype=torch.float64) for layer in range(lm.n_layers)}
    count = 0

    def accumulate(module, args, layer):
        sums[layer] += args[0].double().sum(dim=(0, 1)).cpu()  # args[0]: [batch, pos, d_mlp]

    with lm.hooks(pre=[(lm.mlp_out(layer), partial(accumulate, layer=layer)) for layer in range(lm.n_layers)]):
        for pixels in pixel_batches:
            inputs = captioner.input_embeddings(pixels)  # [batch, n_prompt, d_lm]
            lm.final_hidden(inputs)
            count += inputs.shape[0] * inputs.shape[1]
    if count == 0:
        raise ValueError("mean_activations: the reference image set is empty")
    return {layer: (total / count).float() for layer, total in sums.items()}


# ----------------------------------------------------------------------------- the ablation sweep

ABLATION_ARMS = ("top", "top_interpretable", "random")


def parse_size(size) -> int | float:
    """One ablation size: a unit count (an int >= 0) or a share of the analysed units, written as a
    percentage string ("1.5%"), returned as a fraction (0.015). Anything else raises ValueError."""
    if isinstance(size, bool):
        raise ValueError(f"ablation size {size!r} is neither a unit count nor a share like '1.5%'")
    if isinstance(size, int):
        if size < 0:
            raise ValueError(f"ablation size {size} must not be negative")
        return size
    text = str(size).strip()
    if text.endswith("%"):
        try:
            share = float(text[:-1]) / 100
        except ValueError:
            raise ValueError(f"ablation size {size!r}: {text[:-1]!r} is not a number") from None
        if not 0 <= share <= 1:
            raise ValueError(f"ablation size {size!r} must be a share between 0% and 100%")
        return share
    if text.isdigit():
        return int(text)
    raise ValueError(f"ablation size {size!r} is neither a unit count nor a share like '1.5%'")


def resolve_sizes(sizes: Sequence, n_units: int) -> list[int]:
    """Ablation sizes (unit counts and shares, see `parse_size`) as sorted, distinct unit counts:
    a share of the n_units analysed units rounds to the nearest count, and every count is capped
    at n_units. ["0%", "1.5%", 400] with 8,192 units -> [0, 123, 400]."""
    if len(sizes) == 0:
        raise ValueError("ablation sizes are empty: give at least one count or share, e.g. [0, '1.5%']")
    counts = set()
    for size in sizes:
        parsed = parse_size(size)
        counts.add(min(round(parsed * n_units) if isinstance(parsed, float) else parsed, n_units))
    return sorted(counts)


def ablation_settings(ranking: Tensor, interpretable: Tensor, ks: Sequence[int], d_mlp: int,
                      generator: torch.Generator) -> list[tuple[str, int, Tensor]]:
    """The (arm, k, units [n, 2] of (layer, unit)) settings of one image (paper section 3.3):
    top: the k best units of `ranking`; top_interpretable: the k best interpretable ones (fewer if
    there are not k); random: as many units as `top` takes from each layer, drawn uniformly from
    that layer. k = 0 ablates nothing in every arm."""
    settings = []
    for k in ks:
        top = ranking[:k]
        settings += [("top", k, top), ("top_interpretable", k, interpretable[:k]),
                     ("random", k, random_units_like(top, d_mlp, generator))]
    return settings


def random_units_like(units: Tensor, d_mlp: int, generator: torch.Generator) -> Tensor:
    """The random-units baseline: as many units per layer as `units` ([n, 2] of (layer, unit))
    holds, drawn uniformly without replacement within that layer.  -> [n, 2], by ascending layer"""
    drawn = [torch.stack([torch.full((n,), layer), torch.randperm(d_mlp, generator=generator)[:n]], dim=1)
             for layer, n in zip(*[t.tolist() for t in units[:, 0].unique(return_counts=True)])]
    return torch.cat(drawn) if drawn else units


def setting_masks(settings_units: Sequence[Tensor], layers: Iterable[int], d_mlp: int) -> dict[int, Tensor]:
    """One row of masks per setting: {layer: [n_settings, d_mlp] bool}."""
    masks = {layer: torch.zeros(len(settings_units), d_mlp, dtype=torch.bool) for layer in layers}
    for row, units in enumerate(settings_units):
        for layer, mask in masks.items():
            mask[row, units[units[:, 0] == layer, 1]] = True
    return masks


def probability_and_caption(lm: LanguageModel, inputs_embeds: Tensor, n_prompt: int, target_positions: Tensor,
                            target_ids: Tensor, max_new_tokens: int = 20) -> tuple[Tensor, list[list[int]]]:
    """p(c) and the greedy caption from one pass over the prompt: inputs_embeds [rows, pos, d_lm]
    is the prompt (its first n_prompt positions) + the caption up to c. The caption's tokens are
    teacher-forced on the prompt's KV cache to read p(c) at target_positions [rows], then the
    cache is cut back to the prompt and decoding starts from the prompt's last position.
    -> (p(c) [rows], each row's caption token ids)"""
    hidden, cache = lm.final_hidden_and_cache(inputs_embeds[:, :n_prompt])
    hidden = hidden[:, -1:]  # [rows, 1, d_lm], after the final norm: predicts the 1st token
    if inputs_embeds.shape[1] > n_prompt:
        forced = lm.final_hidden_after(inputs_embeds[:, n_prompt:], cache)  # the cache back to the prompt after
        hidden = torch.cat([hidden, forced], dim=1)  # positions n_prompt - 1, n_prompt, ...
    logits = logits_at(lm, hidden, target_positions - (n_prompt - 1))[:, : lm.vocab_size]  # [rows, vocab]
    probabilities = logits.float().softmax(dim=-1)[torch.arange(len(logits)), target_ids.to(logits.device)]
    return probabilities, lm.greedy_after(lm.unembed(hidden[:, 0]), cache, max_new_tokens)


@torch.no_grad()
def ablation_sweep(lm: LanguageModel, inputs_embeds: Tensor, target_positions: Tensor, target_ids: Tensor,
                   settings: Sequence[Sequence[tuple[str, int, Tensor]]], layers: Iterable[int], mode: str = "zero",
                   means: Mapping[int, Tensor] | None = None, n_prompt: int | None = None,
                   max_new_tokens: int = 20, rows_per_pass: int = 24, positions: slice | None = None
                   ) -> list[list[dict]]:
    """p(c) and, when `n_prompt` is given, the re-generated greedy caption under each setting of
    each image: settings[i] are image i's (arm, k, units) (ablation_settings).
    inputs_embeds [images, pos, d_lm] (prompt + caption up to c), target_positions/ids [images].

    Settings of an image that ablate the same units run once; each pass runs up to `rows_per_pass`
    (image, setting) rows as one batch with per-row masks, with logits at the target position
    only, and one pass over the prompt gives both p(c) and the caption (probability_and_caption)."""
    layers = list(layers)
    rows: list[tuple[int, Tensor]] = []  # (image, units) of each distinct setting
    setting_rows = []  # per image, the row of each of its settings
    for image, image_settings in enumerate(settings):
        unique: dict[bytes, int] = {}  # the units of a setting, as sorted flat indices -> its row
        setting_rows.append([])
        for arm, k, units in image_settings:
            key = (units[:, 0] * lm.d_mlp + units[:, 1]).sort().values.numpy().tobytes()
            if key not in unique:
                unique[key] = len(rows)
                rows.append((image, units))
            setting_rows[-1].append(unique[key])

    p_target, captions = [], []
    for start in range(0, len(rows), rows_per_pass):
        chunk = rows[start : start + rows_per_pass]
        images = torch.tensor([image for image, _ in chunk])
        masks = setting_masks([units for _, units in chunk], layers, lm.d_mlp)
        batch = inputs_embeds[images]  # [rows, pos, d_lm]
        with ablate_masks(lm, masks, mode, means, positions):
            if n_prompt is None:
                p_target += target_probabilities(lm, batch, target_positions[images], target_ids[images]).tolist()
            else:
                p, chunk_captions = probability_and_caption(lm, batch, n_prompt, target_positions[images],
                                                            target_ids[images], max_new_tokens)
                p_target += p.tolist()
                captions += chunk_captions
    return [[{"arm": arm, "k": k, "n_ablated": len(units), "p_target": p_target[row],
              "caption_ids": captions[row] if captions else None}
             for (arm, k, units), row in zip(image_settings, image_rows)]
            for image_settings, image_rows in zip(settings, setting_rows)]
