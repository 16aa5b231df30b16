"""What the first-read check of every segment costs (``TokenShards.codes``: sha256 of the
segment's bytes against the index, codes against the codebook size), against reading the
same segments without it, in one run.

    python benchmarks/segment_check.py [--gb 2] [--seconds 30] [--shards DIR]

Writes a shard directory of ``--gb`` GB of random codes in 30 s segments (4 codebooks,
2048 codes, 50 frames/s: 12 KB per segment) into a temporary folder, then reads every
segment twice from a fresh reader: once with the checks switched off (marked checked), to
measure the read alone, and once with them. Both reads come from the page cache the write
left (a warm read; a cold one from disk only adds the same I/O to both). ``--shards DIR``
measures an existing directory (e.g. a demo's ``shards/``) instead. Prints one Markdown
table: bytes, seconds, GB/s and the ratio.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from noencore.data import layout  # noqa: E402
from noencore.data.precompute import _finish  # noqa: E402
from noencore.data.shards import TokenShards  # noqa: E402

N_Q, CARD, RATE = 4, 2048, 50


def write_synthetic(out: Path, gb: float, seconds: float, shard_frames: int = 1 << 20) -> None:
    """A finished shard directory of ``gb`` GB of random codes (index, digests, checksums)."""
    out.mkdir(parents=True)
    frames = int(seconds * RATE)
    n = max(1, int(gb * 1e9 // (frames * N_Q * 2)))
    rng = np.random.default_rng(0)
    layout.atomic_write(out / layout.HEADER, layout.jsonl_bytes(
        [layout.make_header("synthetic", 32000, RATE, N_Q, CARD, seconds)]))
    records, shard, rows, f = [], 0, 0, open(out / layout.shard_name(0), "wb")  # noqa: SIM115
    for i in range(n):
        if rows + frames > shard_frames:
            f.close()
            shard, rows = shard + 1, 0
            f = open(out / layout.shard_name(shard), "wb")  # noqa: SIM115
        data = rng.integers(0, CARD, (frames, N_Q), dtype=np.int16).tobytes()
        f.write(data)
        records.append({"id": f"s{i}", "segment": 0, "start_s": 0.0, "frames": frames,
                        "shard": shard, "offset": rows,
                        "codes_sha256": hashlib.sha256(data).hexdigest(), "caption": "",
                        "split": None, "sha256": "", "source": "", "meta": {}})
        rows += frames
    f.close()
    _finish(out, records, [])


def read_all(path: Path, checked: bool) -> tuple[float, int]:
    """Seconds to read every segment once from a fresh reader (``TokenShards.codes`` and a
    copy of it, as a batch's gather does), and the bytes read."""
    shards = TokenShards(path)
    if not checked:
        shards._store.checked[:] = True  # the read alone
    total = 0
    t0 = time.perf_counter()
    for i in range(len(shards)):
        total += shards.codes(i).clone().numel() * 2
    return time.perf_counter() - t0, total


def hash_rate() -> float:
    """sha256 GB/s of this Python on one 256 MB buffer: the check's floor."""
    buf = np.random.default_rng(1).integers(0, CARD, 1 << 27, dtype=np.int16)
    t0 = time.perf_counter()
    hashlib.sha256(buf).hexdigest()
    return buf.nbytes / (time.perf_counter() - t0) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--shards", type=Path, default=None)
    args = ap.parse_args()
    tmp = None
    path = args.shards
    if path is None:
        tmp = Path(tempfile.mkdtemp(prefix="segment_check_"))
        path = tmp / "shards"
        write_synthetic(path, args.gb, args.seconds)
    try:
        read_all(path, checked=False)  # warm the page cache alike for both
        plain, nbytes = read_all(path, checked=False)
        check, _ = read_all(path, checked=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp)  # the folder this script made
    per = (check - plain) / max(nbytes / (int(args.seconds * RATE) * N_Q * 2), 1)
    print(f"| shards | bytes | read alone (s) | read + check (s) | check GB/s | sha256 alone "
          f"GB/s | check per 30 s segment | ratio |\n|---|---|---|---|---|---|---|---|\n"
          f"| {args.shards or f'synthetic {args.gb:g} GB'} | {nbytes:,} | {plain:.3f} | "
          f"{check:.3f} | {nbytes / max(check - plain, 1e-9) / 1e9:.2f} | {hash_rate():.2f} | "
          f"{per * 1e6:.0f} us | {check / max(plain, 1e-9):.2f}x |")


if __name__ == "__main__":
    main()
