"""Supplement S.4: each category's multimodal neurons (the units most often among the top units
of its images) and their mean activation on every category's images, as a matrix and a figure.

    python experiments/selectivity.py                    # the Shapes world's 8 shapes
    python experiments/selectivity.py selectivity.categories=[dog,cat,horse] data=coco ...

The logic lives in mmn.recipes.selectivity."""

import hydra
from omegaconf import DictConfig

from mmn.recipes.selectivity import selectivity_experiment
from mmn.config import CONFIG_DIR, register_resolvers

register_resolvers()


@hydra.main(config_path=str(CONFIG_DIR), config_name="selectivity", version_base="1.3")
def main(cfg: DictConfig) -> None:
    selectivity_experiment(cfg)


if __name__ == "__main__":
    main()
