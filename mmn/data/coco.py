"""COCO 2017 (and the Shapes world's evaluation split, written in the same layout) via pycocotools.

Layout: root/annotations/instances_{split}.json, root/annotations/captions_{split}.json and
root/{split}/<file_name>. Every item gives the image squash-resized to `image_size` (the BEiT
geometry, see mmn.data.transforms), its human captions, and its instance masks by category name,
each decoded with pycocotools' annToMask at the image's own size and then squash-resized with
exactly the image's geometry (nearest neighbour), so masks line up with the patch grid.

An image whose file cannot be read or decoded, or (with masks) one of whose annotations cannot be
turned into a mask, raises UnusableImage naming the file (and the annotation): one bad file of a
split is the analysis recipes' recorded skip (mmn.recipes.run.Run.read_images), not a stopped run.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from mmn.data.images import decode_image
from mmn.data.transforms import squash_resize, squash_resize_mask

REQUIRED_KEYS = {"instances": ("images", "annotations", "categories"), "captions": ("images", "annotations")}


class UnusableImage(ValueError):
    """An image of the split that cannot be used: its file is missing, unreadable or not an image,
    or one of its annotations cannot be turned into a mask. The message names the file (and the
    annotation id); `image_id` and `file_name` say which item it was."""

    def __init__(self, image_id: int, file_name: str, reason: str):
        super().__init__(reason)
        self.image_id, self.file_name = image_id, file_name


def _load_coco(path: Path, kind: str):
    """A pycocotools COCO from a checked annotation file (parsed once, clear errors)."""
    from pycocotools.coco import COCO

    if not path.is_file():
        raise FileNotFoundError(f"{path}: COCO {kind} annotation file not found")
    try:
        dataset = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a JSON file ({error})") from error
    if not isinstance(dataset, dict):
        raise ValueError(f"{path}: expected a JSON object with keys {list(REQUIRED_KEYS[kind])}")
    for key in REQUIRED_KEYS[kind]:
        if key not in dataset:
            raise ValueError(f"{path}: missing key {key!r} (a COCO {kind} file needs "
                             f"{list(REQUIRED_KEYS[kind])})")
    coco = COCO()  # empty, then fill it: COCO(path) would parse the file a second time
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


class CocoImages:
    """Map-style dataset over one COCO split.

    `categories` (names) restricts the images to those holding at least one instance of them
    and the masks to them; unknown names raise ValueError listing the available ones.
    `image_size` = (height, width) or None to keep each image's own size. `masks=False` leaves
    the items without masks: a recipe that never reads them does not decode them, so a malformed
    annotation cannot cost it the image."""

    def __init__(self, root: str | Path, split: str = "val2017",
                 image_size: tuple[int, int] | None = (224, 224), categories: Sequence[str] | None = None,
                 masks: bool = True):
        self.root, self.split, self.with_masks = Path(root), split, masks
        self.image_size = tuple(image_size) if image_size is not None else None
        self.image_dir = self.root / split
        instances_path = self.root / "annotations" / f"instances_{split}.json"
        captions_path = self.root / "annotations" / f"captions_{split}.json"
        for path, what in ((instances_path, "instances annotation file"), (captions_path, "captions annotation file"),
                           (self.image_dir, "image folder")):
            if not path.exists():  # all paths checked before parsing (COCO's JSON takes seconds)
                raise FileNotFoundError(f"{path}: COCO {what} not found")
        self.instances = _load_coco(instances_path, "instances")
        self.captions = _load_coco(captions_path, "captions")

        self.category_ids = {c["name"]: c["id"] for c in self.instances.loadCats(self.instances.getCatIds())}
        self.category_names = {i: name for name, i in self.category_ids.items()}
        self.categories = self._check_categories(categories) if categories is not None else None
        if self.categories is None:
            self.image_ids = sorted(self.instances.getImgIds())
        else:
            ids = set()
            for name in self.categories:
                ids.update(self.instances.getImgIds(catIds=[self.category_ids[name]]))
            self.image_ids = sorted(ids)
        self._index = {image_id: i for i, image_id in enumerate(self.image_ids)}

    def _check_categories(self, names: Iterable[str]) -> list[str]:
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.category_ids]
        if unknown:
            raise ValueError(f"unknown COCO category name(s) {unknown} in {self.root}; "
                             f"available: {sorted(self.category_ids)}")
        return names

    def __len__(self) -> int:
        return len(self.image_ids)

    def index_of(self, image_id: int) -> int:
        return self._index[image_id]

    def single_object_ids(self, categories: Sequence[str] | None = None) -> list[int]:
        """Image ids (sorted) whose image holds exactly one annotated object (crowd regions
        count as objects), of one of `categories` (default: this dataset's categories, or all)."""
        names = self._check_categories(categories) if categories is not None else self.categories
        wanted = {self.category_ids[n] for n in names} if names is not None else None
        selected = []
        for image_id in self.image_ids:
            annotations = self.instances.imgToAnns.get(image_id, [])
            if len(annotations) == 1 and (wanted is None or annotations[0]["category_id"] in wanted):
                selected.append(image_id)
        return selected

    def __getitem__(self, i: int) -> dict:
        """The i-th image as a dict (image_id, file_name, image, captions, masks unless masks=False,
        original_size); UnusableImage when its file or one of its masks cannot be made."""
        image_id = self.image_ids[i]
        info = self.instances.imgs[image_id]
        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise UnusableImage(image_id, info["file_name"],
                                f"{path}: image {image_id} listed in the annotations is missing")
        try:
            image = decode_image(path)
        except Exception as error:  # truncated, not an image, ...: whatever PIL raises, name the file
            raise UnusableImage(image_id, info["file_name"],
                                f"{path}: unreadable image ({type(error).__name__}: {error})") from error
        original_size = (info["height"], info["width"])
        if self.image_size is not None:
            image = squash_resize(image, self.image_size)
        item = {"image_id": image_id, "file_name": info["file_name"], "image": image,
                "captions": [a["caption"].strip() for a in self.captions.imgToAnns.get(image_id, [])],
                "original_size": original_size}
        if not self.with_masks:
            return item

        masks: dict[str, list[np.ndarray]] = {}
        for annotation in self.instances.imgToAnns.get(image_id, []):
            name = self.category_names[annotation["category_id"]]
            if self.categories is not None and name not in self.categories:
                continue
            mask = self._mask(annotation, info, path, name)  # [height, width] at the image's size
            if self.image_size is not None:
                mask = squash_resize_mask(mask, self.image_size)  # same geometry as the image
            masks.setdefault(name, []).append(mask)
        return item | {"masks": masks}

    def _mask(self, annotation: dict, info: dict, path: Path, name: str) -> np.ndarray:
        """pycocotools' annToMask as bool, or UnusableImage naming the annotation and the file. A
        polygon of fewer than 3 points is named here: pycocotools takes one of 2 points for a box
        ("Argument 'bb' has incorrect type") and rejects one of 1 ("input type is not supported")."""
        def unusable(why: str) -> UnusableImage:
            return UnusableImage(info["id"], info["file_name"],
                                 f"{path}: annotation {annotation.get('id')} ({name}) cannot be made a mask: {why}")

        segmentation = annotation.get("segmentation")
        if isinstance(segmentation, list):  # polygons [x1, y1, x2, y2, ...]; crowd regions are RLE dicts
            if not segmentation:
                raise unusable("its segmentation holds no polygon")
            for polygon in segmentation:
                if not isinstance(polygon, list):
                    raise unusable("its segmentation is not a list of polygons [[x1, y1, x2, y2, ...], ...]")
                if len(polygon) % 2:
                    raise unusable(f"a polygon of {len(polygon)} coordinates, an odd number; a polygon is "
                                   f"[x1, y1, x2, y2, ...]")
                if len(polygon) < 6:
                    raise unusable(f"a polygon of fewer than 3 points ({len(polygon)} coordinates); a polygon "
                                   f"needs at least 3 (x, y) points")
        try:
            return self.instances.annToMask(annotation).astype(bool)
        except Exception as error:  # any other malformed segmentation
            raise unusable(f"{type(error).__name__}: {error}") from error
