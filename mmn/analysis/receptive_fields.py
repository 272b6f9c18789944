"""Receptive fields of units on the image (paper section 3.2, Figure 5).

A unit's activation A (the input of its layer's MLP output projection, as everywhere in mmn) at
the image-prompt positions of one captioning pass is a map over the encoder's patch grid
(BEiT-L/16: 196 positions -> 14 x 14). Upsampled to the image and thresholded at its own
quantile (0.95 in the paper), it is a binary region, the unit's receptive field on that image,
compared by IoU with the COCO instance mask of the image's single annotated object. The
baseline is random units from the same layers (`mmn.analysis.ablation.random_units_like`, as the ablation's random arm).

Geometry: the encoder must squash the whole image to its input size (resize_mode="squash", as
BEiT does in LiMBeR and the paper), and the image and masks handed in must be squash-resized
likewise (mmn.data.coco does), so patch (r, c) of a grid (gh, gw) covers the pixel rectangle
rows [r H / gh, (r + 1) H / gh) x columns [c W / gw, (c + 1) W / gw) of an H x W image.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F

from mmn.analysis.figures import (  # pyplot on the Agg backend, as every mmn figure
    plt,
    save,
)

QUANTILE = 0.95


def _as_units(units, where: str) -> Tensor:
    """(layer, unit) pairs (a [n, 2] tensor or a sequence of pairs) -> long [n, 2]."""
    units = torch.as_tensor(units, dtype=torch.long)
    if units.numel() and (units.ndim != 2 or units.shape[1] != 2):
        raise ValueError(f"{where}: units must be [n, 2] rows of (layer, unit), got shape {tuple(units.shape)}")
    return units.reshape(-1, 2)


@torch.no_grad()
def unit_activation_maps(captioner, pixels: Tensor, units: Tensor | Sequence[tuple[int, int]]) -> Tensor:
    """A of each (layer, unit) in `units` ([n_units, 2]) at the image prompts of one forward pass
    over the captioning prompt (Captioner.input_embeddings), on the patch grid:
    pixels [batch, 3, H, W] -> [batch, n_units, grid_h, grid_w] float32 on the CPU.

    Image prompt i is patch i in the encoder's row-major order (encoders.py: row i // cols,
    column i % cols) at position image_positions.start + i, so a plain reshape puts every value on
    its patch. The text prompt's positions are not read: they have no patch of their own."""
    lm, encoder = captioner.lm, captioner.encoder
    units = _as_units(units, "unit_activation_maps")
    if encoder.grid is None:
        raise ValueError(f"unit_activation_maps: the encoder ({type(encoder).__name__}) yields a pooled vector, "
                         "not a patch grid, so its units have no receptive field")
    grid_h, grid_w = encoder.grid
    n_image = captioner.n_image_tokens
    if n_image != grid_h * grid_w:
        raise ValueError(f"unit_activation_maps: the projection (kind={captioner.projection.kind!r}) writes "
                         f"{n_image} image prompts, not one per patch of the {grid_h} x {grid_w} grid")
    bad = units[(units[:, 0] < 0) | (units[:, 0] >= lm.n_layers) | (units[:, 1] < 0) | (units[:, 1] >= lm.d_mlp)]
    if len(bad):
        raise ValueError(f"unit_activation_maps: the LM has layers 0..{lm.n_layers - 1} and units "
                         f"0..{lm.d_mlp - 1}, got (layer, unit) {bad.tolist()[:5]}")

    image = captioner.image_positions  # the image prompts' positions in the captioning prompt
    maps = torch.empty(len(pixels), len(units), n_image)  # [batch, n_units, n_image]
    rows_of_layer = {layer: (units[:, 0] == layer).nonzero().flatten() for layer in units[:, 0].unique().tolist()}

    def record(module, args, layer):
        rows = rows_of_layer[layer]
        activation = args[0][:, image, units[rows, 1].to(args[0].device)]  # [batch, n_image, n_rows]
        maps[:, rows] = activation.transpose(1, 2).float().cpu()

    with lm.hooks(pre=[(lm.mlp_out(layer), partial(record, layer=layer)) for layer in rows_of_layer]):
        lm.final_hidden(captioner.input_embeddings(pixels))
    return maps.reshape(len(pixels), len(units), grid_h, grid_w)


