"""`python analyze.py`: the paper's core procedure (sections 2 and 3.3) on a trained captioner.

    analyze(cfg)
      0. check the settings (method, filter, ablation, images, device, model paths) before anything loads
      1. the run (Run: folder, the Shapes world when the config points into it, the images) and the
         captioner with its trained projection
      2. per batch of images, skipping batches already on disk (an image that cannot be read is a
         recorded skip, Run.read_images):
           caption greedily, find c and p(c), attribute y^c
             to every (layer, unit, patch)                               neurons.caption_and_attribute
           the top N triples per image, decoded, interpretable or not     neurons.py
           ablate top / top interpretable / random units for each k:
             delta p(c), the re-generated caption and its BERTScore      ablation.py, bertscore.py
           write the batch's parts                                        results.py
      3. merge the tables, summarise, draw the figures, log all of it to W&B

Run directory: captions.parquet, neurons.parquet, ablation.parquet, ablation_curves.parquet,
summary.parquet (+ .json), figures/*.png, analysis.json (what the results depend on), parts/
(per batch), wandb/.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from mmn.analysis.ablation import ABLATION_ARMS, ablation_settings, ablation_sweep, mean_activations, resolve_sizes
from mmn.analysis.attribution import ig_completeness
from mmn.analysis.bertscore import BertScorer
from mmn.analysis.captions import untargeted_row
from mmn.analysis.cards import CardUnit, neuron_card
from mmn.analysis.figures import ablation_curves, layer_distribution
from mmn.analysis.neurons import UnitDecoder, caption_and_attribute, neuron_name, top_triples, unit_ranking
from mmn.analysis.receptive_fields import unit_activation_maps
from mmn.analysis.stats import with_intervals
from mmn.config import digest, files_fingerprint
from mmn.files import atomic_write, write_parquet
from mmn.models.captioner import Captioner
from mmn.models.targets import get_finder
from mmn.recipes.run import (
    Run,
    attribution_options,
    check_analysis_settings,
    check_count,
    image_batches,
    interpretable_filter,
    resolve_layers,
    seeded,
)

log = logging.getLogger(__name__)


def captions_table(rows: list[dict], skipped: list[dict], batch_index: int) -> pd.DataFrame:
    """A batch's captions rows, with a row for each image that could not be read, in image order
    (the images' ids are sorted, and batches take them in order)."""
    rows = [{k: v for k, v in row.items() if k != "caption_ids"} for row in rows]
    rows += [untargeted_row(skip_reason=s["skip_reason"]) | {"image_id": s["image_id"], "file_name": s["file_name"]}
             for s in skipped]
    return pd.DataFrame([row | {"batch": batch_index} for row in sorted(rows, key=lambda row: row["image_id"])])


def draw_cards(captioner: Captioner, images: list[dict], pixels: torch.Tensor, targets, scores: dict,
               layers: list[int], decoder: UnitDecoder, wanted: set[int], n_units: int, folder: Path) -> list[dict]:
    """The neuron cards (mmn.analysis.cards) of the analysed images whose ids are in `wanted`, one
    PNG each in `folder`: the top n_units units by their best patch, their activation maps (one
    forward pass over these images) and their score maps. -> one row per (image, unit)"""
    # (row of the targets' tensors, image) of each card
    chosen = [(i, targets.kept[i]) for i in scores if images[targets.kept[i]]["image_id"] in wanted]
    if not chosen:
        return []
    units = {i: unit_ranking(scores[i], layers)[:n_units] for i, _ in chosen}  # [n_units, 2] each
    every_unit = torch.cat(list(units.values())).unique(dim=0)  # [n_distinct, 2]
    column = {tuple(pair): j for j, pair in enumerate(every_unit.tolist())}
    maps = unit_activation_maps(captioner, pixels[[b for _, b in chosen]], every_unit)  # [cards, units, gh, gw]
    grid = maps.shape[2:]
    rows = []
    for card, (i, b) in enumerate(chosen):
        row, item = targets.rows[b], images[b]
        shown = []
        for layer, unit in units[i].tolist():
            tokens, interpretable = decoder(layer, unit)
            shown.append(CardUnit(neuron_name(layer, unit), tokens, interpretable, maps[card, column[(layer, unit)]],
                                  scores[i][layers.index(layer), :, unit].reshape(grid)))
        path = folder / f"card_{item['image_id']}.png"
        seen = captioner.encoder.resize(item["image"])  # what the patches cover: the squashed image or its centre crop
        atomic_write(path, lambda temporary: neuron_card(seen, row["caption"], row["noun"], shown)
                     .save(temporary, format="PNG"))
        rows += [{"image_id": item["image_id"], "caption": row["caption"], "noun": row["noun"], "rank": rank,
                  "neuron": u.name, "tokens": " | ".join(u.tokens), "interpretable": u.interpretable,
                  "card": str(path)} for rank, u in enumerate(shown)]
    return rows


def analyze_batch(captioner: Captioner, images: list[dict], skipped: list[dict], cfg: DictConfig, layers: list[int],
                  ks: list[int], decoder: UnitDecoder, scorer, means, finder, batch_index: int,
                  card_ids: set[int] = frozenset(), cards_dir: Path | None = None) -> dict[str, pd.DataFrame]:
    """The tables of one batch: `images` the items read, `skipped` the skip rows of those that
    could not be (Run.read_images); the images in card_ids get a neuron card in cards_dir."""
    if not images:  # every image of the batch unreadable: only their rows
        return {"captions": captions_table([], skipped, batch_index), "neurons": pd.DataFrame(),
                "ablation": pd.DataFrame(), "cards": pd.DataFrame(), "completeness": pd.DataFrame()}
    lm = captioner.lm
    pixels = captioner.preprocess([item["image"] for item in images])
    targets, scores = caption_and_attribute(captioner, pixels, finder, cfg.attribution.method, layers,
                                            cfg.max_new_tokens, **attribution_options(cfg))
    for row, item in zip(targets.rows, images):
        row.update(image_id=item["image_id"], file_name=item["file_name"])

    neurons, ablation, settings = [], [], []  # settings: each analysed image's ablation settings
    for i, image_scores in scores.items():  # i: a row of the targets' tensors
        row = targets.rows[targets.kept[i]]
        triples = top_triples(image_scores, layers, cfg.top_n)
        decoder.decode([(t["layer"], t["unit"]) for t in triples])
        for t in triples:
            tokens, interpretable = decoder.known[(t["layer"], t["unit"])]
            neurons.append({"image_id": row["image_id"], **t, "neuron": neuron_name(t["layer"], t["unit"]),
                            "tokens": tokens, "interpretable": interpretable, "noun": row["noun"]})
        ranking = unit_ranking(image_scores, layers)
        settings.append(ablation_settings(ranking, decoder.interpretable_units(ranking, max(ks)), ks, lm.d_mlp,
                                          seeded(cfg.seed, row["image_id"])))
    if scores:
        index = torch.tensor(list(scores))
        results = ablation_sweep(lm, targets.inputs_embeds[index], targets.target_positions[index],
                                 targets.target_ids[index], settings, layers, cfg.ablation.mode, means,
                                 n_prompt=targets.n_prompt, max_new_tokens=cfg.max_new_tokens,
                                 rows_per_pass=cfg.ablation.rows_per_pass,
                                 positions=captioner.image_positions if cfg.ablation.positions == "image" else None)
        for i, image_results in zip(scores, results):
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
    cards = draw_cards(captioner, images, pixels, targets, scores, layers, decoder, card_ids, cfg.cards.units,
                       cards_dir) if card_ids and cards_dir is not None else []
    completeness = []  # IG's check that its steps suffice, on the first batch's images
    if cfg.attribution.method == "ig" and batch_index == 0 and scores:
        index = torch.tensor(list(scores))
        completeness = [{"image_id": targets.rows[targets.kept[int(index[row["row"]])]]["image_id"],
                         **{k: v for k, v in row.items() if k != "row"}}
                        for row in ig_completeness(lm, targets.inputs_embeds[index], targets.target_positions[index],
                                                   targets.target_ids[index], layers, **attribution_options(cfg))]
    return {"captions": captions_table(targets.rows, skipped, batch_index), "neurons": pd.DataFrame(neurons),
            "ablation": pd.DataFrame(ablation), "cards": pd.DataFrame(cards),
            "completeness": pd.DataFrame(completeness)}


def cards_possible(captioner: Captioner) -> bool:
    """Cards draw maps on the patch grid: an encoder with one, and one image prompt per patch."""
    grid = captioner.encoder.grid
    if grid is None or captioner.n_image_tokens != grid[0] * grid[1]:
        log.info("no neuron cards: the image prompts are not one per patch of a grid (encoder %s, projection %s)",
                 type(captioner.encoder).__name__, captioner.projection.kind)
        return False
    return True


def ablation_curve_table(ablation: pd.DataFrame, n_units: int, resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Mean and standard error of delta p(c) and BERTScore per (arm, k), over images, and a 95%
    bootstrap interval of each mean (delta_p_low/high, bertscore_low/high: `resamples` resamples of
    the images, seeded by `seed`, the same draws for every (arm, k); stats.bootstrap_ci); `share` is
    k as a fraction of the n_units analysed units (the paper's 6,400 of GPT-J's 458,752: 0.014)."""
    grouped = ablation.groupby(["arm", "k"], sort=False)
    curves = grouped.agg(delta_p_mean=("delta_p", "mean"), delta_p_sem=("delta_p", "sem"),
                         bertscore_mean=("bertscore", "mean"), bertscore_sem=("bertscore", "sem"),
                         n_ablated_mean=("n_ablated", "mean"), images=("image_id", "nunique")).reset_index()
    by_image = ablation.sort_values("image_id", kind="stable")  # every (arm, k) resamples the same images
    curves = with_intervals(curves, by_image, ["arm", "k"], ("delta_p", "bertscore"), resamples, seed)
    curves.insert(2, "share", curves["k"] / n_units)
    return curves.sort_values(["arm", "k"], key=lambda c: c.map(ABLATION_ARMS.index) if c.name == "arm" else c)


def ig_gaps(completeness: pd.DataFrame) -> dict:
    """IG's completeness gap (attribution.ig_completeness) for the summary: the mean relative gap
    per layer and over all, on the first batch's images; nothing for the other methods."""
    if not len(completeness):
        return {}
    per_layer = completeness.groupby("layer")["relative_gap"].mean()
    return {"ig_completeness/relative_gap": float(completeness["relative_gap"].mean()),
            **{f"ig_completeness/layer={layer}/relative_gap": float(gap) for layer, gap in per_layer.items()}}


def summarize(tables: dict[str, pd.DataFrame], curves: pd.DataFrame) -> dict:
    captions, neurons = tables["captions"], tables["neurons"]
    analysed = captions[~captions["skipped"]] if len(captions) else captions
    summary = {"images": len(captions), "images_analysed": len(analysed),
               "images_skipped": int(captions["skipped"].sum()) if len(captions) else 0,
               "skip_reasons": captions["skip_reason"].dropna().value_counts().to_dict() if len(captions) else {},
               "p_target_mean": float(analysed["p_target"].mean()) if len(analysed) else math.nan,
               "top_neurons_interpretable": float(neurons["interpretable"].mean()) if len(neurons) else math.nan,
               "unique_top_units": len(neurons.drop_duplicates(["layer", "unit"])) if len(neurons) else 0}
    for row in curves.itertuples():
        summary[f"ablation/{row.arm}/k={row.k}/delta_p"] = row.delta_p_mean
        summary[f"ablation/{row.arm}/k={row.k}/bertscore"] = row.bertscore_mean
    return summary


def load_means(cfg: DictConfig, run: Run, captioner: Captioner) -> dict[int, torch.Tensor]:
    """Mean unit activations over the reference images, computed once per captioner and image set
    and cached under paths.cache_dir/means/."""
    from safetensors.torch import load_file, save_file

    n = min(cfg.ablation.reference_images, len(run.images))
    key = digest(cfg.encoder, cfg.lm, cfg.data.eval, n, files_fingerprint(cfg.projection.checkpoint),
                 files_fingerprint(cfg.lm.name_or_path))
    path = Path(cfg.paths.cache_dir) / "means" / f"{key}.safetensors"
    if path.is_file():
        return {int(layer): tensor for layer, tensor in load_file(str(path)).items()}

    def pixel_batches():  # the readable reference images (read_images logs the others)
        for indices in image_batches(n, cfg.images.batch_size):
            items, _ = run.read_images(indices)
            if items:
                yield captioner.preprocess([item["image"] for item in items])

    batches = tqdm(pixel_batches(), total=math.ceil(n / cfg.images.batch_size), desc="mean activations")
    means = mean_activations(captioner, batches)
    atomic_write(path, lambda temporary: save_file({str(layer): t.contiguous() for layer, t in means.items()},
                                                   str(temporary)))
    return means


def analyze(cfg: DictConfig) -> dict:
    """Run the analysis `cfg` describes; returns (and writes) its summary."""
    check_analysis_settings(cfg)
    check_count("cards.images", cfg.cards.images, minimum=0)
    check_count("cards.units", cfg.cards.units)
    check_count("bootstrap.resamples", cfg.bootstrap.resamples)
    run = Run(cfg)
    interpretable = interpretable_filter(cfg.filter)
    scorer = BertScorer(cfg.bertscore.model, cfg.bertscore.num_layers)
    captioner = run.captioner()
    layers = resolve_layers(cfg.layers, captioner.lm.n_layers)
    n_units = len(layers) * captioner.lm.d_mlp
    ks = resolve_sizes(list(cfg.ablation.ks), n_units)
    run.results(run.depends_on(("attribution", "layers", "filter", "ablation", "bertscore", "top_n", "cards")),
                tables=("neurons", "ablation", "cards", "completeness", "captions"))
    means = load_means(cfg, run, captioner) if cfg.ablation.mode == "mean" else None
    decoder = UnitDecoder(captioner.lm, interpretable, cfg.filter.final_norm)
    finder = get_finder(cfg.first_noun)
    card_ids = set(run.images.image_ids[: min(cfg.cards.images, run.n_images)]) if cards_possible(captioner) else set()
    cards_dir = run.dir / "figures" / "cards"

    def work(index: int, indices: list[int]) -> dict[str, pd.DataFrame]:
        items, skipped = run.read_images(indices)
        return analyze_batch(captioner, items, skipped, cfg, layers, ks, decoder, scorer, means, finder, index,
                             card_ids, cards_dir)

    tables = run.each_batch(run.n_images, work, desc=f"analyse ({cfg.attribution.method})")
    if tables is None:
        return run.shard_finished()
    curves = ablation_curve_table(tables["ablation"], n_units, cfg.bootstrap.resamples, cfg.bootstrap.seed) \
        if len(tables["ablation"]) else pd.DataFrame()
    summary = summarize(tables, curves) | ig_gaps(tables["completeness"]) | {
        "method": cfg.attribution.method, "layers": f"{layers[0]}..{layers[-1]}", "ablation_mode": cfg.ablation.mode,
        "analysed_units": n_units, "projection": cfg.projection.checkpoint}
    figures = []
    title = f"{cfg.attribution.method}, layers {layers[0]}-{layers[-1]}, {cfg.ablation.mode} ablation, " \
            f"{summary['images_analysed']} images"
    if len(curves):
        write_parquet(curves, run.dir / "ablation_curves.parquet")
        figures.append(ablation_curves(curves, run.figure("ablation_curves.png"), title))
    if len(tables["neurons"]):
        figures.append(layer_distribution(tables["neurons"], captioner.lm.n_layers,
                                          run.figure("layer_distribution.png")))
    neurons = tables["neurons"].assign(tokens=lambda f: f["tokens"].map(" | ".join)) \
        if len(tables["neurons"]) else tables["neurons"]
    cards = tables["cards"]
    if len(cards):  # the card images in the W&B table (loggers.log_results reads Path cells as images)
        figures += [Path(path) for path in cards["card"].drop_duplicates()]
        cards = cards.assign(card=cards["card"].map(Path))
    summary = run.finish(summary, {"captions": tables["captions"], "neurons": neurons, "ablation_curves": curves,
                                   "cards": cards}, figures)
    log.info("analysed %d of %d images in %.0f s -> %s", summary["images_analysed"], summary["images"],
             summary["seconds"], run.dir)
    return summary
