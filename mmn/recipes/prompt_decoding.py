"""`python experiments/prompt_decoding.py` (conf/prompt_decoding.yaml): the paper's section 3.1 on a
trained captioner, Table 2, Figure 3 and the KS tests. Per batch of images, the texts of each kind
(image prompts' nearest tokens, random vectors', caption nouns, captions; prompts.texts_to_score)
and their CLIPScores and BERTScores are written to disk (a re-run into the same folder resumes);
then the table, the tests, the figure and W&B."""

from __future__ import annotations

import pandas as pd
from omegaconf import DictConfig

from mmn.analysis.bertscore import BertScorer
from mmn.analysis.clipscore import ClipScorer
from mmn.analysis.figures import score_distributions
from mmn.analysis.prompts import MIN_KS_VALUES, table2, texts_to_score
from mmn.analysis.scoring import score_texts
from mmn.files import write_parquet
from mmn.models.targets import get_finder
from mmn.recipes.run import Run, check_count, seeded

RANDOM_NORMS = ("matched", "standard")


def prompt_decoding(cfg: DictConfig) -> dict:
    if cfg.prompts.random_norm not in RANDOM_NORMS:
        raise ValueError(f"prompts.random_norm={cfg.prompts.random_norm!r} is unknown; use matched or standard")
    check_count("prompts.top_k", cfg.prompts.top_k)
    check_count("bootstrap.resamples", cfg.bootstrap.resamples)
    run = Run(cfg)
    if run.n_images < MIN_KS_VALUES:  # before any image is scored, not after
        raise ValueError(f"images.n={cfg.images.n}: the KS tests compare per-image scores and need at least "
                         f"{MIN_KS_VALUES} images; {run.n_images} would be scored")
    clip = ClipScorer(cfg.clip.model, cfg.clip.pretrained)
    bertscore = BertScorer(cfg.bertscore.model, cfg.bertscore.num_layers)
    captioner = run.captioner()
    finder = get_finder(cfg.first_noun)
    # images: one row per image, skipped (with the reason) when it could not be read
    run.results(run.depends_on(("prompts", "clip", "bertscore")), tables=("images", "scores"))

    def work(index: int, indices: list[int]) -> dict[str, pd.DataFrame]:
        items, skipped = run.read_images(indices)
        scores = pd.DataFrame()
        if items:  # seeded per batch: a resumed run draws the same random vectors
            rows = texts_to_score(captioner, items, finder, seeded(cfg.seed, index), cfg.prompts.top_k,
                                  cfg.prompts.random_norm == "matched", cfg.max_new_tokens)
            scores = score_texts(rows, items, clip, bertscore)
        read = [{"image_id": item["image_id"], "file_name": item["file_name"], "skipped": False, "skip_reason": None}
                for item in items]
        return {"scores": scores, "images": pd.DataFrame(sorted(read + skipped, key=lambda row: row["image_id"]))}

    tables = run.each_batch(run.n_images, work, desc="prompt decoding")
    if tables is None:
        return run.shard_finished()
    per_image, table, tests = table2(tables["scores"], cfg.bootstrap.resamples, cfg.bootstrap.seed)
    write_parquet(per_image, run.dir / "per_image.parquet")
    write_parquet(table, run.dir / "table2.parquet")
    summary = {"images": int(per_image["image_id"].nunique()), "images_skipped": int(tables["images"]["skipped"].sum()),
               "skip_reasons": tables["images"]["skip_reason"].dropna().value_counts().to_dict()}
    for row in table.itertuples():
        summary |= {f"{row.kind}/clipscore": row.clipscore_mean, f"{row.kind}/bertscore": row.bertscore_mean}
    # how varied each kind's texts are: prompts that all decode alike make Table 2 score one text per image
    summary |= {f"{kind}/distinct_texts": int(n) for kind, n in tables["scores"].groupby("kind")["text"].nunique().items()}
    for name, test in tests.items():
        summary |= {f"ks/{name}/D": test["statistic"], f"ks/{name}/p": test["pvalue"]}
    figure = score_distributions(per_image, run.figure("prompt_decoding.png"),
                                 f"image prompts vs random vectors, nouns and captions, {summary['images']} images",
                                 table)
    return run.finish(summary, {"table2": table}, [figure])
