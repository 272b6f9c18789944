"""Data loaders on real files: webdataset / folder / parquet pairs, COCO via pycocotools,
and the squash-resize geometry shared by images and masks."""

from __future__ import annotations

import io
import json
import tarfile

import mmn  # noqa: F401  (first, as everywhere)
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmn.data.cc3m import load_pairs
from mmn.data.coco import CocoImages
from mmn.data.transforms import squash_resize, squash_resize_mask
from mmn.world import generator as g

N_TRAIN, N_EVAL = 30, 12


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    g.generate(root, n_train=N_TRAIN, n_eval=N_EVAL, seed=11, shard_size=16)
    return root


def _jpeg(colour, size=(20, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, payload in samples:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


# ---------------------------------------------------------------- webdataset

def test_webdataset_reads_the_world_shards(world):
    expected = {}
    for shard in sorted((world / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".txt"):
                    expected[member.name[:-4]] = tar.extractfile(member).read().decode()
    pairs = load_pairs(world / "train")
    assert pairs.format == "webdataset" and len(pairs) == N_TRAIN
    seen = {}
    for pair in pairs:
        assert pair["image"].mode == "RGB" and pair["image"].size == (224, 224)
        seen[pair["key"]] = pair["caption"]
    assert seen == expected and len(seen) == N_TRAIN and pairs.skipped == 0
    # a glob names the same shards; one shard alone holds its 16
    assert sum(1 for _ in load_pairs(str(world / "train" / "*.tar"))) == N_TRAIN
    assert len(list(load_pairs(world / "train" / "00000.tar", format="webdataset"))) == 16
    # DDP split: whole shards per rank, together everything once
    ranks = [[p["key"] for p in load_pairs(world / "train").split_by_node(r, 2)] for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == sorted(expected) and not set(ranks[0]) & set(ranks[1])


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    samples = []
    for i in range(4):
        key = f"{i:09d}"
        samples += [(f"{key}.jpg", b"not a jpeg at all" if i == 2 else _jpeg((200, 10, 10))),
                    (f"{key}.txt", f"caption {i}".encode()),
                    # real img2dataset metadata changes type between samples (null, then a string)
                    (f"{key}.json", json.dumps({"key": key, "error_message": None if i < 3 else "x"}).encode())]
    _write_tar(tmp_path / "00000.tar", samples)
    pairs = load_pairs(tmp_path)
    got = [(p["key"], p["caption"]) for p in pairs]
    assert got == [("000000000", "caption 0"), ("000000001", "caption 1"), ("000000003", "caption 3")]
    assert pairs.skipped == 1 and list(pairs.skipped_reasons) == ["000000002"]
    assert "unreadable image" in pairs.skipped_reasons["000000002"]
    assert len(pairs) == 4  # pairs in the source, found unreadable only while iterating


def test_dataset_with_no_usable_image_raises(tmp_path):
    _write_tar(tmp_path / "00000.tar", [("000000000.jpg", b"garbage"), ("000000000.txt", b"a cat"),
                                        ("000000001.jpg", b"\xff\xd8\xff truncated"), ("000000001.txt", b"a dog")])
    pairs = load_pairs(tmp_path)
    with pytest.raises(ValueError, match="no usable image") as error:
        list(pairs)
    assert str(tmp_path) in str(error.value)
    assert pairs.skipped == 2


# ---------------------------------------------------------------- folder (MAGMA / LiMBeR)

def test_folder_layout(tmp_path):
    (tmp_path / "images" / "0").mkdir(parents=True)
    (tmp_path / "image_data" / "0").mkdir(parents=True)
    (tmp_path / "images" / "0" / "cat.jpg").write_bytes(_jpeg((10, 200, 10)))
    (tmp_path / "images" / "0" / "1.jpg").write_bytes(_jpeg((10, 10, 200), size=(30, 40)))
    (tmp_path / "images" / "0" / "broken.jpg").write_bytes(b"\x00\x01broken")
    records = {"0": {"image_path": "images/0/cat.jpg", "captions": ["a cat", "a green cat"], "metadata": {}},
               "1": {"captions": ["a blue thing"]},  # no image_path: LiMBeR's fallback images/0/1.jpg
               "2": {"image_path": "images/0/broken.jpg", "captions": ["never seen"]},
               "3": {"image_path": "images/0/missing.jpg", "captions": ["never seen either"]}}
    for stem, record in records.items():
        (tmp_path / "image_data" / "0" / f"{stem}.json").write_text(json.dumps(record))
    pairs = load_pairs(tmp_path)
    assert pairs.format == "folder" and len(pairs) == 5
    got = [(p["key"], p["caption"], p["image"].size, p["image"].getpixel((5, 5))[1] > 150) for p in pairs]
    assert got == [("0/0", "a cat", (20, 10), True), ("0/1", "a green cat", (20, 10), True),
                   ("1", "a blue thing", (30, 40), False)]
    assert pairs.skipped == 2 and set(pairs.skipped_reasons) == {"2", "3"}


# ---------------------------------------------------------------- parquet

def test_parquet_with_raw_bytes_and_struct_images(tmp_path):
    pq.write_table(pa.table({"key": ["a", "b", "c"],
                             "jpg": [_jpeg((255, 0, 0)), b"corrupt", _jpeg((0, 0, 255))],
                             "caption": ["red", "lost", "blue"]}), tmp_path / "part-0.parquet")
    pairs = load_pairs(tmp_path)
    assert pairs.format == "parquet" and len(pairs) == 3
    assert [(p["key"], p["caption"]) for p in pairs] == [("a", "red"), ("c", "blue")]
    assert pairs.skipped == 1 and "b" in pairs.skipped_reasons

    struct_dir = tmp_path / "struct"
    struct_dir.mkdir()
    images = [{"bytes": _jpeg((0, 255, 0)), "path": "x.jpg"}, {"bytes": _jpeg((9, 9, 9)), "path": "y.jpg"}]
    pq.write_table(pa.table({"picture": images, "alt_text": ["green", "grey"]}), struct_dir / "0.parquet")
    pairs = load_pairs(struct_dir / "0.parquet", format="parquet", image_column="picture",
                       caption_column="alt_text")
    got = [(p["caption"], p["image"].mode) for p in pairs]
    assert got == [("green", "RGB"), ("grey", "RGB")]
    with pytest.raises(ValueError, match="alt_text"):  # default names absent: the error lists the columns
        load_pairs(struct_dir, format="parquet")


# ---------------------------------------------------------------- COCO

def test_coco_loader_reads_the_world_eval_split(world):
    coco = CocoImages(world / "coco", image_size=(224, 224))
    assert len(coco) == N_EVAL
    for i in range(N_EVAL):
        item = coco[i]
        scene, _ = g.scene_at(11, "eval", item["image_id"] - 1)
        image, masks = g.render(scene)
        assert np.array_equal(np.asarray(item["image"]), np.asarray(image))  # PNG: exact pixels
        assert len(item["captions"]) == 5 and all(g.first_shape(c) for c in item["captions"])
        for shape in {o.shape for o in scene.objects}:
            expected = [m for o, m in zip(scene.objects, masks) if o.shape == shape]
            assert len(item["masks"][shape]) == len(expected)
            for got, want in zip(item["masks"][shape], expected):
                assert got.dtype == bool and np.array_equal(got, want)
        assert set(item["masks"]) == {o.shape for o in scene.objects}

    # squashed: masks follow the image geometry exactly
    small = CocoImages(world / "coco", image_size=(112, 168))
    item = small[0]
    scene, _ = g.scene_at(11, "eval", item["image_id"] - 1)
    _, masks = g.render(scene)
    assert item["image"].size == (168, 112)
    for o, mask in zip(scene.objects, masks):
        assert any(np.array_equal(m, squash_resize_mask(mask, (112, 168))) for m in item["masks"][o.shape])


def test_coco_categories_and_single_object_images(world):
    scenes = [g.scene_at(11, "eval", i)[0] for i in range(N_EVAL)]
    shape = scenes[0].objects[0].shape
    coco = CocoImages(world / "coco", categories=[shape])
    assert coco.image_ids == [i + 1 for i, s in enumerate(scenes) if shape in {o.shape for o in s.objects}]
    assert set(coco[0]["masks"]) == {shape}
    everything = CocoImages(world / "coco")
    singles = [i + 1 for i, s in enumerate(scenes) if len(s.objects) == 1]
    assert everything.single_object_ids() == singles and len(singles) > 0
    single_shape = scenes[singles[0] - 1].objects[0].shape
    assert everything.single_object_ids([single_shape]) == [
        i for i in singles if scenes[i - 1].objects[0].shape == single_shape]
    assert everything.index_of(singles[0]) == singles[0] - 1
    with pytest.raises(ValueError, match="unicorn") as error:
        CocoImages(world / "coco", categories=["unicorn"])
    assert "circle" in str(error.value)  # lists the available names


# ---------------------------------------------------------------- squash-resize geometry

def test_squash_resize_geometry_of_masks_and_images():
    mask = np.zeros((100, 200), dtype=bool)  # [H, W]
    mask[25:50, 50:100] = True
    resized = squash_resize_mask(mask, (224, 224))  # rows x 2.24, cols x 1.12
    ys, xs = np.nonzero(resized)
    assert (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) == (56, 112, 56, 112)
    half = squash_resize_mask(mask, (50, 100))
    assert np.array_equal(half, mask[1::2, 1::2])  # output pixel i samples input pixel centre 2i + 1
    image = Image.fromarray(mask.astype(np.uint8) * 255).convert("RGB")
    squashed = squash_resize(image, (224, 224))
    assert squashed.size == (224, 224)
    assert np.array_equal(np.asarray(squashed)[..., 0] > 127, resized)  # the image lands on the mask
    with pytest.raises(ValueError, match="2-D"):
        squash_resize_mask(np.zeros((2, 2, 2)), (4, 4))


# ---------------------------------------------------------------- bad inputs

def test_bad_inputs_fail_early_and_clearly(world, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_pairs(missing)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_pairs(missing, format="webdataset")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_pairs(str(missing / "*.tar"))
    with pytest.raises(ValueError, match="no .parquet files"):
        load_pairs(world / "train", format="parquet")
    with pytest.raises(ValueError, match="unknown format 'zip'"):
        load_pairs(world / "train", format="zip")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        CocoImages(missing)

    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    captions = world / "coco/annotations/captions_val2017.json"
    (root / "annotations/captions_val2017.json").write_bytes(captions.read_bytes())
    instances_path = root / "annotations/instances_val2017.json"
    instances_path.write_text("{ not json")
    with pytest.raises(ValueError, match="instances_val2017.json: not a JSON file"):
        CocoImages(root)
    instances = json.loads((world / "coco/annotations/instances_val2017.json").read_text())
    del instances["categories"]
    instances_path.write_text(json.dumps(instances))
    with pytest.raises(ValueError, match=r"instances_val2017.json: missing key 'categories'"):
        CocoImages(root)
    (root / "val2017").rmdir()
    instances_path.write_bytes((world / "coco/annotations/instances_val2017.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="val2017: COCO image folder not found"):
        CocoImages(root)
