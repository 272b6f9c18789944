"""Section 3.2 of the paper, Figure 5: the receptive fields of each image's top units (their
activation on the patch grid, upsampled bilinearly, above its own 0.95 quantile) against the
mask of the image's single object, beside random units from the same layers.

    python experiments/receptive_fields.py                                  # the Shapes world
    python experiments/receptive_fields.py receptive_fields.categories=[circle,star] attribution=ig

The logic lives in mmn.recipes.receptive_fields."""

import hydra
from omegaconf import DictConfig

from mmn.recipes.receptive_fields import receptive_field_experiment
from mmn.config import CONFIG_DIR, register_resolvers

register_resolvers()


@hydra.main(config_path=str(CONFIG_DIR), config_name="receptive_fields", version_base="1.3")
def main(cfg: DictConfig) -> None:
    receptive_field_experiment(cfg)


if __name__ == "__main__":
    main()
