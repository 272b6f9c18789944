"""The Shapes world's three parts on tiny budgets, loaded back through the real loaders, and
build_world's cache."""

from __future__ import annotations

import json
import math
import re

import mmn  # noqa: F401  (torchvision shim first)
import numpy as np
import pytest
import torch

from mmn.world import generator
from mmn.world.build import (MANIFEST_FILE, PARTS, SHIPPED_DIR, build_world, resolve_world_config, ship_world,
                             shipped_part, world_summary)
from mmn.world.clip import ClipConfig, noise_tokens, noun_texts, train_clip
from mmn.world.image_encoder import (EncoderConfig, ObjectTokenizer, TokenPredictionModel, kmeans, object_components,
                                    to_pixels, tokenize, train_image_encoder)
from mmn.world.text_lm import TextLMConfig, build_model, fix_object_embeddings, train_text_lm

TINY_LM = dict(n_texts=800, n_eval_texts=100, vocab_size=400, n_layer=2, n_embd=64, n_head=4, rotary_dim=8,
               n_inner=128, n_positions=96, seq_len=64, batch_size=8, steps=60, lr=3e-3, warmup_steps=5,
               filler_noise=False)  # on where a test names it: most texts here have no filler cells
TINY_ENCODER = dict(n_images=24, n_eval_images=8, image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=1,
                    num_attention_heads=2, position_bias_slopes=(1.0, 0.0), intermediate_size=64, outline_tokens=4,
                    batch_size=8, steps=30, lr=3e-3, warmup_steps=3)
TINY_CLIP = dict(n_pairs=32, n_eval_pairs=20, embed_dim=16, image_size=32, patch_size=16, vision_width=32,
                 vision_layers=1, vision_head_width=16, context_length=16, text_width=32, text_heads=2, text_layers=1,
                 batch_size=16, steps=4, warmup_steps=1, retrieval_pool=10)


def test_text_lm_trains_saves_and_loads_like_gptj(tmp_path):
    from transformers import AutoTokenizer, GPTJForCausalLM

    cfg = TextLMConfig(**TINY_LM)
    metrics = train_text_lm(generator.text_corpus(800, 0), generator.text_corpus(100, 1), tmp_path, cfg, progress=False)
    # held-out perplexity after 60 steps is far below the untrained model's (~ vocabulary size)
    assert metrics["eval_perplexity"] < 0.25 * metrics["eval_perplexity_untrained"]
    assert metrics["n_unembedding_rows"] % cfg.pad_vocab_to == 0
    assert metrics["n_unembedding_rows"] >= metrics["n_tokens_real"]

    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        assert (tmp_path / name).is_file(), name
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    model = GPTJForCausalLM.from_pretrained(tmp_path)
    assert model.config.model_type == "gptj" and not model.config.tie_word_embeddings
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
    assert model.config.eos_token_id == tokenizer.eos_token_id
    caption = "A picture of a red circle to the left of two blue stars"
    ids = tokenizer(caption)["input_ids"]
    assert tokenizer.decode(ids) == caption
    assert tokenizer.convert_ids_to_tokens(tokenizer(" circle")["input_ids"]) == ["Ġcircle"]  # GPT-2 style, one token

    # the loaded model computes the same held-out loss as the trained one did
    from mmn.world.text_lm import mean_loss, pack_texts

    stream = pack_texts(tokenizer, generator.text_corpus(100, 1))
    assert math.isclose(mean_loss(model, stream, cfg.seq_len), metrics["eval_loss"], rel_tol=1e-4)

    lm_module = pytest.importorskip("mmn.models.lm")
    lm = lm_module.LanguageModel.from_pretrained(str(tmp_path))
    assert (lm.n_layers, lm.d_model, lm.d_mlp) == (2, 64, 128)
    assert lm.vocab_size == len(tokenizer)


