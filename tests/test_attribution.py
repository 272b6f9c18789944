"""Attribution on tiny models: grad (paper eq. 2) and ig against captum, act and logit against
explicit computations."""

import mmn  # noqa: F401,I001  (torchvision shim before transformers)

import pytest
import torch
from captum.attr import IntegratedGradients, LayerGradientXActivation

from mmn.analysis.attribution import (
    attribute,
    grad_attribution,
    ig_attribution,
    ig_completeness,
    logit_attribution,
    target_logits,
)
from mmn.models.lm import LanguageModel


@pytest.fixture(params=["gptj", "gpt2", "llama"])
def lm(request, tiny_lm, tiny_tokenizer):
    torch.manual_seed(0)
    return LanguageModel(tiny_lm(request.param).eval(), tiny_tokenizer())


def model_target_logits(lm, inputs, target_positions, target_ids):
    """y^c from the model's own forward (all logits at every position): the reference for captum,
    independent of mmn's target-only pass."""
    logits = lm.model(inputs_embeds=inputs).logits  # [rows, pos, vocab]
    return logits[torch.arange(len(logits)), target_positions, target_ids]


def test_grad_matches_captum_over_all_layers(lm, tiny_lm_sizes):
    torch.manual_seed(1)
    inputs = torch.randn(3, 9, lm.d_model)  # 6 "image patches" + 3 text positions, right-padded rows
    target_positions, target_ids = torch.tensor([8, 7, 6]), torch.tensor([4, 11, 2])
    layers = list(range(lm.n_layers))
    patches = slice(0, 6)
    ours = grad_attribution(lm, inputs, target_positions, target_ids, layers, patches)  # [3, L, 6, d_mlp]

    captum = LayerGradientXActivation(lambda x: model_target_logits(lm, x, target_positions, target_ids),
                                      [lm.mlp_in(layer) for layer in layers])
    theirs = torch.stack([a[:, patches] for a in captum.attribute(inputs)], dim=1)
    assert ours.shape == (3, lm.n_layers, 6, tiny_lm_sizes.d_mlp)
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_grad_over_some_layers_and_positions_is_the_same_slice_of_all(lm, tiny_lm_sizes):
    torch.manual_seed(3)
    inputs = torch.randn(2, 9, lm.d_model)
    target_positions, target_ids = torch.tensor([8, 6]), torch.tensor([4, 2])
    every = grad_attribution(lm, inputs, target_positions, target_ids, list(range(lm.n_layers)), slice(0, 9))
    layers, positions = [1, lm.n_layers - 1], torch.tensor([0, 2, 5])
    some = grad_attribution(lm, inputs, target_positions, target_ids, layers, positions)  # [2, 2, 3, d_mlp]
    assert some.shape == (2, 2, 3, tiny_lm_sizes.d_mlp)
    torch.testing.assert_close(some, every[:, layers][:, :, positions])


def test_padding_after_the_target_changes_nothing(lm):
    torch.manual_seed(2)
    inputs = torch.randn(1, 6, lm.d_model)
    padded = torch.cat([inputs, torch.randn(1, 4, lm.d_model)], dim=1)
    args = (torch.tensor([5]), torch.tensor([3]), [0, 1], slice(0, 4))
    torch.testing.assert_close(grad_attribution(lm, inputs, *args), grad_attribution(lm, padded, *args))


def test_bad_layers_are_named(lm):
    with pytest.raises(IndexError, match="layer 5 out of range"):
        grad_attribution(lm, torch.randn(1, 4, lm.d_model), torch.tensor([3]), torch.tensor([1]), [0, 5], slice(0, 2))
    with pytest.raises(ValueError, match="no layers"):
        grad_attribution(lm, torch.randn(1, 4, lm.d_model), torch.tensor([3]), torch.tensor([1]), [], slice(0, 2))


