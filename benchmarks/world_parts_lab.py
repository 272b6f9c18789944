"""The fast path for one frozen part of the Shapes world: train the world's LM or its CLIP alone,
with overrides of its config section, and print what decides whether the part is fit for use.

    python benchmarks/world_parts_lab.py lm steps=1500 seed=1
    python benchmarks/world_parts_lab.py clip vision_layers=[1,1,1,1] image_size=64
    python benchmarks/world_parts_lab.py encoder hidden_size=128 steps=3000

lm    how often the LM continues "<a description>. A picture of" with the described scene's
      first shape (in-context copying: an LM that ignores its context cannot be steered by image
      prompts; about 1 in 8 without copying), and its held-out loss.
encoder  held-out token accuracy, and the linear and MLP probes of each patch's shape, glyph
      (the outline drawn) and colour (world.json's `encoder.probes`): under the grid-text world a
      linear projection can write an object token only as well as the linear glyph and colour
      probes read them.
clip  held-out retrieval, how often the true caption beats one with its shape (colour) word
      swapped, and mean CLIPScore of the true caption, its first noun and five random words of
      the world's vocabulary (a scorer must rank them in that order), with the KS test of nouns
      against random words.

Values are parsed as JSON ("[1,1,1,1]", "true", "0.003"); `seed=` sets the part's training seed
and `scenes.<field>=` a SceneConfig field. The part is written under outputs/world_parts_lab/
and each result appended to its log.jsonl. A few minutes on 2 cores; no world is built.
"""

import json
import random
import sys
from dataclasses import asdict
from pathlib import Path

import mmn  # noqa: F401  (torchvision shim before open_clip)
from PIL import Image
from scipy.stats import ks_2samp

from mmn.analysis.clipscore import ClipScorer
from mmn.config import CONFIG_DIR
from mmn.world import generator
from mmn.world.build import DEFAULT_WORLD, HELD_OUT_SEED_OFFSET, PROBE_SEED_OFFSET
from mmn.world.clip import ClipConfig, train_clip
from mmn.world.image_encoder import train_image_encoder
from mmn.world.probes import encoder_probes
from mmn.world.settings import EncoderConfig
from mmn.world.text_lm import TextLMConfig, train_text_lm

ROOT = CONFIG_DIR.parent / "outputs" / "world_parts_lab"


def parse(arguments: list[str]) -> tuple[str, dict, dict, int]:
    """['clip', 'steps=440', 'scenes.size_scale=2'] -> ('clip', part overrides, scene overrides, seed)"""
    if not arguments or arguments[0] not in PARTS:
        raise SystemExit("usage: python benchmarks/world_parts_lab.py {lm,encoder,clip} [key=value ...]")
    part, overrides, scenes, seed = arguments[0], {}, {}, DEFAULT_WORLD["seed"]
    for argument in arguments[1:]:
        key, sep, value = argument.partition("=")
        if not sep:
            raise SystemExit(f"world_parts_lab: expected key=value, got {argument!r}")
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass  # a bare string
        if key == "seed":
            seed = int(value)
        elif key.startswith("scenes."):
            scenes[key.removeprefix("scenes.")] = value
        else:
            overrides[key] = value
    return part, overrides, scenes, seed


def lab_lm(cfg: TextLMConfig, scenes: generator.SceneConfig, seed: int, out_dir: Path) -> dict:
    train_texts = generator.text_corpus(cfg.n_texts, seed, scenes)
    eval_texts = generator.text_corpus(cfg.n_eval_texts, seed + HELD_OUT_SEED_OFFSET, scenes)
    metrics = train_text_lm(train_texts, eval_texts, out_dir, cfg, seed=seed,
                            words=generator.grid_tokens(scenes.grid_fillers) if scenes.text_grid else ())
    return {"context_copy_accuracy": metrics["context_copy_accuracy"], "eval_loss": round(metrics["eval_loss"], 4),
            "seconds": round(metrics["seconds"])}


def lab_encoder(cfg: EncoderConfig, scenes: generator.SceneConfig, seed: int, out_dir: Path) -> dict:
    images, _ = generator.render_batch(seed, cfg.n_images, scenes)
    eval_images, _ = generator.render_batch(seed + HELD_OUT_SEED_OFFSET, cfg.n_eval_images, scenes)
    metrics = train_image_encoder(images, eval_images, out_dir, cfg, seed=seed)
    probes = encoder_probes(out_dir, scenes, seed + PROBE_SEED_OFFSET, n_images=2 * cfg.n_eval_images)
    return {"eval_token_accuracy": round(metrics["eval_token_accuracy"], 4), "probes": probes,
            "seconds": round(metrics["seconds"])}


def lab_clip(cfg: ClipConfig, scenes: generator.SceneConfig, seed: int, out_dir: Path) -> dict:
    images, captions = generator.render_batch(seed, cfg.n_pairs, scenes)
    eval_images, eval_captions = generator.render_batch(seed + HELD_OUT_SEED_OFFSET, cfg.n_eval_pairs, scenes)
    metrics = train_clip(images, captions, eval_images, eval_captions, out_dir, cfg, seed=seed,
                         swap_words={"shape": list(scenes.shapes), "colour": list(scenes.colours)})
    vocabulary = sorted({word.strip(".,").lower() for document in generator.text_corpus(300, seed, scenes)
                         for word in document.split()} - set(scenes.shapes))
    rng = random.Random(seed)
    scorer, pictures = ClipScorer(out_dir), [Image.fromarray(image) for image in eval_images]
    scores = {kind: scorer.score(pictures, texts).numpy() for kind, texts in {
        "caption": eval_captions,
        "noun": [generator.first_shape(caption) for caption in eval_captions],
        "random_words": [", ".join(rng.sample(vocabulary, 5)) for _ in eval_captions],
    }.items()}
    ks = ks_2samp(scores["noun"], scores["random_words"])
    return {"i2t_top1": metrics["i2t_top1"], "swap_accuracy": metrics["swap_accuracy"],
            **{f"clipscore_{kind}": round(float(values.mean()), 1) for kind, values in scores.items()},
            "ks_noun_vs_random_words": {"D": round(float(ks.statistic), 3), "p": float(ks.pvalue)},
            "seconds": round(metrics["seconds"])}


PARTS = {"lm": (TextLMConfig, lab_lm), "encoder": (EncoderConfig, lab_encoder), "clip": (ClipConfig, lab_clip)}


def main(arguments: list[str], root: Path = ROOT) -> dict:
    part, overrides, scene_overrides, seed = parse(arguments)
    scenes = generator.scene_config({**DEFAULT_WORLD["scenes"], **scene_overrides})
    config_class, lab = PARTS[part]
    cfg = config_class(**{**DEFAULT_WORLD[part], **overrides})
    out_dir = root / part
    result = {"part": part, "overrides": arguments[1:], **lab(cfg, scenes, seed, out_dir), "config": asdict(cfg)}
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=1))
    with open(root / "log.jsonl", "a") as log:
        log.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
