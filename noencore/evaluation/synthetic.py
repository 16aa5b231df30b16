"""Small token-shard directories written straight from codes, for tests and benchmarks.

Evaluation checks need sets whose codes are chosen (memorised, never seen, ...) rather
than encoded from audio; this writes them in the shard format of
``noencore.data.layout`` (one shard file, checksums last), so that ``TokenShards``
reads them exactly as it reads the output of ``noencore precompute``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from noencore.data import layout


def write_code_shards(folder: str | os.PathLike, codes: Sequence[np.ndarray], captions: Sequence[str],
                      splits: Sequence[str], ids: Sequence[str] | None = None, *,
                      codec: str = "tiny", sample_rate: int = 32000, frame_rate: int = 50,
                      card: int = 2048) -> Path:
    """Write items ``codes[i]`` (int [n_q, frames_i], values < card) as a shard directory.

    Returns the folder. ``ids`` default to ``item-<i>``; one segment per id.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not len(codes) == len(captions) == len(splits):
        raise ValueError("codes, captions and splits need one entry per item")
    ids = list(ids) if ids is not None else [f"item-{i}" for i in range(len(codes))]
    n_q = int(np.asarray(codes[0]).shape[0])
    rows, records, offset = [], [], 0
    for i, c in enumerate(codes):
        c = np.asarray(c)
        if c.ndim != 2 or c.shape[0] != n_q or c.shape[1] == 0:
            raise ValueError(f"item {i}: codes must be [{n_q}, frames>0], got {c.shape}")
        if c.min() < 0 or c.max() >= card:
            raise ValueError(f"item {i}: codes must lie in [0, {card})")
        rows.append(c.T.astype(np.int16))
        records.append({"id": ids[i], "segment": 0, "start_s": 0.0, "frames": int(c.shape[1]),
                        "shard": 0, "offset": offset, "caption": captions[i], "split": splits[i],
                        "sha256": "", "source": "", "meta": {}})
        offset += c.shape[1]
    files = {
        layout.HEADER: json.dumps(layout.make_header(codec, sample_rate, frame_rate, n_q, card,
                                                     segment_seconds=30.0)).encode(),
        layout.INDEX: layout.jsonl_bytes(records),
        layout.FAILURES: b"",
        layout.shard_name(0): np.ascontiguousarray(np.concatenate(rows)).tobytes(),
    }
    sums = {}
    for name, data in files.items():
        layout.atomic_write(folder / name, data)
        sums[name] = {"size": len(data), "sha256": layout.sha256_file(folder / name)}
    layout.atomic_write(folder / layout.CHECKSUMS, json.dumps({"files": sums}).encode())
    return folder
