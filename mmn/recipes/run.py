"""The backbone every recipe stands on: a `Run` owns the run directory, the offline environment,
the Shapes world, the evaluation images, the result store (resume and shards), the summary and
the loggers; a recipe supplies its setup, its per-batch work and its finalisation:

    run = Run(cfg)                                     # settings checked, folder, world, images
    captioner = run.captioner()                        # the trained captioner on cfg.device
    run.results(run.depends_on(("attribution",)), tables=("neurons", "captions"))
    tables = run.each_batch(run.n_images, work, desc="analyse")   # work(index, image indices) -> tables
    if tables is None:                                 # a shard that ends before the others
        return run.shard_finished()
    return run.finish(summary, tables={...}, figures=[...])        # summary.json + .parquet, W&B

The config adapters live here too: the captioner built from the `encoder`, `projection` and `lm`
groups, the settings checks every recipe shares, and the newest-run look-ups (`latest`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm.auto import tqdm

from mmn.analysis.ablation import MODES, resolve_sizes
from mmn.analysis.attribution import IG_RULES, METHODS
from mmn.analysis.filter import InterpretableFilter, check_filter
from mmn.analysis.neurons import UnitDecoder, caption_and_attribute, unit_ranking
from mmn.analysis.results import ResultStore, parse_shard
from mmn.config import files_fingerprint, offline_run_environment
from mmn.data.coco import CocoImages, UnusableImage
from mmn.files import looks_like_local_path, write_json, write_parquet
from mmn.models.captioner import Captioner, check_widths
from mmn.models.encoders import CONFIG_FILES, load_encoder
from mmn.models.lm import LanguageModel
from mmn.models.projection import CONFIG_FILE, Projection
from mmn.models.targets import get_finder
from mmn.recipes.loggers import finish, log_results, make_loggers

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


def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def check_run_settings(cfg: DictConfig) -> None:
    """The settings every analysis recipe shares (Run checks them first): the shard, the images,
    the caption length and the device; each error names its key and its value."""
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
    """A model path that looks like a local folder (mmn.files.looks_like_local_path, the loaders'
    own rule) must be a folder holding the model's config file. Said now, with its key, before
    the projection look-up, which would only say that no projection was trained for it."""
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


def check_analysis_settings(cfg: DictConfig) -> None:
    """The settings of the recipes that find top units (method, filter, ablation, top_n), checked
    before anything loads; each error names its key."""
    method = cfg.attribution.method
    if method not in METHODS:
        raise ValueError(f"attribution.method={method!r} is unknown; use one of {METHODS} "
                         f"(attribution={'|'.join(METHODS)})")
    if method == "ig":
        if cfg.attribution.rule not in IG_RULES:
            raise ValueError(f"attribution.rule={cfg.attribution.rule!r} is unknown; use one of {IG_RULES}")
        check_count("attribution.steps", cfg.attribution.steps, minimum=2)
        if cfg.attribution.steps_per_pass is not None:
            check_count("attribution.steps_per_pass", cfg.attribution.steps_per_pass)
    if method == "logit" and not isinstance(cfg.attribution.final_norm, bool):
        raise ValueError(f"attribution.final_norm={cfg.attribution.final_norm!r} must be true or false")
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


def attribution_options(cfg: DictConfig) -> dict:
    """The method's own keyword arguments for `attribute` (IG's steps, rule and steps per pass;
    logit's final_norm)."""
    if cfg.attribution.method == "logit":
        return {"final_norm": cfg.attribution.final_norm}
    if cfg.attribution.method != "ig":
        return {}
    return {"steps": cfg.attribution.steps, "rule": cfg.attribution.rule,
            "steps_per_pass": cfg.attribution.steps_per_pass}


def seeded(seed: int, key: int) -> torch.Generator:
    """The generator of one image (key: its id) or one batch (key: its index): a resumed or
    sharded run draws the same random units and vectors as an uninterrupted one."""
    return torch.Generator().manual_seed(seed * 1_000_003 + int(key))


