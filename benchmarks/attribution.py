"""Attribution time and memory: mmn's `grad`, `ig` and `logit` against captum and the bare pass, side by side.

    .venv/bin/python benchmarks/attribution.py [--quick] [--threads N] [--sections grad,ig,logit]

The model is GPT-J-shaped with random weights (28 layers, d_model 256, d_mlp 1024, a 50400-token
vocabulary); the inputs are random embeddings for 196 image patches plus 4 text positions, and
the target is a random token at the last position.

1. grad, all 28 layers, batch 8, scores at the 196 image positions:
     ours           mmn.analysis.attribution.grad_attribution
     bare           target_logits(...).sum() and its gradient w.r.t. the inputs: one forward and
                    one backward pass, the cost floor
     captum         LayerGradientXActivation over the 28 MLP input projections, then the image
                    positions, on the model's own forward (all logits at every position, then
                    the target's), as tests/test_attribution.py::test_grad_matches_captum...
     captum-target  the same, given mmn's target-only forward (`target_logits`) instead
2. ig, 20 steps (riemann_right), layers 0, 9, 18 and 27, batch 2:
     ours           mmn.analysis.attribution.ig_attribution
     captum         IntegratedGradients once per layer on the model's own forward, as
                    tests/test_attribution.py::captum_ig_layer
     captum-target  the same, given mmn's target-only forward
3. logit, all 28 layers, batch 8 (the inputs of section 1), scores at the 196 image positions:
     ours           mmn.analysis.attribution.logit_attribution
     ours-norm      the same with final_norm=True
     forward        one plain forward pass of the same inputs, no gradient (`lm.final_hidden`, the
                    layers logit runs): the cost floor; the target is ours <= 1.2 x forward

The targets are judged against `captum`, the reference of the tests; `captum-target` shows how
much of the gain is the target-only logits and how much the rest.

Times are medians of 9 (grad and logit: a pass takes about 2 s or less, so timing noise matters
most there) or 3 (ig) repeats after one warm-up (for ig, on its last layer only), the methods interleaved, with
torch's default thread count unless --threads is given.
Peak memory: each method runs once in a fresh process (this script with --measure SECTION:METHOD),
which reports its peak RSS (VmHWM, reset once the model and the inputs exist) minus its RSS at
that point; glibc's mmap threshold is fixed at 1 MB there so that freed tensors leave the RSS at
once.

The script checks that ours and captum give the same numbers, and exits non-zero if they do not.
--quick shrinks everything (4 layers, 50 positions, 1 repeat): a smoke check that runs in under
a minute. --sections runs only the sections named (e.g. --sections logit, about a minute).
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace

import mmn  # noqa: F401,I001  (torchvision shim before transformers and captum)

import captum
import torch
from captum.attr import IntegratedGradients, LayerGradientXActivation
from tokenizers import Tokenizer, models
from transformers import GPTJConfig, GPTJForCausalLM, PreTrainedTokenizerFast

from mmn.analysis.attribution import grad_attribution, ig_attribution, logit_attribution, target_logits
from mmn.models.lm import LanguageModel

VOCAB, D_MODEL, D_MLP = 50400, 256, 1024


@dataclass(frozen=True)
class Sizes:
    n_layers: int
    n_image: int  # image positions come first; the scores are taken there
    n_text: int
    grad_batch: int
    ig_batch: int
    ig_layers: tuple[int, ...]
    steps: int
    repeats: dict[str, int]  # per section


FULL = Sizes(n_layers=28, n_image=196, n_text=4, grad_batch=8, ig_batch=2, ig_layers=(0, 9, 18, 27), steps=20,
             repeats={"grad": 9, "ig": 3, "logit": 9})
QUICK = Sizes(n_layers=4, n_image=46, n_text=4, grad_batch=2, ig_batch=1, ig_layers=(0, 3), steps=4,
              repeats={"grad": 1, "ig": 1, "logit": 1})


# ----- model and inputs ---------------------------------------------------------------------

def build_lm(sizes: Sizes) -> LanguageModel:
    """A GPT-J-shaped model with random weights; the tokenizer only sets the vocabulary size."""
    torch.manual_seed(0)
    config = GPTJConfig(vocab_size=VOCAB, n_positions=256, n_embd=D_MODEL, n_inner=D_MLP, n_layer=sizes.n_layers,
                        n_head=8, rotary_dim=16)
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0")),
                                        unk_token="t0")
    return LanguageModel(GPTJForCausalLM(config), tokenizer)


def build_inputs(sizes: Sizes, batch: int, seed: int):
    """inputs_embeds [batch, pos, d_model], target positions (the last) and random target ids."""
    generator = torch.Generator().manual_seed(seed)
    n_positions = sizes.n_image + sizes.n_text
    inputs = torch.randn(batch, n_positions, D_MODEL, generator=generator)
    return inputs, torch.full((batch,), n_positions - 1), torch.randint(VOCAB, (batch,), generator=generator)


# ----- the methods: (lm, inputs, target positions, target ids, sizes) -> scores or None -----

def grad_ours(lm, inputs, positions, ids, sizes):
    return grad_attribution(lm, inputs, positions, ids, list(range(sizes.n_layers)), slice(0, sizes.n_image))


def grad_bare(lm, inputs, positions, ids, sizes):
    inputs = inputs.detach().requires_grad_()
    torch.autograd.grad(target_logits(lm, inputs, positions, ids).sum(), inputs)


def captum_grad(lm, inputs, positions, ids, sizes, logit_fn):
    captum = LayerGradientXActivation(lambda rows: logit_fn(lm, rows, positions, ids),
                                      [lm.mlp_in(layer) for layer in range(sizes.n_layers)])
    return torch.stack([scores[:, :sizes.n_image] for scores in captum.attribute(inputs)], dim=1)


def grad_captum(lm, inputs, positions, ids, sizes):
    return captum_grad(lm, inputs, positions, ids, sizes, model_target_logits)


def grad_captum_target(lm, inputs, positions, ids, sizes):
    return captum_grad(lm, inputs, positions, ids, sizes, target_logits)


def ig_ours(lm, inputs, positions, ids, sizes):
    return ig_attribution(lm, inputs, positions, ids, sizes.ig_layers, slice(0, sizes.n_image), steps=sizes.steps,
                          rule="riemann_right")


def model_target_logits(lm, inputs, positions, ids):
    """The target logits from the model's own forward: all [rows, pos, vocab] logits first."""
    logits = lm.last_logits(inputs, inputs.shape[1])  # [rows, pos, vocab]
    return logits[torch.arange(len(logits)), positions, ids]


