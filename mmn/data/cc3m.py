"""Image-caption pairs (CC3M and the Shapes world's training split) through the `datasets` library.

`load_pairs(source)` streams pairs from any of the forms CC3M is distributed in:

- "webdataset": img2dataset's tar shards (`00000.tar` holding `key.jpg`, `key.txt`,
  `key.json`); `source` is a folder of `*.tar`, one `.tar`, or a glob. Read with datasets'
  "webdataset" builder; only the key, image and caption fields are kept, because the
  metadata JSON of real shards changes type from sample to sample (null vs string).
- "folder": the MAGMA / LiMBeR layout: `root/image_data/**/*.json`, each
  `{"image_path": "images/0/x.jpg", "captions": [...], "metadata": {...}}` with `image_path`
  relative to root (as MAGMA's `convert_dataset` writes it); when `image_path` is missing,
  `images/<same sub-folder>/<json stem>.jpg` as in LiMBeR's loader. One pair per caption; keys
  are the JSON stem (with "/<caption index>" when a file holds several captions).
- "parquet": `*.parquet` files (a folder, a file or a glob) with an image column (raw bytes,
  or {"bytes", "path"} as datasets writes images) and a caption column. Column names default
  to the first present of IMAGE_COLUMNS / CAPTION_COLUMNS (img2dataset: "jpg" / "caption").
- "hub": a Hugging Face dataset id, streamed (needs the network).

Everything streams (no Arrow cache is written, so 3M pairs cost no extra disk). Images are
decoded here with PIL, not by `datasets`, so one unreadable image is skipped and counted
(`pairs.skipped`, `pairs.skipped_reasons[key]`) instead of stopping a run. A whole pass that
yields no image at all raises ValueError ("dataset with no usable image").
"""

from __future__ import annotations

import glob as globlib
import json
import logging
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mmn.data.images import decode_image

logger = logging.getLogger(__name__)

FORMATS = ("webdataset", "folder", "parquet", "hub")
IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "img")
CAPTION_COLUMNS = ("caption", "txt", "text")
IMAGE_SUFFIXES = {"." + c for c in IMAGE_COLUMNS if c not in ("image", "img")}
MAX_LOGGED_SKIPS = 10  # per pass; the rest are only counted


def _matching_files(source: str, suffix: str) -> list[str]:
    """Files for a folder (its *suffix files), a single file, or a glob; sorted."""
    if any(ch in source for ch in "*?["):
        return sorted(globlib.glob(source, recursive=True))
    path = Path(source)
    if path.is_dir():
        return sorted(str(p) for p in path.glob(f"*{suffix}"))
    return [str(path)]


def _infer_format(source: str) -> str:
    if any(ch in source for ch in "*?["):
        matches = sorted(globlib.glob(source, recursive=True))
        if not matches:
            raise FileNotFoundError(f"no file matches {source!r}")
        suffixes = {Path(m).suffix for m in matches}
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"{source}: no such file or folder (for a Hugging Face hub "
                                    f"dataset id pass format='hub')")
        if path.is_dir():
            if (path / "image_data").is_dir():
                return "folder"
            suffixes = {p.suffix for p in path.iterdir()}
        else:
            suffixes = {path.suffix}
    if ".tar" in suffixes:
        return "webdataset"
    if ".parquet" in suffixes:
        return "parquet"
    raise ValueError(f"{source}: cannot tell its format (no .tar, no .parquet, no image_data/ folder); "
                     f"pass format= one of {FORMATS}")


