"""Test-wide settings: nothing is downloaded, W&B stays offline and inside tmp folders."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

import mmn  # noqa: F401  (installs the torchvision shim before any test imports transformers)
from mmn.config import offline_run_environment


@pytest.fixture(autouse=True, scope="session")
def _offline_run_directory(tmp_path_factory):
    offline_run_environment(tmp_path_factory.mktemp("run"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """Overrides that point the config at a tiny Shapes world (conf/world/tiny.yaml), built once
    per test session in a temporary cache folder, with a few-step training recipe."""
    from mmn.config import compose
    from mmn.training.run import ensure_world

    cache = tmp_path_factory.mktemp("cache")
    overrides = ["world=tiny", "training=tiny", f"paths.cache_dir={cache}"]
    ensure_world(compose(overrides))
    return overrides


@pytest.fixture(scope="session")
def analysis_overrides(tiny_world, tmp_path_factory):
    """Overrides for analyze.py and the recipes in experiments/ on the tiny world: its parts, a
    fresh (untrained) projection of its widths, short captions, the CPU."""
    from mmn.models.projection import Projection

    folder = tmp_path_factory.mktemp("projection")
    torch.manual_seed(0)
    Projection(d_enc=32, d_lm=64).save(folder)  # the tiny world's encoder and LM widths
    world = [o for o in tiny_world if not o.startswith("training=")]  # the analysis configs have no training group
    return [*world, f"projection.checkpoint={folder}", "max_new_tokens=6", "device=cpu"]
