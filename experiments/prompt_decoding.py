"""Section 3.1 of the paper, Table 2 + Figure 3 + the KS tests: decode each image prompt to its
nearest tokens and score them against the image (CLIPScore) and its human captions (BERTScore),
beside random vectors, the captions' nouns and the generated captions.

    python experiments/prompt_decoding.py                  # the Shapes world, offline
    python experiments/prompt_decoding.py images.n=1000 lm=gptj_6b encoder=beit_large data=coco \\
        projection.checkpoint=path/to/proj.ckpt clip=openai

The logic lives in mmn.recipes.prompt_decoding."""

import hydra
from omegaconf import DictConfig

from mmn.recipes.prompt_decoding import prompt_decoding
from mmn.config import CONFIG_DIR, register_resolvers

register_resolvers()


@hydra.main(config_path=str(CONFIG_DIR), config_name="prompt_decoding", version_base="1.3")
def main(cfg: DictConfig) -> None:
    prompt_decoding(cfg)


if __name__ == "__main__":
    main()
