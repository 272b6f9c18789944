"""The optimisation loop the world's three frozen parts share (text LM, image encoder, CLIP):
AdamW under a cosine schedule with warm-up, global-norm clipping at 1.0, a progress bar with the
loss, and batches drawn as epochs of a seeded permutation."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Indices of batch_size examples out of n, endlessly: each epoch a new permutation (drawn from
    `generator` when the previous one cannot fill a whole batch)."""
    order, position = None, 0
    while True:
        if order is None or position + batch_size > len(order):
            order, position = torch.randperm(n, generator=generator), 0
        yield order[position : position + batch_size]
        position += batch_size


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator, loss_of: Callable[[object], Tensor],
        steps: int, warmup_steps: int, desc: str, progress: bool = True,
        after_step: Callable[[], None] | None = None) -> None:
    """`steps` optimiser steps of loss_of(next batch) on `model` (in training mode), with the
    cosine schedule; after_step runs after each step (e.g. CLIP's temperature clamp)."""
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup_steps, steps)
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for _, batch in zip(bar, batches):
        loss = loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
