"""CLIPScore between images and texts, with an open_clip CLIP (paper sections 3.1 and 3.2).

    scorer = ClipScorer(world_dir / "clip")                 # the Shapes world's CLIP, offline
    scorer = ClipScorer("ViT-B-32", pretrained="openai")    # real COCO use (downloads once)
    scores = scorer.score(images, ["a red circle", ...])    # [n]
    scores = scorer.score_tokens(images, [[" red", " circle", ...], ...])

CLIPScore here is 100 * max(cos(image embedding, text embedding), 0) per (image, text) pair: the
paper's numbers (19 to 28 in its Tables 1 and 2) fit that scale, not Hessel et al.'s 2.5 * max(cos, 0).
The paper scores decoded token lists (a neuron's decoding, an image prompt's nearest tokens) as
one comma-separated string, which `decoding.join_tokens` builds.

A local model is a directory in open_clip's hub layout (open_clip_config.json + weights, as
mmn.world.clip saves the world's CLIP at <world dir>/clip), read through open_clip's own
"local-dir:" loader. Either way the weights must load: a CLIP that open_clip would silently
initialise at random (a directory without weights) raises instead of scoring noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
from PIL import Image
from torch import Tensor

import mmn  # noqa: F401  (torchvision shim before open_clip)
from mmn.analysis.decoding import join_tokens

CONFIG_FILE = "open_clip_config.json"  # what a model folder in open_clip's hub layout holds

HOW_TO_PROVIDE = (
    "Pass a directory in open_clip's hub layout (open_clip_config.json + open_clip_model.safetensors), "
    "e.g. the Shapes world's <world dir>/clip that `python -m mmn.world` builds, or an open_clip model "
    "name with a pretrained tag, e.g. ClipScorer('ViT-B-32', pretrained='openai'), whose weights must "
    "be downloadable or already in the local cache."
)


class ClipScorer:
    """CLIPScore per (image, text) pair with a frozen open_clip CLIP in eval mode.

    model: a local directory in open_clip's hub layout when `pretrained` is None, otherwise an
    open_clip model name (open_clip.list_models()) and `pretrained` one of its tags
    (open_clip.list_pretrained_tags_by_model(model)).
    """

    def __init__(self, model: str | Path, pretrained: str | None = None, *, batch_size: int = 64,
                 device: str = "cpu"):
        if pretrained is None:
            path = Path(model).expanduser()
            if not path.is_dir():
                raise FileNotFoundError(f"ClipScorer: CLIP directory {path} not found. {HOW_TO_PROVIDE}")
            if not (path / CONFIG_FILE).is_file():
                raise FileNotFoundError(f"ClipScorer: no {CONFIG_FILE} in CLIP directory {path}. {HOW_TO_PROVIDE}")
            name, source = "local-dir:" + str(path), f"directory {path}"
        else:
            if str(model).replace("/", "-") not in open_clip.list_models():  # open_clip reads ViT-B/32 as ViT-B-32
                raise ValueError(f"ClipScorer: open_clip knows no model named {str(model)!r} (see "
                                 f"open_clip.list_models()). {HOW_TO_PROVIDE}")
            name, source = str(model), f"open_clip model {str(model)!r} with pretrained={pretrained!r}"
        try:
            # unlike create_model_and_transforms, this raises when no weights load
            self.model, self.preprocess = open_clip.create_model_from_pretrained(name, pretrained=pretrained,
                                                                                 device=device)
        except RuntimeError as error:  # no weights in the directory, an unknown tag, a failed download
            raise RuntimeError(f"ClipScorer: could not load the weights of {source}: {error}. "
                               f"{HOW_TO_PROVIDE}") from error
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        self.batch_size, self.device = batch_size, device

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> Tensor:
        """100 * max(cos, 0) between each image and its text.  -> [n] float32 on the CPU"""
        if len(images) != len(texts):
            raise ValueError(f"ClipScorer.score: {len(images)} images but {len(texts)} texts")
        scores = [torch.zeros(0)]
        for start in range(0, len(images), self.batch_size):
            end = start + self.batch_size
            pixels = torch.stack([self.preprocess(image) for image in images[start:end]])  # [batch, 3, H, W]
            tokens = self.tokenizer(list(texts[start:end]))                                # [batch, context]
            image_emb = self.model.encode_image(pixels.to(self.device), normalize=True)   # [batch, embed]
            text_emb = self.model.encode_text(tokens.to(self.device), normalize=True)     # [batch, embed]
            cosine = (image_emb * text_emb).sum(dim=-1)                                   # [batch]
            scores.append(100 * cosine.clamp(min=0).float().cpu())
        return torch.cat(scores)

    def score_tokens(self, images: Sequence[Image.Image], token_lists: Sequence[Sequence[str]]) -> Tensor:
        """CLIPScore of each image against its token list, scored as one comma-separated string.  -> [n]"""
        return self.score(images, [join_tokens(tokens) for tokens in token_lists])