def captum_ig_layer(lm, inputs, target_positions, target_ids, layer, steps, rule):
    """captum's IntegratedGradients over one layer's pre-activations Z: the forward function takes
    Z (as many rows as captum asks for) and runs the whole model with Z put in place of layer
    `layer`'s; everything below that layer is recomputed from the same inputs, so held fixed."""
    with torch.no_grad():
        z = act_like_pre_activation(lm, inputs, layer)

    def forward(z_rows, inputs_rows, positions_rows, ids_rows):
        handle = lm.mlp_in(layer).register_forward_hook(lambda module, args, output: z_rows)
        try:
            return model_target_logits(lm, inputs_rows, positions_rows, ids_rows)
        finally:
            handle.remove()

    return IntegratedGradients(forward).attribute(z, baselines=torch.zeros_like(z), n_steps=steps, method=rule,
                                                  additional_forward_args=(inputs, target_positions, target_ids))


def act_like_pre_activation(lm, inputs, layer):
    captured = []
    handle = lm.mlp_in(layer).register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        target_logits(lm, inputs, torch.tensor([0] * len(inputs)), torch.tensor([0] * len(inputs)))
    finally:
        handle.remove()
    return captured[0]


@pytest.mark.parametrize("rule", ["riemann_right", "riemann_trapezoid"])
def test_ig_matches_captum_layer_by_layer(lm, tiny_lm_sizes, rule):
    torch.manual_seed(3)
    inputs = torch.randn(2, 9, lm.d_model)
    target_positions, target_ids = torch.tensor([8, 6]), torch.tensor([4, 11])
    patches = slice(0, 6)
    ours = ig_attribution(lm, inputs, target_positions, target_ids, [0, 1], patches, steps=7, rule=rule)
    assert ours.shape == (2, 2, 6, tiny_lm_sizes.d_mlp) and ours.abs().max() > 0
    for i, layer in enumerate([0, 1]):
        theirs = captum_ig_layer(lm, inputs, target_positions, target_ids, layer, 7, rule)[:, patches]
        torch.testing.assert_close(ours[:, i], theirs, rtol=1e-4, atol=1e-6)
    # steps split over several passes give the same numbers
    chunked = ig_attribution(lm, inputs, target_positions, target_ids, [0, 1], patches, steps=7, rule=rule,
                             steps_per_pass=3)
    torch.testing.assert_close(chunked, ours, rtol=1e-5, atol=1e-7)


def test_ig_completeness_on_the_last_layer(lm):
    """Integrated gradients sum to y^c(Z) - y^c(0) over all positions and units (completeness),
    up to the Riemann error, which shrinks with more steps."""
    torch.manual_seed(4)
    inputs = torch.randn(1, 7, lm.d_model)
    target_positions, target_ids = torch.tensor([6]), torch.tensor([5])
    last = lm.n_layers - 1
    full = target_logits(lm, inputs, target_positions, target_ids)
    zero_hook = lm.mlp_in(last).register_forward_hook(lambda module, args, output: torch.zeros_like(output))
    try:
        baseline = target_logits(lm, inputs, target_positions, target_ids)
    finally:
        zero_hook.remove()
    errors = []
    for steps in (4, 64):
        total = ig_attribution(lm, inputs, target_positions, target_ids, [last], slice(None), steps=steps,
                               rule="riemann_trapezoid").sum()
        errors.append(abs(total - (full - baseline)).item())
    assert errors[1] < errors[0] and errors[1] < 1e-3 * max(1.0, abs((full - baseline).item()))


