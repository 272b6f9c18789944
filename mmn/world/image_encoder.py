"""Shapes world part (b): a small BEiT trained self-supervised on images only.

The world's image encoder plays BEiT-Large pt22k's role (`microsoft/beit-large-patch16-224-pt22k`):
a ViT that never saw a caption, pre-trained to predict discrete image tokens. It is a real
`BeitModel` with pt22k's choices (16-pixel patches at 224 -> 14 x 14 = 196 patch tokens,
shared relative position bias instead of absolute positions, layer scale, a mask token),
with its final layer norm kept over the patch tokens (pt22k's `BeitModel` leaves its trained
final norm out, see `mmn.models.encoders`; here the norm is part of the saved model), saved with
`save_pretrained` next to a `BeitImageProcessor` that squash-resizes to 224 without centre
crop. So the real loaders read it:

    load_encoder("beit", dir)                     # mmn.models.encoders
    BeitModel.from_pretrained(dir); BeitImageProcessor.from_pretrained(dir)

Pre-training, as BEiT: an image tokenizer fit on images alone gives every patch a discrete
token, and the ViT learns to predict it (a linear head on each patch's output, cross-entropy,
the head thrown away after). BEiT's tokenizer is a dVAE trained on millions of images; the
world's (`ObjectTokenizer`) is fit in seconds from image statistics: pixels far from the image's
median colour form objects (connected components), each object's outline (its silhouette inside
its bounding box: free of colour, position and scale) is clustered by k-means, so is its mean
colour (`colour_tokens`), and a patch takes the token (outline cluster, colour cluster) of the
object covering most of it, as a dVAE's tokens carry shape and colour together. No caption or
annotation is used; the clusters are numbers, not shape or colour names (12 outline clusters for
the world's 8 shapes: some shapes split by size). The head scores the token's two factors apart
(one softmax over outlines, one over colours), so that every outline cluster learns from all colours.

Why not masked pixel prediction (SimMIM), which the world used first: on this 2-core CPU budget
(~1,500 steps) its features carried colour but hardly any shape (a per-patch linear probe:
shape 0.16, chance 0.125), and no linear projection made the LM name shapes. BEiT-Large gets
semantic features from pre-training far beyond a laptop's budget; predicting object tokens gets
this world's encoder to a per-patch shape probe of ~0.89 in two minutes. Measured choices, each
on that probe: no colour token beside the outline token at the time (as one joint token colour
was the easier target and the model stopped at it: 0.46); and, with the
generator's shape labels standing in for the tokens, no masking (masking object patches and
adding a pixel loss: 0.43 against 0.92) and learning rate 8e-3 (2e-3: 0.73); a
small model (width 64, 2 layers) with many small batches; background patches weighted 0.1
(they are most patches, and easy); and the shared relative position bias starting as
-slope * distance (one slope per head, the last head global, like ALiBi), so attention starts local.
Renders are cheap and the model overfits 3,000 of them: 6,000 (same 1,500 steps) raise held-out
token accuracy from 0.79 to 0.86 and a linear probe of object shape (each object's patches averaged)
from 0.88 to 0.93; 12,000 add nothing more (0.85, 0.94).
At the default's 32-pixel patches a patch holds less of its object's outline, and the budget is
steps: a per-patch linear probe of the outline reads 0.84 after 1,500 steps and 0.99 after 6,000;
at 1,500 steps, 4 layers instead of 2 read 0.89 and width 128 0.56 (docs/shapes_world_2.md,
section 14). Without colour in its tokens the encoder let colour go (0.96 per object patch) and the
projection wrote it wrongly at a third of object patches, so the captioner named a shape right
0.75 of the time. With colour tokens and a factored head, colour is read 1.00 and the outline 0.97
after 9,000 steps (the default, 4 minutes), and the captioner is right 0.91 of the time (section 15).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import mmn  # noqa: F401  (torchvision shim before transformers)
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from transformers import BeitConfig, BeitImageProcessor, BeitModel

from mmn.world.generator import PATCH_COVER  # a patch takes an object's token from this share of cover
from mmn.world.optimise import epoch_batches, fit
from mmn.world.settings import EncoderConfig

PIXEL_MEAN = (0.5, 0.5, 0.5)  # what the saved processor normalises with; training uses the same
PIXEL_STD = (0.5, 0.5, 0.5)
OBJECT_PIXEL_THRESHOLD = 0.3  # normalised distance from the median colour that marks an object-like pixel
# (world backgrounds, noise and gradients included, stay within ~0.27 of their median; object colours are > 1.3 away)
MIN_OBJECT_PIXELS = 30    # smaller components are specks, not objects (the smallest object covers ~300 pixels)
BACKGROUND_WEIGHT = 0.1   # loss weight of background patches (about 80% of patches, and easy)
TOKENIZER_FIT_IMAGES = 1500  # k-means of a dozen outline clusters needs a few thousand objects, not every image's


def beit_config(cfg: EncoderConfig) -> BeitConfig:
    """BEiT pt22k's architecture choices at the world's size."""
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"encoder.image_size={cfg.image_size} is not a multiple of encoder.patch_size={cfg.patch_size}")
    if cfg.position_bias_slopes and len(cfg.position_bias_slopes) != cfg.num_attention_heads:
        raise ValueError(f"encoder.position_bias_slopes has {len(cfg.position_bias_slopes)} values for "
                         f"encoder.num_attention_heads={cfg.num_attention_heads}")
    return BeitConfig(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        use_mask_token=True,
        use_absolute_position_embeddings=False,
        use_relative_position_bias=False,
        use_shared_relative_position_bias=True,
        layer_scale_init_value=cfg.layer_scale_init_value,
        use_mean_pooling=False,  # keep the trained final norm inside BeitModel (pt22k keeps it in its MIM head)
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
    )


def image_processor(cfg: EncoderConfig) -> BeitImageProcessor:
    """Squash-resize to image_size (no centre crop), rescale to [0, 1], normalise with PIXEL_MEAN/STD."""
    return BeitImageProcessor(
        do_resize=True,
        size={"height": cfg.image_size, "width": cfg.image_size},
        resample=3,  # PIL bicubic
        do_center_crop=False,
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(PIXEL_MEAN),
        image_std=list(PIXEL_STD),
        do_reduce_labels=False,
    )


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 [batch, H, W, 3] -> normalised float [batch, 3, H, W], as the saved processor does
    for images already at image_size."""
    pixels = images.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def median_colour(pixels: torch.Tensor) -> torch.Tensor:
    """Per-image median of each channel (over every 4th pixel, for speed), i.e. the background
    colour here.  [batch, 3, H, W] -> [batch, 3]"""
    return pixels[:, :, ::4, ::4].flatten(2).median(dim=2).values


