"""LM adapters: tiny random models of every family, saved and loaded back through the real loader."""

from __future__ import annotations

import mmn.models.lm as lm_module  # noqa: I001  (mmn before transformers: torchvision shim)
from mmn.models.lm import FAMILIES, LanguageModel, family_of

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.pytorch_utils import Conv1D

WORDS = "a picture of the red blue green circle square triangle star heart next to on left right big small".split()
MODEL_VOCAB = 40  # more embedding rows than real tokens, as in LiMBeR's resized GPT-J
D_MODEL, D_MLP, N_LAYERS = 32, 96, 2  # d_mlp != 4 * d_model so a wrong width cannot pass


def build_tiny(family: str):
    if family == "gptj":
        config = GPTJConfig(vocab_size=MODEL_VOCAB, n_positions=64, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=4,
                            rotary_dim=4, n_inner=D_MLP)
        return GPTJForCausalLM(config)
    if family == "gpt2":
        config = GPT2Config(vocab_size=MODEL_VOCAB, n_positions=64, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=4,
                            n_inner=D_MLP)
        return GPT2LMHeadModel(config)
    if family == "gpt_neox":
        config = GPTNeoXConfig(vocab_size=MODEL_VOCAB, max_position_embeddings=64, hidden_size=D_MODEL,
                               num_hidden_layers=N_LAYERS, num_attention_heads=4, intermediate_size=D_MLP)
        return GPTNeoXForCausalLM(config)
    if family == "llama":
        config = LlamaConfig(vocab_size=MODEL_VOCAB, max_position_embeddings=64, hidden_size=D_MODEL,
                             num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=D_MLP)
        return LlamaForCausalLM(config)
    if family == "mistral":
        config = MistralConfig(vocab_size=MODEL_VOCAB, max_position_embeddings=64, hidden_size=D_MODEL,
                               num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=D_MLP)
        return MistralForCausalLM(config)
    raise AssertionError(family)


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "<|endoftext|>": 1} | {w: i + 2 for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """family -> (directory, the original random model)."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    saved = {}
    for family in ("gptj", "gpt2", "gpt_neox", "llama", "mistral"):
        model = build_tiny(family).eval()
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
def test_load_and_locate_mlp(saved_models, saved_as, family):
    directory, original = saved_models[saved_as]
    lm = LanguageModel.from_pretrained(directory)

    assert lm.family is FAMILIES[family]
    assert (lm.n_layers, lm.d_model, lm.d_mlp) == (N_LAYERS, D_MODEL, D_MLP)
    assert lm.vocab_size == len(WORDS) + 2  # tokenizer rows, not the 40 embedding rows
    assert lm.unembed.weight.shape == (MODEL_VOCAB, D_MODEL)
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
        assert seen["pre"].shape == (2, ids.shape[1], D_MLP)  # [batch, pos, d_mlp]
        assert seen["post"].shape == (2, ids.shape[1], D_MLP)
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
def test_unit_out_directions_are_what_each_unit_writes(saved_models, family):
    lm = LanguageModel.from_pretrained(saved_models[family][0])
    assert isinstance(lm.mlp_out(0), Conv1D) == (family == "gpt2")
    for layer in range(lm.n_layers):
        directions = lm.unit_out_directions(layer)  # [d_mlp, d_model]
        assert directions.shape == (D_MLP, D_MODEL)
        out = lm.mlp_out(layer)
        with torch.no_grad():
            base = out(torch.zeros(1, D_MLP))  # the bias alone
            written = out(torch.eye(D_MLP)) - base  # row k: unit k at 1, all others at 0
        torch.testing.assert_close(written, directions, rtol=1e-5, atol=1e-6)


def hook_counts(lm: LanguageModel) -> list[tuple[int, int]]:
    """(forward hooks, forward pre-hooks) of every module of the model."""
    return [(len(module._forward_hooks), len(module._forward_pre_hooks)) for module in lm.model.modules()]


@pytest.mark.parametrize("family", ["gptj", "llama"])
def test_hooks_run_inside_the_block_and_are_gone_after_it_exceptions_included(family):
    torch.manual_seed(0)
    lm = LanguageModel(build_tiny(family).eval(), build_tokenizer())
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
    assert calls == [("Z", (2, 5, D_MLP)), ("block 1", None), ("A", (2, 5, D_MLP))]
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
def test_cached_passes_equal_one_pass_and_give_the_cache_back(family):
    torch.manual_seed(0)
    lm = LanguageModel(build_tiny(family).eval(), build_tokenizer())
    inputs = torch.randn(2, 7, D_MODEL)  # [batch, pos, d_model]: a 4-position prompt and 3 more
    with torch.no_grad():
        whole = lm.final_hidden(inputs)
        prompt, cache = lm.final_hidden_and_cache(inputs[:, :4])
        after = lm.final_hidden_after(inputs[:, 4:], cache)
        assert cache.get_seq_length() == 4  # cut back to the prompt
        again = lm.final_hidden_after(inputs[:, 4:], cache)
        logits = lm.last_logits(inputs, 3)
    torch.testing.assert_close(torch.cat([prompt, after], dim=1), whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again, after, rtol=0, atol=0)
    assert logits.shape == (2, 3, MODEL_VOCAB)
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
