"""The default method serving one opt-out as two requests in a row, on a finished demo.

    .venv/bin/python benchmarks/demo_two_requests.py --demo /tmp/demo_seeds/seed0 \
        [--out /tmp/two_requests] [--steps 600]

The artist's forget tracks are split in two halves by id: request A unlearns the first
half from the demo's memorised model (the second half is still remain data), request B
the second half from A's saved model, with A's tracks in its remain set (the anchored
default method holds them where A left them). Both with the demo's settings for the
default method. Then the evaluation of the demo's table on the final model (all forget
tracks, against the demo's memorised and retrained models' statistics), and each half's
LOSS AUC against the artist's unseen tracks after A, after B and under the retrained
model. Nothing is written into the demo folder.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `noencore demo` sets


def main() -> None:
    import torch

    from noencore.data.shards import TokenShards
    from noencore.demo.pipeline import (
        DEFAULT_METHOD,
        DEFAULT_METHODS,
        HOLDOUT,
        DemoConfig,
        _replay_config,
        _summary_row,
        summary_table,
    )
    from noencore.engine.loop import unlearn
    from noencore.evaluation.evaluate import evaluate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", required=True, help="a finished demo folder (noencore demo)")
    ap.add_argument("--out", default="/tmp/two_requests")
    ap.add_argument("--steps", type=int, default=None,
                    help="steps per request (default: the demo's for its default method)")
    args = ap.parse_args()
    torch.set_num_threads(DemoConfig().threads)
    demo, out, cfg = Path(args.demo), Path(args.out), DemoConfig()
    options = dict(dict(DEFAULT_METHODS)[DEFAULT_METHOD])
    shards = TokenShards(demo / "shards")
    forget = sorted(dict.fromkeys(shards.select(split="forget").ids))
    remain = list(dict.fromkeys(shards.select(split="remain").ids))
    a, b = forget[: len(forget) // 2], forget[len(forget) // 2:]
    kw = dict(method=DEFAULT_METHOD, steps=args.steps or int(options["steps"]),
              lr=cfg.unlearn_lr, batch_size=cfg.batch_size, forget_ratio=cfg.unlearn_forget_ratio,
              frames=cfg.frames, weight_decay=cfg.unlearn_weight_decay, seed=0, grad_clip=1.0,
              stop_nonmembers=options["stop_nonmembers"], anchor_unseen=options["anchor_unseen"],
              stop_every=int(options.get("stop_every", 1)), progress=True)
    t0 = time.perf_counter()
    first = unlearn(str(demo / "models" / "memorised" / "model"), shards, forget=a,
                    remain=remain + b, out=out / "a", **kw)
    second = unlearn(str(first.model_dir), shards, forget=b, remain=remain + a,
                     out=out / "b", **kw)
    print(f"requests: A {first.steps} steps ({first.stopped}), B {second.steps} steps "
          f"({second.stopped}), {time.perf_counter() - t0:.0f} s")

    sets = {"forget": shards.select(split="forget"), "remain": shards.select(split="remain"),
            "holdout": shards.select(split=HOLDOUT)}
    base, gold = (json.loads((demo / "reports" / m / "report.json").read_text())
                  for m in ("memorised", "retrained"))
    rep = evaluate(str(second.model_dir), sets, reference=demo / "reports" / "memorised",
                   retrained=demo / "reports" / "retrained", batch_size=cfg.batch_size,
                   out=out / "report", overwrite=True, frames=cfg.frames,
                   generation=_replay_config(cfg), progress=False,
                   metrics=["token", "mia", "privleak", "forget_quality", "dataset_inference",
                            "continuation", "ngram"], relearn_steps=cfg.relearn_steps,
                   relearn_lr=cfg.unlearn_lr, relearn_batch_size=cfg.batch_size)
    # the demo report's table: the retrained model's row, then the final model's
    print(summary_table({"A then B": _summary_row(rep, base, gold)},
                        _summary_row(gold, base, gold, retrained_row=True)))
    for label, model in (("after A", first.model_dir), ("after A then B", second.model_dir),
                         ("retrained", demo / "models" / "retrained" / "model")):
        aucs = [evaluate(str(model), {"forget": half, "remain": "remain", "holdout": HOLDOUT},
                         shards=shards, metrics=["token", "mia"], batch_size=cfg.batch_size,
                         frames=cfg.frames, min_auc_items=len(half), progress=False
                         )["mia"]["after"]["forget"]["loss"] for half in (a, b)]
        print(f"{label}: LOSS AUC against the artist's unseen tracks: A {aucs[0]:.3f}, "
              f"B {aucs[1]:.3f}")


if __name__ == "__main__":
    main()
