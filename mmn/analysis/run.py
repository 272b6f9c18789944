"""`python analyze.py`: the paper's core procedure (sections 2 and 3.3) on a trained captioner.

    analyze(cfg)
      0. check the settings (method, filter, ablation, images, device, model paths) before anything loads
      1. the Shapes world when the config points into it; the captioner with its trained projection
      2. per batch of images, skipping batches already on disk (an image that cannot be read is a
         recorded skip, read_images):
           caption greedily, find c and p(c)                             captions.py
           attribute y^c to every (layer, unit, patch)                    attribution.py
           the top N triples per image, decoded, interpretable or not     neurons.py
           ablate top / top interpretable / random units for each k:
             delta p(c), the re-generated caption and its BERTScore      ablation.py, bertscore.py
           write the batch's parts                                        results.py
      3. merge the tables, summarise, draw the figures, log all of it to W&B

Run directory: captions.parquet, neurons.parquet, ablation.parquet, summary.parquet (+ .json),
figures/*.png, analysis.json (what the results depend on), parts/ (per batch), wandb/.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm.auto import tqdm

from mmn.analysis.ablation import ARMS, MODES, ablation_settings, ablation_sweep, mean_activations, resolve_sizes
from mmn.analysis.attribution import IG_RULES, METHODS, attribute
from mmn.analysis.captions import caption_targets, untargeted_row
from mmn.analysis.figures import ablation_curves, layer_distribution
from mmn.analysis.filter import InterpretableFilter, check_filter
from mmn.analysis.neurons import UnitDecoder, neuron_name, top_triples, unit_ranking
from mmn.analysis.results import ResultStore, atomic_write, parse_shard, write_json, write_parquet
from mmn.config import digest, files_fingerprint, offline_run_environment
from mmn.data.coco import CocoImages, UnusableImage
from mmn.models.captioner import Captioner
from mmn.models.targets import get_finder
from mmn.training.loggers import finish, log_results, make_loggers
from mmn.training.run import ensure_world, uses_world

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- settings

def check_count(key: str, value, minimum: int = 1) -> None:
    """A setting that counts something (images per batch, rows per pass, ...) must be a whole
    number of at least `minimum`; the error names the key and the value."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}={value!r} must be a whole number >= {minimum}")


def available_devices() -> list[str]:
    """The values of `device` this machine can run: auto, cpu, and the accelerators it has."""
    devices = ["auto", "cpu"]
    if torch.cuda.is_available():
        devices += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def check_run_settings(cfg: DictConfig) -> None:
    """The settings every analysis recipe shares (prepare_run checks them first): the shard, the
    images, the caption length and the device; each error names its key and its value."""
    parse_shard(cfg.get("shard"))
    n = cfg.images.n
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"images.n={n!r}: the image set is empty; use a positive count or null for all")
    check_count("images.batch_size", cfg.images.batch_size)
    check_count("max_new_tokens", cfg.max_new_tokens)
    if str(cfg.device) not in available_devices():
        raise ValueError(f"device={cfg.device!r} is not available on this machine; available: "
                         f"{', '.join(available_devices())}")


def check_model_paths(cfg: DictConfig) -> None:
    """A model path that looks like a local folder (mmn.models.lm.looks_like_local_path, the
    loaders' own rule) must be a folder holding the model's config file. Said now, with its key,
    before the projection look-up, which would only say that no projection was trained for it."""
    from mmn.models.encoders import CONFIG_FILES
    from mmn.models.lm import looks_like_local_path

    kind = cfg.encoder.kind
    for group, config_file, what in (("lm", "config.json", "language model"),
                                     ("encoder", CONFIG_FILES.get(kind), f"{kind} encoder")):
        value = cfg[group].name_or_path
        name = str(value).removeprefix("local-dir:")  # open_clip's schema for a local folder
        if value is None or name.startswith("hf-hub:") or not looks_like_local_path(name):
            continue  # a hub id or a model name, which the loader resolves
        path = Path(name).expanduser()
        if not path.exists():
            problem = "no such folder"
        elif not path.is_dir():
            problem = "not a folder"
        elif config_file and not (path / config_file).is_file():
            problem = f"the folder holds no {config_file}, so it is not a saved {what}"
        else:
            continue
        raise FileNotFoundError(f"{group}.name_or_path={value}: {problem}")


