"""Image encoders on random-initialised models: token shapes, geometry of preprocessing, loading."""

from __future__ import annotations

from mmn.models.encoders import ImageEncoder, load_encoder  # noqa: I001  (mmn first: torchvision shim)

import json

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file
from transformers import BeitConfig, BeitForMaskedImageModeling, BeitImageProcessor, BeitImageProcessorPil, BeitModel

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)


def random_images(n: int, size=(200, 160), seed: int = 0) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def striped_image(width: int, height: int) -> PIL.Image.Image:
    """Black, with a white stripe along the right edge and a white stripe along the top edge."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, -10:] = 255
    array[:10, :] = 255
    return PIL.Image.fromarray(array)


def assert_frozen(encoder: ImageEncoder):
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()  # a parent module switching to train mode must not wake the encoder up
    assert not encoder.training and not encoder.model.training


# ----- BEiT ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def beit_dir(tmp_path_factory):
    """A small BEiT saved as the Shapes world saves its encoder (224 px, patch 16 -> 196 tokens)."""
    config = BeitConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        image_size=224, patch_size=16, use_mean_pooling=False, use_relative_position_bias=True)
    directory = tmp_path_factory.mktemp("beit")
    torch.manual_seed(0)
    model = BeitModel(config)
    with torch.no_grad():  # a final norm that is not the identity, so dropping it would show
        model.layernorm.weight.uniform_(0.5, 2.0)
        model.layernorm.bias.uniform_(-1.0, 1.0)
    model.save_pretrained(directory)
    # bilinear and ImageNet statistics: values a loader that ignored the saved file would not use
    BeitImageProcessor(do_center_crop=False, size={"height": 224, "width": 224}, resample=2,
                       image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(directory)
    return directory


def test_beit_tokens_are_patch_states_after_final_norm(beit_dir):
    encoder = load_encoder("beit", beit_dir)
    assert (encoder.n_tokens, encoder.width, encoder.grid, encoder.image_size) == (196, 32, (14, 14), (224, 224))
    assert encoder.resize_mode == "squash" and encoder.final_norm_applied
    assert_frozen(encoder)

    pixels = encoder.preprocess(random_images(2))
    assert pixels.shape == (2, 3, 224, 224) and pixels.dtype == torch.float32
    with torch.no_grad():
        tokens = encoder(pixels)
    assert tokens.shape == (2, 196, 32)

    reference = BeitModel.from_pretrained(beit_dir).eval()
    captured = {}  # the input of the final norm = output of the last block
    reference.layernorm.register_forward_pre_hook(lambda m, args: captured.__setitem__("last", args[0]))
    with torch.no_grad():
        expected = reference(pixel_values=pixels).last_hidden_state[:, 1:]
    torch.testing.assert_close(tokens, expected)
    # ... and that is the final LayerNorm (trained weights) of the last block's patch states.
    torch.testing.assert_close(tokens, reference.layernorm(captured["last"])[:, 1:])
    assert not torch.allclose(tokens, captured["last"][:, 1:], atol=1e-2)


def test_beit_preprocessing_matches_processor_and_squashes(beit_dir):
    encoder = load_encoder("beit", beit_dir)
    images = random_images(2, size=(300, 150))
    processor = BeitImageProcessorPil.from_pretrained(beit_dir)
    expected = processor(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(encoder.preprocess(images), expected, rtol=0, atol=1e-5)

    # 300 x 150 -> 224 x 224 with no crop: the right-edge and top-edge stripes are still there.
    pixels = encoder.preprocess([striped_image(300, 150)])[0]  # [3, 224, 224]
    white = (1.0 - 0.485) / 0.229
    black = (0.0 - 0.485) / 0.229
    assert pixels[0, 112, 223].item() == pytest.approx(white, abs=1e-4)  # right edge, middle row
    assert pixels[0, 112, 200].item() == pytest.approx(black, abs=1e-4)
    assert pixels[0, 2, 112].item() == pytest.approx(white, abs=1e-4)  # top edge
    assert pixels[0, 40, 112].item() == pytest.approx(black, abs=1e-4)
    # 10 of 300 columns -> about 7.5 of 224; 10 of 150 rows -> about 15 of 224
    assert 6 <= (pixels[0, 112] > 0).sum().item() <= 9
    assert 14 <= (pixels[0, :, 112] > 0).sum().item() <= 16


def test_beit_random_init_and_errors(beit_dir, tmp_path):
    loaded = load_encoder("beit", beit_dir)
    random_from_dir = load_encoder("beit", beit_dir, pretrained=False)
    assert random_from_dir.n_tokens == 196
    # The saved final norm was set away from its initial value; a random model has the initial one.
    assert torch.equal(random_from_dir.model.layernorm.weight, torch.ones(32))
    assert loaded.model.layernorm.weight.min() >= 0.5 and not torch.equal(loaded.model.layernorm.weight, torch.ones(32))
    tiny = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                image_size=64, patch_size=16, use_mean_pooling=False)
    from_dict = load_encoder("beit", tiny, pretrained=False)
    assert (from_dict.n_tokens, from_dict.width, from_dict.grid) == (16, 16, (4, 4))
    assert from_dict.encode(random_images(1)).shape == (1, 16, 16)
    with pytest.raises(FileNotFoundError, match="no_beit_here"):
        load_encoder("beit", tmp_path / "no_beit_here")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_encoder("beit", tmp_path)
    with pytest.raises(ValueError, match="resize_mode 'crop'"):
        load_encoder("beit", beit_dir, resize_mode="crop")


def test_beit_from_a_pt22k_style_checkpoint_is_what_limber_saw(tmp_path):
    """A BeitForMaskedImageModeling checkpoint with the default use_mean_pooling=True, like pt22k:
    the trained final norm belongs to the MIM head, and BeitModel (LiMBeR's loader) leaves it out."""
    config = BeitConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                        image_size=32, patch_size=16, use_mask_token=True, use_shared_relative_position_bias=True,
                        vocab_size=50)
    mim = BeitForMaskedImageModeling(config).eval()
    with torch.no_grad():
        mim.layernorm.weight.uniform_(0.5, 2.0)
    mim.save_pretrained(tmp_path)
    encoder = load_encoder("beit", tmp_path)
    assert not encoder.final_norm_applied and encoder.n_tokens == 4
    pixels = encoder.preprocess(random_images(2))
    with torch.no_grad():
        last_block = mim.beit(pixel_values=pixels).last_hidden_state  # Identity final norm in MIM's BeitModel
        torch.testing.assert_close(encoder(pixels), last_block[:, 1:])
        assert not torch.allclose(encoder(pixels), mim.layernorm(last_block)[:, 1:], atol=1e-2)


