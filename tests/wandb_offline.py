"""Read an offline W&B run file (run-<id>.wandb) record by record, for tests.

The file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then
32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type: full / first /
middle / last); a record is one protobuf `Record` (wandb.proto.wandb_internal_pb2)."""

import json
import struct
import time
from pathlib import Path

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a W&B run file"
    out, pending, position = [], b"", 7
    while position + 7 <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < 7:  # block tail too short for a header: padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if position + 7 + length > len(data):  # a chunk still being written
            break
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def complete_records(path: str | Path, timeout: float = 60.0) -> list:
    """The run file's records once it holds the final `exit` record: W&B's service process may
    still be writing the file for a moment after `run.finish()` has returned."""
    deadline = time.monotonic() + timeout
    while True:
        found = records(path)
        if any(record.WhichOneof("record_type") == "exit" for record in found) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def run_info(path: str | Path) -> dict:
    """The run's name and group, and every logged history row as {key: value}."""
    info = {"name": None, "group": None, "history": []}
    for record in complete_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            info["name"], info["group"] = record.run.display_name, record.run.run_group
        elif kind == "history":
            info["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                    for item in record.history.item})
    return info
