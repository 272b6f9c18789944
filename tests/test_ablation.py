"""Ablation hooks: ablated units read zero (or their mean), every other activation of the layer is
unchanged, and the hooks are gone after the block, on a plain (GPT-J) and a gated (Llama) MLP."""

import mmn  # noqa: F401,I001  (torchvision shim before transformers)

import pytest
import torch

from mmn.analysis.ablation import ablate, parse_size, resolve_sizes
from mmn.models.lm import LanguageModel


@pytest.fixture(params=["gptj", "llama"])
def lm(request, tiny_lm, tiny_tokenizer):
    torch.manual_seed(0)
    return LanguageModel(tiny_lm(request.param).eval(), tiny_tokenizer())


def activations(lm: LanguageModel, ids: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """A (the output projection's input) of every layer, [batch, pos, d_mlp], and the logits."""
    seen = {}
    handles = [lm.mlp_out(layer).register_forward_hook(lambda m, i, o, layer=layer: seen.__setitem__(layer, i[0]))
               for layer in range(lm.n_layers)]
    try:
        with torch.no_grad():
            logits = lm.model(input_ids=ids).logits
    finally:
        for handle in handles:
            handle.remove()
    return seen, logits


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_ablated_units_read_their_value_and_the_rest_is_unchanged(lm, tiny_lm_sizes, mode):
    d_mlp = tiny_lm_sizes.d_mlp
    ids = torch.randint(2, 20, (2, 7))
    clean, clean_logits = activations(lm, ids)
    means = {layer: torch.randn(d_mlp) for layer in range(lm.n_layers)}
    units = [3, 40, 95]
    with ablate(lm, {0: units}, mode=mode, means=means):
        ablated, ablated_logits = activations(lm, ids)

    expected = torch.zeros(2, 7, len(units)) if mode == "zero" else means[0][units].expand(2, 7, -1)
    assert torch.equal(ablated[0][..., units], expected)
    others = torch.ones(d_mlp, dtype=torch.bool)
    others[units] = False
    assert torch.equal(ablated[0][..., others], clean[0][..., others])  # same input to layer 0's MLP
    assert not torch.allclose(ablated[1], clean[1])  # the change reaches the next layer
    assert not torch.allclose(ablated_logits, clean_logits)
    after, after_logits = activations(lm, ids)  # hooks removed on exit
    assert torch.equal(after_logits, clean_logits) and torch.equal(after[0], clean[0])


def test_ablation_holds_during_cached_generation(lm):
    ids = torch.randint(2, 20, (1, 5))
    seen = []
    hook = lm.mlp_out(1).register_forward_hook(lambda m, i, o: seen.append(i[0][..., :8].clone()))
    try:
        with ablate(lm, {1: range(8)}), torch.no_grad():
            lm.model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=1)
    finally:
        hook.remove()
    assert len(seen) == 3 and [s.shape[1] for s in seen] == [5, 1, 1]  # prompt pass, then one token at a time
    assert all(torch.equal(s, torch.zeros_like(s)) for s in seen)


def test_bad_ablations_are_named_before_any_hook(lm):
    with pytest.raises(ValueError, match="layer 1 has units 0..95, got \\[96\\]"):
        with ablate(lm, {1: [5, 96]}):
            pass
    with pytest.raises(ValueError, match="needs the mean activations of layer 0"):
        with ablate(lm, {0: [1]}, mode="mean"):
            pass
    with pytest.raises(ValueError, match="unknown mode 'half'"):
        with ablate(lm, {0: [1]}, mode="half"):
            pass
    with pytest.raises(IndexError, match="layer 7 out of range"):
        with ablate(lm, {7: [1]}):
            pass
    assert all(not lm.mlp_out(layer)._forward_pre_hooks for layer in range(lm.n_layers))


