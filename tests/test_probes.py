"""The encoder probes: a linear probe cannot read a shape that is a non-linear function of the
features, a small MLP can, and both read a linearly coded one."""

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