def test_grid_words_are_whole_tokens_whose_embeddings_stay_glyph_plus_colour(tmp_path):
    from transformers import AutoTokenizer, GPTJForCausalLM

    scenes = generator.SceneConfig(image_size=64, glyph_shift=True, order="reading", text_grid=4)
    words = generator.grid_tokens()
    cfg = TextLMConfig(**{**TINY_LM, "steps": 20})
    train_text_lm(generator.text_corpus(300, 0, scenes), generator.text_corpus(50, 1, scenes), tmp_path, cfg,
                  progress=False, words=words)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    document = generator.text_corpus(1, 2, scenes)[0]
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(document)["input_ids"])
    assert tokens[:16] == re.findall(r"<[^>]+>", document)[:16]  # the grid: one token per cell
    embedding = GPTJForCausalLM.from_pretrained(tmp_path).get_input_embeddings().weight.detach()
    def row(glyph, colour):
        return embedding[tokenizer.convert_tokens_to_ids(generator.object_token(glyph, colour))]
    # trained for 20 steps, every object token is still glyph + colour: differences of colours
    # are the same whatever the glyph (the LM must compute the shape from them)
    red_minus_blue = row("circle", "red") - row("circle", "blue")
    for glyph in generator.SHAPES[1:]:
        assert torch.allclose(row(glyph, "red") - row(glyph, "blue"), red_minus_blue, atol=1e-6)
    assert red_minus_blue.norm() > 0.1


def test_filler_tokens_keep_fixed_random_embeddings(tmp_path):
    from transformers import AutoTokenizer, GPTJForCausalLM

    scenes = generator.SceneConfig(image_size=64, glyph_shift=True, order="reading", text_grid=4, grid_fillers=8)
    cfg = TextLMConfig(**{**TINY_LM, "steps": 20})
    corpus = generator.text_corpus(300, 0, scenes)
    train_text_lm(corpus, generator.text_corpus(50, 1, scenes), tmp_path, cfg, progress=False,
                  words=generator.grid_tokens(8))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    rows = tokenizer.convert_tokens_to_ids(generator.grid_tokens(8)[-8:])
    trained = GPTJForCausalLM.from_pretrained(tmp_path).get_input_embeddings().weight.detach()[rows]  # [8, d]
    model = build_model(cfg, len(tokenizer), tokenizer.eos_token_id)
    fix_object_embeddings(model, tokenizer, seed=0)
    assert torch.equal(trained, model.get_input_embeddings().weight.detach()[rows])  # fixed through training
    cosines = torch.nn.functional.normalize(trained, dim=-1) @ torch.nn.functional.normalize(trained, dim=-1).T
    assert cosines[~torch.eye(8, dtype=torch.bool)].abs().max() < 0.5  # independent directions, no shared one


def test_filler_noise_feeds_background_cells_fresh_noise(tmp_path):
    scenes = generator.SceneConfig(image_size=64, glyph_shift=True, order="reading", text_grid=4, grid_fillers=1)
    corpus, held_out = generator.text_corpus(300, 0, scenes), generator.text_corpus(50, 1, scenes)
    fixed_cfg = TextLMConfig(**{**TINY_LM, "steps": 20})
    noisy_cfg = TextLMConfig(**{**TINY_LM, "steps": 20, "filler_noise": True})

    def train(name, cfg, texts=corpus, words=generator.grid_tokens(1)):
        return train_text_lm(texts, held_out, tmp_path / name, cfg, progress=False, words=words)

    fixed, noisy, again = train("fixed", fixed_cfg), train("noisy", noisy_cfg), train("again", noisy_cfg)
    assert noisy["eval_loss"] != fixed["eval_loss"]  # the background cells read noise, not their token's row
    assert noisy["eval_loss"] == again["eval_loss"]  # seeded: the same noise on a rebuild
    assert noisy["eval_perplexity"] < 0.5 * noisy["eval_perplexity_untrained"]
    with pytest.raises(ValueError, match="filler_noise=true needs filler tokens"):
        train("none", noisy_cfg, texts=generator.text_corpus(300, 0), words=())  # word texts: no grid, no fillers


