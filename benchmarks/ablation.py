"""The ablation sweep (9 values of k x 3 arms) against one forward pass per (k, arm), side by side.

    python benchmarks/ablation.py [--quick]

A GPT-J-shaped model with random weights (28 layers, width 256, MLP 1024, vocabulary 50400),
8 images of 196 image positions + 4 text positions. Each image gets its own ranking of units
(random scores), and the settings of the paper's Figure 6: the top k, the top k interpretable
(here: every other unit of the ranking) and k random units from the same layers, for k in
{0, 50, ..., 6400}.

- one forward per (k, arm): the 8 images as one batch with per-image masks, the model's full
  logits, p(c) read from their softmax; 27 passes.
- the sweep (mmn.analysis.ablation.ablation_sweep): identical settings run once, many settings
  per pass as rows of one batch, logits at the target position only.
Both give the same p(c) (checked); the script prints both times and their ratio.
"""

import sys
import time

import mmn  # noqa: F401,I001  (torchvision shim before transformers)
import torch
from tokenizers import Tokenizer, models
from transformers import GPTJConfig, GPTJForCausalLM, PreTrainedTokenizerFast

from mmn.analysis.ablation import ablate_masks, ablation_settings, ablation_sweep, setting_masks
from mmn.models.lm import LanguageModel

KS = [0, 50, 100, 200, 400, 800, 1600, 3200, 6400]


def gptj_shaped(n_layers: int, vocab: int) -> LanguageModel:
    config = GPTJConfig(vocab_size=vocab, n_positions=256, n_embd=256, n_layer=n_layers, n_head=8, rotary_dim=16,
                        n_inner=1024, bos_token_id=1, eos_token_id=1)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
        vocab={f"t{i}": i for i in range(vocab)}, unk_token="t0")), eos_token="t1")
    return LanguageModel(GPTJForCausalLM(config).eval(), tokenizer)


def one_forward_per_setting(lm, inputs, positions, ids, settings, layers):
    """p(c) [images, settings], one full forward pass of all images per (arm, k)."""
    rows = torch.arange(len(inputs))
    p = torch.empty(len(inputs), len(settings[0]))
    for s in range(len(settings[0])):
        masks = setting_masks([image_settings[s][2] for image_settings in settings], layers, lm.d_mlp)
        with torch.no_grad(), ablate_masks(lm, masks):
            logits = lm.model(inputs_embeds=inputs).logits  # [images, pos, vocab]
        p[:, s] = logits[rows, positions, : lm.vocab_size].softmax(dim=-1)[rows, ids]
    return p


def main(quick: bool) -> None:
    torch.manual_seed(0)
    n_layers, vocab, n_images, ks = (4, 5000, 2, KS[:5]) if quick else (28, 50400, 8, KS)
    lm = gptj_shaped(n_layers, vocab)
    layers = list(range(n_layers))
    inputs = torch.randn(n_images, 200, 256)
    positions, ids = torch.full((n_images,), 199), torch.randint(2, vocab, (n_images,))
    settings = []
    for image in range(n_images):
        order = torch.randperm(n_layers * lm.d_mlp)  # every unit of the model, in random order
        ranking = torch.stack([order // lm.d_mlp, order % lm.d_mlp], dim=1)
        settings.append(ablation_settings(ranking, ranking[::2], ks, lm.d_mlp, torch.Generator().manual_seed(image)))

    started = time.perf_counter()
    naive = one_forward_per_setting(lm, inputs, positions, ids, settings, layers)
    naive_seconds = time.perf_counter() - started
    started = time.perf_counter()
    swept = ablation_sweep(lm, inputs, positions, ids, settings, layers)
    sweep_seconds = time.perf_counter() - started
    ours = torch.tensor([[r["p_target"] for r in image] for image in swept])
    difference = ((ours - naive).abs() / naive.abs().clamp_min(1e-12)).max().item()

    print(f"model: {n_layers} layers, width 256, MLP 1024, vocabulary {vocab}; {n_images} images x 200 positions; "
          f"{len(ks)} values of k x 3 arms; torch threads: {torch.get_num_threads()}")
    print(f"one forward per (k, arm): {naive_seconds:7.1f} s")
    print(f"ablation sweep:           {sweep_seconds:7.1f} s")
    print(f"speed-up: {naive_seconds / sweep_seconds:.2f}x   (max relative difference in p(c): {difference:.1e})")


if __name__ == "__main__":
    main("--quick" in sys.argv[1:])