def test_ig_completeness_reports_the_gap_of_each_layer(lm):
    torch.manual_seed(4)
    inputs = torch.randn(2, 7, lm.d_model)
    target_positions, target_ids = torch.tensor([6, 4]), torch.tensor([5, 3])
    coarse, fine = (ig_completeness(lm, inputs, target_positions, target_ids, range(lm.n_layers), steps=steps,
                                    rule="riemann_trapezoid") for steps in (4, 64))
    assert [(row["row"], row["layer"]) for row in fine] == [(b, layer) for layer in range(lm.n_layers) for b in (0, 1)]
    for row in fine:  # the same sum and logit change as computed by hand
        layer, b = row["layer"], row["row"]
        scores = ig_attribution(lm, inputs, target_positions, target_ids, [layer], slice(None), steps=64,
                                rule="riemann_trapezoid")[b].sum()
        assert row["scores_sum"] == pytest.approx(scores.item(), rel=1e-5, abs=1e-6)
        assert row["gap"] == pytest.approx(abs(row["scores_sum"] - row["logit_change"]))
    assert sum(row["gap"] for row in fine) < sum(row["gap"] for row in coarse)
    assert max(row["relative_gap"] for row in fine) < 0.05  # 64 trapezoid steps: within 5% on every layer


def test_act_is_the_unit_activation_and_methods_dispatch(lm):
    torch.manual_seed(5)
    inputs = torch.randn(2, 5, lm.d_model)
    captured = []
    handle = lm.mlp_out(1).register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        lm.model(inputs_embeds=inputs)
    finally:
        handle.remove()
    scores = attribute(lm, "act", inputs, torch.tensor([4, 4]), torch.tensor([1, 1]), [1], slice(0, 3))
    torch.testing.assert_close(scores[:, 0], captured[0][:, :3])
    with pytest.raises(ValueError, match="unknown attribution method 'saliency'"):
        attribute(lm, "saliency", inputs, torch.tensor([4, 4]), torch.tensor([1, 1]), [1], slice(0, 3))
    with pytest.raises(ValueError, match="unknown rule"):
        attribute(lm, "ig", inputs, torch.tensor([4, 4]), torch.tensor([1, 1]), [1], slice(0, 3), rule="simpson")


def test_ig_runs_the_layers_below_once_per_pass(lm):
    """Layer 0 sees the batch's rows only; layer 1 (integrated) sees steps x batch rows."""
    rows = {0: [], 1: []}
    hooks = [lm.mlp_in(layer).register_forward_hook(lambda module, args, output, layer=layer: rows[layer].append(len(output)))
             for layer in (0, 1)]
    try:
        ig_attribution(lm, torch.randn(2, 5, lm.d_model), torch.tensor([4, 3]), torch.tensor([1, 2]), [1],
                       slice(0, 3), steps=6)
    finally:
        for hook in hooks:
            hook.remove()
    assert rows == {0: [2], 1: [12]}


