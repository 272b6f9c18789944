"""Experiment loggers from the `logger` config group: W&B (offline by default), CSV, or none.

W&B runs are named after the Hydra job (its overrides, e.g. "encoder=vit_random") and grouped
by the multirun's sweep folder, so `python train.py -m encoder=a,b` gives two runs in one
group. W&B's files stay inside the run directory, and offline mode never touches the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

KINDS = ("wandb", "csv", "none")


def hydra_run_identity() -> tuple[str | None, str | None]:
    """(job name from the overrides, sweep group) of the current Hydra job; (None, None) outside one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, None
    hydra = HydraConfig.get()
    overrides = [o for o in hydra.overrides.task if not o.startswith(("hydra.", "logger.", "paths."))]
    name = ",".join(overrides) or hydra.job.name
    group = Path(hydra.sweep.dir).name if hydra.mode == RunMode.MULTIRUN else None
    return name, group


def make_loggers(cfg: DictConfig, run_dir: str | Path) -> list:
    """Lightning loggers for `cfg.logger.kind`; the resolved config is logged as hyperparameters."""
    kind = cfg.logger.kind
    if kind not in KINDS:
        raise ValueError(f"logger.kind={kind!r}: use one of {KINDS}")
    if kind == "none":
        return []
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(save_dir=str(run_dir), name="csv", version="")
    else:
        from lightning.pytorch.loggers import WandbLogger

        name, group = hydra_run_identity()
        logger = WandbLogger(project=cfg.logger.project, entity=cfg.logger.entity, name=cfg.logger.name or name,
                             group=cfg.logger.group or group, tags=list(cfg.logger.tags), mode=cfg.logger.mode,
                             save_dir=str(run_dir), dir=str(run_dir))
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return [logger]


def wandb_table(frame):
    """A DataFrame as a wandb.Table; cells holding a Path (a PNG, e.g. a neuron card) become images."""
    import wandb

    if not any(isinstance(value, Path) for value in frame.to_numpy().ravel()):
        return wandb.Table(dataframe=frame)
    rows = [[wandb.Image(str(value)) if isinstance(value, Path) else value for value in row]
            for row in frame.itertuples(index=False)]
    return wandb.Table(columns=[str(column) for column in frame.columns], data=rows)


def log_results(loggers: Sequence, summary: dict, tables: dict | None = None, figures: Sequence[Path] = ()) -> None:
    """An analysis run's results: the summary's numbers to every logger (and W&B's run summary);
    tables (name -> DataFrame; Path cells as images) and figures (PNG paths, logged as
    figures/<file stem>) to W&B."""
    from lightning.pytorch.loggers import WandbLogger

    scalars = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for logger in loggers:
        logger.log_metrics(scalars)
        if isinstance(logger, WandbLogger):
            import wandb

            run = logger.experiment
            run.log({**{name: wandb_table(frame) for name, frame in (tables or {}).items()},
                     **{f"figures/{Path(path).stem}": wandb.Image(str(path)) for path in figures}})
            run.summary.update(scalars)


def finish(loggers: Sequence) -> None:
    """Close W&B runs, so the next job of a multirun (same process) starts a run of its own. W&B's
    service process may go on writing the offline run file for a moment after this returns."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
