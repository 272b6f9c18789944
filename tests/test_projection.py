"""Projection: shapes, save/load, LiMBeR proj.ckpt import, dropout modes, errors."""

from __future__ import annotations

from mmn.models.projection import Projection  # noqa: I001

import json

import pytest
import torch
from torch import nn


def test_linear_maps_every_token():
    projection = Projection(64, 48, kind="linear").eval()
    features = torch.randn(2, 5, 64)  # [batch, n_tok, d_enc]
    prompts = projection(features)
    assert prompts.shape == (2, 5, 48)
    assert projection.n_prompt_tokens(196) == 196
    # Token by token: each prompt is the linear map of its own feature vector.
    torch.testing.assert_close(prompts[1, 3], features[1, 3] @ projection.linear.weight.T + projection.linear.bias)


def test_pooled_maps_mean_to_k_tokens():
    projection = Projection(64, 48, kind="pooled", n_out_tokens=3).eval()
    features = torch.randn(2, 7, 64)
    prompts = projection(features)
    assert prompts.shape == (2, 3, 48)
    assert projection.n_prompt_tokens(7) == 3
    flat = projection.linear(features.mean(dim=1))  # [batch, 3 * 48], LiMBeR's "b (s d) -> b s d"
    torch.testing.assert_close(prompts[:, 1], flat[:, 48:96])
    # One pooled token (NF-ResNet50 encoder output) gives the same as the pooled mean.
    torch.testing.assert_close(projection(features.mean(dim=1, keepdim=True)), prompts)


@pytest.mark.parametrize("kind, k", [("linear", 1), ("pooled", 2)])
def test_save_load_round_trip(tmp_path, kind, k):
    projection = Projection(64, 48, kind=kind, n_out_tokens=k, dropout=0.2).eval()
    projection.save(tmp_path / "proj")
    assert (tmp_path / "proj" / "projection.safetensors").is_file()
    config = json.loads((tmp_path / "proj" / "projection.json").read_text())
    assert config == {"kind": kind, "d_enc": 64, "d_lm": 48, "n_out_tokens": k, "dropout": 0.2, "max_norm": None}
    loaded = Projection.load(tmp_path / "proj").eval()
    features = torch.randn(3, 4, 64)
    torch.testing.assert_close(loaded(features), projection(features), rtol=0, atol=0)
    assert loaded.dropout.p == 0.2


def test_max_norm_shortens_long_prompts_only(tmp_path):
    projection = Projection(4, 3, kind="linear", max_norm=2.0).eval()
    with torch.no_grad():
        projection.linear.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]))
        projection.linear.bias.zero_()
    features = torch.tensor([[[3.0, 4.0, 0, 0], [0.6, 0.8, 0, 0]]])  # norms 5 and 1
    prompts = projection(features)
    torch.testing.assert_close(prompts, torch.tensor([[[1.2, 1.6, 0.0], [0.6, 0.8, 0.0]]]))
    projection.save(tmp_path / "proj")
    assert Projection.load(tmp_path / "proj").max_norm == 2.0
    with pytest.raises(ValueError, match="max_norm"):
        Projection(4, 3, max_norm=0.0)


def test_limber_checkpoint_matches_the_linear(tmp_path):
    linear = nn.Linear(64, 48)
    torch.save(linear.state_dict(), tmp_path / "proj.ckpt")
    projection = Projection.from_limber_checkpoint(tmp_path / "proj.ckpt").eval()
    assert (projection.kind, projection.d_enc, projection.d_lm) == ("linear", 64, 48)
    features = torch.randn(2, 196, 64)
    with torch.no_grad():
        torch.testing.assert_close(projection(features), linear.eval()(features), rtol=0, atol=0)

    # A pooled (NF-ResNet50-style) checkpoint: weight [k * d_lm, d_enc].
    torch.save(nn.Linear(64, 2 * 48).state_dict(), tmp_path / "pooled.ckpt")
    pooled = Projection.from_limber_checkpoint(tmp_path / "pooled.ckpt", n_out_tokens=2)
    assert (pooled.kind, pooled.d_lm, pooled.n_out_tokens) == ("pooled", 48, 2)


