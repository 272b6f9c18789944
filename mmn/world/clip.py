"""Shapes world part (c): a small CLIP trained with open_clip on image-caption pairs.

It plays the role of the CLIP that CLIPScore uses on real data, and nothing else: the
captioner never sees it. It is a real `open_clip.CLIP` (image tower open_clip's ModifiedResNet,
as in CLIP's RN50, or a ViT; causal text transformer with open_clip's default
`SimpleTokenizer`, whose BPE vocabulary of 49408 ships inside the package) trained with
open_clip's `ClipLoss` (a share `noun_texts` of its texts are a caption's first noun alone, as
many of CLIP's alt-texts are one word), and saved in open_clip's hub layout so that the real
loaders read it:

    open_clip.create_model_and_transforms("local-dir:" + dir)
    open_clip.get_tokenizer("local-dir:" + dir)

The directory holds `open_clip_config.json` ({"model_cfg": ..., "preprocess_cfg": ...})
and `open_clip_model.safetensors` (the first name open_clip's factory looks for; half precision,
which open_clip's loader casts to the model's float32).
Images are squash-resized (resize_mode "squash"), like every image path of the world.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Mapping, Sequence

import mmn  # noqa: F401  (torchvision shim before open_clip)
import numpy as np
import open_clip
import torch
from open_clip.loss import ClipLoss
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image
from safetensors.torch import save_file

from mmn.world import generator
from mmn.world.optimise import epoch_batches, fit
from mmn.world.settings import ClipConfig

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


def open_clip_config(cfg: ClipConfig) -> dict:
    """The content of open_clip_config.json: open_clip's model_cfg and preprocess_cfg."""
    return {
        "model_cfg": {
            "embed_dim": cfg.embed_dim,
            "vision_cfg": {
                "image_size": cfg.image_size,
                "patch_size": cfg.patch_size,
                "width": cfg.vision_width,
                "layers": cfg.vision_layers,
                "head_width": cfg.vision_head_width,
            },
            "text_cfg": {
                "context_length": cfg.context_length,
                "vocab_size": cfg.vocab_size,
                "width": cfg.text_width,
                "heads": cfg.text_heads,
                "layers": cfg.text_layers,
            },
        },
        "preprocess_cfg": {
            "size": cfg.image_size,
            "mode": "RGB",
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "interpolation": "bicubic",
            "resize_mode": "squash",
        },
    }


