"""Runs stay offline: hub look-ups off, W&B offline with its files inside the run directory."""

import os
from pathlib import Path

import pytest

from mmn.config import offline_run_environment


def test_hub_access_is_off():
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
    from transformers import AutoConfig

    with pytest.raises(OSError):  # refused at once instead of retrying the network for a minute
        AutoConfig.from_pretrained("gpt2-this-id-is-not-cached")


def test_wandb_writes_only_inside_the_run_directory(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for variable in ["WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"]:
        monkeypatch.delenv(variable, raising=False)
    run_dir = tmp_path / "run"
    offline_run_environment(run_dir)
    import wandb

    run = wandb.init(project="mmn-test", mode="offline")
    run.log({"loss": 1.5})
    run.finish()
    assert list(home.iterdir()) == []
    history = list(Path(run_dir).rglob("run-*.wandb"))
    assert len(history) == 1 and history[0].stat().st_size > 0