# ----------------------------------------------------------------------------- inputs

def uses_world(cfg: DictConfig) -> bool:
    """Whether any model or data path of the config lies in the Shapes world's folder."""
    world = str(cfg.world.dir)
    paths = [cfg.lm.name_or_path, cfg.encoder.name_or_path, cfg.data.train.source, cfg.data.eval.root]
    return any(str(path).startswith(world) for path in paths if path is not None)


def ensure_world(cfg: DictConfig) -> None:
    """Build (or load from the cache or the repository's shipped parts) the world `cfg` names."""
    from mmn.world.build import build_configured_world

    build_configured_world(cfg.world)


def newest(root: str | Path, pattern: str, matches: Callable[[Path], bool]) -> Path | None:
    """The newest file matching `pattern` under root/outputs and root/multirun (the folders the
    entry points write) for which matches(path) holds; None when there is none."""
    root = Path(root)
    found = [path for folder in ("outputs", "multirun") for path in (root / folder).glob(pattern) if matches(path)]
    return max(found, key=lambda path: path.stat().st_mtime) if found else None


def latest_projection(cfg: DictConfig) -> Path:
    """The newest projection train.py wrote for this encoder and LM (projection.checkpoint=latest)."""
    wanted = (str(cfg.encoder.name_or_path), str(cfg.lm.name_or_path))

    def trained_for_these(path: Path) -> bool:
        trained = json.loads(path.read_text()).get("trained", {})
        return (str(trained.get("encoder", {}).get("name_or_path")),
                str(trained.get("lm", {}).get("name_or_path"))) == wanted

    found = newest(cfg.paths.root_dir, "**/projection/projection.json", trained_for_these)
    if found is None:
        raise FileNotFoundError(f"projection.checkpoint=latest: no projection trained for encoder={wanted[0]} and "
                                f"lm={wanted[1]} under {cfg.paths.root_dir}/outputs or {cfg.paths.root_dir}/multirun; "
                                f"run `python train.py` first, or pass projection.checkpoint=<folder or proj.ckpt>")
    return found.parent


def latest_analysis(cfg: DictConfig) -> Path:
    """The newest analyze.py run (a folder holding neurons.parquet) of this config's evaluation
    images (analysis=latest)."""
    wanted = OmegaConf.to_container(cfg.data.eval, resolve=True)

    def of_these_images(path: Path) -> bool:
        record = path.parent / "analysis.json"
        return record.is_file() and json.loads(record.read_text()).get("data", {}).get("eval") == wanted

    found = newest(cfg.paths.root_dir, "**/neurons.parquet", of_these_images)
    if found is None:
        raise FileNotFoundError(f"analysis=latest: no analyze.py run of {cfg.data.eval.root} under "
                                f"{cfg.paths.root_dir}/outputs or {cfg.paths.root_dir}/multirun; run "
                                f"`python analyze.py` first, or pass analysis=<run folder>")
    return found.parent


def uses_llavas_projector(cfg: DictConfig) -> bool:
    """projection.checkpoint names the LLaVA checkpoint the LM comes from (model=llava): the
    captioner takes that LLaVA's own projector, from the weights the LM loads anyway."""
    return cfg.projection.checkpoint is not None and str(cfg.projection.checkpoint) == str(cfg.lm.name_or_path)


def load_projection(projection: DictConfig, d_enc: int, d_lm: int) -> Projection:
    """A saved projection (a folder with projection.json), LLaVA's projector (a LLaVA checkpoint
    folder or .safetensors file), LiMBeR's `proj.ckpt`, or a fresh one when `checkpoint` is null."""
    if projection.checkpoint is None:
        return Projection(d_enc, d_lm, kind=projection.kind, n_out_tokens=projection.n_out_tokens,
                          dropout=projection.dropout, max_norm=projection.get("max_norm"))
    path = Path(projection.checkpoint)
    if (path / CONFIG_FILE).is_file():
        return Projection.load(path)
    if path.is_dir() or path.suffix == ".safetensors":
        return Projection.from_llava_checkpoint(path, dropout=projection.dropout)
    return Projection.from_limber_checkpoint(path, dropout=projection.dropout)


