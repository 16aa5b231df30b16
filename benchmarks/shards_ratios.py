"""Two ratios of the token-shard data path, each against its baseline measured in this run.

1. Reading: batches of 30 s windows (1500 frames x 4 codebooks) from memory-mapped shards,
   vs encoding the same 30 s audio windows on the fly with the full-size MusicGen codec
   (``musicgen-32khz``: what a training step does when the codec runs in the loop).
   Ratio of windows per second; target >= 1000x. Beside it: bytes moved per window and the
   copy bandwidth measured here (the floor of reading).
2. Precompute: the whole pipeline (decode mp3/ogg/flac/wav in worker processes, downmix,
   resample, segment, encode with the full-size codec, write, checksum) in audio seconds
   per second, vs the codec's batched encode alone on the same, already-decoded segments.
   Target >= 0.8 (decoding, resampling and writing hidden behind the encoder). The codec
   is loaded once, outside both timings (a fixed cost, not throughput).

Timings are the best of ``--reps`` (a shared machine: the best is the least disturbed).

    python benchmarks/shards_ratios.py [--files 4 --file-seconds 10 --batch 2 --reps 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FORMATS = [("mp3", 44100, 2), ("ogg", 48000, 2), ("flac", 44100, 1), ("wav", 22050, 2)]


def write_corpus(folder: Path, files: int, seconds: float) -> Path:
    """Synthetic music in every format (stereo, odd rates); a JSONL manifest."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(files):
        ext, rate, ch = FORMATS[i % len(FORMATS)]
        t = np.arange(int(rate * seconds)) / rate
        f0 = 110 * 2 ** (rng.integers(0, 24, 8) / 12)
        x = sum(0.1 * np.sin(2 * np.pi * f * t) * np.exp(-2 * ((t + k) % 1.0))
                for k, f in enumerate(f0))
        x = (x + 0.01 * rng.standard_normal(t.size))[:, None] * np.ones((1, ch))
        sf.write(folder / f"f{i}.{ext}", x.astype(np.float32), rate)
        lines.append(f'{{"id": "f{i}", "path": "f{i}.{ext}", "caption": "synthetic {i}"}}\n')
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(lines))
    return manifest


def best_of(reps: int, fn) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def copy_bandwidth() -> float:
    """Bytes/s of a large memory copy on this machine (read + write counted once each)."""
    a = torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
    b = torch.empty_like(a)
    t = best_of(5, lambda: b.copy_(a))
    return 2 * a.numel() / t


def bench_reading(tmp: Path, reps: int, batch: int, codec) -> dict:
    from noencore.data.batches import iter_batches
    from noencore.data.precompute import precompute
    from noencore.data.shards import TokenShards

    # Shards of 16 x 30 s windows (tiny codec: the reader does not care which codec).
    folder = tmp / "read"
    folder.mkdir()
    rows = []
    for i in range(16):
        t = np.arange(30 * 32000) / 32000
        sf.write(folder / f"r{i}.wav", (0.2 * np.sin(2 * np.pi * (100 + 7 * i) * t)
                                        ).astype(np.float32), 32000)
        rows.append(f'{{"id": "r{i}", "path": "r{i}.wav", "caption": "c"}}\n')
    (folder / "m.jsonl").write_text("".join(rows))
    precompute(folder / "m.jsonl", folder / "out", codec="tiny", segment_seconds=30,
               workers=0, progress=False)
    shards = TokenShards(folder / "out")
    frames = 1500

    def read_epochs():
        n = 0
        for epoch in range(20):
            for b in iter_batches(shards, batch, frames, seed=epoch):
                n += len(b)
        return n

    windows = read_epochs()
    t_read = best_of(max(reps, 3), read_epochs)
    read_rate = windows / t_read

    wav = torch.randn(batch, 1, 30 * 32000) * 0.1
    codec.encode(wav[:1, :, :32000])  # warm-up: first-call kernel setup
    t_enc = best_of(1, lambda: codec.encode(wav))  # ~1 min per call on a small CPU
    enc_rate = batch / t_enc
    # bytes per window: int16 codes read + long codes and bool mask written
    per_window = frames * 4 * (2 + 8 + 1)
    return {"read_windows_s": read_rate, "encode_windows_s": enc_rate,
            "ratio": read_rate / enc_rate, "bytes_per_window": per_window,
            "read_GBs": read_rate * per_window / 1e9}


