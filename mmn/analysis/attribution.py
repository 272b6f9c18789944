"""Attributing the logit of a caption's target token c to MLP units, per (layer, unit, patch).

Four methods, one signature (`attribute(lm, method, ...)`), each returning
[batch, len(layers), n_positions, d_mlp]:

- `grad` (paper eq. 2):  g[l, p, k] = Z[l, p, k] * d y^c / d Z[l, p, k]
  Z is the pre-activation of layer l's MLP (the output of its first projection, before the
  activation) and y^c the logit of c at the position that predicts it. All layers come from one
  forward and one backward pass: a hook on each Z receives dy^c/dZ (every path through the layers
  above intact) as the backward pass goes through it and writes Z * dy^c/dZ into the output, so no
  layer's gradient is kept; the backward pass stops at the lowest hooked layer (made a leaf that
  requires grad; the frozen LM has no parameter gradients).
- `ig`, integrated gradients per layer as in Dai et al. ("Knowledge neurons", eq. 3): layer l's
  pre-activations Z (all positions) are scaled from the baseline 0 to their value,
      ig[l, p, k] = Z[l, p, k] * sum_s w_s * d y^c / d Z[l, p, k] evaluated at alpha_s * Z_l,
  with everything below layer l held fixed. The rule (alpha_s, w_s) is captum's; the default
  `riemann_right` (alpha_s = s/m, w_s = 1/m) is Dai et al.'s sum. The steps are batched, and
  the layers below l run once per batch of steps: the block input of layer l is repeated for
  the steps inside the forward pass, so only layers l and above run steps x batch rows.
- `act`: the unit activation A = act(Z) (what ablation replaces), a baseline with no gradient.
- `logit`: the unit's direct contribution to y^c, the score MM_Neurons (Pan et al., "Finding and
  editing multi-modal neurons in pre-trained transformers") uses in place of gradients:
      logit[l, p, k] = A[l, p, k] * (W_U[c] . W_out[:, k])
  A the unit activation (as for `act`), W_out[:, k] what unit k writes per unit of activation
  (`LanguageModel.unit_out_directions`), W_U[c] the unembedding row of each image's target. One
  forward pass with hooks, no backward; W_U[c] . W_out is a [batch, d_mlp] product per layer
  (never [vocab, d_mlp]). `final_norm=True` passes W_out[:, k] through the final norm's linear
  part as the target position sees it: centred (LayerNorm only, not RMSNorm), times the norm's
  weight gamma, divided by the norm's scale at the target position (LayerNorm sqrt(var + eps),
  RMSNorm sqrt(mean(x^2) + eps) of the final norm's input there, read by a hook).
  It is the logit lens on one unit's write, so it ignores everything that is not direct: the
  attention that carries the write from an image patch p to the target position (the score is
  the same whether or not any later layer reads patch p), every layer above l (their attention,
  MLPs and norms, and what they make of the write), the final norm's dependence on the write
  (its scale is held at its value; without `final_norm` the norm is skipped altogether), and
  the unembedding's bias (the same for every unit). A unit whose write has no component along
  W_U[c] scores 0 here, whatever later layers make of that write.

Only the logits of the target positions are computed, never the [rows, pos, vocab] tensor,
which would be the largest tensor of these passes (20 IG steps x 8 images x 200 positions x a
50k vocabulary is 6.4 GB of float32).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from captum.attr._utils.approximation_methods import SUPPORTED_METHODS, approximation_parameters
from torch import Tensor

from mmn.models.lm import LanguageModel

METHODS = ("grad", "ig", "act", "logit")
IG_RULES = tuple(SUPPORTED_METHODS)  # riemann_left/right/middle/trapezoid, gausslegendre


def logits_at(lm: LanguageModel, hidden: Tensor, positions: Tensor) -> Tensor:
    """Full-vocabulary logits at one position per row: hidden [rows, pos, d_model] -> [rows, vocab]."""
    rows = torch.arange(len(hidden), device=hidden.device)
    return lm.unembed(hidden[rows, positions.to(hidden.device)])


def target_logits(lm: LanguageModel, inputs_embeds: Tensor, target_positions: Tensor, target_ids: Tensor) -> Tensor:
    """y^c: the logit of target_ids[b] at position target_positions[b].  -> [batch]

    inputs_embeds [batch, pos, d_model]; rows may be right-padded beyond their target position
    (causal attention never lets a position see what follows it)."""
    logits = logits_at(lm, lm.final_hidden(inputs_embeds), target_positions)  # [batch, vocab]
    return logits[torch.arange(len(logits)), target_ids.to(logits.device)]


@torch.no_grad()
def target_probabilities(lm: LanguageModel, inputs_embeds: Tensor, target_positions: Tensor,
                         target_ids: Tensor) -> Tensor:
    """p(c): the softmax over the tokenizer's real vocabulary at each row's target position.  -> [rows]"""
    logits = logits_at(lm, lm.final_hidden(inputs_embeds), target_positions)[:, : lm.vocab_size]  # [rows, vocab]
    probabilities = logits.float().softmax(dim=-1)
    return probabilities[torch.arange(len(probabilities)), target_ids.to(probabilities.device)]


def _check_layers(lm: LanguageModel, layers: Sequence[int]) -> list[torch.nn.Module]:
    if not layers:
        raise ValueError("attribution: no layers given")
    return [lm.mlp_in(layer) for layer in layers]  # raises on a layer outside the model


def grad_attribution(lm: LanguageModel, inputs_embeds: Tensor, target_positions: Tensor, target_ids: Tensor,
                     layers: Sequence[int], positions: Tensor | slice) -> Tensor:
    """Z * dy^c/dZ for every unit of `layers` at `positions` (the image patches).
    -> [batch, len(layers), n_positions, d_mlp]"""
    modules = _check_layers(lm, layers)
    scores: list[Tensor] = []  # the output, allocated when the lowest Z shows its shape and dtype
    lowest: list[Tensor] = []  # the lowest hooked Z, where the backward pass may stop

    def keep(module, args, output, index):
        z = output.detach()[:, positions]  # [batch, n_positions, d_mlp]
        if not lowest:  # the forward pass meets the lowest hooked layer first
            output.requires_grad_()  # nothing below asks for its gradient: make it a leaf that does
            lowest.append(output)
            scores.append(z.new_empty(len(z), len(modules), *z.shape[1:]))

        def multiply(gradient):
            # called once the backward pass reaches this Z: its gradient is dy/dZ with every path above
            # intact, used here and then freed, so no layer's gradient outlives its own step
            torch.mul(z, gradient[:, positions], out=scores[0][:, index])

        output.register_hook(multiply)

    hooks = [(module, partial(keep, index=index)) for index, module in enumerate(modules)]
    with lm.hooks(forward=hooks), torch.enable_grad():
        logit = target_logits(lm, inputs_embeds.detach(), target_positions, target_ids)
        torch.autograd.grad(logit.sum(), lowest)  # runs every hook above on the way down
    return scores[0]


def _repeat_rows(value, batch: int, times: int):
    """Repeat every tensor whose first dimension is the batch (hidden states, attention masks),
    inside tuples too (rotary cos/sin); leave the rest (positions shared by all rows) alone."""
    if isinstance(value, Tensor) and value.dim() >= 2 and value.shape[0] == batch:
        return value.repeat(times, *[1] * (value.dim() - 1))
    if isinstance(value, tuple):
        return tuple(_repeat_rows(v, batch, times) for v in value)
    return value


def ig_layer(lm: LanguageModel, inputs_embeds: Tensor, target_positions: Tensor, target_ids: Tensor,
             layer: int, positions: Tensor | slice, steps: int = 20, rule: str = "riemann_right",
             steps_per_pass: int | None = None) -> Tensor:
    """Integrated gradients of y^c over layer `layer`'s pre-activations (baseline 0).
    -> [batch, n_positions, d_mlp]

    `steps_per_pass` bounds memory: that many steps run per forward/backward pass (default all)."""
    if rule not in IG_RULES:
        raise ValueError(f"ig: unknown rule {rule!r}; use one of {IG_RULES}")
    if steps < 1 or (rule.startswith("riemann") and steps < 2):
        raise ValueError(f"ig: steps={steps} must be at least {2 if rule.startswith('riemann') else 1} for {rule}")
    step_sizes, alphas = approximation_parameters(rule)
    weights, alphas = torch.tensor(step_sizes(steps)), torch.tensor(alphas(steps))  # [steps] each
    block, mlp_in = lm.block(layer), lm.mlp_in(layer)
    blocks_above = [lm.block(above) for above in range(layer % lm.n_layers + 1, lm.n_layers)]
    batch = len(inputs_embeds)
    pre_activation = None  # Z of layer `layer`, [batch, pos, d_mlp]
    total = 0.0  # sum_s w_s dy/dZ(alpha_s Z), [batch, pos, d_mlp]
    for chunk in torch.split(torch.arange(steps), steps_per_pass or steps):
        n = len(chunk)
        scale = alphas[chunk].repeat_interleave(batch).to(inputs_embeds.device, inputs_embeds.dtype)  # [n*batch]
        scaled = {}

        def repeat_inputs(module, args, kwargs):
            # the layers below ran once; from here on each row is (step, image), step-major
            return _repeat_rows(args, batch, n), {k: _repeat_rows(v, batch, n) for k, v in kwargs.items()}

        def scale_pre_activation(module, args, output):
            nonlocal pre_activation
            pre_activation = output[:batch].detach().clone()  # a view would keep all n*batch rows alive
            scaled["z"] = (output.detach() * scale[:, None, None]).requires_grad_()  # [n*batch, pos, d_mlp]
            return scaled["z"]

        # the blocks above receive the model's batch-sized masks: repeat those too
        with lm.hooks(forward=[(mlp_in, scale_pre_activation)],
                      pre_with_kwargs=[(each, repeat_inputs) for each in [block, *blocks_above]]), torch.enable_grad():
            hidden = lm.final_hidden(inputs_embeds.detach())  # [n*batch, pos, d_model]
            logits = logits_at(lm, hidden, target_positions.repeat(n))  # [n*batch, vocab]
            logit = logits[torch.arange(len(logits)), target_ids.to(logits.device).repeat(n)]
            (gradient,) = torch.autograd.grad(logit.sum(), scaled["z"])
        step_weights = weights[chunk].to(gradient.device, gradient.dtype)
        total = total + torch.einsum("s,sbpk->bpk", step_weights, gradient.unflatten(0, (n, batch)))
    return (pre_activation * total)[:, positions]


def ig_attribution(lm: LanguageModel, inputs_embeds: Tensor, target_positions: Tensor, target_ids: Tensor,
                   layers: Sequence[int], positions: Tensor | slice, steps: int = 20, rule: str = "riemann_right",
                   steps_per_pass: int | None = None) -> Tensor:
    """Integrated gradients, one layer at a time.  -> [batch, len(layers), n_positions, d_mlp]"""
    _check_layers(lm, layers)
    return torch.stack([ig_layer(lm, inputs_embeds, target_positions, target_ids, layer, positions, steps, rule,
                                 steps_per_pass) for layer in layers], dim=1)


def ig_completeness(lm: LanguageModel, inputs_embeds: Tensor, target_positions: Tensor, target_ids: Tensor,
                    layers: Sequence[int], steps: int = 20, rule: str = "riemann_right",
                    steps_per_pass: int | None = None) -> list[dict]:
    """IG's completeness check per image and layer: its scores over every position and unit sum to
    y^c(Z) - y^c(0) (the logit with the layer's pre-activations zeroed) up to the integration
    error, which shrinks with more steps; a large gap says `steps` is too few.
    -> one row per (image row, layer): layer, scores_sum, logit_change, gap (|sum - change|),
    relative_gap (gap / |change|)"""
    _check_layers(lm, layers)
    def zero(module, args, output):
        return torch.zeros_like(output)

    full = target_logits(lm, inputs_embeds, target_positions, target_ids).detach()  # [batch]
    rows = []
    for layer in layers:
        with torch.no_grad(), lm.hooks(forward=[(lm.mlp_in(layer), zero)]):
            zeroed = target_logits(lm, inputs_embeds, target_positions, target_ids)  # [batch]
        total = ig_layer(lm, inputs_embeds, target_positions, target_ids, layer, slice(None), steps, rule,
                         steps_per_pass).float().sum(dim=(1, 2))  # [batch]
        change = (full - zeroed).float()
        for b, (scores_sum, logit_change) in enumerate(zip(total.tolist(), change.tolist())):
            gap = abs(scores_sum - logit_change)
            rows.append({"row": b, "layer": layer, "scores_sum": scores_sum, "logit_change": logit_change,
                         "gap": gap, "relative_gap": gap / abs(logit_change) if logit_change else float("nan")})
    return rows


@torch.no_grad()
def act_attribution(lm: LanguageModel, inputs_embeds: Tensor, target_positions: Tensor, target_ids: Tensor,
                    layers: Sequence[int], positions: Tensor | slice) -> Tensor:
    """The unit activations A (the input of each MLP's output projection); the target is unused.
    -> [batch, len(layers), n_positions, d_mlp]"""
    _check_layers(lm, layers)
    modules = [lm.mlp_out(layer) for layer in layers]
    activations = {}

    def capture(module, args):
        activations[module] = args[0][:, positions]

    with lm.hooks(pre=[(module, capture) for module in modules]):
        lm.final_hidden(inputs_embeds)
    return torch.stack([activations[module] for module in modules], dim=1)


def _final_norm_parts(lm: LanguageModel) -> tuple[bool, Tensor | None, float]:
    """The final norm's linear part: (whether it centres its input, its weight gamma or None, eps).
    LayerNorm (GPT-J, GPT-2, GPT-NeoX) centres; RMSNorm (Llama, Mistral, Qwen2) does not."""
    norm = lm.final_norm
    if isinstance(norm, torch.nn.LayerNorm):
        return True, norm.weight, norm.eps
    if hasattr(norm, "variance_epsilon"):  # LlamaRMSNorm and its copies: weight * x / sqrt(mean(x^2) + eps)
        return False, norm.weight, norm.variance_epsilon
    raise ValueError(f"logit: final_norm=True does not know the final norm {type(norm).__name__} of "
                     f"{lm.family.name} (LayerNorm or RMSNorm only)")


@torch.no_grad()
def logit_attribution(lm: LanguageModel, inputs_embeds: Tensor, target_positions: Tensor, target_ids: Tensor,
                      layers: Sequence[int], positions: Tensor | slice, final_norm: bool = False) -> Tensor:
    """A[l, p, k] * (W_U[c] . W_out[:, k]): each unit's direct contribution to y^c, from one forward
    pass (hooks on the MLP output projections, and with `final_norm` on the final norm's input).
    -> [batch, len(layers), n_positions, d_mlp]"""
    _check_layers(lm, layers)
    modules = [lm.mlp_out(layer) for layer in layers]
    rows = torch.arange(len(inputs_embeds))
    unembedding = lm.unembed.weight.detach()  # [vocab, d_model]
    readout = unembedding[target_ids.to(unembedding.device)].float()  # W_U[c] per row, [batch, d_model]
    if final_norm:
        centred, gamma, eps = _final_norm_parts(lm)
        if gamma is not None:
            readout = readout * gamma.detach().to(readout.device).float()  # W_U[c] * gamma, [batch, d_model]
        if centred:  # (d - mean(d)) . u = d . (u - mean(u)): centre the readout once, not every direction
            readout = readout - readout.mean(dim=-1, keepdim=True)
    coefficients = []  # per layer: W_U[c] . W_out[:, k], [batch, d_mlp]
    for layer in layers:
        directions = lm.unit_out_directions(layer)  # [d_mlp, d_model]
        coefficients.append(readout.to(directions.device, directions.dtype) @ directions.T)  # [batch, d_mlp]
    scores: list[Tensor] = []  # the output, allocated when the first hooked layer shows A's shape and dtype
    norm_input: list[Tensor] = []  # the final norm's input at the target positions, [batch, d_model]

    def multiply(module, args, index):
        activation = args[0][:, positions]  # A, [batch, n_positions, d_mlp]
        if not scores:
            scores.append(activation.new_empty(len(activation), len(modules), *activation.shape[1:]))
        out = scores[0][:, index]  # [batch, n_positions, d_mlp], a view of the output
        coefficient = coefficients[index].to(out.device, out.dtype)[:, None]  # [batch, 1, d_mlp]
        torch.mul(activation.to(out.device), coefficient, out=out)

    def capture_norm_input(module, args):
        hidden = args[0]  # [batch, pos, d_model]
        norm_input.append(hidden[rows.to(hidden.device), target_positions.to(hidden.device)].float())

    hooks = [(module, partial(multiply, index=index)) for index, module in enumerate(modules)]
    if final_norm:
        hooks.append((lm.final_norm, capture_norm_input))
    with lm.hooks(pre=hooks):
        lm.final_hidden(inputs_embeds)
    if final_norm:
        x = norm_input[0]  # [batch, d_model]
        spread = x.var(dim=-1, unbiased=False) if centred else x.pow(2).mean(dim=-1)  # [batch]
        inverse_scale = torch.rsqrt(spread + eps)  # 1 / the norm's scale at the target position, [batch]
        scores[0].mul_(inverse_scale.to(scores[0].device, scores[0].dtype)[:, None, None, None])
    return scores[0]


def attribute(lm: LanguageModel, method: str, inputs_embeds: Tensor, target_positions: Tensor, target_ids: Tensor,
              layers: Sequence[int], positions: Tensor | slice, **options) -> Tensor:
    """Scores per (layer, unit, position) by `method` ("grad", "ig" with steps/rule/steps_per_pass, "act",
    "logit" with final_norm).  -> [batch, len(layers), n_positions, d_mlp]"""
    functions = {"grad": grad_attribution, "ig": ig_attribution, "act": act_attribution, "logit": logit_attribution}
    if method not in functions:
        raise ValueError(f"unknown attribution method {method!r}; use one of {METHODS}")
    return functions[method](lm, inputs_embeds, target_positions, target_ids, layers, positions, **options)