def check_settings(cfg: DictConfig) -> None:
    """The analysis settings (method, filter, ablation, top_n), checked before anything loads;
    each error names its key. The settings every recipe shares: check_run_settings."""
    method = cfg.attribution.method
    if method not in METHODS:
        raise ValueError(f"attribution.method={method!r} is unknown; use one of {METHODS} "
                         f"(attribution=grad|ig|act)")
    if method == "ig":
        if cfg.attribution.rule not in IG_RULES:
            raise ValueError(f"attribution.rule={cfg.attribution.rule!r} is unknown; use one of {IG_RULES}")
        check_count("attribution.steps", cfg.attribution.steps, minimum=2)
        if cfg.attribution.steps_per_pass is not None:
            check_count("attribution.steps_per_pass", cfg.attribution.steps_per_pass)
    check_filter(cfg.filter.top_k, cfg.filter.min_words, cfg.filter.min_letters)
    if cfg.ablation.mode not in MODES:
        raise ValueError(f"ablation.mode={cfg.ablation.mode!r} is unknown; use one of {MODES}")
    if cfg.ablation.positions not in ("all", "image"):
        raise ValueError(f"ablation.positions={cfg.ablation.positions!r} is unknown; use all or image")
    if not OmegaConf.is_list(cfg.ablation.ks):  # a bare `ablation.ks=abc` would be read letter by letter
        raise ValueError(f"ablation.ks={cfg.ablation.ks!r} must be a list of unit counts or shares, "
                         f"e.g. ablation.ks=[0,100,1.5%]")
    try:
        resolve_sizes(list(cfg.ablation.ks), 1)
    except ValueError as error:
        raise ValueError(f"ablation.ks={list(cfg.ablation.ks)}: {error}") from None
    check_count("ablation.rows_per_pass", cfg.ablation.rows_per_pass)
    if cfg.ablation.mode == "mean":
        check_count("ablation.reference_images", cfg.ablation.reference_images)
    check_count("top_n", cfg.top_n)


def resolve_layers(layers: DictConfig, n_layers: int) -> list[int]:
    """layers.start .. layers.stop (exclusive; null = the last layer, negatives count from the end)."""
    start = layers.start + n_layers if layers.start < 0 else layers.start
    stop = n_layers if layers.stop is None else (layers.stop + n_layers if layers.stop < 0 else layers.stop)
    if not 0 <= start < stop <= n_layers:
        raise ValueError(f"layers.start={layers.start}, layers.stop={layers.stop}: not a layer range of this "
                         f"model, which has {n_layers} layers (0..{n_layers - 1}; stop is exclusive)")
    return list(range(start, stop))


def latest_projection(cfg: DictConfig) -> Path:
    """The newest projection train.py wrote (under outputs/ or multirun/) for this encoder and LM."""
    root = Path(cfg.paths.root_dir)
    wanted = (str(cfg.encoder.name_or_path), str(cfg.lm.name_or_path))
    found = []
    for folder in ("outputs", "multirun"):
        for path in (root / folder).glob("**/projection/projection.json"):
            trained = json.loads(path.read_text()).get("trained", {})
            if (str(trained.get("encoder", {}).get("name_or_path")), str(trained.get("lm", {}).get("name_or_path"))) == wanted:
                found.append(path)
    if not found:
        raise FileNotFoundError(f"projection.checkpoint=latest: no projection trained for encoder={wanted[0]} and "
                                f"lm={wanted[1]} under {root}/outputs or {root}/multirun; run `python train.py` "
                                f"first, or pass projection.checkpoint=<folder or proj.ckpt>")
    return max(found, key=lambda path: path.stat().st_mtime).parent