def _folder_pairs(json_paths: list[str], root: str) -> Iterator[dict]:
    """Generator for the MAGMA / LiMBeR layout; sharded by datasets over json_paths."""
    root_path = Path(root)
    for json_path in json_paths:
        json_file = Path(json_path)
        try:
            record = json.loads(json_file.read_text())
            captions = record["captions"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            yield {"key": json_file.stem, "image_path": "", "caption": "",
                   "error": f"{json_path}: unreadable record ({type(error).__name__}: {error})"}
            continue
        if isinstance(captions, str):
            captions = [captions]
        if "image_path" in record:
            image_path = root_path / record["image_path"]
        else:  # LiMBeR's fallback: the image sits where the json sits, under images/
            sub_folder = json_file.parent.relative_to(root_path / "image_data")
            image_path = root_path / "images" / sub_folder / (json_file.stem + ".jpg")
        for j, caption in enumerate(captions):
            key = json_file.stem if len(captions) == 1 else f"{json_file.stem}/{j}"
            yield {"key": key, "image_path": str(image_path), "caption": str(caption), "error": ""}


class ImageTextPairs(torch.utils.data.IterableDataset):
    """Iterates dict(key=str, image=PIL.Image RGB, caption=str); skips unreadable images.

    Wraps a streaming `datasets.IterableDataset` (attribute `.dataset`) whose rows hold a key,
    an image (bytes, {"bytes", "path"} or a path) and a caption. Works with a torch DataLoader
    (datasets splits the shards between workers) and with `split_by_node` for DDP. The skip
    counters are reset at the start of each pass and live in the process that iterates."""

    def __init__(self, dataset, *, source: str, format: str, key_column: str, image_column: str,
                 caption_column: str, length: int | None = None, length_fn=None, root: str | None = None):
        super().__init__()
        self.dataset = dataset
        self.source, self.format = source, format
        self.key_column, self.image_column, self.caption_column = key_column, image_column, caption_column
        self._length, self._length_fn, self.root = length, length_fn, root
        self.skipped = 0
        self.skipped_reasons: dict[str, str] = {}

    def _derive(self, dataset) -> ImageTextPairs:
        return ImageTextPairs(dataset, source=self.source, format=self.format, key_column=self.key_column,
                              image_column=self.image_column, caption_column=self.caption_column,
                              length=None, length_fn=None, root=self.root)

    def shuffle(self, seed: int, buffer_size: int = 1000) -> ImageTextPairs:
        """Shard order and a buffer of pairs shuffled, as datasets does for streams."""
        derived = self._derive(self.dataset.shuffle(seed=seed, buffer_size=buffer_size))
        derived._length, derived._length_fn = self._length, self._length_fn
        return derived

    def split_by_node(self, rank: int, world_size: int) -> ImageTextPairs:
        """This rank's part of the pairs (whole shards when they divide evenly, else every
        world_size-th pair), via datasets.distributed.split_dataset_by_node."""
        from datasets.distributed import split_dataset_by_node

        return self._derive(split_dataset_by_node(self.dataset, rank=rank, world_size=world_size))

    def __len__(self) -> int:
        """Pairs in the source, unreadable images included (they are only found while iterating)."""
        if self._length is None and self._length_fn is not None:
            self._length = self._length_fn()
        if self._length is None:
            raise TypeError(f"{self.source}: the number of pairs is not known for this stream")
        return self._length

    def _decode(self, value: Any) -> Image.Image:
        if isinstance(value, dict):  # datasets' Image(decode=False): {"bytes", "path"}
            payload, path = value.get("bytes"), value.get("path")
            if payload is None:
                if not path:
                    raise ValueError("no image bytes and no path")
                if self.root and not Path(path).is_absolute():
                    path = str(Path(self.root) / path)
                value = path
            else:
                value = payload
        if value is None:
            raise ValueError("no image")
        return decode_image(value)

    def _skip(self, key: str, reason: str) -> None:
        self.skipped += 1
        self.skipped_reasons[key] = reason
        if self.skipped <= MAX_LOGGED_SKIPS:
            logger.warning("%s: skipping %s (%s)", self.source, key, reason)

    def __iter__(self) -> Iterator[dict]:
        self.skipped, self.skipped_reasons = 0, {}
        yielded = 0
        for row in self.dataset:
            key = str(row.get(self.key_column))
            if row.get("error"):
                self._skip(key, row["error"])
                continue
            caption = row.get(self.caption_column)
            if caption is None or not str(caption).strip():
                self._skip(key, "no caption")
                continue
            try:
                image = self._decode(row.get(self.image_column))
            except Exception as error:  # a corrupt image must never stop a run
                self._skip(key, f"unreadable image ({type(error).__name__}: {error})")
                continue
            yielded += 1
            yield {"key": key, "image": image, "caption": str(caption).strip()}
        in_worker_without_rows = torch.utils.data.get_worker_info() is not None and self.skipped == 0
        if yielded == 0 and not in_worker_without_rows:
            reasons = list(self.skipped_reasons.items())[:3]
            raise ValueError(f"{self.source}: dataset with no usable image ({self.skipped} pairs skipped; "
                             f"first reasons: {reasons})")
        if self.skipped:
            logger.warning("%s: %d unreadable pairs skipped in this pass", self.source, self.skipped)


def _pick_column(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str,
                 source: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"{source}: no {what} column {wanted!r}; columns: {columns}")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(f"{source}: no {what} column (looked for {list(candidates)}); columns: {columns}; "
                     f"pass {what}_column=")


def _streamed(builder: str, files: list[str], split: str, source: str,
              image_column: str | None, caption_column: str | None, key_column: str | None):
    """A streaming dataset from a packaged builder, reduced to key / image / caption columns."""
    import datasets

    dataset = datasets.load_dataset(builder, data_files={split: files}, split=split, streaming=True)
    return _reduce_columns(dataset, source, image_column, caption_column, key_column)


def _reduce_columns(dataset, source: str, image_column: str | None, caption_column: str | None,
                    key_column: str | None):
    import datasets

    features = dataset.features
    columns = list(features) if features is not None else list(dataset.column_names or [])
    if image_column is None and features is not None:  # an Image-typed column first
        typed = [c for c, f in features.items() if isinstance(f, datasets.Image)]
        image_column = typed[0] if typed else None
    image_column = _pick_column(columns, image_column, IMAGE_COLUMNS, "image", source)
    caption_column = _pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", source)
    if key_column is None:
        key_column = next((c for c in ("__key__", "key", "id", "image_id") if c in columns), None)
    keep = [c for c in (key_column, image_column, caption_column) if c is not None]
    dataset = dataset.select_columns(keep)
    if features is not None and isinstance(features.get(image_column), datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    if key_column is None:  # number the rows
        dataset = dataset.map(lambda row, index: {"key": str(index)}, with_indices=True)
        key_column = "key"
    return dataset, key_column, image_column, caption_column


def _count_tar_samples(tar_paths: list[str]) -> int:
    keys = set()
    for tar_path in tar_paths:
        with tarfile.open(tar_path) as tar:
            for member in tar:
                path = Path(member.name)
                if member.isfile() and path.suffix.lower() in IMAGE_SUFFIXES:
                    keys.add((tar_path, str(path.with_suffix(""))))
    return len(keys)


def load_pairs(source: str | Path, *, format: str | None = None, split: str = "train",
               image_column: str | None = None, caption_column: str | None = None,
               key_column: str | None = None) -> ImageTextPairs:
    """Stream image-caption pairs from `source` (see the module docstring for the formats).

    `format=None` infers it from the path: a folder with image_data/ -> "folder", .tar files ->
    "webdataset", .parquet files -> "parquet"; a hub id needs format="hub". `split` names the
    split of a hub dataset (for local files it is only the split's name). Columns are chosen
    automatically unless named. Errors before any long work: missing path -> FileNotFoundError;
    unknown format, no shards, no image or caption column -> ValueError."""
    source = str(source)
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown format {format!r} for {source}; known: {list(FORMATS)}")
    if format is None:
        format = _infer_format(source)
    elif format != "hub" and not any(ch in source for ch in "*?[") and not Path(source).exists():
        raise FileNotFoundError(f"{source}: no such file or folder")

    if format in ("webdataset", "parquet"):
        suffix = ".tar" if format == "webdataset" else ".parquet"
        files = [f for f in _matching_files(source, suffix) if f.endswith(suffix)]
        if not files:
            if any(ch in source for ch in "*?["):
                raise FileNotFoundError(f"no {suffix} file matches {source!r}")
            raise ValueError(f"{source}: no {suffix} files for format {format!r}")
        dataset, key_column, image_column, caption_column = _streamed(
            format, [str(Path(f).resolve()) for f in files], split, source, image_column, caption_column,
            key_column)
        if format == "webdataset":
            length_fn = lambda: _count_tar_samples(files)  # noqa: E731  (reads tar headers only)
        else:
            import pyarrow.parquet as pq

            length_fn = lambda: sum(pq.ParquetFile(f).metadata.num_rows for f in files)  # noqa: E731
        root = source if Path(source).is_dir() else str(Path(files[0]).parent)
        return ImageTextPairs(dataset, source=source, format=format, key_column=key_column,
                              image_column=image_column, caption_column=caption_column,
                              length_fn=length_fn, root=root)

    if format == "folder":
        import datasets

        root = Path(source)
        data_dir = root / "image_data"
        if not data_dir.is_dir():
            raise FileNotFoundError(f"{data_dir}: no image_data/ folder (MAGMA/LiMBeR layout: "
                                    f"root/images/ + root/image_data/*.json)")
        json_paths = sorted(str(p) for p in data_dir.rglob("*.json"))
        if not json_paths:
            raise ValueError(f"{data_dir}: no .json records")
        features = datasets.Features({name: datasets.Value("string")
                                      for name in ("key", "image_path", "caption", "error")})
        dataset = datasets.IterableDataset.from_generator(
            _folder_pairs, features=features, gen_kwargs={"json_paths": json_paths, "root": str(root)})

        def count_pairs() -> int:
            total = 0
            for path in json_paths:
                try:
                    captions = json.loads(Path(path).read_text()).get("captions", [])
                except (OSError, ValueError, AttributeError):
                    captions = [None]  # still one (unreadable) row
                total += 1 if isinstance(captions, str) else max(1, len(captions))
            return total

        return ImageTextPairs(dataset, source=source, format=format, key_column="key",
                              image_column="image_path", caption_column="caption", length_fn=count_pairs,
                              root=str(root))

    # format == "hub"
    import datasets

    dataset = datasets.load_dataset(source, split=split, streaming=True)
    dataset, key_column, image_column, caption_column = _reduce_columns(
        dataset, source, image_column, caption_column, key_column)
    splits = getattr(dataset.info, "splits", None) or {}
    length = splits[split].num_examples if split in splits and splits[split].num_examples else None
    return ImageTextPairs(dataset, source=source, format=format, key_column=key_column,
                          image_column=image_column, caption_column=caption_column, length=length)
