"""Shapes world part (b): a small BEiT trained self-supervised on images only.

The world's image encoder plays BEiT-Large pt22k's role (`microsoft/beit-large-patch16-224-pt22k`):
a ViT that never saw a caption, pre-trained by masked image modelling. It is a real
`BeitModel` with pt22k's choices (16-pixel patches at 224 -> 14 x 14 = 196 patch tokens,
shared relative position bias instead of absolute positions, layer scale, a mask token),
with its final layer norm kept over the patch tokens (pt22k's `BeitModel` leaves its trained
final norm out, see `mmn.models.encoders`; here the norm is part of the saved model), saved with
`save_pretrained` next to a `BeitImageProcessor` that squash-resizes to 224 without centre
crop. So the real loaders read it:

    load_encoder("beit", dir)                     # mmn.models.encoders
    BeitModel.from_pretrained(dir); BeitImageProcessor.from_pretrained(dir)

Pre-training is SimMIM-style (simpler than BEiT's dVAE-token targets): some patches are
replaced by the mask token and a linear head on each masked patch's output predicts that
patch's pixels (average-pooled to `target_pixels` x `target_pixels` x 3, normalised as the
processor does); mean squared error on masked patches only; the head is then thrown away.
Three choices, each measured on this world's 2-core CPU budget, make it learn in ~1,500 steps:

- Targets are pixels minus the image's median colour (its background). Without that, most
  of the loss is the exact background tint, which a layer-normed ViT learns slowly.
- Masking favours object-like patches (any pixel far from the median colour): they are
  masked with probability `mask_prob_object`, others with `mask_prob_background`. Only image
  statistics are used, no labels; otherwise ~90% of the masked patches are empty background.
- The shared relative position bias starts as -slope * distance (one slope per head, the
  last head global, like ALiBi), so attention starts local; it is trained from there.
A small model (width 64, 2 layers) with many small batches learns far more in the budget
than a wider one with few steps.

What the features carry (measured with a linear probe per patch): colour ~100%, shape near
chance (~0.16 per patch, 8 shapes). MIM features here are pixel-like; see the build report.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mmn  # noqa: F401  (torchvision shim before transformers)
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import BeitConfig, BeitImageProcessor, BeitModel, get_cosine_schedule_with_warmup

PIXEL_MEAN = (0.5, 0.5, 0.5)  # what the saved processor normalises with; training uses the same
PIXEL_STD = (0.5, 0.5, 0.5)
OBJECT_PIXEL_THRESHOLD = 0.3  # normalised distance from the median colour that marks an object-like pixel
# (world backgrounds, noise and gradients included, stay within ~0.27 of their median; object colours are > 1.3 away)


@dataclass
class EncoderConfig:
    """Sizes and training budget of the world's encoder (the `encoder` section of the world config)."""

    n_images: int = 3000        # images build_world renders for pre-training (no captions used)
    n_eval_images: int = 500    # held-out images for the reconstruction loss
    image_size: int = 224
    patch_size: int = 16
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 256
    layer_scale_init_value: float = 1.0
    position_bias_slopes: tuple[float, ...] = (2.0, 1.0, 0.5, 0.0)  # per head; () = zeros (BEiT's init)
    mask_prob_object: float = 0.6       # masking probability of object-like patches
    mask_prob_background: float = 0.35  # and of the others (about 37% of all patches overall)
    target_pixels: int = 8      # each patch's target: its pixels average-pooled to 8 x 8 x 3
    batch_size: int = 16
    steps: int = 1500
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.05
    bf16: bool = True           # bf16 autocast where the CPU has native bf16 (avx512_bf16), else fp32


def beit_config(cfg: EncoderConfig) -> BeitConfig:
    """BEiT pt22k's architecture choices at the world's size."""
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"encoder.image_size={cfg.image_size} is not a multiple of encoder.patch_size={cfg.patch_size}")
    if cfg.patch_size % cfg.target_pixels:
        raise ValueError(f"encoder.target_pixels={cfg.target_pixels} must divide encoder.patch_size={cfg.patch_size}")
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