def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


# ----------------------------------------------------------------------------- one batch of images

def attribution_options(cfg: DictConfig) -> dict:
    """The method's own keyword arguments for `attribute` (IG's steps, rule and steps per pass)."""
    if cfg.attribution.method != "ig":
        return {}
    return {"steps": cfg.attribution.steps, "rule": cfg.attribution.rule,
            "steps_per_pass": cfg.attribution.steps_per_pass}


def captions_table(rows: list[dict], skipped: list[dict], batch_index: int) -> pd.DataFrame:
    """A batch's captions rows, with a row for each image that could not be read (read_images), in
    image order (the images' ids are sorted, and batches take them in order)."""
    rows = [{k: v for k, v in row.items() if k != "caption_ids"} for row in rows]
    rows += [untargeted_row(skip_reason=s["skip_reason"]) | {"image_id": s["image_id"], "file_name": s["file_name"]}
             for s in skipped]
    return pd.DataFrame([row | {"batch": batch_index} for row in sorted(rows, key=lambda row: row["image_id"])])


def analyze_batch(captioner: Captioner, images: list[dict], skipped: list[dict], cfg: DictConfig, layers: list[int],
                  ks: list[int], decoder: UnitDecoder, scorer, means, finder, batch_index: int
                  ) -> dict[str, pd.DataFrame]:
    """The tables of one batch: `images` the items read, `skipped` the skip rows of those that
    could not be (read_images)."""
    if not images:  # every image of the batch unreadable: only their rows
        return {"captions": captions_table([], skipped, batch_index), "neurons": pd.DataFrame(),
                "ablation": pd.DataFrame()}
    lm = captioner.lm
    pixels = captioner.preprocess([item["image"] for item in images])
    targets = caption_targets(captioner, pixels, finder, cfg.max_new_tokens)
    for row, item in zip(targets.rows, images):
        row.update(image_id=item["image_id"], file_name=item["file_name"])

    neurons, ablation = [], []
    if targets.kept:
        n_image = captioner.n_image_tokens
        scores = attribute(lm, cfg.attribution.method, targets.inputs_embeds, targets.target_positions,
                           targets.target_ids, layers, slice(0, n_image), **attribution_options(cfg))
        # scores: [kept, L, n_image, d_mlp]
        analysed, settings = [], []  # rows into the targets' tensors, and each one's ablation settings
        for i, b in enumerate(targets.kept):
            row = targets.rows[b]
            image_scores = scores[i].float()
            if not torch.isfinite(image_scores).all():
                row.update(skipped=True, skip_reason="non-finite attribution scores")
                continue
            triples = top_triples(image_scores, layers, cfg.top_n)
            decoder.decode([(t["layer"], t["unit"]) for t in triples])
            for t in triples:
                tokens, interpretable = decoder.known[(t["layer"], t["unit"])]
                neurons.append({"image_id": row["image_id"], **t, "neuron": neuron_name(t["layer"], t["unit"]),
                                "tokens": tokens, "interpretable": interpretable, "noun": row["noun"]})
            ranking = unit_ranking(image_scores, layers)
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + int(row["image_id"]))
            settings.append(ablation_settings(ranking, decoder.interpretable_units(ranking, max(ks)), ks, lm.d_mlp,
                                              generator))
            analysed.append(i)
        if analysed:
            index = torch.tensor(analysed)
            results = ablation_sweep(lm, targets.inputs_embeds[index], targets.target_positions[index],
                                     targets.target_ids[index], settings, layers, cfg.ablation.mode, means,
                                     n_prompt=targets.n_prompt, max_new_tokens=cfg.max_new_tokens,
                                     rows_per_pass=cfg.ablation.rows_per_pass,
                                     first_positions=n_image if cfg.ablation.positions == "image" else None)
            for i, image_results in zip(analysed, results):
                row = targets.rows[targets.kept[i]]
                for result in image_results:
                    caption = captioner.tokenizer.decode(result.pop("caption_ids"), skip_special_tokens=True).strip()
                    ablation.append({"image_id": row["image_id"], **result, "p_original": row["p_target"],
                                     "delta_p": result["p_target"] / row["p_target"] - 1.0,
                                     "caption": caption, "original_caption": row["caption"]})
    if ablation:
        f1 = scorer([r["caption"] for r in ablation], [r["original_caption"] for r in ablation])
        for r, score in zip(ablation, f1):
            r["bertscore"] = score
    return {"captions": captions_table(targets.rows, skipped, batch_index), "neurons": pd.DataFrame(neurons),
            "ablation": pd.DataFrame(ablation)}


