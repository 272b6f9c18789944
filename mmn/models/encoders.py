"""Frozen image encoders that turn images into a sequence of feature tokens.

Every encoder is an `ImageEncoder`: `preprocess(list of PIL images) -> [batch, 3, H, W]`,
then `forward(pixels) -> [batch, n_tokens, width]`. Those tokens are what the projection
maps to image prompts, one prompt per token (or k prompts from the pooled vector).

    kind        what the tokens are                                   real preset (LiMBeR)
    beit        BeitModel last_hidden_state without the CLS token       microsoft/beit-large-patch16-224-pt22k:
                                                                        196 x 1024 (14 x 14 grid), 224 px squashed
    open_clip   grid tokens of the visual tower: ModifiedResNet          RN50x16 (openai): 144 x 3072 (12 x 12),
                feature map before attnpool; ViT patch tokens           384 px, resize + centre crop
    timm        CNNs (NF-ResNet50): pooled pre-logits vector, 1 token;  nf_resnet50: 1 x 2048
                ViTs: patch tokens of forward_features
    clip_vision HF CLIPVisionModel: patch tokens of one hidden layer     openai/clip-vit-large-patch14-336 (LLaVA
                (default -2), CLS dropped, as LLaVA 1.5 reads them      1.5's tower): 576 x 1024 (24 x 24), 336 px,
                                                                        resize + centre crop

Pixel geometry. Patch-level analyses (receptive fields vs. object masks) need to know
which source pixels each token saw, so each encoder states its geometry:
`resize_mode="squash"` resizes the whole image to `image_size` (no crop; BEiT, as LiMBeR
and the paper), `resize_mode="center_crop"` resizes the shorter side to `resize_shortest`
and cuts the centre `image_size` window (open_clip's and timm's own eval transforms).
`load_encoder(..., resize_mode="squash")` forces squashing for any encoder. Token order is
row-major over `grid` (rows, cols): token i sits at row i // cols, column i % cols.

BEiT and the final layer norm. `BeitModel.last_hidden_state` is `model.layernorm` applied to
the last block's output, and `model.layernorm` is a LayerNorm only when
`config.use_mean_pooling` is False (it is `Identity` otherwise). The pre-trained-only
checkpoints (`*-pt22k`) are `BeitForMaskedImageModeling` checkpoints: their trained final norm
is the masked-image-modeling head's top-level `layernorm.*`, which `BeitModel` does not load
(an "unexpected key"). Hugging Face's conversion script built them from a default
`BeitConfig()` (use_mean_pooling True) and loaded them strictly without any `beit.layernorm`,
and the published config of microsoft/beit-base-patch16-224-pt22k says
`"use_mean_pooling": true`. So for the pt22k checkpoints `BeitModel`'s layernorm is the
identity and LiMBeR's features are the last block's output with no final norm (for the
large checkpoint this follows from the same conversion; its files are out of reach here). Whatever the checkpoint
holds, this encoder returns exactly what LiMBeR fed its projection,
`BeitModel.from_pretrained(path).last_hidden_state[:, 1:]`, and says in `final_norm_applied`
whether a LayerNorm was part of it; it warns when that LayerNorm was freshly initialised
because the checkpoint did not hold it. A BEiT saved with `BeitModel.save_pretrained` and
use_mean_pooling False (the Shapes world's) keeps its trained final norm.

All encoders are frozen (requires_grad False) and stay in eval mode even when a parent module
calls `.train()`: dropout or stochastic depth in a frozen encoder would only add noise.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch import Tensor, nn

from mmn.files import looks_like_local_path

log = logging.getLogger(__name__)

KINDS = ("beit", "open_clip", "timm", "clip_vision")
RESIZE_MODES = ("squash", "center_crop")
# the file a local model folder of each kind holds (timm loads models by name only)
CONFIG_FILES = {"beit": "config.json", "open_clip": "open_clip_config.json", "clip_vision": "config.json"}
DEFAULT_NAMES = {
    "beit": "microsoft/beit-large-patch16-224-pt22k",
    "open_clip": "RN50x16",
    "timm": "nf_resnet50",
    "clip_vision": "openai/clip-vit-large-patch14-336",
}
PIL_RESAMPLE = {
    "nearest": PIL.Image.Resampling.NEAREST,
    "bilinear": PIL.Image.Resampling.BILINEAR,
    "bicubic": PIL.Image.Resampling.BICUBIC,
    "lanczos": PIL.Image.Resampling.LANCZOS,
}


def _pil_resample(value) -> PIL.Image.Resampling:
    """'bicubic' / PILImageResampling.BICUBIC / 3 -> PIL.Image.Resampling.BICUBIC."""
    if isinstance(value, str):
        if value not in PIL_RESAMPLE:
            raise ValueError(f"unknown interpolation {value!r}: use one of {sorted(PIL_RESAMPLE)}")
        return PIL_RESAMPLE[value]
    return PIL.Image.Resampling(int(value))


class ImageEncoder(nn.Module):
    """Base class: PIL images -> pixels -> [batch, n_tokens, width] feature tokens, frozen."""

    n_tokens: int  # image prompt tokens it yields (196 for BEiT-L/16 at 224)
    width: int  # feature width d_enc (1024 for BEiT-Large)
    grid: tuple[int, int] | None  # (rows, cols) of the token grid; None for pooled encoders
    image_size: tuple[int, int]  # (H, W) that preprocess produces

    def __init__(
        self,
        model: nn.Module,
        *,
        n_tokens: int,
        width: int,
        grid: tuple[int, int] | None,
        image_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        resample=PIL.Image.Resampling.BICUBIC,
        resize_mode: str = "squash",
        resize_shortest: int | None = None,
        rescale_factor: float = 1 / 255,
    ):
        super().__init__()
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize_mode {resize_mode!r}: use one of {RESIZE_MODES}")
        self.model = model
        self.n_tokens = n_tokens
        self.width = width
        self.grid = grid
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.resample = _pil_resample(resample)
        self.resize_mode = resize_mode
        # center_crop: shorter side goes to this length first (default: no margin to crop on that side)
        self.resize_shortest = resize_shortest or max(self.image_size)
        self.rescale_factor = rescale_factor
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1), persistent=False)
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.train(False)

    def extra_repr(self) -> str:
        return (
            f"n_tokens={self.n_tokens}, width={self.width}, grid={self.grid}, image_size={self.image_size}, "
            f"resize_mode={self.resize_mode!r}"
        )

    def train(self, mode: bool = True) -> ImageEncoder:
        # A frozen encoder stays in eval mode whatever its parent asks for.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ----- pixels -----------------------------------------------------------------------

    def resize(self, image: PIL.Image.Image) -> PIL.Image.Image:
        """The geometric part of preprocessing: PIL image -> PIL image of size `image_size`."""
        height, width = self.image_size
        if self.resize_mode == "squash":
            return image.resize((width, height), resample=self.resample)
        # center_crop, as torchvision's Resize(int) + CenterCrop that open_clip and timm use.
        src_w, src_h = image.size
        short = self.resize_shortest
        if src_w <= src_h:
            new_w, new_h = short, int(short * src_h / src_w)
        else:
            new_w, new_h = int(short * src_w / src_h), short
        image = image.resize((new_w, new_h), resample=self.resample)
        left = int(round((new_w - width) / 2.0))
        top = int(round((new_h - height) / 2.0))
        return image.crop((left, top, left + width, top + height))

    def preprocess(self, images: Sequence[PIL.Image.Image]) -> Tensor:
        """RGB, resize (see `resize_mode`), scale to [0, 1], normalise -> [batch, 3, H, W] float32."""
        if isinstance(images, PIL.Image.Image):
            images = [images]
        batch = []
        for image in images:
            array = np.asarray(self.resize(image.convert("RGB")), dtype=np.float32) * self.rescale_factor
            batch.append(torch.from_numpy(array).permute(2, 0, 1))  # [3, H, W]
        pixels = torch.stack(batch)  # [batch, 3, H, W]
        return (pixels - self.pixel_mean.cpu()) / self.pixel_std.cpu()

    def _check_pixels(self, pixels: Tensor) -> Tensor:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be [batch, 3, H, W], got shape {tuple(pixels.shape)}")
        return pixels.to(device=self.device, dtype=self.dtype)

    def encode(self, images: Sequence[PIL.Image.Image]) -> Tensor:
        """preprocess + forward: PIL images -> [batch, n_tokens, width]."""
        with torch.no_grad():
            return self(self.preprocess(images))

    def forward(self, pixels: Tensor) -> Tensor:
        raise NotImplementedError


# ----- BEiT (Hugging Face) ----------------------------------------------------------------


class BeitEncoder(ImageEncoder):
    """HF `BeitModel`: last_hidden_state without the CLS token. BEiT-Large/16 @224: [batch, 196, 1024]."""

    def __init__(self, model: nn.Module, processor=None, *, resize_mode: str = "squash"):
        from transformers import BeitImageProcessorPil

        config = model.config
        size = (config.image_size, config.image_size)
        grid = (config.image_size // config.patch_size, config.image_size // config.patch_size)
        if processor is None:  # no saved processor: BEiT's defaults (mean = std = 0.5, bicubic)
            processor = BeitImageProcessorPil(size={"height": size[0], "width": size[1]}, do_center_crop=False)
        proc_size = (processor.size.get("height"), processor.size.get("width"))
        if processor.do_center_crop or proc_size != size:
            log.warning(
                "BEiT image processor asks for size %s%s; squash-resizing to the model's %s instead",
                proc_size, " and a centre crop" if processor.do_center_crop else "", size,
            )
        mean = processor.image_mean if processor.do_normalize else (0.0, 0.0, 0.0)
        std = processor.image_std if processor.do_normalize else (1.0, 1.0, 1.0)
        super().__init__(
            model,
            n_tokens=grid[0] * grid[1],
            width=config.hidden_size,
            grid=grid,
            image_size=size,
            mean=mean,
            std=std,
            resample=processor.resample,
            resize_mode=resize_mode,
            rescale_factor=processor.rescale_factor if processor.do_rescale else 1.0,
        )
        self.final_norm_applied = isinstance(model.layernorm, nn.LayerNorm)

    def forward(self, pixels: Tensor) -> Tensor:
        """[batch, 3, H, W] -> [batch, n_patches, hidden] (CLS dropped)."""
        hidden = self.model(pixel_values=self._check_pixels(pixels)).last_hidden_state  # [batch, 1 + n, d]
        return hidden[:, 1:]


def _load_beit(name_or_path, pretrained: bool, resize_mode: str, dtype: torch.dtype) -> BeitEncoder:
    from transformers import BeitConfig, BeitImageProcessorPil, BeitModel

    source = None  # where a preprocessor_config.json may live
    if isinstance(name_or_path, BeitConfig):
        config = name_or_path
    elif isinstance(name_or_path, dict):
        config = BeitConfig(**name_or_path)
    else:
        source = _resolve_local(str(name_or_path), "BEiT")
        if Path(source).is_dir() and not (Path(source) / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in BEiT model directory: {source}")
        config = None

    if pretrained:
        if source is None:
            raise ValueError("pretrained=True needs a hub id or a directory, not a bare config")
        model, info = BeitModel.from_pretrained(source, dtype=dtype, output_loading_info=True)
        fresh_norm = {"layernorm.weight", "layernorm.bias"} & set(info["missing_keys"])
        if fresh_norm and isinstance(model.layernorm, nn.LayerNorm):
            log.warning(
                "%s holds no weights for BeitModel.layernorm: the final LayerNorm is freshly initialised "
                "(weight 1, bias 0); BeitModel.from_pretrained, which LiMBeR used, does the same", source,
            )
    else:
        if config is None:
            config = BeitConfig.from_pretrained(source)
        model = BeitModel(config).to(dtype)

    processor = None
    if source is not None:
        local_config = Path(source) / "preprocessor_config.json"
        if local_config.is_file() or (pretrained and not Path(source).exists()):
            processor = BeitImageProcessorPil.from_pretrained(source)
    return BeitEncoder(model, processor, resize_mode=resize_mode)


# ----- open_clip --------------------------------------------------------------------------


class OpenClipEncoder(ImageEncoder):
    """Grid tokens of an open_clip visual tower.

    ModifiedResNet (RN50, RN50x16, ...): the last feature map before the attention pool,
    flattened row-major, as LiMBeR replaced attnpool by `b d h w -> b (h w) d`.
    RN50x16 at 384 px: [batch, 144, 3072].
    VisionTransformer: patch tokens (class token dropped) after the last block and ln_post.
    """

    def __init__(self, visual: nn.Module, *, resize_mode: str | None = None):
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.transformer import VisionTransformer

        cfg = dict(getattr(visual, "preprocess_cfg", {}) or {})
        if isinstance(visual, ModifiedResNet):
            tower = "resnet"
            side = visual.image_size
            image_size = (side, side)
            grid = (side // 32, side // 32)  # stem /4, layers 2-4 /2 each
            width = visual.layer4[-1].conv3.out_channels
        elif isinstance(visual, VisionTransformer):
            tower = "vit"
            image_size = tuple(visual.image_size)
            grid = tuple(visual.grid_size)
            width = visual.transformer.width
        else:
            raise ValueError(
                f"open_clip visual tower {type(visual).__name__} is not supported: use a ModifiedResNet or "
                "VisionTransformer model (e.g. RN50x16, ViT-B-16)"
            )
        clip_mode = cfg.get("resize_mode", "shortest")
        if resize_mode is None:
            if clip_mode not in ("shortest", "squash"):
                raise ValueError(f"open_clip resize_mode {clip_mode!r} is not supported (use 'shortest' or 'squash')")
            resize_mode = "squash" if clip_mode == "squash" else "center_crop"
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        super().__init__(
            visual,
            n_tokens=grid[0] * grid[1],
            width=width,
            grid=grid,
            image_size=image_size,
            mean=cfg.get("mean", OPENAI_DATASET_MEAN),
            std=cfg.get("std", OPENAI_DATASET_STD),
            resample=cfg.get("interpolation", "bicubic"),
            resize_mode=resize_mode,
            resize_shortest=min(image_size),
        )
        self.tower = tower

    def forward(self, pixels: Tensor) -> Tensor:
        pixels = self._check_pixels(pixels)
        if self.tower == "resnet":
            out = self.model.forward_intermediates(pixels, indices=[4], intermediates_only=True)
            feature_map = out["image_intermediates"][0]  # [batch, width, rows, cols]
            return feature_map.flatten(2).transpose(1, 2)  # [batch, rows * cols, width]
        out = self.model.forward_intermediates(
            pixels, indices=1, normalize_intermediates=True, intermediates_only=True, output_fmt="NLC"
        )
        return out["image_intermediates"][0]  # [batch, n_patches, width]


def _load_open_clip(name: str, pretrained: bool, resize_mode, dtype: torch.dtype, tag: str, **kwargs):
    import open_clip

    if not name.startswith(("hf-hub:", "local-dir:")) and looks_like_local_path(name):
        name = "local-dir:" + str(_resolve_local(name, "open_clip"))
    elif name.startswith("local-dir:"):
        _resolve_local(name.removeprefix("local-dir:"), "open_clip")
    has_schema = name.startswith(("hf-hub:", "local-dir:"))
    model = open_clip.create_model(
        name,
        pretrained=(tag if pretrained and not has_schema else None),
        load_weights=pretrained,
        **kwargs,
    )
    visual = model.visual.to(dtype)
    del model  # the text tower is not needed
    return OpenClipEncoder(visual, resize_mode=resize_mode)


# ----- timm -------------------------------------------------------------------------------


class TimmEncoder(ImageEncoder):
    """timm models: token models (ViT family) give patch tokens, CNNs give one pooled token.

    nf_resnet50: `forward_head(forward_features(x), pre_logits=True)` = global average pool of the
    last feature map, as LiMBeR's `AdaptiveAvgPool2d` -> [batch, 1, 2048].
    ViTs: `forward_features(x)` without the prefix (class / register) tokens -> [batch, n_patches, d].
    """

    def __init__(self, model: nn.Module, *, resize_mode: str | None = None):
        import timm.data

        data_cfg = timm.data.resolve_data_config({}, model=model)
        image_size = tuple(data_cfg["input_size"][1:])
        patch_embed = getattr(model, "patch_embed", None)
        tokens = patch_embed is not None and hasattr(model, "num_prefix_tokens")
        if tokens:
            grid = tuple(patch_embed.grid_size)
            n_tokens = grid[0] * grid[1]
        else:
            grid, n_tokens = None, 1
        crop_pct = data_cfg.get("crop_pct") or 1.0
        crop_mode = data_cfg.get("crop_mode", "center")
        if resize_mode is None:
            if crop_mode not in ("center", "squash"):
                raise ValueError(f"timm crop_mode {crop_mode!r} is not supported (use 'center' or 'squash')")
            # timm's squash still crops when crop_pct < 1; only crop_pct 1 is a pure squash.
            resize_mode = "squash" if crop_mode == "squash" and crop_pct == 1.0 else "center_crop"
        super().__init__(
            model,
            n_tokens=n_tokens,
            width=model.num_features,
            grid=grid,
            image_size=image_size,
            mean=data_cfg["mean"],
            std=data_cfg["std"],
            resample=data_cfg.get("interpolation", "bicubic"),
            resize_mode=resize_mode,
            resize_shortest=math.floor(min(image_size) / crop_pct),
        )
        self.tokens = tokens  # True: patch tokens; False: one pooled token
        self.crop_pct = crop_pct

    def forward(self, pixels: Tensor) -> Tensor:
        features = self.model.forward_features(self._check_pixels(pixels))
        if self.tokens:
            return features[:, self.model.num_prefix_tokens :]  # [batch, n_patches, d]
        pooled = self.model.forward_head(features, pre_logits=True)  # [batch, num_features]
        return pooled.unsqueeze(1)  # [batch, 1, num_features]


def _load_timm(name: str, pretrained: bool, resize_mode, dtype: torch.dtype, **kwargs) -> TimmEncoder:
    import timm

    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    return TimmEncoder(model.to(dtype), resize_mode=resize_mode)


# ----- CLIP vision tower (Hugging Face): LLaVA 1.5's encoder --------------------------------


class ClipVisionEncoder(ImageEncoder):
    """HF `CLIPVisionModel`: the patch tokens of hidden layer `feature_layer`, CLS dropped, which is
    what LLaVA 1.5 feeds its projector (`vision_feature_layer=-2`, the second-to-last block's output,
    with `vision_feature_select_strategy="default"`). Hidden state 0 is the patch embeddings after
    CLIP's pre-layernorm, hidden state i the output of block i; the post-layernorm only touches the
    pooled CLS output and is never part of these tokens. A list of layers concatenates their
    tokens along the width, as LLaVA does. ViT-L/14 at 336 px: [batch, 576, 1024], a 24 x 24 grid.

    Geometry comes from the image processor (CLIPImageProcessor: shorter side to `size`, centre crop
    to `crop_size`, bicubic, OpenAI's mean and std), as LLaVA's processor prepares images;
    resize_mode="squash" resizes the whole image instead (receptive fields need it). A processor
    that pads images to a square first (`do_pad`) is refused: that geometry is not reproduced."""

    def __init__(self, model: nn.Module, processor=None, *, feature_layer: int | Sequence[int] = -2,
                 resize_mode: str | None = None):
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        config = model.config
        side = config.image_size
        layers = [feature_layer] if isinstance(feature_layer, int) else [int(layer) for layer in feature_layer]
        n_hidden = config.num_hidden_layers + 1  # the embeddings, then each block's output
        bad = [layer for layer in layers if not -n_hidden <= layer < n_hidden]
        if not layers or bad:
            raise ValueError(f"feature_layer={feature_layer}: the CLIP vision tower has hidden states "
                             f"{-n_hidden}..{n_hidden - 1} (0: the embeddings)")
        if processor is None:  # no saved processor: CLIP's own eval transform at the model's size
            mean, std, resample, rescale, mode, shortest = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic", 1 / 255, \
                "center_crop", side
        else:
            if getattr(processor, "do_pad", False):
                raise ValueError(f"the image processor {type(processor).__name__} pads images to a square "
                                 "(do_pad=True), which mmn does not reproduce; use a processor that resizes and "
                                 "crops (LLaVA 1.5's CLIPImageProcessor) or resize_mode=squash")
            crop = (processor.crop_size.get("height"), processor.crop_size.get("width")) \
                if processor.do_center_crop else (processor.size.get("height"), processor.size.get("width"))
            if crop != (side, side):
                raise ValueError(f"the image processor makes {crop[0]} x {crop[1]} images but the CLIP vision "
                                 f"tower takes {side} x {side}")
            mode = "center_crop" if processor.do_center_crop else "squash"
            shortest = processor.size.get("shortest_edge") or side
            mean = processor.image_mean if processor.do_normalize else (0.0, 0.0, 0.0)
            std = processor.image_std if processor.do_normalize else (1.0, 1.0, 1.0)
            resample, rescale = processor.resample, processor.rescale_factor if processor.do_rescale else 1.0
        grid = (side // config.patch_size, side // config.patch_size)
        super().__init__(
            model,
            n_tokens=grid[0] * grid[1],
            width=config.hidden_size * len(layers),
            grid=grid,
            image_size=(side, side),
            mean=mean,
            std=std,
            resample=resample,
            resize_mode=resize_mode or mode,
            resize_shortest=shortest,
            rescale_factor=rescale,
        )
        self.feature_layers = layers

    def forward(self, pixels: Tensor) -> Tensor:
        """[batch, 3, H, W] -> [batch, n_patches, hidden * n_layers] (CLS dropped)."""
        hidden = self.model(pixel_values=self._check_pixels(pixels), output_hidden_states=True).hidden_states
        return torch.cat([hidden[layer][:, 1:] for layer in self.feature_layers], dim=-1)  # each [batch, n, d]


def _load_clip_vision(name_or_path: str, pretrained: bool, resize_mode, dtype: torch.dtype,
                      feature_layer: int | Sequence[int] = -2) -> ClipVisionEncoder:
    from transformers import AutoConfig, AutoImageProcessor, CLIPVisionModel

    source = _resolve_local(str(name_or_path), "CLIP vision")
    config = AutoConfig.from_pretrained(source)
    if config.model_type == "llava":
        raise ValueError(f"{source} is a LLaVA checkpoint: its vision tower loads together with its language "
                         "model, from one copy of the weights (model=llava; mmn.models.llava.load_llava)")
    if config.model_type not in ("clip", "clip_vision_model"):
        raise ValueError(f"{source} holds a {config.model_type!r} model, not a CLIP vision tower")
    if pretrained:
        model = CLIPVisionModel.from_pretrained(source, dtype=dtype)
    else:
        model = CLIPVisionModel(getattr(config, "vision_config", config)).to(dtype)
    local = Path(source).is_dir()
    has_processor = (Path(source) / "preprocessor_config.json").is_file() if local else pretrained
    processor = AutoImageProcessor.from_pretrained(source) if has_processor else None
    return ClipVisionEncoder(model, processor, feature_layer=feature_layer, resize_mode=resize_mode)


# ----- the one entry point ----------------------------------------------------------------


def _resolve_local(name: str, what: str) -> str:
    """Expand a local path and check it exists; hub ids pass through unchanged."""
    if not looks_like_local_path(name):
        return name
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} model directory not found: {path}")
    return str(path)


def load_encoder(
    kind: str,
    name_or_path: str | os.PathLike | None = None,
    *,
    pretrained: bool = True,
    resize_mode: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    tag: str = "openai",
    **kwargs,
) -> ImageEncoder:
    """Load a frozen image encoder.

    Args:
        kind: "beit", "open_clip", "timm" or "clip_vision".
        name_or_path: hub id or local directory (beit; with pretrained=False also a BeitConfig or a
            dict of its fields), open_clip model name / "hf-hub:..." / "local-dir:..." / a directory
            in open_clip's hub layout, timm model name, clip_vision hub id or directory of a CLIP or
            CLIPVisionModel. None takes the preset of the kind: LiMBeR's
            microsoft/beit-large-patch16-224-pt22k (196 x 1024), RN50x16 (144 x 3072),
            nf_resnet50 (1 x 2048), and LLaVA 1.5's openai/clip-vit-large-patch14-336 (576 x 1024).
        pretrained: load weights; False builds a random-initialised model of the same shape.
        resize_mode: None keeps each kind's own geometry (beit "squash", open_clip and timm their
            eval transforms, usually "center_crop"); "squash" forces a squash resize (no crop).
        dtype, device: of the parameters.
        tag: open_clip pretrained tag for built-in names (LiMBeR's RN50x16 is OpenAI's: "openai").
        **kwargs: passed to `open_clip.create_model` / `timm.create_model`; clip_vision takes
            `feature_layer` (default -2, LLaVA 1.5's; a list concatenates layers).
    """
    from mmn.models.lm import resolve_dtype

    if kind not in KINDS:
        raise ValueError(f"unknown encoder kind {kind!r}: use one of {KINDS}")
    if resize_mode is not None and resize_mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize_mode {resize_mode!r}: use one of {RESIZE_MODES}")
    torch_dtype = resolve_dtype(dtype)
    if name_or_path is None:
        name_or_path = DEFAULT_NAMES[kind]
    if isinstance(name_or_path, os.PathLike):
        name_or_path = str(name_or_path)

    if kind == "beit":
        if kwargs:
            raise ValueError(f"unexpected arguments for a BEiT encoder: {sorted(kwargs)}")
        encoder = _load_beit(name_or_path, pretrained, resize_mode or "squash", torch_dtype)
    elif kind == "open_clip":
        encoder = _load_open_clip(name_or_path, pretrained, resize_mode, torch_dtype, tag, **kwargs)
    elif kind == "clip_vision":
        unexpected = sorted(set(kwargs) - {"feature_layer"})
        if unexpected:
            raise ValueError(f"unexpected arguments for a CLIP vision encoder: {unexpected}")
        encoder = _load_clip_vision(name_or_path, pretrained, resize_mode, torch_dtype, **kwargs)
    else:
        encoder = _load_timm(name_or_path, pretrained, resize_mode, torch_dtype, **kwargs)
    return encoder.to(device)
