"""Compare finished runs side by side: a markdown table of every run's overrides and headline
numbers, the overlap of top neurons between runs, and their figures overlaid.

    python analyze.py -m attribution=grad,ig
    python experiments/report.py sweep=multirun/<date>/<time>       # the sweep's folder
    python experiments/report.py runs=[outputs/a,outputs/b]

The report goes to the Hydra run folder (report.md, figures/). The logic lives in mmn.recipes.report."""

import hydra
from omegaconf import DictConfig

from mmn.recipes.report import report
from mmn.config import CONFIG_DIR, register_resolvers

register_resolvers()


@hydra.main(config_path=str(CONFIG_DIR), config_name="report", version_base="1.3")
def main(cfg: DictConfig) -> None:
    print(f"report: {report(cfg)}")


if __name__ == "__main__":
    main()
