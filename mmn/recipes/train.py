"""`python train.py`: build what is missing, then train the projection with Lightning.

    train(cfg)
      1. the run folder (mmn.recipes.run.Run) and the Shapes world, when the config points into it
      2. the captioner (encoder + fresh projection + LM); widths checked before the LM loads
      3. data (mmn.training.data), module (mmn.training.module), loggers, checkpoints, Trainer
      4. fit (or resume from `ckpt_path`), validate the final projection, write
         run_dir/projection/ (what analyses load) and run_dir/training_summary.json

Run directory layout:
    checkpoints/last.ckpt      full Lightning checkpoint (projection, optimiser, step): resume from it
    projection/                projection.safetensors + projection.json (with the training provenance)
    training_summary.json      steps, time, steps/s, validation metrics and captions
    wandb/ or csv/             the logger's files
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from mmn.config import digest, files_fingerprint
from mmn.data.cc3m import load_pairs
from mmn.models.captioner import Captioner
from mmn.recipes.loggers import finish, make_loggers
from mmn.recipes.run import Run, ensure_world, load_captioner, uses_world
from mmn.training.callbacks import ProjectionExport, TrainingClock
from mmn.training.data import CaptionData
from mmn.training.module import ProjectionTraining

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- trainer settings

def resolve_precision(precision: str, accelerator: str) -> str:
    """`auto`: bf16-mixed where the hardware computes in bf16 natively, else 32-true."""
    if precision != "auto":
        return precision
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    if accelerator == "cpu" and torch.cpu._is_avx512_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def n_processes(trainer_cfg: DictConfig) -> int:
    """Training processes: devices per node (-1/"auto": all GPUs, or 1 on CPU) x nodes."""
    devices = trainer_cfg.devices
    if devices in (-1, "auto"):
        devices = torch.cuda.device_count() if trainer_cfg.accelerator in ("gpu", "cuda") else 1
    elif isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        devices = len(devices)
    return max(1, int(devices)) * int(trainer_cfg.num_nodes)


def accumulation(training: DictConfig, processes: int) -> int:
    """Micro-batches per optimiser step so that batch_size x accumulation x processes = global_batch_size."""
    per_step = training.batch_size * processes
    if training.global_batch_size % per_step:
        raise ValueError(f"training.global_batch_size={training.global_batch_size} is not a multiple of "
                         f"training.batch_size={training.batch_size} x {processes} process(es) = {per_step}")
    return training.global_batch_size // per_step


def check_context_length(captioner: Captioner, training: DictConfig) -> None:
    """Image prompts (with the captioning prompt around them when training.with_prompt) + caption
    (training) and the captioning prompt + caption (validation) must fit the LM's context; say so
    before the first step, not as an index error inside it."""
    context = captioner.lm.context_length
    n_image = captioner.n_image_tokens
    text_prompt = captioner.n_prompt - n_image  # the prompt's text positions, before and after the image
    needed = n_image + max(training.max_caption_tokens + 1 + (text_prompt if training.with_prompt else 0),
                           text_prompt + training.caption_tokens)
    if context is not None and needed > context:
        raise ValueError(f"{n_image} image prompts + up to {needed - n_image} prompt and caption tokens = {needed} "
                         f"positions, but the LM's context is {context}: lower training.max_caption_tokens / "
                         f"training.caption_tokens or use an encoder with fewer tokens")


def make_strategy(name: str, captioner: Captioner):
    """Lightning strategy by name; FSDP shards the frozen LM block by block."""
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        # use_orig_params: the root unit mixes the trainable projection with frozen weights
        return FSDPStrategy(auto_wrap_policy={type(captioner.lm.blocks[0])}, use_orig_params=True)
    return name


# ----------------------------------------------------------------------------- inputs

def feature_cache_folder(cfg: DictConfig) -> str | None:
    """Cache folder keyed by everything the features depend on: the encoder and the training pairs,
    by configuration and, where they are local, by the files they hold."""
    if not cfg.training.cache_features:
        return None
    key = digest(cfg.encoder, cfg.data.train, cfg.training.cache_dtype,
                 files_fingerprint(cfg.encoder.name_or_path), files_fingerprint(cfg.data.train.source))
    return str(Path(cfg.paths.cache_dir) / "features" / f"{Path(str(cfg.encoder.name_or_path)).name}-{key}")


# ----------------------------------------------------------------------------- train

def train(cfg: DictConfig) -> dict:
    """Train the projection as `cfg` says; returns (and writes) the run's summary."""
    run = Run(cfg, images=False)
    run_dir = run.dir
    if cfg.ckpt_path is not None and not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint file")
    if cfg.data.train.source is None:
        raise ValueError(f"data.train.source is not set for data={cfg.data}: name the training pairs")
    if uses_world(cfg):
        ensure_world(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    training = cfg.training
    accumulate = accumulation(training, n_processes(cfg.trainer))

    captioner = load_captioner(cfg)  # raises on a width mismatch before the LM's weights load
    check_context_length(captioner, training)
    module = ProjectionTraining(captioner, lr=training.lr, betas=training.betas, weight_decay=training.weight_decay,
                                warmup_steps=training.warmup_steps, seed=cfg.seed,
                                caption_tokens=training.caption_tokens, table_images=training.table_images,
                                with_prompt=training.with_prompt)
    data = CaptionData(
        open_pairs=lambda: load_pairs(cfg.data.train.source, format=cfg.data.train.format),
        eval_root=cfg.data.eval.root, eval_split=cfg.data.eval.split, encoder=captioner.encoder,
        tokenizer=captioner.tokenizer, seed=cfg.seed, cache_folder=feature_cache_folder(cfg),
        batch_size=training.batch_size, max_caption_tokens=training.max_caption_tokens, val_images=training.val_images,
        shuffle_buffer=training.shuffle_buffer, num_workers=training.num_workers)

    provenance = {"encoder": OmegaConf.to_container(cfg.encoder, resolve=True),
                  "lm": OmegaConf.to_container(cfg.lm, resolve=True),
                  "data": OmegaConf.to_container(cfg.data.train, resolve=True)}
    clock = TrainingClock()
    callbacks = [
        ModelCheckpoint(dirpath=run_dir / "checkpoints", every_n_train_steps=training.checkpoint_every_n_steps,
                        save_top_k=0, save_last=True),
        ProjectionExport(run_dir / "projection", provenance),
        clock,
    ]
    loggers = make_loggers(cfg, run_dir)
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes,
        strategy=make_strategy(cfg.trainer.strategy, captioner),
        precision=resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator),
        max_steps=training.max_steps, accumulate_grad_batches=accumulate,
        gradient_clip_val=training.gradient_clip, val_check_interval=training.val_every_n_steps,
        check_val_every_n_epoch=None, num_sanity_val_steps=0, use_distributed_sampler=False,
        logger=loggers or False, callbacks=callbacks, log_every_n_steps=training.log_every_n_steps,
        default_root_dir=str(run_dir), deterministic=False,
    )
    trainer.fit(module, datamodule=data, ckpt_path=cfg.ckpt_path)
    validation = getattr(module, "last_validation", None)
    if validation is None or validation["step"] != trainer.global_step:
        trainer.validate(module, datamodule=data, verbose=False)
        validation = module.last_validation

    weights = torch.cat([p.detach().flatten() for p in module.projection.parameters()])
    # DDP keeps every rank's projection identical; this checks it
    rank_difference = (trainer.strategy.all_gather(weights) - weights).abs().max().item() if trainer.world_size > 1 else 0.0
    summary = {
        "steps": trainer.global_step,
        "training_seconds": round(clock.seconds, 2),
        "steps_per_second": round(clock.steps / clock.seconds, 3) if clock.seconds else None,
        "steps_this_run": clock.steps,
        "val/loss": float(trainer.callback_metrics.get("val/loss", float("nan"))),
        "val/first_noun_accuracy": validation["first_noun_accuracy"],
        "skipped_images": module.counts["skipped_images"] + (data.cache.state.get("skipped", 0) if data.cache else 0),
        "truncated_captions": module.counts["truncated_captions"],
        "precision": trainer.precision,
        "processes": trainer.world_size,
        "max_rank_difference": rank_difference,
        "feature_cache": data.cache.folder.as_posix() if data.cache else None,
        "projection": str(run_dir / "projection"),
        "checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
        "captions": validation["captions"],
    }
    finish(loggers)
    if trainer.is_global_zero:
        (run_dir / "training_summary.json").write_text(json.dumps(summary, indent=2))
        log.info("trained %d steps in %.0f s (%.2f steps/s); first-noun accuracy %.3f; projection -> %s",
                 summary["steps"], clock.seconds, summary["steps_per_second"] or 0, summary["val/first_noun_accuracy"],
                 summary["projection"])
    return summary
