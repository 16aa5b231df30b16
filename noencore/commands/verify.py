"""``noencore verify OUT_DIR``: check every checksum of a token-shard directory."""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "verify", help="check the format version and every checksum of token shards",
        description="Read every file of a token-shard directory and check its size and sha256 "
                    "against checksums.json, the header's format version, and that the index "
                    "fits the shard files. Exit code 1 names the first bad file.")
    p.add_argument("out_dir", help="token-shard directory written by `noencore precompute`")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from noencore.data.shards import TokenShards

    shards = TokenShards(args.out_dir, verify=True)  # raises NoencoreError naming the file
    n_files = len(shards.files)
    print(f"{args.out_dir}: OK ({n_files} files, {len(shards)} segments, "
          f"{shards.hours:.3f} h, format version {shards.header.format_version})")
    return 0
