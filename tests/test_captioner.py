"""The captioner on tiny models: prompt layout, greedy captions, eval mode, width checks, config loading."""

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from mmn.models.captioner import PROMPT, Captioner
from mmn.models.encoders import load_encoder
from mmn.models.lm import LanguageModel
from mmn.models.projection import Projection
from mmn.recipes.run import load_captioner


@pytest.fixture(scope="module")
def parts(tmp_path_factory, save_tiny_captioner_lm, save_tiny_beit):
    root = tmp_path_factory.mktemp("captioner")
    save_tiny_captioner_lm(root / "lm")
    save_tiny_beit(root / "encoder")
    return root


@pytest.fixture()
def captioner(parts, captioner_sizes):
    encoder = load_encoder("beit", parts / "encoder")
    lm = LanguageModel.from_pretrained(parts / "lm")
    return Captioner(encoder, Projection(captioner_sizes.d_enc, captioner_sizes.d_lm), lm)


def images(n):
    return [Image.new("RGB", (40 + 10 * i, 30), (30 * i, 200, 90)) for i in range(n)]


def test_input_is_image_prompts_then_a_picture_of(captioner, captioner_sizes):
    pixels = captioner.preprocess(images(2))
    embeds = captioner.input_embeddings(pixels)
    prompt_ids = captioner.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert captioner.n_image_tokens == 16  # 4 x 4 patches
    assert embeds.shape == (2, 16 + len(prompt_ids), captioner_sizes.d_lm)
    torch.testing.assert_close(embeds[:, :16], captioner.image_prompts(pixels))
    torch.testing.assert_close(embeds[0, 16:], captioner.lm.embedding.weight[prompt_ids])


def test_greedy_captions_match_huggingface_generate(captioner):
    captioner.eval()
    pixels = captioner.preprocess(images(3))
    ours = captioner.generate(pixels, max_new_tokens=8)
    reference = captioner.language_model.generate(
        inputs_embeds=captioner.input_embeddings(pixels), do_sample=False, max_new_tokens=8,
        pad_token_id=captioner.tokenizer.eos_token_id,
    )
    eos = captioner.tokenizer.eos_token_id
    for row, ids in zip(reference.tolist(), ours):
        expected = row[: row.index(eos)] if eos in row else row
        assert ids == expected


def test_unembedding_rows_beyond_the_vocabulary_are_never_generated(tmp_path, parts, save_tiny_captioner_lm,
                                                                    captioner_sizes):
    save_tiny_captioner_lm(tmp_path / "lm", extra_rows=20)
    lm = LanguageModel.from_pretrained(tmp_path / "lm")
    with torch.no_grad():
        lm.unembed.weight[len(lm.tokenizer):] = 0
        lm.unembed.bias[len(lm.tokenizer):] = 1e4  # every padding row outscores every real token
    captioner = Captioner(load_encoder("beit", parts / "encoder"),
                          Projection(captioner_sizes.d_enc, captioner_sizes.d_lm), lm)
    for ids in captioner.generate(captioner.preprocess(images(2)), max_new_tokens=5):
        assert len(ids) == 5 and max(ids) < len(lm.tokenizer)


def test_batched_captions_equal_one_at_a_time(captioner):
    batch = captioner.caption(images(3), max_new_tokens=6, batch_size=3)
    single = [captioner.caption([image], max_new_tokens=6)[0] for image in images(3)]
    assert batch == single and all(isinstance(c, str) for c in batch)


def test_captioning_always_runs_in_eval_mode(captioner):
    captioner.projection.dropout.p = 0.5  # a dropout that would change the prompts if left on
    captioner.train()
    assert not captioner.encoder.training and not captioner.language_model.training
    first = captioner.caption(images(2), max_new_tokens=6)
    second = captioner.caption(images(2), max_new_tokens=6)
    assert first == second
    assert captioner.projection.training  # caption() restores the mode it found


def test_width_mismatch_is_a_clear_error(parts, captioner_sizes):
    encoder = load_encoder("beit", parts / "encoder")
    lm = LanguageModel.from_pretrained(parts / "lm")
    with pytest.raises(ValueError, match="encoder yields 24-d features but the projection expects d_enc=16"):
        Captioner(encoder, Projection(16, captioner_sizes.d_lm), lm)
    with pytest.raises(ValueError, match="projection writes d_lm=48 but the LM's hidden size is 32"):
        Captioner(encoder, Projection(captioner_sizes.d_enc, 48), lm)


def config(parts, checkpoint=None):
    return OmegaConf.create({
        "encoder": {"kind": "beit", "name_or_path": str(parts / "encoder"), "pretrained": True},
        "lm": {"name_or_path": str(parts / "lm"), "dtype": "float32", "revision": None},
        "projection": {"kind": "linear", "n_out_tokens": 1, "dropout": 0.1, "checkpoint": checkpoint},
    })


def test_from_config_loads_a_saved_projection_and_limber_checkpoints(parts, tmp_path, captioner_sizes):
    d_enc, d_lm = captioner_sizes.d_enc, captioner_sizes.d_lm
    saved = Projection(d_enc, d_lm)
    saved.save(tmp_path / "projection")
    captioner = load_captioner(config(parts, str(tmp_path / "projection")))
    torch.testing.assert_close(captioner.projection.linear.weight, saved.linear.weight)

    limber = torch.nn.Linear(d_enc, d_lm)
    torch.save(limber.state_dict(), tmp_path / "proj.ckpt")
    captioner = load_captioner(config(parts, str(tmp_path / "proj.ckpt")))
    torch.testing.assert_close(captioner.projection.linear.weight, limber.weight)
    assert not captioner.training


def test_from_config_checks_widths_before_loading_the_lm(parts, tmp_path, monkeypatch, captioner_sizes):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the LM's weights were loaded before the width check")

    monkeypatch.setattr(LanguageModel, "from_pretrained", must_not_load)
    torch.save(torch.nn.Linear(captioner_sizes.d_enc, 64).state_dict(), tmp_path / "proj.ckpt")
    with pytest.raises(ValueError, match=r"proj\.ckpt.*d_lm=64 but the LM's hidden size is 32"):
        load_captioner(config(parts, str(tmp_path / "proj.ckpt")))
