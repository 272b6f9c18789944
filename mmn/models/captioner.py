"""The captioner: image encoder + projection + language model + tokenizer + image processor.

This is the one object every analysis takes. An image becomes a caption so:

    image --encoder.preprocess--> pixels                     [batch, 3, H, W]
          --encoder-->            patch features             [batch, n_tok, d_enc]
          --projection-->         image prompts              [batch, n_img, d_lm]
          embed(prefix) ++ image prompts ++ embed(suffix)    [batch, n_prefix + n_img + n_suffix, d_lm]
          --LM, greedy-->         caption token ids

The captioning prompt is text around the image: `prompt` marks the image's place with `IMAGE`
("<image>"). Without the mark the image prompts come first, as in LiMBeR, whose prompt is the
default "A picture of" (prefix empty, suffix "A picture of"). A vision-language model's chat
prompt puts them inside, e.g. LLaVA 1.5's "USER: <image>\\nDescribe the image. ASSISTANT:"
(mmn.models.llava). Every analysis reads where the image prompts sit from `image_positions`
(a slice of the input positions), never from position 0.

Tokenising the prompt (`split_prompt`): a tokenizer that has the mark as one token of its own (a
vision-language model's, such as LLaVA's) tokenises the whole prompt, special tokens included,
exactly as the model's processor does (Llama's BOS first), and the ids are split at the mark. A
text-only LM's tokenizer has no such token: its two sides are tokenised apart, without special
tokens (LiMBeR feeds no BOS before or after the image).

Encoder and LM are frozen and stay in eval mode whatever `train()` is called with; `caption()`
runs the projection in eval mode as well. (LiMBeR builds its projection after calling `eval()` on
the model, so its dropout stays active at inference unless `eval()` is called again: captions and
attributions then change from run to run.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn
from transformers import PreTrainedTokenizerBase

from mmn.models.encoders import ImageEncoder
from mmn.models.lm import LanguageModel
from mmn.models.projection import Projection

PROMPT = "A picture of"
IMAGE = "<image>"  # where the image prompts go in a prompt


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


def split_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> tuple[list[int], list[int]]:
    """The token ids of the prompt before and after its image (see the module doc for the rule)."""
    marks = prompt.count(IMAGE)
    if marks > 1:
        raise ValueError(f"prompt {prompt!r} marks {marks} images with {IMAGE!r}; a captioner takes one")
    image_id = tokenizer.get_vocab().get(IMAGE)
    if image_id is None:  # a text-only LM: no special tokens, as LiMBeR
        before, after = prompt.split(IMAGE) if marks else ("", prompt)
        return [tokenizer(text, add_special_tokens=False)["input_ids"] if text else [] for text in (before, after)]
    ids = tokenizer(prompt)["input_ids"]  # as the model's processor tokenises it, BOS included
    if ids.count(image_id) != 1:
        raise ValueError(f"prompt {prompt!r} must hold the image token {IMAGE!r} once for this tokenizer "
                         f"(a vision-language model's, which has it); it holds it {ids.count(image_id)} times")
    index = ids.index(image_id)
    return ids[:index], ids[index + 1 :]


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
        prefix, suffix = split_prompt(lm.tokenizer, prompt)
        self.register_buffer("prefix_ids", torch.tensor(prefix, dtype=torch.long), persistent=False)  # [n_prefix]
        self.register_buffer("suffix_ids", torch.tensor(suffix, dtype=torch.long), persistent=False)  # [n_suffix]
        self.eval()  # training code opts in with .train(); analyses never need to remember eval()

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    @property
    def n_image_tokens(self) -> int:
        return self.projection.n_prompt_tokens(self.encoder.n_tokens)

    @property
    def image_positions(self) -> slice:
        """Where the image prompts sit among the input positions: image prompt i is position
        image_positions.start + i (0 + i in LiMBeR's layout)."""
        start = len(self.prefix_ids)
        return slice(start, start + self.n_image_tokens)

    @property
    def n_prompt(self) -> int:
        """Positions of the whole captioning prompt: prefix, image prompts and suffix."""
        return len(self.prefix_ids) + self.n_image_tokens + len(self.suffix_ids)

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
        return self.encoder.preprocess(images).to(self.prefix_ids.device)  # [batch, 3, H, W]

    def image_prompts(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.encoder(pixels)  # [batch, n_tok, d_enc]
        return self.projection(features.to(next(self.projection.parameters()).dtype))  # [batch, n_img, d_lm]

    def around_image(self, prompts: torch.Tensor) -> torch.Tensor:
        """The captioning prompt with `prompts` [batch, n_img, d_lm] in the image's place:
        embed(prefix) ++ prompts ++ embed(suffix)  -> [batch, n_prompt, d_lm]."""
        batch = len(prompts)
        prefix = self.lm.embed_tokens(self.prefix_ids.expand(batch, -1))  # [batch, n_prefix, d_lm]
        suffix = self.lm.embed_tokens(self.suffix_ids.expand(batch, -1))  # [batch, n_suffix, d_lm]
        return torch.cat([prefix, prompts.to(suffix.dtype), suffix], dim=1)

    def input_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """The captioning prompt of each image: [batch, n_prompt, d_lm], the image prompts at
        `image_positions`."""
        return self.around_image(self.image_prompts(pixels))

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
