"""``noencore demo --out DIR``: the whole opt-out pipeline on a corpus it synthesises."""
from __future__ import annotations

import argparse
import os


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="run the whole opt-out pipeline on a synthetic corpus (CPU, offline)",
        description="Synthesise a small music corpus with an opt-out artist, precompute token "
                    "shards, fine-tune a tiny MusicGen until it memorised them, unlearn the "
                    "opt-out artist with several methods and evaluate before/after. Re-running "
                    "reuses every finished stage.")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--fresh", action="store_true", help="redo every stage")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus and the runs")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of the demo's methods (default: all)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads of every stage, whatever the machine (default: 2, "
                        "as the README's table; another count gives other figures)")
    p.add_argument("--quiet", action="store_true", help="no progress bars inside the stages")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # The demo keeps its two threads where other jobs hold the cores too, and a thread
    # that spins at each barrier while its partner waits for a core wastes them: sleeping
    # threads ran the RL stage 3.7x faster on a shared 2-core machine, with the same
    # results. OpenMP reads this when torch loads it: set before the first torch import.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from noencore.demo import DemoConfig, run_demo
    from noencore.errors import UsageError

    cfg = DemoConfig(seed=args.seed)
    if args.threads is not None:
        cfg.threads = args.threads
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        known = {name for name, _ in cfg.methods}
        bad = [m for m in wanted if m not in known]
        if bad:
            raise UsageError(f"unknown demo method(s) {bad}; choose from {sorted(known)}")
        cfg.methods = tuple((n, o) for n, o in cfg.methods if n in wanted)
    run_demo(args.out, cfg, fresh=args.fresh, progress=not args.quiet)
    return 0
