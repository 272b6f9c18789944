"""Is the Shapes world's captioner right whatever the seed and the float rounding?

    python benchmarks/world_robustness.py [hydra overrides...]      # e.g. world.seed=1

Trains the projection four times on the configured world (built if missing): seeds 0, 1 and 2 at
the default precision (bf16-mixed where the CPU has native bf16), and seed 0 at 32-true. Each
projection is then captioned on the evaluation images (`analyze.py` with attribution=act and no
ablation, so only captions and p(c) are computed). Prints one row per run, then the lowest of
each column: the issue's bar is first-noun accuracy >= 0.90 (none below 0.85) and p(c) >= 0.5.

Runs go to outputs/world_robustness/<digest of the overrides, the world and the training
recipe>/<run>/ and are kept, so a killed run resumes from its last checkpoint when started again
(train.py's resume) and finished ones are read back, not redone.
"""

import json
import sys
from pathlib import Path

import mmn  # noqa: F401
from mmn.recipes.analyze import analyze
from mmn.config import CONFIG_DIR, analysis_overrides, compose, digest
from mmn.recipes.run import ensure_world
from mmn.recipes.train import train
from mmn.world.build import load_world

RUNS = {  # name -> overrides
    "seed0": ["seed=0"],
    "seed1": ["seed=1"],
    "seed2": ["seed=2"],
    "seed0-fp32": ["seed=0", "trainer.precision=32-true"],
}
ROOT = CONFIG_DIR.parent / "outputs" / "world_robustness"


def run(name: str, overrides: list[str], common: list[str], root: Path) -> dict:
    run_dir = root / name
    summary_path = run_dir / "training_summary.json"
    if summary_path.is_file():
        training = json.loads(summary_path.read_text())
    else:
        last = run_dir / "checkpoints" / "last.ckpt"
        resume = [f"ckpt_path={last}"] if last.is_file() else []
        training = train(compose([*common, *overrides, *resume, f"paths.output_dir={run_dir}"]))
    analysis = analyze(compose([*analysis_overrides(common), f"projection.checkpoint={run_dir / 'projection'}", "attribution=act",
                                "ablation.ks=[0]", "top_n=1", f"paths.output_dir={run_dir / 'analysis'}"],
                               config_name="analyze"))
    return {"run": name, "precision": training.get("precision"), "first_noun_accuracy": training["val/first_noun_accuracy"],
            "p_target_mean": analysis["p_target_mean"], "val_loss": training.get("val/loss"),
            "seconds": training.get("training_seconds")}


def main(overrides: list[str]) -> None:
    common = [*overrides, "logger=none"]
    cfg = compose(common)
    ensure_world(cfg)
    # keyed by the world and the training recipe too, so a changed default never reads old runs back
    root = ROOT / digest(overrides, load_world(cfg.world.dir)["config"], cfg.training)
    rows = [run(name, extra, common, root) for name, extra in RUNS.items()]
    print(f"{'run':<12} {'precision':<11} {'first-noun acc':>14} {'mean p(c)':>10} {'val loss':>9}")
    for row in rows:
        print(f"{row['run']:<12} {str(row['precision']):<11} {row['first_noun_accuracy']:>14.3f} "
              f"{row['p_target_mean']:>10.3f} {row['val_loss'] or float('nan'):>9.3f}")
    lowest = {key: min((r[key] for r in rows if r[key] == r[key]), default=float("nan"))  # nan: no image analysed
              for key in ("first_noun_accuracy", "p_target_mean")}
    print(f"lowest: first-noun accuracy {lowest['first_noun_accuracy']:.3f}, mean p(c) {lowest['p_target_mean']:.3f}")
    (root / "robustness.json").write_text(json.dumps(rows, indent=2))
    print(f"runs and robustness.json: {root}")


if __name__ == "__main__":
    main(sys.argv[1:])
