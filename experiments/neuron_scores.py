"""Table 1 of the paper: do the decodings of an image's multimodal neurons describe it?
CLIPScore and BERTScore of each image's interpretable top units, of randomly re-paired units,
and of the generated captions, for a finished `python analyze.py` run.

    python analyze.py && python experiments/neuron_scores.py        # the Shapes world
    python experiments/neuron_scores.py analysis=multirun/2026-11-22/10-00-00/1 clip=openai

The logic lives in mmn.recipes.neuron_scores."""

import hydra
from omegaconf import DictConfig

from mmn.recipes.neuron_scores import neuron_scores
from mmn.config import CONFIG_DIR, register_resolvers

register_resolvers()


@hydra.main(config_path=str(CONFIG_DIR), config_name="neuron_scores", version_base="1.3")
def main(cfg: DictConfig) -> None:
    neuron_scores(cfg)


if __name__ == "__main__":
    main()
