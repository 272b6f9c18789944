"""The LightningModule that trains the projection P of a captioner, LiMBeR's way.

Only P trains. The encoder and the LM are frozen: no gradients, no optimiser state, eval mode
always (so their dropout never runs). A training step:

    pixels --encoder (no grad)--> features           [batch, n_tok, d_enc]   (or cached features)
           --P (dropout 0.1)-->   image prompts      [batch, n_img, d_lm]
           ++ embed(caption ids)                      [batch, n_img + n_text, d_lm]
           --LM-->                logits of the positions that predict the caption tokens
    loss = cross-entropy on the caption tokens and their end-of-text only (image positions and
           padding ignored)
With `with_prompt` the captioning prompt stands around the image prompts (Captioner.around_image:
LiMBeR's "A picture of" after them, a chat prompt's text before and after them), unscored, and the
caption follows it, as when the captioner captions; LiMBeR trains without it.

Dropout masks are drawn from a generator seeded by (seed, step, rank), so a run resumed from a
checkpoint draws the same masks as an uninterrupted one. Checkpoints hold only P's weights
(plus optimiser and loop state), never the frozen 6B LM.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule

from mmn.models.captioner import Captioner
from mmn.models.targets import get_finder
from mmn.training.data import IGNORE_INDEX, first_noun_names_object

log = logging.getLogger(__name__)


def warmup_then_constant(warmup_steps: int):
    """LR multiplier: linear warm-up from 1/warmup to 1, then constant."""
    return lambda step: min(1.0, (step + 1) / max(1, warmup_steps))


def log_captions_table(loggers: Sequence, rows: Sequence[dict], step: int) -> None:
    """Validation captions with their images as a W&B table (key val/captions); other loggers
    get the numbers only (the captions are in the run's log)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            columns = ["step", "image", "caption", "first_noun", "objects", "correct", "reference"]
            data = [[step, wandb.Image(row["image"]), row["caption"], row["first_noun"], row["objects"],
                     row["correct"], row["reference"]] for row in rows]
            logger.log_table("val/captions", columns=columns, data=data, step=step)


class ProjectionTraining(LightningModule):
    def __init__(self, captioner: Captioner, *, lr: float, betas: Sequence[float], weight_decay: float,
                 warmup_steps: int, seed: int = 0, caption_tokens: int = 20, table_images: int = 16,
                 first_noun_finder: str = "lexicon", with_prompt: bool = False):
        super().__init__()
        self.captioner = captioner
        captioner.freeze()
        self.captioner.train()  # the projection's dropout on; Captioner keeps encoder and LM in eval
        self.lr, self.betas, self.weight_decay, self.warmup_steps = lr, tuple(betas), weight_decay, warmup_steps
        self.seed, self.caption_tokens, self.table_images = seed, caption_tokens, table_images
        self.with_prompt = with_prompt
        self.finder = get_finder(first_noun_finder)
        self.strict_loading = False  # checkpoints hold the projection only
        self._val_rows: list[dict] = []
        self.counts = {"skipped_images": 0, "truncated_captions": 0}

    @property
    def projection(self):
        return self.captioner.projection

    # ----- the loss --------------------------------------------------------------------

    def caption_loss(self, batch: dict) -> torch.Tensor:
        """Mean cross-entropy of the caption tokens given the image prompts (see the module doc)."""
        features = batch.get("features")
        if features is None:
            with torch.no_grad():
                features = self.captioner.encoder(batch["pixels"])  # [batch, n_tok, d_enc]
        prompts = self.projection(features)  # [batch, n_img, d_lm]
        if self.with_prompt:  # the captioning prompt around the image, unscored, as at inference
            prompts = self.captioner.around_image(prompts)  # [batch, n_prompt, d_lm]
        ids, labels = batch["input_ids"], batch["labels"]
        text = self.captioner.lm.embed_tokens(ids)  # [batch, n_text, d_lm]
        n_text = text.shape[1]
        inputs = torch.cat([prompts.to(text.dtype), text], dim=1)  # [batch, n_prompt + n_text, d_lm]
        # Position n_prompt - 1 + j predicts caption token j: keep the last n_text + 1 positions' logits
        # (not all n_prompt + n_text: GPT-J's vocabulary is 50k wide) and drop the final one.
        logits = self.captioner.lm.last_logits(inputs, n_text + 1)[:, :-1]  # [batch, n_text, vocab]
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX)

    def training_step(self, batch: dict, batch_index: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.seed * 1_000_003 + self.global_step * self.trainer.world_size + self.global_rank)
            loss = self.caption_loss(batch)
        self.counts["skipped_images"] += int(batch.get("n_skipped", 0))
        self.counts["truncated_captions"] += int(batch.get("n_truncated", 0))
        size = len(batch["input_ids"])
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log_dict({f"data/{name}": float(value) for name, value in self.counts.items()}, batch_size=size,
                      reduce_fx="max")
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.projection.parameters(), lr=self.lr, betas=self.betas,
                                      weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_constant(self.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ----- validation: loss, captions, first-noun accuracy ------------------------------

    def validation_step(self, batch: dict, batch_index: int) -> None:
        size = len(batch["input_ids"])
        self.log("val/loss", self.caption_loss(batch), batch_size=size, sync_dist=True)
        tokenizer = self.captioner.tokenizer
        for ids, categories, image, reference in zip(
            self.captioner.generate(batch["pixels"], self.caption_tokens), batch["categories"], batch["image"],
            batch["reference"],
        ):
            caption = tokenizer.decode(ids, skip_special_tokens=True).strip()
            noun = self.finder(caption)
            word = noun.word if noun else None
            self._val_rows.append({"image": image, "caption": caption, "reference": reference, "first_noun": word,
                                   "objects": ", ".join(categories),
                                   "correct": first_noun_names_object(word, categories)})

    def on_validation_epoch_start(self) -> None:
        self._val_rows = []

    def on_validation_epoch_end(self) -> None:
        rows, self._val_rows = self._val_rows, []
        if not rows:
            return
        accuracy = sum(row["correct"] for row in rows) / len(rows)
        # every rank captions the same images, so no reduction is needed
        self.log("val/first_noun_accuracy", accuracy)
        if self.trainer.is_global_zero:
            shown = rows[: self.table_images]
            log.info("step %d: first-noun accuracy %.3f on %d images; e.g. %s", self.global_step, accuracy, len(rows),
                     "; ".join(f"{row['caption']!r}" for row in shown[:3]))
            log_captions_table(self.loggers, shown, self.global_step)
        self.last_validation = {"step": self.global_step, "first_noun_accuracy": accuracy,
                                "captions": [{k: v for k, v in row.items() if k != "image"} for row in rows]}

    # ----- checkpoints: the projection only --------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {key: value for key, value in checkpoint["state_dict"].items()
                                    if key.startswith("captioner.projection.")}
        checkpoint["data_counts"] = dict(self.counts)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.counts.update(checkpoint.get("data_counts", {}))