def preprocess_images(images: np.ndarray, cfg: ClipConfig) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> [n, 3, size, size] through open_clip's own eval transform (the one
    create_model_and_transforms returns for this config), so training sees what scoring sees."""
    pp = open_clip_config(cfg)["preprocess_cfg"]
    transform = open_clip.image_transform(
        pp["size"], is_train=False, mean=pp["mean"], std=pp["std"],
        resize_mode=pp["resize_mode"], interpolation=pp["interpolation"],
    )
    return torch.stack([transform(Image.fromarray(image)) for image in images])


@torch.no_grad()
def retrieval_top1(model: open_clip.CLIP, pixels: torch.Tensor, tokens: torch.Tensor,
                   captions: Sequence[str], pool: int) -> dict:
    """Top-1 image->text and text->image retrieval among `pool` held-out pairs at a time
    (chance = 1 / pool). A retrieved item counts as right when its caption is the same
    string as the true one (template captions repeat: "two blue triangles")."""
    model.eval()
    hits_i2t = hits_t2i = total = 0
    for start in range(0, len(pixels) - pool + 1, pool):
        image_features = model.encode_image(pixels[start : start + pool], normalize=True)  # [pool, embed]
        text_features = model.encode_text(tokens[start : start + pool], normalize=True)     # [pool, embed]
        similarity = image_features @ text_features.T  # [image, text]
        chunk = list(captions[start : start + pool])
        best_text = similarity.argmax(dim=1).tolist()
        best_image = similarity.argmax(dim=0).tolist()
        hits_i2t += sum(chunk[j] == chunk[i] for i, j in enumerate(best_text))
        hits_t2i += sum(chunk[j] == chunk[i] for i, j in enumerate(best_image))
        total += pool
    if total == 0:
        raise ValueError(f"retrieval_top1: need at least clip.retrieval_pool={pool} held-out pairs, got {len(pixels)}")
    return {"i2t_top1": hits_i2t / total, "t2i_top1": hits_t2i / total, "chance": 1 / pool, "n_eval_pairs": total}


@torch.no_grad()
def swap_accuracy(model: open_clip.CLIP, pixels: torch.Tensor, captions: Sequence[str], words: Sequence[str],
                  tokenizer, seed: int = 0) -> float:
    """How often the image is closer to its caption than to the caption with its first word from
    `words` replaced by another one ("a red star" vs "a red heart"); chance 0.5. Tells whether
    CLIPScore can tell that kind of word apart."""
    model.eval()
    rng = random.Random(seed)
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, words)) + r")\b")
    wins = total = 0
    for start in range(0, len(pixels), 100):
        chunk = range(start, min(start + 100, len(pixels)))
        pairs = [(i, match) for i in chunk if (match := pattern.search(captions[i]))]
        if not pairs:
            continue
        swapped = [captions[i][: m.start()] + rng.choice([w for w in words if w != m.group(1)]) + captions[i][m.end() :]
                   for i, m in pairs]
        images = model.encode_image(pixels[[i for i, _ in pairs]], normalize=True)  # [n, embed]
        true_text = model.encode_text(tokenizer([captions[i] for i, _ in pairs]), normalize=True)
        swapped_text = model.encode_text(tokenizer(swapped), normalize=True)
        wins += ((images * true_text).sum(-1) > (images * swapped_text).sum(-1)).sum().item()
        total += len(pairs)
    return wins / max(total, 1)


def noun_texts(captions: Sequence[str], share: float, seed: int) -> list[str]:
    """A random `share` of the captions replaced by their first noun alone ("a red circle above a
    star" -> "circle"), so that the scorer has seen single words, as CLIP's alt-texts include them."""
    chosen = np.random.default_rng(seed).random(len(captions)) < share
    return [generator.first_shape(caption) or caption if swap else caption for caption, swap in zip(captions, chosen)]


def noise_tokens(n: int, tokenizer: SimpleTokenizer, generator: torch.Generator, max_tokens: int = 8) -> torch.Tensor:
    """n token rows [n, context_length] of 1 to max_tokens tokens drawn uniformly from the tokenizer's
    whole BPE vocabulary (its two special tokens aside), between its start and end tokens: texts that
    say nothing about any image, as many of CLIP's web alt-texts are file names, codes and stray words."""
    rows = torch.zeros(n, tokenizer.context_length, dtype=torch.long)
    lengths = torch.randint(1, max_tokens + 1, (n,), generator=generator)
    words = torch.randint(0, len(tokenizer.encoder) - 2, (n, max_tokens), generator=generator)  # the specials are last
    for row, length, drawn in zip(rows, lengths.tolist(), words):
        row[: length + 2] = torch.tensor([tokenizer.sot_token_id, *drawn[:length].tolist(), tokenizer.eot_token_id])
    return rows


def train_clip(
    train_images: np.ndarray,
    train_captions: Sequence[str],
    eval_images: np.ndarray,
    eval_captions: Sequence[str],
    out_dir: str | Path,
    cfg: ClipConfig | None = None,
    *,
    seed: int = 0,
    swap_words: Mapping[str, Sequence[str]] | None = None,
    progress: bool = True,
) -> dict:
    """Train a CLIP on (uint8 [n, H, W, 3] image, caption) pairs with open_clip's ClipLoss; save it
    in open_clip's local-dir layout; return held-out retrieval top-1 (before and after training)
    and, for each word family in `swap_words` (e.g. {"shape": SHAPES}), `swap_accuracy`."""
    cfg = cfg or ClipConfig()
    for name, images, captions in (("train", train_images, train_captions), ("eval", eval_images, eval_captions)):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"train_clip: {name} images must be uint8 [n, H, W, 3], got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(captions):
            raise ValueError(f"train_clip: {len(images)} {name} images but {len(captions)} captions")
    if len(train_images) < cfg.batch_size:
        raise ValueError(f"train_clip: {len(train_images)} training pairs, fewer than clip.batch_size={cfg.batch_size}")
    started = time.perf_counter()
    torch.manual_seed(seed)
    config = open_clip_config(cfg)
    tokenizer = SimpleTokenizer(context_length=cfg.context_length)
    train_pixels = preprocess_images(train_images, cfg)  # [n, 3, size, size]
    eval_pixels = preprocess_images(eval_images, cfg)
    if cfg.noun_texts:
        train_captions = noun_texts(train_captions, cfg.noun_texts, seed)
    train_tokens = tokenizer(list(train_captions))     # [n, context_length]
    eval_tokens = tokenizer(list(eval_captions))

    model = open_clip.CLIP(**config["model_cfg"], init_logit_scale=np.log(cfg.logit_scale_init))
    before = retrieval_top1(model, eval_pixels, eval_tokens, eval_captions, cfg.retrieval_pool)
    # no weight decay on gains, biases, embeddings and the temperature, as open_clip's training script
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n and "logit_scale" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n and "logit_scale" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()

    def clamp_temperature() -> None:  # as open_clip's training script: temperature at most 100
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))

    noise = torch.Generator().manual_seed(seed + 1)

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        tokens = train_tokens[batch]  # [batch, context_length]
        noisy = torch.rand(len(batch), generator=noise) < cfg.noise_texts  # drawn afresh each step: never memorised
        if noisy.any():
            tokens = tokens.clone()
            tokens[noisy] = noise_tokens(int(noisy.sum()), tokenizer, noise)
        return loss_fn(*model(train_pixels[batch], tokens))

    fit(model, optimizer, epoch_batches(len(train_pixels), cfg.batch_size, torch.Generator().manual_seed(seed)),
        loss_of, cfg.steps, cfg.warmup_steps, "world CLIP (pairs)", progress, after_step=clamp_temperature)

    # Stored in half precision: the text tower's token table (open_clip's 49,408 BPE tokens x
    # text_width) would be 25 MB in fp32, most of what the repository may ship (mmn/world/shipped).
    # The weights are rounded before the held-out metrics, so that these describe the saved model.
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    after = retrieval_top1(model, eval_pixels, eval_tokens, eval_captions, cfg.retrieval_pool)
    swaps = {name: swap_accuracy(model, eval_pixels, eval_captions, words, tokenizer, seed)
             for name, words in (swap_words or {}).items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()},
              str(out_dir / WEIGHTS_FILE))
    metrics = {
        **after,
        "swap_accuracy": swaps,  # chance 0.5
        "i2t_top1_untrained": before["i2t_top1"],
        "t2i_top1_untrained": before["t2i_top1"],
        "n_train_pairs": len(train_pixels),
        "logit_scale": model.logit_scale.detach().exp().item(),
        "config": asdict(cfg),
        "seconds": time.perf_counter() - started,
    }
    (out_dir / "world_part.json").write_text(json.dumps(metrics, indent=2))
    return metrics
