"""The Shapes world's fast path for design decisions: build a world variant, train its projection,
and measure what causes what, in one command.

    python benchmarks/world_lab.py                               # the default world
    python benchmarks/world_lab.py training.max_steps=600 world.scenes.glyph_shift=false

For the configured world (built and cached if missing) it prints and appends to
outputs/world_lab/log.jsonl:
- the encoder's probes (linear and MLP, shape and colour of each patch, held-out objects);
- the trained captioner's first-noun accuracy and mean p(c) (`train.py`'s validation and
  `analyze.py` on 48 images);
- delta p(c) when the top units, or as many random ones, are ablated at the image positions only,
  at 1.5% of the units and at all of them: how much of p(c) the image-position MLPs carry;
- the norms of what the projection and each layer's MLP write at the image positions;
- how alike the image positions are (`probes.prompt_spread`): one dominant vector means that
  Table 2 scores one decoded text per image.
One training and one analysis of 48 images: a few minutes on 2 cores once the world variant is built.
Overrides go to train.py, and all but training.* and trainer.* to analyze.py; the runs land in
outputs/world_lab/<digest>/.
"""

import json
import sys
import time
from pathlib import Path

import mmn  # noqa: F401
from mmn.config import CONFIG_DIR, analysis_overrides, compose, digest
from mmn.data.coco import CocoImages
from mmn.recipes.analyze import analyze
from mmn.recipes.run import ensure_world, load_captioner
from mmn.recipes.train import train
from mmn.world.build import load_world
from mmn.world.probes import prompt_spread, write_norms

ROOT = CONFIG_DIR.parent / "outputs" / "world_lab"
SIZES = "[0%,1.5%,100%]"
IMAGES = 48


def main(overrides: list[str], root: Path = ROOT) -> dict:
    started = time.perf_counter()
    all_overrides = overrides
    cfg = compose(overrides)
    ensure_world(cfg)
    world = load_world(cfg.world.dir)
    run_dir = root / digest(overrides, world["config"])
    summary_path = run_dir / "training_summary.json"
    training = (json.loads(summary_path.read_text()) if summary_path.is_file()
                else train(compose([*overrides, "logger=none", f"paths.output_dir={run_dir}"])))
    projection = run_dir / "projection"
    overrides = analysis_overrides(overrides)
    analysis = analyze(compose([*overrides, "logger=none", f"projection.checkpoint={projection}",
                                f"images.n={IMAGES}", "ablation.positions=image", f"ablation.ks={SIZES}",
                                f"paths.output_dir={run_dir / 'analysis'}"], config_name="analyze"))
    captioner = load_captioner(compose([*overrides, f"projection.checkpoint={projection}"], config_name="analyze"))
    images = CocoImages(cfg.data.eval.root, cfg.data.eval.split, image_size=None)
    pixels = captioner.preprocess([images[i]["image"] for i in range(min(16, len(images)))])
    result = {
        "overrides": all_overrides,
        "probes": world["metrics"]["encoder"].get("probes"),
        "first_noun_accuracy": training["val/first_noun_accuracy"],
        "p_target_mean": analysis["p_target_mean"],
        "analysed_units": analysis["analysed_units"],
        "image_positions": {key.removeprefix("ablation/"): value for key, value in analysis.items()
                            if key.startswith("ablation/") and key.endswith("delta_p") and "/k=0/" not in key},
        "norms": write_norms(captioner, pixels),
        "prompt_spread": prompt_spread(captioner, pixels),
        "steps_per_second": training.get("steps_per_second"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result, indent=2))
    with open(root / "log.jsonl", "a") as log:
        log.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