def pre_activation(lm, inputs, layer):
    """Z of `layer` for the inputs, as tests/test_attribution.py::act_like_pre_activation."""
    captured, zeros = [], torch.zeros(len(inputs), dtype=torch.long)
    with lm.hooks(forward=[(lm.mlp_in(layer), lambda module, args, output: captured.append(output))]), torch.no_grad():
        target_logits(lm, inputs, zeros, zeros)
    return captured[0]


def captum_ig_layer(lm, inputs, positions, ids, layer, steps, logit_fn):
    """As tests/test_attribution.py::captum_ig_layer: IntegratedGradients over layer `layer`'s Z,
    the forward puts the scaled Z in place of the layer's and runs the whole model."""
    z = pre_activation(lm, inputs, layer)

    def forward(z_rows, inputs_rows, positions_rows, ids_rows):
        with lm.hooks(forward=[(lm.mlp_in(layer), lambda module, args, output: z_rows)]):
            return logit_fn(lm, inputs_rows, positions_rows, ids_rows)

    return IntegratedGradients(forward).attribute(z, baselines=torch.zeros_like(z), n_steps=steps,
                                                  method="riemann_right",
                                                  additional_forward_args=(inputs, positions, ids))


def captum_ig(lm, inputs, positions, ids, sizes, logit_fn):
    """captum's IG at the image positions, layer by layer.  -> [batch, len(ig_layers), n_image, d_mlp]"""
    per_layer = [captum_ig_layer(lm, inputs, positions, ids, layer, sizes.steps, logit_fn)
                 for layer in sizes.ig_layers]
    return torch.stack([scores[:, :sizes.n_image] for scores in per_layer], dim=1)


def ig_captum(lm, inputs, positions, ids, sizes):
    return captum_ig(lm, inputs, positions, ids, sizes, model_target_logits)


def ig_captum_target(lm, inputs, positions, ids, sizes):
    return captum_ig(lm, inputs, positions, ids, sizes, target_logits)


def logit_ours(lm, inputs, positions, ids, sizes, final_norm=False):
    return logit_attribution(lm, inputs, positions, ids, list(range(sizes.n_layers)), slice(0, sizes.n_image),
                             final_norm=final_norm)


