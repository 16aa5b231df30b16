"""Robustness of the demo's default method: the demo (its default method only, with the
retrained gold standard) on three corpus seeds, and the goal table of each.

    .venv/bin/python benchmarks/demo_seeds.py [--out /tmp/demo_seeds] [--seeds 0 1 2]
        [--corpus distinct shared] [--forget-sizes one third all]

Each (corpus, forget size, seed) is a full demo run (corpus, shards, memorised and retrained models, the
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
# threads that sleep at a barrier instead of spinning (as `noencore demo` sets): beside
# another job on the same cores, spinning threads ran 20x slower per step
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# the request's share of the opt-out artist's trained tracks (one track: the smallest share,
# which the corpus rounds up to one clip)
SIZES = {"one": 1e-9, "third": 1 / 3, "all": 1.0}


def main() -> None:
    from noencore.demo import DEFAULT_METHOD, DEFAULT_METHODS, DemoConfig, run_demo
    from noencore.demo.corpus import CORPUS_STYLES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/demo_seeds")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--corpus", nargs="+", default=["distinct"], choices=sorted(CORPUS_STYLES),
                    help="distinct: the other artists sound unlike the opt-out artist; "
                         "shared: they are its neighbours in genre and sound")
    ap.add_argument("--forget-sizes", nargs="+", default=["all"], choices=sorted(SIZES),
                    help="how much of the artist's trained music the request names: one "
                         "track, a third, or all of it (the rest stays in the remain set)")
    ap.add_argument("--twins", type=int, default=1,
                    help="models retrained without the forget set in another batch order, "
                         "scored against the gold standard as the method is: the goals' "
                         "resolution on this corpus (a goal a twin misses is beyond it)")
    args = ap.parse_args()
    methods = tuple(m for m in DEFAULT_METHODS if m[0] == DEFAULT_METHOD)
    lines = ["| corpus | forget | seed | model | " + " | ".join(
        ["forget NLL", "unseen NLL [retrained]", "remain Δ%", "LOSS AUC [retrained]",
         "strongest attack ΔAUC", "KS p", "DI p [retrained]", "replay [retrained]",
         "relearned AUC", "goals met", "run (s)"]) + " |", "|---" * 15 + "|"]
    runs = [(c, f, s) for c in args.corpus for f in args.forget_sizes for s in args.seeds]
    for corpus, size, seed in runs:
        t0 = time.perf_counter()
        # the default corpus and size keep the folder names of earlier runs
        name = f"seed{seed}" + ("" if corpus == "distinct" else f"-{corpus}") + \
            ("" if size == "all" else f"-{size}")
        out = Path(args.out) / name
        report = run_demo(out, DemoConfig(seed=seed, methods=methods, corpus=corpus,
                                          forget_share=SIZES[size],
                                          retrain_twins=args.twins))
        seconds = time.perf_counter() - t0
        print(report.read_text().split("## Reproducibility")[0], flush=True)
        rows = json.loads((out / "summary.json").read_text())
        lines.append(_row(corpus, size, seed, DEFAULT_METHOD, rows[DEFAULT_METHOD], seconds))
        for k in range(1, args.twins + 1):  # a model that never saw the forget set
            lines.append(_row(corpus, size, seed, f"retrained, order {seed + k}",
                              rows[f"retrained_order{k}"], None))
    print("\n".join(lines))


def _row(corpus: str, size: str, seed: int, model: str, r: dict, seconds: float | None) -> str:
    """One Markdown row of the table: a model's figures and the goals it meets (the
    demo report's own cell formats)."""
    from noencore.demo import goals_met
    from noencore.demo.pipeline import _fmt as _f
    from noencore.demo.pipeline import _fmt_p as _p
    from noencore.demo.pipeline import _strongest_cell

    goals = goals_met(r)
    failed = [k for k, v in goals.items() if v is False]
    unknown = [k for k, v in goals.items() if v is None]  # too few tracks to measure
    return (
        f"| {corpus} | {size} | {seed} | {model} | {r['forget_nll_after']:.3f} | "
        f"{r['holdout_nll_after']:.3f} [{r['holdout_nll_retrained']:.3f}] | "
        f"{100 * (r['remain_nll_after'] / r['remain_nll_before'] - 1):+.2f} | "
        f"{_f(r['forget_mia_auc_after'])} [{_f(r['forget_mia_auc_retrained'])}] | "
        f"{_strongest_cell(r)} | "
        f"{_f(r['forget_quality'])} | "
        f"{_p(r.get('di_p_after'))} [{_p(r.get('di_p_retrained'))}] | "
        f"{_f(r['replay_after'])} [{_f(r['replay_retrained'])}] | "
        f"{_f(r.get('relearn_auc'))} | "
        f"{sum(v is True for v in goals.values())}/{len(goals)}"
        + (f" (not: {', '.join(failed)})" if failed else "")
        + (f" (n/a: {', '.join(unknown)})" if unknown else "")
        + f" | {'–' if seconds is None else f'{seconds:.0f}'} |")


if __name__ == "__main__":
    main()