# ----------------------------------------------------------------------------- summary

def ablation_curve_table(ablation: pd.DataFrame, n_units: int) -> pd.DataFrame:
    """Mean and standard error of delta p(c) and BERTScore per (arm, k), over images; `share` is k
    as a fraction of the n_units analysed units (the paper's 6,400 of GPT-J's 458,752: 0.014)."""
    grouped = ablation.groupby(["arm", "k"], sort=False)
    curves = grouped.agg(delta_p_mean=("delta_p", "mean"), delta_p_sem=("delta_p", "sem"),
                         bertscore_mean=("bertscore", "mean"), bertscore_sem=("bertscore", "sem"),
                         n_ablated_mean=("n_ablated", "mean"), images=("image_id", "nunique")).reset_index()
    curves.insert(2, "share", curves["k"] / n_units)
    return curves.sort_values(["arm", "k"], key=lambda c: c.map(ARMS.index) if c.name == "arm" else c)


def summarize(tables: dict[str, pd.DataFrame], curves: pd.DataFrame, seconds: float) -> dict:
    captions, neurons = tables["captions"], tables["neurons"]
    analysed = captions[~captions["skipped"]] if len(captions) else captions
    summary = {"images": len(captions), "images_analysed": len(analysed),
               "images_skipped": int(captions["skipped"].sum()) if len(captions) else 0,
               "skip_reasons": captions["skip_reason"].dropna().value_counts().to_dict() if len(captions) else {},
               "p_target_mean": float(analysed["p_target"].mean()) if len(analysed) else math.nan,
               "top_neurons_interpretable": float(neurons["interpretable"].mean()) if len(neurons) else math.nan,
               "unique_top_units": len(neurons.drop_duplicates(["layer", "unit"])) if len(neurons) else 0,
               "seconds": round(seconds, 1)}
    for row in curves.itertuples():
        summary[f"ablation/{row.arm}/k={row.k}/delta_p"] = row.delta_p_mean
        summary[f"ablation/{row.arm}/k={row.k}/bertscore"] = row.bertscore_mean
    return summary


# ----------------------------------------------------------------------------- analyze

def prepare_run(cfg: DictConfig, masks: bool = False) -> tuple[Path, CocoImages, int]:
    """What every analysis run does first: the shared settings checked (check_run_settings), its
    run directory (W&B offline files inside it), the Shapes world when the config points into it,
    the model paths checked and the projection checkpoint resolved, and the evaluation images
    (with their masks when `masks`).  -> (run_dir, images, how many of them to analyse)"""
    if cfg.paths.output_dir is None:
        raise ValueError("paths.output_dir is not set: run through the entry point (Hydra sets it) or pass it")
    check_run_settings(cfg)  # bad values fail before anything is built or loaded
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    offline_run_environment(run_dir)
    if cfg.logger.kind == "wandb":
        os.environ["WANDB_MODE"] = cfg.logger.mode
    if uses_world(cfg):
        ensure_world(cfg)  # before the model paths are checked: the world's parts live in its folder
    check_model_paths(cfg)
    if cfg.projection.checkpoint == "latest":
        with open_dict(cfg):
            cfg.projection.checkpoint = str(latest_projection(cfg))
    elif cfg.projection.checkpoint is not None and not Path(cfg.projection.checkpoint).exists():
        raise FileNotFoundError(f"projection.checkpoint={cfg.projection.checkpoint}: no such folder or file; pass "
                                f"a folder train.py wrote, LiMBeR's proj.ckpt, or latest")
    images = CocoImages(cfg.data.eval.root, cfg.data.eval.split, image_size=None, masks=masks)
    n_images = len(images) if cfg.images.n is None else min(cfg.images.n, len(images))
    if n_images == 0:
        raise ValueError(f"data.eval.root={cfg.data.eval.root} split {cfg.data.eval.split} holds no images")
    return run_dir, images, n_images