def test_unknown_kind():
    with pytest.raises(ValueError, match="'dino'.*beit"):
        load_encoder("dino", "whatever")


# ----- open_clip ----------------------------------------------------------------------------


def test_clip_rn50x16_grid_tokens():
    encoder = load_encoder("open_clip", "RN50x16", pretrained=False)
    assert (encoder.n_tokens, encoder.width, encoder.grid, encoder.image_size) == (144, 3072, (12, 12), (384, 384))
    assert encoder.resize_mode == "center_crop"
    assert_frozen(encoder)
    torch.testing.assert_close(encoder.pixel_mean.flatten(), torch.tensor(OPENAI_MEAN))

    captured = {}
    encoder.model.layer4.register_forward_hook(lambda m, i, o: captured.__setitem__("map", o))
    with torch.no_grad():
        tokens = encoder(encoder.preprocess(random_images(1)))
    assert tokens.shape == (1, 144, 3072)
    feature_map = captured["map"]  # [1, 3072, 12, 12], the input of attnpool
    torch.testing.assert_close(tokens[0, 5 * 12 + 7], feature_map[0, :, 5, 7])  # row-major order


def test_clip_preprocessing_is_open_clips_own():
    import open_clip

    encoder = load_encoder("open_clip", "RN50", pretrained=False)
    assert (encoder.n_tokens, encoder.width, encoder.grid) == (49, 2048, (7, 7))
    image = random_images(1, size=(300, 180))[0]
    transform = open_clip.image_transform(224, is_train=False)
    torch.testing.assert_close(encoder.preprocess([image])[0], transform(image), rtol=0, atol=1e-5)
    # Resize + centre crop: the stripe on the right edge of a wide image is cut away.
    pixels = encoder.preprocess([striped_image(400, 200)])[0]
    assert (pixels[0, 112] > 0).sum().item() == 0


def test_clip_vit_from_local_dir(tmp_path):
    import open_clip

    config = {
        "model_cfg": {
            "embed_dim": 16,
            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
            "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
        },
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "squash"},
    }
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    model = open_clip.create_model("local-dir:" + str(tmp_path), load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "open_clip_model.safetensors")

    encoder = load_encoder("open_clip", str(tmp_path))
    assert (encoder.n_tokens, encoder.width, encoder.grid, encoder.image_size) == (16, 32, (4, 4), (32, 32))
    assert encoder.resize_mode == "squash"
    torch.testing.assert_close(encoder.model.conv1.weight, model.visual.conv1.weight, rtol=0, atol=0)
    pixels = encoder.preprocess(random_images(2))
    tokens = encoder.encode(random_images(2))
    assert tokens.shape == (2, 16, 32)
    # Patch tokens = last block output after ln_post, class token dropped.
    with torch.no_grad():
        x = model.visual._embeds(pixels)
        expected = model.visual.ln_post(model.visual.transformer(x))[:, 1:]
    torch.testing.assert_close(tokens, expected)
    with pytest.raises(FileNotFoundError, match="no_clip_here"):
        load_encoder("open_clip", str(tmp_path / "no_clip_here"))