def test_dropout_only_in_train_mode():
    projection = Projection(64, 48, dropout=0.5)
    features = torch.randn(4, 10, 64)
    projection.eval()
    assert torch.equal(projection(features), projection(features))
    projection.train()
    noisy = projection(features)
    assert (noisy == 0).float().mean() > 0.3  # about half the values dropped
    assert not torch.equal(noisy, projection(features))


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        Projection.from_limber_checkpoint(tmp_path / "missing.ckpt")
    torch.save({"proj.weight": torch.zeros(48, 64)}, tmp_path / "wrapped.ckpt")
    with pytest.raises(KeyError, match=r"wrapped\.ckpt.*proj\.weight"):
        Projection.from_limber_checkpoint(tmp_path / "wrapped.ckpt")
    with pytest.raises(FileNotFoundError, match="projection.json"):
        Projection.load(tmp_path / "nothing_here")
    projection = Projection(64, 48)
    with pytest.raises(ValueError, match="32.*64"):
        projection(torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="'conv'"):
        Projection(64, 48, kind="conv")


def test_mlp2x_gelu_is_linear_gelu_linear_on_every_token():
    projection = Projection(64, 48, kind="mlp2x_gelu", dropout=0.0).eval()
    features = torch.randn(2, 5, 64)
    prompts = projection(features)
    assert prompts.shape == (2, 5, 48) and projection.n_prompt_tokens(196) == 196
    hidden = torch.nn.functional.gelu(features[1, 3] @ projection.linear.weight.T + projection.linear.bias)
    torch.testing.assert_close(prompts[1, 3], hidden @ projection.linear_2.weight.T + projection.linear_2.bias)
    with pytest.raises(ValueError, match="n_out_tokens=2 only applies to kind='pooled'"):
        Projection(64, 48, kind="mlp2x_gelu", n_out_tokens=2)


def test_llavas_projector_loads_from_its_checkpoint_and_computes_what_llava_computes(tmp_path, save_tiny_llava):
    model = save_tiny_llava(tmp_path / "llava")
    projection = Projection.from_llava_checkpoint(tmp_path / "llava").eval()
    assert (projection.kind, projection.d_enc, projection.d_lm) == ("mlp2x_gelu", 16, 24)
    features = torch.randn(2, 4, 16)  # [batch, patches, vision width]
    from_module = Projection.from_llava_projector(model.model.multi_modal_projector).eval()  # a loaded model's
    with torch.no_grad():
        torch.testing.assert_close(projection(features), model.model.multi_modal_projector(features),
                                   rtol=1e-6, atol=1e-6)
        assert torch.equal(from_module(features), projection(features))
    # one .safetensors file works too; a file without the projector is named
    assert Projection.from_llava_checkpoint(tmp_path / "llava" / "model.safetensors").d_lm == 24
    from safetensors.torch import save_file

    save_file({"other.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(KeyError, match="no multi_modal_projector tensors"):
        Projection.from_llava_checkpoint(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="LLaVA checkpoint not found"):
        Projection.from_llava_checkpoint(tmp_path / "empty_folder_that_is_missing")


def test_the_recipes_read_each_kind_of_checkpoint(tmp_path, save_tiny_llava):
    from omegaconf import OmegaConf

    from mmn.recipes.run import load_projection

    save_tiny_llava(tmp_path / "llava")
    Projection(16, 24, kind="linear").save(tmp_path / "saved")
    torch.save(nn.Linear(16, 24).state_dict(), tmp_path / "proj.ckpt")

    def loaded(checkpoint, kind="linear"):
        settings = OmegaConf.create({"kind": kind, "n_out_tokens": 1, "dropout": 0.0, "max_norm": None,
                                     "checkpoint": checkpoint})
        return load_projection(settings, 16, 24)

    assert loaded(None, "mlp2x_gelu").kind == "mlp2x_gelu"
    assert loaded(str(tmp_path / "saved")).kind == "linear"
    assert loaded(str(tmp_path / "llava")).kind == "mlp2x_gelu"
    assert loaded(str(tmp_path / "proj.ckpt")).kind == "linear"
