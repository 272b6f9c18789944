"""The encoder probes: a linear probe cannot read a shape that is a non-linear function of the
features, a small MLP can, and both read a linearly coded one; and how alike the image prompts are."""

import numpy as np
import pytest
import torch

from mmn.world.probes import shape_probes


def coded_features(n_images: int, n_patch: int = 6, noise: float = 0.1, seed: int = 0):
    """Patches whose features are one-hot (glyph, colour) codes; shape = (glyph - colour) mod 8, as
    the world's glyph_shift draws it, so shape is readable from the features only non-linearly."""
    generator = torch.Generator().manual_seed(seed)
    glyph = torch.randint(8, (n_images, n_patch), generator=generator)
    colour = torch.randint(6, (n_images, n_patch), generator=generator)
    features = torch.cat([torch.nn.functional.one_hot(glyph, 8), torch.nn.functional.one_hot(colour, 6)], -1).float()
    features += noise * torch.randn(features.shape, generator=generator)
    return features, {"shape": (glyph - colour) % 8, "glyph": glyph}


def test_linear_probe_fails_where_only_a_non_linear_one_reads_the_shape():
    features, labels = coded_features(600)
    probes = shape_probes(features, labels)
    assert probes["glyph_linear"] > 0.97 and probes["glyph_mlp"] > 0.97  # a linear code: both read it
    assert probes["shape_mlp"] > 0.9                                     # the cipher: only the MLP does
    assert probes["shape_linear"] < 0.3 and probes["shape_chance"] < 0.2
    assert probes["n_test_patches"] == 300 * 6


def test_prompt_spread_tells_one_repeated_prompt_from_varied_ones(tmp_path, save_tiny_captioner_lm, save_tiny_beit,
                                                                  captioner_sizes):
    from PIL import Image

    from mmn.models.captioner import Captioner
    from mmn.models.encoders import load_encoder
    from mmn.models.lm import LanguageModel
    from mmn.models.projection import Projection
    from mmn.world.probes import prompt_spread

    save_tiny_captioner_lm(tmp_path / "lm")
    save_tiny_beit(tmp_path / "encoder")
    torch.manual_seed(0)
    projection = Projection(captioner_sizes.d_enc, captioner_sizes.d_lm, dropout=0.0)
    captioner = Captioner(load_encoder("beit", tmp_path / "encoder"), projection, LanguageModel.from_pretrained(tmp_path / "lm"))
    np_random = np.random.default_rng(0)
    images = [Image.fromarray(np_random.integers(0, 256, (40, 40, 3), dtype="uint8")) for _ in range(3)]
    pixels = captioner.preprocess(images)

    varied = prompt_spread(captioner, pixels, top_k=2)
    assert varied["prompts"] == 3 * captioner.n_image_tokens
    assert varied["distinct_decodings"] > 1 and varied["prompt_cosine_to_mean"] < 0.99
    assert -1.0 <= varied["encoder_cosine_to_mean"] < 1.0

    with torch.no_grad():  # every prompt is the bias alone: one vector, one decoding
        projection.linear.weight.zero_()
    repeated = prompt_spread(captioner, pixels, top_k=2)
    assert repeated["distinct_decodings"] == 1 and repeated["prompt_cosine_to_mean"] == pytest.approx(1.0)
    assert repeated["encoder_cosine_to_mean"] == varied["encoder_cosine_to_mean"]  # the encoder is unchanged