def depends_on(cfg: DictConfig, keys: tuple[str, ...], captioner: bool = True) -> dict:
    """What a run's results depend on, for its analysis.json: the config's `keys` and the seed,
    and with `captioner` the models, the projection's files, the images and the captioning keys."""
    if captioner:
        keys = ("encoder", "lm", "projection", "data", "images", "max_new_tokens", "first_noun", *keys)
    record = {key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
              for key in ("seed", *keys)}
    if captioner:
        record["projection_files"] = files_fingerprint(cfg.projection.checkpoint)
    return json.loads(json.dumps(record, default=str))  # JSON's own types, as analysis.json reads back


def shard_finished(cfg: DictConfig, store: ResultStore, n_batches: int) -> dict:
    """A shard that ends before the others: its batches are on disk; the last one merges."""
    done = len(store.done() & set(range(n_batches)))
    log.info("shard %s: its batches are written; %d of %d batches in %s; the run that finds all of them "
             "written merges the tables (or run again into that folder, with any shard or none)",
             cfg.shard, done, n_batches, store.dir)
    return {"shard": cfg.shard, "batches_done": done, "batches": n_batches}


def image_batches(n_images: int, batch_size: int) -> list[list[int]]:
    """The image indices 0..n_images-1 in batches; each batch is one resume point."""
    return [list(range(start, min(start + batch_size, n_images))) for start in range(0, n_images, batch_size)]


def read_images(images: CocoImages, indices) -> tuple[list[dict], list[dict]]:
    """The items of `indices` that can be used, and a skip row (image_id, file_name, skipped,
    skip_reason naming the file and why) for each that cannot: a missing, truncated or corrupt
    file, or (with masks) an annotation that cannot be made a mask. Losing a long run to one bad
    file is the last thing a user expects; the recipes record these rows and go on."""
    items, skipped = [], []
    for i in indices:
        try:
            items.append(images[i])
        except UnusableImage as error:
            log.warning("skipping image %s: %s", error.image_id, error)
            skipped.append({"image_id": error.image_id, "file_name": error.file_name, "skipped": True,
                            "skip_reason": str(error)})
    return items, skipped


