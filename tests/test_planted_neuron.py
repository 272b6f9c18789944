"""A planted multimodal neuron, found by the analysis pipeline's own steps.

A tiny GPT-J is wired by hand: unit 7 of layer 0 fires only on an image patch that carries a
"region" direction r and writes the unembedding direction of the token "circle" into the residual
stream; layer 1 attends uniformly, so that write reaches the position that predicts the caption's
noun. Every other weight is small and random. The pipeline (attribute -> rank -> decode ->
ablate), with the gradient methods and with the gradient-free `logit` (the unit's write read
directly by the unembedding, with and without the final norm), must rank the planted unit first,
decode it to "circle", and zero-ablating it must remove most of p(circle) while ablating as many
random units from the same layer barely moves it.
"""

import mmn  # noqa: F401,I001  (torchvision shim before transformers)

import pytest
import torch

from mmn.analysis.ablation import ablation_settings, ablation_sweep
from mmn.analysis.attribution import attribute, target_probabilities
from mmn.analysis.filter import InterpretableFilter
from mmn.analysis.neurons import UnitDecoder, top_triples, unit_ranking
from mmn.models.lm import LanguageModel

PLANTED_LAYER, PLANTED_UNIT, REGION_PATCH, N_PATCHES = 0, 7, 2, 6


def planted_model(tiny_lm, tiny_tokenizer, d_model: int):
    """The wired GPT-J (tiny_lm("gptj") at width d_model) and the id of "circle"."""
    torch.manual_seed(0)
    lm = LanguageModel(tiny_lm("gptj").eval(), tiny_tokenizer())
    circle = lm.tokenizer.convert_tokens_to_ids("circle")
    # dimension 0 carries "circle", dimension 1 the image region r; inputs keep both at zero elsewhere
    token_direction, region = torch.eye(d_model)[0], torch.eye(d_model)[1]
    with torch.no_grad():
        for name, parameter in lm.model.named_parameters():
            if parameter.dim() == 2 and "ln" not in name:
                parameter.normal_(0, 0.01)
            elif "bias" in name:
                parameter.zero_()
        for layer in range(lm.n_layers):
            block = lm.block(layer)
            block.mlp.fc_in.weight[:, :2] = 0  # no other unit reads or writes the two reserved dimensions
            block.mlp.fc_out.weight[:2] = 0
            for projection in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.attn.out_proj):
                projection.weight.zero_()
        lm.block(1).attn.v_proj.weight.copy_(torch.eye(d_model))  # layer 1: uniform attention, values copied
        lm.block(1).attn.out_proj.weight.copy_(torch.eye(d_model))
        mlp = lm.block(PLANTED_LAYER).mlp
        mlp.fc_in.weight[PLANTED_UNIT] = 2.0 * region  # fires where the region direction is present
        mlp.fc_in.bias[PLANTED_UNIT] = -3.0
        mlp.fc_out.weight[:, PLANTED_UNIT] = 1.0 * token_direction  # ... and writes "circle"
        lm.unembed.weight[:, :2] = 0
        lm.unembed.weight[circle] = 40.0 * token_direction
    return lm, circle


def images(n: int, d_model: int) -> torch.Tensor:
    """n "images" of 6 patches + 3 text positions; patch 2 holds the region. [n, 9, d_model]"""
    inputs = torch.randn(n, N_PATCHES + 3, d_model)
    inputs[..., :2] = 0
    inputs[..., 2:] -= inputs[..., 2:].mean(dim=-1, keepdim=True)  # zero-mean rows: layer norm keeps dim 0 at 0
    inputs[:, REGION_PATCH, 1] = 4.0
    return inputs


@pytest.mark.parametrize("method, options", [("grad", {}), ("ig", {}), ("logit", {}),
                                             ("logit", {"final_norm": True})],
                         ids=["grad", "ig", "logit", "logit-final_norm"])
def test_planted_unit_is_found_decoded_and_causal(tiny_lm, tiny_tokenizer, tiny_lm_sizes, method, options):
    lm, circle = planted_model(tiny_lm, tiny_tokenizer, tiny_lm_sizes.d_model)
    inputs = images(3, lm.d_model)
    positions, targets = torch.full((3,), N_PATCHES + 2), torch.full((3,), circle)
    p_before = target_probabilities(lm, inputs, positions, targets)
    assert (p_before > 0.5).all()  # the planted unit makes "circle" the prediction

    layers = [0, 1]
    scores = attribute(lm, method, inputs, positions, targets, layers, slice(0, N_PATCHES),
                       **options)  # [3, 2, 6, d_mlp]
    decoder = UnitDecoder(lm, InterpretableFilter(top_k=3, min_words=1))
    settings = []
    for image_scores in scores:
        best = top_triples(image_scores, layers, 5)[0]
        assert (best["layer"], best["unit"], best["patch"]) == (PLANTED_LAYER, PLANTED_UNIT, REGION_PATCH)
        ranking = unit_ranking(image_scores, layers)
        assert ranking[0].tolist() == [PLANTED_LAYER, PLANTED_UNIT]
        assert decoder(PLANTED_LAYER, PLANTED_UNIT)[0][0] == "circle"
        image_settings = ablation_settings(ranking, decoder.interpretable_units(ranking, 1), [0, 1], lm.d_mlp,
                                           torch.Generator().manual_seed(0))
        settings.append(image_settings)

    results = ablation_sweep(lm, inputs, positions, targets, settings, layers)
    for image, image_results in enumerate(results):
        by_arm = {(r["arm"], r["k"]): r for r in image_results}
        random_units = [s for s in settings[image] if s[:2] == ("random", 1)][0][2]
        assert random_units.tolist() != [[PLANTED_LAYER, PLANTED_UNIT]]
        assert by_arm[("top", 0)]["p_target"] == pytest.approx(p_before[image].item(), rel=1e-5)
        assert by_arm[("top", 1)]["p_target"] < 0.1 * p_before[image]  # at least 90% lower
        assert abs(by_arm[("random", 1)]["p_target"] / p_before[image] - 1) < 0.1  # under 10% change