def test_object_tokenizer_finds_objects_and_ignores_colour_position_and_scale():
    image = np.full((1, 64, 64, 3), 240, np.uint8)  # light background
    image[0, 2:14, 18:30] = (220, 30, 30)           # a red square filling most of patch (0, 1)
    image[0, 36:60, 36:60] = (30, 70, 220)          # a blue square twice as large over patches (2..3, 2..3)
    image[0, 30:34, 2:14] = (30, 160, 50)           # a flat green bar over patch (1, 0) and (2, 0), covering neither much
    image[0, 40, 4] = (30, 70, 220)                 # a one-pixel speck: not an object
    components = object_components(to_pixels(torch.from_numpy(image)))
    assert sorted(np.unique(components)) == [0, 1, 2, 3]  # background, the bar and the two squares, no speck

    cfg = EncoderConfig(image_size=64, patch_size=16, outline_tokens=2, outline_pixels=8, colour_tokens=0)
    square = torch.cat([torch.ones(64), torch.tensor([0.5])])  # a full bounding box, height / (height + width) = 1/2
    tokenizer = ObjectTokenizer(torch.stack([torch.zeros(65), square]), cfg)
    tokens = tokenizer(torch.from_numpy(image))  # [1, 16], patches row-major; token 2 = background
    assert [p for p in range(16) if tokens[0, p] != 2] == [1, 10, 11, 14, 15]
    assert tokens[0, [1, 10, 11, 14, 15]].tolist() == [1] * 5  # one token for both squares: size and colour ignored


def test_object_tokens_separate_the_worlds_shapes_without_labels():
    """The outline tokens, fit by k-means on unlabelled renders, never put two shapes in one token."""
    cfg = EncoderConfig(colour_tokens=0)
    images, _ = generator.render_batch(0, 150)
    outline = tokenize(ObjectTokenizer.fit(torch.from_numpy(images), cfg, torch.Generator().manual_seed(0)),
                       torch.from_numpy(images))  # [150, n_patch]
    shapes_of_token: dict[int, set[str]] = {}
    for index in range(150):
        scene, _ = generator.scene_at(0, "batch", index)
        masks = generator.render(scene, 224)[1]
        for obj, mask in zip(scene.objects, masks):
            covered = torch.from_numpy(mask).float()[None, None]
            share = torch.nn.functional.avg_pool2d(covered, cfg.patch_size).flatten()  # [n_patch]
            for token in outline[index][(share >= 0.5) & (outline[index] < cfg.outline_tokens)].tolist():
                shapes_of_token.setdefault(token, set()).add(obj.shape)
    assert all(len(shapes) == 1 for shapes in shapes_of_token.values()), shapes_of_token
    assert set().union(*shapes_of_token.values()) == set(generator.SHAPES)


def test_colour_tokens_separate_the_worlds_colours_and_the_head_predicts_both_factors():
    """With colour_tokens, k-means on unlabelled renders gives each world colour a token of its own;
    a patch's token is (outline, colour), and the encoder's head scores the two factors apart."""
    cfg = EncoderConfig(colour_tokens=6)
    images, _ = generator.render_batch(0, 150)
    tokenizer = ObjectTokenizer.fit(torch.from_numpy(images), cfg, torch.Generator().manual_seed(0))
    tokens = tokenize(tokenizer, torch.from_numpy(images))  # [150, n_patch], background >= n_object_tokens
    colours_of_token: dict[int, set[str]] = {}
    for index in range(150):
        scene, _ = generator.scene_at(0, "batch", index)
        masks = generator.render(scene, 224)[1]
        for obj, mask in zip(scene.objects, masks):
            share = torch.nn.functional.avg_pool2d(torch.from_numpy(mask).float()[None, None], cfg.patch_size).flatten()
            for token in tokens[index][(share >= 0.5) & (tokens[index] < cfg.n_object_tokens)].tolist():
                colours_of_token.setdefault(token % cfg.colour_tokens, set()).add(obj.colour)
    assert sorted(map(sorted, colours_of_token.values())) == [[colour] for colour in sorted(generator.COLOURS)]

    model = TokenPredictionModel(EncoderConfig(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=1,
                                               intermediate_size=64, outline_tokens=3, colour_tokens=2,
                                               background_tokens=0))
    joint = torch.tensor([[0, 5, 6, 3]])  # (outline 0, colour 0), (2, 1), the one background token, (1, 1)
    outline, colour = model.factors(joint)
    assert outline.tolist() == [[0, 2, 3, 1]] and colour.tolist() == [[0, 1, 2, 1]]
    logits = torch.cat([torch.nn.functional.one_hot(outline, 4), torch.nn.functional.one_hot(colour, 3)], -1).float()
    assert model.predict(logits * 10).tolist() == joint.tolist()
    assert model.loss(logits * 10, joint) < 1e-3 < model.loss(logits * 10, torch.tensor([[1, 5, 6, 3]]))