def encoder_options(encoder: DictConfig) -> dict:
    """The encoder group's keys beyond kind, name_or_path and pretrained (clip_vision's feature_layer,
    resize_mode), as load_encoder's keyword arguments; null ones keep the loader's default."""
    options = OmegaConf.to_container(encoder, resolve=True)
    return {key: value for key, value in options.items()
            if key not in ("kind", "name_or_path", "pretrained") and value is not None}


def load_captioner(cfg: DictConfig, device: str = "cpu") -> Captioner:
    """The captioner of the `encoder`, `projection` and `lm` groups, or of a LLaVA checkpoint when
    lm.name_or_path is one (load_llava_captioner). Widths are checked from the LM's config before its
    weights load, so a mismatch is said in seconds, not after loading a 6B model."""
    from transformers import AutoConfig

    lm_config = AutoConfig.from_pretrained(cfg.lm.name_or_path, revision=cfg.lm.revision)
    if lm_config.model_type == "llava":
        return load_llava_captioner(cfg, lm_config, device)
    encoder = load_encoder(cfg.encoder.kind, cfg.encoder.name_or_path, pretrained=cfg.encoder.pretrained,
                           **encoder_options(cfg.encoder))
    lm_width = lm_config.hidden_size
    projection = load_projection(cfg.projection, encoder.width, lm_width)
    check_widths(encoder.width, projection, lm_width, where=f" between encoder={cfg.encoder.name_or_path}, "
                 f"projection={cfg.projection.checkpoint} and lm={cfg.lm.name_or_path}")
    lm = LanguageModel.from_pretrained(cfg.lm.name_or_path, dtype=cfg.lm.dtype, revision=cfg.lm.revision,
                                       device=device)
    return Captioner(encoder, projection, lm).to(device).eval()


def load_llava_captioner(cfg: DictConfig, config, device: str) -> Captioner:
    """model=llava: the vision tower, LM and processor of the LLaVA checkpoint lm.name_or_path, from
    one load of its weights (mmn.models.llava), with its own projector (projection.checkpoint is
    that checkpoint) or the projection the `projection` group names (a train.py folder, latest,
    null for a fresh one). The LLaVA's tower is the encoder: the encoder group must name it."""
    from mmn.models.llava import feature_layers, load_llava

    encoder = cfg.encoder
    if encoder.kind != "clip_vision" or str(encoder.name_or_path) != str(cfg.lm.name_or_path):
        raise ValueError(f"lm.name_or_path={cfg.lm.name_or_path} is a LLaVA checkpoint, whose vision tower is the "
                         f"encoder: use encoder=llava (kind clip_vision, name_or_path ${{lm.name_or_path}}), not "
                         f"encoder.kind={encoder.kind} encoder.name_or_path={encoder.name_or_path}; model=llava "
                         f"sets both")
    options = encoder_options(encoder)
    projection = None
    if not uses_llavas_projector(cfg):
        d_enc = config.vision_config.hidden_size * len(feature_layers(config, options.get("feature_layer")))
        projection = load_projection(cfg.projection, d_enc, config.text_config.hidden_size)
    return load_llava(cfg.lm.name_or_path, dtype=cfg.lm.dtype, revision=cfg.lm.revision, device=device,
                      instruction=cfg.lm.instruction, answer_start=cfg.lm.answer_start,
                      feature_layer=options.get("feature_layer"), resize_mode=options.get("resize_mode"),
                      projection=projection)


def image_batches(n_images: int, batch_size: int) -> list[list[int]]:
    """The image indices 0..n_images-1 in batches; each batch is one resume point."""
    return [list(range(start, min(start + batch_size, n_images))) for start in range(0, n_images, batch_size)]


# ----------------------------------------------------------------------------- the run

