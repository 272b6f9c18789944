"""Run the paper's core analysis on a trained captioner: `python analyze.py` (the Shapes world),
`python analyze.py -m attribution=grad,ig`, `python analyze.py ablation=mean layers.start=1`.
The logic lives in mmn.recipes.analyze."""

import hydra
from omegaconf import DictConfig

from mmn.recipes.analyze import analyze
from mmn.config import CONFIG_DIR, register_resolvers

register_resolvers()


@hydra.main(config_path=str(CONFIG_DIR), config_name="analyze", version_base="1.3")
def main(cfg: DictConfig) -> None:
    analyze(cfg)


if __name__ == "__main__":
    main()