def test_background_tokens_code_the_background_by_appearance_and_the_head_predicts_them():
    """With background_tokens, background patches take a token by their appearance (k-means of mean
    colour and spread, no labels): different tints get different tokens; the head scores it as a
    third factor, whose last class says "an object"."""
    cfg = EncoderConfig(background_tokens=12)
    images, _ = generator.render_batch(0, 150)
    tokens = tokenize(ObjectTokenizer.fit(torch.from_numpy(images), cfg, torch.Generator().manual_seed(0)),
                      torch.from_numpy(images))  # [150, n_patch]
    assert tokens.max() < cfg.n_object_tokens + 12
    tints_of_token: dict[int, set[str]] = {}  # each plain background's commonest token -> its tints
    for index in range(150):
        background = generator.scene_at(0, "batch", index)[0].background
        on_background = tokens[index][tokens[index] >= cfg.n_object_tokens]
        if background.kind == "plain":
            tints_of_token.setdefault(on_background.mode().values.item(), set()).add(background.tint)
    assert len(tints_of_token) >= 4 and len(set().union(*tints_of_token.values())) == 6

    model = TokenPredictionModel(EncoderConfig(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=1,
                                               intermediate_size=64, outline_tokens=3, colour_tokens=2,
                                               background_tokens=2))
    joint = torch.tensor([[0, 5, 6, 7, 3]])  # (outline 0, colour 0), (2, 1), background 0, background 1, (1, 1)
    outline, colour, appearance = model.factors(joint)
    assert outline.tolist() == [[0, 2, 3, 3, 1]] and colour.tolist() == [[0, 1, 2, 2, 1]]
    assert appearance.tolist() == [[2, 2, 0, 1, 2]]
    logits = torch.cat([torch.nn.functional.one_hot(part, size) for part, size in
                        zip((outline, colour, appearance), (4, 3, 3))], -1).float()
    assert model.predict(logits * 10).tolist() == joint.tolist()
    assert model.loss(logits * 10, joint) < 1e-3 < model.loss(logits * 10, torch.tensor([[0, 5, 7, 7, 3]]))


def test_kmeans_and_position_bias():
    points = torch.cat([torch.randn(50, 2) * 0.1 + centre for centre in (torch.tensor([0.0, 5.0]), torch.tensor([5.0, 0.0]))])
    centroids = kmeans(points, 2, torch.Generator().manual_seed(0))
    assert sorted(centroids.round().tolist()) == [[0.0, 5.0], [5.0, 0.0]]

    cfg = EncoderConfig(image_size=64, patch_size=16, hidden_size=32, num_hidden_layers=1, intermediate_size=64)
    model = TokenPredictionModel(cfg)
    table = model.encoder.shared_position_bias.relative_position_bias_table  # [7 * 7 + 3, heads]
    center = 3 * 7 + 3  # relative offset (0, 0)
    assert table[center].tolist() == [0.0] * 4
    assert torch.allclose(table[center + 1], torch.tensor([-2.0, -1.0, -0.5, 0.0]))  # one patch to the side
    assert torch.allclose(table[center + 7 + 1], -torch.tensor([2.0, 1.0, 0.5, 0.0]) * 2**0.5)  # diagonal


