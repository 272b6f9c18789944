"""Build the whole Shapes world once, cache it, and summarise it.

`build_world(cfg, out_dir)` writes, under out_dir:

    data/train/00000.tar ...        training pairs, CC3M webdataset layout  (generator.generate)
    data/coco/annotations, val2017  evaluation split, COCO 2017 layout
    lm/                             part (a): tokenizer + GPT-J trained on text only   (text_lm)
    encoder/                        part (b): BEiT pre-trained on images only          (image_encoder)
    clip/                           part (c): open_clip CLIP, the CLIPScore scorer      (clip)
    world.json                      the resolved config, metrics, timings, data summary

Each part is trained without the other modality, from its own data: the LM on short
documents about scenes that are never rendered (`text_corpus`), the encoder and CLIP on in-memory renders
(`render_batch`) that are not the training shards. Held-out metrics use a different seed.

Caching: world.json is written last and atomically. A call whose resolved config (and
WORLD_FORMAT) equals the stored one returns the stored info without work; anything else
(or force=True) deletes the managed sub-folders and world.json and rebuilds, so a killed
build is redone and a smaller rebuild never leaves stale shards behind.

Shipped parts: the repository carries the default world's three frozen parts, written by this
builder (`ship_world`) into mmn/world/shipped/ with a manifest of what decided each part (the
world's seed and scenes, the part's own config section, WORLD_FORMAT) and the sha256 of each
file. A build copies a shipped part instead of training it when that key equals its own and
every hash checks, so every machine analyses the same bits (training the parts is where float
rounding made worlds differ: docs/shapes_world_2.md, section 10) and the default build takes
seconds. Any other config trains the part; `shipped=False` trains all three.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Mapping

import torch

from mmn.files import write_text
from mmn.world import generator
from mmn.world.clip import train_clip
from mmn.world.image_encoder import train_image_encoder
from mmn.world.probes import encoder_probes
from mmn.world.settings import DEFAULT_WORLD, ClipConfig, EncoderConfig, TextLMConfig
from mmn.world.text_lm import train_text_lm

log = logging.getLogger(__name__)

WORLD_FORMAT = 6  # bump when the build code changes what it produces, so caches rebuild
WORLD_FILE = "world.json"
PARTS = ("lm", "encoder", "clip")          # the frozen parts, each in its own sub-folder
MANAGED = ("data", *PARTS)                  # sub-folders a rebuild owns (and deletes)
SHIPPED_DIR = Path(__file__).parent / "shipped"
MANIFEST_FILE = "manifest.json"
HELD_OUT_SEED_OFFSET = 1  # held-out texts and renders use seed + 1: disjoint from training
PROBE_SEED_OFFSET = 2     # the encoder's probes read renders of seed + 2
MIN_CONTEXT_COPY = 0.3    # below this the LM barely reads its context (docs/shapes_world_2.md, section 10)

SECTIONS = {"lm": TextLMConfig, "encoder": EncoderConfig, "clip": ClipConfig}



def _plain(cfg: Any) -> Any:
    """DictConfig / dataclass / tuples -> JSON-like plain data (what world.json stores)."""
    if hasattr(cfg, "_metadata") and hasattr(cfg, "_get_node"):  # an OmegaConf node
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)
    return json.loads(json.dumps(cfg, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else list(o)))


def resolve_world_config(cfg: Mapping | None = None) -> dict:
    """DEFAULT_WORLD overlaid with `cfg`; unknown keys and bad values raise ValueError naming them."""
    given = _plain(cfg) if cfg is not None else {}
    if not isinstance(given, dict):
        raise ValueError(f"world config must be a mapping, got {type(cfg).__name__}")
    unknown = sorted(set(given) - set(DEFAULT_WORLD))
    if unknown:
        raise ValueError(f"unknown world config key(s) {unknown}; known: {sorted(DEFAULT_WORLD)}")
    resolved = copy.deepcopy(DEFAULT_WORLD)
    for key, value in given.items():
        if key in SECTIONS:
            known = {f.name for f in fields(SECTIONS[key])}
            bad = sorted(set(value or {}) - known)
            if bad:
                raise ValueError(f"unknown key(s) {bad} in world config section '{key}'; known: {sorted(known)}")
            resolved[key].update(value or {})
        elif key == "scenes":
            resolved[key].update(value or {})
        else:
            resolved[key] = value
    generator.scene_config(resolved["scenes"])  # raises on unknown / bad scene keys
    for key in ("seed", "n_train", "n_eval"):
        if not isinstance(resolved[key], int) or (key != "seed" and resolved[key] < 1):
            raise ValueError(f"world config '{key}' must be an integer{' >= 1' if key != 'seed' else ''}, got {resolved[key]!r}")
    clip = resolved["clip"]
    for share in ("noun_texts", "noise_texts"):
        if not 0.0 <= clip[share] <= 1.0:
            raise ValueError(f"world config clip.{share}={clip[share]!r} must be a share in [0, 1]")
    if not 1.0 <= clip["logit_scale_init"] <= 100.0:
        raise ValueError(f"world config clip.logit_scale_init={clip['logit_scale_init']!r} must be in [1, 100] "
                         f"(CLIP's logit scale is clamped at 100)")
    if clip["n_eval_pairs"] < clip["retrieval_pool"]:
        raise ValueError(f"world config clip.n_eval_pairs={clip['n_eval_pairs']} is smaller than "
                         f"clip.retrieval_pool={clip['retrieval_pool']}")
    scene_size = resolved["scenes"].get("image_size", generator.SceneConfig.image_size)
    if scene_size != resolved["encoder"]["image_size"]:
        raise ValueError(f"world config scenes.image_size ({scene_size}) and encoder.image_size "
                         f"({resolved['encoder']['image_size']}) must agree")
    text_grid, encoder = resolved["scenes"].get("text_grid", 0), resolved["encoder"]
    if text_grid and text_grid != encoder["image_size"] // encoder["patch_size"]:
        raise ValueError(f"world config scenes.text_grid={text_grid} must be the encoder's patch grid, "
                         f"encoder.image_size / encoder.patch_size = {encoder['image_size'] // encoder['patch_size']}")
    fillers = resolved["scenes"].get("grid_fillers", 0)
    if resolved["lm"]["filler_noise"] and not (text_grid and fillers):
        raise ValueError(f"world config lm.filler_noise=true needs grid texts with filler cells, got scenes.text_grid="
                         f"{text_grid} and scenes.grid_fillers={fillers}; set world.lm.filler_noise=false for texts "
                         f"without them")
    return _plain(resolved)


def world_paths(out_dir: str | Path) -> dict[str, str]:
    """Where the parts of a world built in out_dir live (absolute paths)."""
    root = Path(out_dir).resolve()
    return {
        "root": str(root),
        "train_shards": str(root / "data" / "train"),
        "coco_root": str(root / "data" / "coco"),
        "lm": str(root / "lm"),
        "encoder": str(root / "encoder"),
        "clip": str(root / "clip"),
        "world_json": str(root / WORLD_FILE),
    }


def load_world(out_dir: str | Path) -> dict | None:
    """The stored world info of out_dir (paths made absolute for where it is now), or None."""
    path = Path(out_dir) / WORLD_FILE
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    info["paths"] = world_paths(out_dir)
    return info


# Scene keys that only text_corpus reads: they decide the LM's texts, not the renders or captions
# the encoder and the CLIP train on.
TEXT_CORPUS_KEYS = ("text_prefix_prob", "descriptions_per_text", "grid_objects_only", "grid_glossary", "grid_fillers")


def part_key(resolved: Mapping, part: str) -> dict:
    """What decides a frozen part's weights: the build code's format, the world's seed and scenes
    (its training data: text_corpus and render_batch draw scene i from them alone; the keys only
    text_corpus reads decide the LM alone) and its section."""
    scenes = {key: value for key, value in resolved["scenes"].items() if part == "lm" or key not in TEXT_CORPUS_KEYS}
    return {"format": WORLD_FORMAT, "seed": resolved["seed"], "scenes": scenes, part: resolved[part]}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shipped_part(resolved: Mapping, part: str, shipped_dir: str | Path = SHIPPED_DIR) -> dict | None:
    """The manifest entry of a shipped part built from the same key as `resolved`'s, or None.
    A matching part whose files fail their hashes is reported and not used (the part is trained)."""
    manifest_path = Path(shipped_dir) / MANIFEST_FILE
    if not manifest_path.is_file():
        return None
    entry = json.loads(manifest_path.read_text()).get("parts", {}).get(part)
    if entry is None or entry["key"] != part_key(resolved, part):
        return None
    folder = Path(shipped_dir) / part
    for name, expected in entry["sha256"].items():
        if not (folder / name).is_file() or _sha256(folder / name) != expected:
            log.warning("Shapes world: shipped %s file %s is missing or fails its sha256; training the %s instead",
                        part, folder / name, part)
            return None
    return entry


def ship_world(world_dir: str | Path, shipped_dir: str | Path = SHIPPED_DIR) -> dict:
    """Copy the three frozen parts of a world built in world_dir into shipped_dir, with a manifest
    of their keys, metrics and file hashes (what `build_world` checks before it uses them)."""
    info = load_world(world_dir)
    if info is None or info.get("format") != WORLD_FORMAT:
        raise FileNotFoundError(f"ship_world: no finished world of format {WORLD_FORMAT} in {world_dir} "
                                f"(build it first: python -m mmn.world world.shipped=false)")
    shipped_dir = Path(shipped_dir)
    manifest = {"format": WORLD_FORMAT, "torch": torch.__version__, "parts": {}}
    for part in PARTS:
        shutil.rmtree(shipped_dir / part, ignore_errors=True)
        shutil.copytree(Path(world_dir) / part, shipped_dir / part)
        manifest["parts"][part] = {
            "key": part_key(info["config"], part),
            "metrics": info["metrics"][part],  # with the part's training time, "seconds"
            "sha256": {f.name: _sha256(f) for f in sorted((shipped_dir / part).iterdir())},
        }
    (shipped_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def build_configured_world(world: Mapping) -> dict:
    """build_world for the `world` node of a composed config: its `dir` and `shipped` keys say where
    and how, the rest is the world config."""
    spec = {key: value for key, value in _plain(world).items() if key not in ("dir", "shipped")}
    return build_world(spec, world["dir"], shipped=world.get("shipped", True))


def build_world(cfg: Mapping | None = None, out_dir: str | Path = "world", force: bool = False,
                shipped: bool | str | Path = True) -> dict:
    """Generate the data and train the three parts into out_dir; cached on the resolved config.
    A part shipped with mmn (or found in the folder `shipped` names) for the same key is copied
    instead of trained; shipped=False trains every part.

    Returns the world info: {"format", "config", "paths", "data" (generator summary),
    "metrics": {"lm", "encoder", "clip"}, "sources": {part: "shipped" or "trained"},
    "timings_s": {stage: seconds, "total"}}.
    """
    resolved = resolve_world_config(cfg)
    out_dir = Path(out_dir)
    cached = load_world(out_dir)
    if (not force and cached is not None and cached.get("format") == WORLD_FORMAT
            and cached.get("config") == resolved and all((out_dir / name).is_dir() for name in MANAGED)):
        log.info("Shapes world in %s is up to date (config unchanged); nothing to do", out_dir)
        return cached

    # Start clean: a stale world.json must never describe half-rebuilt parts.
    (out_dir / WORLD_FILE).unlink(missing_ok=True)
    for name in MANAGED:
        shutil.rmtree(out_dir / name, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)

    seed, held_out_seed = resolved["seed"], resolved["seed"] + HELD_OUT_SEED_OFFSET
    scenes = generator.scene_config(resolved["scenes"])
    lm_cfg = TextLMConfig(**resolved["lm"])
    encoder_cfg = EncoderConfig(**resolved["encoder"])
    clip_cfg = ClipConfig(**resolved["clip"])
    torch.manual_seed(seed)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def stage(name: str, since: float) -> float:
        timings[name] = round(time.perf_counter() - since, 2)
        log.info("Shapes world: %s took %.1f s", name, timings[name])
        return time.perf_counter()

    clock = time.perf_counter()
    data_summary = generator.generate(out_dir / "data", n_train=resolved["n_train"], n_eval=resolved["n_eval"],
                                      seed=seed, cfg=scenes)
    clock = stage("data", clock)

    metrics: dict[str, dict] = {}
    if shipped:
        shipped_dir = SHIPPED_DIR if shipped is True else Path(shipped)
        for part in PARTS:
            entry = shipped_part(resolved, part, shipped_dir)
            if entry is not None:
                shutil.copytree(shipped_dir / part, out_dir / part)
                metrics[part] = entry["metrics"]
                log.info("Shapes world: %s copied from %s (built from this config; %.0f s to train)",
                         part, shipped_dir / part, entry["metrics"]["seconds"])
        clock = stage("shipped", clock)
    sources = {part: "shipped" if part in metrics else "trained" for part in PARTS}

    if "lm" not in metrics:  # (a) text only: short documents about scenes that are never rendered
        train_texts = generator.text_corpus(lm_cfg.n_texts, seed, scenes)
        eval_texts = generator.text_corpus(lm_cfg.n_eval_texts, held_out_seed, scenes)
        clock = stage("lm_corpus", clock)
        metrics["lm"] = train_text_lm(train_texts, eval_texts, out_dir / "lm", lm_cfg, seed=seed,
                                      words=generator.grid_tokens(scenes.grid_fillers) if scenes.text_grid else ())
        clock = stage("lm", clock)
    if metrics["lm"]["context_copy_accuracy"] < MIN_CONTEXT_COPY:
        log.warning("Shapes world: the LM continues '<a scene>. A picture of' with its first shape only "
                    "%.0f%% of the time (1 in 8 when it ignores its context): image prompts will hardly steer it. "
                    "More lm.steps or a higher lm.lr bring in-context copying forward (docs/shapes_world_2.md, "
                    "section 10)", 100 * metrics["lm"]["context_copy_accuracy"])

    if "encoder" not in metrics or "clip" not in metrics:
        # (b) and (c): one in-memory render serves both (the encoder never sees its captions)
        n_images = max(encoder_cfg.n_images, clip_cfg.n_pairs)
        n_held_out = max(encoder_cfg.n_eval_images, clip_cfg.n_eval_pairs)
        images, captions = generator.render_batch(seed, n_images, scenes)
        held_out_images, held_out_captions = generator.render_batch(held_out_seed, n_held_out, scenes)
        clock = stage("render", clock)
    if "encoder" not in metrics:
        metrics["encoder"] = train_image_encoder(images[: encoder_cfg.n_images],
                                                 held_out_images[: encoder_cfg.n_eval_images],
                                                 out_dir / "encoder", encoder_cfg, seed=seed)
        metrics["encoder"]["probes"] = encoder_probes(out_dir / "encoder", scenes, seed + PROBE_SEED_OFFSET,
                                                      n_images=2 * encoder_cfg.n_eval_images)
        clock = stage("encoder", clock)
    if "clip" not in metrics:
        metrics["clip"] = train_clip(images[: clip_cfg.n_pairs], captions[: clip_cfg.n_pairs],
                                     held_out_images[: clip_cfg.n_eval_pairs],
                                     held_out_captions[: clip_cfg.n_eval_pairs], out_dir / "clip", clip_cfg,
                                     seed=seed, swap_words={"shape": list(scenes.shapes), "colour": list(scenes.colours)})
        clock = stage("clip", clock)
    timings["total"] = round(time.perf_counter() - started, 2)

    info = {
        "format": WORLD_FORMAT,
        "config": resolved,
        "data": _plain(data_summary),
        # each part's config is stored once, in "config"
        "metrics": {part: {k: v for k, v in metrics[part].items() if k != "config"} for part in PARTS},
        "sources": sources,
        "timings_s": timings,
        "torch_threads": torch.get_num_threads(),
    }
    write_text(json.dumps(info, indent=2), out_dir / WORLD_FILE)  # last: its presence means a finished build
    info["paths"] = world_paths(out_dir)
    return info


def world_summary(info: Mapping) -> str:
    """A readable multi-line summary of a built world (what build_world / load_world return)."""
    cfg, data, metrics, timings = info["config"], info["data"], info["metrics"], info["timings_s"]
    lm, enc, clip = metrics["lm"], metrics["encoder"], metrics["clip"]
    paths = info.get("paths", {})
    lines = [
        f"Shapes world (seed {cfg['seed']}, format {info['format']})",
        f"  data: {data['n_train']} training pairs (webdataset shards), {data['n_eval']} COCO-style eval images, "
        f"{data['n_eval_annotations']} eval instances, caption vocabulary {data['vocabulary_size']} words",
        f"        objects per image {data['objects_per_image']}",
        "        e.g. " + " | ".join(data["caption_examples"][:3]),
        f"  LM (GPT-J, text only): held-out perplexity {lm['eval_perplexity']:.2f} "
        f"(untrained {lm['eval_perplexity_untrained']:.0f}; {lm['n_tokens_real']} real tokens, "
        f"{lm['n_unembedding_rows']} unembedding rows), trained on {lm['tokens_seen']:,} tokens",
        f"        reads its context: '<a scene (words or grid)>. A picture of' names its first shape "
        f"{lm['context_copy_accuracy']:.0%} of the time (an LM that ignores context: about 1 in 8)",
    ]
    lines += [f"        greedy: {prompt!r} -> {continuation!r}" for prompt, continuation in lm["greedy"].items()]
    lines += [
        f"  encoder (BEiT, images only, object tokens): held-out token loss {enc['eval_token_loss']:.3f} "
        f"(untrained {enc['eval_token_loss_untrained']:.2f}); token accuracy on object patches "
        f"{enc['eval_token_accuracy']:.2f} (the most common token: {enc['baseline_majority_token']:.2f})",
        f"        probes of each patch's shape: linear {enc['probes']['shape_linear']:.2f}, MLP "
        f"{enc['probes']['shape_mlp']:.2f} (chance {enc['probes']['shape_chance']:.2f}); of its colour: linear "
        f"{enc['probes']['colour_linear']:.2f}",
        f"  CLIP (open_clip, pairs): held-out retrieval top-1 image->text {clip['i2t_top1']:.2f}, "
        f"text->image {clip['t2i_top1']:.2f} among {round(1 / clip['chance'])} (chance {clip['chance']:.2f}; "
        f"untrained {clip['i2t_top1_untrained']:.2f} / {clip['t2i_top1_untrained']:.2f})",
        "        prefers the true caption over one with a swapped word: "
        + ", ".join(f"{name} {accuracy:.2f}" for name, accuracy in clip.get("swap_accuracy", {}).items())
        + " (chance 0.50)",
        "  parts: " + ", ".join(f"{part} {source}" for part, source in info.get("sources", {}).items()),
        "  time: " + ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in timings.items()),
    ]
    if paths:
        lines.append("  paths: " + ", ".join(f"{k}={v}" for k, v in paths.items() if k != "root"))
    return "\n".join(lines)
