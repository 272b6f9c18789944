"""Train the image-to-LM projection (LiMBeR's recipe) on the Shapes world, or wherever the
config points: `python train.py`, `python train.py experiment=limber_beit_gptj`,
`python train.py -m encoder=shapes,vit_random`. The logic lives in mmn.recipes.train."""

import hydra
from omegaconf import DictConfig

from mmn.config import CONFIG_DIR, register_resolvers
from mmn.recipes.train import train

register_resolvers()


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    return train(cfg)["val/first_noun_accuracy"]


if __name__ == "__main__":
    main()
