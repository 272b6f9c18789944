"""Test-wide settings: nothing is downloaded, W&B stays offline and inside tmp folders. Shared fixtures:
the tiny Shapes world, and tiny random models (LMs of every family, a tokenizer, a captioner's LM and
encoder) that tests take as arguments rather than importing each other."""

import os
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

import mmn  # noqa: F401  (installs the torchvision shim before any test imports transformers)
from mmn.config import offline_run_environment


@pytest.fixture(autouse=True, scope="session")
def _offline_run_directory(tmp_path_factory):
    offline_run_environment(tmp_path_factory.mktemp("run"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """Overrides that point the config at a tiny Shapes world (conf/world/tiny.yaml), built once
    per test session in a temporary cache folder, with a few-step training recipe."""
    from mmn.config import compose
    from mmn.recipes.run import ensure_world

    cache = tmp_path_factory.mktemp("cache")
    overrides = ["world=tiny", "training=tiny", f"paths.cache_dir={cache}"]
    ensure_world(compose(overrides))
    return overrides


@pytest.fixture(scope="session")
def analysis_overrides(tiny_world, tmp_path_factory):
    """Overrides for analyze.py and the recipes in experiments/ on the tiny world: its parts, a
    fresh (untrained) projection of its widths, short captions, the CPU."""
    from mmn.models.projection import Projection

    folder = tmp_path_factory.mktemp("projection")
    torch.manual_seed(0)
    Projection(d_enc=32, d_lm=64).save(folder)  # the tiny world's encoder and LM widths
    world = [o for o in tiny_world if not o.startswith("training=")]  # the analysis configs have no training group
    return [*world, f"projection.checkpoint={folder}", "max_new_tokens=6", "device=cpu"]


# ----------------------------------------------------------------------------- tiny models shared by tests
#
# Random models small enough for the CPU, exposed as fixtures (tests never import each other). Builders
# are factories, so a test or a module- or session-scoped fixture can build as many as it needs, each
# fresh; transformers is imported only when one is built.

@dataclass(frozen=True)
class TinyLMSizes:
    """The sizes of `tiny_lm`'s models and the words of `tiny_tokenizer`."""

    words: tuple[str, ...] = tuple(
        "a picture of the red blue green circle square triangle star heart next to on left right big small".split())
    model_vocab: int = 40  # more embedding rows than real tokens, as in LiMBeR's resized GPT-J
    d_model: int = 32
    d_mlp: int = 96  # d_mlp != 4 * d_model so a wrong width cannot pass
    n_layers: int = 2


@dataclass(frozen=True)
class CaptionerSizes:
    """The widths of `save_tiny_beit`'s encoder (d_enc) and `save_tiny_captioner_lm`'s LM (d_lm)."""

    d_enc: int = 24
    d_lm: int = 32


@dataclass(frozen=True)
class TinyLlavaSizes:
    """The sizes of `save_tiny_llava`'s LLaVA and the words of its tokenizer."""

    words: tuple[str, ...] = tuple(
        "USER ASSISTANT : . Describe the image in one sentence A picture of a red blue circle square star next to"
        .split())
    d_enc: int = 16  # CLIP vision tower width
    d_lm: int = 24  # Llama width
    d_mlp: int = 48
    n_layers: int = 2
    image_size: int = 42  # 42 px / 14 px patches: a 3 x 3 grid, 9 image prompts
    patch_size: int = 14


TINY_LM = TinyLMSizes()
CAPTIONER = CaptionerSizes()
TINY_LLAVA = TinyLlavaSizes()
# LLaVA 1.5's chat template, in the form llava-hf's processors carry it (images first in a turn, then text)
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _build_tiny_lm(family: str):
    """A random causal LM of the family ("gptj", "gpt2", "gpt_neox", "llama", "mistral") at TINY_LM's sizes."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTJConfig,
        GPTJForCausalLM,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
    )

    s = TINY_LM
    if family == "gptj":
        config = GPTJConfig(vocab_size=s.model_vocab, n_positions=64, n_embd=s.d_model, n_layer=s.n_layers, n_head=4,
                            rotary_dim=4, n_inner=s.d_mlp)
        return GPTJForCausalLM(config)
    if family == "gpt2":
        config = GPT2Config(vocab_size=s.model_vocab, n_positions=64, n_embd=s.d_model, n_layer=s.n_layers, n_head=4,
                            n_inner=s.d_mlp)
        return GPT2LMHeadModel(config)
    if family == "gpt_neox":
        config = GPTNeoXConfig(vocab_size=s.model_vocab, max_position_embeddings=64, hidden_size=s.d_model,
                               num_hidden_layers=s.n_layers, num_attention_heads=4, intermediate_size=s.d_mlp)
        return GPTNeoXForCausalLM(config)
    if family == "llama":
        config = LlamaConfig(vocab_size=s.model_vocab, max_position_embeddings=64, hidden_size=s.d_model,
                             num_hidden_layers=s.n_layers, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=s.d_mlp)
        return LlamaForCausalLM(config)
    if family == "mistral":
        config = MistralConfig(vocab_size=s.model_vocab, max_position_embeddings=64, hidden_size=s.d_model,
                               num_hidden_layers=s.n_layers, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=s.d_mlp)
        return MistralForCausalLM(config)
    raise AssertionError(family)


def _build_tiny_tokenizer():
    """A word-level tokenizer over TINY_LM.words: [UNK] is 0, <|endoftext|> 1, the words 2 on."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<|endoftext|>": 1} | {w: i + 2 for i, w in enumerate(TINY_LM.words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|endoftext|>")


def _save_tiny_captioner_lm(directory, extra_rows=0):
    """Save a random 2-layer GPT-J (d_model CAPTIONER.d_lm, d_mlp 64) with a small byte-level BPE
    tokenizer trained on captions into `directory`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTJConfig, GPTJForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        ["A picture of a red circle", "a blue square next to a star"] * 5,
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    # LiMBeR's GPT-J has unembedding rows beyond the tokenizer's vocabulary: extra_rows adds some.
    config = GPTJConfig(vocab_size=len(tokenizer) + extra_rows, n_positions=64, n_embd=CAPTIONER.d_lm, n_layer=2,
                        n_head=4, rotary_dim=4, n_inner=64, eos_token_id=tokenizer.eos_token_id,
                        bos_token_id=tokenizer.eos_token_id)
    GPTJForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _save_tiny_beit(directory):
    """Save a random 1-layer BEiT (hidden size CAPTIONER.d_enc) on 32 px images with 8 px patches, a
    4 x 4 grid, and its image processor into `directory`."""
    from transformers import BeitConfig, BeitImageProcessor, BeitModel

    config = BeitConfig(image_size=32, patch_size=8, hidden_size=CAPTIONER.d_enc, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=48)
    BeitModel(config).save_pretrained(directory)
    BeitImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False).save_pretrained(directory)


def _save_tiny_llava(directory):
    """Save a random LlavaForConditionalGeneration (CLIP vision tower, Llama LM, at TINY_LLAVA's sizes)
    and its processor (a CLIP image processor that resizes and centre-crops, a word-level tokenizer with
    BOS, "</s>" and the "<image>" token, LLaVA 1.5's chat template) into `directory`, as Hugging Face
    saves them; returns the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    s = TINY_LLAVA
    special = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    vocab = {token: i for i, token in enumerate([*special, *s.words])}
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.add_special_tokens(special)
    words.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>")
    image_processor = CLIPImageProcessor(size={"shortest_edge": s.image_size},
                                         crop_size={"height": s.image_size, "width": s.image_size})
    # num_additional_image_tokens=1: the tower's CLS, which "default" drops (as llava-hf's processors say)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=s.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_CHAT_TEMPLATE)
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=s.d_enc, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=s.image_size, patch_size=s.patch_size,
                                       projection_dim=16),
        text_config=LlamaConfig(hidden_size=s.d_lm, intermediate_size=s.d_mlp, num_hidden_layers=s.n_layers,
                                num_attention_heads=2, num_key_value_heads=2, vocab_size=len(vocab),
                                max_position_embeddings=64, bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
                                pad_token_id=vocab["<pad>"]),
        image_token_index=vocab["<image>"], vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model


@pytest.fixture(scope="session")
def tiny_lm():
    """Factory: tiny_lm(family) -> a fresh random Hugging Face causal LM of that family at tiny_lm_sizes."""
    return _build_tiny_lm


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Factory: tiny_tokenizer() -> a fresh word-level tokenizer over tiny_lm_sizes.words, for tiny_lm's models."""
    return _build_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_lm_sizes() -> TinyLMSizes:
    """words, model_vocab, d_model, d_mlp and n_layers of tiny_lm's models and tiny_tokenizer."""
    return TINY_LM


@pytest.fixture(scope="session")
def save_tiny_captioner_lm():
    """Factory: save_tiny_captioner_lm(directory, extra_rows=0) saves a tiny random GPT-J and its BPE
    tokenizer, loadable with LanguageModel.from_pretrained; extra_rows adds unembedding rows beyond the
    tokenizer's vocabulary."""
    return _save_tiny_captioner_lm


@pytest.fixture(scope="session")
def save_tiny_beit():
    """Factory: save_tiny_beit(directory) saves a tiny random BEiT and its image processor, loadable
    with load_encoder("beit", directory)."""
    return _save_tiny_beit


@pytest.fixture(scope="session")
def save_tiny_llava():
    """Factory: save_tiny_llava(directory) saves a tiny random LLaVA (CLIP vision tower, Llama LM) with its
    processor and chat template, loadable with mmn.models.llava.load_llava; returns the model."""
    return _save_tiny_llava


@pytest.fixture(scope="session")
def tiny_llava_sizes() -> TinyLlavaSizes:
    """words, d_enc, d_lm, d_mlp, n_layers, image_size and patch_size of save_tiny_llava's model."""
    return TINY_LLAVA


@pytest.fixture(scope="session")
def captioner_sizes() -> CaptionerSizes:
    """d_enc and d_lm of save_tiny_beit's encoder and save_tiny_captioner_lm's LM."""
    return CAPTIONER