def locality_position_bias(model: BeitModel, slopes: tuple[float, ...]) -> None:
    """Set the shared relative position bias to -slope * (patch distance) per head (cls entries 0)."""
    table = model.shared_position_bias.relative_position_bias_table  # [(2h-1)(2w-1) + 3, heads]
    rows, cols = model.shared_position_bias.window_size
    d_row = torch.arange(2 * rows - 1) - (rows - 1)
    d_col = torch.arange(2 * cols - 1) - (cols - 1)
    distance = (d_row[:, None] ** 2 + d_col[None, :] ** 2).float().sqrt().reshape(-1)  # BEiT's index: d_row-major
    with torch.no_grad():
        for head, slope in enumerate(slopes):
            table[: len(distance), head] = -slope * distance


def object_components(pixels: torch.Tensor) -> np.ndarray:
    """The objects of each image, found from its pixels alone: connected regions of pixels far
    from the image's median colour, specks dropped.  [batch, 3, H, W] -> int32 [batch, H, W],
    0 = background, 1..n = objects."""
    far = ((pixels - median_colour(pixels)[:, :, None, None]).abs().amax(dim=1) > OBJECT_PIXEL_THRESHOLD).numpy()
    components = np.zeros(far.shape, np.int32)
    for image, mask in enumerate(far):
        found, _ = ndimage.label(mask)
        sizes = np.bincount(found.ravel())
        kept = np.flatnonzero(sizes >= MIN_OBJECT_PIXELS)
        kept = kept[kept > 0]
        renumber = np.zeros(sizes.size, np.int32)
        renumber[kept] = np.arange(1, kept.size + 1)
        components[image] = renumber[found]
    return components


