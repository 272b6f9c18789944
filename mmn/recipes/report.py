"""`python experiments/report.py` (conf/report.yaml): compare finished runs side by side
(mmn.analysis.compare): the report (report.md, figures/) goes to the run folder, and with
logger=wandb its tables and figures are logged as one more run, in the sweep's W&B group."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, open_dict

from mmn.analysis.compare import find_runs, write_report
from mmn.recipes.run import Run


def report(cfg: DictConfig) -> Path:
    """Write the report, log it, return the path of report.md."""
    folders = find_runs(cfg.sweep, cfg.runs)
    if cfg.sweep is not None and cfg.logger.get("group") is None:  # one more run in the sweep's W&B group
        with open_dict(cfg):
            cfg.logger.group = Path(cfg.sweep).name
    run = Run(cfg, images=False)
    _, table, figures = write_report(folders, run.dir, cfg.bootstrap.resamples, cfg.bootstrap.seed)
    run.finish({"runs": len(folders)}, {"runs": table}, figures)
    return run.dir / "report.md"
