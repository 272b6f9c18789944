"""Hydra configuration: where `conf/` lives, the resolvers it uses, and composing it from Python.

`conf/` sits at the repository root next to `train.py` and `analyze.py`; its
groups mirror the code (lm/, encoder/, projection/, data/, world/, trainer/, logger/).
"""

from __future__ import annotations

import hashlib
import os
import json
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"


def digest(*parts) -> str:
    """A short, stable hash of config values: keys a cache folder by its configuration."""
    plain = [OmegaConf.to_container(p, resolve=True) if OmegaConf.is_config(p) else p for p in parts]
    return hashlib.sha1(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:10]


def files_fingerprint(name_or_path) -> list:
    """What a local file or folder holds, cheaply: each file's relative path, size and modification
    time; [] for anything that is not a local path (a hub id, whose revision is in the config).
    Part of a cache key, so that a model or dataset rebuilt in place (same path, new contents,
    as when the Shapes world is rebuilt) gets a new cache instead of stale features."""
    path = Path(str(name_or_path))
    if not path.exists():
        return []
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    return [(str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def offline_run_environment(run_dir: str | Path) -> None:
    """No hub downloads, W&B offline (unless the user asked otherwise), and all of
    W&B's folders inside the run directory so nothing lands in the home folder."""
    run_dir = Path(run_dir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    for variable, sub in [("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "wandb-cache"),
                          ("WANDB_CONFIG_DIR", "wandb-config"), ("WANDB_DATA_DIR", "wandb-data")]:
        folder = run_dir / sub
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[variable] = str(folder)


def register_resolvers() -> None:
    """The resolvers conf/ uses, and the Shapes world's defaults as the config node `world/builder`,
    which conf/world/shapes.yaml extends (mmn.world.settings is the one place they are written)."""
    from hydra.core.config_store import ConfigStore

    from mmn.world.settings import DEFAULT_WORLD

    OmegaConf.register_new_resolver("mmn.digest", digest, replace=True)
    OmegaConf.register_new_resolver("mmn.root", lambda: str(CONFIG_DIR.parent), replace=True)
    ConfigStore.instance().store(group="world", name="builder", node=json.loads(json.dumps(DEFAULT_WORLD)))


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose the project's config as the entry points do, e.g. compose(["lm=gpt2"])."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from hydra.core.hydra_config import HydraConfig

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    # Outside a Hydra run, `${hydra:...}` interpolations read this.
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


register_resolvers()


def analysis_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides that also apply to analyze.yaml: all but the training recipe and the trainer
    (`training=...`, `training.lr=...`, `trainer.precision=...`), which only train.py's config has."""
    return [o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] not in ("training", "trainer")]