def describe_outlines(components: np.ndarray, outline_pixels: int) -> tuple[torch.Tensor, np.ndarray]:
    """Each object's outline: its silhouette inside its bounding box, area-resized to outline_pixels^2,
    and the box's height / (height + width); free of colour, position and scale.
    -> (outlines [n_objects, outline_pixels^2 + 1], owners int [n_objects, 2]: (image, object))"""
    outlines, owners = [], []
    for image, labels in enumerate(components):
        for number, box in enumerate(ndimage.find_objects(labels), start=1):
            inside = labels[box] == number  # [h, w]
            height, width = inside.shape
            silhouette = F.interpolate(torch.from_numpy(inside.astype(np.float32))[None, None],
                                       size=(outline_pixels, outline_pixels), mode="area").flatten()
            outlines.append(torch.cat([silhouette, torch.tensor([height / (height + width)])]))
            owners.append((image, number))
    if not owners:
        return torch.empty(0, outline_pixels**2 + 1), np.empty((0, 2), np.int64)
    return torch.stack(outlines), np.array(owners)


def object_colours(pixels: torch.Tensor, components: np.ndarray, owners: np.ndarray) -> torch.Tensor:
    """Each object's mean colour (normalised pixels), in `owners`' order.
    pixels [batch, 3, H, W], components int [batch, H, W], owners [n_objects, 2] -> [n_objects, 3]"""
    colours = [pixels[image][:, torch.from_numpy(components[image] == number)].mean(dim=1) for image, number in owners]
    return torch.stack(colours) if colours else torch.empty(0, 3)


