"""``noencore condition SHARDS --model SPEC``: cache the frozen text encoder's outputs.

Runs the model's T5 once per distinct caption of the shards and stores the outputs in
``SHARDS/conditions/`` (or ``--out``), so that training never runs T5.
"""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "condition", help="cache the text encoder's outputs for the shards' captions",
        description="Run the model's frozen T5 once per caption of a token-shard directory and "
                    "store the outputs beside the shards (SHARDS/conditions/).")
    p.add_argument("shards", help="token-shard directory written by `noencore precompute`")
    p.add_argument("--model", required=True,
                   help="MusicGen spec: hub id, local folder, or 'tiny'")
    p.add_argument("--out", default=None, help="cache folder (default: SHARDS/conditions)")
    p.add_argument("--batch-size", type=int, default=32, help="captions per T5 batch")
    p.add_argument("--device", default="cpu", help="device for T5 (cpu, cuda)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from noencore.data.shards import TokenShards
    from noencore.models.conditions import condition

    shards = TokenShards(args.shards)
    cache = condition(shards, args.model, out=args.out, batch_size=args.batch_size,
                      device=args.device, progress=not args.quiet)
    print(f"{len(set(shards.captions))} captions cached in {cache.folder} (encoder {cache.encoder})")
    return 0
