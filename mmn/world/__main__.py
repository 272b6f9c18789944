"""`python -m mmn.world`: build the Shapes world (cached) and print its summary.

Hydra-composed like the other entry points, so `python -m mmn.world world.seed=1`
builds (and caches separately) another world.
"""

import hydra
from omegaconf import DictConfig, OmegaConf

from mmn.config import CONFIG_DIR, offline_run_environment, register_resolvers
from mmn.world.build import build_world, world_summary

register_resolvers()


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    offline_run_environment(cfg.paths.output_dir)
    spec = OmegaConf.masked_copy(cfg.world, [key for key in cfg.world if key != "dir"])
    info = build_world(spec, cfg.world.dir)
    print(world_summary(info))


if __name__ == "__main__":
    main()