def bench_precompute(tmp: Path, files: int, seconds: float, segment: float, batch: int,
                     workers: int, reps: int, codec) -> dict:
    from noencore.data.audio import AudioStream
    from noencore.data.precompute import _segments, precompute

    folder = tmp / "pipe"
    folder.mkdir()
    manifest = write_corpus(folder, files, seconds)
    audio_s = 0.0
    segs_by_len: dict[int, list[np.ndarray]] = {}
    for i in range(files):
        ext = FORMATS[i % len(FORMATS)][0]
        pieces = list(AudioStream(folder / f"f{i}.{ext}", 32000, 640, int(segment * 32000)))
        audio_s += sum(p.shape[0] for p in pieces) / 32000
        for s in _segments(pieces, int(segment * 32000), 640, 50)[0]:
            segs_by_len.setdefault(s.shape[0], []).append(s)

    def encode_only():
        for group in segs_by_len.values():
            for b in range(0, len(group), batch):
                codec.encode(torch.from_numpy(np.stack(group[b:b + batch]))[:, None])

    def pipeline():
        out = folder / "out"
        shutil.rmtree(out, ignore_errors=True)
        precompute(manifest, out, codec=codec, segment_seconds=segment,
                   batch_size=batch, workers=workers, progress=False)

    # Warm-up: one batch of each shape, so that neither timing pays kernel setup.
    for group in segs_by_len.values():
        codec.encode(torch.from_numpy(np.stack(group[:batch]))[:, None])
    # Interleaved, best of each: load from other users of the machine hits both alike.
    t_enc = t_pipe = float("inf")
    for _ in range(reps):
        t_enc = min(t_enc, best_of(1, encode_only))
        t_pipe = min(t_pipe, best_of(1, pipeline))
    return {"audio_s": audio_s, "encode_audio_s_per_s": audio_s / t_enc,
            "pipeline_audio_s_per_s": audio_s / t_pipe, "ratio": t_enc / t_pipe}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--file-seconds", type=float, default=10.0)
    p.add_argument("--segment-seconds", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)

    from noencore.data.codec import load_codec

    codec = load_codec("musicgen-32khz")
    tmp = Path(tempfile.mkdtemp(prefix="noencore-bench-"))
    try:
        r = bench_reading(tmp, args.reps, args.batch, codec)
        q = bench_precompute(tmp, args.files, args.file_seconds, args.segment_seconds,
                             args.batch, args.workers, args.reps, codec)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    bw = copy_bandwidth()
    print(f"torch threads: {torch.get_num_threads()}; decode workers: {args.workers}; "
          f"codec: musicgen-32khz (full size, random weights, fp32)\n")
    print("| measurement | noencore | baseline | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| 30 s windows/s, batch {args.batch}: shards vs on-the-fly encode | "
          f"{r['read_windows_s']:,.0f} | {r['encode_windows_s']:.3f} | "
          f"{r['ratio']:,.0f}x | >= 1000x |")
    print(f"| precompute audio s/s ({q['audio_s']:.0f} s of mp3/ogg/flac/wav, "
          f"{args.segment_seconds:g} s segments) vs batched encode alone | "
          f"{q['pipeline_audio_s_per_s']:.2f} | {q['encode_audio_s_per_s']:.2f} | "
          f"{q['ratio']:.2f} | >= 0.8 |")
    print(f"\nReading floor: {r['bytes_per_window']:,} bytes moved per window (int16 read, "
          f"long + bool written); achieved {r['read_GBs']:.2f} GB/s vs a memory copy at "
          f"{bw / 1e9:.2f} GB/s measured here.")
    ok = r["ratio"] >= 1000 and q["ratio"] >= 0.8
    print(f"\nTargets {'met' if ok else 'NOT met'}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
