"""Language-model adapters: where the MLP neurons of each model family live.

A `LanguageModel` wraps a frozen Hugging Face causal LM and its tokenizer, and an
`LMFamily` is the small table that says where things sit inside one family:

    family    blocks            MLP in (Z)          act        MLP out (input = A)   embed / final norm / unembed
    gptj      transformer.h     mlp.fc_in           mlp.act    mlp.fc_out            transformer.wte / transformer.ln_f / lm_head
    gpt2      transformer.h     mlp.c_fc (Conv1D)   mlp.act    mlp.c_proj (Conv1D)   transformer.wte / transformer.ln_f / lm_head
    gpt_neox  gpt_neox.layers   mlp.dense_h_to_4h   mlp.act    mlp.dense_4h_to_h     gpt_neox.embed_in / gpt_neox.final_layer_norm / lm_head
    llama     model.layers      mlp.gate_proj       mlp.act_fn mlp.down_proj         model.embed_tokens / model.norm / lm_head

Terms used throughout mmn (as in the paper and TransformerLens):

- **pre-activation Z**: the OUTPUT of the MLP's input projection,
  `[batch, pos, d_mlp]`. For GPT-J that is `transformer.h.{l}.mlp.fc_in`, before the GELU.
- **activation A**: the INPUT of the MLP's output projection,
  `[batch, pos, d_mlp]`; for GPT-J, GPT-2 and GPT-NeoX it is `act(Z)`.
- **Gated MLPs (Llama, Mistral, Qwen2)** compute `down_proj(act_fn(gate_proj(x)) * up_proj(x))`.
  There the pre-activation Z is the `gate_proj` output, before `act_fn`, and the unit
  activation A is `act_fn(gate) * up`, the input of `down_proj`. Scaling or zeroing Z
  then acts through the gate only: with SiLU, `act_fn(0) = 0`, so zeroing Z still zeroes A.
- **Layers are numbered from 0.** The paper's neuron `L7.u12134` is layer index 7, unit
  12134, i.e. `transformer.h.7.mlp.fc_out.weight[:, 12134]` in GPT-J.
- **What unit k writes** into the residual stream is row k of
  `unit_out_directions(layer)` (`[d_mlp, d_model]`): column k of the output projection's
  weight for `nn.Linear`, row k for GPT-2's transposed `Conv1D`.

Hooks go through `LanguageModel.hooks`, a context manager that removes them on exit, and the
LM runs on input embeddings through `final_hidden` (no cache), `final_hidden_and_cache` /
`final_hidden_after` (a KV cache), `last_logits` and `greedy`, so no caller needs the HF model's
internals:

    with lm.hooks(pre=[(lm.mlp_out(7), lambda module, args: seen.append(args[0]))]):  # A, [batch, pos, d_mlp]
        lm.final_hidden(inputs_embeds)

Loading goes through `LanguageModel.from_pretrained(hub_id_or_local_dir, ...)`; the
model comes back in eval mode with every parameter frozen (requires_grad False).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.activations import GELUTanh, NewGELUActivation
from transformers.cache_utils import Cache
from transformers.pytorch_utils import Conv1D

from mmn.files import looks_like_local_path


@dataclass(frozen=True)
class LMFamily:
    """Where the parts of one model family live (attribute paths, dotted)."""

    name: str  # "gptj" | "gpt2" | "gpt_neox" | "llama"
    model_types: tuple[str, ...]  # HF config.model_type values this table covers
    blocks: str  # ModuleList of transformer blocks, from the model root
    mlp_in: str  # inside a block: module whose OUTPUT is the pre-activation Z
    mlp_act: str  # inside a block: the activation function module
    mlp_out: str  # inside a block: output projection; its INPUT is the unit activation A
    embed: str  # input token embedding (nn.Embedding), from the model root
    final_norm: str  # norm applied before the unembedding, from the model root
    unembed: str  # unembedding (nn.Linear), from the model root
    conv1d: bool = False  # GPT-2 Conv1D: weights stored transposed ([in, out])
    mlp_up: str | None = None  # gated MLPs only: the "up" projection multiplied into act(Z)

    @property
    def gated(self) -> bool:
        return self.mlp_up is not None


FAMILIES: dict[str, LMFamily] = {
    family.name: family
    for family in (
        LMFamily(
            name="gptj",
            model_types=("gptj",),
            blocks="transformer.h",
            mlp_in="mlp.fc_in",
            mlp_act="mlp.act",
            mlp_out="mlp.fc_out",
            embed="transformer.wte",
            final_norm="transformer.ln_f",
            unembed="lm_head",
        ),
        LMFamily(
            name="gpt2",
            model_types=("gpt2",),
            blocks="transformer.h",
            mlp_in="mlp.c_fc",
            mlp_act="mlp.act",
            mlp_out="mlp.c_proj",
            embed="transformer.wte",
            final_norm="transformer.ln_f",
            unembed="lm_head",
            conv1d=True,
        ),
        LMFamily(
            name="gpt_neox",
            model_types=("gpt_neox",),
            blocks="gpt_neox.layers",
            mlp_in="mlp.dense_h_to_4h",
            mlp_act="mlp.act",
            mlp_out="mlp.dense_4h_to_h",
            embed="gpt_neox.embed_in",
            final_norm="gpt_neox.final_layer_norm",
            # transformers 5 renamed Pythia's `embed_out` to `lm_head` (old checkpoints are remapped on load).
            unembed="lm_head",
        ),
        LMFamily(
            name="llama",
            # Mistral and Qwen2 use the same module names and the same gated MLP.
            model_types=("llama", "mistral", "qwen2"),
            blocks="model.layers",
            mlp_in="mlp.gate_proj",
            mlp_act="mlp.act_fn",
            mlp_out="mlp.down_proj",
            embed="model.embed_tokens",
            final_norm="model.norm",
            unembed="lm_head",
            mlp_up="mlp.up_proj",
        ),
    )
}

def family_of(model_or_config) -> LMFamily:
    """The `LMFamily` of a HF model, config, or `config.model_type` string."""
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = ", ".join(f"{f.name} {list(f.model_types)}" for f in FAMILIES.values())
    raise ValueError(f"unknown model_type {model_type!r}: no LM family for it. Known families: {known}")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'bfloat16' / 'bf16' / torch.bfloat16 -> torch.bfloat16 (same for float16, float32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(str(dtype).lower(), str(dtype).lower())
    resolved = getattr(torch, name, None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return resolved


def _check_local_dir(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"language model directory not found: {path}")
    if not path.is_dir():
        raise FileNotFoundError(f"language model path is not a directory: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in language model directory: {path}")


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, and no parameter asks for a gradient."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early (`LanguageModel.final_hidden`)."""


