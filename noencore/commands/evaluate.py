"""``noencore evaluate``: measure forgetting and quality; write report.json/.md and plots."""
from __future__ import annotations

import argparse
from pathlib import Path

from noencore.errors import NoencoreError, UsageError
from noencore.evaluation.config import cli_option


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="evaluate an unlearned model on forget / remain / holdout sets",
        description="Token NLL and accuracy, membership inference (LOSS, Min-K%%, MUSE's "
                    "Min-K%%, Min-K%%++, compression, LOSS on codebook 0, reference ratio; ROC AUC), MUSE's privleak "
                    "and the same formula on the other attacks, forget quality (KS test on "
                    "per-item mean NLL), and with --clap: CLAP score, FAD, memorisation "
                    "(definitions: docs/metrics.md). Writes OUT/report.json, "
                    "OUT/report.md, OUT/nll_hist.png, OUT/roc.png, OUT/token_stats.npz. Under "
                    "torchrun or deepspeed the ranks share the work and rank 0 reports.")
    p.add_argument("shards", help="token-shard folder (from `noencore precompute`)")
    p.add_argument("--model", required=True, help="unlearned model: folder, hub id or 'tiny'")
    p.add_argument("--reference", **cli_option("reference"))
    p.add_argument("--retrained", **cli_option("retrained"))
    p.add_argument("--out", required=True, help=cli_option("out")["help"])
    p.add_argument("--forget-split", default="forget")
    p.add_argument("--remain-split", default="remain", help="'' to leave the remain set out")
    p.add_argument("--holdout-split", default="holdout", help="'' to leave the holdout set out")
    p.add_argument("--forget-ids", help="file with one source id per line (instead of a split)")
    p.add_argument("--metrics", help="comma-separated subset of: token, mia, privleak, "
                                     "forget_quality, dataset_inference, clap, fad, "
                                     "memorization, continuation, ngram")
    p.add_argument("--batch-size", type=int, **cli_option("batch_size"))
    p.add_argument("--frames", type=int, **cli_option("frames"))
    p.add_argument("--precision", choices=("bf16", "fp32"), **cli_option("precision"))
    p.add_argument("--device", **cli_option("device"))
    p.add_argument("--conditions", **cli_option("conditions"))
    p.add_argument("--clap", **cli_option("clap"))
    p.add_argument("--clap-tokenizer", **cli_option("clap_tokenizer"))
    p.add_argument("--clap-model", **cli_option("clap_model"))
    p.add_argument("--gen-seconds", type=float, default=5.0, help="seconds generated per caption")
    p.add_argument("--gen-items", type=int, default=64, help="items per set for generation")
    p.add_argument("--gen-batch-size", type=int, default=8)
    p.add_argument("--cfg-coef", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verdict", help="thresholds, e.g. forget_auc_tol=0.05,remain_nll_rel=0.1")
    p.add_argument("--min-auc-items", type=int, **cli_option("min_auc_items"))
    p.add_argument("--relearn-steps", default=None, metavar="N[,N...]",
                   help="relearning probe: fine-tune a copy on the remain set for N steps "
                        "(several: 5,10) and measure the forget AUC and NLLs again")
    p.add_argument("--relearn-lr", type=float, **cli_option("relearn_lr"))
    p.add_argument("--relearn-batch-size", type=int, **cli_option("relearn_batch_size"))
    p.add_argument("--overwrite", action="store_true", help=cli_option("overwrite")["help"])
    p.add_argument("--allow-codec-mismatch", action="store_true",
                   help=cli_option("allow_codec_mismatch")["help"])
    p.add_argument("--report-to", **cli_option("report_to"))
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from noencore import distributed
    from noencore.data.shards import TokenShards
    from noencore.evaluation import mia, relearn
    from noencore.evaluation.evaluate import evaluate
    from noencore.evaluation.generation import GenerationConfig
    from noencore.evaluation.report import Criteria

    shards = TokenShards(args.shards)
    if args.forget_ids:
        from noencore.data.shards import read_ids

        forget = shards.select(ids=read_ids(args.forget_ids))
    else:
        forget = shards.select(split=args.forget_split)
    sets = {"forget": forget}
    if args.remain_split:
        sets["remain"] = shards.select(split=args.remain_split)
    if args.holdout_split:
        sets["holdout"] = shards.select(split=args.holdout_split)
    for name, s in sets.items():
        if len(s) == 0:
            raise NoencoreError(f"{shards.path}: the {name} set is empty (no item with split "
                                f"{getattr(args, name + '_split', '?')!r}); check --{name}-split")
    try:
        criteria = Criteria.parse(args.verdict)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    frame_rate = shards.header.frame_rate
    gen = GenerationConfig(frames=max(1, round(args.gen_seconds * frame_rate)),
                           cfg_coef=args.cfg_coef, seed=args.seed, batch_size=args.gen_batch_size,
                           max_items=args.gen_items)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    results = evaluate(
        args.model, sets, metrics=metrics, reference=args.reference, batch_size=args.batch_size,
        out=args.out, retrained=args.retrained, conditions=args.conditions, frames=args.frames,
        precision=args.precision, device=args.device, clap=args.clap,
        clap_tokenizer=args.clap_tokenizer, clap_model=args.clap_model, generation=gen,
        criteria=criteria, min_auc_items=args.min_auc_items or mia.MIN_AUC_ITEMS,
        progress=not args.quiet, allow_codec_mismatch=args.allow_codec_mismatch,
        overwrite=args.overwrite,
        relearn_steps=relearn.parse_steps(args.relearn_steps),
        relearn_lr=args.relearn_lr, relearn_batch_size=args.relearn_batch_size,
        report_to=args.report_to)
    speaker = distributed.rank() == 0
    distributed.leave()
    if not speaker:
        return 0  # under a launcher rank 0 speaks for the run
    for note in results["notes"]:
        print(f"note: {note}")
    for v in results["verdicts"]:
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[v["pass"]]
        value = "n/a" if v["value"] is None else f"{v['value']:.4f}"
        print(f"{mark} {v['criterion']}: {value} ({v['threshold']}; {v['detail']})")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0