def analyze(cfg: DictConfig) -> dict:
    """Run the analysis `cfg` describes; returns (and writes) its summary."""
    check_settings(cfg)
    started = time.perf_counter()
    run_dir, images, n_images = prepare_run(cfg)
    interpretable = InterpretableFilter(cfg.filter.top_k, cfg.filter.min_words, cfg.filter.min_letters,
                                        cfg.filter.dictionary)
    from mmn.analysis.bertscore import BertScorer

    scorer = BertScorer(cfg.bertscore.model, cfg.bertscore.num_layers)

    captioner = Captioner.from_config(cfg, device=resolve_device(cfg.device))
    layers = resolve_layers(cfg.layers, captioner.lm.n_layers)
    n_units = len(layers) * captioner.lm.d_mlp
    ks = resolve_sizes(list(cfg.ablation.ks), n_units)
    store = ResultStore(run_dir, depends_on(cfg, ("attribution", "layers", "filter", "ablation", "bertscore", "top_n")))
    means = load_means(cfg, captioner, images) if cfg.ablation.mode == "mean" else None
    decoder = UnitDecoder(captioner.lm, interpretable, cfg.filter.final_norm)
    finder = get_finder(cfg.first_noun)

    batches = image_batches(n_images, cfg.images.batch_size)
    todo = store.todo(len(batches), cfg.shard)
    for index in tqdm(todo, desc=f"analyse ({cfg.attribution.method})", unit="batch"):
        items, skipped = read_images(images, batches[index])
        tables = analyze_batch(captioner, items, skipped, cfg, layers, ks, decoder, scorer, means, finder, index)
        store.write_batch(index, tables)
    if not store.complete(len(batches)):
        return shard_finished(cfg, store, len(batches))

    tables = store.merge()
    curves = ablation_curve_table(tables["ablation"], n_units) if len(tables["ablation"]) else pd.DataFrame()
    summary = summarize(tables, curves, time.perf_counter() - started)
    summary |= {"method": cfg.attribution.method, "layers": f"{layers[0]}..{layers[-1]}", "ablation_mode": cfg.ablation.mode,
                "analysed_units": n_units,
                "projection": cfg.projection.checkpoint}
    figures_dir = run_dir / "figures"
    figures_dir.mkdir(exist_ok=True)
    figures = []
    title = f"{cfg.attribution.method}, layers {layers[0]}-{layers[-1]}, {cfg.ablation.mode} ablation, " \
            f"{summary['images_analysed']} images"
    if len(curves):
        write_parquet(curves, run_dir / "ablation_curves.parquet")
        figures.append(ablation_curves(curves, figures_dir / "ablation_curves.png", title))
    if len(tables["neurons"]):
        figures.append(layer_distribution(tables["neurons"], captioner.lm.n_layers,
                                          figures_dir / "layer_distribution.png"))
    write_parquet(pd.DataFrame([{"metric": k, "value": str(v)} for k, v in summary.items()]), run_dir / "summary.parquet")
    write_json(summary, run_dir / "summary.json")
    neurons = tables["neurons"].assign(tokens=lambda f: f["tokens"].map(" | ".join)) \
        if len(tables["neurons"]) else tables["neurons"]
    loggers = make_loggers(cfg, run_dir)
    log_results(loggers, summary, {"captions": tables["captions"], "neurons": neurons, "ablation_curves": curves},
                figures)
    finish(loggers)
    log.info("analysed %d of %d images in %.0f s -> %s", summary["images_analysed"], summary["images"],
             summary["seconds"], run_dir)
    return summary


def load_means(cfg: DictConfig, captioner: Captioner, images: CocoImages) -> dict[int, torch.Tensor]:
    """Mean unit activations over the reference images, computed once per captioner and image set
    and cached under paths.cache_dir/means/."""
    from safetensors.torch import load_file, save_file

    n = min(cfg.ablation.reference_images, len(images))
    key = digest(cfg.encoder, cfg.lm, cfg.data.eval, n, files_fingerprint(cfg.projection.checkpoint),
                 files_fingerprint(cfg.lm.name_or_path))
    path = Path(cfg.paths.cache_dir) / "means" / f"{key}.safetensors"
    if path.is_file():
        return {int(layer): tensor for layer, tensor in load_file(str(path)).items()}

    def pixel_batches():  # the readable reference images (read_images logs the others)
        for indices in image_batches(n, cfg.images.batch_size):
            items, _ = read_images(images, indices)
            if items:
                yield captioner.preprocess([item["image"] for item in items])

    batches = tqdm(pixel_batches(), total=math.ceil(n / cfg.images.batch_size), desc="mean activations")
    means = mean_activations(captioner, batches)
    atomic_write(path, lambda temporary: save_file({str(layer): t.contiguous() for layer, t in means.items()},
                                                   str(temporary)))
    return means
