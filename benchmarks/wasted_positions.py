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

What the training step does about it (``noencore.engine.objective.counted_layout``, on
the host before a micro-batch moves): it cuts the micro-batch after its last counted frame
(the transformer runs S(n) steps for the longest row's n frames, not S(T)), and hands the
heads only the counted (k, t) positions; a rank's rows of a step go into its micro-batches
longest first, so that short windows share one. audiocraft's solver step computes every
step and every (k, t) logit of the padded batch. The "after the cut" columns are the
steps still computed for no loss, for micro-batches of 1, 2 and 8 windows drawn at random
(and of 2, four per step: gradient accumulation); the longest window of each micro-batch
sets its length, rounded up to one of 16 lengths (``adapter.cut_frames``). The heads
compute no row no loss reads (but one uncounted row for a codebook with no counted
token, so that its head takes part in the backward).

``--time``: the engine's step at MusicGen-small width, the counted layout against every
position computed (the layout before it), over the same micro-batches of demo windows and
of 30 s windows, interleaved, best of ``--reps``.

    python benchmarks/wasted_positions.py [--shards DIR --frames 250] [--track-seconds 120,300]
                                          [--time --layers 2 --reps 3]

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


def cut_share(lm: torch.nn.Module, lengths: np.ndarray, frames: int, micro: int,
              accumulation: int = 1, seed: int = 0) -> float:
    """The share of transformer steps computed for no loss when windows of real lengths
    ``lengths`` are drawn at random into a rank's steps of ``micro x accumulation`` rows,
    split into micro-batches longest first (the engine's ``_micro_batches``), and each
    micro-batch is cut after its longest window, rounded up (``adapter.trim_frames``)."""
    from noencore.models.adapter import cut_frames, pattern_steps

    order = np.random.default_rng(seed).permutation(lengths)
    per_step = micro * accumulation
    order = np.concatenate([-np.sort(-order[i:i + per_step])
                            for i in range(0, order.size, per_step)])
    read = shares(lm, lengths, frames)["read_steps"]
    steps = {}
    computed = 0
    for i in range(0, order.size, micro):
        chunk = order[i:i + micro]
        n = cut_frames(int(chunk.max()), frames)
        if n not in steps:
            steps[n] = pattern_steps(lm, n)
        computed += chunk.size * steps[n]
    return 1 - read / computed


def step_times(lengths: np.ndarray, frames: int, micro: int, layers: int, reps: int,
               batches: int = 12, seed: int = 0) -> dict:
    """Seconds per micro-batch of the engine's step (fp32) with the counted layout and
    with every position computed, over the same ``batches`` micro-batches of ``micro``
    windows: evenly spaced quantiles of ``lengths`` (so that the sample holds short windows
    in their share), shuffled into micro-batches; interleaved, best of ``reps``."""
    import time

    from engine_ratios import engine_step, setup

    picks = np.sort(lengths)[np.linspace(0, lengths.size - 1, batches * micro).round()
                             .astype(np.int64)]
    picks = np.random.default_rng(seed).permutation(picks)
    draws = [torch.as_tensor(picks[i * micro:(i + 1) * micro]) for i in range(batches)]
    states = {}
    for layout in ("dense", "counted"):
        states[layout] = setup(layers, micro, frames / FRAME_RATE, "engine")
        states[layout]["layout"] = layout
    best = dict.fromkeys(states, float("inf"))
    for st in states.values():  # warm-up
        engine_step(st, False)
    for _ in range(reps):
        for layout, st in states.items():
            t = time.perf_counter()
            for d in draws:
                st["lengths"] = d
                engine_step(st, False)
            best[layout] = min(best[layout], (time.perf_counter() - t) / batches)
    return {"dense_s": best["dense"], "counted_s": best["counted"],
            "speedup": best["dense"] / best["counted"]}


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


# (micro-batch, micro-batches per step) of the "after the cut" columns
MICRO = ((1, 1), (2, 1), (2, 4), (8, 1))


def table(rows: dict[str, dict]) -> list[str]:
    cut = " | ".join(f"after the cut, micro-batch {m}" + (f" x {a} per step" if a > 1 else "")
                     for m, a in MICRO)
    lines = ["| windows | n | frames (T) | steps S | real frames | computed steps no loss "
             f"reads, uncut | of which: delay pattern | padding | {cut} | head rows no loss "
             "reads, uncut |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(MICRO) + "---|"]
    for name, r in rows.items():
        after = " | ".join(f"{r['cut'][m]:.1%}" for m in MICRO)
        lines.append(f"| {name} | {r['windows']} | {r['frames']} | {r['steps_per_window']} | "
                     f"{r['real_frames_share']:.1%} | {r['wasted_share']:.1%} | "
                     f"{r['pattern_share']:.2%} | {r['padding_share']:.1%} | {after} | "
                     f"{r['head_waste']:.1%} |")
    return lines


def time_table(times: dict[str, dict]) -> list[str]:
    lines = ["| windows | micro-batch | every position computed (s) | counted layout (s) | "
             "speed-up |", "|---|---|---|---|---|"]
    for name, t in times.items():
        lines.append(f"| {name} | {t['micro']} | {t['dense_s']:.3f} | {t['counted_s']:.3f} | "
                     f"{t['speedup']:.2f}x |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", default=None, help="token shards (default: the demo's)")
    ap.add_argument("--frames", type=int, default=250, help="window of --shards (the demo's)")
    ap.add_argument("--track-seconds", default="120,300",
                    help="A,B: also 30 s windows over tracks of A..B s ('' to skip)")
    ap.add_argument("--time", action="store_true",
                    help="also time the engine's step, counted layout against dense")
    ap.add_argument("--layers", type=int, default=2, help="--time: transformer layers")
    ap.add_argument("--reps", type=int, default=3, help="--time: best of")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from noencore.data.shards import TokenShards
    from noencore.models import load_musicgen

    lm = load_musicgen("tiny", with_codec=False).lm  # MusicGen's delay pattern, K = 4
    sets: dict[str, tuple[np.ndarray, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = a.shards or demo_shards(Path(tmp) / "demo")
        shards = TokenShards(path)
        name = "demo shards" if a.shards is None else str(path)
        sets[f"{name}, {a.frames / FRAME_RATE:g} s"] = (
            window_lengths(np.asarray(shards.frames), a.frames), a.frames)
    if a.track_seconds:
        lo, hi = (float(x) for x in a.track_seconds.split(","))
        tracks = np.round(np.linspace(lo, hi, 200) * FRAME_RATE).astype(np.int64)
        sets[f"tracks of {lo:g}-{hi:g} s, 30 s"] = (window_lengths(tracks, 30 * FRAME_RATE),
                                                     30 * FRAME_RATE)
        sets["full 30 s windows"] = (np.full(200, 30 * FRAME_RATE), 30 * FRAME_RATE)
    rows = {}
    for name, (lengths, frames) in sets.items():
        rows[name] = shares(lm, lengths, frames)
        rows[name]["cut"] = {ma: cut_share(lm, lengths, frames, *ma) for ma in MICRO}
    print("\n".join(table(rows)))
    if a.time:
        times = {}
        for name, (lengths, frames) in list(sets.items())[:2]:
            for micro in ((4, 1) if frames < 1000 else (1,)):
                times[f"{name} ({micro})"] = {"micro": micro, **step_times(
                    lengths, frames, micro, a.layers, a.reps)}
                print(f"{name}, micro-batch {micro}: {times[f'{name} ({micro})']}",
                      file=sys.stderr, flush=True)
        print()
        print("\n".join(time_table(times)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
