"""Training data for the projection: caption tokens, the training stream, the frozen-feature
cache and the evaluation images.

A training sample is an image (pixels, or its cached encoder features) and its caption's
token ids. Batches look like

    pixels     [batch, 3, H, W]            (or features [batch, n_tok, d_enc] from the cache)
    input_ids  [batch, n_text]             caption tokens, then end-of-text, then padding
    labels     [batch, n_text]             input_ids, with -100 after the first end-of-text
    n_skipped, n_truncated                 unreadable images skipped, captions truncated

The training stream is endless and deterministic: epoch e visits the pairs in an order fixed
by (seed, e), and each rank takes its own share. A resumed run rebuilds the stream and drops
the batches the killed run had already trained on, so it continues with exactly the batches
an uninterrupted run would have seen. Dropping is cheap from the feature cache; when
streaming shards it re-reads (decodes, but does not preprocess or encode) the images drawn
so far.

The frozen-feature cache encodes every training image once (the encoder never changes) into
`features.npy`, memory-mapped in later epochs and runs: n_pairs x n_tok x d_enc x 2 bytes in
float16. Shapes world: 3,000 x 196 x 64 x 2 B = 75 MB. BEiT-Large on CC3M: 3.3M x 196 x 1024
x 2 B = 1.3 TB, so real-scale runs stream instead. Its building is resumable.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mmn.files import write_text
from mmn.data.cc3m import ImageTextPairs
from mmn.data.coco import CocoImages

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of positions the loss skips (image prompts, padding)


# ----------------------------------------------------------------------------- captions

class CaptionTokenizer:
    """Caption text -> token ids for training: a leading space (the caption continues the image
    prompt, as it continues "A picture of" when captioning), at most `max_tokens` tokens, then
    end-of-text."""

    def __init__(self, tokenizer, max_tokens: int):
        if max_tokens < 1:
            raise ValueError(f"training.max_caption_tokens must be >= 1, got {max_tokens}")
        self.tokenizer, self.max_tokens = tokenizer, max_tokens
        self.eos = tokenizer.eos_token_id

    def __call__(self, caption: str) -> tuple[list[int], bool]:
        """(ids ending in end-of-text, whether the caption was truncated)."""
        ids = self.tokenizer(" " + caption.strip(), add_special_tokens=False)["input_ids"]
        return ids[: self.max_tokens] + [self.eos], len(ids) > self.max_tokens


def collate(items: Sequence[dict], eos: int) -> dict:
    """Stack a batch; pad captions with end-of-text, labelled IGNORE_INDEX after the first one."""
    length = max(len(item["input_ids"]) for item in items)
    input_ids = torch.full((len(items), length), eos, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        ids = torch.tensor(item["input_ids"], dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        labels[row, : len(ids)] = ids  # the caption and its one end-of-text
    batch = {"input_ids": input_ids, "labels": labels}
    for name in ("pixels", "features"):
        if name in items[0]:
            batch[name] = torch.stack([item[name] for item in items])
    for name in ("n_skipped", "n_truncated"):
        batch[name] = sum(item.get(name, 0) for item in items)
    return batch


# ----------------------------------------------------------------------------- training streams

def batches_already_drawn(skip_batches: int, worker: int, n_workers: int) -> int:
    """How many of the first `skip_batches` batches `worker` made: a DataLoader takes batches
    from its workers in turn (0, 1, ..., n-1, 0, ...)."""
    return max(0, (skip_batches - worker + n_workers - 1) // n_workers)


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class PairStream(torch.utils.data.IterableDataset):
    """Endless stream of this rank's (pixels, caption ids) from image-caption pairs (shards).

    Epoch e is the pairs shuffled by datasets with seed + e (shard order and a buffer);
    `skip_batches` batches of `batch_size` are dropped first (a resumed run's)."""

    def __init__(self, pairs: ImageTextPairs, preprocess: Callable[[list[Image.Image]], torch.Tensor],
                 tokenize: CaptionTokenizer, *, seed: int, shuffle_buffer: int, rank: int, world_size: int,
                 batch_size: int, skip_batches: int = 0):
        super().__init__()
        self.pairs = pairs.shuffle(seed=seed, buffer_size=shuffle_buffer).split_by_node(rank, world_size)
        self.preprocess, self.tokenize = preprocess, tokenize
        self.batch_size, self.skip_batches = batch_size, skip_batches

    @property
    def n_shards(self) -> int:
        return self.pairs.dataset.n_shards

    def __iter__(self) -> Iterator[dict]:
        worker, n_workers = _worker()
        to_skip = batches_already_drawn(self.skip_batches, worker, n_workers) * self.batch_size
        epoch = 0
        while True:
            self.pairs.dataset.set_epoch(epoch)
            seen = skipped_before = 0
            for pair in self.pairs:
                seen += 1
                n_skipped, skipped_before = self.pairs.skipped - skipped_before, self.pairs.skipped
                if to_skip:
                    to_skip -= 1
                    continue
                ids, truncated = self.tokenize(pair["caption"])
                yield {"pixels": self.preprocess([pair["image"]])[0], "input_ids": ids,
                       "n_skipped": n_skipped, "n_truncated": int(truncated)}
            if seen == 0:  # a worker that was given no shard
                return
            epoch += 1


class CachedStream(torch.utils.data.IterableDataset):
    """Endless stream of this rank's (features, caption ids) from the feature cache: epoch e is
    a permutation drawn with seed + e, rank r takes every world_size-th pair from r."""

    def __init__(self, cache: FeatureCache, tokenize: CaptionTokenizer, *, seed: int, rank: int,
                 world_size: int, batch_size: int, skip_batches: int = 0):
        super().__init__()
        self.cache, self.tokenize = cache, tokenize
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.skip = skip_batches * batch_size

    def __iter__(self) -> Iterator[dict]:
        features, captions = self.cache.features(), self.cache.captions()
        position, epoch = 0, 0
        while True:
            order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(self.seed + epoch))
            for index in order[self.rank :: self.world_size].tolist():
                position += 1
                if position <= self.skip:
                    continue
                ids, truncated = self.tokenize(captions[index])
                yield {"features": torch.from_numpy(features[index].astype(np.float32)), "input_ids": ids,
                       "n_truncated": int(truncated)}
            epoch += 1


