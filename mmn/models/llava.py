"""LLaVA 1.5 (Hugging Face `LlavaForConditionalGeneration`) as an mmn captioner.

LLaVA is LiMBeR's construction (a frozen image encoder, a small learned map into the input space of
a frozen text LM) with three differences that matter for the analyses: the image prompts sit inside
a chat prompt, not before it; the map is a two-layer MLP (`mlp2x_gelu`), not a linear one; and the
features are CLIP's (trained with text), not BEiT's (trained on images only). Its parts in
transformers 5, and what the captioner makes of each:

    LlavaForConditionalGeneration       llava-1.5-7b-hf                       in the captioner
    model.vision_tower                  CLIPVisionModel ViT-L/14, 336 px     encoder: ClipVisionEncoder,
                                                                             hidden state -2, CLS dropped,
                                                                             576 tokens (24 x 24 patches)
    model.multi_modal_projector         linear_1 -> GELU -> linear_2         projection: kind mlp2x_gelu
    model.language_model                LlamaModel (Vicuna 7B v1.5)           lm: a LlamaForCausalLM that
    lm_head                             Linear(4096, 32064)                  holds these two modules
    processor                           CLIPImageProcessor, tokenizer with   preprocessing geometry, tokenizer,
                                        "<image>", chat template             the captioning prompt

One copy of the weights. The checkpoint is read once; the encoder, the LM and the unembedding are
the loaded modules themselves (the causal-LM wrapper is built on the meta device, so it allocates
nothing before it is given them), and only the projector's two linear layers (21M parameters for
7B) are copied into the `Projection`. The LM is then an ordinary Llama-family `LanguageModel`:
attribution, decoding, the filter and ablation use its existing table (`model.layers.{l}.mlp`).

The captioning prompt is LLaVA's own chat template applied to one user turn (the image, then
`instruction`), with `add_generation_prompt`, e.g. for LLaVA 1.5
"USER: <image>\\nDescribe the image in one sentence. ASSISTANT:", followed by `answer_start`
("A picture of" by default, so that the caption's first noun names the image's content, as with
LiMBeR's prompt, rather than the "image" of LLaVA's usual "The image shows ..."). The processor
tokenises it with BOS and expands "<image>" to 576 image tokens; the captioner puts the 576 image
prompts at those positions (`Captioner.image_positions`), and the model's input is then exactly
what `LlavaForConditionalGeneration` computes from the processor's output (tests/test_llava.py).

Memory (an estimate from the parameter counts, not a measurement): 7.06B parameters in bf16 are
about 14.1 GB (vision tower 0.30B, projector 0.02B, LM 6.74B).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, PretrainedConfig, PreTrainedModel

from mmn.files import looks_like_local_path
from mmn.models.captioner import IMAGE, Captioner, check_widths
from mmn.models.encoders import ClipVisionEncoder
from mmn.models.lm import LanguageModel, family_of, freeze, resolve_dtype
from mmn.models.projection import Projection

log = logging.getLogger(__name__)

LLAVA_1_5_7B = "llava-hf/llava-1.5-7b-hf"
INSTRUCTION = "Describe the image in one sentence."
ANSWER_START = "A picture of"


def read_llava_config(name_or_path: str | os.PathLike, revision: str | None = None) -> PretrainedConfig | None:
    """The config of a LLaVA checkpoint (hub id or local folder), or None for any other model."""
    config = AutoConfig.from_pretrained(str(name_or_path), revision=revision)
    return config if config.model_type == "llava" else None


def feature_layers(config: PretrainedConfig, feature_layer: int | Sequence[int] | None = None) -> list[int]:
    """The vision tower's hidden states the projector reads: `feature_layer`, or the checkpoint's
    vision_feature_layer when it is None."""
    layer = config.vision_feature_layer if feature_layer is None else feature_layer
    return [int(layer)] if isinstance(layer, int) else [int(each) for each in layer]


def check_llava_config(config: PretrainedConfig, where: str) -> None:
    """What the captioner reproduces of a LLaVA: a CLIP vision tower with CLS dropped, LLaVA 1.5's
    projector (exact GELU, with biases) and a language model of a family mmn knows. Each error
    names the config key and its value; checked from config.json alone, before any weight loads."""
    if config.vision_config.model_type != "clip_vision_model":
        raise ValueError(f"{where}: vision_config.model_type={config.vision_config.model_type!r}; the LLaVA "
                         "captioner reads a CLIP vision tower (clip_vision_model), as LLaVA 1.5 has")
    if config.vision_feature_select_strategy != "default":
        raise ValueError(f"{where}: vision_feature_select_strategy={config.vision_feature_select_strategy!r}; "
                         "the captioner drops the CLS token, LLaVA 1.5's 'default'")
    if config.projector_hidden_act != "gelu" or not config.multimodal_projector_bias:
        raise ValueError(f"{where}: projector_hidden_act={config.projector_hidden_act!r}, multimodal_projector_bias="
                         f"{config.multimodal_projector_bias}; mlp2x_gelu is LLaVA 1.5's ('gelu', with biases)")
    family_of(config.text_config)  # raises, naming the model_type, for a language model mmn has no table for


def causal_lm_around(llava: PreTrainedModel) -> PreTrainedModel:
    """A causal LM of the text config's own class (LlamaForCausalLM for LLaVA 1.5) whose base model
    and unembedding ARE the LLaVA's `model.language_model` and `lm_head`: no weight is copied. Built
    on the meta device, so its own freshly initialised parts never take memory before they are
    replaced."""
    text_config = llava.config.text_config
    family = family_of(text_config)
    with torch.device("meta"):
        causal = AutoModelForCausalLM.from_config(text_config)
    setattr(causal, causal.base_model_prefix, llava.model.language_model)
    setattr(causal, family.unembed, llava.lm_head)
    left = [name for name, tensor in [*causal.named_parameters(), *causal.named_buffers()] if tensor.is_meta]
    if left:
        raise RuntimeError(f"the causal LM around the LLaVA's language model kept parts of its own: {left[:5]}")
    return causal


def chat_prompt(processor, instruction: str = INSTRUCTION, answer_start: str = ANSWER_START) -> str:
    """The captioning prompt: the model's chat template on one user turn (the image, then
    `instruction`), with the generation prompt, then `answer_start` ("" for none)."""
    if processor.chat_template is None:
        raise ValueError(f"the processor {type(processor).__name__} has no chat template to build the prompt from")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    return f"{prompt} {answer_start}" if answer_start else prompt


def load_llava(
    name_or_path: str | os.PathLike = LLAVA_1_5_7B,
    *,
    dtype: str | torch.dtype = "bfloat16",
    revision: str | None = None,
    device: str = "cpu",
    instruction: str = INSTRUCTION,
    answer_start: str = ANSWER_START,
    feature_layer: int | Sequence[int] | None = None,
    resize_mode: str | None = None,
    projection: Projection | None = None,
) -> Captioner:
    """A LLaVA checkpoint (hub id or local folder written by `save_pretrained`, with its processor)
    as a captioner, from one load of its weights (see the module doc).

    Args:
        dtype: of the tower, the LM and the LLaVA's own projector; LLaVA 1.5 is published in
            float16, "bfloat16" (the default) keeps its range.
        instruction, answer_start: the captioning prompt (`chat_prompt`).
        feature_layer: the vision tower's hidden state(s) the encoder yields; None is the checkpoint's
            vision_feature_layer (-2 for LLaVA 1.5), the only one its projector was trained on.
        resize_mode: None keeps the processor's geometry (shorter side to 336, centre crop);
            "squash" resizes whole images, as receptive fields need.
        projection: another projection in place of the LLaVA's own projector (e.g. one train.py
            trained for this tower and LM); None takes the LLaVA's.

    Raises:
        FileNotFoundError: a local path that does not exist or holds no config.json.
        ValueError: not a LLaVA, or a LLaVA whose parts the captioner does not reproduce
            (`check_llava_config`), or a processor without a chat template or "<image>" token.
    """
    from transformers import LlavaForConditionalGeneration

    source = str(name_or_path)
    if looks_like_local_path(source):
        path = Path(source).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"LLaVA checkpoint not found: {path} is not a folder holding config.json")
        source = str(path)
    config = read_llava_config(source, revision)
    if config is None:
        raise ValueError(f"{source} is not a LLaVA checkpoint (its config's model_type is not 'llava')")
    check_llava_config(config, source)
    layers = feature_layers(config, feature_layer)
    if layers != feature_layers(config):
        log.warning("the encoder yields the tower's hidden state(s) %s; %s's projector was trained on %s",
                    layers, source, feature_layers(config))
    if projection is not None:  # before 14 GB of weights load
        check_widths(config.vision_config.hidden_size * len(layers), projection, config.text_config.hidden_size,
                     where=f" between {source}'s vision tower and the given projection")

    processor = AutoProcessor.from_pretrained(source, revision=revision)
    if getattr(processor, "image_token", IMAGE) != IMAGE:
        raise ValueError(f"{source}: the processor's image token is {processor.image_token!r}, not {IMAGE!r}")
    prompt = chat_prompt(processor, instruction, answer_start)
    llava = freeze(LlavaForConditionalGeneration.from_pretrained(source, dtype=resolve_dtype(dtype),
                                                                 revision=revision))
    encoder = ClipVisionEncoder(llava.model.vision_tower, processor.image_processor, feature_layer=layers,
                                resize_mode=resize_mode)
    if projection is None:  # in the model's dtype, as LLaVA computes it
        projection = Projection.from_llava_projector(llava.model.multi_modal_projector).to(llava.dtype)
    lm = LanguageModel(causal_lm_around(llava), processor.tokenizer)
    del llava  # its projector is copied and the rest lives on in the encoder and the LM
    # a given projection keeps its dtype (float32 weights to train; its prompts are cast to the LM's)
    return Captioner(encoder, projection, lm, prompt=prompt).to(device).eval()
