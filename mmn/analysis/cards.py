"""Neuron cards: what a researcher looks at first for one image. The image with its caption and
target c, and for each of its top units a row of two heatmaps over the patch grid, the unit's
activation A (where it fires) and its attribution score (where it drives y^c), upsampled as the
receptive fields are (receptive_fields.upsample_map: squash geometry, bilinear, centre-aligned),
beside the unit's name (L7.u12134), its top decoded tokens and whether it is interpretable.

Drawn with PIL, not matplotlib: a card costs milliseconds, so every analysis run can draw them
(analyze.py draws `cards.images` of them) without a noticeable share of its time. The result is
a uint8 RGB image (W&B shows float images black).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from mmn.analysis.receptive_fields import upsample_map

TILE = 128      # pixels per image tile
TEXT = 300      # pixels of the text column
HEADER = 36     # pixels of the caption line
COLORMAP = matplotlib.colormaps["inferno"]


@dataclass
class CardUnit:
    name: str                 # "L7.u12134"
    tokens: Sequence[str]     # its decoding, best first
    interpretable: bool
    activation_map: Tensor    # [grid_h, grid_w]: A at each image patch
    score_map: Tensor         # [grid_h, grid_w]: its attribution score at each image patch


def heat_tile(image: Image.Image, values: Tensor) -> Image.Image:
    """The image (squash-resized to TILE x TILE) under a map over its patch grid ([grid_h, grid_w]:
    activations or scores), min-max scaled, as a half-opaque inferno heatmap. A flat map (a unit
    that does not respond) shows the image dimmed."""
    upsampled = upsample_map(values, (TILE, TILE)).numpy()  # [TILE, TILE]
    span = upsampled.max() - upsampled.min()
    scaled = (upsampled - upsampled.min()) / span if span > 0 else np.zeros_like(upsampled)
    heat = (COLORMAP(scaled)[..., :3] * 255).astype(np.float32)  # [TILE, TILE, 3]
    base = np.asarray(image.convert("RGB").resize((TILE, TILE), Image.BILINEAR), dtype=np.float32)
    return Image.fromarray((0.5 * base + 0.5 * heat).astype(np.uint8))


def neuron_card(image: Image.Image, caption: str, target: str, units: Sequence[CardUnit]) -> Image.Image:
    """One card: a header with the caption and c, then one row per unit (activation heatmap,
    attribution heatmap, name, tokens, interpretable or not). -> uint8 RGB PIL image

    image: the image as the encoder sees it (ImageEncoder.resize: squashed, or centre-cropped by
    open_clip, timm and LLaVA's tower), so that each patch's value lies on the pixels it was read from."""
    font = ImageFont.load_default()
    width = 2 * TILE + TEXT
    card = Image.new("RGB", (width, HEADER + TILE * max(1, len(units))), "white")
    draw = ImageDraw.Draw(card)
    draw.text((6, 4), f"caption: {caption}"[:90], fill="black", font=font)
    draw.text((6, 18), f"target c: {target!r}   left: activation A   middle: attribution score", fill="black",
              font=font)
    for row, unit in enumerate(units):
        top = HEADER + row * TILE
        card.paste(heat_tile(image, unit.activation_map), (0, top))
        card.paste(heat_tile(image, unit.score_map), (TILE, top))
        x = 2 * TILE + 8
        draw.text((x, top + 6), unit.name, fill="black", font=font)
        draw.text((x, top + 22), "interpretable" if unit.interpretable else "not interpretable",
                  fill=(0, 110, 0) if unit.interpretable else (150, 0, 0), font=font)
        tokens = [token.strip() or repr(token) for token in unit.tokens]
        for line in range(0, min(len(tokens), 10), 5):
            draw.text((x, top + 40 + 14 * (line // 5)), ", ".join(tokens[line : line + 5])[:48], fill="black",
                      font=font)
    return card
