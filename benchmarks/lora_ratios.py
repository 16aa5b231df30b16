"""LoRA against full training: memory of a step, and forgetting on the demo corpus.

1. Memory and time of one unlearning step (GradDiff, the engine's fused op, AdamW, fp32)
   at MusicGen-small's width (dim 1024, 16 heads, ``--layers`` layers, a T5-base-sized
   encoder's outputs), B clips of ``--seconds`` s: the training state (the LM's weights,
   plus gradients and AdamW's two moments of what trains, counted), and, each variant in
   a fresh subprocess, the RSS once that state exists and the peak RSS during a step;
   step times interleaved in one process (best of ``--reps``).
2. Forgetting on the demo corpus (``noencore.demo``): the engine's best method
   (bounded GA with the remain anchor, stopped by the membership-inference rule) from
   the same memorised model, with all weights trained and with LoRA adapters only; the
   demo's evaluation (forget / holdout MIA AUC, remain NLL change).

    python benchmarks/lora_ratios.py [--layers 2 --batch 2 --seconds 5 --rank 8 --reps 3
                                      --demo-out .cache/bench_lora_demo --skip-demo]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from engine_ratios import best_step_times, engine_step, peak_rss, setup  # noqa: E402

TARGETS = ("attention", "heads")
VARIANTS = ("full", "lora")


def _lora(rank: int) -> dict:
    return {"rank": rank, "alpha": 2 * rank, "targets": TARGETS}


def step_state(variant: str, layers: int, batch: int, seconds: float, rank: int) -> dict:
    """engine_ratios' engine state, with LoRA adapters and their own AdamW for "lora"."""
    from noencore.models.lora import apply_lora

    st = setup(layers, batch, seconds, "engine")
    if variant == "lora":
        apply_lora(st["model"], _lora(rank))
        st["opt"] = torch.optim.AdamW([p for p in st["model"].lm.parameters()
                                       if p.requires_grad], lr=1e-5)
    return st


def measure_memory(variant: str, layers: int, batch: int, seconds: float, rank: int) -> dict:
    """In this (fresh) process: the training state's bytes, the RSS once it exists, and
    the peak RSS during a step (sampled every ms)."""
    st = step_state(variant, layers, batch, seconds, rank)
    params = list(st["model"].lm.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    engine_step(st, False)  # warm-up: gradients and AdamW moments exist afterwards
    before, peak = peak_rss(lambda: engine_step(st, False))
    # fp32 weights of the whole LM + (gradient + 2 AdamW moments) of what trains
    state = 4 * total + 3 * 4 * trainable
    return {"trainable": trainable, "total": total, "state_mb": state / 2**20,
            "rss_mb": before / 2**20, "peak_mb": peak / 2**20}


def step_table(a: argparse.Namespace) -> None:
    rows = {}
    for v in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--memory-child", v, "--layers",
                              str(a.layers), "--batch", str(a.batch), "--seconds",
                              str(a.seconds), "--rank", str(a.rank)],
                             capture_output=True, text=True, check=True)
        rows[v] = json.loads(out.stdout.strip().splitlines()[-1])
    # times in one process, interleaved (the minimum is the least disturbed run), as the
    # machine's load moves between subprocesses
    best = best_step_times({v: step_state(v, a.layers, a.batch, a.seconds, a.rank)
                            for v in VARIANTS}, a.reps)
    full, lora = rows["full"], rows["lora"]
    print(f"### One step (GradDiff, fp32, AdamW): dim 1024, {a.layers} layers, "
          f"{full['total'] / 1e6:.1f} M LM params, B={a.batch}, {a.seconds:g} s\n")
    print("| variant | trainable params | weights + grads + AdamW MB | RSS with state MB | "
          "peak RSS of a step MB | step s |")
    print("|---|---|---|---|---|---|")
    for v, r in rows.items():
        name = "full" if v == "full" else f"LoRA r={a.rank} ({', '.join(TARGETS)})"
        print(f"| {name} | {r['trainable'] / 1e6:.2f} M | {r['state_mb']:.0f} | "
              f"{r['rss_mb']:.0f} | {r['peak_mb']:.0f} | {best[v]:.3f} |")
    print(f"\nLoRA/full: training state {lora['state_mb'] / full['state_mb']:.2f}x, "
          f"peak RSS {lora['peak_mb'] / full['peak_mb']:.2f}x "
          f"({full['peak_mb'] - lora['peak_mb']:.0f} MB less), step time "
          f"{best['lora'] / best['full']:.2f}x\n")


def demo_table(a: argparse.Namespace) -> None:
    from noencore.demo import DEFAULT_METHODS, DemoConfig, run_demo, summary_table

    best = dict(DEFAULT_METHODS)["bounded_ga"]
    methods = (("bounded_ga", best),
               ("bounded_ga_lora", {**best, "method": "bounded_ga", "lora": _lora(a.rank)}))
    out = Path(a.demo_out)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the demo's progress is not the result
        run_demo(out, DemoConfig(methods=methods))
    reports = {name: json.loads((out / "reports" / name / "report.json").read_text())
               for name, _ in methods}
    print("### Forgetting on the demo corpus: bounded GA (remain anchor, MIA stop rule), "
          "all weights vs LoRA\n")
    print(summary_table(reports) + "\n")
    print("| run | steps | unlearning s | trainable params |")
    print("|---|---|---|---|")
    for name, _ in methods:
        metrics = [json.loads(x) for x in
                   (out / "models" / name / "metrics.jsonl").read_text().splitlines()]
        ckpt = json.loads(next((out / "models" / name / "checkpoints")
                               .glob("step_*/manifest.json")).read_text())
        lora = ckpt["run"].get("lora")
        trained = "all" if lora is None else f"LoRA r={lora['rank']} on {lora['weights']} weights"
        print(f"| {name} | {len(metrics)} | {sum(m['step_s'] for m in metrics):.1f} | "
              f"{trained} |")
    print(f"\n(demo with both runs: {time.perf_counter() - t0:.0f} s; LoRA: rank {a.rank}, "
          f"alpha {2 * a.rank}, targets {', '.join(TARGETS)}; same lr, weight decay and "
          "step budget as the full run)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--demo-out", default=str(HERE.parent / ".cache" / "bench_lora_demo"))
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if a.memory_child:
        print(json.dumps(measure_memory(a.memory_child, a.layers, a.batch, a.seconds, a.rank)))
        return
    step_table(a)
    if not a.skip_demo:
        demo_table(a)


if __name__ == "__main__":
    main()