def test_image_encoder_trains_and_saves_like_beit(tmp_path):
    from transformers import BeitImageProcessor, BeitModel

    cfg = EncoderConfig(**TINY_ENCODER)
    scenes = {"image_size": 64}
    train_images, _ = generator.render_batch(0, cfg.n_images, scenes)
    eval_images, _ = generator.render_batch(1, cfg.n_eval_images, scenes)
    metrics = train_image_encoder(train_images, eval_images, tmp_path, cfg, progress=False)
    assert metrics["eval_token_loss"] < 0.5 * metrics["eval_token_loss_untrained"]
    assert metrics["eval_object_patches"] > 0 and 0.0 <= metrics["eval_token_accuracy"] <= 1.0

    model = BeitModel.from_pretrained(tmp_path)
    processor = BeitImageProcessor.from_pretrained(tmp_path)
    assert processor.do_center_crop is False and processor.do_resize is True
    assert processor.size == {"height": 64, "width": 64}
    assert model.config.use_mask_token and not model.config.use_mean_pooling
    image = generator.render(generator.scene_at(0, "eval", 0, scenes)[0], 64)[0]
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 64, 64)
    # the processor normalises exactly as training did
    assert torch.allclose(pixels, to_pixels(torch.from_numpy(np.array(image))[None]), atol=1e-5)
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state
    assert hidden.shape == (1, 1 + 16, 32)  # CLS + 4 x 4 patches

    encoders = pytest.importorskip("mmn.models.encoders")
    encoder = encoders.load_encoder("beit", str(tmp_path))
    assert (encoder.n_tokens, encoder.width, encoder.grid) == (16, 32, (4, 4))
    with torch.no_grad():
        assert torch.allclose(encoder(encoder.preprocess([image])), hidden[:, 1:], atol=1e-5)

    with pytest.raises(ValueError, match="train_images must be uint8"):
        train_image_encoder(train_images.astype(np.float32), eval_images, tmp_path / "bad", cfg, progress=False)


@pytest.mark.parametrize("vision_layers", [1, [1, 1, 1, 1]], ids=["vit", "resnet"])
def test_clip_trains_and_loads_through_open_clip_local_dir(tmp_path, vision_layers):
    import open_clip
    from PIL import Image

    cfg = ClipConfig(**{**TINY_CLIP, "vision_layers": vision_layers})
    images, captions = generator.render_batch(0, cfg.n_pairs)
    eval_images, eval_captions = generator.render_batch(1, cfg.n_eval_pairs)
    metrics = train_clip(images, captions, eval_images, eval_captions, tmp_path, cfg, progress=False,
                         swap_words={"shape": generator.SHAPES})
    assert metrics["chance"] == 0.1 and metrics["n_eval_pairs"] == 20
    assert set(metrics["swap_accuracy"]) == {"shape"} and 0.0 <= metrics["swap_accuracy"]["shape"] <= 1.0
    assert 0.0 <= metrics["i2t_top1"] <= 1.0
    # four steps move the temperature little from where it starts, CLIP's final 100 (clip.logit_scale_init)
    assert 99.0 < metrics["logit_scale"] < 100.5

    config = json.loads((tmp_path / "open_clip_config.json").read_text())
    assert set(config) == {"model_cfg", "preprocess_cfg"}
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(tmp_path))
    tokenizer = open_clip.get_tokenizer("local-dir:" + str(tmp_path))
    model.eval()
    assert type(model.visual).__name__ == ("ModifiedResNet" if isinstance(vision_layers, list) else "VisionTransformer")
    tokens = tokenizer(eval_captions[:3])
    assert tokens.shape == (3, 16)
    pixels = torch.stack([preprocess(Image.fromarray(image)) for image in eval_images[:3]])
    assert pixels.shape == (3, 3, 32, 32)
    with torch.no_grad():
        image_features, text_features = model.encode_image(pixels), model.encode_text(tokens)
    assert image_features.shape == text_features.shape == (3, 16)
    # the weights that were loaded are the trained ones: same logit scale
    assert math.isclose(model.logit_scale.detach().exp().item(), metrics["logit_scale"], rel_tol=1e-5)



def test_noun_texts_replace_a_seeded_share_of_captions_by_their_first_noun():
    captions = generator.render_batch(0, 400)[1]
    texts = noun_texts(captions, 0.25, seed=3)
    replaced = [(caption, text) for caption, text in zip(captions, texts) if text != caption]
    assert 70 <= len(replaced) <= 130  # a quarter of 400, give or take the draw
    assert all(text == generator.first_shape(caption) and text in generator.SHAPES for caption, text in replaced)
    assert noun_texts(captions, 0.25, seed=3) == texts and noun_texts(captions, 0.25, seed=4) != texts
    assert noun_texts(captions, 0.0, seed=3) == list(captions)