class Run:
    """One recipe's run into cfg.paths.output_dir (Hydra sets it).

    With `images` (every analysis recipe): the shared settings checked, the Shapes world built
    when the config points into it, the model paths checked, projection.checkpoint=latest
    resolved, and the evaluation images opened (with their masks when `masks`)."""

    def __init__(self, cfg: DictConfig, *, images: bool = True, masks: bool = False):
        if cfg.paths.output_dir is None:
            raise ValueError("paths.output_dir is not set: run through the entry point (Hydra sets it) or pass it")
        if images:
            check_run_settings(cfg)  # bad values fail before anything is built or loaded
        self.cfg, self.started = cfg, time.perf_counter()
        self.dir = Path(cfg.paths.output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        offline_run_environment(self.dir)
        if cfg.logger.kind == "wandb":
            os.environ["WANDB_MODE"] = cfg.logger.mode
        self.store: ResultStore | None = None
        self.images, self.n_images = None, 0
        if not images:
            return
        if uses_world(cfg):
            ensure_world(cfg)  # before the model paths are checked: the world's parts live in its folder
        check_model_paths(cfg)
        if cfg.projection.checkpoint == "latest":
            with open_dict(cfg):
                cfg.projection.checkpoint = str(latest_projection(cfg))
        elif (cfg.projection.checkpoint is not None and not uses_llavas_projector(cfg)
              and not Path(cfg.projection.checkpoint).exists()):
            raise FileNotFoundError(f"projection.checkpoint={cfg.projection.checkpoint}: no such folder or file; "
                                    f"pass a folder train.py wrote, LiMBeR's proj.ckpt, or latest")
        self.images = CocoImages(cfg.data.eval.root, cfg.data.eval.split, image_size=None, masks=masks)
        self.n_images = len(self.images) if cfg.images.n is None else min(cfg.images.n, len(self.images))
        if self.n_images == 0:
            raise ValueError(f"data.eval.root={cfg.data.eval.root} split {cfg.data.eval.split} holds no images")

    def captioner(self) -> Captioner:
        return load_captioner(self.cfg, device=resolve_device(self.cfg.device))

    def depends_on(self, keys: tuple[str, ...], captioner: bool = True) -> dict:
        """What the run's results depend on, for its analysis.json: the config's `keys` and the
        seed, and with `captioner` the models, the projection's files, the images and the
        captioning keys."""
        cfg = self.cfg
        if captioner:
            keys = ("encoder", "lm", "projection", "data", "images", "max_new_tokens", "first_noun", *keys)
        record = {key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
                  for key in ("seed", *keys)}
        if captioner:
            record["projection_files"] = files_fingerprint(cfg.projection.checkpoint)
        return json.loads(json.dumps(record, default=str))  # JSON's own types, as analysis.json reads back

    def results(self, depends_on: dict, tables: tuple[str, ...]) -> ResultStore:
        """The run's result store; a folder holding another analysis's results is an error now."""
        self.store = ResultStore(self.dir, depends_on, tables=tables)
        return self.store

    def read_images(self, indices: Sequence[int]) -> tuple[list[dict], list[dict]]:
        """The items of `indices` that can be used, and a skip row (image_id, file_name, skipped,
        skip_reason naming the file and why) for each that cannot: a missing, truncated or
        corrupt file, or (with masks) an annotation that cannot be made a mask. Losing a long run
        to one bad file is the last thing a user expects; the recipes record these rows and go on."""
        items, skipped = [], []
        for i in indices:
            try:
                items.append(self.images[i])
            except UnusableImage as error:
                log.warning("skipping image %s: %s", error.image_id, error)
                skipped.append({"image_id": error.image_id, "file_name": error.file_name, "skipped": True,
                                "skip_reason": str(error)})
        return items, skipped

    def each_batch(self, n_items: int, work: Callable[[int, list[int]], dict[str, pd.DataFrame]], desc: str
                   ) -> dict[str, pd.DataFrame] | None:
        """work(batch index, item indices) -> the batch's tables, for the batches of this shard
        not on disk yet (images.batch_size items each); then the merged tables, or None while
        other shards' batches are missing."""
        batches = image_batches(n_items, self.cfg.images.batch_size)
        self.n_batches = len(batches)
        for index in tqdm(self.store.todo(len(batches), self.cfg.shard), desc=desc, unit="batch"):
            self.store.write_batch(index, work(index, batches[index]))
        return self.store.merge() if self.store.complete(len(batches)) else None

    def shard_finished(self) -> dict:
        """A shard that ends before the others: its batches are on disk; the last one merges."""
        done = len(self.store.done() & set(range(self.n_batches)))
        log.info("shard %s: its batches are written; %d of %d batches in %s; the run that finds all of them "
                 "written merges the tables (or run again into that folder, with any shard or none)",
                 self.cfg.shard, done, self.n_batches, self.store.dir)
        return {"shard": self.cfg.shard, "batches_done": done, "batches": self.n_batches}

    def figure(self, name: str) -> Path:
        """Where the figure `name` goes: run_dir/figures/name."""
        (self.dir / "figures").mkdir(exist_ok=True)
        return self.dir / "figures" / name

    def finish(self, summary: dict, tables: dict[str, pd.DataFrame] | None = None, figures: Sequence[Path] = (),
               ) -> dict:
        """Write summary.json (and summary.parquet), with the run's seconds; log the summary's
        numbers, `tables` and `figures` to the configured loggers; return the summary."""
        summary = {**summary, "seconds": round(time.perf_counter() - self.started, 1)}
        write_parquet(pd.DataFrame([{"metric": k, "value": str(v)} for k, v in summary.items()]),
                      self.dir / "summary.parquet")
        write_json(summary, self.dir / "summary.json")
        loggers = make_loggers(self.cfg, self.dir)
        log_results(loggers, summary, tables or {}, figures)
        finish(loggers)
        return summary


# ----------------------------------------------------------------------------- top units of an image

class TopUnits:
    """Each image's multimodal neurons as analyze.py finds them: caption it, attribute y^c
    (cfg.attribution over cfg.layers) and take the best units by their best patch, interpretable
    ones only by default (cfg.filter). The receptive-field and selectivity recipes use it."""

    def __init__(self, captioner: Captioner, cfg: DictConfig):
        self.captioner, self.cfg = captioner, cfg
        self.layers = resolve_layers(cfg.layers, captioner.lm.n_layers)
        self.decoder = UnitDecoder(captioner.lm, interpretable_filter(cfg.filter), cfg.filter.final_norm)
        self.finder = get_finder(cfg.first_noun)

    def __call__(self, items: Sequence[dict], n_units: int, interpretable: bool = True) -> list[dict]:
        """-> per image {image_id, noun, units [n, 2] of (layer, unit) or None, skip_reason}"""
        if not items:  # a batch whose every image was unreadable
            return []
        captioner, cfg = self.captioner, self.cfg
        targets, scores = caption_and_attribute(captioner, captioner.preprocess([item["image"] for item in items]),
                                                self.finder, cfg.attribution.method, self.layers, cfg.max_new_tokens,
                                                **attribution_options(cfg))
        found = [{"image_id": item["image_id"], "noun": row["noun"], "units": None, "skip_reason": row["skip_reason"]}
                 for item, row in zip(items, targets.rows)]
        for i, image_scores in scores.items():
            b = targets.kept[i]
            ranking = unit_ranking(image_scores, self.layers)  # [units, 2]
            units = self.decoder.interpretable_units(ranking, n_units) if interpretable else ranking[:n_units]
            found[b]["units"] = units if len(units) else None
            found[b]["skip_reason"] = None if len(units) else "no interpretable unit"
        return found


def interpretable_filter(settings: DictConfig) -> InterpretableFilter:
    """The `filter` group's interpretable filter."""
    return InterpretableFilter(settings.top_k, settings.min_words, settings.min_letters, settings.dictionary)
