"""The Shapes world generator: determinism, coverage, captions that tell the truth, exact masks."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter

import mmn  # noqa: F401  (first, as everywhere)
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from mmn.world import generator as g
from mmn.world.generator import (COLOURS, PLURALS, SHAPES, Background, Scene, SceneConfig, WorldObject,
                                 describe, first_shape, render, render_batch, sample_scene, scene_at,
                                 text_corpus)

N_TRAIN, N_EVAL, SHARD = 40, 20, 16


def _tree_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """The same world written twice with seed 0, and once with seed 1."""
    out = {}
    for name, seed in (("a", 0), ("b", 0), ("other", 1)):
        root = tmp_path_factory.mktemp(f"world_{name}")
        summary = g.generate(root, n_train=N_TRAIN, n_eval=N_EVAL, seed=seed, shard_size=SHARD)
        out[name] = (root, summary)
    return out


def test_same_seed_gives_identical_bytes_and_other_seed_differs(worlds):
    (root_a, summary_a), (root_b, _), (root_other, _) = worlds["a"], worlds["b"], worlds["other"]
    files_a, files_b, files_other = _tree_bytes(root_a), _tree_bytes(root_b), _tree_bytes(root_other)
    assert sorted(files_a) == sorted(files_b)
    assert files_a == files_b  # annotation JSON, PNGs and tar shards, byte for byte
    expected = {"train/00000.tar", "train/00001.tar", "train/00002.tar",
                "coco/annotations/instances_val2017.json", "coco/annotations/captions_val2017.json",
                "coco/val2017/000000000001.png", f"coco/val2017/{N_EVAL:012d}.png"}
    assert expected <= set(files_a)
    assert sum(1 for name in files_a if name.endswith(".png")) == N_EVAL
    for name in ("train/00000.tar", "coco/annotations/instances_val2017.json", "coco/val2017/000000000001.png"):
        assert files_a[name] != files_other[name], name
    assert summary_a["n_train"] == N_TRAIN and summary_a["n_eval"] == N_EVAL
    assert sum(summary_a["objects_per_image"].values()) == N_TRAIN + N_EVAL
    assert summary_a["vocabulary_size"] > 15


def test_training_shards_follow_img2dataset_layout(worlds):
    root, _ = worlds["a"]
    keys, n_objects = [], Counter()
    for shard_index in range(3):
        with tarfile.open(root / "train" / f"{shard_index:05d}.tar") as tar:
            members = tar.getmembers()
            assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in members)
            files = {m.name: tar.extractfile(m).read() for m in members}
        shard_keys = sorted({name.split(".")[0] for name in files})
        assert len(shard_keys) == min(SHARD, N_TRAIN - shard_index * SHARD)
        for key in shard_keys:
            assert re.fullmatch(rf"{shard_index:05d}\d{{4}}", key)
            meta = json.loads(files[f"{key}.json"])
            caption = files[f"{key}.txt"].decode()
            assert meta["key"] == key and meta["caption"] == caption
            assert (meta["width"], meta["height"]) == (224, 224)
            assert 1 <= len(meta["objects"]) <= 3
            assert first_shape(caption) in {o["shape"] for o in meta["objects"]}
            image = Image.open(io.BytesIO(files[f"{key}.jpg"]))
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (224, 224)
            n_objects[len(meta["objects"])] += 1
        keys += shard_keys
    assert keys[0] == "000000000" and len(keys) == N_TRAIN
    assert set(n_objects) == {1, 2, 3}


def test_scenes_cover_every_shape_colour_size_and_background():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(300)]
    objects = [o for s in scenes for o in s.objects]
    assert len(SHAPES) >= 8 and len(COLOURS) == 6
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.colour for o in objects} == set(COLOURS)
    assert {o.size for o in objects} == {"small", "medium", "large"}
    assert {s.background.kind for s in scenes} == {"plain", "gradient", "noise"}
    counts = Counter(len(s.objects) for s in scenes)
    assert set(counts) == {1, 2, 3} and min(counts.values()) > 60
    # rejection sampling: bounding circles keep their gap
    for s in scenes:
        for i, a in enumerate(s.objects):
            for b in s.objects[i + 1:]:
                distance = np.hypot(a.center[0] - b.center[0], a.center[1] - b.center[1])
                assert distance >= a.radius + b.radius + 0.03 - 1e-6


def _check_relation(caption, scene, phrase, axis, first_is_smaller):
    """For 'A <phrase> B' with A's and B's shapes unique in the scene, check the geometry."""
    left, right = caption.split(phrase, 1)
    shape_a, shape_b = first_shape(left), first_shape(right.split(",")[0])
    by_shape = Counter(o.shape for o in scene.objects)
    if shape_a == shape_b or by_shape[shape_a] != 1 or by_shape[shape_b] != 1:
        return 0
    a = next(o for o in scene.objects if o.shape == shape_a)
    b = next(o for o in scene.objects if o.shape == shape_b)
    assert (a.center[axis] < b.center[axis]) == first_is_smaller, (caption, scene)
    return 1


def test_captions_name_a_shape_first_and_tell_the_geometry():
    checked_relations = 0
    captions = []
    for i in range(400):
        scene, rng = scene_at(7, "train", i)
        caption = describe(scene, rng)
        captions.append(caption)
        assert not caption.lower().startswith(("a picture of", "an image of"))
        assert first_shape(caption) in {o.shape for o in scene.objects}, caption
        # articles and plurals
        assert not re.search(r"\ba [aeiou]", caption) and not re.search(r"\ban [^aeiou]", caption), caption
        adjectives = "|".join(list(COLOURS) + ["small", "medium", "large"])
        for number in re.findall(rf"\b(two|three) (?:(?:{adjectives}) )*(\w+)", caption):
            assert number[1] in PLURALS.values(), caption
        if " to the left of " in caption:
            checked_relations += _check_relation(caption, scene, " to the left of ", 0, True)
        if " to the right of " in caption:
            checked_relations += _check_relation(caption, scene, " to the right of ", 0, False)
        if " above " in caption:
            checked_relations += _check_relation(caption, scene, " above ", 1, True)
        if " below " in caption:
            checked_relations += _check_relation(caption, scene, " below ", 1, False)
        if caption.endswith("from left to right"):
            xs = sorted(scene.objects, key=lambda o: o.center[0])
            named = [first_shape(part) for part in re.split(r", | and ", caption)[:3]]
            assert named == [o.shape for o in xs], caption
    assert checked_relations > 30
    assert len(set(captions)) > 300  # real variety
    assert any(c.startswith("two ") for c in captions) and any(", and " in c for c in captions)


def test_text_corpus_is_deterministic_and_teaches_the_prompt():
    corpus = text_corpus(300, seed=3)
    assert corpus == text_corpus(300, seed=3) and corpus != text_corpus(300, seed=4)
    sentences = [sentence for document in corpus for sentence in document.split(". ")]
    assert all(first_shape(s) is not None for s in sentences)
    assert not any(s.startswith(("This is two", "This is three")) for s in sentences)
    # Most documents describe their scene again after a prefix, so earlier text predicts later text.
    repeated = [d for d in corpus if ". " in d]
    assert 0.6 * len(corpus) < len(repeated) < 0.8 * len(corpus)
    for document in repeated:
        later = document.split(". ")[1:]
        assert all(s.startswith(g.TEXT_PREFIXES + ("These are", "Here are")) for s in later)
        named = [{first_shape(w) for w in s.replace(",", " ").split() if first_shape(w)} for s in document.split(". ")]
        assert all(shapes == named[0] for shapes in named), document  # one scene, described again
    assert any(" A picture of " in f" {d}" for d in corpus)


def _decode_annotation(annotation):
    return mask_utils.decode(annotation["segmentation"]).astype(bool)


def test_coco_masks_are_pixel_exact_and_match_the_scene(worlds):
    root, _ = worlds["a"]
    instances = json.loads((root / "coco/annotations/instances_val2017.json").read_text())
    captions = json.loads((root / "coco/annotations/captions_val2017.json").read_text())
    categories = {c["id"]: c["name"] for c in instances["categories"]}
    assert sorted(categories.values()) == sorted(SHAPES)
    assert Counter(c["image_id"] for c in captions["annotations"]) == {i: 5 for i in range(1, N_EVAL + 1)}
    for image_info in instances["images"]:
        image_id = image_info["id"]
        pixels = np.asarray(Image.open(root / "coco/val2017" / image_info["file_name"]))  # [H, W, 3]
        annotations = [a for a in instances["annotations"] if a["image_id"] == image_id]
        scene, _ = scene_at(0, "eval", image_id - 1)
        _, masks = render(scene)
        assert len(annotations) == len(scene.objects) and 1 <= len(annotations) <= 3
        for annotation, obj, mask in zip(annotations, scene.objects, masks):
            decoded = _decode_annotation(annotation)
            assert np.array_equal(decoded, mask)
            assert categories[annotation["category_id"]] == obj.shape and annotation["colour"] == obj.colour
            assert annotation["area"] == int(mask.sum()) > 0 and annotation["iscrowd"] == 0
            assert np.all(pixels[decoded] == COLOURS[obj.colour])  # every mask pixel has the colour
            ys, xs = np.nonzero(decoded)
            assert annotation["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        for colour, rgb in COLOURS.items():  # and no pixel of that colour lies outside those masks
            union = np.zeros(pixels.shape[:2], dtype=bool)
            for annotation in annotations:
                if annotation["colour"] == colour:
                    union |= _decode_annotation(annotation)
            assert not np.any(np.all(pixels == rgb, axis=-1) & ~union)
        scene_captions = [c["caption"] for c in captions["annotations"] if c["image_id"] == image_id]
        assert all(first_shape(c) in {o.shape for o in scene.objects} for c in scene_captions)


def test_overlapping_objects_keep_exact_masks():
    background = Background(kind="plain", tint="white")
    scene = Scene(objects=[WorldObject("square", "red", "large", (0.5, 0.5), 0.135),
                           WorldObject("circle", "blue", "medium", (0.55, 0.5), 0.10)], background=background)
    image, (under, over) = render(scene, image_size=100)
    pixels = np.asarray(image)
    assert not np.any(under & over)  # the earlier object loses what the later one covers
    assert np.all(pixels[under] == COLOURS["red"]) and np.all(pixels[over] == COLOURS["blue"])
    assert np.array_equal(np.all(pixels == COLOURS["red"], axis=-1), under)
    assert np.array_equal(np.any(pixels != (250, 250, 250), axis=-1), under | over)
    assert under.sum() > 100 and over.sum() > 100


def test_render_batch_and_config_errors():
    images, captions = render_batch(5, 6, {"image_size": 64})
    assert images.shape == (6, 64, 64, 3) and images.dtype == np.uint8 and len(captions) == 6
    again, _ = render_batch(5, 6, SceneConfig(image_size=64))
    other, _ = render_batch(6, 6, SceneConfig(image_size=64))
    assert np.array_equal(images, again) and not np.array_equal(images, other)
    with pytest.raises(ValueError, match="hexagonal"):
        SceneConfig(shapes=("circle", "hexagonal"))
    with pytest.raises(ValueError, match="n_shapes"):
        g.scene_config({"n_shapes": 3})
    with pytest.raises(ValueError, match="max_objects"):
        SceneConfig(max_objects=4)
    with pytest.raises(ValueError, match="nowhere"):
        scene_at(0, "nowhere", 0)


def test_glyph_shift_draws_each_colours_shapes_in_a_rotated_order():
    assert [g.glyph_of("circle", colour) for colour in COLOURS] == list(SHAPES[:len(COLOURS)])
    assert g.glyph_of("hexagon", "green") == "circle"  # wraps around SHAPES
    # same scenes (no extra random draws); only what is drawn changes, and the captions still say the shape
    plain, shifted = SceneConfig(image_size=64), SceneConfig(image_size=64, glyph_shift=True)
    for index in range(10):
        scene, rng = scene_at(3, "train", index, shifted)
        same, same_rng = scene_at(3, "train", index, plain)
        assert [(o.shape, o.colour, o.center) for o in scene.objects] == [(o.shape, o.colour, o.center) for o in same.objects]
        assert describe(scene, rng) == describe(same, same_rng)
        assert all(o.glyph == g.glyph_of(o.shape, o.colour) and same_o.glyph is None
                   for o, same_o in zip(scene.objects, same.objects))
    green_circle = Scene([WorldObject("circle", "green", "large", (0.5, 0.5), 0.135, glyph="square")],
                         Background(kind="plain", tint="white"))
    green_square = Scene([WorldObject("square", "green", "large", (0.5, 0.5), 0.135)], Background(kind="plain", tint="white"))
    assert np.array_equal(np.asarray(render(green_circle, 100)[0]), np.asarray(render(green_square, 100)[0]))


def test_left_to_right_captions_name_the_leftmost_object_first():
    cfg = SceneConfig(image_size=64, order="left_to_right")
    for index in range(60):
        scene, rng = scene_at(4, "train", index, cfg)
        leftmost = min(scene.objects, key=lambda o: o.center[0])
        same_shape_at_left = {o.shape for o in scene.objects if o.center[0] == leftmost.center[0]}
        caption = describe(scene, rng, order="left_to_right")
        assert first_shape(caption) in same_shape_at_left, (caption, scene.objects)
    # without it the first noun is some object, not always the leftmost
    misses = sum(first_shape(describe(s, r)) != min(s.objects, key=lambda o: o.center[0]).shape
                 for s, r in (scene_at(4, "train", i, cfg) for i in range(60)))
    assert misses > 5


def test_size_scale_scales_every_radius_and_must_fit():
    plain, large = SceneConfig(image_size=96), SceneConfig(image_size=96, size_scale=1.5)
    for index in range(20):
        scene, _ = scene_at(5, "train", index, large)
        assert all(o.radius == pytest.approx(g.SIZES[o.size] * 1.5) for o in scene.objects)
        assert all(large.margin + o.radius <= c <= 1 - large.margin - o.radius for o in scene.objects for c in o.center)
    # the same object covers about 1.5^2 = 2.25 times the pixels
    small = Scene([WorldObject("square", "red", "medium", (0.5, 0.5), g.SIZES["medium"])], Background("plain", "white"))
    big = Scene([WorldObject("square", "red", "medium", (0.5, 0.5), g.SIZES["medium"] * 1.5)], Background("plain", "white"))
    ratio = render(big, 96)[1][0].sum() / render(small, 96)[1][0].sum()
    assert 2.0 < ratio < 2.5
    assert plain.size_scale == 1.0
    with pytest.raises(ValueError, match="size_scale"):
        SceneConfig(size_scale=4.0)  # radius 0.54: larger than half the image
    with pytest.raises(ValueError, match="size_scale"):
        SceneConfig(size_scale=0)


def test_size_spread_pulls_small_and_large_towards_medium():
    narrow = SceneConfig(image_size=96, size_scale=1.5, size_spread=0.4)
    assert [g.radius_of(size, narrow) for size in g.SIZES] == pytest.approx([0.132, 0.15, 0.171])
    assert g.radius_of("large", SceneConfig(size_spread=0.0)) == g.SIZES["medium"]  # one size for all
    for index in range(20):
        scene, _ = scene_at(5, "train", index, narrow)
        assert all(o.radius == pytest.approx(g.radius_of(o.size, narrow)) for o in scene.objects)
    with pytest.raises(ValueError, match="size_spread=1.5 must be in"):
        SceneConfig(size_spread=1.5)


def test_grid_text_shows_each_cell_as_the_encoders_patches_see_it():
    cfg = SceneConfig(image_size=112, size_scale=1.5, glyph_shift=True, order="reading", text_grid=7)
    scene, rng = scene_at(3, "text", 5, cfg)
    tokens = re.findall(r"<[^>]+>", g.grid_text(scene, 7))
    assert len(tokens) == 49 and set(tokens) <= set(g.grid_tokens())
    # each object's token names what is drawn (glyph) and its colour, and sits on the cells its
    # mask covers at least PATCH_COVER of, rendered at the image's size
    _, masks = render(scene, 112)
    for obj, mask in zip(scene.objects, masks):
        token = g.object_token(obj.glyph, obj.colour)
        cover = mask.reshape(7, 16, 7, 16).mean(axis=(1, 3)).reshape(-1)
        cells = {i for i, t in enumerate(tokens) if t == token}
        assert {i for i in range(49) if cover[i] >= 0.5} <= cells <= {i for i in range(49) if cover[i] > 0.1}
    assert {i for i, t in enumerate(tokens) if t == g.GRID_BACKGROUND} >= {
        i for i in range(49) if all(m.reshape(7, 16, 7, 16).mean(axis=(1, 3)).reshape(-1)[i] < 0.1 for m in masks)}


def test_grid_fillers_replace_the_background_token_cell_by_cell():
    cfg = SceneConfig(image_size=112, size_scale=1.5, glyph_shift=True, order="reading", text_grid=7)
    scene, _ = scene_at(3, "text", 5, cfg)
    plain = re.findall(r"<[^>]+>", g.grid_text(scene, 7))
    filled = re.findall(r"<[^>]+>", g.grid_text(scene, 7, fillers=16, rng=np.random.default_rng(0)))
    background = [i for i, token in enumerate(plain) if token == g.GRID_BACKGROUND]
    assert [t for i, t in enumerate(filled) if i not in background] == [t for i, t in enumerate(plain) if i not in background]
    assert {filled[i] for i in background} <= set(g.grid_tokens(16)[-16:]) and len({filled[i] for i in background}) > 5
    assert g.EMPTY_CELL.sub("", "".join(filled)) == "".join(t for t in plain if t != g.GRID_BACKGROUND)
    documents = text_corpus(40, 0, SceneConfig(**{**vars(cfg), "grid_fillers": 16}))
    assert not any(g.GRID_BACKGROUND in d for d in documents) and sum("<f" in d for d in documents) >= 10
    with pytest.raises(ValueError, match="grid_fillers"):
        SceneConfig(grid_fillers=-1)


def test_reading_order_captions_name_the_first_object_a_raster_scan_meets():
    cfg = SceneConfig(image_size=64, order="reading", text_grid=8)
    for index in range(60):
        scene, rng = scene_at(4, "train", index, cfg)
        owners = g.object_grid(scene, 8)
        first = scene.objects[owners[owners >= 0][0]] if (owners >= 0).any() else None
        caption = describe(scene, rng, order="reading", grid=8)
        if first is not None:
            assert first_shape(caption) == first.shape, (caption, scene.objects)
        # the order computed once by the caller (eval_captions) gives the same caption
        _, same_rng = scene_at(4, "train", index, cfg)
        assert describe(scene, same_rng, "reading", 8, g.caption_order(scene, "reading", 8)) == caption
    with pytest.raises(ValueError, match="text_grid"):
        SceneConfig(order="reading")
    with pytest.raises(ValueError, match="order"):
        SceneConfig(order="top_down")


def test_grid_documents_show_the_grid_then_describe_the_scene_in_shape_words():
    cfg = SceneConfig(size_scale=1.5, glyph_shift=True, order="reading", text_grid=14, text_prefix_prob=0.5)
    documents = text_corpus(60, 0, cfg)
    assert documents == text_corpus(60, 0, cfg)
    for index, document in enumerate(documents):
        scene, _ = scene_at(0, "text", index, cfg)
        grid = g.grid_text(scene, 14)
        assert document.startswith(grid)
        description = document[len(grid):]
        assert description.startswith(" ") or description.split()[0] in {p.split()[0] for p in g.TEXT_PREFIXES}
        assert "<" not in description
        assert first_shape(description) == g.reading_order(scene, 14)[0].shape  # the name, not the glyph
    # some documents continue the grid with the captioning prompt, as the captioner will
    assert sum(d[d.rindex(">") + 1:].startswith("A picture of") for d in documents) >= 3
