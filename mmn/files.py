"""Files: writing them so that a killed run never leaves a half-written one, and telling a local
path from a hub id. Every module that writes a result, a checkpoint, a cache or a world part
writes it through `atomic_write`; every loader asks `looks_like_local_path`."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call write(temporary_path), then rename the temporary file to `path` (atomic on POSIX): the
    file is either absent or complete. The temporary file sits in the same folder, named after the
    process, so two processes writing one path never share it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(text: str, path: str | os.PathLike) -> None:
    atomic_write(path, lambda temporary: temporary.write_text(text))


def write_json(value, path: str | os.PathLike) -> None:
    write_text(json.dumps(value, indent=2, default=str), path)


def write_parquet(frame, path: str | os.PathLike) -> None:
    """A pandas DataFrame as parquet, without its index."""
    atomic_write(path, lambda temporary: frame.to_parquet(temporary, index=False))


def looks_like_local_path(name_or_path: str | os.PathLike) -> bool:
    """True when a model name names a local path rather than a hub id ("name" or "org/name"): a
    Path, anything that exists here, anything starting like a path (".", "/", "~", "\\"), more
    than one "/", or "runs/world/lm" style names whose parent folder exists here."""
    if isinstance(name_or_path, Path) or Path(name_or_path).expanduser().exists():
        return True
    name = str(name_or_path)
    if name.startswith((".", "/", "~", "\\")) or name.count("/") >= 2:
        return True
    parent = Path(name).parent
    return "/" in name and str(parent) not in ("", ".") and parent.is_dir()
