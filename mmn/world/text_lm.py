"""Shapes world part (a): a byte-level BPE tokenizer and a small GPT-J trained on text only.

The world's language model plays GPT-J 6B's role: a causal LM that has only ever read
text (the generator's corpus: scenes described, and shown as grid texts, but never rendered;
`generator.text_corpus`). It is a real
`GPTJForCausalLM` (rotary attention, parallel attention + MLP blocks, gelu_new MLP,
untied lm_head) saved with `save_pretrained`, next to a GPT-2-style byte-level BPE
tokenizer trained with the `tokenizers` library, so every loader that reads
`EleutherAI/gpt-j-6b` reads this directory too:

    LanguageModel.from_pretrained(dir)            # mmn.models.lm
    AutoTokenizer.from_pretrained(dir)            # GPT2Tokenizer (tokenizers backend)
    GPTJForCausalLM.from_pretrained(dir)

As in GPT-J, "<|endoftext|>" is the one special token (bos = eos = unk = pad), and the
unembedding has more rows than the tokenizer has tokens (GPT-J: 50400 rows for 50257
tokens): rows past `len(tokenizer)` are never a training target, so code that decodes
through the unembedding must only count real rows.

Training packs captions separated by "<|endoftext|>" into one token stream and trains on
random windows of `seq_len` tokens, so the model sees long contexts and late positions
(the captioner feeds its image prompts, 49 in the default world, then a few text tokens).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Sequence

import mmn  # noqa: F401  (torchvision shim before transformers)
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Tokenizer, GPTJConfig, GPTJForCausalLM

from mmn.world.generator import FILLER_TOKEN, OBJECT_TOKEN
from mmn.world.optimise import fit
from mmn.world.settings import TextLMConfig

END_OF_TEXT = "<|endoftext|>"
GREEDY_PROMPTS = ("A picture of", "A picture of a red", "A picture of two")  # reported after training


def train_tokenizer(texts: Sequence[str], vocab_size: int = 1024, words: Sequence[str] = ()) -> GPT2Tokenizer:
    """Byte-level BPE like GPT-2's, trained on `texts`; "<|endoftext|>" is bos/eos/unk/pad.

    Byte-level: every string is encodable (no unknown tokens), words carry their leading
    space ("Ġcircle"), exactly as in GPT-2 / GPT-J's tokenizer. `words` (the grid text's tokens)
    are added whole, one token each, as GPT-J's tokenizer adds its own.
    """
    if not texts:
        raise ValueError("train_tokenizer: got no texts to train on")
    if words:  # BPE learns the words around them; they join the vocabulary whole, below
        split = re.compile("|".join(re.escape(word) for word in words))
        texts = [split.sub(" ", text) for text in texts]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = GPT2Tokenizer(
        tokenizer_object=bpe,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        add_prefix_space=False,
    )
    tokenizer.add_tokens(list(words))
    return tokenizer


def fix_object_embeddings(model: GPTJForCausalLM, tokenizer, seed: int) -> torch.Tensor | None:
    """Give each grid object token "<gIcJ>" the input embedding glyph_I + colour_J (random vectors
    at the model's initialisation scale) and return its rows, which training keeps so.

    Why: an image prompt is a linear function of what the encoder sees, and the encoder sees glyph
    and colour apart; a token whose embedding is a free vector could name its shape directly, and
    then no linear projection could write it. With the sum, what the text shows the LM is exactly
    what a linear projection can write, and the shape (a non-linear function of glyph and colour
    under glyph_shift) must be computed by the LM's own MLP units: the multimodal neurons.

    Filler tokens "<fK>" (SceneConfig.grid_fillers) get independent random vectors of an object
    token's scale, fixed too, so that no one direction comes to mean background."""
    vocab = tokenizer.get_vocab()
    found = [(index, OBJECT_TOKEN.fullmatch(token)) for token, index in vocab.items()]
    found = [(index, int(m.group(1)), int(m.group(2))) for index, m in found if m]
    if not found:
        return None
    rows, glyphs, colours = (torch.tensor(column) for column in zip(*found))
    generator = torch.Generator().manual_seed(seed)
    scale, width = model.config.initializer_range, model.config.n_embd
    glyph_vectors = torch.randn(int(glyphs.max()) + 1, width, generator=generator) * scale  # [n_glyph, d]
    colour_vectors = torch.randn(int(colours.max()) + 1, width, generator=generator) * scale  # [n_colour, d]
    embedding = model.get_input_embeddings().weight  # [rows, d]
    fixed = glyph_vectors[glyphs] + colour_vectors[colours]  # [n_object_tokens, d]
    fillers = sorted((int(m.group(1)), index) for token, index in vocab.items() if (m := FILLER_TOKEN.fullmatch(token)))
    if fillers:  # in the order of their numbers; a sum of two random vectors has sqrt(2) times their scale
        rows = torch.cat([rows, torch.tensor([index for _, index in fillers])])
        fixed = torch.cat([fixed, torch.randn(len(fillers), width, generator=generator) * scale * math.sqrt(2)])
    with torch.no_grad():
        embedding[rows] = fixed
    return rows


def pack_texts(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """One token stream: <|endoftext|> text <|endoftext|> text ... <|endoftext|>.  # [n_tokens]"""
    eos = tokenizer.eos_token_id
    stream = [eos]
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(eos)
    return torch.tensor(stream, dtype=torch.long)


def build_model(cfg: TextLMConfig, n_tokens: int, eos_token_id: int) -> GPTJForCausalLM:
    """A randomly initialised GPT-J with `n_tokens` real tokens (rows padded like GPT-J's)."""
    if cfg.seq_len > cfg.n_positions:
        raise ValueError(f"lm.seq_len={cfg.seq_len} exceeds lm.n_positions={cfg.n_positions}")
    n_rows = math.ceil(n_tokens / cfg.pad_vocab_to) * cfg.pad_vocab_to
    config = GPTJConfig(
        vocab_size=n_rows,
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        rotary_dim=cfg.rotary_dim,
        n_inner=cfg.n_inner,
        activation_function="gelu_new",
        tie_word_embeddings=False,  # GPT-J's lm_head is its own matrix
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPTJForCausalLM(config)


@torch.no_grad()
def mean_loss(model: GPTJForCausalLM, stream: torch.Tensor, seq_len: int, batch_size: int = 16,
              context_only: torch.Tensor | None = None) -> float:
    """Mean next-token cross-entropy over `stream` cut into consecutive windows of `seq_len`, not
    counting targets that `context_only` (bool [vocab]) marks."""
    model.eval()
    n_windows = max(1, (len(stream) - 1) // seq_len)
    windows = stream[: n_windows * seq_len + 1]
    total, count = 0.0, 0
    for start in range(0, n_windows, batch_size):
        stop = min(start + batch_size, n_windows)
        ids = torch.stack([windows[i * seq_len : i * seq_len + seq_len] for i in range(start, stop)])  # [batch, pos]
        if len(ids[0]) < 2:
            continue
        logits = model(input_ids=ids).logits[:, :-1]  # [batch, pos-1, vocab]
        targets = ids[:, 1:]
        if context_only is not None:
            targets = targets.masked_fill(context_only[targets], -100)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 reduction="sum", ignore_index=-100)
        total += loss.item()
        count += int((targets != -100).sum())
    return total / max(count, 1)


@torch.no_grad()
def greedy_continuations(model: GPTJForCausalLM, tokenizer, prompts: Sequence[str], max_new_tokens: int = 16) -> list[str]:
    """Greedy continuation of each prompt, cut at the first <|endoftext|>."""
    model.eval()
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        generated = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )[0, ids.shape[1] :]
        out.append(tokenizer.decode(generated, skip_special_tokens=True))
    return out


def context_copy_accuracy(model: GPTJForCausalLM, tokenizer, documents: Sequence[str], n: int = 100) -> float:
    """Share of held-out scenes for which the document's context followed by "A picture of" (its
    first description: "<scene>. A picture of"; or its grid text: "<bg>...<g2c1>...A picture of")
    continues with the shape that context names first: whether the LM reads its context, which is
    what lets image prompts steer it later (an LM that ignores its context scores about 1 in 8,
    the share of any one shape)."""
    from mmn.world.generator import GLOSSARY_ENTRY, first_shape

    prompts, answers = [], []
    for document in [d for d in documents if not GLOSSARY_ENTRY.search(d)][:n]:
        if document.startswith("<") and ">" in document:  # a grid text, then its descriptions
            end = document.rindex(">") + 1
            prompts.append(f"{document[:end]}A picture of")
            answers.append(first_shape(document[end:]))
        else:
            context = document.split(". ")[0]
            prompts.append(f"{context}. A picture of")
            answers.append(first_shape(context))
    continuations = greedy_continuations(model, tokenizer, prompts)
    return sum(first_shape(c) == a for c, a in zip(continuations, answers)) / len(prompts)


def train_text_lm(
    train_texts: Sequence[str],
    eval_texts: Sequence[str],
    out_dir: str | Path,
    cfg: TextLMConfig | None = None,
    *,
    seed: int = 0,
    progress: bool = True,
    words: Sequence[str] = (),
) -> dict:
    """Train tokenizer + GPT-J on `train_texts`, save both to `out_dir`, return held-out metrics.
    `words` are added to the tokenizer whole (a grid text's tokens; their embeddings: see
    `fix_object_embeddings`).

    Returns eval_loss / eval_perplexity (per token on the packed held-out captions), the
    same for the untrained model (a baseline), vocabulary sizes, greedy continuations of
    "A picture of", and the wall time.
    """
    cfg = cfg or TextLMConfig()
    if not train_texts or not eval_texts:
        raise ValueError(f"train_text_lm: need training and held-out texts, got {len(train_texts)} and {len(eval_texts)}")
    if cfg.filler_noise and not any(FILLER_TOKEN.fullmatch(word) for word in words):
        raise ValueError("lm.filler_noise=true needs filler tokens in the grid texts (scenes.grid_fillers > 0)")
    started = time.perf_counter()
    torch.manual_seed(seed)
    out_dir = Path(out_dir)

    tokenizer = train_tokenizer(train_texts, cfg.vocab_size, words)
    tokenizer.model_max_length = cfg.n_positions
    train_stream = pack_texts(tokenizer, train_texts)  # [n_tokens]
    eval_stream = pack_texts(tokenizer, eval_texts)
    if len(train_stream) <= cfg.seq_len:
        raise ValueError(f"train_text_lm: the corpus has {len(train_stream)} tokens, fewer than lm.seq_len={cfg.seq_len}")

    model = build_model(cfg, len(tokenizer), tokenizer.eos_token_id)
    object_rows = fix_object_embeddings(model, tokenizer, seed)
    if object_rows is not None:
        embedding = model.get_input_embeddings().weight
        fixed = embedding[object_rows].detach().clone()
    # The added words (a grid text's tokens) are context, never targets: a grid shows a scene as
    # image prompts do, and the LM learns to describe it, not to draw it (which would spend most of
    # its updates on predicting background cells).
    is_word = torch.zeros(model.config.vocab_size, dtype=torch.bool)
    is_word[tokenizer.convert_tokens_to_ids(list(words))] = True
    filler_rows = torch.zeros_like(is_word)  # the background cells' tokens (scenes.grid_fillers)
    filler_rows[tokenizer.convert_tokens_to_ids([word for word in words if FILLER_TOKEN.fullmatch(word)])] = True
    eval_loss_init = mean_loss(model, eval_stream, cfg.seq_len, context_only=is_word)

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    window_rng = torch.Generator().manual_seed(seed)

    def windows() -> Iterator[torch.Tensor]:
        # random windows of the stream: captions start anywhere, so every position is trained
        while True:
            starts = torch.randint(0, len(train_stream) - cfg.seq_len, (cfg.batch_size,), generator=window_rng)
            yield torch.stack([train_stream[s : s + cfg.seq_len] for s in starts.tolist()])  # [batch, pos]

    def keep_object_embeddings() -> None:  # the optimiser moved them; the sum stays the embedding
        if object_rows is not None:
            with torch.no_grad():
                embedding[object_rows] = fixed

    noise_rng = torch.Generator().manual_seed(seed + 1)
    filler_scale = model.config.initializer_range * math.sqrt(2)  # an object token's scale, as the fixed fillers'

    def loss_of(ids: torch.Tensor) -> torch.Tensor:
        labels = ids.masked_fill(is_word[ids], -100)  # HF ignores -100
        if not cfg.filler_noise:
            return model(input_ids=ids, labels=labels).loss
        # a background cell is any vector that is no object's: fresh noise at each occurrence, never one direction
        embeds = model.get_input_embeddings()(ids)  # [batch, pos, d]
        is_filler = filler_rows[ids]  # [batch, pos]
        noise = torch.randn(int(is_filler.sum()), embeds.shape[-1], generator=noise_rng) * filler_scale
        embeds = embeds.masked_scatter(is_filler[..., None], noise.to(embeds.dtype))
        return model(inputs_embeds=embeds, labels=labels).loss

    fit(model, optimizer, windows(), loss_of, cfg.steps, cfg.warmup_steps,
        "world LM (text only)", progress, after_step=keep_object_embeddings)

    eval_loss = mean_loss(model, eval_stream, cfg.seq_len, context_only=is_word)
    continuations = greedy_continuations(model, tokenizer, GREEDY_PROMPTS)
    context_copy = context_copy_accuracy(model, tokenizer, eval_texts)

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    tokenizer.backend_tokenizer.model.save(str(out_dir))  # vocab.json + merges.txt, GPT-2's slow-format files
    metrics = {
        "eval_loss": eval_loss,
        "eval_perplexity": math.exp(eval_loss),
        "eval_perplexity_untrained": math.exp(eval_loss_init),
        "n_tokens_real": len(tokenizer),
        "n_unembedding_rows": model.config.vocab_size,
        "n_train_tokens": len(train_stream),
        "n_eval_tokens": len(eval_stream),
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "greedy": dict(zip(GREEDY_PROMPTS, continuations)),
        "context_copy_accuracy": context_copy,
        "config": asdict(cfg),
        "seconds": time.perf_counter() - started,
    }
    (out_dir / "world_part.json").write_text(json.dumps(metrics, indent=2))
    return metrics
