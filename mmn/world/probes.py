"""Probes of the world encoder's features: can a linear map read an object's shape from them,
and can a small MLP?

The Shapes world wants the answer "not linearly, but non-linearly": then a linear projection
cannot write the shape word into the LM's residual stream itself, and the LM's MLP units have
something to translate (issue "Shapes world 2"; BEiT's features are known for weak linear probes
next to what a non-linear head reads from them). Both probes are trained on the same patches of
one half of a held-out render and scored on the objects of the other half.

    labels = patch_labels(seed, n, scenes, patch_size)       # what each patch shows
    features = encode(encoder, images)                        # [n, n_patch, d]
    shape_probes(features, labels)  ->  {"linear": 0.3, "mlp": 0.95, ...}
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from mmn.analysis.prompts import decode_prompts
from mmn.world import generator


def patch_labels(seed: int, n: int, scenes, patch_size: int) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """Render n scenes of the "batch" stream and label each patch with the shape, colour and drawn
    outline (glyph) of the object covering it (-1: background).
    -> (uint8 [n, H, W, 3], {"shape", "colour", "glyph": long [n, n_patch]})"""
    scenes = generator.scene_config(scenes)
    size = scenes.image_size
    grid = size // patch_size
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    shape = torch.full((n, grid * grid), -1, dtype=torch.long)
    colour = torch.full((n, grid * grid), -1, dtype=torch.long)
    glyph = torch.full((n, grid * grid), -1, dtype=torch.long)
    for i in range(n):
        scene, _ = generator.scene_at(seed, "batch", i, scenes)
        image, masks = generator.render(scene, size)
        images[i] = np.asarray(image)
        for obj, mask in zip(scene.objects, masks):
            cover = mask.reshape(grid, patch_size, grid, patch_size).mean(axis=(1, 3)).reshape(-1)  # [n_patch]
            on = torch.from_numpy(cover >= generator.PATCH_COVER)
            shape[i, on] = generator.SHAPES.index(obj.shape)
            colour[i, on] = list(generator.COLOURS).index(obj.colour)
            glyph[i, on] = generator.SHAPES.index(obj.glyph or obj.shape)
    return images, {"shape": shape, "colour": colour, "glyph": glyph}


def fit_probe(train_x: torch.Tensor, train_y: torch.Tensor, n_classes: int, hidden: int = 0, steps: int = 1000,
              seed: int = 0) -> torch.nn.Module:
    """A linear (hidden=0) or one-hidden-layer GELU probe, trained full-batch with Adam on
    standardised features."""
    torch.manual_seed(seed)
    width = train_x.shape[1]
    probe = (torch.nn.Linear(width, n_classes) if hidden == 0 else
             torch.nn.Sequential(torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, n_classes)))
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        loss = F.cross_entropy(probe(train_x), train_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return probe.eval()


@torch.no_grad()
def _accuracy(probe: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (probe(x).argmax(-1) == y).float().mean().item()


def shape_probes(features: torch.Tensor, labels: dict[str, torch.Tensor], hidden: int = 256) -> dict:
    """Linear and MLP probes of each label (shape; colour and glyph for reference) on object patches.

    features: [n, n_patch, d]; labels from `patch_labels`. Probes train on the first half of the
    images and are scored on the patches of the second half (held-out objects)."""
    n = len(features)
    half = n // 2
    out = {}
    for name, target in labels.items():
        n_classes = int(target.max()) + 1
        x_all, y_all = features.float().reshape(-1, features.shape[-1]), target.reshape(-1)
        image_of = torch.arange(n).repeat_interleave(features.shape[1])
        on = y_all >= 0
        train, test = on & (image_of < half), on & (image_of >= half)
        mean, std = x_all[train].mean(0), x_all[train].std(0) + 1e-6
        x_all = (x_all - mean) / std
        for kind, width in (("linear", 0), ("mlp", hidden)):
            probe = fit_probe(x_all[train], y_all[train], n_classes, hidden=width)
            out[f"{name}_{kind}"] = round(_accuracy(probe, x_all[test], y_all[test]), 4)
        out[f"{name}_chance"] = round(y_all[test].bincount().max().item() / int(test.sum()), 4)
    out["n_test_patches"] = int(test.sum())
    return out


@torch.no_grad()
def write_norms(captioner, pixels: torch.Tensor) -> dict:
    """How large what the projection and each layer's MLP write at the image positions are (the
    direct path against the MLPs'), beside the norm of the embedded text prompt. Mean L2 norms over
    images and positions. pixels: [batch, 3, H, W]."""
    lm = captioner.lm
    inputs = captioner.input_embeddings(pixels)  # [batch, n_prompt, d_lm]
    image = torch.zeros(inputs.shape[1], dtype=torch.bool, device=inputs.device)  # [n_prompt]: image positions
    image[captioner.image_positions] = True
    mlp = {}

    def record(module, args, output, layer):
        mlp[layer] = output[:, image].norm(dim=-1).mean().item()  # output: [batch, pos, d_lm]

    with lm.hooks(forward=[(lm.mlp_out(layer), partial(record, layer=layer)) for layer in range(lm.n_layers)]):
        lm.final_hidden(inputs.to(lm.dtype))
    return {"prompt": inputs[:, image].norm(dim=-1).mean().item(),
            "text_embedding": inputs[:, ~image].norm(dim=-1).mean().item(),
            "mlp": [round(mlp[layer], 3) for layer in range(lm.n_layers)]}


@torch.no_grad()
def prompt_spread(captioner, pixels: torch.Tensor, top_k: int = 5) -> dict:
    """How alike the image positions are, in the encoder's features and in the image prompts: the
    mean cosine of each position's vector with the mean vector over every image and position, and
    how many distinct lists of top_k nearest tokens the prompts decode to (prompts.decode_prompts,
    Table 2's decoding) out of how many prompts. Where one vector dominates (a uniform background),
    most prompts decode to the same tokens and Table 2 scores one text per image. pixels: [batch, 3, H, W]."""
    features = captioner.encoder(pixels).float().flatten(0, 1)  # [batch * n_tok, d_enc]
    prompts = captioner.image_prompts(pixels).float().flatten(0, 1)  # [batch * n_image, d_lm]

    def cosine_to_mean(vectors: torch.Tensor) -> float:
        return F.cosine_similarity(vectors, vectors.mean(dim=0, keepdim=True)).mean().item()

    decoded = decode_prompts(captioner.lm, prompts, top_k)
    return {"encoder_cosine_to_mean": round(cosine_to_mean(features), 4),
            "prompt_cosine_to_mean": round(cosine_to_mean(prompts), 4),
            "distinct_decodings": len(set(map(tuple, decoded))), "prompts": len(decoded)}


@torch.no_grad()
def encoder_probes(encoder_dir, scenes, seed: int, n_images: int = 1600) -> dict:
    """`shape_probes` of a saved world encoder on n_images fresh renders of seed `seed`."""
    import mmn  # noqa: F401  (torchvision shim before transformers)
    from transformers import BeitModel

    from mmn.world.image_encoder import to_pixels

    model = BeitModel.from_pretrained(encoder_dir).eval()
    images, labels = patch_labels(seed, n_images, scenes, model.config.patch_size)
    features = torch.cat([model(pixel_values=to_pixels(torch.from_numpy(images[start : start + 100]))).last_hidden_state[:, 1:]
                          for start in range(0, n_images, 100)])  # [n, n_patch, hidden]
    with torch.enable_grad():
        return shape_probes(features, labels)
