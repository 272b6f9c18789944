"""CLIPScore with a tiny untrained open_clip CLIP saved in the world's layout and loaded through
open_clip's real "local-dir:" path: the score is 100 * max(cos, 0) of the model's own embeddings,
batching changes nothing, and a missing model says how to provide one."""

import mmn  # noqa: F401,I001  (torchvision shim before open_clip)

import json

import numpy as np
import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image
from safetensors.torch import save_file

from mmn.analysis.clipscore import ClipScorer, join_tokens
from mmn.world.clip import CONFIG_FILE, WEIGHTS_FILE, ClipConfig, open_clip_config, preprocess_images

CFG = ClipConfig(embed_dim=16, image_size=32, patch_size=16, vision_width=32, vision_layers=1, vision_head_width=16,
                 context_length=16, text_width=32, text_heads=2, text_layers=1)
TEXTS = ["a red circle", "two blue squares", "a green triangle next to a star", "a big heart", "small", "a square"]


@pytest.fixture(scope="module")
def saved_clip(tmp_path_factory):
    """(directory, the original model) of a random CLIP saved as mmn.world.clip saves the world's."""
    torch.manual_seed(0)
    config = open_clip_config(CFG)
    model = open_clip.CLIP(**config["model_cfg"]).eval()
    directory = tmp_path_factory.mktemp("clip")
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / WEIGHTS_FILE))
    return directory, model


@pytest.fixture(scope="module")
def arrays():
    return np.random.default_rng(0).integers(0, 256, size=(len(TEXTS), 40, 48, 3), dtype=np.uint8)  # [n, H, W, 3]


def cosines(model, arrays, texts):
    """cos(image, text) of each pair, by hand from the original model."""
    with torch.no_grad():
        image_emb = model.encode_image(preprocess_images(arrays, CFG))
        text_emb = model.encode_text(SimpleTokenizer(context_length=CFG.context_length)(texts))
    image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
    text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
    return (image_emb * text_emb).sum(dim=-1)  # [n]


def test_score_is_100_times_clamped_cosine(saved_clip, arrays):
    directory, model = saved_clip
    scorer = ClipScorer(directory, batch_size=4)
    assert not scorer.model.training
    images = [Image.fromarray(a) for a in arrays]
    scores = scorer.score(images, TEXTS)
    assert scores.shape == (len(TEXTS),) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, 100 * cosines(model, arrays, TEXTS).clamp(min=0), atol=1e-4, rtol=1e-4)
    one_at_a_time = torch.cat([scorer.score([image], [text]) for image, text in zip(images, TEXTS)])
    torch.testing.assert_close(scores, one_at_a_time, atol=1e-4, rtol=1e-4)
    assert scorer.score([], []).shape == (0,)


def test_negative_cosines_score_zero(saved_clip, arrays):
    """Flipping the text projection flips every cosine's sign, so each pair is clamped on one side."""
    directory, model = saved_clip
    scorer = ClipScorer(directory)
    images = [Image.fromarray(a) for a in arrays]
    cosine = cosines(model, arrays, TEXTS)
    assert (cosine.abs() > 1e-3).all()
    before = scorer.score(images, TEXTS)
    with torch.no_grad():
        scorer.model.text_projection.neg_()
    after = scorer.score(images, TEXTS)
    torch.testing.assert_close(before + after, 100 * cosine.abs(), atol=1e-4, rtol=1e-4)
    assert torch.equal(before == 0, cosine < 0) and torch.equal(after == 0, cosine > 0)


def test_token_lists_are_scored_as_comma_separated_strings(saved_clip, arrays):
    scorer = ClipScorer(saved_clip[0])
    assert join_tokens([" red", " circle", "Square "]) == "red, circle, Square"
    images = [Image.fromarray(a) for a in arrays[:2]]
    torch.testing.assert_close(scorer.score_tokens(images, [[" red", " circle"], [" two", "blue"]]),
                               scorer.score(images, ["red, circle", "two, blue"]))


def test_missing_model_says_how_to_provide_one(tmp_path, saved_clip):
    with pytest.raises(FileNotFoundError, match=r"no-such-clip not found\..*python -m mmn.world.*'ViT-B-32'"):
        ClipScorer(tmp_path / "no-such-clip")
    with pytest.raises(FileNotFoundError, match=f"no {CONFIG_FILE} in CLIP directory"):
        ClipScorer(tmp_path)
    (tmp_path / CONFIG_FILE).write_text((saved_clip[0] / CONFIG_FILE).read_text())  # a config but no weights
    with pytest.raises(RuntimeError, match="could not load the weights of directory"):
        ClipScorer(tmp_path)
    with pytest.raises(ValueError, match="no model named 'No-Such-CLIP'"):
        ClipScorer("No-Such-CLIP", pretrained="openai")
    with pytest.raises(RuntimeError, match="pretrained='no-such-tag'.*not a known tag"):  # fails before any download
        ClipScorer("ViT-B-32", pretrained="no-such-tag")
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        ClipScorer(saved_clip[0]).score([Image.new("RGB", (8, 8))] * 2, ["a"])
