"""The Min-K%++ variance floor on a memorised model: how many tokens it touches, how far
one token can swing an item's score, and the attack's AUC, for several floors.

    .venv/bin/python benchmarks/minkpp_floor.py [demo_out] [--floors 1e-12 1e-6 1e-4]

Reads the token statistics a finished demo saved (``reports/<model>/token_stats.npz``:
the memorised model, the retrained one and each method) and prints one Markdown table:
per model and floor, the share of forget tokens whose own variance lies below the
floor, the most negative z-score, the largest share of an item's Min-K%++ sum that its
single lowest token holds (1.0: that token alone is the score), and the forget-vs-holdout
AUC of Min-K%++ (k = 0.2). docs/metrics.md cites the figures.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def _lowest_token_share(z: np.ndarray, item: np.ndarray, n_items: int, k: float) -> np.ndarray:
    """Per item: |its lowest z| / |the sum of its kept (lowest max(1, floor(k n))) z|."""
    out = np.zeros(n_items)
    for i in range(n_items):
        v = np.sort(z[item == i])
        if v.size == 0:
            continue
        kept = v[:max(1, int(v.size * k))]
        out[i] = abs(kept[0]) / max(abs(kept.sum()), 1e-300)
    return out


def main() -> None:
    from noencore.evaluation import mia
    from noencore.evaluation.token_metrics import load_stats

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo_out", nargs="?", default="demo_out")
    ap.add_argument("--floors", type=float, nargs="+", default=[1e-12, 1e-6, 1e-4, 1e-2])
    args = ap.parse_args()
    reports = Path(args.demo_out) / "reports"
    models = ["memorised", "retrained"] + sorted(
        p.name for p in reports.iterdir()
        if p.name not in ("memorised", "retrained") and (p / "token_stats.npz").is_file())
    print("| model | floor | forget tokens below it | lowest z | largest share of one "
          "token in an item's score | Min-K%++ AUC forget vs holdout |")
    print("|---|---|---|---|---|---|")
    for name in models:
        stats, _ = load_stats(reports / name)
        f, h = stats["forget"].tokens(), stats["holdout"].tokens()
        for floor in args.floors:
            zf = mia.minkpp_z(f, floor)
            share = _lowest_token_share(zf, f.item, f.n_items, mia.MINK_K)
            auc = mia.roc_auc(mia.minkpp_score(f, var_floor=floor),
                              mia.minkpp_score(h, var_floor=floor))
            print(f"| {name} | {floor:g} | {np.mean(f.logp_var < floor):.2%} | "
                  f"{zf.min():.3g} | {share.max():.3f} | {auc:.3f} |")


if __name__ == "__main__":
    main()
