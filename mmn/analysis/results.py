"""Result tables on disk, written so that a killed run loses nothing and resumes where it stopped.

    run_dir/
      analysis.json          what the results depend on (models, images, method, layers, filter,
                             ablation); a re-run into this folder must match it
      parts/<table>/<chunk>.parquet
                             one part per table per finished batch of images; `captions` is written
                             last, so its presence marks the batch done
      <table>.parquet        the merged tables, rewritten at the end of every run

Every file is written through mmn.files.atomic_write, so a table is either absent or complete,
never half-written.

Sharding: with `shard=i/n`, n processes (or SLURM jobs) given the same run folder each write the
parts of their own batches; whichever finds every batch on disk when it ends merges the tables,
and any later run into that folder (with or without a shard) does the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from mmn.files import write_json, write_parquet

TABLES = ("neurons", "ablation", "captions")  # analyze's tables, in the order a batch writes them: captions last


def parse_shard(shard: str | None) -> tuple[int, int]:
    """`shard=i/n`: this process runs every n-th batch of images from the i-th. null: all (0/1)."""
    if shard is None:
        return 0, 1
    try:
        index, count = (int(part) for part in str(shard).split("/"))
    except ValueError:
        raise ValueError(f"shard={shard!r}: expected i/n, e.g. shard=0/4 for the first of 4 processes") from None
    if not 0 <= index < count:
        raise ValueError(f"shard={shard}: i must be in 0..n-1")
    return index, count


class ResultStore:
    """`tables`: the tables of every batch, in the order they are written; the last one's part
    marks a batch done."""

    def __init__(self, run_dir: str | Path, depends_on: dict, tables: tuple[str, ...] = TABLES):
        self.dir, self.tables = Path(run_dir), tables
        self.parts = self.dir / "parts"
        record = self.dir / "analysis.json"
        if record.is_file():
            before = json.loads(record.read_text())
            changed = sorted(key for key in before.keys() | depends_on.keys() if before.get(key) != depends_on.get(key))
            if changed:
                raise ValueError(f"{self.dir} holds results of a different analysis (changed: {', '.join(changed)}); "
                                 f"resume with the same settings, or write to a new folder (hydra.run.dir=...)")
        else:
            write_json(depends_on, record)
        for leftover in self.parts.glob("*/.*.tmp"):  # from a run killed while writing
            leftover.unlink()

    def done(self) -> set[int]:
        """Batches whose parts are all written."""
        return {int(path.stem) for path in (self.parts / self.tables[-1]).glob("*.parquet")}

    def todo(self, n_batches: int, shard: str | None = None) -> list[int]:
        """The batches this process runs: those of its shard (parse_shard) not on disk yet."""
        index, count = parse_shard(shard)
        done = self.done()
        return [batch for batch in range(index, n_batches, count) if batch not in done]

    def complete(self, n_batches: int) -> bool:
        """Every batch on disk (all shards finished): the tables can be merged and summarised."""
        return set(range(n_batches)) <= self.done()

    def write_batch(self, batch: int, tables: dict[str, pd.DataFrame]) -> None:
        for name in self.tables:
            write_parquet(tables[name], self.parts / name / f"{batch:06d}.parquet")

    def table(self, name: str) -> pd.DataFrame:
        """All parts of a table, in batch order (an empty frame when there are none)."""
        paths = sorted((self.parts / name).glob("*.parquet"))
        frames = [pd.read_parquet(path) for path in paths]
        frames = [frame for frame in frames if len(frame)]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def merge(self) -> dict[str, pd.DataFrame]:
        """Write each table's parts as one <table>.parquet; returns the tables."""
        tables = {name: self.table(name) for name in self.tables}
        for name, frame in tables.items():
            write_parquet(frame, self.dir / f"{name}.parquet")
        return tables
