"""Test-wide settings: nothing is downloaded, W&B stays offline and inside tmp folders."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import mmn  # noqa: E402,F401  (installs the torchvision shim before any test imports transformers)
import pytest  # noqa: E402
import torch  # noqa: E402

from mmn.config import offline_run_environment  # noqa: E402


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
