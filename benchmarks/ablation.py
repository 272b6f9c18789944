"""The ablation sweep (9 values of k x 3 arms) against one forward pass per (k, arm), side by side.

    .venv/bin/python benchmarks/ablation.py [--quick]

A GPT-J-shaped model with random weights (28 layers, width 256, MLP 1024, vocabulary 50400),
8 images whose prompt is 196 image positions + 3 text positions ("A picture of"), followed by
2 caption tokens before the target c. Each image gets its own ranking of units (random scores),
and the settings of the paper's Figure 6: the top k, the top k interpretable (here: every other
unit of the ranking) and k random units from the same layers, for k in {0, 50, ..., 6400}. Each
setting yields what the analysis records: p(c) and the re-generated greedy caption (20 tokens).

- one forward per (k, arm): the 8 images as one batch with per-image masks; p(c) from the
  softmax of the model's full logits, and the caption from greedy decoding of the prompt
  (LanguageModel.greedy, KV-cached); 27 of each.
- the sweep (mmn.analysis.ablation.ablation_sweep): identical settings run once, many settings
  per pass as rows of one batch, logits at the target position only, and one pass over the
  prompt serves both p(c) (the caption tokens up to c teacher-forced on its KV cache) and the
  caption.
Both give the same p(c) and captions (checked); the script prints both times and their ratio,
and the same for p(c) alone (no captions) to show where the time goes.
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
MAX_NEW_TOKENS = 20


def gptj_shaped(n_layers: int, vocab: int) -> LanguageModel:
    config = GPTJConfig(vocab_size=vocab, n_positions=256, n_embd=256, n_layer=n_layers, n_head=8, rotary_dim=16,
                        n_inner=1024, bos_token_id=1, eos_token_id=1)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
        vocab={f"t{i}": i for i in range(vocab)}, unk_token="t0")), eos_token="t1")
    return LanguageModel(GPTJForCausalLM(config).eval(), tokenizer)


def one_forward_per_setting(lm, inputs, positions, ids, settings, layers, n_prompt):
    """p(c) [images, settings] and the captions [settings][images]: per (arm, k), one full forward
    pass of all images, then (n_prompt given) greedy decoding of their prompts."""
    rows = torch.arange(len(inputs))
    p, captions = torch.empty(len(inputs), len(settings[0])), []
    for s in range(len(settings[0])):
        masks = setting_masks([image_settings[s][2] for image_settings in settings], layers, lm.d_mlp)
        with torch.no_grad(), ablate_masks(lm, masks):
            logits = lm.last_logits(inputs, inputs.shape[1])  # [images, pos, vocab]
            p[:, s] = logits[rows, positions, : lm.vocab_size].softmax(dim=-1)[rows, ids]
            if n_prompt is not None:
                captions.append(lm.greedy(inputs[:, :n_prompt], MAX_NEW_TOKENS))
    return p, captions


def compare(lm, inputs, positions, ids, settings, layers, n_prompt) -> tuple[float, float]:
    """Both ways, timed; checks that they agree.  -> (naive seconds, sweep seconds)"""
    started = time.perf_counter()
    naive, naive_captions = one_forward_per_setting(lm, inputs, positions, ids, settings, layers, n_prompt)
    naive_seconds = time.perf_counter() - started
    started = time.perf_counter()
    swept = ablation_sweep(lm, inputs, positions, ids, settings, layers, n_prompt=n_prompt,
                           max_new_tokens=MAX_NEW_TOKENS)
    sweep_seconds = time.perf_counter() - started
    ours = torch.tensor([[r["p_target"] for r in image] for image in swept])
    difference = ((ours - naive).abs() / naive.abs().clamp_min(1e-12)).max().item()
    if difference > 1e-3:
        sys.exit(f"the sweep's p(c) differs from one forward per setting by {difference:.1e} (relative)")
    if n_prompt is not None:
        ours_captions = [[image[s]["caption_ids"] for image in swept] for s in range(len(settings[0]))]
        if ours_captions != naive_captions:
            sys.exit("the sweep's captions differ from one greedy decoding per setting")
    what = "p(c) + captions" if n_prompt is not None else "p(c) alone     "
    print(f"{what}: one forward per (k, arm) {naive_seconds:6.1f} s, sweep {sweep_seconds:6.1f} s, "
          f"speed-up {naive_seconds / sweep_seconds:.2f}x (max relative difference in p(c): {difference:.1e}"
          f"{', captions identical' if n_prompt is not None else ''})")
    return naive_seconds, sweep_seconds


def main(quick: bool) -> None:
    torch.manual_seed(0)
    n_layers, vocab, n_images, ks = (4, 5000, 2, KS[:5]) if quick else (28, 50400, 8, KS)
    lm = gptj_shaped(n_layers, vocab)
    layers = list(range(n_layers))
    n_prompt = 199  # 196 image positions + "A picture of"
    inputs = torch.randn(n_images, n_prompt + 2, 256)  # + the 2 caption tokens before c
    positions, ids = torch.full((n_images,), n_prompt + 1), torch.randint(2, vocab, (n_images,))
    settings = []
    for image in range(n_images):
        order = torch.randperm(n_layers * lm.d_mlp)  # every unit of the model, in random order
        ranking = torch.stack([order // lm.d_mlp, order % lm.d_mlp], dim=1)
        settings.append(ablation_settings(ranking, ranking[::2], ks, lm.d_mlp, torch.Generator().manual_seed(image)))

    print(f"model: {n_layers} layers, width 256, MLP 1024, vocabulary {vocab}; {n_images} images x "
          f"{inputs.shape[1]} positions; {len(ks)} values of k x 3 arms; {MAX_NEW_TOKENS}-token captions; "
          f"torch threads: {torch.get_num_threads()}")
    naive_seconds, sweep_seconds = compare(lm, inputs, positions, ids, settings, layers, n_prompt)
    compare(lm, inputs, positions, ids, settings, layers, None)
    met = naive_seconds >= 2 * sweep_seconds
    print(f"the sweep (p(c) + captions) vs one forward per (k, arm): {naive_seconds / sweep_seconds:.2f}x "
          f"(target >= 2: {'met' if met else 'NOT met'})")


if __name__ == "__main__":
    main("--quick" in sys.argv[1:])
