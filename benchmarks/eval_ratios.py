"""Batched token evaluation vs a per-item loop, measured in one run.

Token metrics (teacher-forced NLL, top-1, Min-K%++ moments for every token of every
item) are computed by ``noencore.evaluation.token_metrics.collect_set_stats``: windows
of many items per forward pass, the model adapter, then ``noencore.ops.token_stats``.
The baselines run the same work one item at a time:

* per-item (same code path, batch size 1);
* per-item audiocraft: ``LMModel.compute_predictions`` on one item, full logits
  [1, K, T, card], log-softmax, gather: what one writes without the engine.

Items per second for each, and the ratios (target: batched >= 5x the per-item loop).
A last row times the codebook-head GEMMs alone: work no path can skip, so per-item time
over it bounds what any batching could gain on that workload (batching removes per-call
overhead, not arithmetic).
Timings are the minimum over repetitions (the machine is shared).

    python benchmarks/eval_ratios.py [--model small-width --items 32 --frames 250 --batch-size 16]

(without --model: a fixed set of workloads, short and 5-second items, tiny and
MusicGen-small-width LMs).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def build(model_spec: str, items: int, frames: int, device: str, folder: Path):
    from noencore.data.shards import TokenShards
    from noencore.evaluation.synthetic import write_code_shards
    from noencore.models.musicgen import load_musicgen
    from noencore.models.text import build_condition_cache

    rng = np.random.default_rng(0)
    codes = [rng.integers(0, 2048, size=(4, frames)) for _ in range(items)]
    caps = [f"caption {i % 8}" for i in range(items)]
    path = write_code_shards(folder / "shards", codes, caps, ["forget"] * items)
    model = load_musicgen(model_spec, device=device)
    cache = build_condition_cache(path / "conditions", caps, model.text_encoder, progress=False)
    return model, TokenShards(path), cache


@torch.no_grad()
def audiocraft_loop(model, shards, cache, precision: str) -> float:
    """Per-item NLL through audiocraft's own logits; returns the sum (keeps the work live)."""
    total = 0.0
    dt = torch.bfloat16 if precision == "bf16" else torch.float32
    for i in range(len(shards)):
        codes = shards.codes(i).long()[None].to(model.device)
        cond = model.condition_tensors(*cache.batch([shards.captions[i]]))
        with torch.autocast(model.device.type, dtype=dt, enabled=precision == "bf16"):
            out = model.lm.compute_predictions(codes, [], condition_tensors=cond)
        logp = torch.log_softmax(out.logits.float(), dim=-1)
        nll = -logp.gather(-1, codes[..., None])[..., 0]
        total += float(nll[out.mask.bool()].sum())
    return total


@torch.no_grad()
def heads_floor(model, shards, cache, batch_size: int) -> float:
    """The arithmetic every path must do, timed alone: hidden states of all windows
    gathered once, then the K codebook-head GEMMs [N_k, D] x [D, card] in fp32 (what
    token_stats computes its statistics from). Returns a function for ``timed``."""
    from noencore.data.batches import iter_batches

    rows = []
    for batch in iter_batches(shards, batch_size, int(shards.frames.max()), seed=0,
                              shuffle=False):
        cond = cache.batch(batch.captions)
        rows += [(r.hidden.float().contiguous(), r.weight.float())
                 for r in model.codebook_rows(batch, cond)]

    def run():
        for h, w in rows:
            for c in range(0, h.shape[0], 4096):  # the op's row chunks
                torch.mm(h[c:c + 4096], w.t())
    return run


def timed(fn, reps: int) -> float:
    fn()  # warm-up (lazy inits, allocator)
    best = float("inf")
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


# (model, items, frames, batch size): each batch as large as the workload allows
DEFAULT_RUNS = (("tiny", 64, 50, 64), ("tiny", 32, 250, 32), ("small-width", 16, 250, 16))


def run_one(model_spec: str, items: int, frames: int, batch_size: int,
            args: argparse.Namespace) -> None:
    from noencore.evaluation.token_metrics import collect_set_stats

    with tempfile.TemporaryDirectory() as tmp:
        model, shards, cache = build(model_spec, items, frames, args.device, Path(tmp))

        def batched():
            collect_set_stats(model, shards, cache, batch_size=batch_size,
                              precision=args.precision, progress=False)

        def per_item():
            collect_set_stats(model, shards, cache, batch_size=1, precision=args.precision,
                              progress=False)

        rows = [(f"batched (noencore, batch {batch_size})", timed(batched, args.reps)),
                ("per-item loop (noencore, batch 1)", timed(per_item, args.reps)),
                ("per-item loop (audiocraft logits)",
                 timed(lambda: audiocraft_loop(model, shards, cache, args.precision), args.reps)),
                ("floor: codebook-head GEMMs alone (no LM, no softmax)",
                 timed(heads_floor(model, shards, cache, batch_size), args.reps))]
    tokens = items * (4 * frames - 6)
    print(f"### {model_spec} LM, {items} items x {frames} frames ({frames / 50:g} s; "
          f"{tokens} scored tokens), {args.precision}, device {args.device}\n")
    print("| path | seconds | items/s | tokens/s | batched speed-up |")
    print("|---|---|---|---|---|")
    base = rows[0][1]
    for name, t in rows:
        print(f"| {name} | {t:.3f} | {items / t:.1f} | {tokens / t:,.0f} | {t / base:.2f}x |")
    ratio = rows[1][1] / base
    bound = rows[1][1] / rows[3][1]
    print(f"\nbatched vs per-item loop: {ratio:.2f}x (target >= 5x): "
          f"{'met' if ratio >= 5 else 'NOT met'}; batched path {base / rows[3][1]:.2f}x its "
          f"GEMM floor; no batching can beat per-item / floor = {bound:.2f}x here\n",
          flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="named config: tiny | small-width (default: a fixed set "
                                    "of workloads)")
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--frames", type=int, default=250, help="frames per item (50 = 1 s)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    runs = ([(args.model, args.items, args.frames, args.batch_size)] if args.model
            else DEFAULT_RUNS)
    for spec, items, frames, batch_size in runs:
        run_one(spec, items, frames, batch_size, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