def upsample_map(activation_map: Tensor, image_size: tuple[int, int]) -> Tensor:
    """[grid_h, grid_w] -> [H, W] float32, bilinear with align_corners=False.

    align_corners=False puts each value at its patch's centre and reads each pixel at its own
    centre (pixel y samples the grid at (y + 0.5) gh / H - 0.5), the same centre-aligned map as
    the squash resize of images and masks (mmn.data.transforms), so the hot patch (r, c) of a
    14 x 14 map peaks on pixels [16 r, 16 r + 16) of a 224 image. align_corners=True would
    pin the outer patch centres to the image corners and shift the map by up to half a patch.
    Beyond the outer patch centres the edge values are held (no fall-off at the border)."""
    activation_map = torch.as_tensor(activation_map).float()
    if activation_map.ndim != 2:
        raise ValueError(f"upsample_map: activation_map must be [grid_h, grid_w], got shape "
                         f"{tuple(activation_map.shape)}")
    size = (int(image_size[0]), int(image_size[1]))
    return F.interpolate(activation_map[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


def receptive_field(activation_map: Tensor, image_size: tuple[int, int], quantile: float = QUANTILE) -> Tensor:
    """The unit's region on the image: bool [H, W], the pixels of the upsampled map (upsample_map)
    strictly above the map's own `quantile` (over its H x W pixels, torch.quantile's linear
    interpolation).

    Strictly above (>), not >=: the region never holds more than about 1 - quantile of the
    pixels, and a flat map (a unit that does not respond to the image, e.g. a dead ReLU unit
    reading 0 everywhere) has an empty field and IoU 0, not the whole image; with >= a map that
    is flat on more than `quantile` of the pixels would claim them all."""
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"receptive_field: quantile must be in [0, 1), got {quantile}")
    upsampled = upsample_map(activation_map, image_size)  # [H, W]
    return upsampled > torch.quantile(upsampled, quantile)


def mask_iou(a, b) -> float:
    """Intersection over union of two bool masks of one shape (numpy or torch). 0.0 when both
    are empty: nothing to overlap, and that is what pycocotools' mask IoU gives as well."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != bool or b.dtype != bool:
        raise ValueError(f"mask_iou: masks must be bool, got {a.dtype} and {b.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"mask_iou: masks must have one shape, got {a.shape} and {b.shape}")
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def object_ious(captioner, items: Sequence[dict], units_per_image: Sequence, quantile: float = QUANTILE,
                ) -> tuple[list[dict], list[dict]]:
    """IoU of each unit's receptive field with the object mask of images that hold one object.

    items: CocoImages items ("image_id", "image" and "masks" {category: [bool [H, W]]}, masks at
    the image's size); units_per_image: one [n, 2] (layer, unit) set per item (an image's top
    units, or ablation.random_units_like of them). One forward pass runs over the kept images.
    Returns (rows, skipped): rows {image_id, category, layer, unit, iou}, one per (kept image,
    unit), for pandas.DataFrame(rows); skipped {image_id, reason}, one per image left out
    because its masks hold no object or more than one, or because its one object's mask is
    empty at the image's size (a sliver lost in the resize). Objects are counted in
    item["masks"], which a category-filtered CocoImages restricts to its categories: choose the
    images with CocoImages.single_object_ids to count objects of every category."""
    if len(units_per_image) != len(items):
        raise ValueError(f"object_ious: {len(units_per_image)} unit sets for {len(items)} images: give one per image")
    if captioner.encoder.resize_mode != "squash":
        raise ValueError(f"object_ious: the encoder uses resize_mode={captioner.encoder.resize_mode!r}; receptive "
                         "fields on the whole image need load_encoder(..., resize_mode='squash') (in a config: "
                         "encoder.resize_mode=squash, e.g. for LLaVA's CLIP tower)")
    kept, skipped = [], []  # kept: (item, category, mask, units)
    for item, units in zip(items, units_per_image):
        objects = [(category, mask) for category, masks in item["masks"].items() for mask in masks]
        if len(objects) != 1:
            names = sorted({category for category, _ in objects})
            reason = "no annotated object" if not objects else f"{len(objects)} annotated objects ({', '.join(names)})"
            skipped.append({"image_id": item["image_id"], "reason": reason})
        elif not np.asarray(objects[0][1]).any():
            skipped.append({"image_id": item["image_id"], "reason": f"the {objects[0][0]} mask is empty at image size"})
        else:
            kept.append((item, *objects[0], _as_units(units, f"object_ious (image {item['image_id']})")))
    if not kept:
        return [], skipped

    every_unit = torch.cat([units for *_, units in kept]).unique(dim=0)  # [n_distinct, 2]
    column = {tuple(pair): j for j, pair in enumerate(every_unit.tolist())}
    maps = unit_activation_maps(captioner, captioner.preprocess([item["image"] for item, *_ in kept]), every_unit)
    rows = []
    for i, (item, category, mask, units) in enumerate(kept):
        mask = np.asarray(mask, dtype=bool)
        for layer, unit in units.tolist():
            field = receptive_field(maps[i, column[(layer, unit)]], mask.shape, quantile)
            rows.append({"image_id": item["image_id"], "category": category, "layer": layer, "unit": unit,
                         "iou": mask_iou(field, mask)})
    return rows, skipped


def receptive_field_figure(image, activation_map: Tensor, path: str | Path, quantile: float = QUANTILE,
                           title: str = ""):
    """The image with the unit's upsampled activation as a semi-transparent heatmap and the
    outline of its receptive field, saved as a PNG at `path`; returns the path.
    image: PIL image or [H, W, 3] array, in the geometry the masks use (squash-resized)."""
    image = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    size = image.shape[:2]
    upsampled = upsample_map(activation_map, size).numpy()  # [H, W]
    field = receptive_field(activation_map, size, quantile).numpy()
    figure, axis = plt.subplots(figsize=(4, 4))
    axis.imshow(image)
    heat = axis.imshow(upsampled, cmap="inferno", alpha=0.5)
    if field.any():
        axis.contour(field.astype(float), levels=[0.5], colors="cyan", linewidths=1.5)
    figure.colorbar(heat, ax=axis, fraction=0.046, pad=0.04, label="activation A")
    axis.set_axis_off()
    axis.set_title(title or f"receptive field (activation > its {quantile:g} quantile)", fontsize=9)
    return save(figure, Path(path))


def single_object_ids(images, categories, n: int | None) -> list[int]:
    """The first n (null: all) images holding one annotated object of `categories` (null: any);
    an unknown category name or no such image is an error that names it."""
    categories = list(categories) if categories is not None else None
    ids = images.single_object_ids(categories)  # raises on a category the dataset does not have
    ids = ids[:n] if n is not None else ids
    if not ids:
        raise ValueError(f"no image of {images.root} {images.split} holds a single annotated object"
                         f"{' of ' + ', '.join(categories) if categories else ''}")
    return ids
