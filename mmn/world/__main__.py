"""`python -m mmn.world`: build the Shapes world (cached) and print its summary.

Hydra-composed like the other entry points, so `python -m mmn.world world.seed=1`
builds (and caches separately) another world. The default world copies the frozen parts
shipped in mmn/world/shipped/; to retrain them and ship the result (after a change to the
builder or to the default world config):

    python -m mmn.world world.shipped=false +ship=true
"""

import hydra
from omegaconf import DictConfig

from mmn.config import CONFIG_DIR, offline_run_environment, register_resolvers
from mmn.world.build import build_configured_world, ship_world, world_summary

register_resolvers()


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    offline_run_environment(cfg.paths.output_dir)
    info = build_configured_world(cfg.world)
    print(world_summary(info))
    if cfg.get("ship", False):
        manifest = ship_world(cfg.world.dir)
        print("shipped: " + ", ".join(f"{part} ({len(entry['sha256'])} files)" for part, entry in manifest["parts"].items()))


if __name__ == "__main__":
    main()