def patch_appearance(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Each patch's mean colour and pixel spread (the standard deviation, averaged over channels),
    normalised pixels.  [batch, 3, H, W] -> [batch, n_patch, 4]"""
    mean = F.avg_pool2d(pixels, patch_size)  # [batch, 3, rows, cols]
    spread = (F.avg_pool2d(pixels**2, patch_size) - mean**2).clamp_min(0).sqrt().mean(dim=1, keepdim=True)
    return torch.cat([mean, spread], dim=1).flatten(2).transpose(1, 2)


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 30) -> torch.Tensor:
    """Lloyd's k-means from a k-means++ start.  [n, dim] -> centroids [k, dim]"""
    centroids = points[torch.randint(len(points), (1,), generator=generator)]
    for _ in range(k - 1):
        distance = torch.cdist(points, centroids).min(dim=1).values.pow(2)
        centroids = torch.cat([centroids, points[torch.multinomial(distance / distance.sum(), 1, generator=generator)]])
    for _ in range(iterations):
        nearest = torch.cdist(points, centroids).argmin(dim=1)
        centroids = torch.stack([points[nearest == c].mean(dim=0) if (nearest == c).any() else centroids[c]
                                 for c in range(k)])
    return centroids


class ObjectTokenizer:
    """The world's stand-in for BEiT's dVAE tokenizer: k-means centroids of object outlines (and,
    with `colour_tokens`, of object colours), fit on training images. A patch's token is that of the
    object covering most of it (outline cluster x colour_tokens + colour cluster), or the
    background token (`cfg.n_object_tokens`) when no object covers PATCH_COVER of it; with
    `background_tokens`, n_object_tokens + the cluster of the background patch's appearance
    (`patch_appearance`), as a dVAE's tokens code every patch."""

    def __init__(self, centroids: torch.Tensor, cfg: EncoderConfig, colour_centroids: torch.Tensor | None = None,
                 background_centroids: torch.Tensor | None = None):
        self.centroids, self.cfg = centroids, cfg  # [outline_tokens, outline_pixels^2 + 1]
        self.colour_centroids = colour_centroids  # [colour_tokens, 3] or None: tokens free of colour
        self.background_centroids = background_centroids  # [background_tokens, 4] or None: one background token

    @classmethod
    def fit(cls, images: torch.Tensor, cfg: EncoderConfig, generator: torch.Generator, chunk: int = 100) -> "ObjectTokenizer":
        """images: uint8 [n, H, W, 3]."""
        outlines, colours, backgrounds = [], [], []
        for start in range(0, len(images), chunk):
            pixels = to_pixels(images[start : start + chunk])
            components = object_components(pixels)
            found, owners = describe_outlines(components, cfg.outline_pixels)
            outlines.append(found)
            colours.append(object_colours(pixels, components, owners))
            if cfg.background_tokens:
                on_background = patch_objects(components, cfg.patch_size) == 0  # [chunk, n_patch]
                backgrounds.append(patch_appearance(pixels, cfg.patch_size)[on_background])
        outlines, colours = torch.cat(outlines), torch.cat(colours)
        if len(outlines) < max(cfg.outline_tokens, cfg.colour_tokens):
            raise ValueError(f"the world encoder's tokenizer found {len(outlines)} objects in {len(images)} images, "
                             f"fewer than encoder.outline_tokens={cfg.outline_tokens} or colour_tokens={cfg.colour_tokens}")
        colour_centroids = kmeans(colours, cfg.colour_tokens, generator) if cfg.colour_tokens else None
        background_centroids = kmeans(torch.cat(backgrounds), cfg.background_tokens, generator) if backgrounds else None
        return cls(kmeans(outlines, cfg.outline_tokens, generator), cfg, colour_centroids, background_centroids)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [batch, H, W, 3] -> long [batch, n_patch]: each patch's token."""
        pixels = to_pixels(images)
        components = object_components(pixels)  # [batch, H, W]
        outlines, owners = describe_outlines(components, self.cfg.outline_pixels)
        token = torch.cdist(outlines, self.centroids).argmin(dim=1)  # [n_objects]
        if self.colour_centroids is not None:
            colour = torch.cdist(object_colours(pixels, components, owners), self.colour_centroids).argmin(dim=1)
            token = token * len(self.colour_centroids) + colour
        token_of = torch.full((len(images), int(components.max(initial=0)) + 1), self.cfg.n_object_tokens)  # object -> token
        token_of[torch.from_numpy(owners[:, 0]), torch.from_numpy(owners[:, 1])] = token
        patches = patch_objects(components, self.cfg.patch_size)  # [batch, n_patch], 0 = background
        tokens = token_of.gather(1, patches)
        if self.background_centroids is not None:
            on_background = patches == 0
            appearance = patch_appearance(pixels, self.cfg.patch_size)[on_background]  # [n_background, 4]
            tokens[on_background] = self.cfg.n_object_tokens + torch.cdist(appearance, self.background_centroids).argmin(dim=1)
        return tokens


def patch_objects(components: np.ndarray, patch_size: int) -> torch.Tensor:
    """Per patch, the object covering the largest share of it if that share is >= PATCH_COVER, else 0.
    int [batch, H, W] -> long [batch, n_patch]"""
    # Pixel counts per (image, patch, label) cell with one bincount: 6x faster than one-hot + pooling.
    batch, height, width = components.shape
    rows, cols = height // patch_size, width // patch_size
    n_labels = int(components.max(initial=0)) + 2  # one spare column, so there is an object column if there are none
    patch_of_pixel = (np.arange(height)[:, None] // patch_size * cols + np.arange(width)[None, :] // patch_size)
    cell = (np.arange(batch)[:, None, None] * (rows * cols) + patch_of_pixel) * n_labels + components  # [batch, H, W]
    pixels = np.bincount(cell.ravel(), minlength=batch * rows * cols * n_labels).reshape(batch, rows * cols, n_labels)
    best_pixels, best = torch.from_numpy(pixels[:, :, 1:]).max(dim=2)  # over objects 1..
    return torch.where(best_pixels >= PATCH_COVER * patch_size**2, best + 1, 0)


def tokenize(tokenizer: ObjectTokenizer, images: torch.Tensor, chunk: int = 100) -> torch.Tensor:
    """The tokenizer over many images in chunks.  uint8 [n, H, W, 3] -> long [n, n_patch]"""
    return torch.cat([tokenizer(images[start : start + chunk]) for start in range(0, len(images), chunk)])


class TokenPredictionModel(torch.nn.Module):
    """BeitModel + a linear head that predicts each patch's token (the head is discarded after training).

    With colour tokens the head scores the token's two factors apart: its logits are the outline's
    (outline_tokens + background) followed by the colour's (colour_tokens + background)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.encoder = BeitModel(beit_config(cfg))
        if cfg.position_bias_slopes:
            locality_position_bias(self.encoder, tuple(cfg.position_bias_slopes))
        self.factor_sizes = ([cfg.outline_tokens + 1] + ([cfg.colour_tokens + 1] if cfg.colour_tokens else [])
                             + ([cfg.background_tokens + 1] if cfg.background_tokens else []))
        self.head = torch.nn.Linear(cfg.hidden_size, sum(self.factor_sizes))
        self.cfg = cfg
        self.autocast = cfg.bf16 and torch.cpu._is_avx512_bf16_supported()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[batch, 3, H, W] -> logits of the token's factors [batch, n_patch, sum(factor_sizes)]"""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            hidden = self.encoder(pixel_values=pixels).last_hidden_state[:, 1:]  # [batch, n_patch, hidden]
        return self.head(hidden.float())

    def factors(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Tokens (long [batch, n_patch]) -> one tensor per factor: the outline, the colour (with
        colour_tokens), each with the background as its last index, and the background's appearance
        (with background_tokens), "an object" its last index."""
        cfg, background = self.cfg, tokens >= self.cfg.n_object_tokens
        if cfg.colour_tokens:
            parts = [torch.where(background, cfg.outline_tokens, tokens // cfg.colour_tokens),
                     torch.where(background, cfg.colour_tokens, tokens % cfg.colour_tokens)]
        else:
            parts = [torch.where(background, cfg.outline_tokens, tokens)]
        if cfg.background_tokens:
            parts.append(torch.where(background, tokens - cfg.n_object_tokens, cfg.background_tokens))
        return parts

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """The most likely token of each patch (background when the outline or the colour says so)."""
        cfg, parts = self.cfg, logits.split(self.factor_sizes, dim=-1)
        token = outline = parts[0].argmax(-1)
        background = outline == cfg.outline_tokens
        if cfg.colour_tokens:
            colour = parts[1].argmax(-1)
            background |= colour == cfg.colour_tokens
            token = outline * cfg.colour_tokens + colour
        background_token = cfg.n_object_tokens
        if cfg.background_tokens:  # the likeliest appearance, "an object" aside
            background_token = background_token + parts[-1][..., :-1].argmax(-1)
        return torch.where(background, background_token, token)

    def loss(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the patch tokens (long [batch, n_patch]) given this model's logits, summed
        over the token's factors, background patches down-weighted."""
        weight = torch.where(tokens < self.cfg.n_object_tokens, 1.0, BACKGROUND_WEIGHT).flatten()
        per_patch = sum(F.cross_entropy(part.flatten(0, 1), target.flatten(), reduction="none")
                        for part, target in zip(logits.split(self.factor_sizes, dim=-1), self.factors(tokens)))
        return (per_patch * weight).sum() / weight.sum()


@torch.no_grad()
def token_metrics(model: TokenPredictionModel, images: torch.Tensor, tokens: torch.Tensor, batch_size: int = 100) -> dict:
    """Held-out loss, and token accuracy on object patches (background excluded)."""
    model.eval()
    loss, hits, count = 0.0, 0, 0
    for start in range(0, len(images), batch_size):
        pixels, target = to_pixels(images[start : start + batch_size]), tokens[start : start + batch_size]
        logits = model(pixels)  # [batch, n_patch, sum(factor_sizes)]
        loss += model.loss(logits, target).item() * len(pixels)
        on_object = target < model.cfg.n_object_tokens
        hits += (model.predict(logits) == target)[on_object].sum().item()
        count += on_object.sum().item()
    return {"token_loss": loss / len(images), "token_accuracy": hits / max(count, 1), "object_patches": count}


def train_image_encoder(
    train_images: np.ndarray,
    eval_images: np.ndarray,
    out_dir: str | Path,
    cfg: EncoderConfig | None = None,
    *,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Fit the object tokenizer on the first TOKENIZER_FIT_IMAGES of uint8 [n, H, W, 3] images,
    pre-train a BEiT to predict the tokens of all of them, save the BeitModel + BeitImageProcessor
    to `out_dir`; return held-out token metrics (after and before training, and the majority-token
    baseline) and the wall time."""
    cfg = cfg or EncoderConfig()
    for name, images in (("train_images", train_images), ("eval_images", eval_images)):
        if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, 3) or images.dtype != np.uint8:
            raise ValueError(f"train_image_encoder: {name} must be uint8 [n, {cfg.image_size}, {cfg.image_size}, 3], "
                             f"got {images.dtype} {tuple(images.shape)}")
        if len(images) == 0:
            raise ValueError(f"train_image_encoder: {name} is empty")
    started = time.perf_counter()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train = torch.from_numpy(np.ascontiguousarray(train_images))  # uint8 [n, H, W, 3]
    held_out = torch.from_numpy(np.ascontiguousarray(eval_images))
    tokenizer = ObjectTokenizer.fit(train[:TOKENIZER_FIT_IMAGES], cfg, generator)
    train_tokens = tokenize(tokenizer, train)  # long [n, n_patch]
    held_out_tokens = tokenize(tokenizer, held_out)
    tokenizer_seconds = time.perf_counter() - started

    model = TokenPredictionModel(cfg)
    before = token_metrics(model, held_out, held_out_tokens)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    fit(model, optimizer, epoch_batches(len(train), cfg.batch_size, generator),
        lambda batch: model.loss(model(to_pixels(train[batch])), train_tokens[batch]), cfg.steps, cfg.warmup_steps,
        "world encoder (images only, object tokens)", progress)

    after = token_metrics(model, held_out, held_out_tokens)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(out_dir)
    image_processor(cfg).save_pretrained(out_dir)
    on_object = held_out_tokens[held_out_tokens < cfg.n_object_tokens]
    metrics = {
        "eval_token_accuracy": after["token_accuracy"],
        "eval_token_loss": after["token_loss"],
        "eval_token_loss_untrained": before["token_loss"],
        "baseline_majority_token": on_object.bincount().max().item() / max(len(on_object), 1),
        "eval_object_patches": after["object_patches"],
        "n_train_images": len(train),
        "n_eval_images": len(held_out),
        "images_seen": cfg.steps * cfg.batch_size,
        "tokenizer_seconds": tokenizer_seconds,
        "bf16": model.autocast,
        "config": asdict(cfg),
        "seconds": time.perf_counter() - started,
    }
    (out_dir / "world_part.json").write_text(json.dumps(metrics, indent=2))
    return metrics
