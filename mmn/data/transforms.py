"""Squash-resize: the one pixel geometry shared by images, masks and heatmaps.

BEiT's image processor (as LiMBeR uses it) resizes to 224 x 224 without a centre crop, so the
image is squashed; COCO instance masks must go through exactly the same map to stay aligned
with the patch grid. Both functions below scale x by W_out / W_in and y by H_out / H_in over
the whole image: a pixel centre (x + 0.5) lands at (x + 0.5) * W_out / W_in in the output.
Sizes are (height, width), like tensors, not PIL's (width, height).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


def _check_size(size: Sequence[int] | int) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    if len(size) != 2 or any(int(s) < 1 for s in size):
        raise ValueError(f"size must be (height, width) of positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def squash_resize(image: Image.Image, size: Sequence[int] | int) -> Image.Image:
    """Resize to size = (height, width) with bicubic interpolation, no crop (aspect ratio not kept)."""
    height, width = _check_size(size)
    if image.size == (width, height):
        return image
    return image.resize((width, height), resample=Image.Resampling.BICUBIC)


def squash_resize_mask(mask: np.ndarray, size: Sequence[int] | int) -> np.ndarray:
    """Resize a bool (or 0/1) mask [H, W] to size = (height, width) with nearest neighbour,
    the same geometry as `squash_resize`. Returns bool [height, width]."""
    height, width = _check_size(size)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W], got shape {mask.shape}")
    if mask.shape == (height, width):
        return mask.astype(bool)
    # PIL's nearest-neighbour resize uses the same centre-aligned map as its bicubic resize
    # (output pixel centre i + 0.5 <- input coordinate (i + 0.5) * H_in / H_out).
    as_image = Image.fromarray(mask.astype(np.uint8) * 255)  # uint8 [H, W] -> "L"
    return np.asarray(as_image.resize((width, height), resample=Image.Resampling.NEAREST)) > 127
