"""The share of the positions a training step computes that no loss reads.

A step runs the transformer over every step of the delay-pattern sequence of each window
(S = T + the largest delay, for T frames), and a loss reads the output at step s only
where a real code (k, t) with a valid pattern position is predicted from it. The rest is
work no loss reads:

* the delay pattern: steps whose outputs predict no valid code (K - 1 codebooks start
  late and end late; with ``keep_only_valid_steps`` audiocraft already drops most);
* padding: a window cut from the end of a track shorter than T is padded to T (the batch
  is one tensor [B, K, T]), and the transformer computes the padded steps too;
* special tokens: inputs, not outputs; the steps that hold them still predict real codes
  (counted with the pattern).

The heads: the training step hands the fused op every (k, t) row of the batch, the rows
no loss reads marked ignored (``dense_codebook_rows``: shapes that depend only on the
batch's shape); the op skips their loss but computes their logits, as audiocraft's solver
step computes every (k, t) logit. Evaluation (``codebook_rows``) computes only the rows
it reads.

    python benchmarks/wasted_positions.py [--shards DIR --frames 250] [--track-seconds 120,300]

Without ``--shards``: the demo's corpus (144 clips of 3.5-5 s in 5 s windows, as
``noencore demo`` precomputes it) is built in a temporary folder. ``--track-seconds A,B``
adds 30 s windows over tracks whose lengths are spread evenly between A and B seconds
(the shape of a real corpus cut into 30 s segments), and full 30 s windows alone.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

FRAME_RATE = 50


def _pattern(lm: torch.nn.Module, frames: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(seq_step int [K, T], valid bool [K, T], S) of the delay pattern at ``frames``."""
    from noencore.models.adapter import pattern_index, pattern_steps

    seq, valid = pattern_index(lm, frames)
    return seq.numpy(), valid.numpy(), pattern_steps(lm, frames)


def shares(lm: torch.nn.Module, lengths: np.ndarray, frames: int) -> dict:
    """Positions computed and read over windows of real lengths ``lengths`` (frames, each
    <= ``frames``) in windows of ``frames`` frames: transformer steps and head rows."""
    seq, valid, steps = _pattern(lm, frames)
    k = valid.shape[0]
    n = int(lengths.size)
    read_steps, read_rows, pattern_lost = 0, 0, 0
    for length, count in zip(*np.unique(lengths, return_counts=True)):
        # a window of L real frames counts the codes valid under the pattern of length L
        # (``noencore.models.adapter.pattern_mask``: as audiocraft scores a segment of L)
        real = _pattern(lm, int(length))[1] & valid[:, :length]
        read_steps += count * np.unique(seq[:, :length][real]).size
        read_rows += count * int(real.sum())
    full = np.unique(seq[valid]).size  # a window with no padding: what the pattern loses
    pattern_lost = n * (steps - full)
    computed = n * steps
    padding = computed - pattern_lost - read_steps
    return {"windows": n, "frames": frames, "steps_per_window": steps,
            "computed_steps": computed, "read_steps": read_steps,
            "wasted_share": 1 - read_steps / computed,
            "pattern_share": pattern_lost / computed, "padding_share": padding / computed,
            "real_frames_share": float(lengths.sum()) / (n * frames),
            "head_rows": n * k * frames, "read_rows": read_rows,
            "head_waste": 1 - read_rows / (n * k * frames)}


def window_lengths(track_frames: np.ndarray, frames: int) -> np.ndarray:
    """Real frames of every window the engine cuts from tracks of ``track_frames`` frames
    (``noencore.data.batches.windows``: tiled from frame 0, the last one padded)."""
    out = []
    for total in track_frames.tolist():
        starts = np.arange(0, max(total, 1), frames)
        out.append(np.minimum(frames, total - starts))
    return np.concatenate(out).astype(np.int64)


def demo_shards(folder: Path) -> Path:
    """The demo's corpus and shards (``noencore.demo``'s first two stages)."""
    from noencore.demo.pipeline import DemoConfig, _Demo

    demo = _Demo(folder, DemoConfig(), fresh=False, progress=False)
    demo.corpus()
    demo.shards()
    return demo.shards_dir


def table(rows: dict[str, dict]) -> list[str]:
    lines = ["| windows | n | frames (T) | steps S | real frames | computed steps no loss "
             "reads | of which: delay pattern | padding | head rows no loss reads |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['windows']} | {r['frames']} | {r['steps_per_window']} | "
                     f"{r['real_frames_share']:.1%} | {r['wasted_share']:.1%} | "
                     f"{r['pattern_share']:.2%} | {r['padding_share']:.1%} | "
                     f"{r['head_waste']:.1%} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default=None, help="token shards (default: the demo's)")
    ap.add_argument("--frames", type=int, default=250, help="window of --shards (the demo's)")
    ap.add_argument("--track-seconds", default="120,300",
                    help="A,B: also 30 s windows over tracks of A..B s ('' to skip)")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from noencore.data.shards import TokenShards
    from noencore.models import load_musicgen

    lm = load_musicgen("tiny", with_codec=False).lm  # MusicGen's delay pattern, K = 4
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = a.shards or demo_shards(Path(tmp) / "demo")
        shards = TokenShards(path)
        name = "demo shards" if a.shards is None else str(path)
        rows[f"{name}, {a.frames / FRAME_RATE:g} s"] = shares(
            lm, window_lengths(np.asarray(shards.frames), a.frames), a.frames)
    if a.track_seconds:
        lo, hi = (float(x) for x in a.track_seconds.split(","))
        tracks = np.round(np.linspace(lo, hi, 200) * FRAME_RATE).astype(np.int64)
        rows[f"tracks of {lo:g}-{hi:g} s, 30 s"] = shares(
            lm, window_lengths(tracks, 30 * FRAME_RATE), 30 * FRAME_RATE)
        rows["full 30 s windows"] = shares(lm, np.full(200, 30 * FRAME_RATE), 30 * FRAME_RATE)
    print("\n".join(table(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
