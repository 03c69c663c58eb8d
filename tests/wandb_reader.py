"""Reading a W&B offline run back from its .wandb files, for tests that check what foe-train
logged to W&B (there is no W&B server to ask).

W&B's run-file format (wandb-core's LevelDB-style log): a 7-byte file header, then 32 KiB
blocks of chunks; each chunk has a 7-byte header: CRC-32 (IEEE, over type byte + data),
little-endian length (2 bytes) and type (full, first, middle, last)."""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

_FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_BLOCK = 32768
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_offline_run(run_dir: Path) -> list[dict]:
    """History rows W&B stored for this run's offline segments, read back from the .wandb
    files: logged keys plus ``_step``. A resumed segment replaces the rows an earlier segment
    wrote at or after its first step, as metrics.jsonl does."""
    run_id = (Path(run_dir) / "wandb_id.txt").read_text().strip()
    # W&B names segments offline-run-<YYYYmmdd_HHMMSS>-<id>, adding -1, -2... on a clash.
    name = re.compile(rf"offline-run-(\d{{8}}_\d{{6}})-{re.escape(run_id)}(?:-(\d+))?")
    segments = sorted(
        (m.group(1), int(m.group(2) or 0), path)
        for path in (Path(run_dir) / "wandb").glob("offline-run-*")
        if (m := name.fullmatch(path.name))
    )
    rows: list[dict] = []
    for *_, segment in segments:
        new = _history_rows(segment / f"run-{run_id}.wandb")
        if new:
            rows = [row for row in rows if row["_step"] < new[0]["_step"]]
        rows += new
    return rows


def _history_rows(path: Path) -> list[dict]:
    from wandb.proto import wandb_internal_pb2

    rows = []
    for payload in records(path):
        record = wandb_internal_pb2.Record.FromString(payload)
        if record.WhichOneof("record_type") != "history":
            continue
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
               for item in record.history.item}
        row.pop("_runtime", None)
        row.pop("_timestamp", None)
        rows.append(row)
    return rows


def records(path: Path) -> Iterator[bytes]:
    """Record payloads of a .wandb file, reassembled from their chunks; stops at the first
    torn or corrupt chunk (the tail of a crashed run)."""
    data = path.read_bytes()
    if not data.startswith(_FILE_HEADER):
        raise ValueError(f"{path}: not a W&B run file (bad header)")
    pos, pending = len(_FILE_HEADER), b""
    while True:
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER:  # too short for a chunk header: zero padding
            pos += left
        if pos + _CHUNK_HEADER > len(data):
            return
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk = data[pos + _CHUNK_HEADER:pos + _CHUNK_HEADER + length]
        if (kind not in (_FULL, _FIRST, _MIDDLE, _LAST) or len(chunk) < length
                or crc != zlib.crc32(bytes([kind]) + chunk)):
            return
        pos += _CHUNK_HEADER + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            yield pending
