"""``train_layers`` against full training: tokens/s and memory of one unlearning step.

The engine's step (``engine_ratios.engine_step``: GradDiff, cached codes and T5 outputs,
the fused op, backward, clip, AdamW as ``noencore.unlearn`` builds it, fp32) at
MusicGen-small's width (dim 1024, 16 heads, ``--layers`` layers), B clips of
``--seconds`` s, with every parameter trained and with ``train_layers`` = top:N for each
``--top`` (those blocks, the output norm and the heads train; ``noencore.models.
train_layers``). Per variant: trainable parameters, the training state (the LM's fp32
weights plus gradient and AdamW's two moments of what trains, counted), and, each in a
fresh subprocess, the RSS once that state exists and the peak RSS during a step; step
times interleaved in one process (best of ``--reps``); ratios against the full step of
the same run.

The forgetting goals (``noencore.demo``) are not measured here: the demo takes far longer
than this benchmark on a 2-core CPU.

    python benchmarks/train_layers_ratios.py [--layers 4 --top 1 2 --batch 2 --seconds 2
                                              --reps 5]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from engine_ratios import (  # noqa: E402
    best_step_times,
    engine_step,
    memory_in_children,
    peak_rss,
    setup,
)


def variants(tops: list[int]) -> list[str]:
    return ["full"] + [f"top:{n}" for n in tops]


def step_state(variant: str, layers: int, batch: int, seconds: float) -> dict:
    """engine_ratios' engine state, its blocks frozen outside ``variant``, and the engine's
    own AdamW (``noencore.engine.optim``) over what trains."""
    from noencore.engine.config import select_blocks
    from noencore.engine.optim import adamw
    from noencore.models.train_layers import freeze_outside

    st = setup(layers, batch, seconds, "engine")
    lm = st["model"].lm
    blocks = select_blocks(None if variant == "full" else variant, layers)
    if blocks is not None:
        freeze_outside(lm, blocks)
    st["opt"], st["adamw"] = adamw([p for p in lm.parameters() if p.requires_grad], lr=1e-5,
                                   weight_decay=0.0)
    return st


def measure_memory(variant: str, layers: int, batch: int, seconds: float) -> dict:
    """In this (fresh) process: trainable and total parameters, the training state's
    bytes, the RSS once it exists and the peak RSS during a step (sampled every ms)."""
    st = step_state(variant, layers, batch, seconds)
    params = list(st["model"].lm.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    engine_step(st, False)  # warm-up: gradients and AdamW moments exist afterwards
    before, peak = peak_rss(lambda: engine_step(st, False))
    return {"trainable": trainable, "total": total, "state_mb": (4 * total + 12 * trainable)
            / 2**20, "rss_mb": before / 2**20, "peak_mb": peak / 2**20, "adamw": st["adamw"]}


def step_times(names: list[str], a: argparse.Namespace) -> dict[str, float]:
    """Best step time of each variant, interleaved in one process (the machine's load
    moves between subprocesses; the minimum is the least disturbed run)."""
    return best_step_times({v: step_state(v, a.layers, a.batch, a.seconds) for v in names},
                           a.reps)


def table(a: argparse.Namespace) -> None:
    names = variants(a.top)
    rows = memory_in_children(__file__, names, a)
    best = step_times(names, a)
    tokens = a.batch * 4 * int(a.seconds * 50)
    full = rows["full"]
    print(f"### One step (GradDiff, fp32, AdamW {full['adamw']}): dim 1024, {a.layers} "
          f"layers, {full['total'] / 1e6:.1f} M LM params, B={a.batch}, {a.seconds:g} s "
          f"({tokens} tokens)\n")
    print("| variant | trainable params | weights + grads + AdamW MB | RSS with state MB | "
          "peak RSS of a step MB | step s | tokens/s | tokens/s vs full | peak RSS vs full |")
    print("|---|---|---|---|---|---|---|---|---|")
    for v, r in rows.items():
        print(f"| {v} | {r['trainable'] / 1e6:.2f} M | {r['state_mb']:.0f} | "
              f"{r['rss_mb']:.0f} | {r['peak_mb']:.0f} | {best[v]:.3f} | "
              f"{tokens / best[v]:.0f} | {best['full'] / best[v]:.2f}x | "
              f"{r['peak_mb'] / full['peak_mb']:.2f}x |")
    print("\n(top:N trains the N highest blocks, the output norm and the heads; the "
          "embeddings, the text projection and the lower blocks are frozen. The forgetting "
          "goals on the demo are not measured: too slow on this CPU.)\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--top", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if a.memory_child:
        print(json.dumps(measure_memory(a.memory_child, a.layers, a.batch, a.seconds)))
        return
    table(a)


if __name__ == "__main__":
    main()