# ----- timm ---------------------------------------------------------------------------------


def test_timm_nf_resnet50_is_one_pooled_token():
    import timm.data

    encoder = load_encoder("timm", "nf_resnet50", pretrained=False)
    assert (encoder.n_tokens, encoder.width, encoder.grid) == (1, 2048, None)
    assert_frozen(encoder)
    images = random_images(2, size=(300, 200))
    pixels = encoder.preprocess(images)
    # Same pixels as timm's own eval transform from the resolved data config.
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=encoder.model))
    torch.testing.assert_close(pixels[1], transform(images[1]), rtol=0, atol=1e-5)
    captured = {}
    encoder.model.final_act.register_forward_hook(lambda m, i, o: captured.__setitem__("map", o))
    with torch.no_grad():
        tokens = encoder(pixels)
    feature_map = captured["map"]  # [2, 2048, 8, 8], the last feature map
    assert feature_map.shape == (2, 2048, 8, 8)
    assert tokens.shape == (2, 1, 2048)
    torch.testing.assert_close(tokens[:, 0], feature_map.mean(dim=(2, 3)))


def test_timm_vit_patch_tokens():
    encoder = load_encoder("timm", "vit_tiny_patch16_224", pretrained=False)
    assert (encoder.n_tokens, encoder.width, encoder.grid, encoder.image_size) == (196, 192, (14, 14), (224, 224))
    pixels = encoder.preprocess(random_images(2))
    with torch.no_grad():
        tokens = encoder(pixels)
        features = encoder.model.forward_features(pixels)  # [2, 1 + 196, 192]
    assert tokens.shape == (2, 196, 192)
    torch.testing.assert_close(tokens, features[:, 1:])
    squashed = load_encoder("timm", "vit_tiny_patch16_224", pretrained=False, resize_mode="squash")
    assert squashed.preprocess([striped_image(400, 200)])[0, 0, 112, 223] > 0  # right edge kept


# ----- CLIP vision tower (Hugging Face; LLaVA 1.5's) ------------------------------------------


def test_clip_vision_tokens_are_a_hidden_layers_patches_and_preprocessing_is_clips(tmp_path):
    """A CLIPModel folder (text tower and all, as openai/clip-vit-large-patch14-336 is published):
    hidden state -2 without CLS, or several layers side by side; the processor's resize + centre
    crop; errors that name the layer, a padding processor and a folder that is no CLIP."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPImageProcessorPil, CLIPModel

    config = CLIPConfig(vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3,
                                       "num_attention_heads": 2, "image_size": 56, "patch_size": 14},
                        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "vocab_size": 50}, projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(
        tmp_path / "clip")
    encoder = load_encoder("clip_vision", tmp_path / "clip")  # feature_layer -2, LLaVA 1.5's
    assert (encoder.n_tokens, encoder.width, encoder.grid, encoder.resize_mode) == (16, 16, (4, 4), "center_crop")
    assert_frozen(encoder)
    images = random_images(2, size=(90, 60))
    pixels = encoder.preprocess(images)
    expected = CLIPImageProcessorPil.from_pretrained(tmp_path / "clip")(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        hidden = encoder.model(pixel_values=pixels, output_hidden_states=True).hidden_states  # 1 + 3 layers
        tokens = encoder(pixels)
        both = load_encoder("clip_vision", tmp_path / "clip", feature_layer=[-2, -1])(pixels)
    assert len(hidden) == 4 and tokens.shape == (2, 16, 16)
    torch.testing.assert_close(tokens, hidden[2][:, 1:])  # the second-to-last block's output, CLS dropped
    torch.testing.assert_close(both, torch.cat([hidden[2][:, 1:], hidden[3][:, 1:]], dim=-1))
    assert load_encoder("clip_vision", tmp_path / "clip", resize_mode="squash").resize_mode == "squash"

    with pytest.raises(ValueError, match="feature_layer=4: the CLIP vision tower has hidden states -4..3"):
        load_encoder("clip_vision", tmp_path / "clip", feature_layer=4)
    CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                       do_pad=True).save_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match="pads images to a square"):
        load_encoder("clip_vision", tmp_path / "clip")
    BeitModel(BeitConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         image_size=32, patch_size=16)).save_pretrained(tmp_path / "beit")
    with pytest.raises(ValueError, match="holds a 'beit' model, not a CLIP vision tower"):
        load_encoder("clip_vision", tmp_path / "beit")