def patch_targets(pixels: torch.Tensor, patch_size: int, target_pixels: int) -> torch.Tensor:
    """Each patch's pixels pooled to target_pixels^2 x 3 (channel fastest), patches row-major.
    [batch, 3, H, W] -> [batch, n_patch, target_pixels * target_pixels * 3]"""
    pooled = F.avg_pool2d(pixels, patch_size // target_pixels)  # [batch, 3, H', W']
    batch, channels, height, width = pooled.shape
    rows, cols = height // target_pixels, width // target_pixels
    patches = pooled.reshape(batch, channels, rows, target_pixels, cols, target_pixels)
    return patches.permute(0, 2, 4, 3, 5, 1).reshape(batch, rows * cols, -1)


def median_colour(pixels: torch.Tensor) -> torch.Tensor:
    """Per-image median of each channel (over every 4th pixel, for speed), i.e. the background
    colour here.  [batch, 3, H, W] -> [batch, 3]"""
    return pixels[:, :, ::4, ::4].flatten(2).median(dim=2).values


def object_like_patches(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Bool [batch, n_patch]: patches holding a pixel far from the image's median colour."""
    far = (pixels - median_colour(pixels)[:, :, None, None]).abs().amax(dim=1) > OBJECT_PIXEL_THRESHOLD  # [batch, H, W]
    return F.max_pool2d(far[:, None].float(), patch_size).flatten(1) > 0


def sample_mask(pixels: torch.Tensor, cfg: EncoderConfig, generator: torch.Generator) -> torch.Tensor:
    """Bool [batch, n_patch], True = masked: object-like patches with mask_prob_object, others
    with mask_prob_background; at least one patch per image."""
    objects = object_like_patches(pixels, cfg.patch_size)
    probability = torch.where(objects, cfg.mask_prob_object, cfg.mask_prob_background)
    masked = torch.rand(probability.shape, generator=generator) < probability
    masked[~masked.any(dim=1), 0] = True
    return masked


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


class MaskedImageModel(torch.nn.Module):
    """BeitModel + a linear pixel head on the patch outputs (the head is discarded after training)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.encoder = BeitModel(beit_config(cfg))
        if cfg.position_bias_slopes:
            locality_position_bias(self.encoder, tuple(cfg.position_bias_slopes))
        self.head = torch.nn.Linear(cfg.hidden_size, cfg.target_pixels**2 * 3)
        self.cfg = cfg
        self.autocast = cfg.bf16 and torch.cpu._is_avx512_bf16_supported()

    def predict(self, pixels: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Predicted pixels of every patch, background colour added back.  -> [batch, n_patch, target_dim]"""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            hidden = self.encoder(pixel_values=pixels, bool_masked_pos=masked).last_hidden_state[:, 1:]
        offsets = self.head(hidden.float())  # [batch, n_patch, target_dim]
        return offsets + median_colour(pixels).repeat(1, self.cfg.target_pixels**2)[:, None, :]

    def loss(self, pixels: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches' target pixels.  pixels [batch, 3, H, W], masked [batch, n_patch]"""
        target = patch_targets(pixels, self.cfg.patch_size, self.cfg.target_pixels)
        return (self.predict(pixels, masked) - target)[masked].pow(2).mean()


@torch.no_grad()
def reconstruction_losses(model: MaskedImageModel, images: torch.Tensor, seed: int, batch_size: int = 50) -> dict:
    """Held-out MSE on masked patches (masks drawn as in training, fixed by `seed`), and the same
    for trivial predictions of those patches: the image's median (background) colour, its mean
    colour, and zero (mid-grey)."""
    model.eval()
    cfg = model.cfg
    generator = torch.Generator().manual_seed(seed)
    sums = {"masked_mse": 0.0, "baseline_background_mse": 0.0, "baseline_mean_colour_mse": 0.0, "baseline_zero_mse": 0.0}
    count = 0
    for start in range(0, len(images), batch_size):
        pixels = to_pixels(images[start : start + batch_size])  # [batch, 3, H, W]
        masked = sample_mask(pixels, cfg, generator)
        target = patch_targets(pixels, cfg.patch_size, cfg.target_pixels)[masked]  # [n_masked, target_dim]
        repeat = cfg.target_pixels**2
        background = median_colour(pixels).repeat(1, repeat)[:, None, :].expand(-1, masked.shape[1], -1)[masked]
        mean_colour = pixels.mean(dim=(2, 3)).repeat(1, repeat)[:, None, :].expand(-1, masked.shape[1], -1)[masked]
        for name, prediction in (("masked_mse", model.predict(pixels, masked)[masked]),
                                 ("baseline_background_mse", background),
                                 ("baseline_mean_colour_mse", mean_colour),
                                 ("baseline_zero_mse", torch.zeros_like(target))):
            sums[name] += (prediction - target).pow(2).sum().item()
        count += target.numel()
    return {name: total / count for name, total in sums.items()}


def train_image_encoder(
    train_images: np.ndarray,
    eval_images: np.ndarray,
    out_dir: str | Path,
    cfg: EncoderConfig | None = None,
    *,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Pre-train a BEiT by masked image modelling on uint8 [n, H, W, 3] images; save the
    BeitModel + BeitImageProcessor to `out_dir`; return held-out reconstruction losses
    (masked-patch MSE after and before training, and the trivial baselines) and the wall time."""
    cfg = cfg or EncoderConfig()
    for name, images in (("train_images", train_images), ("eval_images", eval_images)):
        if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, 3) or images.dtype != np.uint8:
            raise ValueError(f"train_image_encoder: {name} must be uint8 [n, {cfg.image_size}, {cfg.image_size}, 3], "
                             f"got {images.dtype} {tuple(images.shape)}")
        if len(images) == 0:
            raise ValueError(f"train_image_encoder: {name} is empty")
    started = time.perf_counter()
    torch.manual_seed(seed)
    train = torch.from_numpy(np.ascontiguousarray(train_images))  # uint8 [n, H, W, 3]
    held_out = torch.from_numpy(np.ascontiguousarray(eval_images))

    model = MaskedImageModel(cfg)
    before = reconstruction_losses(model, held_out, seed + 1)["masked_mse"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    generator = torch.Generator().manual_seed(seed)
    order, position = torch.randperm(len(train), generator=generator), 0
    model.train()
    bar = tqdm(range(cfg.steps), desc="world encoder (images only, MIM)", disable=not progress)
    for _ in bar:
        if position + cfg.batch_size > len(order):  # next epoch
            order, position = torch.randperm(len(train), generator=generator), 0
        pixels = to_pixels(train[order[position : position + cfg.batch_size]])  # [batch, 3, H, W]
        position += cfg.batch_size
        loss = model.loss(pixels, sample_mask(pixels, cfg, generator))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(mse=f"{loss.item():.4f}")

    after = reconstruction_losses(model, held_out, seed + 1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(out_dir)
    image_processor(cfg).save_pretrained(out_dir)
    metrics = {
        "eval_masked_mse": after["masked_mse"],
        "eval_masked_mse_untrained": before,
        "baseline_background_mse": after["baseline_background_mse"],
        "baseline_mean_colour_mse": after["baseline_mean_colour_mse"],
        "baseline_zero_mse": after["baseline_zero_mse"],
        "n_train_images": len(train),
        "n_eval_images": len(held_out),
        "images_seen": cfg.steps * cfg.batch_size,
        "bf16": model.autocast,
        "config": asdict(cfg),
        "seconds": time.perf_counter() - started,
    }
    (out_dir / "world_part.json").write_text(json.dumps(metrics, indent=2))
    return metrics
