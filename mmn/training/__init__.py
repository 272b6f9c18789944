"""Training the projection: data (data.py), the LightningModule (module.py), loggers and the
`train(cfg)` entry (run.py) behind `python train.py`."""

from mmn.training.run import train

__all__ = ["train"]
