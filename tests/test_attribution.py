"""Gradient attribution (paper eq. 2) against captum's LayerGradientXActivation, on tiny models."""

import mmn  # noqa: F401,I001  (torchvision shim before transformers)

import pytest
import torch
from captum.attr import IntegratedGradients, LayerGradientXActivation

from mmn.analysis.attribution import attribute, grad_attribution, ig_attribution, target_logits
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
