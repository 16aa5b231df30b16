"""Robustness of the demo's default method: the demo (its default method only, with the
retrained gold standard) on three corpus seeds, and the goal table of each.

    .venv/bin/python benchmarks/demo_seeds.py [--out /tmp/demo_seeds] [--seeds 0 1 2]

Each seed is a full demo run (corpus, shards, memorised and retrained models, the
default method, evaluations; a few minutes each on 2 CPU cores); runs are resumable, as
the demo's stages are. Prints one Markdown table per seed and one row per seed of the
goals (``noencore.demo.GOALS``).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main() -> None:
    from noencore.demo import DEFAULT_METHOD, DEFAULT_METHODS, DemoConfig, goals_met, run_demo

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/demo_seeds")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    methods = tuple(m for m in DEFAULT_METHODS if m[0] == DEFAULT_METHOD)
    lines = ["| seed | " + " | ".join(
        ["forget NLL", "unseen NLL [retrained]", "remain Δ%", "LOSS AUC [retrained]",
         "strongest attack ΔAUC", "KS p", "DI p [retrained]", "replay [retrained]",
         "goals met", "run (s)"]) + " |", "|---" * 11 + "|"]
    for seed in args.seeds:
        t0 = time.perf_counter()
        out = Path(args.out) / f"seed{seed}"
        report = run_demo(out, DemoConfig(seed=seed, methods=methods))
        seconds = time.perf_counter() - t0
        print(report.read_text().split("## Reproducibility")[0], flush=True)
        r = json.loads((out / "summary.json").read_text())[DEFAULT_METHOD]
        goals = goals_met(r)
        failed = [k for k, v in goals.items() if v is not True]
        lines.append(
            f"| {seed} | {r['forget_nll_after']:.3f} | {r['holdout_nll_after']:.3f} "
            f"[{r['holdout_nll_retrained']:.3f}] | "
            f"{100 * (r['remain_nll_after'] / r['remain_nll_before'] - 1):+.2f} | "
            f"{_f(r['forget_mia_auc_after'])} [{_f(r['forget_mia_auc_retrained'])}] | "
            f"{r.get('forget_auc_worst_attack')} {_f(r.get('forget_auc_gap'))} | "
            f"{_f(r['forget_quality'])} | "
            f"{_p(r.get('di_p_after'))} [{_p(r.get('di_p_retrained'))}] | "
            f"{_f(r['replay_after'])} [{_f(r['replay_retrained'])}] | "
            f"{sum(v is True for v in goals.values())}/{len(goals)}"
            + (f" (not: {', '.join(failed)})" if failed else "") + f" | {seconds:.0f} |")
    print("\n".join(lines))


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}"


if __name__ == "__main__":
    main()