class LanguageModel:
    """A frozen HF causal LM, its tokenizer, and the family table that locates its MLPs."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, frozen: bool = True):
        self.model = freeze(model) if frozen else model
        self.tokenizer = tokenizer
        self.family = family_of(model)
        self.blocks: nn.ModuleList = model.get_submodule(self.family.blocks)
        self.n_layers = len(self.blocks)
        self._fuse_gelu()
        self.d_model = self.embedding.embedding_dim
        mlp_in = self.mlp_in(0)
        self.d_mlp = mlp_in.nf if isinstance(mlp_in, Conv1D) else mlp_in.out_features
        # LiMBeR resizes GPT-J's unembedding; rows beyond the tokenizer are not real tokens.
        self.vocab_size = min(len(tokenizer), self.unembed.out_features)

    def _fuse_gelu(self) -> None:
        """GPT-J's and GPT-2's `gelu_new` is the tanh GELU written as eight tensor operations, each
        a pass over [batch, pos, d_mlp] that autograd keeps for the backward pass; torch's fused
        kernel computes the same function (equal to float rounding) in one. Swapping it in cuts the
        time of an attribution pass by about a quarter on a CPU and its memory by about 40%."""
        parent_name, _, name = self.family.mlp_act.rpartition(".")
        for block in self.blocks:
            parent = block.get_submodule(parent_name)
            if type(getattr(parent, name)) is NewGELUActivation:
                setattr(parent, name, GELUTanh())

    def __repr__(self) -> str:
        return (
            f"LanguageModel({self.family.name}, n_layers={self.n_layers}, d_model={self.d_model}, "
            f"d_mlp={self.d_mlp}, vocab_size={self.vocab_size})"
        )

    # ----- where things are -------------------------------------------------------------

    def _check_layer(self, layer: int) -> int:
        if not -self.n_layers <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range: the model has {self.n_layers} layers (0-based)")
        return layer % self.n_layers

    def block(self, layer: int) -> nn.Module:
        return self.blocks[self._check_layer(layer)]

    def mlp_in(self, layer: int) -> nn.Module:
        """Module whose output is the pre-activation Z  # [batch, pos, d_mlp]."""
        return self.block(layer).get_submodule(self.family.mlp_in)

    def mlp_act(self, layer: int) -> nn.Module:
        return self.block(layer).get_submodule(self.family.mlp_act)

    def mlp_up(self, layer: int) -> nn.Module:
        """Gated MLPs only: the up projection; A = act_fn(Z) * up(x)."""
        if self.family.mlp_up is None:
            raise ValueError(f"{self.family.name} has no gated MLP, so no up projection")
        return self.block(layer).get_submodule(self.family.mlp_up)

    def mlp_out(self, layer: int) -> nn.Module:
        """Module whose input is the unit activation A  # [batch, pos, d_mlp]."""
        return self.block(layer).get_submodule(self.family.mlp_out)

    def unit_out_directions(self, layer: int) -> Tensor:
        """[d_mlp, d_model]: row k is what unit k adds to the residual stream per unit of activation.

        A view of the weights (no copy), detached; do not modify it in place.
        """
        weight = self.mlp_out(layer).weight.detach()
        # nn.Linear stores [out=d_model, in=d_mlp]; Conv1D stores [in=d_mlp, out=d_model].
        return weight if self.family.conv1d else weight.T

    @property
    def embedding(self) -> nn.Embedding:
        return self.model.get_submodule(self.family.embed)

    @property
    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self.family.final_norm)

    @property
    def unembed(self) -> nn.Linear:
        return self.model.get_submodule(self.family.unembed)

    @property
    def context_length(self) -> int | None:
        """The most positions the model takes (n_positions or max_position_embeddings), if it says."""
        config = self.model.config
        return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    def embed_tokens(self, ids: Tensor) -> Tensor:
        """[batch, pos] token ids -> [batch, pos, d_model] input embeddings."""
        return self.embedding(ids.to(self.device))

    # ----- running the model ------------------------------------------------------------

    @staticmethod
    @contextmanager
    def hooks(forward: Iterable[tuple[nn.Module, Callable]] = (), pre: Iterable[tuple[nn.Module, Callable]] = (),
              pre_with_kwargs: Iterable[tuple[nn.Module, Callable]] = ()) -> Iterator[None]:
        """Hooks on modules of the model inside the block, removed on exit, exceptions included.

        Each argument holds (module, fn) pairs, registered in the order given (forward, then pre,
        then pre_with_kwargs); a module may appear more than once:
            forward:          fn(module, args, output) -> a replacement output, or None
            pre:              fn(module, args) -> replacement args, or None
            pre_with_kwargs:  fn(module, args, kwargs) -> replacement (args, kwargs), or None
        e.g. `forward=[(lm.mlp_in(l), fn)]` sees Z and `pre=[(lm.mlp_out(l), fn)]` sees A as
        args[0], both [batch, pos, d_mlp]."""
        handles = []
        try:
            for module, fn in forward:  # one at a time, so a failure midway leaves none behind
                handles.append(module.register_forward_hook(fn))
            for module, fn in pre:
                handles.append(module.register_forward_pre_hook(fn))
            for module, fn in pre_with_kwargs:
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def pass_start(self) -> Iterator[Callable[[], int]]:
        """Inside the block, the function yielded says where the running forward pass starts in the
        sequence: 0 for a pass without a KV cache, the cache's length for one that continues it
        (final_hidden_after, each step of cached generation). Hooks that act on sequence positions
        read it to find their positions in any pass."""
        start = [0]

        def record(module, args, kwargs):
            cache = kwargs.get("past_key_values")
            start[0] = 0 if cache is None else cache.get_seq_length()

        with self.hooks(pre_with_kwargs=[(self.model.base_model, record)]):
            yield lambda: start[0]

    def final_hidden(self, inputs_embeds: Tensor) -> Tensor:
        """The residual stream after the final norm, no KV cache kept:
        inputs_embeds [rows, pos, d_model] -> [rows', pos, d_model].

        Read from the final norm's output and the pass stopped there (the unembedding never runs),
        so hooks may change the number of rows inside the pass (rows' != rows: IG's steps)."""
        captured = []

        def capture(module, args, output):
            captured.append(output)
            raise _StopForward

        with self.hooks(forward=[(self.final_norm, capture)]):
            try:
                self.model.base_model(inputs_embeds=inputs_embeds, use_cache=False)
            except _StopForward:
                pass
        return captured[0]

    def final_hidden_and_cache(self, inputs_embeds: Tensor) -> tuple[Tensor, Cache]:
        """A prompt's pass that keeps its KV cache: inputs_embeds [rows, pos, d_model] ->
        (the residual stream after the final norm [rows, pos, d_model], the cache). The cache goes
        on to `final_hidden_after` and `greedy_after`."""
        output = self.model.base_model(inputs_embeds=inputs_embeds, use_cache=True)
        return output.last_hidden_state, output.past_key_values

    def final_hidden_after(self, inputs_embeds: Tensor, cache: Cache) -> Tensor:
        """The residual stream after the final norm [rows, pos, d_model] at positions that follow
        those in `cache` (inputs_embeds [rows, pos, d_model], e.g. a teacher-forced caption); the
        cache is cut back to the positions it held before."""
        output = self.model.base_model(inputs_embeds=inputs_embeds, past_key_values=cache, use_cache=True)
        hidden = output.last_hidden_state
        cache.crop(-hidden.shape[1])  # a negative count: the positions to drop from the end
        return hidden

    def last_logits(self, inputs_embeds: Tensor, n_positions: int) -> Tensor:
        """Logits of the last n_positions positions only (the unembedding never sees the others):
        inputs_embeds [batch, pos, d_model] -> [batch, n_positions, vocab]."""
        return self.model(inputs_embeds=inputs_embeds, logits_to_keep=n_positions).logits

    @torch.no_grad()
    def greedy(self, inputs_embeds: Tensor, max_new_tokens: int = 20) -> list[list[int]]:
        """Greedy decoding after an embedded prompt ([rows, pos, d_model], e.g. a captioner's image
        prompts + "A picture of"); each row's new token ids, without the end-of-text token."""
        output = self.model(inputs_embeds=inputs_embeds, use_cache=True, logits_to_keep=1)
        return self.greedy_after(output.logits[:, -1], output.past_key_values, max_new_tokens)

    def greedy_after(self, next_logits: Tensor, cache, max_new_tokens: int = 20) -> list[list[int]]:
        """Greedy decoding on from a prompt that has already run: `next_logits` [rows, vocab] are
        the logits at its last position, `cache` its KV cache (extended in place)."""
        eos = self.tokenizer.eos_token_id
        tokens = []  # each [rows]
        finished = torch.zeros(len(next_logits), dtype=torch.bool, device=next_logits.device)
        for step in range(max_new_tokens):
            # only real tokens: LiMBeR's GPT-J has unembedding rows beyond the tokenizer's vocabulary
            next_ids = next_logits[:, : self.vocab_size].argmax(dim=-1)  # [rows]
            tokens.append(next_ids)
            finished |= next_ids == eos
            if finished.all() or step == max_new_tokens - 1:
                break
            output = self.model(input_ids=next_ids[:, None], past_key_values=cache, use_cache=True)
            next_logits, cache = output.logits[:, -1], output.past_key_values
        captions = []
        for row in torch.stack(tokens, dim=1).tolist():  # [rows, steps]
            captions.append(row[: row.index(eos)] if eos in row else row)
        return captions

    # ----- loading ----------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        dtype: str | torch.dtype = "float32",
        revision: str | None = None,
        device: str = "cpu",
        tokenizer: str | None = None,
    ) -> LanguageModel:
        """Load a causal LM and its tokenizer from a hub id or a local directory.

        Args:
            name_or_path: hub id ("EleutherAI/gpt-j-6b", "gpt2", "EleutherAI/pythia-160m",
                "meta-llama/Llama-3.2-1B") or a directory written by `save_pretrained`.
            dtype: parameter dtype: "float32" (default), "bfloat16" or "float16".
            revision: hub branch / tag / commit. GPT-J 6B has a half-precision branch that
                halves the download (12 GB instead of 24 GB):
                `LanguageModel.from_pretrained("EleutherAI/gpt-j-6b", revision="float16", dtype="bfloat16")`
                (MAGMA-style loaders, LiMBeR's included, take this branch with float16 when fp16 is
                on; use dtype="float16" to match such numbers closely, "bfloat16" for range).
            device: where to put the model ("cpu", "cuda", "cuda:1").
            tokenizer: hub id or directory of the tokenizer, when it is not stored with the model.

        Raises:
            FileNotFoundError: `name_or_path` looks like a local path that does not exist, or has
                no config.json.
            ValueError: the config's model_type belongs to no known family, or the dtype is unknown.
        """
        name_or_path = str(name_or_path)
        torch_dtype = resolve_dtype(dtype)
        if looks_like_local_path(name_or_path):
            path = Path(name_or_path).expanduser()
            _check_local_dir(path)
            name_or_path = str(path)
        if tokenizer is not None and looks_like_local_path(tokenizer):
            tokenizer_path = Path(tokenizer).expanduser()
            if not tokenizer_path.exists():
                raise FileNotFoundError(f"tokenizer directory not found: {tokenizer_path}")
            tokenizer = str(tokenizer_path)

        hub_kwargs = {} if revision is None else {"revision": revision}
        # The family check needs only config.json: fail before loading billions of weights.
        config = AutoConfig.from_pretrained(name_or_path, **hub_kwargs)
        family_of(config)

        model = AutoModelForCausalLM.from_pretrained(name_or_path, config=config, dtype=torch_dtype, **hub_kwargs)
        model.to(device)
        if tokenizer is None:
            tok = AutoTokenizer.from_pretrained(name_or_path, **hub_kwargs)
        else:
            tok = AutoTokenizer.from_pretrained(tokenizer)
        return cls(model, tok)
