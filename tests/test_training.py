"""Projection training on a tiny Shapes world (conf/world/tiny.yaml): the loss, frozen parts,
exact resume, DDP on CPU, offline W&B files, a sweep, and bad input."""

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from wandb_offline import run_info

from mmn.config import CONFIG_DIR, compose
from mmn.models.projection import Projection
from mmn.recipes.run import load_captioner
from mmn.recipes.train import accumulation, feature_cache_folder, train
from mmn.training.data import IGNORE_INDEX, CaptionTokenizer, batches_already_drawn, collate
from mmn.training.module import ProjectionTraining

REPO = CONFIG_DIR.parent


def train_run(overrides, run_dir, *extra):
    return train(compose([*overrides, f"paths.output_dir={run_dir}", *extra]))


def run_train_script(args, cwd, timeout=300):
    """`python train.py ARGS` in a fresh process (as a user runs it); returns the finished process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


@pytest.fixture(scope="module")
def module(tiny_world):
    captioner = load_captioner(compose(tiny_world))
    return ProjectionTraining(captioner, lr=8e-4, betas=(0.9, 0.95), weight_decay=0.0, warmup_steps=2)


def caption_batch(module, captions, max_tokens=16):
    tokenize = CaptionTokenizer(module.captioner.tokenizer, max_tokens)
    encoder = module.captioner.encoder
    n_tok = (encoder.image_size[0] // 16) * (encoder.image_size[1] // 16)  # tiny world: 64 px, 16-px patches
    items = [{"features": torch.randn(n_tok, encoder.width), "input_ids": tokenize(c)[0]} for c in captions]
    return items, collate(items, tokenize.eos)


def test_loss_is_cross_entropy_of_caption_tokens_only(module):
    module.eval()  # no dropout: the same prompts in both computations
    items, batch = caption_batch(module, ["a red circle", "a small blue square next to a green star"])
    loss = module.caption_loss(batch)

    # by hand: the full sequence through the LM; caption token j is predicted at position n_img - 1 + j
    lm = module.captioner.language_model
    total, count = 0.0, 0
    for row, item in enumerate(items):
        prompts = module.projection(item["features"][None])
        n_img = prompts.shape[1]
        ids = torch.tensor(item["input_ids"])  # the caption and one end-of-text
        inputs = torch.cat([prompts, module.captioner.lm.embed_tokens(ids[None])], dim=1)
        logits = lm(inputs_embeds=inputs).logits[0, n_img - 1 : n_img - 1 + len(ids)]
        total += F.cross_entropy(logits, ids, reduction="sum").item()
        count += len(ids)
    assert loss.item() == pytest.approx(total / count, rel=1e-5)

    short = len(items[0]["input_ids"])
    eos = module.captioner.tokenizer.eos_token_id
    assert batch["labels"][0, short - 1] == eos and (batch["labels"][0, short:] == IGNORE_INDEX).all()
    # what follows the first end-of-text does not count, whatever it is
    scrambled = {**batch, "input_ids": batch["input_ids"].clone()}
    scrambled["input_ids"][0, short:] = 7
    assert module.caption_loss(scrambled).item() == pytest.approx(loss.item(), rel=1e-6)
    # and the loss does depend on the caption tokens
    changed = {**batch, "input_ids": batch["input_ids"].clone(), "labels": batch["labels"].clone()}
    changed["input_ids"][0, 1] = changed["labels"][0, 1] = 7
    assert module.caption_loss(changed).item() != pytest.approx(loss.item(), rel=1e-4)


def test_with_prompt_puts_the_captioning_prompt_between_image_and_caption_unscored(module):
    module.eval()
    items, batch = caption_batch(module, ["a red circle", "two stars"])
    prompt_ids = module.captioner.suffix_ids  # LiMBeR's layout: no prefix, "A picture of" after the image
    assert len(module.captioner.prefix_ids) == 0
    lm = module.captioner.language_model
    total, count = 0.0, 0
    for item in items:
        prompts = module.projection(item["features"][None])
        ids = torch.tensor(item["input_ids"])
        text = torch.cat([prompt_ids, ids])  # "A picture of" + caption + end-of-text
        inputs = torch.cat([prompts, module.captioner.lm.embed_tokens(text[None])], dim=1)
        first = prompts.shape[1] + len(prompt_ids) - 1  # the position that predicts caption token 0
        logits = lm(inputs_embeds=inputs).logits[0, first : first + len(ids)]
        total += F.cross_entropy(logits, ids, reduction="sum").item()
        count += len(ids)
    module.with_prompt = True
    try:
        with_prompt = module.caption_loss(batch).item()
    finally:
        module.with_prompt = False
    assert with_prompt == pytest.approx(total / count, rel=1e-5)
    assert with_prompt != pytest.approx(module.caption_loss(batch).item(), rel=1e-4)


def test_only_the_projection_trains(module):
    module.train()
    captioner = module.captioner
    assert captioner.projection.training
    assert not captioner.encoder.training and not captioner.language_model.training  # their dropout stays off
    for parameter in module.parameters():
        parameter.grad = None
    _, batch = caption_batch(module, ["a red circle", "two stars"])
    module.caption_loss(batch).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in captioner.projection.parameters())
    frozen = [*captioner.encoder.parameters(), *captioner.language_model.parameters()]
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)
    optimizer = module.configure_optimizers()["optimizer"]
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in captioner.projection.parameters()}


def test_resumed_workers_skip_their_share_of_batches():
    # batches 0..6 came from workers 0,1,2,0,1,2,0
    assert [batches_already_drawn(7, w, 3) for w in range(3)] == [3, 2, 2]
    assert [batches_already_drawn(0, w, 3) for w in range(3)] == [0, 0, 0]
    assert batches_already_drawn(5, 0, 1) == 5


def test_feature_cache_follows_the_encoder_files_not_only_its_path(tmp_path):
    # A Shapes world rebuilt in place keeps its paths but holds a new encoder and new shards.
    encoder, shards = tmp_path / "encoder", tmp_path / "train"
    encoder.mkdir(), shards.mkdir()
    (encoder / "model.safetensors").write_bytes(b"weights, first build")
    (shards / "shard-000000.tar").write_bytes(b"pairs")
    cfg = compose([f"encoder.name_or_path={encoder}", f"data.train.source={shards}"])
    first = feature_cache_folder(cfg)
    assert feature_cache_folder(cfg) == first
    (encoder / "model.safetensors").write_bytes(b"weights, second build")  # new size and time
    assert feature_cache_folder(cfg) != first
    assert feature_cache_folder(compose([f"data.train.source={shards}", "training.cache_features=false"])) is None


def logged_losses(run_dir) -> dict[int, float]:
    with open(Path(run_dir) / "csv" / "metrics.csv") as f:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")}


@pytest.mark.parametrize("cached", [True, False], ids=["feature-cache", "streamed-shards"])
def test_resume_continues_exactly(tiny_world, tmp_path, cached):
    common = [*tiny_world, "logger=csv", f"training.cache_features={cached}", "training.max_steps=6"]
    whole = train_run(common, tmp_path / "whole")
    first = train_run(common, tmp_path / "killed", "training.max_steps=4")  # stands in for a run killed after step 4
    checkpoint = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 4
    resumed = train_run(common, tmp_path / "resumed", f"ckpt_path={checkpoint}")

    assert first["steps"] == 4 and resumed["steps"] == whole["steps"] == 6 and resumed["steps_this_run"] == 2
    expected, got = logged_losses(tmp_path / "whole"), logged_losses(tmp_path / "resumed")
    assert set(got) == {4, 5} and len(expected) == 6
    assert [got[s] for s in (4, 5)] == [expected[s] for s in (4, 5)]  # bit for bit
    assert [logged_losses(tmp_path / "killed")[s] for s in range(4)] == [expected[s] for s in range(4)]
    weights = [Projection.load(tmp_path / run / "projection").linear.weight for run in ("whole", "resumed", "killed")]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_ddp_on_cpu_keeps_ranks_in_sync(tiny_world, tmp_path):
    run_dir = tmp_path / "ddp"
    run_train_script([*tiny_world, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                      "training.global_batch_size=8", "logger=csv", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    summary = json.loads((run_dir / "training_summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 6
    assert summary["max_rank_difference"] == 0.0  # every rank ends with the same projection
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6


def offline_run_file(run_dir) -> Path:
    files = list(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return files[0]


def test_wandb_offline_run_holds_metrics_and_captions_table(tiny_world, tmp_path):
    summary = train_run(tiny_world, tmp_path)
    info = run_info(offline_run_file(tmp_path))
    rows = info["history"]
    losses = [row["train/loss"] for row in rows if "train/loss" in row]
    assert len(losses) == 6 and all(loss > 0 for loss in losses)
    accuracies = [row["val/first_noun_accuracy"] for row in rows if "val/first_noun_accuracy" in row]
    assert accuracies[-1] == summary["val/first_noun_accuracy"] and len(accuracies) == 2  # steps 3 and 6
    tables = [row for row in rows if row.get("val/captions/_type") == "table-file"]
    assert len(tables) == 2
    table = json.loads((offline_run_file(tmp_path).parent / "files" / tables[-1]["val/captions/path"]).read_text())
    assert table["columns"][:3] == ["step", "image", "caption"]
    assert [row[2] for row in table["data"]] == [c["caption"] for c in summary["captions"][:2]]


def test_sweep_over_encoders_is_one_wandb_group(tiny_world, tmp_path):
    sweep = tmp_path / "sweep"
    run_train_script(["-m", "encoder=shapes,vit_random", *tiny_world, f"hydra.sweep.dir={sweep}"], cwd=tmp_path,
                     timeout=600)
    runs = [run_info(offline_run_file(sweep / job)) for job in ("0", "1")]
    assert runs[0]["group"] == runs[1]["group"] == "sweep"
    assert "encoder=shapes" in runs[0]["name"] and "encoder=vit_random" in runs[1]["name"]
    widths = [json.loads((sweep / job / "projection" / "projection.json").read_text())["d_enc"] for job in ("0", "1")]
    assert widths == [32, 192]  # the tiny world's encoder, ViT-Tiny: each its own projection


def test_corrupt_images_and_long_captions_are_counted(tiny_world, tmp_path):
    cfg = compose(tiny_world)
    shard = next(Path(cfg.data.train.source).glob("*.tar"))
    broken = tmp_path / "shards"
    broken.mkdir()
    with tarfile.open(shard) as source, tarfile.open(broken / "00000.tar", "w") as target:
        corrupted = 0
        for member in source.getmembers():
            payload = source.extractfile(member).read()
            if member.name.endswith(".jpg") and corrupted < 2:
                payload, corrupted = payload[:50], corrupted + 1  # truncated JPEG
            member.size = len(payload)
            target.addfile(member, io.BytesIO(payload))
    for cached in (True, False):
        summary = train_run(tiny_world, tmp_path / f"run-{cached}", "logger=none", f"data.train.source={broken}",
                            f"training.cache_features={cached}", "training.max_caption_tokens=3")
        assert summary["steps"] == 6
        assert summary["skipped_images"] == 2
        assert summary["truncated_captions"] > 0  # every Shapes caption is longer than 3 tokens


def test_width_mismatch_fails_before_the_first_step(tiny_world, tmp_path):
    wrong = tmp_path / "projection"
    Projection(d_enc=48, d_lm=64).save(wrong)  # the tiny world's encoder is 32 wide
    with pytest.raises(ValueError, match="width mismatch.*32-d features.*d_enc=48"):
        train_run(tiny_world, tmp_path / "run", f"projection.checkpoint={wrong}", "logger=none")
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(FileNotFoundError, match="ckpt_path=.*no such checkpoint"):
        train_run(tiny_world, tmp_path / "run", f"ckpt_path={tmp_path / 'missing.ckpt'}", "logger=none")


def test_global_batch_must_divide_into_micro_batches():
    from omegaconf import OmegaConf


    assert accumulation(OmegaConf.create({"global_batch_size": 256, "batch_size": 16}), 4) == 4
    with pytest.raises(ValueError, match="global_batch_size=100 is not a multiple of.*batch_size=16 x 4"):
        accumulation(OmegaConf.create({"global_batch_size": 100, "batch_size": 16}), 4)


def test_llavas_projector_trains_and_is_what_analyses_load(tiny_world, tmp_path):
    """`python train.py projection=mlp2x_gelu`: the loss reaches both of its layers and nothing
    else (LLaVA's stage 1: only the projector trains), and the run's folder loads back as it."""
    captioner = load_captioner(compose([*tiny_world, "projection=mlp2x_gelu"]))
    module = ProjectionTraining(captioner, lr=8e-4, betas=(0.9, 0.95), weight_decay=0.0, warmup_steps=2)
    _, batch = caption_batch(module, ["a red circle", "two stars"])
    module.caption_loss(batch).backward()
    for layer in (captioner.projection.linear, captioner.projection.linear_2):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    optimised = {id(p) for group in module.configure_optimizers()["optimizer"].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in captioner.projection.parameters()}
    summary = train_run(tiny_world, tmp_path, "projection=mlp2x_gelu", "logger=none")
    trained = Projection.load(tmp_path / "projection")
    assert summary["steps"] > 0 and trained.kind == "mlp2x_gelu" and trained.dropout_p == 0.0
