"""LM adapters: tiny random models of every family, saved and loaded back through the real loader."""

from __future__ import annotations

import mmn.models.lm as lm_module  # noqa: I001  (mmn before transformers: torchvision shim)
from mmn.models.lm import FAMILIES, LanguageModel, family_of

import json

import pytest
import torch
from transformers.pytorch_utils import Conv1D


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, tiny_lm, tiny_tokenizer):
    """family -> (directory, the original random model)."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    saved = {}
    for family in ("gptj", "gpt2", "gpt_neox", "llama", "mistral"):
        model = tiny_lm(family).eval()
        directory = tmp_path_factory.mktemp(family)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        saved[family] = (directory, model)
    return saved


def capture(lm: LanguageModel, layer: int, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run a real forward and record Z (mlp_in output), A (mlp_out input), and up (gated only)."""
    seen = {}
    handles = [
        lm.mlp_in(layer).register_forward_hook(lambda m, i, o: seen.__setitem__("pre", o)),
        lm.mlp_out(layer).register_forward_hook(lambda m, i, o: seen.__setitem__("post", i[0])),
    ]
    if lm.family.gated:
        handles.append(lm.mlp_up(layer).register_forward_hook(lambda m, i, o: seen.__setitem__("up", o)))
    try:
        with torch.no_grad():
            lm.model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize(
    "saved_as, family",
    [("gptj", "gptj"), ("gpt2", "gpt2"), ("gpt_neox", "gpt_neox"), ("llama", "llama"), ("mistral", "llama")],
)
def test_load_and_locate_mlp(saved_models, tiny_lm_sizes, saved_as, family):
    sizes = tiny_lm_sizes
    directory, original = saved_models[saved_as]
    lm = LanguageModel.from_pretrained(directory)

    assert lm.family is FAMILIES[family]
    assert (lm.n_layers, lm.d_model, lm.d_mlp) == (sizes.n_layers, sizes.d_model, sizes.d_mlp)
    assert lm.vocab_size == len(sizes.words) + 2  # tokenizer rows, not the 40 embedding rows
    assert lm.unembed.weight.shape == (sizes.model_vocab, sizes.d_model)
    assert not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())

    # Loaded weights are the saved ones (and dtype float32 by default).
    loaded = lm.model.state_dict()
    for name, tensor in original.state_dict().items():
        assert loaded[name].dtype == torch.float32
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)

    ids = lm.tokenizer(["a picture of the red circle", "a blue star next to a big square"], padding=False)["input_ids"]
    ids = torch.tensor([ids[0] + [1] * (len(ids[1]) - len(ids[0])), ids[1]])  # [batch=2, pos]
    assert ids.max() < lm.vocab_size
    for layer in range(lm.n_layers):
        seen = capture(lm, layer, ids)
        assert seen["pre"].shape == (2, ids.shape[1], sizes.d_mlp)  # [batch, pos, d_mlp]
        assert seen["post"].shape == (2, ids.shape[1], sizes.d_mlp)
        expected = lm.mlp_act(layer)(seen["pre"])
        if family == "llama":
            expected = expected * seen["up"]
        torch.testing.assert_close(seen["post"], expected)
        # The activation really varies: a constant could not tell the two sides apart.
        assert seen["post"].std() > 1e-3

    with pytest.raises(IndexError, match="layer 5"):
        lm.block(5)

    # Embedding and unembedding are the model's own.
    torch.testing.assert_close(lm.embed_tokens(ids), lm.model.get_input_embeddings()(ids))
    assert lm.unembed is lm.model.get_output_embeddings()


@pytest.mark.parametrize("family", ["gptj", "gpt2", "gpt_neox", "llama"])
def test_unit_out_directions_are_what_each_unit_writes(saved_models, tiny_lm_sizes, family):
    d_model, d_mlp = tiny_lm_sizes.d_model, tiny_lm_sizes.d_mlp
    lm = LanguageModel.from_pretrained(saved_models[family][0])
    assert isinstance(lm.mlp_out(0), Conv1D) == (family == "gpt2")
    for layer in range(lm.n_layers):
        directions = lm.unit_out_directions(layer)  # [d_mlp, d_model]
        assert directions.shape == (d_mlp, d_model)
        out = lm.mlp_out(layer)
        with torch.no_grad():
            base = out(torch.zeros(1, d_mlp))  # the bias alone
            written = out(torch.eye(d_mlp)) - base  # row k: unit k at 1, all others at 0
        torch.testing.assert_close(written, directions, rtol=1e-5, atol=1e-6)


def hook_counts(lm: LanguageModel) -> list[tuple[int, int]]:
    """(forward hooks, forward pre-hooks) of every module of the model."""
    return [(len(module._forward_hooks), len(module._forward_pre_hooks)) for module in lm.model.modules()]


