"""Training steps per second with and without the frozen-feature cache, side by side.

    python benchmarks/feature_cache.py [STEPS] [hydra overrides...]

Runs the same training twice on the configured data (default: the Shapes world, built if
missing): once encoding every batch's images, once reading cached features (the cache is
built before timing starts). Prints both rates and their ratio."""

import sys
import tempfile

import mmn  # noqa: F401
from mmn.config import compose
from mmn.recipes.train import train


def main(steps: int, overrides: list[str]) -> None:
    common = [*overrides, "logger=none", f"training.max_steps={steps}", f"training.val_every_n_steps={steps}",
              "training.val_images=8", f"training.checkpoint_every_n_steps={steps}"]
    rates = {}
    with tempfile.TemporaryDirectory() as scratch:
        for cached in (False, True):
            summary = train(compose([*common, f"training.cache_features={cached}",
                                     f"paths.output_dir={scratch}/cached-{cached}"]))
            rates[cached] = summary["steps_per_second"]
    print(f"steps/s encoding every batch: {rates[False]:.2f}")
    print(f"steps/s from the feature cache: {rates[True]:.2f}")
    print(f"speed-up: {rates[True] / rates[False]:.2f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 60, sys.argv[2:])
