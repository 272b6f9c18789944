"""The learned projection P: image-encoder features -> image prompts in the LM's input space.

Two kinds as in LiMBeR, and LLaVA's:

- ``kind="linear"``: one ``nn.Linear(d_enc, d_lm)`` applied to every encoder token
  (BEiT: 196 patch vectors -> 196 image prompts; CLIP RN50x16: 144 -> 144).
- ``kind="pooled"``: mean-pool the encoder tokens, ``nn.Linear(d_enc, k * d_lm)``, reshape to
  k prompts (NF-ResNet50: one pooled 2048-d vector -> k = 1 prompt).
- ``kind="mlp2x_gelu"``: LLaVA 1.5's projector, ``Linear(d_enc, d_lm) -> GELU -> Linear(d_lm,
  d_lm)`` on every token: a non-linear map, so the image prompts need not be a linear read-out
  of the features. ``Projection.from_llava_checkpoint`` reads a LLaVA checkpoint's
  ``multi_modal_projector`` weights.

``max_norm`` (off in LiMBeR) shortens any prompt longer than it to that L2 norm, so the prompts
stay in the scale of the LM's own residual stream (see docs/shapes_world_2.md).

Dropout (0.1 in LiMBeR) follows the linear map and is active only in train mode; every
analysis must run in eval mode (LiMBeR itself leaves it on by accident, see the notes).

On disk a projection is ``projection.safetensors`` (the weights) + ``projection.json``
(kind, d_enc, d_lm, n_out_tokens, dropout, max_norm). LiMBeR's released ``proj.ckpt`` files (the
``state_dict`` of the ``nn.Linear``, saved with ``torch.save``) load with
``Projection.from_limber_checkpoint``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mmn.files import atomic_write, write_text

KINDS = ("linear", "pooled", "mlp2x_gelu")
PER_TOKEN = ("linear", "mlp2x_gelu")  # one image prompt per encoder token
# LLaVA's multi_modal_projector: linear_1 [d_lm, d_enc] -> GELU -> linear_2 [d_lm, d_lm]
LLAVA_PROJECTOR_TENSORS = tuple(f"linear_{i}.{name}" for i in (1, 2) for name in ("weight", "bias"))
WEIGHTS_FILE = "projection.safetensors"
CONFIG_FILE = "projection.json"


class Projection(nn.Module):
    """Maps encoder tokens [batch, n_tok, d_enc] to image prompts [batch, n_prompt, d_lm]."""

    def __init__(self, d_enc: int, d_lm: int, kind: str = "linear", n_out_tokens: int = 1, dropout: float = 0.1,
                 max_norm: float | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown projection kind {kind!r}: use one of {KINDS}")
        if kind in PER_TOKEN and n_out_tokens != 1:
            raise ValueError(f"n_out_tokens={n_out_tokens} only applies to kind='pooled' ({kind} maps token to token)")
        if n_out_tokens < 1 or d_enc < 1 or d_lm < 1:
            raise ValueError(f"dimensions must be positive: d_enc={d_enc}, d_lm={d_lm}, n_out_tokens={n_out_tokens}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"max_norm must be positive or None, got {max_norm}")
        self.d_enc = d_enc
        self.d_lm = d_lm
        self.kind = kind
        self.n_out_tokens = n_out_tokens
        self.dropout_p = dropout
        self.max_norm = max_norm
        self.linear = nn.Linear(d_enc, d_lm * n_out_tokens)
        if kind == "mlp2x_gelu":  # LLaVA's linear_1 is self.linear, its linear_2 this one
            self.linear_2 = nn.Linear(d_lm, d_lm)
        self.dropout = nn.Dropout(dropout)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, d_enc={self.d_enc}, d_lm={self.d_lm}, n_out_tokens={self.n_out_tokens}"

    def n_prompt_tokens(self, n_encoder_tokens: int) -> int:
        return n_encoder_tokens if self.kind in PER_TOKEN else self.n_out_tokens

    def forward(self, features: Tensor) -> Tensor:
        """[batch, n_tok, d_enc] -> [batch, n_prompt, d_lm]."""
        if features.ndim != 3:
            raise ValueError(f"features must be [batch, n_tok, d_enc], got shape {tuple(features.shape)}")
        if features.shape[-1] != self.d_enc:
            raise ValueError(f"feature width {features.shape[-1]} != projection d_enc {self.d_enc}")
        features = features.to(self.linear.weight.dtype)
        if self.kind == "linear":
            prompts = self.linear(features)  # [batch, n_tok, d_lm]
        elif self.kind == "mlp2x_gelu":
            prompts = self.linear_2(nn.functional.gelu(self.linear(features)))  # [batch, n_tok, d_lm]
        else:
            pooled = features.mean(dim=1)  # [batch, d_enc]
            prompts = self.linear(pooled).view(-1, self.n_out_tokens, self.d_lm)  # [batch, k, d_lm]
        if self.max_norm is not None:  # shorten each prompt vector longer than max_norm to max_norm
            norms = prompts.norm(dim=-1, keepdim=True)  # [batch, n_prompt, 1]
            prompts = prompts * (self.max_norm / norms.clamp_min(self.max_norm))
        return self.dropout(prompts)

    # ----- files ------------------------------------------------------------------------

    def config(self) -> dict:
        return {
            "kind": self.kind,
            "d_enc": self.d_enc,
            "d_lm": self.d_lm,
            "n_out_tokens": self.n_out_tokens,
            "dropout": self.dropout_p,
            "max_norm": self.max_norm,
        }

    def save(self, directory: str | os.PathLike, metadata: dict | None = None) -> None:
        """Write projection.safetensors + projection.json into `directory` (created if needed).
        `metadata` (e.g. what it was trained with) goes into the JSON under "trained". Each file is
        written beside its final name and renamed, so a crash never leaves a half-written one."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        config = self.config() if metadata is None else {**self.config(), "trained": metadata}
        atomic_write(directory / WEIGHTS_FILE, lambda temporary: save_file(tensors, str(temporary)))
        write_text(json.dumps(config, indent=2) + "\n", directory / CONFIG_FILE)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Projection:
        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"projection file not found: {directory / name}")
        config = json.loads((directory / CONFIG_FILE).read_text())
        missing = [k for k in ("kind", "d_enc", "d_lm") if k not in config]
        if missing:
            raise KeyError(f"{directory / CONFIG_FILE} lacks {missing}; found keys {sorted(config)}")
        projection = cls(
            d_enc=config["d_enc"],
            d_lm=config["d_lm"],
            kind=config["kind"],
            n_out_tokens=config.get("n_out_tokens", 1),
            dropout=config.get("dropout", 0.1),
            max_norm=config.get("max_norm"),
        )
        state = load_file(str(directory / WEIGHTS_FILE))
        projection.load_state_dict(state)
        return projection

    @classmethod
    def from_llava_checkpoint(cls, path: str | os.PathLike, dropout: float = 0.0) -> Projection:
        """LLaVA's projector from a LLaVA checkpoint (a Hugging Face model folder, sharded or not, or
        one .safetensors file): the tensors named ...multi_modal_projector.linear_{1,2}.{weight,bias}
        -> a ``mlp2x_gelu`` projection. Only those tensors are read, not the 7B model around them."""
        from safetensors import safe_open

        path = Path(path)
        files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"LLaVA checkpoint not found: {path} is neither a .safetensors file nor a "
                                    f"folder holding them")
        state = {}
        for file in files:
            with safe_open(str(file), framework="pt") as tensors:
                for key in tensors.keys():
                    head, _, tail = key.rpartition("multi_modal_projector.")
                    if _ and tail in LLAVA_PROJECTOR_TENSORS:
                        state[tail] = tensors.get_tensor(key)
        return cls._from_llava_tensors(state, str(path), dropout)

    @classmethod
    def from_llava_projector(cls, projector: nn.Module, dropout: float = 0.0) -> Projection:
        """LLaVA's projector from a loaded model's `multi_modal_projector` module (the LLaVA captioner
        takes it so, from the one copy of the weights it loaded): the same tensors as
        `from_llava_checkpoint` reads from the files, copied into a ``mlp2x_gelu`` projection (whose
        GELU is the exact one: the caller checks the model's projector_hidden_act)."""
        state = {name: tensor.detach() for name, tensor in projector.state_dict().items()}
        return cls._from_llava_tensors(state, type(projector).__name__, dropout)

    @classmethod
    def _from_llava_tensors(cls, state: dict[str, Tensor], where: str, dropout: float) -> Projection:
        """linear_{1,2}.{weight,bias} tensors of a LLaVA projector -> a float32 ``mlp2x_gelu``
        projection; `where` names their source in errors."""
        missing = [name for name in LLAVA_PROJECTOR_TENSORS if name not in state]
        if missing:
            raise KeyError(f"{where}: no multi_modal_projector tensors {missing}; is it a LLaVA checkpoint?")
        d_lm, d_enc = state["linear_1.weight"].shape
        if tuple(state["linear_2.weight"].shape) != (d_lm, d_lm):
            raise ValueError(f"{where}: linear_2.weight is {tuple(state['linear_2.weight'].shape)}, "
                             f"not [{d_lm}, {d_lm}]")
        projection = cls(d_enc, d_lm, kind="mlp2x_gelu", dropout=dropout)
        projection.linear.load_state_dict({"weight": state["linear_1.weight"], "bias": state["linear_1.bias"]})
        projection.linear_2.load_state_dict({"weight": state["linear_2.weight"], "bias": state["linear_2.bias"]})
        return projection

    @classmethod
    def from_limber_checkpoint(
        cls, path: str | os.PathLike, dropout: float = 0.1, n_out_tokens: int | None = None
    ) -> Projection:
        """Load LiMBeR's `proj.ckpt`: `torch.save(nn.Linear(d_enc, d_lm).state_dict())`.

        weight [d_lm, d_enc] and bias [d_lm] give a per-token linear projection. For LiMBeR's
        pooled encoders (NF-ResNet50) the weight is [k * d_lm, d_enc]: pass `n_out_tokens=k`
        to get a pooled projection with k prompts.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"LiMBeR projection checkpoint not found: {path}")
        state = torch.load(path, weights_only=True, map_location="cpu")
        if not isinstance(state, dict) or not {"weight", "bias"} <= set(state):
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise KeyError(f"{path} is not an nn.Linear state_dict: expected keys 'weight' and 'bias', found {found}")
        weight, bias = state["weight"], state["bias"]
        if weight.ndim != 2 or bias.shape != weight.shape[:1]:
            raise ValueError(
                f"{path}: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} are not [d_out, d_in] and [d_out]"
            )
        d_out, d_enc = weight.shape
        if n_out_tokens is None:
            projection = cls(d_enc=d_enc, d_lm=d_out, kind="linear", dropout=dropout)
        else:
            if d_out % n_out_tokens:
                raise ValueError(f"{path}: output width {d_out} is not a multiple of n_out_tokens={n_out_tokens}")
            projection = cls(d_enc, d_out // n_out_tokens, kind="pooled", n_out_tokens=n_out_tokens, dropout=dropout)
        projection.linear.load_state_dict({"weight": weight, "bias": bias})
        return projection
