"""Gradient attribution (paper eq. 2) against captum's LayerGradientXActivation, on tiny models."""

import mmn  # noqa: F401,I001  (torchvision shim before transformers)

import pytest
import torch
from captum.attr import LayerGradientXActivation
from test_lm import build_tiny, build_tokenizer, D_MLP

from mmn.analysis.attribution import grad_attribution, target_logits
from mmn.models.lm import LanguageModel


@pytest.fixture(params=["gptj", "gpt2", "llama"])
def lm(request):
    torch.manual_seed(0)
    return LanguageModel(build_tiny(request.param).eval(), build_tokenizer())


def test_grad_matches_captum_over_all_layers(lm):
    torch.manual_seed(1)
    inputs = torch.randn(3, 9, lm.d_model)  # 6 "image patches" + 3 text positions, right-padded rows
    target_positions, target_ids = torch.tensor([8, 7, 6]), torch.tensor([4, 11, 2])
    layers = list(range(lm.n_layers))
    patches = slice(0, 6)
    ours = grad_attribution(lm, inputs, target_positions, target_ids, layers, patches)  # [3, L, 6, d_mlp]

    captum = LayerGradientXActivation(lambda x: target_logits(lm, x, target_positions, target_ids),
                                      [lm.mlp_in(layer) for layer in layers])
    theirs = torch.stack([a[:, patches] for a in captum.attribute(inputs)], dim=1)
    assert ours.shape == (3, lm.n_layers, 6, D_MLP)
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


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
