"""The captioner: image encoder + projection + language model + tokenizer + image processor.

This is the one object every analysis takes. An image becomes a caption so:

    image --encoder.preprocess--> pixels                     [batch, 3, H, W]
          --encoder-->            patch features             [batch, n_tok, d_enc]
          --projection-->         image prompts              [batch, n_img, d_lm]
          ++ embed("A picture of")                           [batch, n_img + n_text, d_lm]
          --LM, greedy-->         caption token ids

Encoder and LM are frozen and stay in eval mode whatever `train()` is called
with; `caption()` runs the projection in eval mode as well. (LiMBeR builds its
projection after calling `eval()` on the model, so its dropout stays active at
inference unless `eval()` is called again: captions and attributions then
change from run to run.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn

from mmn.models.encoders import ImageEncoder
from mmn.models.lm import LanguageModel
from mmn.models.projection import Projection

PROMPT = "A picture of"


def check_widths(encoder_width: int, projection: Projection, lm_width: int, *, where: str = "") -> None:
    """Raise a clear error if the encoder, projection and LM widths do not chain."""
    if projection.d_enc != encoder_width:
        raise ValueError(
            f"width mismatch{where}: the encoder yields {encoder_width}-d features but the projection "
            f"expects d_enc={projection.d_enc}"
        )
    if projection.d_lm != lm_width:
        raise ValueError(
            f"width mismatch{where}: the projection writes d_lm={projection.d_lm} but the LM's hidden "
            f"size is {lm_width}"
        )


class Captioner(nn.Module):
    def __init__(self, encoder: ImageEncoder, projection: Projection, lm: LanguageModel, prompt: str = PROMPT):
        super().__init__()
        check_widths(encoder.width, projection, lm.d_model)
        self.encoder = encoder
        self.projection = projection
        self.lm = lm
        # The HF model registered as a submodule, so .to(), .train()/.eval(), .parameters() and Lightning's
        # device moves reach the LM (LanguageModel is no nn.Module); forward passes go through self.lm.
        self.language_model = lm.model
        self.prompt = prompt
        prompt_ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        self.register_buffer("prompt_ids", torch.tensor(prompt_ids, dtype=torch.long), persistent=False)
        self.eval()  # training code opts in with .train(); analyses never need to remember eval()

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    @property
    def n_image_tokens(self) -> int:
        return self.projection.n_prompt_tokens(self.encoder.n_tokens)

    def freeze(self) -> Captioner:
        """No gradients for the encoder's and the LM's weights: only the projection trains."""
        self.encoder.requires_grad_(False)
        self.language_model.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> Captioner:
        super().train(mode)
        self.encoder.eval()  # frozen parts never leave eval mode
        self.language_model.eval()
        return self

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.encoder.preprocess(images).to(self.prompt_ids.device)  # [batch, 3, H, W]

    def image_prompts(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.encoder(pixels)  # [batch, n_tok, d_enc]
        return self.projection(features.to(next(self.projection.parameters()).dtype))  # [batch, n_img, d_lm]

    def input_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image prompts followed by the embedded text prompt: [batch, n_img + n_text, d_lm]."""
        prompts = self.image_prompts(pixels)
        text = self.lm.embed_tokens(self.prompt_ids.expand(len(pixels), -1))  # [batch, n_text, d_lm]
        return torch.cat([prompts.to(text.dtype), text], dim=1)

    @torch.no_grad()
    def generate(self, pixels: torch.Tensor, max_new_tokens: int = 20) -> list[list[int]]:
        """Greedy decoding; each caption's token ids, without the end-of-text token."""
        return self.lm.greedy(self.input_embeddings(pixels), max_new_tokens)

    @torch.no_grad()
    def caption(self, images: Sequence[Image.Image], max_new_tokens: int = 20, batch_size: int = 16) -> list[str]:
        """Greedy captions of PIL images, with the whole model in eval mode."""
        was_training = self.training
        self.eval()
        try:
            captions = []
            for start in range(0, len(images), batch_size):
                pixels = self.preprocess(images[start : start + batch_size])
                for ids in self.generate(pixels, max_new_tokens):
                    captions.append(self.tokenizer.decode(ids, skip_special_tokens=True).strip())
            return captions
        finally:
            self.train(was_training)