def test_positions_ablate_a_slice_of_the_sequence_also_in_a_pass_after_a_cache(lm, tiny_lm_sizes):
    """positions=2:5 (image prompts inside a prompt, as in LLaVA's chat prompt): those positions
    of a full pass; a pass that continues a KV cache counts its positions from the cache's end, so
    it ablates the same sequence positions, and a pass wholly after them is left alone."""
    from mmn.analysis.ablation import ablate_masks

    ids = torch.randint(2, 20, (2, 7))
    clean, _ = activations(lm, ids)
    units = [3, 40]
    mask = torch.zeros(tiny_lm_sizes.d_mlp, dtype=torch.bool)
    mask[units] = True
    with ablate_masks(lm, {0: mask}, positions=slice(2, 5)):
        ablated, ablated_logits = activations(lm, ids)
        seen = []
        hook = lm.mlp_out(0).register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        try:
            with torch.no_grad():
                cache = lm.model(input_ids=ids[:, :4], use_cache=True).past_key_values  # positions 0..3
                continued = lm.model(input_ids=ids[:, 4:6], past_key_values=cache, use_cache=True)  # 4, 5
                lm.model(input_ids=ids[:, 6:], past_key_values=continued.past_key_values)  # 6
        finally:
            hook.remove()
    assert torch.equal(ablated[0][:, 2:5, units], torch.zeros(2, 3, 2))
    outside = torch.ones(7, dtype=torch.bool)
    outside[2:5] = False
    assert torch.equal(ablated[0][:, outside], clean[0][:, outside])
    assert torch.equal(ablated[0][..., [0, 1, 2]], clean[0][..., [0, 1, 2]])  # other units untouched
    # the three cached passes see what the full pass saw at their own positions
    torch.testing.assert_close(torch.cat(seen, dim=1), ablated[0])
    assert torch.equal(seen[1][:, 0, units], torch.zeros(2, 2)) and not torch.equal(seen[2], torch.zeros_like(seen[2]))
    with pytest.raises(ValueError, match="positions must be a slice start:stop"):
        with ablate_masks(lm, {0: mask}, positions=slice(None, 5)):
            pass


def test_sweep_equals_one_ablated_forward_and_generate_per_setting(lm, tiny_lm_sizes):
    """ablation_sweep (settings as rows of one batch, one prompt pass for both p(c) and the caption)
    gives the p(c) and the greedy caption of ablating each setting alone."""
    from mmn.analysis.ablation import ablation_settings, ablation_sweep
    from mmn.analysis.attribution import target_probabilities

    d_mlp = tiny_lm_sizes.d_mlp
    torch.manual_seed(1)
    n_prompt, images = 6, 2
    inputs = torch.randn(images, n_prompt + 3, lm.d_model) * 0.5  # prompt + 3 caption tokens; c after the 2nd
    positions, ids = torch.tensor([n_prompt - 1, n_prompt + 1]), torch.tensor([5, 9])
    settings = []
    for image in range(images):
        order = torch.randperm(lm.n_layers * d_mlp)
        ranking = torch.stack([order // d_mlp, order % d_mlp], dim=1)
        settings.append(ablation_settings(ranking, ranking[::3], [0, 10, 60], d_mlp,
                                          torch.Generator().manual_seed(image)))
    swept = ablation_sweep(lm, inputs, positions, ids, settings, range(lm.n_layers), n_prompt=n_prompt,
                           max_new_tokens=5, rows_per_pass=4)

    p_seen = set()
    for image in range(images):
        for (arm, k, units), result in zip(settings[image], swept[image]):
            with ablate(lm, {layer: units[units[:, 0] == layer, 1] for layer in range(lm.n_layers)}), torch.no_grad():
                p = target_probabilities(lm, inputs[image : image + 1], positions[image : image + 1],
                                         ids[image : image + 1]).item()
                caption = lm.greedy(inputs[image : image + 1, :n_prompt], max_new_tokens=5)[0]
            assert (result["arm"], result["k"], result["n_ablated"]) == (arm, k, len(units))
            assert result["p_target"] == pytest.approx(p, rel=1e-4)
            assert result["caption_ids"] == caption
            p_seen.add(round(p, 6))
    assert len(p_seen) > 5  # the settings really differ


def test_sizes_are_counts_or_shares_of_the_analysed_units():
    assert resolve_sizes(["0%", "1.5%", 400, "400"], 8192) == [0, 123, 400]  # 1.5% of 8,192 = 122.9
    assert resolve_sizes([6400, "100%"], 2048) == [2048]                     # capped, then merged
    assert parse_size("0.1%") == pytest.approx(0.001) and parse_size(50) == 50
    for bad, message in [(True, "neither"), ("1.5", "neither"), ("x%", "'x' is not a number"), ("-1%", "between")]:
        with pytest.raises(ValueError, match=message):
            parse_size(bad)