def logit_ours_norm(lm, inputs, positions, ids, sizes):
    return logit_ours(lm, inputs, positions, ids, sizes, final_norm=True)


@torch.no_grad()
def logit_forward(lm, inputs, positions, ids, sizes):
    lm.final_hidden(inputs)


SECTIONS = {
    "grad": {"ours": grad_ours, "bare": grad_bare, "captum": grad_captum, "captum-target": grad_captum_target},
    "ig": {"ours": ig_ours, "captum": ig_captum, "captum-target": ig_captum_target},
    "logit": {"ours": logit_ours, "ours-norm": logit_ours_norm, "forward": logit_forward},
}


def section_inputs(section: str, sizes: Sizes):
    return build_inputs(sizes, sizes.ig_batch if section == "ig" else sizes.grad_batch, seed=1)


# ----- timing, memory, agreement ------------------------------------------------------------

def warm_up_sizes(sizes: Sizes) -> Sizes:
    """The warm-up runs ig on the last layer only: a full ig warm-up would add minutes."""
    return replace(sizes, ig_layers=sizes.ig_layers[-1:])


def time_interleaved(lm, section: str, sizes: Sizes):
    """One warm-up call per method, then `repeats` rounds of every method in turn.
    -> ({method: median seconds}, {method: its result in the first round})"""
    inputs, positions, ids = section_inputs(section, sizes)
    methods = SECTIONS[section]
    for method in methods.values():
        method(lm, inputs, positions, ids, warm_up_sizes(sizes))
    times, results = {name: [] for name in methods}, {}
    for _ in range(sizes.repeats[section]):
        for name, method in methods.items():
            start = time.perf_counter()
            result = method(lm, inputs, positions, ids, sizes)
            times[name].append(time.perf_counter() - start)
            results.setdefault(name, result)
    return {name: statistics.median(seconds) for name, seconds in times.items()}, results


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: its peak), MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_rss() -> None:
    """Start the peak RSS (VmHWM) over from the current RSS, so that building the model and the
    tokenizer, whose temporaries peak above what stays, does not count. (getrusage's ru_maxrss is
    the same peak but not always reset: a thread that exits records the old peak there.)"""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def measure(section: str, name: str, sizes: Sizes) -> None:
    """In a fresh process: run one method once and print its peak RSS above the RSS once the
    model and the inputs exist, in MB."""
    lm = build_lm(sizes)
    inputs, positions, ids = section_inputs(section, sizes)
    gc.collect()
    reset_peak_rss()
    before = status_mb("VmRSS")
    SECTIONS[section][name](lm, inputs, positions, ids, sizes)
    print(json.dumps({"extra_mb": status_mb("VmHWM") - before}))


def measure_in_subprocess(section: str, name: str, options: list[str]) -> float:
    """glibc's mmap threshold is fixed at 1 MB there, so a freed tensor leaves the RSS at once;
    with its default (a threshold that grows), the peak varies by some 300 MB from run to run."""
    command = [sys.executable, __file__, "--measure", f"{section}:{name}", *options]
    environment = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"}
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=environment)
    return json.loads(done.stdout.strip().splitlines()[-1])["extra_mb"]


def agreement(ours, theirs) -> tuple[float, bool]:
    """max |ours - theirs| / max |theirs|, and whether assert_close(rtol 1e-4, atol 1e-5 * max |theirs|) passes."""
    scale = theirs.abs().max().item()
    try:
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * scale)
        close = True
    except AssertionError:
        close = False
    return (ours - theirs).abs().max().item() / scale, close


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


# ----- report -------------------------------------------------------------------------------

def print_table(times: dict, memory: dict) -> None:
    print(f"  {'method':<14}{'time s':>9}{'peak MB':>10}")
    for name in times:
        peak = f"{memory[name]:.0f}" if name in memory else "-"
        print(f"  {name:<14}{times[name]:>9.2f}{peak:>10}")


def run_section(lm, section: str, sizes: Sizes, options: list[str]):
    times, results = time_interleaved(lm, section, sizes)
    memory = {name: measure_in_subprocess(section, name, options) for name in SECTIONS[section]}
    print_table(times, memory)
    return times, memory, results


def report_agreement(label: str, ours, theirs) -> bool:
    relative, close = agreement(ours, theirs)
    print(f"  same numbers, ours vs {label}: max |diff| / max |{label}| = {relative:.1e}, "
          f"assert_close(rtol=1e-4, atol=1e-5 * max): {'ok' if close else 'FAILED'}")
    return close