@pytest.mark.parametrize("family", ["gptj", "llama"])
def test_hooks_run_inside_the_block_and_are_gone_after_it_exceptions_included(tiny_lm, tiny_tokenizer, tiny_lm_sizes,
                                                                              family):
    d_mlp = tiny_lm_sizes.d_mlp
    torch.manual_seed(0)
    lm = LanguageModel(tiny_lm(family).eval(), tiny_tokenizer())
    inputs = lm.embed_tokens(torch.randint(2, 20, (2, 5)))  # [batch, pos, d_model]
    with torch.no_grad():  # first, since it leaves transformers' own output-capturing hooks on Llama's layers
        reference = lm.model(inputs_embeds=inputs, output_hidden_states=True).hidden_states[-1]
    none = hook_counts(lm)
    calls = []
    hooks = dict(forward=[(lm.mlp_in(0), lambda module, args, output: calls.append(("Z", output.shape)))],
                 pre=[(lm.mlp_out(1), lambda module, args: calls.append(("A", args[0].shape)))],
                 pre_with_kwargs=[(lm.block(1), lambda module, args, kwargs: calls.append(("block 1", None)))])
    with torch.no_grad(), lm.hooks(**hooks):
        assert hook_counts(lm) != none
        hidden = lm.final_hidden(inputs)
    assert calls == [("Z", (2, 5, d_mlp)), ("block 1", None), ("A", (2, 5, d_mlp))]
    assert hook_counts(lm) == none  # final_hidden's own hook on the final norm included
    with torch.no_grad():
        lm.final_hidden(inputs)
    assert len(calls) == 3  # the hooks no longer run
    torch.testing.assert_close(hidden, reference, rtol=0, atol=0)  # the last hidden state is after the final norm

    with pytest.raises(RuntimeError, match="in the block"), lm.hooks(**hooks):
        raise RuntimeError("in the block")
    assert hook_counts(lm) == none

    def fail(module, args):
        raise ValueError("in a hook")

    with pytest.raises(ValueError, match="in a hook"), lm.hooks(forward=hooks["forward"], pre=[(lm.mlp_out(0), fail)]):
        lm.final_hidden(inputs)
    assert hook_counts(lm) == none
    with pytest.raises(AttributeError), lm.hooks(forward=[(lm.mlp_in(0), print), ("not a module", print)]):
        pass  # a registration that fails midway leaves none of the others behind
    assert hook_counts(lm) == none


@pytest.mark.parametrize("family", ["gptj", "gpt_neox", "llama"])
def test_cached_passes_equal_one_pass_and_give_the_cache_back(tiny_lm, tiny_tokenizer, tiny_lm_sizes, family):
    torch.manual_seed(0)
    lm = LanguageModel(tiny_lm(family).eval(), tiny_tokenizer())
    inputs = torch.randn(2, 7, tiny_lm_sizes.d_model)  # [batch, pos, d_model]: a 4-position prompt and 3 more
    with torch.no_grad():
        whole = lm.final_hidden(inputs)
        prompt, cache = lm.final_hidden_and_cache(inputs[:, :4])
        after = lm.final_hidden_after(inputs[:, 4:], cache)
        assert cache.get_seq_length() == 4  # cut back to the prompt
        again = lm.final_hidden_after(inputs[:, 4:], cache)
        logits = lm.last_logits(inputs, 3)
    torch.testing.assert_close(torch.cat([prompt, after], dim=1), whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, after, rtol=0, atol=0)
    assert logits.shape == (2, 3, tiny_lm_sizes.model_vocab)
    torch.testing.assert_close(logits, lm.unembed(whole[:, -3:]), rtol=1e-5, atol=1e-6)


def test_bfloat16_load(saved_models):
    lm = LanguageModel.from_pretrained(saved_models["gptj"][0], dtype="bfloat16")
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    assert lm.dtype == torch.bfloat16
    original = saved_models["gptj"][1].state_dict()["transformer.h.0.mlp.fc_in.weight"]
    torch.testing.assert_close(lm.mlp_in(0).weight, original.to(torch.bfloat16), rtol=0, atol=0)


def test_missing_directory_names_it(tmp_path):
    missing = tmp_path / "no_such_lm"
    with pytest.raises(FileNotFoundError, match="no_such_lm"):
        LanguageModel.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match="no_such_lm"):
        LanguageModel.from_pretrained("./no_such_lm")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        LanguageModel.from_pretrained(empty)


def test_unknown_model_type_is_named(saved_models, tmp_path):
    directory, _ = saved_models["gpt2"]
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "bert"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'bert'.*gptj"):
        LanguageModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'t5'"):
        family_of("t5")
    with pytest.raises(ValueError, match="dtype"):
        LanguageModel.from_pretrained(directory, dtype="int8")


def test_path_or_hub_id():
    assert not lm_module.looks_like_local_path("EleutherAI/gpt-j-6b")
    assert not lm_module.looks_like_local_path("gpt2")
    assert lm_module.looks_like_local_path("./lm")
    assert lm_module.looks_like_local_path("~/models/lm")
    assert lm_module.looks_like_local_path("runs/world/lm")