def test_noise_tokens_are_seeded_random_texts_between_start_and_end_tokens():
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer(context_length=16)
    rows = noise_tokens(500, tokenizer, torch.Generator().manual_seed(0), max_tokens=8)  # [500, 16]
    assert rows.shape == (500, 16)
    lengths = (rows != 0).sum(dim=1) - 2  # the words between start and end
    assert lengths.min() == 1 and lengths.max() == 8
    assert (rows[:, 0] == tokenizer.sot_token_id).all()
    assert (rows[torch.arange(500), lengths + 1] == tokenizer.eot_token_id).all()
    words = torch.cat([row[1 : length + 1] for row, length in zip(rows, lengths.tolist())])
    assert words.max() < tokenizer.sot_token_id and len(words.unique()) > 0.9 * len(words)  # the whole vocabulary
    assert torch.equal(noise_tokens(500, tokenizer, torch.Generator().manual_seed(0), max_tokens=8), rows)


TINY_WORLD = {
    "seed": 0,
    "scenes": {"image_size": 64, "text_grid": 4},
    "n_train": 12,
    "n_eval": 6,
    "lm": {**TINY_LM, "n_texts": 400, "n_eval_texts": 50, "steps": 5},
    "encoder": {**TINY_ENCODER, "steps": 3},
    "clip": TINY_CLIP,
}


def test_build_world_is_cached_and_rebuilt_on_change(tmp_path, caplog):
    out = tmp_path / "world"
    with caplog.at_level("WARNING", logger="mmn.world.build"):
        info = build_world(TINY_WORLD, out)
    # an LM trained for 5 steps does not read its context, and the build says so
    assert info["metrics"]["lm"]["context_copy_accuracy"] < 0.3 and "will hardly steer it" in caplog.text
    world_json = out / "world.json"
    assert world_json.is_file() and not (out / "world.json.tmp").exists()
    assert sorted(p.name for p in (out / "data" / "train").glob("*.tar")) == ["00000.tar"]
    assert (out / "data" / "coco" / "annotations" / "instances_val2017.json").is_file()
    for part in ("lm", "encoder", "clip"):
        assert (out / part / "world_part.json").is_file()
    assert set(info["timings_s"]) >= {"data", "lm", "encoder", "clip", "total"}
    assert info["config"] == resolve_world_config(TINY_WORLD)
    summary = world_summary(info)
    assert "perplexity" in summary and "chance 0.10" in summary and "swapped word: shape" in summary

    stamps = {p: p.stat().st_mtime_ns for p in [world_json, out / "lm" / "model.safetensors", out / "clip" / "open_clip_model.safetensors"]}
    again = build_world(TINY_WORLD, out)  # same config: nothing is redone
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["metrics"] == info["metrics"]

    changed = {**TINY_WORLD, "lm": {**TINY_WORLD["lm"], "steps": 6}}
    rebuilt = build_world(changed, out)
    assert world_json.stat().st_mtime_ns != stamps[world_json]
    assert rebuilt["config"]["lm"]["steps"] == 6
    assert json.loads(world_json.read_text())["config"]["lm"]["steps"] == 6


