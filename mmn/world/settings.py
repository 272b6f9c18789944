"""The Shapes world's settings, written once: the sizes and training budgets of its three frozen
parts (one dataclass each, every field commented) and the default world built from them.

Kept apart from the modules that train the parts (text_lm.py, image_encoder.py, clip.py, which
import transformers and open_clip), so that reading the defaults costs nothing: mmn.config hands
DEFAULT_WORLD to Hydra as the config node world/builder, which conf/world/shapes.yaml extends.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TextLMConfig:
    """Sizes and training budget of the world's LM (the `lm` section of the world config)."""

    n_texts: int = 40000          # corpus captions build_world draws for training (text only)
    n_eval_texts: int = 1000      # held-out captions (disjoint seed) for perplexity
    vocab_size: int = 1024        # BPE target size; the world's ~60-word corpus saturates at ~450 tokens
                                  # (256 bytes + merges: BPE merges stop inside words)
    pad_vocab_to: int = 64        # unembedding rows rounded up to a multiple of this, like GPT-J
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    rotary_dim: int = 16
    n_inner: int = 512
    n_positions: int = 320        # room for 196 image prompts (a 14 x 14 grid) + prompt + a long caption
    seq_len: int = 256            # tokens per training window
    batch_size: int = 8
    steps: int = 2000  # grid texts: at 2000 the LM names the first object of a held-out grid 99% of the time
    #                    (1000: 51%); word texts: 1000 made the better captioner (docs/shapes_world_2.md, 11, 13)
    lr: float = 6e-3  # at 3e-3 copying emerged within 1000 steps on some machines only (docs/shapes_world_2.md)
    warmup_steps: int = 20
    weight_decay: float = 0.1  # GPT-J's; at 0.01 layer 0's units fired on most tokens and every category
    #                            shared them, so S.4's rows were flat (docs/shapes_world_2.md, section 18)
    filler_noise: bool = True  # each filler cell (scenes.grid_fillers) reads a fresh random vector in training, so
    #                            any vector that is no object's reads as background: with the encoder's background
    #                            tokens, Table 2's prompts pass as random vectors at 100 images on every run (not
    #                            at 200); with one learned background row they scored below them (shapes_world_2.md, 20-21)


@dataclass
class EncoderConfig:
    """Sizes and training budget of the world's encoder (the `encoder` section of the world config)."""

    n_images: int = 6000        # images build_world renders for pre-training (no captions used)
    n_eval_images: int = 500    # held-out images for the token-prediction metrics
    image_size: int = 224
    patch_size: int = 32        # 7 x 7 = 49 image prompts: the projection trains 3x faster than at 16 (196), and
                                # its captioner names the first shape about as often (docs/shapes_world_2.md, 13)
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 256
    layer_scale_init_value: float = 1.0
    position_bias_slopes: tuple[float, ...] = (2.0, 1.0, 0.5, 0.0)  # per head; () = zeros (BEiT's init)
    outline_tokens: int = 12    # k-means clusters of object outlines (the world has 8 shapes; more clusters stay pure)
    outline_pixels: int = 12    # an outline is described as its silhouette area-resized to 12 x 12
    colour_tokens: int = 6      # k-means clusters of object colours: a token is (outline, colour), as a dVAE's tokens
                                # carry colour; the captioner names a shape right 0.91 of the time (0 = outline only: 0.75;
                                # docs/shapes_world_2.md, 15)
    background_tokens: int = 4  # k-means clusters of background patches' appearance (mean colour, pixel spread): the
                                # tokens code the background too, as a dVAE's do (0 = one background token); with 12,
                                # selectivity fell to 5 of 8 and accuracy to .89 (docs/shapes_world_2.md, 20)
    batch_size: int = 16
    steps: int = 9000           # with colour tokens the glyph is read per patch 0.97 of the time (6,000 steps: 0.94)
    lr: float = 8e-3
    warmup_steps: int = 50
    weight_decay: float = 0.05
    bf16: bool = True           # bf16 autocast where the CPU has native bf16 (avx512_bf16), else fp32

    @property
    def n_object_tokens(self) -> int:
        """Object tokens the encoder learns to predict (the background token comes after them)."""
        return self.outline_tokens * max(self.colour_tokens, 1)


