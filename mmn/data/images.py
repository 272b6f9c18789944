"""Decoding an image file: the one way every loader does it (training pairs, COCO images), so that
what counts as unreadable is the same in training and in the analysis recipes."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image


def decode_image(source: str | Path | bytes | bytearray | memoryview) -> Image.Image:
    """The image at a path, or in raw file bytes, as RGB, decoded in full now: a truncated file or
    one that is not an image raises here (OSError, PIL.UnidentifiedImageError, ...), where the
    caller knows which file it was and can skip it, not later inside a resize or a worker."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    with Image.open(source) as image:
        image.load()
        return image.convert("RGB")