def captured_activations(lm, inputs, layers):
    """A of each layer from the model's own forward: {layer: [batch, pos, d_mlp]}."""
    captured = {}
    hooks = [lm.mlp_out(layer).register_forward_pre_hook(
        lambda module, args, layer=layer: captured.__setitem__(layer, args[0])) for layer in layers]
    try:
        lm.model(inputs_embeds=inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def final_norm_input(lm, inputs):
    """The final norm's input from the model's own forward: [batch, pos, d_model]."""
    captured = []
    hook = lm.final_norm.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        lm.model(inputs_embeds=inputs)
    finally:
        hook.remove()
    return captured[0]


def explicit_direction(lm, layer, unit, x, final_norm):
    """What unit `unit` writes per unit of activation, [d_model], read off the weights by hand (Linear
    [d_model, d_mlp] or GPT-2's Conv1D [d_mlp, d_model]); with final_norm, through the final norm's
    linear part at the residual x [d_model]: centred (LayerNorm), times gamma, over the norm's scale."""
    weight = lm.mlp_out(layer).weight
    direction = weight[unit] if lm.family.conv1d else weight[:, unit]
    if not final_norm:
        return direction
    norm = lm.final_norm
    if isinstance(norm, torch.nn.LayerNorm):
        return (direction - direction.mean()) * norm.weight / torch.sqrt(x.var(unbiased=False) + norm.eps)
    return direction * norm.weight / torch.sqrt((x**2).mean() + norm.variance_epsilon)  # RMSNorm


@pytest.mark.parametrize("final_norm", [False, True])
def test_logit_is_the_activation_times_the_direct_logit_of_the_write(lm, tiny_lm_sizes, final_norm):
    torch.manual_seed(6)
    with torch.no_grad():  # a final norm weight that is not all ones, so that gamma counts
        lm.final_norm.weight.uniform_(0.5, 1.5)
    inputs = torch.randn(3, 9, lm.d_model)
    target_positions, target_ids = torch.tensor([8, 7, 6]), torch.tensor([4, 11, 2])
    layers, positions = [1, 0], torch.tensor([0, 2, 3, 5])
    ours = attribute(lm, "logit", inputs, target_positions, target_ids, layers, positions, final_norm=final_norm)
    assert ours.shape == (3, 2, 4, tiny_lm_sizes.d_mlp) and ours.abs().max() > 0

    with torch.no_grad():
        activations = captured_activations(lm, inputs, layers)
        residual = final_norm_input(lm, inputs)
        expected = torch.empty_like(ours)
        for b in range(3):
            w_u = lm.unembed.weight[target_ids[b]]  # [d_model]
            x = residual[b, target_positions[b]]  # [d_model]
            for i, layer in enumerate(layers):
                coefficient = torch.stack([w_u @ explicit_direction(lm, layer, k, x, final_norm)
                                           for k in range(lm.d_mlp)])  # [d_mlp]
                expected[b, i] = activations[layer][b, positions] * coefficient
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_logit_with_the_final_norm_sums_to_the_last_mlps_direct_logit(lm):
    """Through the final norm's linear part, the last layer's units at the target position add up to
    what the MLP's output (less its bias) adds to y^c with the norm's scale held: the direct effect."""
    torch.manual_seed(7)
    inputs = torch.randn(2, 7, lm.d_model)
    target_positions, target_ids = torch.tensor([6, 4]), torch.tensor([3, 9])
    last = lm.n_layers - 1
    scores = logit_attribution(lm, inputs, target_positions, target_ids, [last], slice(None), final_norm=True)
    with torch.no_grad():
        activation = captured_activations(lm, inputs, [last])[last]  # [2, pos, d_mlp]
        written = activation @ lm.unit_out_directions(last)  # the MLP's output less its bias, [2, pos, d_model]
        residual = final_norm_input(lm, inputs)
        norm = lm.final_norm
        for b in range(2):
            x, write = residual[b, target_positions[b]], written[b, target_positions[b]]
            if isinstance(norm, torch.nn.LayerNorm):
                linear = (write - write.mean()) * norm.weight / torch.sqrt(x.var(unbiased=False) + norm.eps)
            else:
                linear = write * norm.weight / torch.sqrt((x**2).mean() + norm.variance_epsilon)
            direct = lm.unembed.weight[target_ids[b]] @ linear
            torch.testing.assert_close(scores[b, 0, target_positions[b]].sum(), direct, rtol=1e-4, atol=1e-5)


def test_logit_costs_one_forward_pass_and_no_backward(lm):
    calls = []
    hook = lm.block(0).register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    try:
        scores = logit_attribution(lm, torch.randn(2, 5, lm.d_model), torch.tensor([4, 3]), torch.tensor([1, 2]),
                                   list(range(lm.n_layers)), slice(0, 3), final_norm=True)
    finally:
        hook.remove()
    assert calls == [2] and not scores.requires_grad


def test_logit_settings_reach_attribute_and_are_checked():
    from mmn.config import compose
    from mmn.recipes.run import attribution_options, check_analysis_settings

    cfg = compose(["attribution=logit"], config_name="analyze")
    assert attribution_options(cfg) == {"final_norm": False}
    check_analysis_settings(cfg)
    assert attribution_options(compose(["attribution=logit", "attribution.final_norm=true"],
                                       config_name="analyze")) == {"final_norm": True}
    with pytest.raises(ValueError, match="attribution.final_norm='yes' must be true or false"):
        check_analysis_settings(compose(["attribution=logit", "attribution.final_norm=yes"], config_name="analyze"))
