"""Captions and targets: each image's greedy caption, its target token c, and p(c).

    pixels --captioner-->  prompt (image prompts in the captioning prompt, e.g. image prompts +
                           "A picture of")                               [batch, n_prompt, d_lm]
           --greedy-->     caption token ids
           --first noun--> c = the noun's first token, at caption index i
    inputs  = prompt ++ embed(caption[:i])                              [kept, n_prompt + max i, d_lm]
    y^c     = logit of c at position n_prompt + i - 1 (the one that predicts it); p(c) its softmax
              over the real vocabulary

Images whose caption yields no target are kept in the table with `skipped` set and the reason.
Rows of `inputs` are right-padded; causal attention keeps padding out of every target position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmn.analysis.attribution import target_probabilities
from mmn.models.captioner import Captioner
from mmn.models.targets import FirstNounFinder, find_target


@dataclass
class CaptionTargets:
    rows: list[dict]  # one per image: caption, noun, target token, p(c), skipped, skip_reason
    kept: list[int]  # indices (into rows) of the images with a target, in the order of the tensors below
    inputs_embeds: Tensor  # [kept, pos, d_lm]: prompt + caption up to c, right-padded
    target_positions: Tensor  # [kept]
    target_ids: Tensor  # [kept]
    n_prompt: int  # positions of the captioning prompt (the image prompts at Captioner.image_positions)


def untargeted_row(caption: str = "", skip_reason: str | None = None) -> dict:
    """A captions row without a target: skipped, with its reason (set once it is known). Images
    that could not be read at all get one as well, so the table keeps one kind of row."""
    return {"caption": caption, "noun": None, "target_id": -1, "target_token": None, "target_index": -1,
            "p_target": float("nan"), "skipped": True, "skip_reason": skip_reason}


@torch.no_grad()
def caption_targets(captioner: Captioner, pixels: Tensor, finder: FirstNounFinder,
                    max_new_tokens: int = 20) -> CaptionTargets:
    """Caption `pixels` ([batch, 3, H, W]) greedily and locate each caption's target token."""
    tokenizer = captioner.tokenizer
    prompt = captioner.input_embeddings(pixels)  # [batch, n_prompt, d_lm]
    n_prompt = prompt.shape[1]
    rows, kept, prefixes = [], [], []
    for b, ids in enumerate(captioner.lm.greedy(prompt, max_new_tokens)):
        caption = tokenizer.decode(ids, skip_special_tokens=True).strip()
        row = untargeted_row(caption) | {"caption_ids": ids}
        target = find_target(tokenizer, ids, finder) if caption else None
        if not caption:
            row["skip_reason"] = "empty caption"
        elif target is None:
            row["skip_reason"] = "no noun in caption"
        else:
            row.update(noun=target.noun, target_id=target.token_id, target_token=tokenizer.decode([target.token_id]),
                       target_index=target.token_index)
            kept.append(b)
            prefixes.append(ids[: target.token_index])
        rows.append(row)

    length = n_prompt + max((len(prefix) for prefix in prefixes), default=0)
    inputs = prompt.new_zeros(len(kept), length, prompt.shape[-1])  # [kept, pos, d_lm]
    for i, (b, prefix) in enumerate(zip(kept, prefixes)):
        inputs[i, :n_prompt] = prompt[b]
        if prefix:
            inputs[i, n_prompt : n_prompt + len(prefix)] = captioner.lm.embed_tokens(torch.tensor(prefix))
    target_positions = torch.tensor([n_prompt + len(prefix) - 1 for prefix in prefixes], dtype=torch.long)
    target_ids = torch.tensor([rows[b]["target_id"] for b in kept], dtype=torch.long)

    if kept:
        p_target = target_probabilities(captioner.lm, inputs, target_positions, target_ids)
        for b, p in zip(kept, p_target.tolist()):
            rows[b]["p_target"] = p
        finite = torch.isfinite(p_target)
        if not finite.all():  # a NaN p(c) would poison every score after it: skip, and say why
            for b in [b for b, ok in zip(kept, finite.tolist()) if not ok]:
                rows[b].update(skipped=True, skip_reason="non-finite p(c)")
            keep = finite.nonzero().flatten()
            kept = [kept[i] for i in keep.tolist()]
            inputs, target_positions, target_ids = inputs[keep], target_positions[keep], target_ids[keep]
    for b in kept:
        rows[b].update(skipped=False)
    return CaptionTargets(rows, kept, inputs, target_positions, target_ids, n_prompt)