@dataclass
class ClipConfig:
    """Sizes and training budget of the world's CLIP (the `clip` section of the world config)."""

    n_pairs: int = 6000          # image-caption pairs build_world renders for training
    n_eval_pairs: int = 500      # held-out pairs for retrieval accuracy
    embed_dim: int = 128
    image_size: int = 64         # a multiple of 32 for the ResNet tower
    # A list: open_clip's ModifiedResNet, one residual stage per entry (RN50 is [3, 4, 6, 3]), of
    # base width vision_width. An int: a ViT of that many layers, width vision_width, patch_size.
    # The ResNet tells shapes apart where the ViT of the same budget does not (shape-swap 0.89
    # against 0.62-0.65; docs/shapes_world_2.md, section 9).
    vision_layers: int | list[int] = field(default_factory=lambda: [1, 1, 1, 1])
    vision_width: int = 16
    vision_head_width: int = 32  # ViT: width / head_width heads; ResNet: 32 * width / head_width in its attention pool
    patch_size: int = 16         # ViT only
    context_length: int = 32
    vocab_size: int = 49408      # open_clip's SimpleTokenizer
    text_width: int = 128
    text_heads: int = 4
    text_layers: int = 3
    batch_size: int = 64
    steps: int = 3960            # under glyph_shift the CLIP learns the cipher too: shape swap 0.90 (2,640 steps: 0.84;
                                 # without noun texts 2,640: 0.91, 1,320: 0.73; docs/shapes_world_2.md, section 14)
    lr: float = 1e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    # The temperature's start (CLIP's logit scale, learned, at most 100). CLIP's own ended at 100; started
    # there, the world's CLIP keeps images and texts in two cones, as CLIP does, so unrelated pairs stay
    # above cosine 0, where CLIPScore's floor would otherwise widen Table 2's spread. From open_clip's
    # 1/0.07, unrelated captions sat at cosine -.01 and Table 2 failed beyond 100 images on every run;
    # from 100, at .25 (docs/shapes_world_2.md, sections 23 to 25)
    logit_scale_init: float = 100.0
    retrieval_pool: int = 100    # retrieval is scored among this many held-out pairs at a time
    noun_texts: float = 0.1      # share of training pairs whose text is the caption's first noun alone, as alt-texts
                                 # often are a single word: trained on captions only, the CLIP scored a bare noun at zero
                                 # for 44% of images (docs/shapes_world_2.md, section 14)
    noise_texts: float = 0.0     # share of each batch's texts replaced by random tokens, as web alt-texts are often
                                 # unrelated to their image (clip.noise_tokens); at 0.1 Table 2's prompts went from
                                 # below random vectors to above them (docs/shapes_world_2.md, section 19)


# The default world (conf/world/shapes.yaml extends it as
# the config node world/builder; `python train.py world.lm.steps=2000` overrides one).
DEFAULT_WORLD: dict[str, Any] = {
    "seed": 0,
    # SceneConfig overrides (generator.SceneConfig fields), merged into its defaults; why each:
    # docs/shapes_world_2.md. size_scale: objects 1.5x the radius of world 1's (section 7).
    # glyph_shift: the shape a caption names is a non-linear function of what is drawn (glyph and
    # colour), so the projection cannot write it; text_grid: the LM's texts show scenes as the
    # image prompts do, as 7 x 7 grids of object tokens (glyph + colour), and describe them in
    # shape words, so the LM's MLP units learn the translation; grid_glossary and
    # grid_objects_only: texts in which it learns it within its 1,000 steps; order: captions
    # name objects in the order the image prompts reach the LM (section 13). size_spread: sizes
    # closer together, so objects cover nearer the 5% of the image a receptive field keeps (section 17).
    # grid_fillers: a grid's background cells are a filler token, which the LM reads as fresh noise
    # (lm.filler_noise), so that it takes any non-object vector for background (sections 20-21).
    "scenes": {"size_scale": 1.5, "size_spread": 0.4, "glyph_shift": True, "text_grid": 7, "order": "reading",
               "text_prefix_prob": 0.5, "grid_glossary": 0.3, "grid_objects_only": 0.5, "grid_fillers": 1},
    "n_train": 3000,    # training pairs written as webdataset shards (for the projection)
    "n_eval": 5000,     # COCO-style evaluation images, as many as val2017: ~1,700 hold one object, which
                        # S.4 needs (with 500, about 9 per category and half: section 18)
    "lm": asdict(TextLMConfig()),
    "encoder": asdict(EncoderConfig()),
    "clip": asdict(ClipConfig()),
}