# ----------------------------------------------------------------------------- feature cache

class FeatureCache:
    """Encoder features of every training pair, in pair order, with their captions.

    folder/features.npy   [n_pairs, n_tok, d_enc] memory-mapped (rows past `rows` unused)
    folder/captions.json  the captions of the rows written
    folder/state.json     {"rows", "complete", "skipped", "pairs": n in the source, ...}
    Building writes in chunks and records progress, so an interrupted build continues."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    @property
    def state(self) -> dict:
        path = self.folder / "state.json"
        return json.loads(path.read_text()) if path.is_file() else {"rows": 0, "complete": False}

    @property
    def complete(self) -> bool:
        return self.state["complete"]

    def features(self) -> np.ndarray:
        return np.load(self.folder / "features.npy", mmap_mode="r")[: self.state["rows"]]

    def captions(self) -> list[str]:
        return json.loads((self.folder / "captions.json").read_text())

    def _write_state(self, state: dict, captions: list[str]) -> None:
        write_text(json.dumps(captions), self.folder / "captions.json")
        write_text(json.dumps(state, indent=2), self.folder / "state.json")  # last: it says how far the build got

    @torch.no_grad()
    def build(self, pairs: ImageTextPairs, encoder, *, batch_size: int = 64, dtype: str = "float16",
              chunk_batches: int = 20, progress: bool = True) -> None:
        """Encode every pair of `pairs` (in source order) with `encoder`; continue a partial build."""
        if self.complete:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        state = self.state
        captions = self.captions() if state["rows"] else []
        n_pairs = len(pairs)
        shape = (n_pairs, encoder.n_tokens, encoder.width)  # [n_pairs, n_tok, d_enc]
        path = self.folder / "features.npy"
        if state["rows"] and path.is_file():
            store = np.load(path, mmap_mode="r+")
            if store.shape != shape:
                raise ValueError(f"{path}: holds {store.shape}, the encoder and data now give {shape}; "
                                 f"delete {self.folder} to rebuild")
        else:
            store = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=shape)
        done = state["rows"]
        if done:
            log.info("feature cache: continuing at pair %d of %d (%s)", done, n_pairs, self.folder)
        bar = tqdm(total=n_pairs, initial=done, desc="caching encoder features", disable=not progress)
        images, texts, since_flush, seen = [], [], 0, 0

        def encode() -> None:
            nonlocal done, since_flush
            pixels = encoder.preprocess(images).to(encoder.device, encoder.dtype)
            store[done : done + len(images)] = encoder(pixels).float().cpu().numpy()
            captions.extend(texts)
            done += len(images)
            bar.update(len(images))
            images.clear(), texts.clear()
            since_flush += 1
            if since_flush >= chunk_batches:
                store.flush()
                self._write_state({**state, "rows": done, "complete": False}, captions)
                since_flush = 0

        for pair in pairs:  # source order: the rows stay aligned with a resumed build
            seen += 1
            if seen <= state["rows"]:
                continue
            images.append(pair["image"]), texts.append(pair["caption"])
            if len(images) == batch_size:
                encode()
        if images:
            encode()
        bar.close()
        store.flush()
        self._write_state({"rows": done, "complete": True, "pairs": n_pairs, "skipped": pairs.skipped,
                           "shape": [done, *shape[1:]], "dtype": dtype}, captions)
        log.info("feature cache: %d pairs encoded, %d unreadable skipped -> %s (%.1f MB)", done, pairs.skipped,
                 self.folder, path.stat().st_size / 1e6)


# ----------------------------------------------------------------------------- evaluation images

def first_noun_names_object(noun: str | None, categories: Sequence[str]) -> bool:
    """Does the caption's first noun name one of the image's objects? Plurals count
    ("two circles"), and a noun names a multi-word category by its head ("bear": "teddy bear")."""
    if noun is None:
        return False
    from lemminflect import getLemma

    word = noun.lower()
    forms = {word, *getLemma(word, upos="NOUN")}
    return any(name.lower() in forms or name.lower().split()[-1] in forms for name in categories)


def evaluation_items(root: str, split: str, n_images: int, preprocess, tokenize: CaptionTokenizer) -> list[dict]:
    """The first n_images of a COCO-layout split: pixels, the first reference caption's ids (for
    the validation loss), the object categories present and the image itself (for the table)."""
    images = CocoImages(root, split, image_size=None)
    if len(images) == 0:
        raise ValueError(f"{root}/{split}: the evaluation split has no images")
    items = []
    for index in range(min(n_images, len(images))):
        item = images[index]
        reference = item["captions"][0] if item["captions"] else ""
        ids, _ = tokenize(reference)
        items.append({"pixels": preprocess([item["image"]])[0], "input_ids": ids, "image": item["image"],
                      "reference": reference, "categories": sorted(item["masks"]), "image_id": item["image_id"]})
    return items


def collate_evaluation(items: Sequence[dict], eos: int) -> dict:
    batch = collate(items, eos)
    for name in ("image", "reference", "categories", "image_id"):
        batch[name] = [item[name] for item in items]
    return batch


# ----------------------------------------------------------------------------- the DataModule

class CaptionData(LightningDataModule):
    """Training stream (shards or feature cache) and evaluation images for one captioner.

    `pairs` opens the training pairs (called lazily, so a cached run never opens the shards
    after the cache is built); `cache_folder` is set when features are cached."""

    def __init__(self, *, open_pairs: Callable[[], ImageTextPairs], eval_root: str, eval_split: str, encoder,
                 tokenizer, seed: int, cache_folder: str | None, batch_size: int, max_caption_tokens: int,
                 val_images: int, shuffle_buffer: int, num_workers: int):
        super().__init__()
        self.open_pairs, self.eval_root, self.eval_split = open_pairs, eval_root, eval_split
        self.encoder, self.seed = encoder, seed
        self.batch_size, self.val_images = batch_size, val_images
        self.shuffle_buffer, self.num_workers = shuffle_buffer, num_workers
        self.tokenize = CaptionTokenizer(tokenizer, max_caption_tokens)
        self.cache = FeatureCache(cache_folder) if cache_folder else None
        self.eval_items: list[dict] | None = None

    def prepare_data(self) -> None:
        """Build the feature cache (once per node, on its first process)."""
        if self.cache is not None and not self.cache.complete:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.cache.build(self.open_pairs(), self.encoder.to(device))
            self.encoder.to("cpu")

    def setup(self, stage: str) -> None:
        if self.eval_items is None:
            self.eval_items = evaluation_items(self.eval_root, self.eval_split, self.val_images,
                                               self.encoder.preprocess, self.tokenize)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        # a resumed run: the micro-batches its earlier steps consumed on this rank
        skip = trainer.global_step * trainer.accumulate_grad_batches
        common = dict(seed=self.seed, rank=trainer.global_rank, world_size=trainer.world_size,
                      batch_size=self.batch_size, skip_batches=skip)
        if self.cache is not None:
            stream, workers = CachedStream(self.cache, self.tokenize, **common), 0
        else:
            stream = PairStream(self.open_pairs(), self.encoder.preprocess, self.tokenize,
                                shuffle_buffer=self.shuffle_buffer, **common)
            workers = min(self.num_workers, stream.n_shards)
            if workers < self.num_workers:
                log.warning("training.num_workers=%d but this rank has %d shard(s): using %d workers",
                            self.num_workers, stream.n_shards, workers)
        if skip:
            log.info("resuming: dropping the %d batches this rank trained on before step %d", skip,
                     trainer.global_step)
        return DataLoader(stream, batch_size=self.batch_size, num_workers=workers,
                          collate_fn=partial(collate, eos=self.tokenize.eos), persistent_workers=workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.eval_items, batch_size=self.batch_size, shuffle=False,
                          collate_fn=partial(collate_evaluation, eos=self.tokenize.eos))