def test_shipped_parts_are_copied_only_for_their_own_key_and_hashes(tmp_path, caplog):
    trained = build_world(TINY_WORLD, tmp_path / "trained", shipped=False)
    assert trained["sources"] == {"lm": "trained", "encoder": "trained", "clip": "trained"}
    shipped = tmp_path / "shipped"
    manifest = ship_world(tmp_path / "trained", shipped)
    assert set(manifest["parts"]) == set(PARTS) and (shipped / MANIFEST_FILE).is_file()

    copied = build_world(TINY_WORLD, tmp_path / "copied", shipped=shipped)
    assert copied["sources"] == {"lm": "shipped", "encoder": "shipped", "clip": "shipped"}
    assert copied["metrics"] == trained["metrics"] and copied["config"] == trained["config"]
    assert not {"lm", "encoder", "clip", "render"} & set(copied["timings_s"])  # nothing trained or rendered
    for part in PARTS:
        for file in (tmp_path / "trained" / part).iterdir():
            assert (tmp_path / "copied" / part / file.name).read_bytes() == file.read_bytes()
    assert "lm shipped" in world_summary(copied)
    assert ship_world(tmp_path / "copied", tmp_path / "again")["parts"] == manifest["parts"]  # re-shipping a copy

    # another CLIP config trains the CLIP only; other scenes decide every part
    clip_changed = {**TINY_WORLD, "clip": {**TINY_CLIP, "steps": 5}}
    assert build_world(clip_changed, tmp_path / "clip", shipped=shipped)["sources"] == {
        "lm": "shipped", "encoder": "shipped", "clip": "trained"}
    scenes_changed = {**TINY_WORLD, "scenes": {"image_size": 64, "text_grid": 4, "size_scale": 1.2}}
    assert set(build_world(scenes_changed, tmp_path / "scenes", shipped=shipped)["sources"].values()) == {"trained"}
    # a scene key that only the LM's texts read (TEXT_CORPUS_KEYS) trains the LM only
    texts_changed = {**TINY_WORLD, "scenes": {**TINY_WORLD["scenes"], "grid_glossary": 0.5}}
    assert build_world(texts_changed, tmp_path / "texts", shipped=shipped)["sources"] == {
        "lm": "trained", "encoder": "shipped", "clip": "shipped"}

    # a shipped file that fails its hash is not used
    (shipped / "lm" / "model.safetensors").write_bytes(b"not the model")
    with caplog.at_level("WARNING", logger="mmn.world.build"):
        broken = build_world(TINY_WORLD, tmp_path / "broken", shipped=shipped)
    assert broken["sources"] == {"lm": "trained", "encoder": "shipped", "clip": "shipped"}
    assert "model.safetensors is missing or fails its sha256" in caplog.text
    retrained, first = broken["metrics"]["lm"], trained["metrics"]["lm"]
    assert (retrained["eval_loss"], retrained["greedy"]) == (first["eval_loss"], first["greedy"])  # the same LM again


def test_the_repository_ships_the_default_worlds_parts():
    """If this fails after a change to the builder or to the default world config, re-ship:
    python -m mmn.world world.shipped=false +ship=true"""
    resolved = resolve_world_config(None)
    for part in PARTS:
        assert shipped_part(resolved, part) is not None, f"mmn/world/shipped/{part} is not the default world's {part}"
    size = sum(file.stat().st_size for file in SHIPPED_DIR.rglob("*") if file.is_file())
    assert size <= 30 * 2**20, f"shipped parts hold {size / 2**20:.1f} MB; the repository may carry 30 MB"


def test_world_config_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="n_trian"):
        resolve_world_config({"n_trian": 10})
    with pytest.raises(ValueError, match="stepz"):
        resolve_world_config({"lm": {"stepz": 10}})
    with pytest.raises(ValueError, match="retrieval_pool"):
        resolve_world_config({"clip": {"n_eval_pairs": 50}})
    with pytest.raises(ValueError, match=r"clip.noise_texts=1.5 must be a share in \[0, 1\]"):
        resolve_world_config({"clip": {"noise_texts": 1.5}})
    with pytest.raises(ValueError, match=r"clip.logit_scale_init=500 must be in \[1, 100\]"):
        resolve_world_config({"clip": {"logit_scale_init": 500}})
    with pytest.raises(ValueError, match="size_scale"):
        resolve_world_config({"scenes": {"size_scale": 5.0}})
    with pytest.raises(ValueError, match="filler_noise=true needs grid texts with filler cells, got scenes.text_grid=7 "
                                         "and scenes.grid_fillers=0; set world.lm.filler_noise=false"):
        resolve_world_config({"scenes": {"grid_fillers": 0}})
    assert not resolve_world_config({"scenes": {"grid_fillers": 0}, "lm": {"filler_noise": False}})["lm"]["filler_noise"]
    assert not (tmp_path / "world.json").exists()


def test_scene_overrides_merge_into_the_default_scenes():
    defaults = resolve_world_config({})["scenes"]
    assert defaults["size_scale"] == 1.5 and defaults["size_spread"] == 0.4
    assert defaults["glyph_shift"] and defaults["text_grid"] == 7
    assert resolve_world_config({"scenes": {"order": "left_to_right"}})["scenes"] == {**defaults, "order": "left_to_right"}
    assert resolve_world_config({"scenes": {"size_scale": 1.0}})["scenes"] == {**defaults, "size_scale": 1.0}
    with pytest.raises(ValueError, match="text_grid=5 must be the encoder's patch grid"):
        resolve_world_config({"scenes": {"text_grid": 5}})