def memory_and_agreement(memory: dict, results: dict) -> bool:
    """Peak memory against both captum references, and whether ours gives their numbers."""
    print(f"  peak memory ours / captum  {memory['ours'] / memory['captum']:.2f}  (target <= 1.0: "
          f"{verdict(memory['ours'] <= memory['captum'])});  ours / captum-target "
          f"{memory['ours'] / memory['captum-target']:.2f}")
    close = report_agreement("captum", results["ours"], results["captum"])
    return report_agreement("captum-target", results["ours"], results["captum-target"]) and close


def main(quick: bool, threads: int | None, sections: list[str]) -> None:
    start = time.perf_counter()
    sizes = QUICK if quick else FULL
    options = [*(["--quick"] if quick else []), *([f"--threads={threads}"] if threads else [])]  # for --measure
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads, "
          f"{'set by --threads' if threads else 'torch default'}), captum {captum.__version__}; "
          f"GPT-J shape, random weights: {sizes.n_layers} layers, d_model {D_MODEL}, d_mlp {D_MLP}, vocab {VOCAB}"
          f"{' [--quick]' if quick else ''}")
    print(f"times: median of {sizes.repeats['grad']} (grad, logit) / {sizes.repeats['ig']} (ig) repeats after a warm-up "
          f"(ig: on its last layer only), methods interleaved; peak MB: peak RSS above model + inputs, "
          f"each method once in a fresh process")
    lm = build_lm(sizes)
    all_close = True
    if "grad" in sections:
        all_close &= grad_section(lm, sizes, options)
    if "ig" in sections:
        all_close &= ig_section(lm, sizes, options)
    if "logit" in sections:
        logit_section(lm, sizes, options)

    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if not all_close:
        sys.exit("ours and captum disagree (see above)")


def grad_section(lm, sizes: Sizes, options: list[str]) -> bool:
    n_positions = sizes.n_image + sizes.n_text
    print(f"\n1. grad: {sizes.n_layers} layers, batch {sizes.grad_batch}, {n_positions} positions "
          f"(scores at the {sizes.n_image} image positions)")
    times, memory, results = run_section(lm, "grad", sizes, options)
    print(f"  ours / bare    {times['ours'] / times['bare']:.2f}  (target <= 1.2: "
          f"{verdict(times['ours'] <= 1.2 * times['bare'])})")
    print(f"  ours / captum  {times['ours'] / times['captum']:.2f}  (target <= 1.0: "
          f"{verdict(times['ours'] <= times['captum'])})")
    print(f"  ours / captum-target  {times['ours'] / times['captum-target']:.2f}")
    return memory_and_agreement(memory, results)


def ig_section(lm, sizes: Sizes, options: list[str]) -> bool:
    n_positions = sizes.n_image + sizes.n_text
    print(f"\n2. ig: {sizes.steps} steps (riemann_right), layers {list(sizes.ig_layers)}, batch {sizes.ig_batch}, "
          f"{n_positions} positions (scores at the {sizes.n_image} image positions)")
    times, memory, results = run_section(lm, "ig", sizes, options)
    print(f"  captum / ours        {times['captum'] / times['ours']:.2f}x  (target >= 2: "
          f"{verdict(times['captum'] >= 2 * times['ours'])})")
    print(f"  captum-target / ours {times['captum-target'] / times['ours']:.2f}x")
    return memory_and_agreement(memory, results)


def logit_section(lm, sizes: Sizes, options: list[str]) -> None:
    n_positions = sizes.n_image + sizes.n_text
    print(f"\n3. logit: {sizes.n_layers} layers, batch {sizes.grad_batch}, {n_positions} positions "
          f"(scores at the {sizes.n_image} image positions)")
    times, memory, _ = run_section(lm, "logit", sizes, options)
    for name in ("ours", "ours-norm"):
        print(f"  {name} / forward  {times[name] / times['forward']:.2f}  (target <= 1.2: "
              f"{verdict(times[name] <= 1.2 * times['forward'])})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat: a smoke check")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    parser.add_argument("--measure", metavar="SECTION:METHOD", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure:
        section, name = args.measure.split(":")
        measure(section, name, QUICK if args.quick else FULL)
    else:
        sections = args.sections.split(",")
        unknown = sorted(set(sections) - set(SECTIONS))
        if unknown:
            parser.error(f"--sections: unknown {unknown}; use some of {','.join(SECTIONS)}")
        main(args.quick, args.threads, sections)
